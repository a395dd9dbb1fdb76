r"""RLHF with PPO, the pipeline DPO replaces: a reward model, then on-policy reinforcement learning.

1. **Reward model** (Ouyang et al. 2022, Eq. 1): a transformer backbone with a scalar head on
   the last non-pad token, trained on pairs with the Bradley–Terry loss :math:`-\log\sigma(r_w - r_l)`.
2. **Rollout**: sample :math:`y \sim \pi_\theta(\cdot|x)`; keep the log-probs of the sampled
   tokens under the policy ("old") and the frozen reference, and the values :math:`V(s_t)`.
3. **KL-shaped reward** (Ziegler et al. 2019, Eq. 2; Ouyang et al. 2022, Eq. 2): maximise
   :math:`r(x, y) - \beta\log\frac{\pi_\theta(y|x)}{\pi_\text{ref}(y|x)}`, the objective DPO solves
   in closed form. Each response token is an action with reward
   :math:`-\beta(\log\pi_\theta - \log\pi_\text{ref})`; the score is added at the last token.
4. **GAE** (Schulman et al. 2016, Eq. 16): :math:`\hat A_t = \sum_l (\gamma\lambda)^l\delta_{t+l}`,
   :math:`\delta_t = r_t + \gamma V_{t+1} - V_t`, with :math:`V = 0` after the last token.
5. **PPO** (Schulman et al. 2017, Eq. 7): epochs of minibatches of the clipped surrogate
   :math:`\min(\rho\hat A, \operatorname{clip}(\rho, 1\pm\epsilon)\hat A)`, :math:`\rho = \pi_\theta/\pi_\text{old}`,
   plus a clipped value loss (Eq. 9's :math:`L^{VF}`, clipped as in OpenAI baselines).

Lesson 04 runs all of this beside DPO at CPU scale, with helpers at the end of this module: one
frozen pass over the pairs for the reward model's features and DPO's reference log-probs
(:func:`pair_logps_and_hidden`, :func:`train_reward_head`), a frozen trunk shared and memoised
by every model that trains only its top blocks (:class:`FrozenTrunk`), evaluation by sampling
(:func:`sample_and_score`), an unbiased best-of-N estimate (:func:`expected_best_of_n`), and
memory accounting (:func:`megabytes`, :class:`PeakMemory`).

Shapes: ``B`` sequences, ``P`` prompt tokens (left-padded), ``R`` response tokens (right-padded
after EOS), ``T = P + R``, ``V`` vocabulary, ``H`` hidden size. Per-token rollout tensors are ``(B, R)``.
"""

from __future__ import annotations

import copy
import gc
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from dpo_lib.data import collate, tokenize_pair
from dpo_lib.logprobs import sequence_logprobs, token_logprobs


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


# ------------------------------------------------------------------ policy with a value head
class ValueHead(nn.Module):
    """Linear map of hidden states ``(B, T, H)`` to values ``(B, T)``, zero-initialised (V = 0 at start)."""
    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden).squeeze(-1)                          # (B, T)


class PolicyWithValue(nn.Module):
    """A causal LM and a value head sharing its last hidden state: one forward gives both."""
    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        self.value_head = ValueHead(lm.config.hidden_size)

    def forward(self, input_ids, attention_mask=None, position_ids=None,
                logits_to_keep: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(logits (B, T, V), values (B, T))``; ``values[:, t]`` is V of the state ending at t.
        ``logits_to_keep=K > 0``: both for the last ``K`` positions only, ``(B, K, V)`` and ``(B, K)``."""
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      output_hidden_states=True, logits_to_keep=logits_to_keep)
        hidden = out.hidden_states[-1]                                  # (B, T, H) after the final norm
        return out.logits, self.value_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)

    def generate(self, *args, **kwargs):
        return self.lm.generate(*args, **kwargs)


def response_forward(model: nn.Module, input_ids, attention_mask, query_len: int, temperature: float = 1.0):
    """``(logprobs (B, R), values (B, R) or None, logits (B, R, V))`` of the response ``input_ids[:, query_len:]``
    under a :class:`PolicyWithValue` or a plain causal LM (values ``None``). The logit at ``t``
    scores token ``t + 1``, so the response is read from position ``query_len - 1``; the LM head
    runs on positions ``query_len - 1 ... T - 1`` only (``logits_to_keep``), not on the prompt."""
    position_ids = position_ids_from_mask(attention_mask)
    keep = input_ids.shape[1] - query_len + 1                           # R + 1 positions
    if isinstance(model, PolicyWithValue):
        logits, values = model(input_ids, attention_mask, position_ids, logits_to_keep=keep)
        values = values[:, :-1]                                         # (B, R) V(s_t) before token t
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       logits_to_keep=keep).logits
        values = None
    logits = logits[:, :-1]                                             # (B, R, V) a view
    if temperature != 1.0:
        logits = logits / temperature                                   # sampled at this temperature
    return token_logprobs(logits, input_ids[:, query_len:]), values, logits


# ------------------------------------------------------------------ rollout
@dataclass
class Rollout:
    """One batch of sampled responses. ``batch[idx]`` selects rows (a minibatch)."""
    query_ids: torch.Tensor       # (B, P) left-padded prompts
    response_ids: torch.Tensor    # (B, R) sampled tokens, pad after EOS
    input_ids: torch.Tensor       # (B, T) query + response
    attention_mask: torch.Tensor  # (B, T) 0 on left padding and after the first EOS
    response_mask: torch.Tensor   # (B, R) 1 up to and including the first EOS
    logprobs: torch.Tensor        # (B, R) log π_old(y_t | ·) of the policy that sampled
    ref_logprobs: torch.Tensor    # (B, R) log π_ref(y_t | ·)
    values: torch.Tensor          # (B, R) V(s_t), zeros when the policy has no value head
    entropy: torch.Tensor         # (B, R) entropy of π_old at each step
    texts: list                   # B decoded responses, special tokens skipped

    @property
    def query_len(self) -> int:                                         # P
        return self.query_ids.shape[1]

    def __getitem__(self, idx) -> "Rollout":
        pick = lambda v: v[idx] if torch.is_tensor(v) else [v[i] for i in idx.tolist()]  # noqa: E731
        return Rollout(**{f.name: pick(getattr(self, f.name)) for f in fields(self)})


@torch.no_grad()
def rollout(policy, tokenizer, prompts_ids, max_new_tokens: int, ref_model=None,
            temperature: float = 1.0) -> Rollout:
    """Sample one response per prompt (a list of token-id lists) from the full distribution.

    ``policy`` is a :class:`PolicyWithValue` or a plain causal LM (e.g. DPO-trained, to measure
    its KL). Without ``ref_model`` the reference log-probs equal the policy's (no KL penalty)."""
    device = next(policy.parameters()).device
    query_ids, query_mask = (t.to(device) for t in left_pad(prompts_ids, tokenizer.pad_token_id))
    sequences = policy.generate(input_ids=query_ids, attention_mask=query_mask, max_new_tokens=max_new_tokens,
                                do_sample=True, temperature=temperature, top_k=0, top_p=1.0,  # full distribution
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)  # (B, T)
    P = query_ids.shape[1]
    response_ids = sequences[:, P:]                                     # (B, R)
    response_mask = mask_after_eos(response_ids, tokenizer.eos_token_id)
    attention_mask = torch.cat([query_mask, response_mask], dim=1)      # (B, T)
    logprobs, values, logits = response_forward(policy, sequences, attention_mask, P, temperature)
    entropy = entropy_from_logits(logits)                               # (B, R)
    ref_logprobs = (logprobs.clone() if ref_model is None
                    else response_forward(ref_model, sequences, attention_mask, P, temperature)[0])
    m = response_mask.to(logprobs.dtype)
    kept = response_ids * response_mask + tokenizer.pad_token_id * (1 - response_mask)  # nothing after EOS
    texts = [t.strip() for t in tokenizer.batch_decode(kept, skip_special_tokens=True)]
    return Rollout(query_ids, response_ids, sequences, attention_mask, response_mask, logprobs * m,
                   ref_logprobs * m, (values * m) if values is not None else torch.zeros_like(m),
                   entropy * m, texts)


def closed_turns(batch: Rollout, suffix_ids, eos_token_id: int, pad_token_id: int):
    """Prompt + response of each rollout, the response cut before its first EOS and closed with
    ``suffix_ids`` (e.g. ``<|im_end|>`` and a newline, as the chat template writes an assistant turn).
    Returns left-padded ``(input_ids, attention_mask, completion_mask)``, ``(B, T')``, for a
    :class:`RewardModel`; ``completion_mask`` marks the response and the suffix."""
    rows, completions = [], []
    for query, qmask, response, rmask in zip(batch.query_ids, batch.attention_mask[:, :batch.query_len],
                                             batch.response_ids, batch.response_mask):
        kept = response[rmask.bool()].tolist()
        if kept and kept[-1] == eos_token_id:                           # finished turn: drop its EOS
            kept = kept[:-1]
        prompt = query[qmask.bool()].tolist()
        rows.append(prompt + kept + list(suffix_ids))
        completions.append([0] * len(prompt) + [1] * (len(kept) + len(suffix_ids)))
    ids, mask = left_pad(rows, pad_token_id)
    completion = left_pad(completions, 0)[0]
    device = batch.input_ids.device
    return ids.to(device), mask.to(device), completion.to(device)


# ------------------------------------------------------------------ rewards, advantages, losses
def kl_shaped_rewards(score, logprobs, ref_logprobs, response_mask, kl_coef: float) -> torch.Tensor:
    r"""Per-token rewards ``(B, R)`` of the KL-regularised objective (Ziegler et al. 2019, Eq. 2;
    Ouyang et al. 2022, Eq. 2): :math:`r_t = -\beta(\log\pi(y_t|\cdot) - \log\pi_\text{ref}(y_t|\cdot))`
    on every response token, plus ``score`` ``(B,)`` at the last one; summed over ``t``:
    :math:`r(x, y) - \beta\log\frac{\pi(y|x)}{\pi_\text{ref}(y|x)}`."""
    mask = response_mask.to(logprobs.dtype)
    rewards = -kl_coef * (logprobs - ref_logprobs) * mask               # (B, R)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_index(response_mask)] += torch.as_tensor(score, dtype=rewards.dtype, device=rewards.device)
    return rewards


def compute_gae(rewards, values, gamma: float = 1.0, lam: float = 0.95, mask=None):
    r"""GAE (Schulman et al. 2016, Eq. 16) for ``(B, T)`` tensors: :math:`\delta_t = r_t + \gamma V_{t+1} - V_t`,
    :math:`\hat A_t = \delta_t + \gamma\lambda\hat A_{t+1}`, the value after the last step taken as 0.

    ``mask`` marks each row's valid steps, a prefix (right padding): padded steps get advantage 0
    and leak into nothing. Returns ``(advantages, returns)``, ``returns = advantages + values``."""
    if mask is not None:
        m = mask.to(values.dtype)
        rewards, values = rewards * m, values * m
    advantages = torch.zeros_like(rewards)                              # (B, T)
    next_value = next_adv = torch.zeros_like(rewards[:, 0])             # (B,) V after the last step = 0
    for t in reversed(range(rewards.shape[-1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = delta + gamma * lam * next_adv                       # 0 on padded steps: r = V = 0 there
        advantages[:, t] = next_adv
        next_value = values[:, t]
    return advantages, advantages + values


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_range: float = 0.2):
    r"""Clipped surrogate (Schulman et al. 2017, Eq. 7) as a loss: masked token mean of
    :math:`\max(-\hat A\rho, -\hat A\operatorname{clip}(\rho, 1\pm\epsilon))`, :math:`\rho = \pi/\pi_\text{old}`.

    The clip bites only where it matters: :math:`\rho > 1+\epsilon` with :math:`\hat A > 0`,
    :math:`\rho < 1-\epsilon` with :math:`\hat A < 0`. Returns ``(loss, clipfrac, approx_kl = ½ mean((log ρ)²))``."""
    log_ratio = logprobs - old_logprobs                                 # (B, R)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = 0.5 * masked_mean(log_ratio.detach() ** 2, mask)
    return loss, clipfrac.detach(), approx_kl


def ppo_value_loss(values, old_values, returns, mask, clip_range_value: float = 0.2):
    """Clipped value loss: ``0.5 * mean(max((V - G)², (V_clip - G)²))``, ``V_clip`` kept within
    ``clip_range_value`` of the rollout's values (OpenAI baselines). Returns ``(loss, clipfrac)``."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    loss_unclipped, loss_clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(loss_unclipped, loss_clipped), mask)
    clipfrac = masked_mean((loss_clipped > loss_unclipped).float(), mask)
    return loss, clipfrac.detach()


# ------------------------------------------------------------------ KL controllers
class FixedKLController:
    """A constant KL coefficient β (``update`` does nothing)."""
    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None: ...


class AdaptiveKLController:
    r"""Proportional controller (Ziegler et al. 2019, Sec. 2.2), after a batch of ``n`` samples:
    :math:`\beta \leftarrow \beta(1 + e\,n/\text{horizon})`,
    :math:`e = \operatorname{clip}(KL/KL_\text{target} - 1, \pm 0.2)` (``n/horizon`` plays their :math:`K_\beta`).
    KL above target ⇒ β grows, pulling the policy back."""
    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon


# ------------------------------------------------------------------ the PPO trainer
@dataclass
class PPOConfig:
    """Hyper-parameters of :class:`PPOTrainer`; the batch size is the number of prompts given to ``step``."""
    learning_rate: float = 1e-5
    mini_batch_size: int = 8          # rollouts per gradient step
    ppo_epochs: int = 4               # passes over each batch of rollouts
    max_new_tokens: int = 32
    temperature: float = 1.0
    gamma: float = 1.0                # discount: 1, the episode is one short response
    lam: float = 0.95                 # GAE λ: 0 = one-step TD, 1 = Monte-Carlo return
    clip_range: float = 0.2           # ε of the clipped surrogate
    clip_range_value: float = 0.2
    vf_coef: float = 0.1              # weight of the value loss in the joint loss
    init_kl_coef: float = 0.05        # β of the KL-shaped reward
    adaptive_kl: bool = False         # AdaptiveKLController instead of a fixed β
    target_kl: float = 6.0            # nats per sequence, with adaptive_kl
    horizon: float = 10000
    max_grad_norm: float = 1.0
    whiten_advantages: bool = True


class PPOTrainer:
    """PPO on a :class:`PolicyWithValue` against a frozen reference; ``step(prompts)`` is one iteration.
    Scores come from ``reward_fn(texts) -> list[float]`` (the decoded responses) or from a
    :class:`RewardModel` reading prompt + response (same tokenizer as the policy).

    ``reward_suffix_ids`` (with a reward model): token ids that close each response before it is
    scored, e.g. the chat template's end of turn (:func:`end_of_turn_ids`), so the reward model reads
    responses exactly as it saw them in its training pairs, finished or cut at ``max_new_tokens``."""
    def __init__(self, policy: PolicyWithValue, ref_model, tokenizer, config: PPOConfig | None = None,
                 reward_fn=None, reward_model: RewardModel | None = None, reward_suffix_ids=None):
        if (reward_fn is None) == (reward_model is None):
            raise ValueError("give exactly one of reward_fn and reward_model")
        self.policy, self.ref_model, self.tokenizer = policy, ref_model, tokenizer
        self.config = c = config or PPOConfig()
        self.reward_fn, self.reward_model = reward_fn, reward_model
        self.reward_suffix_ids = list(reward_suffix_ids) if reward_suffix_ids is not None else None
        for frozen in filter(None, (ref_model, reward_model)):
            frozen.eval().requires_grad_(False)
        self.optimizer = torch.optim.AdamW(policy.parameters(), lr=c.learning_rate)
        self.kl_ctl = (AdaptiveKLController(c.init_kl_coef, c.target_kl, c.horizon) if c.adaptive_kl
                       else FixedKLController(c.init_kl_coef))
        self.history: list[dict] = []

    @torch.no_grad()
    def score(self, batch: Rollout) -> torch.Tensor:
        """Scalar score per response, ``(B,)``."""
        if self.reward_model is not None:
            if self.reward_suffix_ids is not None:
                return self.reward_model(*closed_turns(batch, self.reward_suffix_ids, self.tokenizer.eos_token_id,
                                                       self.tokenizer.pad_token_id)).float()
            completion_mask = torch.cat([torch.zeros_like(batch.query_ids), batch.response_mask], dim=1)
            return self.reward_model(batch.input_ids, batch.attention_mask, completion_mask).float()
        return torch.tensor(self.reward_fn(batch.texts), dtype=torch.float32, device=batch.logprobs.device)

    def step(self, prompts_ids) -> dict:
        """Rollout → score → KL-shaped rewards → GAE → ``ppo_epochs`` × minibatches. Returns the logs."""
        c, start = self.config, time.perf_counter()
        self.policy.eval()
        batch = rollout(self.policy, self.tokenizer, prompts_ids, c.max_new_tokens, self.ref_model, c.temperature)
        scores = self.score(batch)                                      # (B,)
        rollout_seconds = time.perf_counter() - start                   # sampling + scoring, no gradient
        mask = batch.response_mask
        kl_coef = self.kl_ctl.value
        rewards = kl_shaped_rewards(scores, batch.logprobs, batch.ref_logprobs, mask, kl_coef)  # (B, R)
        advantages, returns = compute_gae(rewards, batch.values, c.gamma, c.lam, mask)
        if c.whiten_advantages:
            advantages = masked_whiten(advantages, mask)

        self.policy.train()
        stats = []                                                      # per minibatch
        B = batch.input_ids.shape[0]
        for _ in range(c.ppo_epochs):
            for idx in torch.randperm(B).split(c.mini_batch_size):
                mb = batch[idx]                                         # a minibatch of rollouts
                logprobs, values, _ = response_forward(self.policy, mb.input_ids, mb.attention_mask,
                                                       mb.query_len, c.temperature)
                pg_loss, clipfrac, approx_kl = ppo_policy_loss(
                    logprobs, mb.logprobs, advantages[idx], mb.response_mask, c.clip_range)
                vf_loss, vclipfrac = ppo_value_loss(values, mb.values, returns[idx], mb.response_mask,
                                                    c.clip_range_value)
                self.optimizer.zero_grad(set_to_none=True)
                (pg_loss + c.vf_coef * vf_loss).backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), c.max_grad_norm)
                self.optimizer.step()
                stats.append([float(v.detach()) for v in (pg_loss, vf_loss, clipfrac, vclipfrac, approx_kl, grad_norm)])

        m = mask.to(batch.logprobs.dtype)
        seq_kl = ((batch.logprobs - batch.ref_logprobs) * m).sum(-1)    # (B,)
        self.kl_ctl.update(float(seq_kl.mean()), n_steps=B)
        names = ("ppo/loss/policy", "ppo/loss/value", "ppo/clipfrac", "ppo/val/clipfrac", "ppo/approxkl",
                 "ppo/grad_norm")
        logs = {
            "objective/kl": float(seq_kl.mean()),
            "objective/entropy": float(masked_mean(batch.entropy, mask)),
            "objective/rlhf_reward": float((scores - kl_coef * seq_kl).mean()),
            "env/reward_mean": float(scores.mean()),
            "env/reward_std": float(scores.std()) if B > 1 else 0.0,
            **dict(zip(names, torch.tensor(stats).mean(0).tolist())),   # means over minibatches
            "ppo/returns/mean": float(masked_mean(returns, mask)),
            "ppo/val/mean": float(masked_mean(batch.values, mask)),
            "response_length": float(m.sum(-1).mean()),
            "kl_coef": kl_coef,
            "time/step_seconds": time.perf_counter() - start,
            "time/rollout_seconds": rollout_seconds,
        }
        self.history.append(logs)
        return logs


# ------------------------------------------------------------------ comparison helpers (PPO vs DPO)
@torch.no_grad()
def sequence_kl(policy, ref_model, batch: Rollout, temperature: float = 1.0) -> float:
    r"""Monte-Carlo :math:`KL(\pi\|\pi_\text{ref}) \approx \frac1B\sum_b \sum_t (\log\pi - \log\pi_\text{ref})`
    over the response tokens of ``batch``, which must be sampled from ``policy``."""
    args = (batch.input_ids, batch.attention_mask, batch.query_len, temperature)
    logp, ref_logp = response_forward(policy, *args)[0], response_forward(ref_model, *args)[0]
    return float(((logp - ref_logp) * batch.response_mask).sum(-1).mean())


@torch.no_grad()
def best_of_n(policy, tokenizer, prompt_ids, n: int, reward_fn, max_new_tokens: int = 32,
              temperature: float = 1.0) -> dict:
    """Sample ``n`` responses to one prompt and keep the best by ``reward_fn(texts)``: no training,
    KL to the sampler at most :func:`best_of_n_kl`. Returns ``{"best", "best_reward", "texts", "rewards"}``."""
    batch = rollout(policy, tokenizer, [list(prompt_ids)] * n, max_new_tokens, None, temperature)
    rewards = [float(r) for r in reward_fn(batch.texts)]
    best = max(range(n), key=rewards.__getitem__)
    return {"best": batch.texts[best], "best_reward": rewards[best], "texts": batch.texts, "rewards": rewards}


def best_of_n_kl(n: int) -> float:
    r"""KL of best-of-n to its sampler, :math:`\log n - (n-1)/n` (Stiennon et al. 2020);
    an upper bound in general (Beirami et al. 2024)."""
    return math.log(n) - (n - 1) / n


# ------------------------------------------------------------------ lesson 04: PPO beside DPO at small scale
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


def train_only_top_blocks(model: nn.Module, n_blocks: int | None) -> int:
    """Freeze a causal LM except its last ``n_blocks`` transformer blocks and final norm
    (``None``: train everything). Embeddings and the (tied) LM head stay frozen. Backward then
    stops at the first trainable block, and the optimizer keeps state for those blocks only.
    Returns the number of trainable parameters."""
    decoder = model.get_decoder()
    if n_blocks is None:
        model.requires_grad_(True)
    else:
        model.requires_grad_(False)
        for block in list(decoder.layers)[len(decoder.layers) - n_blocks:]:
            block.requires_grad_(True)
        decoder.norm.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@contextmanager
def _swapped_blocks(model: nn.Module, blocks, final_norm=None):
    """Temporarily run ``model``'s decoder with only ``blocks`` (and ``final_norm`` if given)."""
    decoder = model.get_decoder()
    saved = decoder.layers, decoder.norm
    decoder.layers = nn.ModuleList(blocks)
    if final_norm is not None:
        decoder.norm = final_norm
    try:
        yield
    finally:
        decoder.layers, decoder.norm = saved


class FrozenTrunk:
    """The embeddings and the bottom blocks of a causal LM (all but the last ``n_top``), frozen and
    shared by every model built on them with :meth:`branch`, their output memoised per sequence.

    When only the top blocks train, the trunk computes the same thing for the same tokens every time:
    in every PPO epoch over a batch of rollouts, for the reference that scores them, and for every
    DPO run over the same pairs. Memoising it leaves a forward pass only the top blocks and the LM
    head to run. A sequence's trunk output depends on its attended tokens alone (positions are
    counted over the attention mask), so the memo key is that token tuple: padding does not matter."""
    def __init__(self, model: nn.Module, n_top: int, max_items: int = 4096):
        self.model, self.max_items = model.eval().requires_grad_(False), max_items
        blocks = list(model.get_decoder().layers)
        if not 0 < n_top < len(blocks):
            raise ValueError(f"n_top must be between 1 and {len(blocks) - 1}, got {n_top}")
        self.bottom, self.top = blocks[:len(blocks) - n_top], blocks[len(blocks) - n_top:]
        self.memo: dict[tuple, torch.Tensor] = {}
        self.hits = self.misses = 0

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Output of the bottom blocks, ``(B, T, H)``; zeros on padding."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        keys = [tuple(row[m.bool()].tolist()) for row, m in zip(input_ids, attention_mask)]
        todo = [i for i, k in enumerate(keys) if k not in self.memo]
        self.hits, self.misses = self.hits + len(keys) - len(todo), self.misses + len(todo)
        if todo:
            if len(self.memo) + len(todo) > self.max_items:
                self.memo.clear()
            mask = attention_mask[todo]
            with _swapped_blocks(self.model, self.bottom, nn.Identity()):
                hidden = self.model.get_decoder()(input_ids=input_ids[todo], attention_mask=mask, use_cache=False,
                                                  position_ids=position_ids_from_mask(mask)).last_hidden_state
            for row, i in enumerate(todo):
                self.memo[keys[i]] = hidden[row][mask[row].bool()].clone()
        H = self.model.config.hidden_size
        out = torch.zeros(*input_ids.shape, H, dtype=next(self.model.parameters()).dtype, device=input_ids.device)
        for i, key in enumerate(keys):
            out[i][attention_mask[i].bool()] = self.memo[key]
        return out

    def branch(self, trainable: bool = True) -> "TopBlocksLM":
        """A causal LM on this trunk: ``trainable=True`` gives it its own copy of the top blocks and final
        norm, the only parameters that train (a policy); ``False`` runs the original model (the reference)."""
        if not trainable:
            return TopBlocksLM(self.model, self)
        own = {id(p) for block in self.top for p in block.parameters()}
        own |= {id(p) for p in self.model.get_decoder().norm.parameters()}
        shared = {id(p): p for p in self.model.parameters() if id(p) not in own}   # deepcopy keeps these as they are
        lm = copy.deepcopy(self.model, memo=shared)
        train_only_top_blocks(lm, len(self.top))
        return TopBlocksLM(lm, self)


class TopBlocksLM(nn.Module):
    """A causal LM whose bottom blocks are a :class:`FrozenTrunk`: ``forward`` runs only the top blocks
    (on the memoised trunk output), final norm and LM head, and returns what the whole model would;
    ``generate`` runs the whole model. Made by :meth:`FrozenTrunk.branch`."""
    def __init__(self, lm: nn.Module, trunk: FrozenTrunk):
        super().__init__()
        self.lm, self.trunk = lm, trunk
        self.config = lm.config

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        hidden = self.trunk(input_ids, attention_mask)                  # (B, T, H), no gradient
        blocks = list(self.lm.get_decoder().layers)[len(self.trunk.bottom):]
        with _swapped_blocks(self.lm, blocks):
            return self.lm(inputs_embeds=hidden, attention_mask=attention_mask, position_ids=position_ids, **kwargs)

    def generate(self, *args, **kwargs):
        return self.lm.generate(*args, **kwargs)


@torch.no_grad()
def pair_logps_and_hidden(model: nn.Module, features: list[dict], pad_token_id: int,
                          batch_size: int = 8) -> dict[str, torch.Tensor]:
    """One pass of a frozen causal LM over tokenized preference pairs (:func:`dpo_lib.data.tokenize_rows`)
    gives what lesson 04 caches:

    All on the CPU, float32:

    * ``chosen_logps`` / ``rejected_logps`` ``(N,)``: summed completion log-probs, the DPO
      reference (equal to :func:`dpo_lib.logprobs.concatenated_forward`);
    * ``chosen_last`` / ``rejected_last`` and ``chosen_mean`` / ``rejected_mean`` ``(N, H)``: the
      decoder's last hidden states pooled as a :class:`RewardModel` on this frozen backbone pools
      them (``pooling="last"`` or ``"mean"``), the features its head is trained on.
    """
    was_training = model.training
    model.eval()
    keys = ("chosen_logps", "rejected_logps", "chosen_last", "rejected_last", "chosen_mean", "rejected_mean")
    parts: dict[str, list] = {k: [] for k in keys}
    device = next(model.parameters()).device
    for i in range(0, len(features), batch_size):
        batch = {k: v.to(device) for k, v in collate(features[i:i + batch_size], pad_token_id).items()}
        ids, mask, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]  # (2B, T)
        start = max(int(completion.float().argmax(1).min()) - 1, 0)  # LM head only where a completion is scored
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False,
                    output_hidden_states=True, logits_to_keep=ids.shape[1] - start)
        hidden = out.hidden_states[-1]                        # (2B, T, H) after the final norm, as a RewardModel reads
        logps = sequence_logprobs(out.logits, ids[:, start:], completion[:, start:])  # (2B,)
        last = pool_hidden(hidden, mask, completion, "last")                           # (2B, H)
        mean = pool_hidden(hidden, mask, completion, "mean")                           # (2B, H)
        for key, value in zip(keys, (*logps.chunk(2), *last.chunk(2), *mean.chunk(2))):
            parts[key].append(value.float().cpu())
    model.train(was_training)
    return {k: torch.cat(v) for k, v in parts.items()}


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


@torch.no_grad()
def sample_and_score(policy, tokenizer, prompts_ids, reward_fn, max_new_tokens: int, ref_model=None,
                     n: int = 1, batch_size: int = 32, seed: int = 0, temperature: float = 1.0,
                     reward_model: RewardModel | None = None, reward_suffix_ids=None) -> dict:
    r"""Sample ``n`` responses to each of ``P`` prompts from ``policy`` (full distribution) and score them.

    Returns ``texts`` (``P * n``, prompt-major), ``rewards`` ``(P, n)`` from ``reward_fn(texts)`` and
    ``kl`` ``(P, n)``, each sample's :math:`\log\pi(y|x) - \log\pi_\text{ref}(y|x)` (its mean is the
    Monte-Carlo sequence KL; all zeros without ``ref_model``). With ``reward_model`` also
    ``proxy`` ``(P, n)``, its scores of the responses closed with ``reward_suffix_ids``."""
    torch.manual_seed(seed)
    jobs = [list(ids) for ids in prompts_ids for _ in range(n)]
    texts, rewards, kls, proxy = [], [], [], []
    for i in range(0, len(jobs), batch_size):
        batch = rollout(policy, tokenizer, jobs[i:i + batch_size], max_new_tokens, ref_model, temperature)
        texts += batch.texts
        rewards += [float(r) for r in reward_fn(batch.texts)]
        kls += (batch.logprobs - batch.ref_logprobs).sum(-1).tolist()
        if reward_model is not None:
            proxy += reward_model(*closed_turns(batch, reward_suffix_ids or [], tokenizer.eos_token_id,
                                                tokenizer.pad_token_id)).tolist()
    P = len(prompts_ids)
    out = {"texts": texts, "rewards": torch.tensor(rewards).view(P, n), "kl": torch.tensor(kls).view(P, n)}
    if reward_model is not None:
        out["proxy"] = torch.tensor(proxy).view(P, n)
    return out


def expected_best_of_n(rewards: torch.Tensor, n: int, select_by: torch.Tensor | None = None) -> float:
    r"""Expected reward of best-of-``n`` sampling, estimated from ``N >= n`` samples per prompt
    (``rewards`` ``(P, N)``) without bias: the average, over all :math:`\binom{N}{n}` subsets of size
    ``n``, of the reward of the subset's best member, then the mean over prompts. "Best" is by
    ``select_by`` ``(P, N)`` (e.g. a reward model's scores) or, when ``None``, by ``rewards`` itself.

    Sorted ascending by the selection score, sample ``i`` (0-based) is the best of a random subset with
    probability :math:`\binom{i}{n-1}/\binom{N}{n}`."""
    P, N = rewards.shape
    if not 1 <= n <= N:
        raise ValueError(f"need 1 <= n <= N, got n={n}, N={N}")
    key = rewards if select_by is None else select_by
    ranked = rewards.gather(1, key.argsort(dim=1, stable=True))                    # (P, N) by selection score
    weights = torch.tensor([math.comb(i, n - 1) / math.comb(N, n) for i in range(N)], dtype=rewards.dtype)
    return float((ranked * weights).sum(1).mean())


def megabytes(*modules: nn.Module, trainable_only: bool = False) -> float:
    """Size of the parameters of ``modules`` in MB (2**20 bytes); a tensor shared by several
    modules (tied embeddings, a shared backbone) counts once."""
    seen, total = set(), 0
    for module in modules:
        for p in module.parameters():
            if (trainable_only and not p.requires_grad) or p.data_ptr() in seen:
                continue
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total / 2**20


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024                      # kB -> MB
    except OSError:
        return None
    return None


def rss_mb() -> float:
    """Resident set size of this process in MB (``/proc`` on Linux, else psutil, else NaN)."""
    value = _status_mb("VmRSS")
    if value is not None:
        return value
    try:
        import psutil
        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        return float("nan")


class PeakMemory:
    """``with PeakMemory() as m: ...`` then ``m.peak_mb``: how far this process's resident memory rose
    above its level at the start of the block, at the block's worst moment.

    On Linux the kernel's peak (``VmHWM``) is reset at the start (``/proc/self/clear_refs``) and
    freed heap memory is first handed back (``malloc_trim``), so the number covers this block alone.
    Elsewhere it falls back to ``getrusage``'s lifetime peak, which only shows growth beyond every
    earlier peak (``exact`` is then False). With CUDA, ``gpu_peak_mb`` is the same measure for the
    memory PyTorch allocated on the GPU (``None`` without a GPU)."""
    def __enter__(self) -> "PeakMemory":
        gc.collect()
        self.gpu_peak_mb = None
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._gpu_start = torch.cuda.memory_allocated()
        try:
            import ctypes
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        self.start_mb = rss_mb()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")                                                # reset VmHWM to the current RSS
            self.exact = _status_mb("VmHWM") is not None
        except OSError:
            self.exact = False
        self._lifetime_start = _maxrss_mb()
        return self

    def __exit__(self, *exc) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.gpu_peak_mb = (torch.cuda.max_memory_allocated() - self._gpu_start) / 2**20
        if self.exact:
            self.peak_mb = _status_mb("VmHWM") - self.start_mb
        else:
            self.peak_mb = max(_maxrss_mb() - self._lifetime_start, 0.0)     # a lower bound


def _maxrss_mb() -> float:
    try:
        import resource
        import sys
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024   # bytes on macOS, kB on Linux
    except ImportError:
        return float("nan")
