"""Graders for lesson 04's PPO details and best-of-n (re-exported by :mod:`dpo_lib.course.graders`).

* ``ppo_value_loss``: the clipped value loss of :func:`dpo_lib.rlhf.ppo.ppo_value_loss` (the loss only); its
  gradient with respect to the values is compared too.
* ``whiten_advantages``: :func:`dpo_lib.rlhf.masks.masked_whiten`, statistics over the real tokens of the batch.
* ``best_of_n_estimate``: the unbiased estimate of the expected best-of-n reward from N ≥ n samples (the mean of
  the maximum over every subset of n samples, in closed form over the sorted rewards).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from dpo_lib.course.graders_rlhf import _right_padded_mask
from dpo_lib.course.grading_engine import Grader, Mistake
from dpo_lib.rlhf.masks import masked_mean, masked_whiten
from dpo_lib.rlhf.ppo import ppo_value_loss

__all__ = ["PPO_GRADERS", "check_best_of_n_estimate", "check_ppo_value_loss", "check_whiten_advantages",
           "reference_best_of_n_estimate", "reference_ppo_value_loss", "reference_whiten_advantages"]

_CLIPS = (0.2, 0.1, 0.3, 0.2, 0.5, 0.15)


# --------------------------------------------------------------------------- the clipped value loss
def _value_case(g: torch.Generator, k: int) -> tuple:
    """Values that moved up to ±3 clip ranges from the rollout's, so both branches of the max occur."""
    B, R = 2 + k % 3, 4 + k
    eps = _CLIPS[k]
    old = torch.randn(B, R, generator=g)
    values = old + 3 * eps * (2 * torch.rand(B, R, generator=g) - 1)
    returns = old + torch.randn(B, R, generator=g)
    return values.requires_grad_(), old, returns, _right_padded_mask(g, B, R).float(), eps


def reference_ppo_value_loss(values, old_values, returns, mask, clip_range_value):
    """``0.5 · masked mean of max((V - G)², (V_clip - G)²)``, ``V_clip`` within ε of the rollout's values."""
    return ppo_value_loss(values, old_values, returns, mask, clip_range_value)[0]


def _value(combine: Callable = torch.max, centre: str = "old", half: float = 0.5, masked: bool = True,
           clipped: bool = True) -> Callable:
    def fn(v, old, ret, mask, eps):
        c = old if centre == "old" else ret
        v_clip = c + torch.clamp(v - c, -eps, eps)
        per_token = combine((v - ret) ** 2, (v_clip - ret) ** 2) if clipped else (v - ret) ** 2
        return half * (masked_mean(per_token, mask) if masked else per_token.mean())
    return fn


VALUE_MISTAKES = [
    Mistake("min instead of max: the clipped value loss is pessimistic, max((V - G)², (V_clip - G)²), like the "
            "policy loss; with the min, a value that jumped far from the rollout's would get the clipped, "
            "smaller loss and keep jumping.", _value(combine=torch.min)),
    Mistake("the clip is centred on the wrong thing: V_clip stays within ε of the rollout's values (old_values), "
            "not of the returns.", _value(centre="returns")),
    Mistake("the factor ½ is missing: the loss is ½·max(...), the convention of the course and OpenAI baselines.",
            _value(half=1.0)),
    Mistake("the padding is averaged in: take the mean over the real tokens only (the mask).", _value(masked=False)),
    Mistake("the clipping is missing: with only (V - G)² the value head may move as far as it likes in one "
            "update.", _value(clipped=False)),
]


# --------------------------------------------------------------------------- advantage whitening
def _whiten_case(g: torch.Generator, k: int) -> tuple:
    B, R = 2 + k % 3, 4 + k
    mask = _right_padded_mask(g, B, R).float()
    advantages = 2 + 3 * torch.randn(B, R, generator=g)
    return torch.where(mask.bool(), advantages, 100 * torch.randn(B, R, generator=g)), mask


def reference_whiten_advantages(advantages, mask):
    """``(A - mean) / std`` over the real tokens of the whole batch (population variance), 0 on padding."""
    return masked_whiten(advantages, mask)


def _whiten(stats_mask: Callable = lambda m: m, per_row: bool = False, zero_pad: bool = True, centre: bool = True,
            power: float = 0.5) -> Callable:
    def fn(a, mask):
        m = stats_mask(mask)
        dims = dict(dim=-1, keepdim=True) if per_row else {}
        mean = (a * m).sum(**dims) / m.sum(**dims)
        var = (((a - mean) ** 2) * m).sum(**dims) / m.sum(**dims)
        out = ((a - mean) if centre else a) / (var + 1e-8) ** power
        return out * mask if zero_pad else out
    return fn


WHITEN_MISTAKES = [
    Mistake("the padding is in the statistics: compute the mean and the variance over the real tokens only.",
            _whiten(stats_mask=torch.ones_like)),
    Mistake("each row is whitened on its own: the statistics are over all the real tokens of the batch, so that an "
            "answer that did better than the others keeps positive advantages.", _whiten(per_row=True)),
    Mistake("the padded positions are not zeroed: multiply the result by the mask.", _whiten(zero_pad=False)),
    Mistake("the mean is not subtracted: whitening centres the advantages (A - mean), then scales them.",
            _whiten(centre=False)),
    Mistake("divided by the variance: divide by the standard deviation, its square root.", _whiten(power=1.0)),
]


# --------------------------------------------------------------------------- unbiased best-of-n
def _bon_case(g: torch.Generator, k: int) -> tuple:
    N, n = (8, 12, 5, 20, 16, 9)[k], (2, 4, 5, 3, 8, 1)[k]
    return torch.randn(N, generator=g, dtype=torch.float64), n


def reference_best_of_n_estimate(rewards, n):
    """The mean, over all C(N, n) subsets of n of the N rewards, of the subset's maximum (an unbiased estimate of
    the expected best-of-n reward): Σ_i C(i-1, n-1)/C(N, n)·r_(i) over the sorted rewards, i = 1..N."""
    r = sorted(float(x) for x in rewards)
    N = len(r)
    return sum(math.comb(i - 1, n - 1) * r[i - 1] for i in range(n, N + 1)) / math.comb(N, n)


def _bon_off_by_one(rewards, n):
    r = sorted(float(x) for x in rewards)
    return sum(math.comb(i, n - 1) * r[i - 1] for i in range(n, len(r) + 1)) / math.comb(len(r), n)


def _bon_unsorted(rewards, n):
    r = [float(x) for x in rewards]
    return sum(math.comb(i - 1, n - 1) * r[i - 1] for i in range(n, len(r) + 1)) / math.comb(len(r), n)


BON_MISTAKES = [
    Mistake("that is the best of all N samples, not of n: it overestimates what best-of-n gets (a larger n "
            "always finds a better answer).", lambda r, n: float(max(r))),
    Mistake("only the first n samples are used: their maximum is one draw of best-of-n, unbiased but noisy; "
            "average the maximum over every subset of n of the N samples.", lambda r, n: float(max(r[:n]))),
    Mistake("the rewards must be sorted first: the i-th smallest reward is the maximum of C(i-1, n-1) subsets.",
            _bon_unsorted),
    Mistake("off by one in the weights: the i-th smallest of N rewards (i from 1) is the maximum of the subsets "
            "that hold it and n - 1 of the i - 1 smaller ones, C(i-1, n-1) of them; the weights then sum to 1.",
            _bon_off_by_one),
    Mistake("that is the mean reward (best-of-1): the maximum of n draws is larger.", lambda r, n: float(r.mean())),
]

PPO_GRADERS: dict[str, Grader] = {
    "ppo_value_loss": Grader("ppo_value_loss", reference_ppo_value_loss, _value_case,
                             ("values", "old_values", "returns", "mask", "clip_range_value"), ("loss",),
                             VALUE_MISTAKES, grads=(("loss", "values"),)),
    "whiten_advantages": Grader("whiten_advantages", reference_whiten_advantages, _whiten_case,
                                ("advantages", "mask"), ("whitened",), WHITEN_MISTAKES),
    "best_of_n_estimate": Grader("best_of_n_estimate", reference_best_of_n_estimate, _bon_case, ("rewards", "n"),
                                 ("estimate",), BON_MISTAKES, rtol=1e-6, atol=1e-8),
}


def check_ppo_value_loss(fn: Callable) -> None:
    """``fn(values, old_values, returns, mask, clip_range_value) -> loss``: four ``[B, R]`` tensors, a scalar."""
    PPO_GRADERS["ppo_value_loss"](fn)


def check_whiten_advantages(fn: Callable) -> None:
    """``fn(advantages [B, R], mask [B, R]) -> [B, R]`` whitened over the real tokens, 0 on padding."""
    PPO_GRADERS["whiten_advantages"](fn)


def check_best_of_n_estimate(fn: Callable) -> None:
    """``fn(rewards [N], n) -> float``: the unbiased estimate of the expected best-of-n reward."""
    PPO_GRADERS["best_of_n_estimate"](fn)
