r"""RLHF, the pipeline DPO replaces: a reward model, then on-policy reinforcement learning.

1. **Reward model** (Ouyang et al. 2022, Eq. 1): a transformer backbone with a scalar head on
   the last non-pad token, trained on pairs with the Bradley–Terry loss :math:`-\log\sigma(r_w - r_l)`
   (this module: :class:`RewardModel`, :func:`reward_model_loss`).
2. **PPO** against that reward with a KL penalty to the reference policy, the objective DPO
   solves in closed form: rollouts, KL-shaped rewards, GAE and the clipped losses are in
   :mod:`dpo_lib.ppo`.

Lesson 04 runs both beside DPO at CPU scale with the helpers of :mod:`dpo_lib.small_rlhf`
(a frozen trunk shared by every model that trains only its top blocks, cached features,
evaluation by sampling, best-of-N) and measures memory with :mod:`dpo_lib.memory`.

This module also holds the mask and padding helpers that the reward model and PPO share, and
:func:`end_of_turn_ids`, the tokens that close a response as the reward model saw it in training.

Shapes: ``B`` sequences, ``P`` prompt tokens (left-padded), ``R`` response tokens (right-padded
after EOS), ``T = P + R``, ``V`` vocabulary, ``H`` hidden size. Per-token rollout tensors are ``(B, R)``.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from dpo_lib.data import tokenize_pair


# ------------------------------------------------------------------ masks and small helpers
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


# ------------------------------------------------------------------ reward model (Bradley–Terry)
class RewardModel(nn.Module):
    """A transformer backbone and a linear head on a summary of its last hidden states.

    ``pooling="last"`` (the usual choice, Ouyang et al. 2022) reads the hidden state of the last
    non-pad token. ``pooling="mean"`` averages the hidden states over the response (pass
    ``completion_mask``): with a frozen backbone and a head trained on a few hundred pairs, the
    last token's state is a weak summary of what the response said, and the mean is a much
    stronger one (lesson 04 measures both)."""
    def __init__(self, backbone: nn.Module, hidden_size: int, pooling: str = "last"):
        super().__init__()
        if pooling not in ("last", "mean"):
            raise ValueError(f"pooling must be 'last' or 'mean', got {pooling!r}")
        self.backbone, self.pooling = backbone, pooling
        self.head = nn.Linear(hidden_size, 1)

    @classmethod
    def from_causal_lm(cls, model: nn.Module, copy_weights: bool = True, pooling: str = "last") -> "RewardModel":
        """``model.get_decoder()`` (no ``lm_head``) plus a new head; deep-copied unless
        ``copy_weights=False``, so training the reward model leaves ``model`` unchanged."""
        backbone = model.get_decoder()
        return cls(copy.deepcopy(backbone) if copy_weights else backbone, model.config.hidden_size, pooling)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                completion_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Scalar reward of each sequence, ``(B,)``; padding may be on either side.
        ``completion_mask`` ``(B, T)`` marks the response tokens (needed for ``pooling="mean"``)."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids_from_mask(attention_mask)).last_hidden_state  # (B, T, H)
        return self.head(pool_hidden(hidden, attention_mask, completion_mask, self.pooling)).squeeze(-1)  # (B,)


def pool_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor | None,
                pooling: str) -> torch.Tensor:
    """``(B, T, H)`` hidden states to ``(B, H)``: the last non-pad token, or the mean over ``completion_mask``."""
    if pooling == "last":
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last_index(attention_mask)]
    if completion_mask is None:
        raise ValueError("pooling='mean' needs the completion_mask of the response tokens")
    m = completion_mask.to(hidden.dtype).unsqueeze(-1)                  # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


def reward_model_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Bradley–Terry loss (Ouyang et al. 2022, Eq. 1), :math:`-\log\sigma(r_w - r_l)` averaged over
    pairs, and accuracy (fraction with ``r_chosen > r_rejected``). Equal rewards give ``ln 2``."""
    return -F.logsigmoid(r_chosen - r_rejected).mean(), (r_chosen > r_rejected).float().mean()


# ------------------------------------------------------------------ how a response is closed
def end_of_turn_ids(tokenizer) -> list[int]:
    """The token ids the chat template writes after an assistant message's text (ChatML:
    ``<|im_end|>`` and a newline): what closes every response of a preference pair."""
    text = "Fine."
    row = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": text}],
           "rejected": [{"role": "assistant", "content": "No."}]}
    completion = tokenize_pair(tokenizer, row)["chosen_ids"]
    body = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if completion[:len(body)] != body:
        raise ValueError("the chat template changes the tokens of the assistant's text; cannot find its suffix")
    return completion[len(body):]
