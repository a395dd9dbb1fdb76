r"""RLHF, the pipeline DPO replaces: a reward model, then on-policy reinforcement learning.

1. **Reward model** (Ouyang et al. 2022, Eq. 1): a transformer backbone with a scalar head on
   the last non-pad token, trained on pairs with the Bradley–Terry loss :math:`-\log\sigma(r_w - r_l)`
   (this module: :class:`RewardModel`, :func:`reward_model_loss`).
2. **PPO** against that reward with a KL penalty to the reference policy, the objective DPO
   solves in closed form: rollouts, KL-shaped rewards, GAE and the clipped losses are in
   :mod:`dpo_lib.rlhf.ppo`.

Lesson 04 runs both beside DPO at CPU scale with :mod:`dpo_lib.rlhf.frozen_trunk` (a frozen
trunk shared by every model that trains only its top blocks, cached features) and
:mod:`dpo_lib.rlhf.best_of_n` (evaluation by sampling, best-of-N), and measures memory with
:mod:`dpo_lib.tools.memory`.

This module also holds :func:`train_reward_head` (a reward head on cached features),
:func:`end_of_turn_ids`, the tokens that close a response as the reward model saw it in training, and
:class:`RewardModelJudge`, a reward model as the judge of iterative DPO (:mod:`dpo_lib.recipes.iterate`);
the mask and padding helpers it shares with PPO are in :mod:`dpo_lib.rlhf.masks`.

Shapes: ``B`` sequences, ``P`` prompt tokens (left-padded), ``R`` response tokens (right-padded
after EOS), ``T = P + R``, ``V`` vocabulary, ``H`` hidden size. Per-token rollout tensors are ``(B, R)``.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from dpo_lib.features import encode_prompt, tokenize_pair
from dpo_lib.rlhf.masks import last_index, left_pad, position_ids_from_mask

__all__ = [
    "RewardModel", "RewardModelJudge", "end_of_turn_ids", "pool_hidden", "reward_model_loss", "train_reward_head",
]


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


def train_reward_head(reward_model: RewardModel, chosen_hidden: torch.Tensor, rejected_hidden: torch.Tensor,
                      epochs: int = 200, lr: float = 1e-2, weight_decay: float = 0.0) -> list[dict]:
    r"""Fit the linear head of a :class:`RewardModel` whose backbone stays frozen, on cached pooled
    features ``(N, H)`` (:func:`pair_logps_and_hidden`): full-batch AdamW on the
    Bradley–Terry loss. The head starts at zero, so every reward is 0 and the first loss is
    exactly :math:`\ln 2`. Returns ``{"loss", "accuracy"}`` per epoch, measured before its update.

    Afterwards the head is rescaled so that the rewards of all the training responses have mean 0
    and standard deviation 1 (an affine change: the ranking, hence the accuracy, is unchanged)."""
    head = reward_model.head
    chosen_hidden, rejected_hidden = chosen_hidden.to(head.weight.device), rejected_hidden.to(head.weight.device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    history = []
    for _ in range(epochs):
        loss, accuracy = reward_model_loss(head(chosen_hidden).squeeze(-1), head(rejected_hidden).squeeze(-1))
        history.append({"loss": float(loss.detach()), "accuracy": float(accuracy)})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        scores = head(torch.cat([chosen_hidden, rejected_hidden])).squeeze(-1)      # (2N,)
        std = scores.std().clamp(min=1e-8)
        head.weight /= std
        head.bias.copy_((head.bias - scores.mean()) / std)
    return history


# ------------------------------------------------------------------ a reward model as a judge
class RewardModelJudge:
    """A :class:`RewardModel` as a judge ``(texts, prompts) -> list[float]`` for
    :func:`dpo_lib.sampling.make_pairs` and :func:`dpo_lib.recipes.iterate.iterate` (``takes_prompts``:
    they pass each text's prompt). Each answer is scored as the reward model saw its training
    pairs: the prompt as the chat template writes it for generation, the answer's tokens, and the
    end-of-turn tokens (:func:`end_of_turn_ids`, or ``suffix_ids``); left-padded batches."""

    takes_prompts = True

    def __init__(self, reward_model: RewardModel, tokenizer, suffix_ids=None, batch_size: int = 32,
                 name: str = "reward_model"):
        self.reward_model, self.tokenizer, self.batch_size, self.name = reward_model, tokenizer, batch_size, name
        self.suffix = list(end_of_turn_ids(tokenizer) if suffix_ids is None else suffix_ids)

    @torch.no_grad()
    def __call__(self, texts, prompts=None) -> list[float]:
        if prompts is None or len(prompts) != len(texts):
            raise ValueError("RewardModelJudge scores prompt + answer: pass prompts=, one per text")
        rows, completions = [], []
        for text, prompt in zip(texts, prompts):
            p = encode_prompt(self.tokenizer, prompt)
            r = list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) + self.suffix
            rows.append(p + r)
            completions.append([0] * len(p) + [1] * len(r))
        was_training = self.reward_model.training
        self.reward_model.eval()
        device = next(self.reward_model.parameters()).device
        scores: list[float] = []
        for i in range(0, len(rows), self.batch_size):
            ids, mask = left_pad(rows[i:i + self.batch_size], self.tokenizer.pad_token_id)
            completion = left_pad(completions[i:i + self.batch_size], 0)[0]
            scores += self.reward_model(ids.to(device), mask.to(device), completion.to(device)).float().tolist()
        self.reward_model.train(was_training)
        return scores
