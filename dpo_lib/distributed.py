"""One process or several, behind one small interface: what the trainer asks of its backend.

:class:`DPOTrainer <dpo_lib.trainer.DPOTrainer>` never asks whether it runs on one process or under
``accelerate launch`` (DDP or FSDP, see ``configs/``): it calls a backend. :class:`SingleProcess`
is the model and optimizer as they are; :class:`Accelerated` wraps an ``accelerate.Accelerator``:
it prepares the model and optimizer, skips the gradient all-reduce on all but the last
micro-batch, averages the metrics over processes, and lets only the main process write files.
Every process takes an equal share of each global batch, so a step is the same whatever the
process count (the learning-rate schedule stays the trainer's: one step per global batch).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

__all__ = ["Accelerated", "SingleProcess", "backend_for"]


class SingleProcess:
    """The model and optimizer as they are, on the device of the model's parameters."""

    world, rank, is_main = 1, 0, True

    def __init__(self, model: torch.nn.Module):
        self.device = next(model.parameters()).device

    def prepare_model(self, model):
        return model

    def prepare_optimizer(self, optimizer):
        return optimizer

    def no_sync(self, model, last: bool):
        return nullcontext()

    def autocast(self):
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def reduce(self, sums: dict, tokens: int) -> tuple[dict, int]:
        return sums, tokens

    def clip(self, model, max_norm: float) -> float:
        """Clip the gradient norm to ``max_norm``; returns the norm before clipping."""
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

    def prepare_optimizer(self, optimizer):
        return self.acc.prepare_optimizer(optimizer)

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
