r"""FLOPs of a DPO step and model FLOPs utilisation (MFU).

Counting (Kaplan et al. 2020, Sec. 2.1; the same convention as PaLM's MFU, Chowdhery et al.
2022, App. B). A dense decoder with ``N`` non-embedding parameters spends, per token,

* forward: :math:`2N` FLOPs — every weight is used in one multiply and one add;
* backward: :math:`4N` — the gradient with respect to the activations (:math:`2N`) and with
  respect to the weights (:math:`2N`);

plus the attention scores, :math:`2 \cdot n_{layer} \cdot n_{ctx} \cdot d` per token forward,
which we leave out (a few percent at the course's lengths; pass ``attention_context`` to add
it, times 3 for forward + backward).

The LM head (a ``d x V`` matrix, tied to the input embedding in SmolLM2) is *not* in ``N``:
it costs :math:`2dV` per position where it runs (forward) and :math:`4dV` in the backward.
DPO needs it only on the positions that score a completion token, ``scored`` of them
(:func:`dpo_lib.logprobs.concatenated_forward` with ``compact_head=True`` does exactly that).
Embedding look-ups cost no FLOPs.

One DPO step over ``tokens`` tokens (prompt+chosen and prompt+rejected, all pairs) of which
``scored`` are completion tokens:

.. math::

    C_{policy} = 6N \cdot tokens + 6dV \cdot scored, \qquad
    C_{ref} = 2N \cdot tokens + 2dV \cdot scored \ \text{(live)}, \quad 0 \ \text{(cached)}.

With precomputed reference log-probs (:mod:`dpo_lib.reference`) the reference forward is
paid once per pair before training instead of once per step; over one epoch the total work
is the same, which is why the bench (:mod:`dpo_lib.tools.bench`) charges it to the steps.

MFU = achieved model FLOP/s / peak FLOP/s of the hardware, with the *model* FLOPs above
(recomputation, e.g. activation checkpointing, and padding are not counted as useful work:
that would be hardware FLOPs utilisation). Peaks: :data:`PEAK_FLOPS` (dense bf16 tensor-core
numbers from the vendors' data sheets; the T4 has no bf16, its fp16 figure is listed), and
for a CPU :func:`measure_cpu_peak_flops` (a timed float32 matmul — an achievable peak, not
the data-sheet one) or a number you pass in.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

# Dense (no sparsity) peak tensor throughput in FLOP/s, bf16 (T4: fp16, it has no bf16).
PEAK_FLOPS: dict[str, float] = {
    "T4": 65e12,          # Tesla T4, fp16 tensor cores (Turing: no bf16)
    "L4": 121e12,         # NVIDIA L4, bf16 dense (242 with 2:4 sparsity)
    "A100": 312e12,       # A100 SXM/PCIe, bf16 dense
    "H100": 989e12,       # H100 SXM, bf16 dense (1979 with sparsity)
    "H100-PCIe": 756e12,  # H100 PCIe, bf16 dense
}


@dataclass(frozen=True)
class ModelShape:
    non_embedding_params: int   # N: every parameter except the input embedding (and an untied LM head)
    d_model: int                # hidden size d
    vocab_size: int             # V
    n_layers: int = 0           # only for the optional attention term


def non_embedding_params(model: torch.nn.Module) -> int:
    """``N``: parameters of the model minus the input embedding and the LM head (counted apart)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    excluded: set[int] = set()
    for m in (model.get_input_embeddings(), model.get_output_embeddings()):
        w = getattr(m, "weight", None) if m is not None else None
        if w is not None and id(w) not in excluded:
            excluded.add(id(w))
            total -= w.numel()
    return total


def model_shape(model: torch.nn.Module) -> ModelShape:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return ModelShape(non_embedding_params(model), config.hidden_size, config.vocab_size,
                      getattr(config, "num_hidden_layers", 0))


def dpo_step_flops(shape: ModelShape, tokens: int, scored: int, reference: str = "live",
                   attention_context: int | None = None) -> dict[str, int]:
    """Model FLOPs of one DPO step (see the module docstring).

    ``tokens``: non-padding tokens of all prompt+chosen and prompt+rejected sequences;
    ``scored``: completion tokens among them; ``reference``: ``"live"`` (a forward per step) or
    ``"cached"`` (precomputed log-probs: 0). ``attention_context``: mean context length for the
    attention-score term (off by default). Returns the parts and their ``total``.
    """
    if reference not in ("live", "cached"):
        raise ValueError(f"reference must be 'live' or 'cached', got {reference!r}")
    N, dV = shape.non_embedding_params, shape.d_model * shape.vocab_size
    attn = 2 * shape.n_layers * attention_context * shape.d_model if attention_context else 0   # per token, forward
    parts = {
        "policy_forward": (2 * N + attn) * tokens + 2 * dV * scored,
        "policy_backward": (4 * N + 2 * attn) * tokens + 4 * dV * scored,
        "reference_forward": ((2 * N + attn) * tokens + 2 * dV * scored) if reference == "live" else 0,
    }
    parts["total"] = sum(parts.values())
    return parts


def dpo_flops_per_token(shape: ModelShape, scored_fraction: float, reference: str = "live") -> float:
    """FLOPs per processed token: ``6N + 6dV·s`` (+ ``2N + 2dV·s`` for a live reference), ``s`` = scored/tokens."""
    per_token = 6 * shape.non_embedding_params + 6 * shape.d_model * shape.vocab_size * scored_fraction
    if reference == "live":
        per_token += 2 * shape.non_embedding_params + 2 * shape.d_model * shape.vocab_size * scored_fraction
    return per_token


def peak_flops(device_name: str) -> float | None:
    """Peak FLOP/s of a GPU named like ``torch.cuda.get_device_name()``; ``None`` when unknown."""
    name = device_name.upper().replace(" ", "")
    if "H100" in name:
        return PEAK_FLOPS["H100-PCIe"] if "PCIE" in name else PEAK_FLOPS["H100"]
    for key in ("A100", "L4", "T4"):
        if key in name:
            return PEAK_FLOPS[key]
    return None


def measure_matmul_flops(size: int = 1024, repeats: int = 5, dtype: torch.dtype = torch.float32,
                         device: str = "cpu", threads: int | None = None) -> float:
    """Best FLOP/s of a ``size x size`` matmul over ``repeats`` tries (after one warm-up)."""
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    try:
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        a @ b
        sync()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            sync()
            best = min(best, time.perf_counter() - t0)
        return 2 * size ** 3 / best
    finally:
        torch.set_num_threads(old)


def measure_cpu_peak_flops(size: int = 1024, repeats: int = 5, dtype: torch.dtype = torch.float32,
                           threads: int | None = None) -> float:
    """An achievable CPU peak: the best FLOP/s of a float32 matmul (see :func:`measure_matmul_flops`)."""
    return measure_matmul_flops(size, repeats, dtype, "cpu", threads)


def mfu(flops: float, seconds: float, peak: float) -> float:
    """Model FLOPs utilisation: ``flops / seconds / peak``."""
    if seconds <= 0 or peak <= 0:
        raise ValueError("seconds and peak must be positive")
    return flops / seconds / peak
