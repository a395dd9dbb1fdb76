"""The DPO training loop, from scratch: AdamW, warm-up then decay, accumulation, clipping.

One optimizer step takes ``batch_size`` preference pairs, in ``grad_accum`` micro-batches.
For each micro-batch: one forward of the policy over the concatenated ``[chosen; rejected]``
sequences (:func:`dpo_lib.logprobs.concatenated_forward`), reference log-probs from the
cache or a frozen model under ``no_grad`` (:mod:`dpo_lib.reference`; none for the
reference-free ``simpo`` and ``orpo``), the loss of :func:`dpo_lib.losses.dpo_loss`, backward.
Then clip, step, schedule.

Metrics use TRL's names (see COURSE.md); :class:`dpo_lib.logger.MetricsLogger` writes one JSON
line per step to ``OUT/metrics.jsonl`` and prints the table; :mod:`dpo_lib.checkpoints` writes
and reads the resumable checkpoints. The settings and their defaults are
:class:`dpo_lib.config.TrainConfig`.

Speed (off by default; same maths, fewer FLOPs — see ``python -m dpo_lib bench``):
``sort_by_length`` orders each step's pairs by length before cutting them into the
``grad_accum`` micro-batches, so each micro-batch is padded only to its own longest pair;
``compact_lm_head`` runs the LM head only on the positions that score a completion token.
``precision="bf16"`` runs the forward under bf16 autocast (:func:`dpo_lib.precision.autocast`);
then compute the reference log-probs under the same autocast, or step-0 rewards are not 0.
Resuming from a checkpoint gives bitwise the weights of an uninterrupted run in float32; in
bf16 only up to rounding (CPU bf16 matmuls are not always bitwise the same from one process
to the next).

Several processes (``accelerate launch``, see ``configs/``): pass an ``accelerate.Accelerator``.
The model and optimizer are prepared by it (DDP or FSDP), every process takes its share of
each global batch of ``batch_size`` pairs (so a step is the same as on one process), the
metrics are averaged over processes, and only the main process writes files.
"""

from __future__ import annotations

import math
import random
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from dpo_lib import checkpoints
from dpo_lib.config import TrainConfig  # noqa: F401 (re-exported: the trainer's settings)
from dpo_lib.features import batch_to, collate, pair_length
from dpo_lib.logger import MetricsLogger
from dpo_lib.logprobs import concatenated_forward
from dpo_lib.losses import chosen_nll, dpo_loss, needs_reference
from dpo_lib.precision import autocast, resolve_precision
from dpo_lib.reference import FrozenReference


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
    """Ctrl-C during training: the step in progress was finished, and ``checkpoint`` (if any) holds it."""

    def __init__(self, step: int, checkpoint: Path | None):
        super().__init__(f"interrupted after step {step}")
        self.step, self.checkpoint = step, checkpoint


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
    """Ctrl-C sets ``flag["hit"]`` instead of raising, so the step in progress can finish
    (main thread only; elsewhere, and on a second Ctrl-C, it raises as usual)."""
    flag = {"hit": False}
    try:
        previous = signal.getsignal(signal.SIGINT)
        if previous is not signal.default_int_handler:  # someone else (a notebook kernel, a test) handles it
            raise ValueError
        signal.signal(signal.SIGINT, lambda *_: flag.update(hit=True) or signal.signal(signal.SIGINT, previous))
    except ValueError:
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def completion_lengths(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Scored completion tokens of each chosen and each rejected response of a collated batch, ``[B]`` each
    (``|y_w|``, ``|y_l|``: what :func:`dpo_lib.logprobs.concatenated_forward` sums over)."""
    return batch["completion_mask"][:, 1:].sum(1).chunk(2)


def batch_loss(model, batch: dict, c, reference=None, device="cpu",
               policy_is_reference: bool = False) -> tuple[torch.Tensor, dict]:
    """The DPO loss of one collated micro-batch (mean over its pairs) and its metrics, TRL's names.

    One forward of ``model`` over ``[chosen; rejected]`` (under ``c.precision``'s autocast); the
    reference log-probs come from the batch (precomputed) or from ``reference(batch)`` (no_grad).
    ``policy_is_reference`` (the first step, before any update): the policy's own log-probs,
    detached, are the reference's, so every implicit reward is exactly 0 whatever the rounding;
    they are written into ``batch["ref_chosen_logps"]`` / ``["ref_rejected_logps"]``.

    Reference-free losses (``simpo``, ``orpo``: :data:`dpo_lib.losses.REFERENCE_FREE_LOSSES`) never
    read the reference: ``reference`` is not called and precomputed reference log-probs are ignored
    (``policy_is_reference`` too). Their ``rewards/*`` are β times the per-token mean log-prob, as
    TRL's CPO and ORPO trainers log them; ``logps/*`` stay the summed log-probs, as for every loss.
    For ``orpo``, ``nll`` is the NLL part of its loss (already inside ``loss``)."""
    with autocast(c.precision, device):
        chosen, rejected = concatenated_forward(model, batch, compact_head=c.compact_lm_head)  # (B,), (B,)
    n_chosen, n_rejected = completion_lengths(batch)                               # (B,), (B,)
    ref_chosen = ref_rejected = None
    if needs_reference(c.loss_type):
        if policy_is_reference:
            batch["ref_chosen_logps"], batch["ref_rejected_logps"] = chosen.detach(), rejected.detach()
        if "ref_chosen_logps" in batch:
            ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        else:
            ref_chosen, ref_rejected = reference(batch)                            # no_grad inside
    losses, r_chosen, r_rejected = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=c.beta,
                                            loss_type=c.loss_type, label_smoothing=c.label_smoothing,
                                            chosen_num_tokens=n_chosen, rejected_num_tokens=n_rejected,
                                            simpo_gamma=c.simpo_gamma, dpop_lambda=c.dpop_lambda,
                                            rdpo_alpha=c.rdpo_alpha)
    loss = losses.mean()
    metrics = {"loss": loss.item()}
    if c.nll_weight:
        nll = chosen_nll(chosen, n_chosen).mean()
        loss = loss + c.nll_weight * nll
        metrics["nll"] = nll.item()
    elif c.loss_type == "orpo":
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


def all_reduce_metrics(acc, sums: dict, tokens: int, world: int, device) -> tuple[dict, int]:
    """Equal shards: the global mean of each metric is the mean of the processes' means; tokens add up."""
    keys = sorted(sums)
    packed = acc.reduce(torch.tensor([sums[k] for k in keys] + [float(tokens)], dtype=torch.float64, device=device),
                        reduction="sum").tolist()
    return {k: v / world for k, v in zip(keys, packed)}, int(packed[-1])


def clip_gradients(model, max_norm: float, acc=None) -> float:
    """Clip the gradient norm to ``max_norm``; returns the norm before clipping."""
    if acc is not None:  # all parameters: accelerate matches them against the model's (FSDP); no-grad ones skip
        return float(acc.clip_grad_norm_(list(model.parameters()), max_norm))
    return float(torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_norm))


class DPOTrainer:
    """Train ``model`` on tokenized ``features`` (see :func:`dpo_lib.features.tokenize_rows`).

    ``reference`` is a callable batch -> (chosen, rejected) log-probs, e.g.
    :class:`dpo_lib.reference.FrozenReference`; leave it ``None`` when every feature already
    carries ``ref_chosen_logps`` / ``ref_rejected_logps`` (precomputed), or when the loss is
    reference-free (``simpo``, ``orpo``), which never calls it.

    ``policy_is_reference=False`` says that the precomputed reference log-probs are not the
    starting policy's (e.g. round 2 of iterative DPO against the initial model): the first step
    then keeps them instead of replacing them by the policy's own (see :meth:`_micro_batch_loss`).
    """

    def __init__(self, model, features: list[dict], config: TrainConfig, pad_token_id: int,
                 reference=None, out_dir: str | Path | None = None, accelerator=None,
                 policy_is_reference: bool = True):
        self.world = accelerator.num_processes if accelerator is not None else 1
        self.rank = accelerator.process_index if accelerator is not None else 0
        if config.batch_size % (config.grad_accum * self.world):
            raise ValueError(f"batch_size={config.batch_size} is not divisible by grad_accum={config.grad_accum}"
                             + (f" x {self.world} processes" if self.world > 1 else ""))
        if reference is None and "ref_chosen_logps" not in features[0] and needs_reference(config.loss_type):
            raise ValueError("no reference: pass reference=... or precompute reference log-probs "
                             "(or train with a reference-free loss: simpo, orpo)")
        self.model, self.features, self.config = model, features, config
        self.pad_token_id, self.reference = pad_token_id, reference
        self.policy_is_reference = policy_is_reference
        self.out = Path(out_dir) if out_dir else None
        self.accelerator = accelerator
        self.is_main = accelerator is None or accelerator.is_main_process
        if self.out and self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        if accelerator is not None:
            self.model = model = accelerator.prepare_model(model)  # DDP/FSDP wrapper; prepared before the optimizer
        self.device = accelerator.device if accelerator is not None else next(model.parameters()).device
        # "auto" becomes fp32 or bf16 once here, not at every forward
        self.config = config = replace(config, precision=resolve_precision(config.precision, self.device))
        if isinstance(reference, FrozenReference):
            reference.model.to(self.device)
        self.steps_per_epoch = len(features) // config.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(features)} pairs is fewer than one batch of {config.batch_size}")
        self.total_steps = config.max_steps or self.steps_per_epoch * config.epochs
        self.warmup_steps = round(config.warmup_ratio * self.total_steps)
        self.optimizer = make_optimizer(model, config, self.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.total_steps, self.warmup_steps, config.schedule))
        if accelerator is not None:  # the scheduler stays ours: one step per global batch, whatever the process count
            self.optimizer = accelerator.prepare_optimizer(self.optimizer)
        self.step = 0
        self.num_tokens = 0
        self.history: list[dict] = []
        self.reference_overrides: dict[str, tuple[float, float]] = {}  # see _micro_batch_loss
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        np.random.seed(config.seed)

    # ------------------------------------------------------------------ data order

    def batch_indices(self, step: int) -> list[int]:
        """Pair indices of optimizer step ``step``: :func:`step_indices`."""
        c = self.config
        return step_indices(step, len(self.features), self.steps_per_epoch, c.batch_size, c.seed, c.shuffle)

    def local_indices(self, step: int) -> list[int]:
        """This process's pairs of step ``step``: all of them on one process; with ``sort_by_length``,
        in increasing length (processes take every ``world``-th, which balances their lengths)."""
        idx = self.batch_indices(step)
        if self.config.sort_by_length:
            idx = sorted(idx, key=lambda i: (pair_length(self.features[i]), i))
            return idx[self.rank::self.world]
        per = len(idx) // self.world
        return idx[self.rank * per:(self.rank + 1) * per]

    # ------------------------------------------------------------------ one step

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """Loss of one collated micro-batch and its metrics (TRL names): :func:`batch_loss`."""
        return batch_loss(self.model, batch, self.config, self.reference, self.device)

    def _micro_batch_loss(self, batch: dict, idx: list[int]) -> tuple[torch.Tensor, dict]:
        """:meth:`compute_loss`; at step 0 with precomputed reference log-probs (one process), the
        policy is the reference: its log-probs of these pairs, taken in the training batch layout,
        replace the precomputed ones (they differed by rounding only, e.g. ~1e-4 nats under bf16,
        where the padding differs), so the first step's rewards are exactly 0 and later epochs see
        the same values. The replaced values go into checkpoints (exact resume)."""
        first = (self.step == 0 and self.reference is None and self.world == 1 and self.policy_is_reference
                 and needs_reference(self.config.loss_type))
        if not first:
            return self.compute_loss(batch)
        loss, m = batch_loss(self.model, batch, self.config, self.reference, self.device, policy_is_reference=True)
        for i, c, r in zip(idx, batch["ref_chosen_logps"].tolist(), batch["ref_rejected_logps"].tolist()):
            self.features[i]["ref_chosen_logps"], self.features[i]["ref_rejected_logps"] = c, r
            self.reference_overrides[str(i)] = (c, r)
        return loss, m

    def train_step(self) -> dict:
        """One optimizer step: forward and backward over the step's micro-batches, clip, update, schedule."""
        t0 = time.perf_counter()
        self.model.train()
        sums, tokens = self._accumulate(self.local_indices(self.step))
        if self.world > 1:
            sums, tokens = self._all_reduce(sums, tokens)
        grad_norm = self._clip()
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.num_tokens += tokens
        dt = time.perf_counter() - t0
        metrics = {"step": self.step, **sums, "num_tokens": self.num_tokens,
                   "tokens_per_second": tokens / dt, "learning_rate": lr, "grad_norm": grad_norm,
                   "epoch": self.step / self.steps_per_epoch, "step_seconds": dt}
        self.history.append(metrics)
        return metrics

    def _accumulate(self, idx: list[int]) -> tuple[dict, int]:
        """Forward and backward of ``grad_accum`` equal micro-batches of the pairs ``idx``; returns
        the step's mean metrics and its token count (this process's)."""
        c, acc = self.config, self.accelerator
        micro = len(idx) // c.grad_accum
        sums: dict[str, float] = {}
        tokens = 0
        for a in range(c.grad_accum):
            batch = collate([self.features[i] for i in idx[a * micro:(a + 1) * micro]], self.pad_token_id)
            batch = batch_to(batch, self.device)
            tokens += int(batch["attention_mask"].sum())
            last = a == c.grad_accum - 1  # DDP: all-reduce the gradients once, after the last micro-batch
            with (acc.no_sync(self.model) if acc is not None and self.world > 1 and not last else nullcontext()):
                with (acc.autocast() if acc is not None else nullcontext()):
                    loss, m = self._micro_batch_loss(batch, idx[a * micro:(a + 1) * micro])
                if self.world == 1 and not math.isfinite(m["loss"]):
                    self._stop(f"non-finite loss ({m['loss']})")
                scaled = loss / c.grad_accum  # equal micro-batches: the mean over the whole step
                acc.backward(scaled) if acc is not None else scaled.backward()
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v / c.grad_accum
        return sums, tokens

    def _all_reduce(self, sums: dict, tokens: int) -> tuple[dict, int]:
        sums, tokens = all_reduce_metrics(self.accelerator, sums, tokens, self.world, self.device)
        if not math.isfinite(sums["loss"]):
            self._stop(f"non-finite loss ({sums['loss']})")
        return sums, tokens

    def _clip(self) -> float:
        grad_norm = clip_gradients(self.model, self.config.max_grad_norm, self.accelerator)
        if not math.isfinite(grad_norm):
            self._stop(f"non-finite gradient norm ({grad_norm})")  # before the update
        return grad_norm

    def _stop(self, what: str) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        raise NonFiniteError(self.step + 1, what, self.latest_checkpoint())

    # ------------------------------------------------------------------ loop

    def train(self, resume: bool = False, progress: bool = True, callbacks=()) -> list[dict]:
        """Run until ``total_steps``. ``resume=True`` continues from the last checkpoint in ``out_dir``.
        Each of ``callbacks`` is called as ``callback(trainer, metrics)`` after every step, before
        its log line and its checkpoint: what it adds to ``metrics`` (e.g.
        :class:`dpo_lib.evaluation.HeldoutEval`) is logged and saved with the step. Ctrl-C finishes
        the step in progress, writes a checkpoint when ``save_every`` is set, and raises
        :class:`TrainingInterrupted`."""
        if resume:
            self._resume()
        log = MetricsLogger(self.out, self.step, self.total_steps, self.config.batch_size, self.config.print_every,
                            enabled=self.is_main)
        bar = tqdm(total=self.total_steps, initial=self.step, desc="DPO", disable=not (progress and self.is_main),
                   dynamic_ncols=True)
        try:
            with deferred_sigint() as sigint:
                while self.step < self.total_steps:
                    m = self.train_step()
                    for callback in callbacks:  # before the log: a callback may add metrics (HeldoutEval)
                        callback(self, m)
                    log.log(m)  # before the checkpoint, so metrics.jsonl always covers a checkpoint's steps
                    bar.update(1)
                    bar.set_postfix(loss=f"{m['loss']:.4f}", acc=f"{m['rewards/accuracies']:.2f}")
                    if self.out and self.config.save_every and self.step % self.config.save_every == 0:
                        self.save_checkpoint()
                    if sigint["hit"]:
                        saved = self.save_checkpoint() if self.out and self.config.save_every else None
                        raise TrainingInterrupted(self.step, saved)
        finally:
            bar.close()
            log.close()
        return self.history

    def _resume(self) -> None:
        if (last := self.latest_checkpoint()) is None:
            return print(f"[dpo_lib] --resume: no checkpoint in {self.out}, starting from step 0")
        self.load_checkpoint(last)
        print(f"[dpo_lib] resumed from {last} (step {self.step}/{self.total_steps})")

    # ------------------------------------------------------------------ checkpoints (dpo_lib.checkpoints)

    def latest_checkpoint(self) -> Path | None:
        return checkpoints.latest_checkpoint(self.out)

    def _unwrapped(self):
        return self.accelerator.unwrap_model(self.model) if self.accelerator is not None else self.model

    def save_checkpoint(self) -> Path:
        """Write a checkpoint (main process only; every process must call it, they wait for each other)."""
        acc = self.accelerator
        if acc is not None and "FSDP" in str(acc.distributed_type):
            raise NotImplementedError("checkpoints under FSDP are not supported by dpo_lib's trainer: train with "
                                      "save_every=0 and save the model with accelerator.get_state_dict(model)")
        root = self.out / "checkpoints"
        final = root / f"step-{self.step:06d}"
        if self.is_main:
            state = checkpoints.trainer_state(self.step, self.num_tokens, self.config, self.history)
            state["reference_overrides"] = self.reference_overrides
            final = checkpoints.write_checkpoint(root, self._unwrapped(), self.optimizer, self.scheduler, state,
                                                 self.config.keep_checkpoints)
        if acc is not None and self.world > 1:
            acc.wait_for_everyone()
        return final

    def load_checkpoint(self, path: Path) -> None:
        meta = checkpoints.read_checkpoint(path, self._unwrapped(), self.optimizer, self.scheduler)
        self.step, self.num_tokens, self.history = meta["step"], meta["num_tokens"], meta["history"]
        self.reference_overrides = meta.get("reference_overrides", {})
        for i, (c, r) in self.reference_overrides.items():
            self.features[int(i)]["ref_chosen_logps"], self.features[int(i)]["ref_rejected_logps"] = c, r
        if self.out and self.is_main:  # drop lines logged after this checkpoint
            MetricsLogger.truncate(self.out, self.step)
