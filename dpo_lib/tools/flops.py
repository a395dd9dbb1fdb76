r"""FLOPs of a DPO step and model FLOPs utilisation (MFU).

Counting (Kaplan et al. 2020, Sec. 2.1; the same convention as PaLM's MFU, Chowdhery et al.
2022, App. B). A dense decoder with ``N`` non-embedding parameters spends, per token,

* forward: :math:`2N` FLOPs — every weight is used in one multiply and one add;
* backward: :math:`4N` — the gradient with respect to the activations (:math:`2N`) and with
  respect to the weights (:math:`2N`);

plus the attention scores, :math:`2 \cdot n_{layer} \cdot n_{ctx} \cdot d` per token forward,
which we leave out (a few percent at the course's lengths; pass ``attention_context`` to add
it, times 3 for forward + backward). ``n_ctx`` is the sequence length: ``QK^T`` and ``PV`` cost
:math:`4 \cdot n_{layer} \cdot t \cdot d` at position ``t``, about ``n_ctx/2`` on average under the
causal mask. A kernel that computes the whole ``T x T`` square (what
``torch.utils.flop_counter.FlopCounterMode`` counts for eager attention) is ``n_ctx = 2T``
(``tests/tools/test_flops.py``).

``N``, ``d``, ``V`` and the layer count come from :class:`dpo_lib.tools.specs.ModelSpec`
(:func:`~dpo_lib.tools.specs.model_spec` of a model or its config; :func:`non_embedding_params`
counts ``N`` from a module's parameters instead).

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
that would be hardware FLOPs utilisation). Peaks: the ``peak_flops`` of the GPU table
:data:`dpo_lib.tools.specs.GPUS` (dense bf16 tensor-core numbers from the vendors' data sheets; the
T4 has no bf16, its fp16 figure is listed; :func:`dpo_lib.tools.specs.peak_flops` by name), and
for a CPU :func:`measure_cpu_peak_flops` (a timed float32 matmul — an achievable peak, not
the data-sheet one) or a number you pass in.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from dpo_lib.tools.specs import model_spec

__all__ = [
    "dpo_flops_per_token", "dpo_step_flops", "measure_cpu_peak_flops", "measure_matmul_flops", "mfu",
    "non_embedding_params",
]


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


def dpo_step_flops(shape: Any, tokens: int, scored: int, reference: str = "live",
                   attention_context: int | None = None) -> dict[str, int]:
    """Model FLOPs of one DPO step (see the module docstring).

    ``shape``: a :class:`~dpo_lib.tools.specs.ModelSpec`, or what :func:`~dpo_lib.tools.specs.model_spec`
    reads one from (a model, its config, a preset name). ``tokens``: non-padding tokens of all
    prompt+chosen and prompt+rejected sequences;
    ``scored``: completion tokens among them; ``reference``: ``"live"`` (a forward per step) or
    ``"cached"`` (precomputed log-probs: 0). ``attention_context``: ``n_ctx`` of the attention-score
    term, the sequence length, not the mean causal context (off by default). Returns the parts
    and their ``total``.
    """
    if reference not in ("live", "cached"):
        raise ValueError(f"reference must be 'live' or 'cached', got {reference!r}")
    shape = model_spec(shape)
    N, dV = shape.non_embedding_params, shape.hidden * shape.vocab
    attn = 2 * shape.layers * attention_context * shape.hidden if attention_context else 0   # per token, forward
    parts = {
        "policy_forward": (2 * N + attn) * tokens + 2 * dV * scored,
        "policy_backward": (4 * N + 2 * attn) * tokens + 4 * dV * scored,
        "reference_forward": ((2 * N + attn) * tokens + 2 * dV * scored) if reference == "live" else 0,
    }
    parts["total"] = sum(parts.values())
    return parts


def dpo_flops_per_token(shape: Any, scored_fraction: float, reference: str = "live") -> float:
    """FLOPs per processed token: ``6N + 6dV·s`` (+ ``2N + 2dV·s`` for a live reference), ``s`` = scored/tokens."""
    shape = model_spec(shape)
    N, dV = shape.non_embedding_params, shape.hidden * shape.vocab
    per_token = 6 * N + 6 * dV * scored_fraction
    if reference == "live":
        per_token += 2 * N + 2 * dV * scored_fraction
    return per_token


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
