r"""PPO for RLHF (Ouyang et al. 2022): the on-policy reinforcement learning that DPO replaces.

1. **Rollout**: sample :math:`y \sim \pi_\theta(\cdot|x)`; keep the log-probs of the sampled
   tokens under the policy ("old") and the frozen reference, and the values :math:`V(s_t)`.
2. **KL-shaped reward** (Ziegler et al. 2019, Eq. 2; Ouyang et al. 2022, Eq. 2): maximise
   :math:`r(x, y) - \beta\log\frac{\pi_\theta(y|x)}{\pi_\text{ref}(y|x)}`, the objective DPO solves
   in closed form. Each response token is an action with reward
   :math:`-\beta(\log\pi_\theta - \log\pi_\text{ref})`; the score is added at the last token.
3. **GAE** (Schulman et al. 2016, Eq. 16): :math:`\hat A_t = \sum_l (\gamma\lambda)^l\delta_{t+l}`,
   :math:`\delta_t = r_t + \gamma V_{t+1} - V_t`, with :math:`V = 0` after the last token.
4. **PPO** (Schulman et al. 2017, Eq. 7): epochs of minibatches of the clipped surrogate
   :math:`\min(\rho\hat A, \operatorname{clip}(\rho, 1\pm\epsilon)\hat A)`, :math:`\rho = \pi_\theta/\pi_\text{old}`,
   plus a clipped value loss (Eq. 9's :math:`L^{VF}`, clipped as in OpenAI baselines).

The score comes from a function of the decoded responses or from a
:class:`dpo_lib.rlhf.reward_model.RewardModel`. Shapes as in :mod:`dpo_lib.rlhf`: ``B`` sequences, ``P``
prompt tokens (left-padded), ``R`` response tokens (right-padded after EOS), ``T = P + R``,
``V`` vocabulary, ``H`` hidden size. Per-token rollout tensors are ``(B, R)``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields

import torch
from torch import nn

from dpo_lib.logprobs import token_logprobs
from dpo_lib.rlhf.masks import (
    entropy_from_logits,
    last_index,
    left_pad,
    mask_after_eos,
    masked_mean,
    masked_whiten,
    position_ids_from_mask,
)
from dpo_lib.rlhf.reward_model import RewardModel

__all__ = [
    "AdaptiveKLController", "FixedKLController", "PPOConfig", "PPOTrainer", "PolicyWithValue", "closed_turns",
    "compute_gae", "kl_shaped_rewards", "ppo_policy_loss", "ppo_value_loss", "response_forward", "rollout",
    "sequence_kl",
]


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
    scored, e.g. the chat template's end of turn (:func:`dpo_lib.rlhf.reward_model.end_of_turn_ids`), so the reward
    model reads responses exactly as it saw them in its training pairs, finished or cut at ``max_new_tokens``.

    ``monitor_fn(texts) -> list[float]``: a second score of every rollout that is logged
    (``env/monitor_mean``) but never trained on, e.g. the ground truth while PPO optimises a learned
    reward model, to see the two part ways (reward over-optimisation, Gao et al. 2023)."""
    def __init__(self, policy: PolicyWithValue, ref_model, tokenizer, config: PPOConfig | None = None,
                 reward_fn=None, reward_model: RewardModel | None = None, reward_suffix_ids=None,
                 monitor_fn=None):
        if (reward_fn is None) == (reward_model is None):
            raise ValueError("give exactly one of reward_fn and reward_model")
        self.policy, self.ref_model, self.tokenizer = policy, ref_model, tokenizer
        self.config = c = config or PPOConfig()
        self.reward_fn, self.reward_model, self.monitor_fn = reward_fn, reward_model, monitor_fn
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
        if self.monitor_fn is not None:
            logs["env/monitor_mean"] = sum(float(v) for v in self.monitor_fn(batch.texts)) / B
        self.history.append(logs)
        return logs


# ------------------------------------------------------------------ KL of a policy to its reference
@torch.no_grad()
def sequence_kl(policy, ref_model, batch: Rollout, temperature: float = 1.0) -> float:
    r"""Monte-Carlo :math:`KL(\pi\|\pi_\text{ref}) \approx \frac1B\sum_b \sum_t (\log\pi - \log\pi_\text{ref})`
    over the response tokens of ``batch``, which must be sampled from ``policy``."""
    args = (batch.input_ids, batch.attention_mask, batch.query_len, temperature)
    logp, ref_logp = response_forward(policy, *args)[0], response_forward(ref_model, *args)[0]
    return float(((logp - ref_logp) * batch.response_mask).sum(-1).mean())
