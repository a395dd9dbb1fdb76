"""Padding-free rows: a micro-batch's sequences end to end for the linear layers, pair by pair for attention.

A micro-batch's ``[prompt | chosen | rejected]`` rows (:func:`dpo_lib.logprobs.shared_prompt_layout`) are padded
to the longest, and the linear layers — nearly all of a step's FLOPs — would run on the padding too: 11 % of the
slots of ``python -m dpo_lib bench``'s timed 4-pair steps. Here the rows are laid end to end in one row of real
tokens (:func:`padding_free_layout`), so the linear layers see no padding. Attention is the one place where the
pairs must stay apart: :func:`segment_attention` puts a transformers attention function in place of the model's
for one call; it gathers each pair's queries, keys and values back into its padded row, runs the model's own
attention (SDPA or eager) there with the per-pair mask, and scatters the outputs back. The positions, the masks
and so the numbers are those of the padded rows (bitwise, in our runs, for the log-probs; the gradients to float
rounding, since their sums run in another order). This is the idea of TRL's ``padding_free``, which needs
flash-attention's variable-length kernels; these wrappers work with any attention that takes a 4D mask.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

import torch

from dpo_lib.models import attention_implementation

__all__ = ["SEGMENT_ATTENTION", "model_attention", "padding_free_layout", "segment_attention"]

SEGMENT_ATTENTION = "dpo_lib_segments"  # the name the attention function is registered under, for one call
_SEGMENTS: dict | None = None           # the call in progress: its gather/slot indices and the model's attention


def padding_free_layout(layout: dict) -> dict:
    """The ``(B, L)`` rows of a :func:`~dpo_lib.logprobs.shared_prompt_layout` laid end to end in one row of ``T``
    real tokens.

    Returns ``input_ids`` and ``position_ids`` ``(1, T)`` (each pair keeps its own positions), ``gather``
    ``(B*L,)`` (the packed token at each padded slot; padding slots read token 0, which the mask hides),
    ``slot`` ``(T,)`` (each packed token's padded slot: ``gather[slot] = 0..T-1``), ``hidden_index`` ``(M,)`` (the
    packed position of the state that scores each target) and ``rows`` (``B``).
    """
    B, L = layout["input_ids"].shape
    lengths = layout["lengths"]                                                   # (B,) each row's real tokens
    real = torch.arange(L).expand(B, L) < lengths[:, None]                        # (B, L)
    offsets = torch.cumsum(lengths, 0) - lengths                                  # (B,) where each row starts
    packed_at = offsets[:, None] + torch.arange(L)                                # (B, L) packed index of each slot
    slot = real.flatten().nonzero().flatten()                                     # (T,)
    gather = torch.where(real, packed_at, torch.zeros_like(packed_at)).flatten()  # (B*L,)
    rows, pos = layout["hidden_index"][:, 0], layout["hidden_index"][:, 1]
    return {"input_ids": layout["input_ids"][real][None], "position_ids": layout["position_ids"][real][None],
            "gather": gather, "slot": slot, "hidden_index": offsets[rows] + pos, "rows": B}


def _segment_attention(module, query, key, value, attention_mask, **kwargs):
    """The registered attention function: ``query`` ``(1, H, T, D)`` (keys and values with their own head count)
    gathered into ``(B, H, L, D)``, the model's own attention there with the per-pair ``attention_mask``
    ``(B, 1, L, L)``, its output ``(B, L, H, D)`` scattered back to ``(1, T, H, D)``."""
    seg = _SEGMENTS
    B, L = seg["rows"], seg["gather"].numel() // seg["rows"]

    def to_rows(x):                                                                # (1, h, T, D) -> (B, h, L, D)
        h, D = x.shape[1], x.shape[-1]
        return x[0].index_select(1, seg["gather"]).view(h, B, L, D).transpose(0, 1)

    out, weights = seg["attention"](module, to_rows(query), to_rows(key), to_rows(value), attention_mask, **kwargs)
    H, D = out.shape[-2], out.shape[-1]
    return out.reshape(B * L, H, D).index_select(0, seg["slot"])[None], weights   # (1, T, H, D)


def model_attention(model, name: str):
    """The attention function ``name`` (``config._attn_implementation``) of ``model``: transformers' registered
    one, or for ``eager`` the modeling file's own ``eager_attention_forward``; ``None`` if there is none."""
    if name == "eager":
        for m in model.modules():
            fn = getattr(sys.modules.get(type(m).__module__), "eager_attention_forward", None)
            if fn is not None:
                return fn
        return None
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    return ALL_ATTENTION_FUNCTIONS[name] if name in ALL_ATTENTION_FUNCTIONS else None


@contextmanager
def segment_attention(model, packed: dict, attention, device):
    """Within the block, ``model`` attends pair by pair on the packed row of ``packed``
    (:func:`padding_free_layout`) through ``attention`` (:func:`model_attention`); its attention setting is put
    back on the way out, error or not."""
    global _SEGMENTS
    from transformers import AttentionInterface
    AttentionInterface.register(SEGMENT_ATTENTION, _segment_attention)
    _SEGMENTS = {"rows": packed["rows"], "gather": packed["gather"].to(device), "slot": packed["slot"].to(device),
                 "attention": attention}
    try:
        with attention_implementation(model, SEGMENT_ATTENTION):
            yield
    finally:
        _SEGMENTS = None
