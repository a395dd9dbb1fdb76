"""Mask and padding helpers shared by the reward model and PPO (lesson 04).

Shapes: ``B`` sequences, ``T`` tokens, ``R`` response tokens, ``V`` vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "entropy_from_logits", "last_index", "left_pad", "mask_after_eos", "masked_mean", "masked_whiten",
    "position_ids_from_mask",
]


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1 (a scalar)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / std`` over the masked positions; masked-out positions become 0."""
    mean = masked_mean(x, mask)
    return (x - mean) * torch.rsqrt(masked_mean((x - mean) ** 2, mask) + eps) * mask.to(x.dtype)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions 0, 1, ... counted over attended tokens only, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)        # (B, T)


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of ``mask`` (works for left and right padding). ``(B,)``"""
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, -1).max(-1).values.clamp(min=0)


def mask_after_eos(response_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """1 up to and including the first EOS of each row, 0 after it. ``(B, R)`` long."""
    is_eos = (response_ids == eos_token_id).long()                      # (B, R)
    eos_before = is_eos.cumsum(-1) - is_eos                             # EOS strictly before t
    return (eos_before == 0).long()


def left_pad(sequences, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad a list of token-id lists (or 1-D tensors). Returns ``(ids, attention_mask)``, ``(B, P)``."""
    seqs = [torch.as_tensor(s, dtype=torch.long) for s in sequences]
    width = max(len(s) for s in seqs)
    ids = torch.stack([F.pad(s, (width - len(s), 0), value=pad_token_id) for s in seqs])
    mask = torch.stack([F.pad(torch.ones_like(s), (width - len(s), 0)) for s in seqs])
    return ids, mask


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    r"""Per-token entropy :math:`\operatorname{logsumexp}(l) - \sum_v p_v l_v` of ``(B, T, V)`` logits,
    one sequence at a time: the largest temporary is ``(T, V)``, not a second ``(B, T, V)``."""
    rows = [torch.logsumexp(row, -1) - (torch.softmax(row, -1) * row).sum(-1) for row in logits]
    return torch.stack(rows)                                            # (B, T)
