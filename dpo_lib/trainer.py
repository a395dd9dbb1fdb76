"""The DPO training loop, from scratch: AdamW, warm-up then decay, accumulation, clipping.

One optimizer step takes ``batch_size`` preference pairs, in ``grad_accum`` micro-batches.
For each micro-batch: one forward of the policy over the concatenated ``[chosen; rejected]``
sequences (:func:`dpo_lib.logprobs.concatenated_forward`), reference log-probs from the
cache or a frozen model under ``no_grad`` (:mod:`dpo_lib.reference`; none for the
reference-free ``simpo`` and ``orpo``), the loss of :func:`dpo_lib.losses.dpo_loss`, backward.
Then clip, step, schedule.

Metrics use TRL's names (``loss``, ``rewards/chosen``, ``rewards/accuracies``, ``logps/chosen`` …);
:class:`dpo_lib.logger.MetricsLogger` writes one JSON line per step to ``OUT/metrics.jsonl`` and prints
the table; :mod:`dpo_lib.checkpoints` writes and reads the resumable checkpoints. The settings and their defaults are
:class:`dpo_lib.config.TrainConfig`.

Speed (on by default; same maths, fewer FLOPs — see ``python -m dpo_lib bench``):
``sort_by_length`` orders each step's pairs by length before cutting them into the
``grad_accum`` micro-batches, so each micro-batch is padded only to its own longest pair;
``compact_lm_head`` runs the LM head only on the positions that score a completion token, and with it
``shared_prompt`` runs each pair as one row ``[prompt | chosen | rejected]`` (the prompt once, not twice),
and ``padding_free`` lays a micro-batch's rows end to end so the linear layers see no padding;
``sparse_embedding_grad`` gives a tied input embedding a sparse gradient, added row by row into the
LM head's dense one (:func:`dpo_lib.logprobs.sparse_embedding_grad`).
``precision="bf16"`` runs the forward under bf16 autocast (:func:`dpo_lib.precision.autocast`);
then compute the reference log-probs under the same autocast, or step-0 rewards are not 0.
``precision="fp16"`` (GPUs without bf16) adds a dynamic loss scaler in the backend (:mod:`dpo_lib.amp`):
a step whose gradients overflow is skipped, not stopped, and ``amp/scale``, ``amp/skipped_steps`` are logged.
Resuming from a checkpoint gives bitwise the weights of an uninterrupted run in float32; in
bf16 only up to rounding (CPU bf16 matmuls are not always bitwise the same from one process
to the next).

Several processes (``accelerate launch``, see ``configs/``): pass an ``accelerate.Accelerator``;
the trainer talks to it through :mod:`dpo_lib.distributed` (one process or several, one interface).

The first step's reference. Before the first update the policy *is* the reference, so at step 0
the precomputed reference log-probs of the step's pairs are replaced by the policy's own, detached,
taken in the same forward (:func:`reference_logps`): every implicit reward is exactly 0 and the
loss exactly ln 2, whatever the rounding of the precomputed pass in another batch layout (a live
reference model sees the training layout itself, and is asked as usual). Nothing is written into the
caller's features. The trainer seeds no global generator: the data order comes from the step
(:func:`step_indices`), and the caller seeds what else is random (the recipes do, in
:mod:`dpo_lib.recipes.run`).
"""

from __future__ import annotations

import math
import signal
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from dpo_lib import checkpoints
from dpo_lib.config import TrainConfig
from dpo_lib.distributed import backend_for
from dpo_lib.features import batch_to, collate, pair_length
from dpo_lib.logger import MetricsLogger
from dpo_lib.logprobs import concatenated_forward, sparse_embedding_grad
from dpo_lib.losses import LOSSES, chosen_nll, dpo_loss, loss_params, needs_reference
from dpo_lib.precision import autocast, resolve_precision
from dpo_lib.reference import FrozenReference

__all__ = ["DPOTrainer", "NonFiniteError", "TrainingInterrupted", "batch_loss", "completion_lengths",
           "deferred_sigint", "lr_factor", "make_optimizer", "parameter_groups", "reference_logps", "step_indices"]


class NonFiniteError(RuntimeError):
    """A NaN/inf loss or gradient norm: training stopped before the bad update."""

    def __init__(self, step: int, what: str, last_checkpoint: Path | None):
        super().__init__(
            f"step {step}: {what}; the update was not applied. "
            + (f"Last good checkpoint: {last_checkpoint} (resume with --resume). " if last_checkpoint
               else "No checkpoint was written. ")
            + "Try a lower --learning-rate, a smaller --beta for IPO, float32 instead of float16, "
              "or check the data for empty or truncated responses.")


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = (step - warmup) / (total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM (``signum``) during training: the step in progress was finished, and ``checkpoint``
    (if any) holds it; the command line exits ``128 + signum`` (130, 143)."""

    def __init__(self, step: int, checkpoint: Path | None, signum: int = signal.SIGINT):
        super().__init__(f"interrupted after step {step}")
        self.step, self.checkpoint, self.signum = step, checkpoint, signum


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW's two groups: weight decay on matrices, none on biases and norm scales (1-D)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, config, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over :func:`parameter_groups`; fused (one kernel for the whole update: on 2 CPU cores
    0.08 s instead of 0.65 s for 135M parameters) when every parameter is on the CPU or one GPU."""
    groups = parameter_groups(model, config.weight_decay)
    params = [p for g in groups for p in g["params"]]
    fused = device.type in ("cpu", "cuda") and all(p.device.type == device.type for p in params)
    return torch.optim.AdamW(groups, lr=config.learning_rate, fused=fused or None)


@contextmanager
def deferred_sigint():
    """Ctrl-C (SIGINT) and SIGTERM set ``flag["hit"]`` and ``flag["signum"]`` instead of stopping the run, so the
    step in progress, and a checkpoint being written, can finish; the loop checks the flag after each step.

    Both handlers are installed together, before the first step, and put back together at the end; a system call
    the signal lands in is restarted, not failed (a checkpoint being written completes); a second
    signal gets the previous handler (a second Ctrl-C stops at once; the checkpoint write cleans up after
    itself). Main thread only; a SIGINT someone else handles (a notebook kernel, a test) is left to them."""
    flag = {"hit": False, "signum": None}
    previous: dict = {}

    def hit(signum, _frame):
        if not flag["hit"]:
            flag.update(hit=True, signum=signum)
        signal.signal(signum, previous[signum])

    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            old = signal.getsignal(sig)
            if old is signal.SIG_IGN or (sig == signal.SIGINT and old is not signal.default_int_handler):
                continue
            previous[sig] = old
            signal.signal(sig, hit)
            signal.siginterrupt(sig, False)  # restart the system calls it lands in: a write in torch.save does not
            # fail with EINTR ("unexpected pos"), it completes, and the handler runs after it
    except ValueError:  # not the main thread: signals are delivered there only
        pass
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def completion_lengths(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Scored completion tokens of each chosen and each rejected response of a collated batch, ``[B]`` each
    (``|y_w|``, ``|y_l|``: what :func:`dpo_lib.logprobs.concatenated_forward` sums over)."""
    return batch["completion_mask"][:, 1:].sum(1).chunk(2)


def reference_logps(batch: dict, chosen: torch.Tensor, rejected: torch.Tensor, reference=None,
                    policy_is_reference: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's log-probs of a micro-batch, ``[B]`` each: the policy's own, detached, when the policy
    is the reference (the first step: module docstring); else the batch's precomputed ones, else
    ``reference(batch)`` (a frozen model under no_grad)."""
    if policy_is_reference:
        return chosen.detach(), rejected.detach()
    if "ref_chosen_logps" in batch:
        return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    return reference(batch)


def batch_loss(model, batch: dict, c: TrainConfig, reference=None, device="cpu",
               policy_is_reference: bool = False) -> tuple[torch.Tensor, dict]:
    """The step function: the loss of one collated micro-batch (mean over its pairs) and its metrics, TRL's names.

    One forward of ``model`` over ``[chosen; rejected]`` (under ``c.precision``'s autocast), the reference
    log-probs of :func:`reference_logps` (none for the reference-free losses: ``simpo``, ``orpo``, whose
    ``rewards/*`` are β times the per-token mean log-prob, as TRL's CPO and ORPO trainers log them), the
    loss ``c.loss_type`` of the registry (:mod:`dpo_lib.losses`) with its own parameters, and
    ``c.nll_weight`` times the chosen reply's NLL. ``logps/*`` are the summed log-probs for every loss;
    for ``orpo``, ``nll`` is the NLL part of its loss (already inside ``loss``)."""
    with autocast(c.precision, device), sparse_embedding_grad(model, c.sparse_embedding_grad):
        chosen, rejected = concatenated_forward(model, batch, compact_head=c.compact_lm_head,   # (B,), (B,)
                                                shared_prompt=c.shared_prompt, padding_free=c.padding_free)
    n_chosen, n_rejected = completion_lengths(batch)                               # (B,), (B,)
    ref_chosen = ref_rejected = None
    if needs_reference(c.loss_type):
        ref_chosen, ref_rejected = reference_logps(batch, chosen, rejected, reference, policy_is_reference)
    losses, r_chosen, r_rejected = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=c.beta,
                                            loss_type=c.loss_type, label_smoothing=c.label_smoothing,
                                            chosen_num_tokens=n_chosen, rejected_num_tokens=n_rejected,
                                            **loss_params(c))
    loss = losses.mean()
    metrics = {"loss": loss.item()}
    if c.nll_weight:
        nll = chosen_nll(chosen, n_chosen).mean()
        loss = loss + c.nll_weight * nll
        metrics["nll"] = nll.item()
    elif LOSSES[c.loss_type].holds_nll:
        metrics["nll"] = chosen_nll(chosen.detach(), n_chosen).mean().item()
    metrics.update({
        "rewards/chosen": r_chosen.mean().item(),
        "rewards/rejected": r_rejected.mean().item(),
        "rewards/accuracies": (r_chosen > r_rejected).float().mean().item(),
        "rewards/margins": (r_chosen - r_rejected).mean().item(),
        "logps/chosen": chosen.detach().mean().item(),
        "logps/rejected": rejected.detach().mean().item(),
    })
    return loss, metrics


def step_indices(step: int, n: int, steps_per_epoch: int, batch_size: int, seed: int, shuffle: bool) -> list[int]:
    """Pair indices of optimizer step ``step`` out of ``n``: a permutation seeded by ``seed + epoch``
    (file order without ``shuffle``), so the position in the data is a function of the step alone
    and a resumed run takes the same batches."""
    epoch, k = divmod(step, steps_per_epoch)
    order = np.random.default_rng(seed + epoch).permutation(n) if shuffle else np.arange(n)
    return order[k * batch_size:(k + 1) * batch_size].tolist()


class DPOTrainer:
    """Train ``model`` on tokenized ``features`` (:func:`dpo_lib.features.tokenize_rows`).

    ``reference``: a callable batch -> (chosen, rejected) log-probs (:class:`dpo_lib.reference.FrozenReference`),
    or ``None`` when the features carry precomputed ``ref_chosen_logps`` / ``ref_rejected_logps`` or the loss
    is reference-free. ``policy_is_reference=False``: the reference is not the starting policy (round 2 of
    iterative DPO against the initial model), so the first step reads it like every other step."""

    def __init__(self, model, features: list[dict], config: TrainConfig, pad_token_id: int,
                 reference=None, out_dir: str | Path | None = None, accelerator=None,
                 policy_is_reference: bool = True):
        self.backend = b = backend_for(model, accelerator)
        if config.batch_size % (config.grad_accum * b.world):
            raise ValueError(f"batch_size={config.batch_size} is not divisible by grad_accum={config.grad_accum}"
                             + (f" x {b.world} processes" if b.world > 1 else ""))
        if reference is None and "ref_chosen_logps" not in features[0] and needs_reference(config.loss_type):
            raise ValueError("no reference: pass reference=... or precompute reference log-probs "
                             "(or train with a reference-free loss: simpo, orpo)")
        self.steps_per_epoch = len(features) // config.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(features)} pairs is fewer than one batch of {config.batch_size}")
        self.model, self.features, self.reference = b.prepare_model(model), features, reference
        self.pad_token_id, self.policy_is_reference = pad_token_id, policy_is_reference
        self.device = b.device
        # "auto" is resolved where a run is set up (dpo_lib.recipes.run); here only for direct callers
        self.config = config = replace(config, precision=resolve_precision(config.precision, self.device))
        self.out = Path(out_dir) if out_dir else None
        if self.out and b.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        if isinstance(reference, FrozenReference):
            reference.model.to(self.device)
        self.total_steps = config.max_steps or self.steps_per_epoch * config.epochs
        self.warmup_steps = round(config.warmup_ratio * self.total_steps)
        optimizer = make_optimizer(self.model, config, self.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(  # ours, not the backend's: one step per global batch
            optimizer, lambda s: lr_factor(s, self.total_steps, self.warmup_steps, config.schedule))
        self.optimizer = b.prepare_optimizer(optimizer, config.precision)  # fp16: a loss scaler (dpo_lib.amp)
        self.step, self.num_tokens, self.history = 0, 0, []
        self._first_step = False  # True only inside the first train_step (compute_loss)

    def batch_indices(self, step: int) -> list[int]:
        """Pair indices of optimizer step ``step``: :func:`step_indices`."""
        c = self.config
        return step_indices(step, len(self.features), self.steps_per_epoch, c.batch_size, c.seed, c.shuffle)

    def local_indices(self, step: int) -> list[int]:
        """This process's pairs of step ``step``: all of them on one process; with ``sort_by_length``,
        in increasing length (processes take every ``world``-th, which balances their lengths)."""
        idx, b = self.batch_indices(step), self.backend
        if self.config.sort_by_length:
            idx = sorted(idx, key=lambda i: (pair_length(self.features[i]), i))
            return idx[b.rank::b.world]
        per = len(idx) // b.world
        return idx[b.rank * per:(b.rank + 1) * per]

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """Loss of one collated micro-batch and its metrics (TRL names): :func:`batch_loss`; during the first
        training step the policy's own log-probs are the reference's (module docstring)."""
        return batch_loss(self.model, batch, self.config, self.reference, self.device,
                          policy_is_reference=self._first_step)

    def train_step(self) -> dict:
        """One optimizer step: forward and backward over the step's micro-batches, clip, update, schedule."""
        t0 = time.perf_counter()
        self.model.train()
        # the policy is the reference of its first step; a live reference model is asked as usual (it sees the
        # same batch layout, and a wrong one must show: loss != ln 2 at step 1)
        self._first_step = self.step == 0 and self.policy_is_reference and self.reference is None
        try:
            sums, tokens = self.backend.reduce(*self._accumulate(self.local_indices(self.step)))
        finally:
            self._first_step = False
        if not math.isfinite(sums["loss"]):
            self._stop(f"non-finite loss ({sums['loss']})")
        grad_norm = self.backend.clip(self.model, self.config.max_grad_norm)
        if not (math.isfinite(grad_norm) or self.backend.scales_loss):  # fp16: an overflow, the step is skipped
            self._stop(f"non-finite gradient norm ({grad_norm})")  # before the update
        lr = self.scheduler.get_last_lr()[0]
        self.backend.step(self.optimizer)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.num_tokens += tokens
        dt = time.perf_counter() - t0
        metrics = {"step": self.step, **sums, "num_tokens": self.num_tokens, "tokens_per_second": tokens / dt,
                   "learning_rate": lr, "grad_norm": grad_norm, "epoch": self.step / self.steps_per_epoch,
                   "step_seconds": dt, **self.backend.amp_metrics()}
        self.history.append(metrics)
        return metrics

    def _accumulate(self, idx: list[int]) -> tuple[dict, int]:
        """Forward and backward of ``grad_accum`` equal micro-batches of the pairs ``idx``; returns
        the step's mean metrics and its token count (this process's)."""
        n, b = self.config.grad_accum, self.backend
        micro = len(idx) // n
        sums: dict[str, float] = {}
        tokens = 0
        for a in range(n):
            batch = batch_to(collate([self.features[i] for i in idx[a * micro:(a + 1) * micro]], self.pad_token_id),
                             self.device)
            tokens += int(batch["attention_mask"].sum())
            with b.no_sync(self.model, last=a == n - 1), b.autocast():
                loss, m = self.compute_loss(batch)
                b.backward(loss / n)  # equal micro-batches: the mean over the whole step
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v / n
        return sums, tokens

    def _stop(self, what: str) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        raise NonFiniteError(self.step + 1, what, self.latest_checkpoint())

    def train(self, resume: bool = False, progress: bool = True, callbacks=()) -> list[dict]:
        """Run until ``total_steps`` (``resume``: from the last checkpoint in ``out_dir``). ``callback(trainer,
        metrics)`` runs after every step, before its log line and checkpoint, and may add metrics (HeldoutEval).
        Ctrl-C/SIGTERM finishes the step, saves a checkpoint when ``save_every`` is set, raises TrainingInterrupted."""
        if resume:
            checkpoints.resume(self)
        c, main = self.config, self.backend.is_main
        log = MetricsLogger(self.out, self.step, self.total_steps, c.batch_size, c.print_every, enabled=main)
        bar = tqdm(total=self.total_steps, initial=self.step, desc="DPO", disable=not (progress and main),
                   dynamic_ncols=True)
        try:
            with deferred_sigint() as stop:
                while self.step < self.total_steps:
                    m = self.train_step()
                    for callback in callbacks:  # before the log: a callback may add metrics (HeldoutEval)
                        callback(self, m)
                    log.log(m)  # before the checkpoint, so metrics.jsonl always covers a checkpoint's steps
                    bar.update(1)
                    bar.set_postfix(loss=f"{m['loss']:.4f}", acc=f"{m['rewards/accuracies']:.2f}")
                    saving = self.out and c.save_every
                    if saving and self.step % c.save_every == 0:
                        self.save_checkpoint()
                    if stop["hit"]:
                        raise TrainingInterrupted(self.step, self.save_checkpoint() if saving else None, stop["signum"])
        finally:
            bar.close()
            log.close()
        return self.history

    def latest_checkpoint(self) -> Path | None:
        return checkpoints.latest_checkpoint(self.out)

    def save_checkpoint(self) -> Path:
        """Write a checkpoint (every process must call it: they wait for each other): :func:`checkpoints.save`."""
        return checkpoints.save(self)

    def load_checkpoint(self, path: Path) -> None:
        checkpoints.load(self, path)
