"""Which floating-point precision a forward pass runs in, chosen by the hardware, in one place.

``precision`` is one of :data:`PRECISIONS` for training: ``fp32``; ``bf16`` (matmuls in bfloat16
under ``torch.autocast``, weights, gradients and optimizer state in float32); ``auto``, which
becomes ``bf16`` where bf16 matmuls run on hardware units (:func:`bf16_is_fast`) and ``fp32``
elsewhere. The VRAM planner and LoRA / QLoRA also know ``fp16``, for GPUs without bf16 (T4,
V100), where the trainable weights stay in fp32.

* :func:`choose_precision` — the one rule: bf16 where supported, else fp16 on a GPU (when
  allowed), else fp32; with the reason. Used by :func:`resolve_precision` (``auto``),
  :func:`pick_dtype` (:mod:`dpo_lib.lora`) and the planner
  (:func:`dpo_lib.tools.specs.pick_precision`).
* :func:`autocast` — the mixed-precision context of a forward pass (trainer, job, bench).
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch

from dpo_lib.config import PRECISIONS  # one list, shared with the command line

__all__ = ["DTYPES", "autocast", "bf16_is_fast", "choose_precision", "pick_dtype", "resolve_precision"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def bf16_is_fast(device: str | torch.device = "cpu") -> bool:
    """Whether bfloat16 matmuls run on hardware units here: a CUDA GPU with bf16, or an x86
    CPU with AMX-BF16 or AVX512-BF16 (Linux ``/proc/cpuinfo`` flags). Elsewhere bf16 on the
    CPU is emulated and no faster than float32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def choose_precision(cuda: bool, bf16: bool, fp16: bool = True, name: str = "this GPU") -> tuple[str, str]:
    """``(precision, why)`` for a device: ``bf16`` where ``bf16`` (supported, or fast on a CPU),
    else ``fp16`` on a CUDA GPU when ``fp16`` is allowed (it needs fp32 trainable weights or a
    loss scaler: the planner and LoRA allow it, the trainer does not), else ``fp32``."""
    if bf16:
        return "bf16", (f"{name} supports bf16: same exponent range as fp32, so no loss scaling; "
                        "half the bytes of fp32")
    if not cuda:
        return "fp32", "CPU: fp32 (half-precision matmuls are slow or unsupported on most CPUs)"
    if not fp16:
        return "fp32", f"{name} has no bf16 support: fp32"
    return "fp16", (f"{name} has no bf16 support: fp16 (5-bit exponent, overflows above 65504), so trainable "
                    "weights stay in fp32 (LoRA adapters, master weights) and full fine-tuning needs a loss scaler")


def pick_dtype(device: str | torch.device | None = None) -> torch.dtype:
    """The compute dtype of a model on ``device`` (default: CUDA if there is one): bf16 on a GPU
    that supports it, fp16 on other CUDA GPUs (T4, V100), fp32 on a CPU."""
    cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    return DTYPES[choose_precision(cuda, cuda and torch.cuda.is_bf16_supported())[0]]


def resolve_precision(precision: str, device: str | torch.device = "cpu") -> str:
    """``auto`` -> ``bf16`` where :func:`bf16_is_fast`, else ``fp32``; checks the name."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "auto":
        device = torch.device(device)
        return choose_precision(device.type == "cuda", bf16_is_fast(device), fp16=False)[0]
    return precision


def autocast(precision: str, device: str | torch.device = "cpu"):
    """Mixed precision for a forward pass: with ``bf16`` the matmuls run in bfloat16 under
    ``torch.autocast`` while weights, gradients, optimizer state and the log-softmax stay
    float32 (:func:`dpo_lib.logprobs.linear_token_logprobs` upcasts the logits). ``fp32``: no-op.

    Wrap forwards only, never an optimizer step: autocast caches the bf16 copies of the
    weights until its context exits, and an update inside it would leave them stale.
    """
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
