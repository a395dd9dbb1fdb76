"""The DPO training loop, from scratch: AdamW, warm-up then decay, accumulation, clipping.

One optimizer step takes ``batch_size`` preference pairs, in ``grad_accum`` micro-batches.
For each micro-batch: one forward of the policy over the concatenated ``[chosen; rejected]``
sequences (:func:`dpo_lib.logprobs.concatenated_forward`), reference log-probs from the
cache or a frozen model under ``no_grad`` (:mod:`dpo_lib.reference`), the loss of
:func:`dpo_lib.losses.dpo_loss`, backward. Then clip, step, schedule.

Metrics use TRL's names (see COURSE.md); each step appends one JSON line to
``OUT/metrics.jsonl``. Checkpoints (``OUT/checkpoints/step-N``) hold the model
(safetensors), optimizer, scheduler, RNG states and the position in the data; they are
written to a temporary folder and renamed, so a crash mid-save leaves the last good one.

Speed (off by default; same maths, fewer FLOPs — see ``python -m dpo_lib bench``):
``sort_by_length`` orders each step's pairs by length before cutting them into the
``grad_accum`` micro-batches, so each micro-batch is padded only to its own longest pair;
``compact_lm_head`` runs the LM head only on the positions that score a completion token.
``precision="bf16"`` runs the forward under bf16 autocast (:func:`dpo_lib.models.autocast`);
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

import json
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from tqdm.auto import tqdm

from .data import batch_to, collate, pair_length
from .logprobs import concatenated_forward
from .losses import chosen_nll, dpo_loss
from .models import autocast, resolve_precision
from .reference import FrozenReference

METRIC_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected")


@dataclass
class TrainConfig:
    beta: float = 0.1              # KL strength: higher keeps the policy closer to the reference
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0   # > 0: conservative DPO (sigmoid) or robust DPO (robust)
    nll_weight: float = 0.0        # > 0: DPO + NLL on the chosen response
    learning_rate: float = 5e-6    # DPO wants ~10x lower than SFT: it starts from a good model
    batch_size: int = 8            # pairs per optimizer step
    grad_accum: int = 1            # micro-batches per step (micro-batch = batch_size / grad_accum)
    max_steps: int = 0             # 0: one pass over the data (epochs)
    epochs: int = 1
    warmup_ratio: float = 0.1
    schedule: str = "cosine"       # cosine | linear | constant (after warm-up)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    print_every: int = 8           # metrics table every N steps (0: never)
    save_every: int = 0            # checkpoint every N steps (0: only at the end)
    keep_checkpoints: int = 2
    shuffle: bool = True           # False: pairs in file order (benchmarks and parity runs)
    sort_by_length: bool = False   # sort each step's pairs by length into micro-batches: less padding, same loss
    compact_lm_head: bool = False  # LM head only where a completion token is scored (same numbers, fewer FLOPs)
    precision: str = "fp32"        # bf16: forward under bf16 autocast (float32 weights and optimizer); auto: bf16 where fast


class NonFiniteError(RuntimeError):
    """A NaN/inf loss or gradient norm: training stopped before the bad update."""


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = (step - warmup) / (total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress


def format_table(title: str, metrics: dict) -> str:
    """The boxed metric table printed during training (the tinker guide's layout)."""
    rows = [(k, f"{v:.6g}" if isinstance(v, float) else str(v)) for k, v in metrics.items()]
    w1, w2 = max(len(k) for k, _ in rows), max(len(v) for _, v in rows)
    line = f"+{'-' * (w1 + 2)}+{'-' * (w2 + 2)}+"
    body = [f"| {k:<{w1}} | {v:<{w2}} |" for k, v in rows]
    return "\n".join([title.center(len(line)), line, f"| {'metric':<{w1}} | {'value':<{w2}} |", line, *body, line])


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class DPOTrainer:
    """Train ``model`` on tokenized ``features`` (see :func:`dpo_lib.data.tokenize_rows`).

    ``reference`` is a callable batch -> (chosen, rejected) log-probs, e.g.
    :class:`dpo_lib.reference.FrozenReference`; leave it ``None`` when every feature already
    carries ``ref_chosen_logps`` / ``ref_rejected_logps`` (precomputed).
    """

    def __init__(self, model, features: list[dict], config: TrainConfig, pad_token_id: int,
                 reference=None, out_dir: str | Path | None = None, accelerator=None):
        self.world = accelerator.num_processes if accelerator is not None else 1
        self.rank = accelerator.process_index if accelerator is not None else 0
        if config.batch_size % (config.grad_accum * self.world):
            raise ValueError(f"batch_size={config.batch_size} is not divisible by grad_accum={config.grad_accum}"
                             + (f" x {self.world} processes" if self.world > 1 else ""))
        if reference is None and "ref_chosen_logps" not in features[0]:
            raise ValueError("no reference: pass reference=... or precompute reference log-probs")
        self.model, self.features, self.config = model, features, config
        self.pad_token_id, self.reference = pad_token_id, reference
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
        decay, no_decay = [], []
        for n, p in model.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 else decay).append(p)
        # fused: one kernel for the whole update (on 2 CPU cores 0.08 s instead of 0.65 s for 135M parameters)
        fused = self.device.type in ("cpu", "cuda") and all(p.device.type == self.device.type for p in decay + no_decay)
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.learning_rate, fused=fused or None)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.total_steps, self.warmup_steps, config.schedule))
        if accelerator is not None:  # the scheduler stays ours: one step per global batch, whatever the process count
            self.optimizer = accelerator.prepare_optimizer(self.optimizer)
        self.step = 0
        self.num_tokens = 0
        self.history: list[dict] = []
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        np.random.seed(config.seed)

    # ------------------------------------------------------------------ data order

    def batch_indices(self, step: int) -> list[int]:
        """Pair indices of optimizer step ``step``: a seeded shuffle per epoch, so the
        position in the data is a function of the step alone (exact resume)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        order = (np.random.default_rng(self.config.seed + epoch).permutation(len(self.features)) if self.config.shuffle
                 else np.arange(len(self.features)))
        bs = self.config.batch_size
        return order[k * bs:(k + 1) * bs].tolist()

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
        """Loss of one collated micro-batch and its metrics (TRL names)."""
        c = self.config
        with autocast(c.precision, self.device):
            chosen, rejected = concatenated_forward(self.model, batch, compact_head=c.compact_lm_head)  # (B,), (B,)
        if "ref_chosen_logps" in batch:
            ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        else:
            ref_chosen, ref_rejected = self.reference(batch)                        # no_grad inside
        losses, r_chosen, r_rejected = dpo_loss(chosen, rejected, ref_chosen, ref_rejected,
                                                beta=c.beta, loss_type=c.loss_type,
                                                label_smoothing=c.label_smoothing)
        loss = losses.mean()
        metrics = {"loss": loss.item()}
        if c.nll_weight:
            n_chosen = batch["completion_mask"][:, 1:].sum(1).chunk(2)[0]           # scored chosen tokens
            nll = chosen_nll(chosen, n_chosen).mean()
            loss = loss + c.nll_weight * nll
            metrics["nll"] = nll.item()
        metrics.update({
            "rewards/chosen": r_chosen.mean().item(),
            "rewards/rejected": r_rejected.mean().item(),
            "rewards/accuracies": (r_chosen > r_rejected).float().mean().item(),
            "rewards/margins": (r_chosen - r_rejected).mean().item(),
            "logps/chosen": chosen.detach().mean().item(),
            "logps/rejected": rejected.detach().mean().item(),
        })
        return loss, metrics

    def train_step(self) -> dict:
        c = self.config
        t0 = time.perf_counter()
        acc = self.accelerator
        self.model.train()
        idx = self.local_indices(self.step)
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
                    loss, m = self.compute_loss(batch)
                if self.world == 1 and not math.isfinite(m["loss"]):
                    self._stop(f"non-finite loss ({m['loss']})")
                scaled = loss / c.grad_accum  # equal micro-batches: the mean over the whole step
                acc.backward(scaled) if acc is not None else scaled.backward()
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v / c.grad_accum
        if self.world > 1:  # equal shards: the global mean is the mean of the processes' means
            keys = sorted(sums)
            packed = acc.reduce(torch.tensor([sums[k] for k in keys] + [float(tokens)], dtype=torch.float64,
                                             device=self.device), reduction="sum").tolist()
            sums = {k: v / self.world for k, v in zip(keys, packed)}
            tokens = int(packed[-1])
            if not math.isfinite(sums["loss"]):
                self._stop(f"non-finite loss ({sums['loss']})")
        if acc is not None:  # all parameters: accelerate matches the list against the model's (FSDP); no-grad ones are skipped
            grad_norm = float(acc.clip_grad_norm_(list(self.model.parameters()), c.max_grad_norm))
        else:
            grad_norm = float(torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                                             c.max_grad_norm))
        if not math.isfinite(grad_norm):
            self._stop(f"non-finite gradient norm ({grad_norm})")
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

    def _stop(self, what: str) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        last = self.latest_checkpoint()
        raise NonFiniteError(
            f"step {self.step + 1}: {what}; the update was not applied. "
            + (f"Last good checkpoint: {last} (resume with --resume). " if last else "No checkpoint was written. ")
            + "Try a lower --learning-rate, a smaller --beta for IPO, float32 instead of float16, "
              "or check the data for empty or truncated responses.")

    # ------------------------------------------------------------------ loop

    def train(self, resume: bool = False, progress: bool = True, kill_after_save: int | None = None) -> list[dict]:
        """Run until ``total_steps``. ``resume=True`` continues from the last checkpoint in ``out_dir``."""
        if resume:
            last = self.latest_checkpoint()
            if last is None:
                print(f"[dpo_lib] --resume: no checkpoint in {self.out}, starting from step 0")
            else:
                self.load_checkpoint(last)
                print(f"[dpo_lib] resumed from {last} (step {self.step}/{self.total_steps})")
        main = self.is_main
        metrics_file = open(self.out / "metrics.jsonl", "a" if self.step else "w") if self.out and main else None
        bar = tqdm(total=self.total_steps, initial=self.step, desc="DPO", disable=not (progress and main),
                   dynamic_ncols=True)
        try:
            while self.step < self.total_steps:
                m = self.train_step()
                if metrics_file:
                    metrics_file.write(json.dumps(m) + "\n")
                    metrics_file.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.4f}", acc=f"{m['rewards/accuracies']:.2f}")
                c = self.config
                if main and c.print_every and (self.step % c.print_every == 0 or self.step == self.total_steps):
                    table = {"accuracy": m["rewards/accuracies"], "dpo_loss": m["loss"],
                             "margin": m["rewards/margins"], "chosen_reward": m["rewards/chosen"],
                             "rejected_reward": m["rewards/rejected"], "learning_rate": m["learning_rate"],
                             "grad_norm": m["grad_norm"], "num_pairs": self.step * c.batch_size,
                             "num_tokens": m["num_tokens"], "tokens_per_second": m["tokens_per_second"],
                             "progress": self.step / self.total_steps}
                    tqdm.write(format_table(f"Step {self.step}", table))
                if self.out and self.config.save_every and self.step % self.config.save_every == 0:
                    self.save_checkpoint()
                    if kill_after_save is not None and self.step >= kill_after_save:
                        os.kill(os.getpid(), 9)  # test hook: die like a SIGKILLed job
        finally:
            bar.close()
            if metrics_file:
                metrics_file.close()
        return self.history

    # ------------------------------------------------------------------ checkpoints

    def latest_checkpoint(self) -> Path | None:
        if self.out is None:
            return None
        pointer = self.out / "checkpoints" / "latest"
        if pointer.is_file():
            path = self.out / "checkpoints" / pointer.read_text().strip()
            if (path / "trainer_state.json").is_file():
                return path
        return None

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
            final = self._write_checkpoint(root)
        if acc is not None and self.world > 1:
            acc.wait_for_everyone()
        return final

    def _write_checkpoint(self, root: Path) -> Path:
        root.mkdir(parents=True, exist_ok=True)
        name = f"step-{self.step:06d}"
        tmp = root / f".tmp-{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_model(self._unwrapped(), str(tmp / "model.safetensors"))
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state()}, tmp / "optimizer.pt")
        state = {"step": self.step, "num_tokens": self.num_tokens, "config": asdict(self.config),
                 "history": self.history}
        (tmp / "trainer_state.json").write_text(json.dumps(state))
        for f in tmp.iterdir():  # flush file contents before the rename makes them visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        final = root / name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _atomic_write_text(root / "latest", name)
        kept = sorted(p for p in root.glob("step-*") if p.is_dir())
        for old in kept[:-self.config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def load_checkpoint(self, path: Path) -> None:
        load_model(self._unwrapped(), str(path / "model.safetensors"))
        state = torch.load(path / "optimizer.pt", weights_only=True)  # tensors and numbers only: no pickle code
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        meta = json.loads((path / "trainer_state.json").read_text())
        self.step, self.num_tokens, self.history = meta["step"], meta["num_tokens"], meta["history"]
        if self.out and self.is_main and (self.out / "metrics.jsonl").is_file():  # drop lines logged after this checkpoint
            lines = (self.out / "metrics.jsonl").read_text().splitlines()
            _atomic_write_text(self.out / "metrics.jsonl", "".join(l + "\n" for l in lines[:self.step]))
