"""Graders for lesson 06's fixes of overfitting and label noise (re-exported by :mod:`dpo_lib.course.graders`).

* ``ipo_loss``: IPO (Azar et al. 2023, Eq. 17) pulls the margin h to the target 1/(2β) instead of pushing it to
  infinity (lesson 06, the deterministic-preference bandit).
* ``robust_dpo_loss``: rDPO (Chowdhury et al. 2024, Eq. 8), an unbiased estimate of the clean DPO loss when labels
  are flipped with probability ε; conservative DPO (cDPO), the other label-noise loss, is its classic mix-up.
Both compare their gradient with respect to the policy's log-probs too.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from dpo_lib.course.grading_engine import BETAS, Grader, Mistake
from dpo_lib.losses import dpo_loss

__all__ = ["NOISE_GRADERS", "check_ipo_loss", "check_robust_dpo_loss", "reference_ipo_loss",
           "reference_robust_dpo_loss"]

_LOGPS = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps", "beta")
_GRADS = (("losses", "policy_chosen_logps"), ("losses", "policy_rejected_logps"))
_EPS = (0.1, 0.25, 0.05, 0.4, 0.2, 0.3)


def _logp_case(g: torch.Generator, k: int) -> tuple:
    """Summed log-probs of a batch of pairs; case 0 is step 0 (policy == reference)."""
    B = (4, 1, 7, 3, 5, 8)[k % 6]
    pc, pr = -(1 + 30 * torch.rand(B, generator=g)), -(1 + 30 * torch.rand(B, generator=g))
    rc = pc + (0 if k == 0 else 3 * torch.randn(B, generator=g))
    rr = pr + (0 if k == 0 else 3 * torch.randn(B, generator=g))
    return pc.requires_grad_(), pr.requires_grad_(), rc, rr, BETAS[k % len(BETAS)]


def _h(pc, pr, rc, rr):
    return (pc - rc) - (pr - rr)


def _loss_in_graph(args, out):
    if args[0].requires_grad and not out[0].requires_grad:
        return "the loss is cut from the autograd graph: don't .detach() it or go through .item()/numpy."


def reference_ipo_loss(pc, pr, rc, rr, beta):
    """IPO (Azar et al. 2023, Eq. 17, τ = β) per example: ``(h - 1/(2β))**2``."""
    return dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo")[0]


IPO_MISTAKES = [
    Mistake("the target margin is 1/(2β), not 1/β.", lambda pc, pr, rc, rr, b: (_h(pc, pr, rc, rr) - 1 / b) ** 2),
    Mistake("the target margin is 1/(2β) (the 1/(2τ) of the paper), not β/2.",
            lambda pc, pr, rc, rr, b: (_h(pc, pr, rc, rr) - b / 2) ** 2),
    Mistake("in IPO, h is not multiplied by β: the loss is (h - 1/(2β))², β only sets the target.",
            lambda pc, pr, rc, rr, b: (b * _h(pc, pr, rc, rr) - 1 / (2 * b)) ** 2),
    Mistake("chosen and rejected are swapped (or h has the wrong sign).",
            lambda pc, pr, rc, rr, b: (-_h(pc, pr, rc, rr) - 1 / (2 * b)) ** 2),
    Mistake("the square is missing: IPO is a squared loss, (h - 1/(2β))².",
            lambda pc, pr, rc, rr, b: _h(pc, pr, rc, rr) - 1 / (2 * b)),
    Mistake("you returned the batch mean: return one loss per example (shape [B]).",
            lambda *a: reference_ipo_loss(*a).mean()),
    Mistake("the reference log-probs are missing: h uses log π_θ(y) - log π_ref(y) for both responses.",
            lambda pc, pr, rc, rr, b: (pc - pr - 1 / (2 * b)) ** 2),
    Mistake("the loss is cut from the autograd graph (.detach(), .item(), numpy or torch.no_grad): its values are "
            "right but no gradient reaches the policy.", lambda *a: reference_ipo_loss(*a).detach()),
]


def _noise_case(g: torch.Generator, k: int) -> tuple:
    return (*_logp_case(g, k), _EPS[k])


def reference_robust_dpo_loss(pc, pr, rc, rr, beta, eps):
    """rDPO per pair: ``((1-ε)·ℓ(h) - ε·ℓ(-h)) / (1-2ε)`` with ``ℓ(h) = -log σ(βh)``."""
    return dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="robust", label_smoothing=eps)[0]


def _robust(mix: Callable, scale: Callable = lambda b: b) -> Callable:
    def fn(pc, pr, rc, rr, b, eps):
        z = scale(b) * _h(pc, pr, rc, rr)
        return mix(-F.logsigmoid(z), -F.logsigmoid(-z), eps)
    return fn


ROBUST_MISTAKES = [
    Mistake("that is conservative DPO (cDPO): (1-ε)·ℓ(h) + ε·ℓ(-h) smooths the labels and stops the margin at a "
            "finite value. rDPO *subtracts* the flipped term and divides by 1-2ε, so that its expectation over "
            "the label flips is the clean loss.", _robust(lambda lw, ll, e: (1 - e) * lw + e * ll)),
    Mistake("the division by 1-2ε is missing: without it the expectation over the flips is the clean loss times "
            "(1-2ε), not the clean loss.", _robust(lambda lw, ll, e: (1 - e) * lw - e * ll)),
    Mistake("ε and 1-ε are swapped: the observed label is right with probability 1-ε, so ℓ(h) gets the weight "
            "1-ε.", _robust(lambda lw, ll, e: (e * lw - (1 - e) * ll) / (1 - 2 * e))),
    Mistake("β is missing: ℓ(h) = -log σ(β·h), in both terms.",
            _robust(lambda lw, ll, e: ((1 - e) * lw - e * ll) / (1 - 2 * e), scale=lambda b: 1.0)),
    Mistake("the flipped term is the loss of the swapped pair, ℓ(-h) = -log σ(-β·h), not ℓ(h) again.",
            _robust(lambda lw, ll, e: ((1 - e) * lw - e * lw) / (1 - 2 * e))),
    Mistake("the loss is cut from the autograd graph (.detach(), .item(), numpy or torch.no_grad): its values are "
            "right but no gradient reaches the policy.", lambda *a: reference_robust_dpo_loss(*a).detach()),
]

NOISE_GRADERS: dict[str, Grader] = {
    "ipo_loss": Grader("ipo_loss", reference_ipo_loss, _logp_case, _LOGPS, ("losses",), IPO_MISTAKES,
                       (_loss_in_graph,), grads=_GRADS),
    "robust_dpo_loss": Grader("robust_dpo_loss", reference_robust_dpo_loss, _noise_case, (*_LOGPS, "eps"),
                              ("losses",), ROBUST_MISTAKES, (_loss_in_graph,), grads=_GRADS),
}


def check_ipo_loss(fn: Callable) -> None:
    """``fn(pc, pr, rc, rr, beta) -> [B]`` per-pair IPO losses ``(h - 1/(2β))²``."""
    NOISE_GRADERS["ipo_loss"](fn)


def check_robust_dpo_loss(fn: Callable) -> None:
    """``fn(pc, pr, rc, rr, beta, eps) -> [B]`` per-pair rDPO losses for label-flip rate ``eps``."""
    NOISE_GRADERS["robust_dpo_loss"](fn)
