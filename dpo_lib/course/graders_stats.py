"""Graders for lesson 03's statistics (re-exported by :mod:`dpo_lib.course.graders`): the course's habits.

* ``heldout_accuracy``: the implicit-reward accuracy on held-out pairs **against chance** (0.5, not the 0 of
  the step-0 tie), with its standard error over pairs.
* ``paired_gain``: two arms evaluated on the same prompts (several seeds each): average the seeds per prompt,
  take the difference per prompt, then its mean and standard error over prompts.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from dpo_lib.course.grading_engine import Grader, Mistake

__all__ = ["STATS_GRADERS", "check_heldout_accuracy", "check_paired_gain", "reference_heldout_accuracy",
           "reference_paired_gain"]


def _se(x: torch.Tensor, ddof: int = 1, root: bool = True) -> float:
    n = x.numel()
    sd = math.sqrt(float(((x - x.mean()) ** 2).sum()) / (n - ddof))
    return sd / math.sqrt(n) if root else sd


# --------------------------------------------------------------------------- held-out accuracy against chance
def _accuracy_case(g: torch.Generator, k: int) -> tuple:
    """``[n]`` held-out rewards; a few exact ties; case 0 a policy that learnt something, never all ties."""
    n = (12, 25, 40, 9, 60, 17)[k]
    rejected = torch.randn(n, generator=g, dtype=torch.float64)
    chosen = rejected + 0.3 * (k % 3) + torch.randn(n, generator=g, dtype=torch.float64)
    chosen[: 1 + k % 3] = rejected[: 1 + k % 3]                        # ties rank nothing
    return chosen, rejected


def _outcomes(c, r, tie=0.0, strict=True):
    wins = (c > r) if strict else (c >= r)
    return wins.double() + tie * (c == r).double() * float(strict)


def reference_heldout_accuracy(chosen_rewards, rejected_rewards):
    """``(accuracy - 0.5, se)``: the excess over chance of the strict accuracy, and the SE of the accuracy."""
    o = _outcomes(chosen_rewards, rejected_rewards)
    return float(o.mean()) - 0.5, _se(o)


def _acc(tie=0.0, strict=True, chance=0.5, ddof=1, root=True) -> Callable:
    def fn(c, r):
        o = _outcomes(c, r, tie, strict)
        return float(o.mean()) - chance, _se(o, ddof, root)
    return fn


ACCURACY_MISTAKES = [
    Mistake("the accuracy is measured from 0: report it against chance, accuracy - 0.5 (a model that guesses gets "
            "0.5 on held-out pairs; the 0 of step 0 is only the tie of identical rewards).", _acc(chance=0.0)),
    Mistake("ties count as correct: a pair is ranked right only when chosen_reward > rejected_reward (strict).",
            _acc(strict=False)),
    Mistake("a tie counts ½ here: the accuracy is strict (a tie ranks nothing, it counts 0), as in training.",
            _acc(tie=0.5)),
    Mistake("the SE uses the population standard deviation (√(p(1-p)/n), or dividing by n): the standard "
            "error is s/√n with s the sample standard deviation of the per-pair outcomes (n - 1).", _acc(ddof=0)),
    Mistake("that is the standard deviation of one pair's outcome: the standard error of the mean divides it by "
            "√n.", _acc(root=False)),
]


# --------------------------------------------------------------------------- paired gain
def _paired_case(g: torch.Generator, k: int) -> tuple:
    """Rewards ``[prompts, seeds]`` of an arm and of the baseline on the same prompts: a shared prompt effect."""
    n, s = (8, 12, 20, 6, 15, 30)[k], (3, 2, 4, 5, 3, 2)[k]
    prompt = 2 * torch.randn(n, 1, generator=g, dtype=torch.float64)
    baseline = prompt + 0.5 * torch.randn(n, s, generator=g, dtype=torch.float64)
    arm = prompt + 0.2 * (k % 3) + 0.5 * torch.randn(n, s, generator=g, dtype=torch.float64)
    return arm, baseline


def reference_paired_gain(arm_rewards, baseline_rewards):
    """``(gain, se)``: mean over prompts of (arm - baseline), seeds averaged per prompt first; SE over prompts."""
    d = arm_rewards.mean(1) - baseline_rewards.mean(1)              # [prompts]
    return float(d.mean()), _se(d)


def _gain(per_prompt: bool = True, sign: float = 1.0, ddof: int = 1, root: bool = True) -> Callable:
    def fn(a, b):
        d = sign * ((a.mean(1) - b.mean(1)) if per_prompt else (a - b).reshape(-1))
        return float(d.mean()), _se(d, ddof, root)
    return fn


def _independent(a, b):
    return float(a.mean() - b.mean()), math.sqrt(_se(a.mean(1)) ** 2 + _se(b.mean(1)) ** 2)


PAIRED_MISTAKES = [
    Mistake("the two SEs are combined as if the arms were independent (√(se_a² + se_b²)): both arms answered the "
            "same prompts, so take the difference per prompt first and its SE; the prompt-to-prompt spread "
            "cancels in the difference.", _independent),
    Mistake("the SE treats every (prompt, seed) as independent: seeds of one prompt share that prompt, so average "
            "the seeds per prompt first, then take the SE over the prompts.", _gain(per_prompt=False)),
    Mistake("the gain has the wrong sign: arm minus baseline.", _gain(sign=-1.0)),
    Mistake("the SE uses the population standard deviation: divide by n - 1 (the sample standard deviation of "
            "the per-prompt differences), then by √n.", _gain(ddof=0)),
    Mistake("that is the standard deviation of one prompt's difference: the standard error divides it by √n.",
            _gain(root=False)),
]

STATS_GRADERS: dict[str, Grader] = {
    "heldout_accuracy": Grader("heldout_accuracy", reference_heldout_accuracy, _accuracy_case,
                               ("chosen_rewards", "rejected_rewards"), ("over_chance", "se"), ACCURACY_MISTAKES),
    "paired_gain": Grader("paired_gain", reference_paired_gain, _paired_case, ("arm_rewards", "baseline_rewards"),
                          ("gain", "se"), PAIRED_MISTAKES),
}


def check_heldout_accuracy(fn: Callable) -> None:
    """``fn(chosen_rewards [n], rejected_rewards [n]) -> (accuracy - 0.5, se)`` as floats."""
    STATS_GRADERS["heldout_accuracy"](fn)


def check_paired_gain(fn: Callable) -> None:
    """``fn(arm_rewards [prompts, seeds], baseline_rewards [prompts, seeds]) -> (gain, se)`` as floats."""
    STATS_GRADERS["paired_gain"](fn)
