"""One process or several, behind one small interface: what the trainer asks of its backend.

:class:`DPOTrainer <dpo_lib.trainer.DPOTrainer>` never asks whether it runs on one process or under
``accelerate launch`` (DDP or FSDP, see ``configs/``): it calls a backend. :class:`SingleProcess`
is the model and optimizer as they are; :class:`Accelerated` wraps an ``accelerate.Accelerator``:
it prepares the model and optimizer, skips the gradient all-reduce on all but the last
micro-batch, averages the metrics over processes, and lets only the main process write files.
Every process takes an equal share of each global batch, so a step is the same whatever the
process count (the learning-rate schedule stays the trainer's: one step per global batch).

fp16 (``precision="fp16"``, for GPUs without bf16): the backend scales the loss in ``backward``,
unscales the gradients in ``clip`` and skips the update of a step whose gradients overflowed in
``step`` (:class:`dpo_lib.amp.LossScaler`; under accelerate, the Accelerator's own scaler), and
reports ``amp/scale`` and ``amp/skipped_steps`` (:meth:`SingleProcess.amp_metrics`).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from dpo_lib.amp import LossScaler, check_master_weights

__all__ = ["Accelerated", "SingleProcess", "backend_for"]


class SingleProcess:
    """The model and optimizer as they are, on the device of the model's parameters."""

    world, rank, is_main = 1, 0, True

    def __init__(self, model: torch.nn.Module):
        self.device = next(model.parameters()).device
        self.amp, self._optimizer = LossScaler(self.device, enabled=False), None

    def prepare_model(self, model):
        return model

    def prepare_optimizer(self, optimizer, precision: str = "fp32"):
        """The optimizer as it is; with ``fp16``, a loss scaler over its (float32) parameters."""
        if precision == "fp16":
            check_master_weights(p for g in optimizer.param_groups for p in g["params"])
        self.amp, self._optimizer = LossScaler(self.device, enabled=precision == "fp16"), optimizer
        return optimizer

    @property
    def scales_loss(self) -> bool:
        """Whether an inf/NaN gradient is an overflow the loss scaler handles (the step is skipped)."""
        return self.amp.enabled

    def step(self, optimizer) -> None:
        """``optimizer.step()``; in fp16, skipped when a gradient overflowed (:class:`dpo_lib.amp.LossScaler`)."""
        self.amp.step(optimizer)

    def amp_metrics(self) -> dict:
        return self.amp.metrics()

    def no_sync(self, model, last: bool):
        return nullcontext()

    def autocast(self):
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.amp.scale(loss).backward()

    def reduce(self, sums: dict, tokens: int) -> tuple[dict, int]:
        return sums, tokens

    def clip(self, model, max_norm: float) -> float:
        """Clip the gradient norm to ``max_norm`` (fp16: after unscaling); returns the norm before clipping."""
        if self._optimizer is not None:
            self.amp.unscale_(self._optimizer)
        return float(torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_norm))

    def unwrap(self, model):
        return model

    def wait(self) -> None:
        pass

    def check_checkpoints(self) -> None:
        pass


class Accelerated:
    """Several processes through an ``accelerate.Accelerator`` (``accelerate launch``, ``configs/``)."""

    def __init__(self, accelerator):
        self.acc = accelerator
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        self.is_main, self.device = accelerator.is_main_process, accelerator.device

    def prepare_model(self, model):
        return self.acc.prepare_model(model)  # DDP/FSDP wrapper; prepared before the optimizer

    def prepare_optimizer(self, optimizer, precision: str = "fp32"):
        if precision == "fp16" and self.acc.mixed_precision != "fp16":
            raise ValueError("precision='fp16' under accelerate needs Accelerator(mixed_precision='fp16'), "
                             "whose loss scaler unscales and skips steps")
        self.skipped_steps = 0
        return self.acc.prepare_optimizer(optimizer)

    @property
    def scales_loss(self) -> bool:
        return self.acc.mixed_precision == "fp16"

    def step(self, optimizer) -> None:
        optimizer.step()  # accelerate's optimizer skips the update when its scaler found an inf/NaN
        self.skipped_steps += int(self.scales_loss and self.acc.optimizer_step_was_skipped)

    def amp_metrics(self) -> dict:
        if not self.scales_loss:
            return {}
        return {"amp/scale": float(self.acc.scaler.get_scale()), "amp/skipped_steps": self.skipped_steps}

    def no_sync(self, model, last: bool):
        """DDP: all-reduce the gradients once, after the last micro-batch of a step."""
        return self.acc.no_sync(model) if self.world > 1 and not last else nullcontext()

    def autocast(self):
        return self.acc.autocast()

    def backward(self, loss: torch.Tensor) -> None:
        self.acc.backward(loss)

    def reduce(self, sums: dict, tokens: int) -> tuple[dict, int]:
        """Equal shards: the global mean of each metric is the mean of the processes' means; tokens add up."""
        if self.world == 1:
            return sums, tokens
        keys = sorted(sums)
        packed = torch.tensor([sums[k] for k in keys] + [float(tokens)], dtype=torch.float64, device=self.device)
        packed = self.acc.reduce(packed, reduction="sum").tolist()
        return {k: v / self.world for k, v in zip(keys, packed)}, int(packed[-1])

    def clip(self, model, max_norm: float) -> float:
        # all parameters: accelerate matches them against the model's (FSDP); those without gradients are skipped
        return float(self.acc.clip_grad_norm_(list(model.parameters()), max_norm))

    def unwrap(self, model):
        return self.acc.unwrap_model(model)

    def wait(self) -> None:
        if self.world > 1:
            self.acc.wait_for_everyone()

    def check_checkpoints(self) -> None:
        if "FSDP" in str(self.acc.distributed_type):
            raise NotImplementedError("checkpoints under FSDP are not supported by dpo_lib's trainer: train with "
                                      "save_every=0 and save the model with accelerator.get_state_dict(model)")


def backend_for(model: torch.nn.Module, accelerator=None) -> SingleProcess | Accelerated:
    """The backend of a trainer: :class:`Accelerated` when given an accelerator, else :class:`SingleProcess`."""
    return SingleProcess(model) if accelerator is None else Accelerated(accelerator)
