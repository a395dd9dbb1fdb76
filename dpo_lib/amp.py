"""fp16 training done right: a dynamic loss scaler, fp32 master weights, skipped steps counted.

bf16 keeps float32's 8-bit exponent, so its gradients neither overflow nor underflow where fp32's do
not: bf16 autocast needs nothing more (:mod:`dpo_lib.precision`). fp16 has a 5-bit exponent: values
above 65504 overflow to inf, and below 2^-24 (6e-8) they underflow to 0. Under fp16 autocast the
backward pass runs through fp16 activations, so a small loss's gradients (DPO's, once σ(-margin) is
small; a LoRA adapter's, flowing back through a frozen fp16 base) round to zero before they reach
the float32 weights. The cure (Micikevicius et al. 2018, "Mixed Precision Training") is what
``torch.amp.GradScaler`` does:

1. multiply the loss by a scale ``S`` (2^16 at first) before ``backward``, so the gradients are
   ``S`` times larger and stay in fp16's range;
2. divide the gradients by ``S`` before clipping and the update (``unscale_``), in float32;
3. if any gradient is inf or NaN (``S`` was too large), skip the update and halve ``S``; after
   ``growth_interval`` clean steps, double it.

The weights the optimizer updates stay float32 (the "master weights": a LoRA adapter, or a full
model loaded in float32 and run under autocast); :func:`check_master_weights` refuses fp16 ones,
which the scaler cannot unscale and AdamW would round away.

:class:`LossScaler` wraps one ``GradScaler`` for :class:`dpo_lib.distributed.SingleProcess` (the
trainer only calls its backend: ``backward`` scales, ``clip`` unscales, ``step`` steps or skips), and
reports ``amp/scale`` and ``amp/skipped_steps`` as metrics. Disabled (every precision but ``fp16``)
it is the identity. Under ``accelerate launch`` the Accelerator's own scaler does the same
(``Accelerator(mixed_precision="fp16")``).
"""

from __future__ import annotations

import torch

__all__ = ["INIT_SCALE", "LossScaler", "check_master_weights"]

INIT_SCALE = 2.0 ** 16  # torch's default: large enough for DPO's small gradients, halved on the first overflow


def check_master_weights(params) -> None:
    """Refuse trainable parameters that are not float32 under fp16 training: the update needs fp32 master
    weights (load the model in float32 and let autocast run the matmuls in fp16, or train LoRA adapters,
    which peft keeps in float32 on an fp16 base)."""
    bad = sorted({str(p.dtype) for p in params if p.requires_grad and p.dtype != torch.float32})
    if bad:
        raise ValueError("precision='fp16' trains float32 master weights, but trainable parameters are "
                         f"{', '.join(bad)}: "
                         "load the model in float32 (autocast runs its matmuls in fp16), or train LoRA adapters "
                         "(peft keeps them in float32 on an fp16 base)")


class LossScaler:
    """A dynamic loss scaler (``torch.amp.GradScaler``) when ``enabled``, else the identity.

    Per optimizer step: :meth:`scale` each micro-batch's loss before ``backward``, :meth:`unscale_` once
    before clipping, :meth:`step` once (it updates, or skips when a gradient is inf/NaN, and adjusts the
    scale). ``skipped_steps`` counts the skipped updates of this process's life."""

    def __init__(self, device: str | torch.device = "cpu", enabled: bool = True, init_scale: float = INIT_SCALE,
                 growth_interval: int = 2000):
        self.enabled = enabled
        self.scaler = torch.amp.GradScaler(torch.device(device).type, init_scale=init_scale,
                                           growth_interval=growth_interval, enabled=enabled)
        self.skipped_steps = 0
        self._unscaled = False

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss) if self.enabled else loss

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients by the scale, in place (before clipping reads them)."""
        if self.enabled and not self._unscaled:
            self.scaler.unscale_(optimizer)
            self._unscaled = True

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """``optimizer.step()`` unless a gradient is inf/NaN; then the scale update. True when applied."""
        if not self.enabled:
            optimizer.step()
            return True
        self.unscale_(optimizer)
        before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        self._unscaled = False
        skipped = self.scaler.get_scale() < before  # the scale falls only when an inf/NaN was found
        self.skipped_steps += int(skipped)
        return not skipped

    def metrics(self) -> dict:
        """``amp/scale`` (the scale the next step will use) and ``amp/skipped_steps``; empty when disabled."""
        if not self.enabled:
            return {}
        return {"amp/scale": float(self.scaler.get_scale()), "amp/skipped_steps": self.skipped_steps}

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict(), "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scaler.load_state_dict(state["scaler"])
        self.skipped_steps = state["skipped_steps"]
