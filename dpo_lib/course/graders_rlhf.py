"""Graders for lesson 04 (RLHF with PPO); re-exported by :mod:`dpo_lib.course.graders`, where the
check cells find them (lesson 05's are in :mod:`dpo_lib.course.graders_gpu`).

Each grader compares the learner's function with the library's own implementation on six seeded
cases: the reward model's loss (:mod:`dpo_lib.rlhf.reward_model`), PPO's pieces
(:mod:`dpo_lib.rlhf.ppo`) and best-of-N (:mod:`dpo_lib.rlhf.best_of_n`). Losses that feed a
backward pass have their gradients compared too.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from dpo_lib.course.grading_engine import Grader, Mistake
from dpo_lib.rlhf.best_of_n import best_of_n_kl
from dpo_lib.rlhf.masks import last_index, masked_mean
from dpo_lib.rlhf.ppo import compute_gae, kl_shaped_rewards, ppo_policy_loss
from dpo_lib.rlhf.reward_model import reward_model_loss

__all__ = [
    "RLHF_GRADERS", "check_reward_model_loss", "check_kl_shaped_rewards", "check_gae", "check_ppo_policy_loss",
    "check_best_of_n_kl", "reference_reward_model_loss", "reference_kl_shaped_rewards", "reference_gae",
    "reference_ppo_policy_loss",
]


def _right_padded_mask(g: torch.Generator, B: int, T: int) -> torch.Tensor:
    """``[B, T]`` 0/1 mask, a prefix per row; row 0 is always full length, every row has a step."""
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    return (torch.arange(T)[None, :] < lengths[:, None]).float()


# --------------------------------------------------------------------------- 04: the reward model
def _reward_case(g: torch.Generator, k: int) -> tuple:
    """Case 0: every reward 0 (ln 2, accuracy 0). Case 5: margins of ±120, where σ underflows in float32."""
    B = (4, 6, 3, 8, 5, 6)[k]
    if k == 0:
        return torch.zeros(B).requires_grad_(), torch.zeros(B).requires_grad_()
    chosen = 2 * torch.randn(B, generator=g)
    rejected = 2 * torch.randn(B, generator=g)
    rejected[: k % 2 + 1] = chosen[: k % 2 + 1]  # a tie or two
    if k == 5:
        rejected[-2:] = chosen[-2:] + torch.tensor([120.0, -120.0])
    return chosen.requires_grad_(), rejected.requires_grad_()


def reference_reward_model_loss(r_chosen, r_rejected):
    """:func:`dpo_lib.rlhf.reward_model.reward_model_loss`: mean ``-log σ(r_w - r_l)`` and the strict accuracy."""
    return reward_model_loss(r_chosen, r_rejected)


def _strict_accuracy(c, r):
    return (c > r).float().mean()


REWARD_MODEL_MISTAKES = [
    Mistake("the sign is flipped (or chosen and rejected are swapped): the loss is -log σ(r_w - r_l), small when "
            "the chosen reply scores higher.", lambda c, r: (-F.logsigmoid(r - c).mean(), _strict_accuracy(c, r))),
    Mistake("the minus sign is missing: the loss is the negative log-likelihood, -log σ(r_w - r_l) ≥ 0 "
            "(ln 2 when the rewards are equal).", lambda c, r: (F.logsigmoid(c - r).mean(), _strict_accuracy(c, r))),
    Mistake("summed over the pairs: average the loss (.mean()), so its scale does not depend on the batch size.",
            lambda c, r: (-F.logsigmoid(c - r).sum(), _strict_accuracy(c, r))),
    Mistake("you returned one loss per pair: return their mean, a scalar.",
            lambda c, r: (-F.logsigmoid(c - r), _strict_accuracy(c, r))),
    Mistake("the loss is inf on the pair whose margin is -120: in float32 σ(-120) is 0, so torch.log(torch.sigmoid(z)) "
            "is -inf, and exp(120) is inf, so torch.log1p(torch.exp(-z)) is inf too. Use F.logsigmoid(z) (or "
            "-F.softplus(-z)), which stays finite.", lambda c, r: (-torch.log(torch.sigmoid(c - r)).mean(),
                                                               _strict_accuracy(c, r))),
    Mistake("Bradley–Terry models the difference r_w - r_l, not two separate classifications of r_w and r_l.",
            lambda c, r: (-(F.logsigmoid(c) + F.logsigmoid(-r)).mean(), _strict_accuracy(c, r))),
    Mistake("ties count as correct: use a strict > (equal rewards rank nothing; at the start every reward is 0 "
            "and the accuracy is 0).", lambda c, r: (reward_model_loss(c, r)[0], (c >= r).float().mean())),
    Mistake("the accuracy is a count: return the fraction of pairs ranked correctly.",
            lambda c, r: (reward_model_loss(c, r)[0], (c > r).float().sum())),
]


# --------------------------------------------------------------------------- 04: the KL-shaped reward
def _token_case(g: torch.Generator, k: int) -> tuple:
    B, R = (1, 3, 2, 4, 3, 2)[k], (4, 5, 3, 6, 8, 5)[k]
    logprobs = -3 * torch.rand(B, R, generator=g)
    ref_logprobs = logprobs + 0.5 * torch.randn(B, R, generator=g)
    mask = _right_padded_mask(g, B, R)
    score = torch.randn(B, generator=g)
    return score, logprobs, ref_logprobs, mask, (0.1, 0.05, 0.2, 0.3, 0.5, 0.02)[k]


def reference_kl_shaped_rewards(score, logprobs, ref_logprobs, response_mask, kl_coef):
    """:func:`dpo_lib.rlhf.ppo.kl_shaped_rewards`: ``-β·(log π - log π_ref)`` per token, plus the score at the last."""
    return kl_shaped_rewards(score, logprobs, ref_logprobs, response_mask, kl_coef)


def _shaped(penalty: Callable, where: str = "last") -> Callable:
    def fn(score, lp, lr, m, b):
        rewards = penalty(lp, lr, m, b).clone()
        if where == "every":
            return rewards + score[:, None] * m
        rows = torch.arange(rewards.shape[0])
        cols = {"last": last_index(m), "end": torch.full_like(rows, m.shape[1] - 1), "first": torch.zeros_like(rows)}
        if where in cols:
            rewards[rows, cols[where]] += score
        return rewards
    return fn


def _kl_penalty(lp, lr, m, b):
    return -b * (lp - lr) * m


KL_REWARD_MISTAKES = [
    Mistake("the KL penalty has the wrong sign: r_t = -β·(log π(y_t) - log π_ref(y_t)), a cost where the policy "
            "likes a token more than the reference does.", _shaped(lambda lp, lr, m, b: b * (lp - lr) * m)),
    Mistake("β (kl_coef) is missing from the penalty: r_t = -β·(log π(y_t) - log π_ref(y_t)).",
            _shaped(lambda lp, lr, m, b: -(lp - lr) * m)),
    Mistake("the score is added to every token: the reward model scores the whole answer once, so R arrives at "
            "the last real token only.", _shaped(_kl_penalty, "every")),
    Mistake("the score went to the last column of the tensor: rows are right-padded, so put it on each row's last "
            "real token (the last 1 of the mask).", _shaped(_kl_penalty, "end")),
    Mistake("the score went to the first token: it belongs to the last real token of each answer.",
            _shaped(_kl_penalty, "first")),
    Mistake("padding is penalised: multiply the per-token penalty by the response mask.",
            _shaped(lambda lp, lr, m, b: -b * (lp - lr))),
    Mistake("the score is missing: add R = score to the reward of each answer's last real token.",
            _shaped(_kl_penalty, "none")),
]


# --------------------------------------------------------------------------- 04: GAE
_GAMMAS = (1.0, 0.9, 0.99, 1.0, 0.8, 0.95)
_LAMBDAS = (0.95, 0.8, 0.9, 0.7, 0.95, 0.5)


def _gae_case(g: torch.Generator, k: int) -> tuple:
    """Random rewards and values, and garbage on the padded steps (a correct GAE masks it away)."""
    B, T = (1, 3, 2, 4, 2, 3)[k], (4, 5, 6, 3, 7, 5)[k]
    rewards = torch.randn(B, T, generator=g)
    values = torch.randn(B, T, generator=g)
    return rewards, values, _GAMMAS[k], _LAMBDAS[k], _right_padded_mask(g, B, T)


def reference_gae(rewards, values, gamma, lam, mask):
    """:func:`dpo_lib.rlhf.ppo.compute_gae`: ``(advantages, returns)``, the value after the last step 0."""
    return compute_gae(rewards, values, gamma=gamma, lam=lam, mask=mask)


def _gae(end: str = "zero", forward: bool = False, td_gamma: str = "gamma", trace: str = "gamma*lam",
         use_mask: bool = True, returns: str = "A+V", td_swapped: bool = False) -> Callable:
    """A GAE written with one deliberate change per flag (the mistakes of :data:`GAE_MISTAKES`)."""
    def fn(rewards, values, gamma, lam, mask):
        if use_mask:
            rewards, values = rewards * mask, values * mask
        T = rewards.shape[1]
        ends = {"zero": torch.zeros_like(values[:, :1]), "last": values[:, -1:], "wrap": values[:, :1]}
        next_values = torch.cat([values[:, 1:], ends[end]], dim=1)
        g_td = {"gamma": gamma, "lam": lam}[td_gamma]
        decay = {"gamma*lam": gamma * lam, "lam": lam, "gamma": gamma}[trace]
        deltas = rewards + values - g_td * next_values if td_swapped else rewards + g_td * next_values - values
        adv, running = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
        for t in (range(T) if forward else reversed(range(T))):
            running = deltas[:, t] + decay * running
            adv[:, t] = running
        if returns == "A":
            return adv, adv.clone()
        if returns == "reward-to-go":
            togo, run = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
            for t in reversed(range(T)):
                run = rewards[:, t] + gamma * run
                togo[:, t] = run
            return adv, togo
        return adv, adv + values
    return fn


_GAE_END = ("the value after the last step must be 0: the answer is over and nothing follows, so there is no "
            "bootstrap. Repeating V(s_T) bootstraps from the last state, and torch.roll wraps V(s_0) around.")
GAE_MISTAKES = [
    Mistake("λ and γ are swapped: the TD error δ_t = r_t + γ·V(s_{t+1}) - V(s_t) discounts with γ; λ only "
            "weights how far the sum of δ's looks ahead (Â_t = δ_t + γλ·Â_{t+1}).", _gae(td_gamma="lam")),
    Mistake("the recursion is Â_t = δ_t + γλ·Â_{t+1}: the decay per step is the product γλ, not λ alone.",
            _gae(trace="lam")),
    Mistake("the recursion is Â_t = δ_t + γλ·Â_{t+1}: the decay per step is the product γλ, not γ alone.",
            _gae(trace="gamma")),
    Mistake(_GAE_END, _gae(end="last")),
    Mistake(_GAE_END, _gae(end="wrap")),
    Mistake("the advantages are not reversed in time: each Â_t sums the TD errors of the steps *after* t, so run "
            "the recursion from the last step back to the first (reversed(range(T))).", _gae(forward=True)),
    Mistake("the TD error is the wrong way round: δ_t = r_t + γ·V(s_{t+1}) - V(s_t).", _gae(td_swapped=True)),
    Mistake("padded steps leak into the answer: multiply the rewards and the values by the mask first, so the "
            "last real step sees V = 0 after it.", _gae(use_mask=False)),
    Mistake("the returns are Â_t + V(s_t) (what the value head regresses on), not the advantages alone.",
            _gae(returns="A")),
    Mistake("the returns are Â_t + V(s_t), the λ-return, not the discounted sum of rewards (those agree only "
            "when λ = 1).", _gae(returns="reward-to-go")),
]


# --------------------------------------------------------------------------- 04: the clipped surrogate
_CLIPS = (0.2, 0.1, 0.3, 0.2, 0.25, 0.15)


def _ppo_case(g: torch.Generator, k: int) -> tuple:
    """Ratios between 0.55 and 1.8, so the clip bites on both sides; case 0 is the first epoch (ratio 1)."""
    B, R = (2, 3, 4, 2, 3, 4)[k], (5, 4, 3, 6, 5, 4)[k]
    old = -3 * torch.rand(B, R, generator=g)
    log_ratio = torch.zeros(B, R) if k == 0 else 1.2 * torch.rand(B, R, generator=g) - 0.6
    advantages = torch.randn(B, R, generator=g)
    return (old + log_ratio).requires_grad_(), old, advantages, _right_padded_mask(g, B, R), _CLIPS[k]


def reference_ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_range):
    """The loss of :func:`dpo_lib.rlhf.ppo.ppo_policy_loss`: masked mean of ``max(-Âρ, -Â·clip(ρ, 1±ε))``."""
    return ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_range)[0]


def _surrogate(combine: Callable, ratio: Callable = lambda lp, old: torch.exp(lp - old),
               reduce: Callable = masked_mean) -> Callable:
    def fn(lp, old, adv, m, eps):
        rho = ratio(lp, old)
        return reduce(combine(rho, adv, eps), m)
    return fn


def _clipped(rho, adv, eps):
    return torch.max(-adv * rho, -adv * rho.clamp(1 - eps, 1 + eps))


PPO_MISTAKES = [
    Mistake("min and max are swapped: the objective is min(ρÂ, clip(ρ, 1-ε, 1+ε)·Â), the pessimistic of the "
            "two, so the loss (its negative) is max(-ρÂ, -clip(ρ)·Â).",
            _surrogate(lambda rho, adv, eps: torch.min(-adv * rho, -adv * rho.clamp(1 - eps, 1 + eps)))),
    Mistake("the advantage is clipped instead of the ratio: clip ρ to [1-ε, 1+ε], and leave Â as it is.",
            _surrogate(lambda rho, adv, eps: torch.max(-adv * rho, -adv.clamp(1 - eps, 1 + eps) * rho))),
    Mistake("only the clipped term is used: take the max of the unclipped and the clipped loss (the min of the "
            "objectives), so that a ratio that moved the wrong way is still pulled back.",
            _surrogate(lambda rho, adv, eps: -adv * rho.clamp(1 - eps, 1 + eps))),
    Mistake("the clip is missing: this is the plain importance-weighted objective ρÂ.",
            _surrogate(lambda rho, adv, eps: -adv * rho)),
    Mistake("the ratio is ρ = π/π_old = exp(log π - log π_old), not the difference of the log-probs.",
            _surrogate(_clipped, ratio=lambda lp, old: lp - old)),
    Mistake("the ratio is upside down: ρ = π/π_old = exp(log π - log π_old).",
            _surrogate(_clipped, ratio=lambda lp, old: torch.exp(old - lp))),
    Mistake("you returned the objective: the optimizer minimises, so return its negative, the loss.",
            _surrogate(lambda rho, adv, eps: -_clipped(rho, adv, eps))),
    Mistake("padding is averaged in: take the mean over the masked (real) tokens only.",
            _surrogate(_clipped, reduce=lambda x, m: x.mean())),
    Mistake("summed over the tokens: average over the real tokens (a masked mean).",
            _surrogate(_clipped, reduce=lambda x, m: (x * m).sum())),
    Mistake("the ratio is detached: the values are right, but the gradient must flow through ρ into log π "
            "(only log π_old and Â are constants).",
            _surrogate(_clipped, ratio=lambda lp, old: torch.exp(lp - old).detach())),
]


# --------------------------------------------------------------------------- 04: best-of-N
def _n_case(g: torch.Generator, k: int) -> tuple:
    return ((1, 2, 4, 8, 16, 100)[k],)


BEST_OF_N_MISTAKES = [
    Mistake("log n is only an upper bound: the KL of best-of-n to its sampler is log n - (n-1)/n.",
            lambda n: math.log(n)),
    Mistake("the sign is flipped: KL = log n - (n-1)/n, which is ≥ 0 and 0 at n = 1.",
            lambda n: (n - 1) / n - math.log(n)),
    Mistake("use the natural logarithm: the course measures KL in nats (math.log, not math.log2).",
            lambda n: math.log2(n) - (n - 1) / n),
    Mistake("the correction is (n-1)/n, not 1: at n = 1 best-of-1 is the sampler itself and its KL is 0.",
            lambda n: math.log(n) - 1),
]


# --------------------------------------------------------------------------- the graders
_TOKENS = ("score", "logprobs", "ref_logprobs", "response_mask", "kl_coef")
RLHF_GRADERS: dict[str, Grader] = {g.name: g for g in [
    Grader("reward_model_loss", reference_reward_model_loss, _reward_case, ("r_chosen", "r_rejected"),
           ("loss", "accuracy"), REWARD_MODEL_MISTAKES, grads=(("loss", "r_chosen"), ("loss", "r_rejected"))),
    Grader("kl_shaped_rewards", reference_kl_shaped_rewards, _token_case, _TOKENS, ("rewards",), KL_REWARD_MISTAKES),
    Grader("gae", reference_gae, _gae_case, ("rewards", "values", "gamma", "lam", "mask"),
           ("advantages", "returns"), GAE_MISTAKES),
    Grader("ppo_policy_loss", reference_ppo_policy_loss, _ppo_case,
           ("logprobs", "old_logprobs", "advantages", "mask", "clip_range"), ("loss",), PPO_MISTAKES,
           grads=(("loss", "logprobs"),)),
    Grader("best_of_n_kl", best_of_n_kl, _n_case, ("n",), ("kl",), BEST_OF_N_MISTAKES),
]}


def check_reward_model_loss(fn: Callable) -> None:
    """``fn(r_chosen [B], r_rejected [B]) -> (loss, accuracy)``: mean Bradley–Terry loss (a scalar with its
    gradient) and the fraction of pairs with ``r_chosen > r_rejected``."""
    RLHF_GRADERS["reward_model_loss"](fn)


def check_kl_shaped_rewards(fn: Callable) -> None:
    """``fn(score [B], logprobs [B,R], ref_logprobs [B,R], response_mask [B,R], kl_coef) -> rewards [B,R]``."""
    RLHF_GRADERS["kl_shaped_rewards"](fn)


def check_gae(fn: Callable) -> None:
    """``fn(rewards [B,T], values [B,T], gamma, lam, mask [B,T]) -> (advantages [B,T], returns [B,T])``."""
    RLHF_GRADERS["gae"](fn)


def check_ppo_policy_loss(fn: Callable) -> None:
    """``fn(logprobs [B,R], old_logprobs [B,R], advantages [B,R], mask [B,R], clip_range) -> loss`` (a scalar);
    its gradient with respect to ``logprobs`` is compared too."""
    RLHF_GRADERS["ppo_policy_loss"](fn)


def check_best_of_n_kl(fn: Callable) -> None:
    """``fn(n) -> float``: the KL of best-of-n sampling to its sampler, in nats."""
    RLHF_GRADERS["best_of_n_kl"](fn)
