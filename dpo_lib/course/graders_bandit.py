"""Graders for lesson 01's bandit beyond the loss (re-exported by :mod:`dpo_lib.course.graders`).

β's direction: the KL from the optimal policy π* ∝ π_ref·exp(r/β) to the reference falls as β grows. The
learner computes that KL; the classic mistakes (β backwards, the KL the wrong way round, π_ref or log Z
dropped, bits instead of nats) each give their own numbers, and the β sweep of the notebook then shows the
direction with the learner's own function.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from dpo_lib.course.grading_engine import BETAS, Grader, Mistake

__all__ = ["BANDIT_GRADERS", "check_optimal_kl", "reference_optimal_kl"]


def _kl_case(g: torch.Generator, k: int) -> tuple:
    """float64 bandits of 3 to 7 arms; β from :data:`BETAS` (never 1, so a missing β shows)."""
    K = 3 + k % 5
    ref = torch.softmax(torch.randn(K, generator=g, dtype=torch.float64), -1)
    rewards = torch.randn(K, generator=g, dtype=torch.float64)
    return ref, rewards, BETAS[k % len(BETAS)]


def _log_pi_star(ref_probs, rewards, scale):
    return torch.log_softmax(torch.log(ref_probs) + rewards * scale, -1)


def reference_optimal_kl(ref_probs, rewards, beta):
    """KL(π* ‖ π_ref) in nats, with π* ∝ π_ref·exp(r/β) (lesson 01, Eq. 4)."""
    log_p = _log_pi_star(ref_probs, rewards, 1 / beta)
    return (log_p.exp() * (log_p - torch.log(ref_probs))).sum()


def _kl(scale: Callable = lambda b: 1 / b, reverse: bool = False, with_ref: bool = True, unit: float = 1.0):
    def fn(ref_probs, rewards, beta):
        log_q = torch.log(ref_probs)
        log_p = torch.log_softmax((log_q if with_ref else 0) + rewards * scale(beta), -1)
        if reverse:
            log_p, log_q = log_q, log_p
        return (log_p.exp() * (log_p - log_q)).sum() / unit
    return fn


def _kl_without_log_z(ref_probs, rewards, beta):
    p = _log_pi_star(ref_probs, rewards, 1 / beta).exp()
    return (p * rewards).sum() / beta


OPTIMAL_KL_MISTAKES = [
    Mistake("β is backwards: π* ∝ π_ref·exp(r/β), so the reward is divided by β. With exp(β·r) a larger β would "
            "move the policy further from the reference; it is the other way round: β is the price of the KL, "
            "and a higher β keeps π* closer to π_ref.", _kl(scale=lambda b: b)),
    Mistake("β is missing: π* ∝ π_ref·exp(r/β).", _kl(scale=lambda b: 1.0)),
    Mistake("the KL is the wrong way round: KL(π*‖π_ref) = Σ π*(y)·log(π*(y)/π_ref(y)), weighted by π*, the "
            "policy that is sampled; you computed KL(π_ref‖π*).", _kl(reverse=True)),
    Mistake("π_ref is missing from π*: π* ∝ π_ref·exp(r/β), not softmax(r/β).", _kl(with_ref=False)),
    Mistake("the log-normaliser is missing: log(π*/π_ref) = r/β - log Z, so KL = E_π*[r]/β - log Z.",
            _kl_without_log_z),
    Mistake("the KL is in bits (log2): measure it in nats, with the natural log.", _kl(unit=math.log(2))),
]

BANDIT_GRADERS: dict[str, Grader] = {
    "optimal_kl": Grader("optimal_kl", reference_optimal_kl, _kl_case, ("ref_probs", "rewards", "beta"), ("kl",),
                         OPTIMAL_KL_MISTAKES),
}


def check_optimal_kl(fn: Callable) -> None:
    """``fn(ref_probs [K], rewards [K], beta) -> KL(π* ‖ π_ref)`` in nats (a float or a 0-d tensor)."""
    BANDIT_GRADERS["optimal_kl"](fn)
