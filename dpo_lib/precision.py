"""Which floating-point precision a forward pass runs in, chosen by the hardware, in one place.

``precision`` is one of :data:`PRECISIONS`: ``fp32``; ``bf16`` (matmuls in bfloat16 under
``torch.autocast``, weights, gradients and optimizer state in float32); ``auto``, which becomes
``bf16`` where bf16 matmuls run on hardware units (:func:`bf16_is_fast`) and ``fp32`` elsewhere.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch

from dpo_lib.config import PRECISIONS  # one list, shared with the command line


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


def resolve_precision(precision: str, device: str | torch.device = "cpu") -> str:
    """``auto`` -> ``bf16`` where :func:`bf16_is_fast`, else ``fp32``; checks the name."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "auto":
        return "bf16" if bf16_is_fast(device) else "fp32"
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
