"""Grader for exercise 06's ORPO loss (re-exported by :mod:`dpo_lib.course.graders`, where the check cells find it).

ORPO (Hong et al. 2024, Eqs. 6-7) needs no reference model: supervised fine-tuning on the chosen reply (its
negative log-likelihood per token) plus λ times an odds-ratio term,

    ℓ = -ℓ̄(y_w) - λ·log σ(log odds(y_w) - log odds(y_l)),   odds(y) = P/(1-P),   P = exp(ℓ̄(y)),

with ℓ̄(y) = log π_θ(y|x)/|y| the per-token mean log-prob. The learner's function is compared with
:func:`dpo_lib.losses.dpo_loss` (``loss_type="orpo"``, ``beta`` = λ), values and gradients, on six seeded cases
whose mean log-probs lie between -0.05 and -2.5 nats per token (where log(1 - P) needs no special care in float32).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from dpo_lib.course.grading_engine import Grader, Mistake
from dpo_lib.losses import dpo_loss

__all__ = ["ORPO_GRADERS", "check_orpo_loss", "reference_orpo_loss"]

# λ never 1 (a missing λ must change the result) and never the same in two cases
_LAMBDAS = (0.1, 0.5, 0.25, 2.0, 0.05, 0.8)


def _orpo_case(g: torch.Generator, k: int) -> tuple:
    """Summed log-probs of replies of 3 to 40 tokens, -0.05 to -2.5 nats per token; chosen and rejected lengths
    always differ (so swapped lengths and sums in place of means show). Case 0 has the chosen replies likelier per
    token, case 1 a single pair."""
    B = (4, 1, 7, 3, 5, 8)[k]
    n_chosen = torch.randint(3, 41, (B,), generator=g)
    n_rejected = torch.randint(3, 41, (B,), generator=g)
    n_rejected = torch.where(n_rejected == n_chosen, n_chosen + 7, n_rejected)
    per_chosen = 0.05 + (1.0 if k == 0 else 2.45) * torch.rand(B, generator=g)
    per_rejected = (1.0 if k == 0 else 0.05) + (1.5 if k == 0 else 2.45) * torch.rand(B, generator=g)
    chosen, rejected = -(n_chosen * per_chosen), -(n_rejected * per_rejected)
    return chosen.requires_grad_(), rejected.requires_grad_(), n_chosen, n_rejected, _LAMBDAS[k]


def reference_orpo_loss(policy_chosen_logps, policy_rejected_logps, chosen_num_tokens, rejected_num_tokens, lam):
    """:func:`dpo_lib.losses.dpo_loss` with ``loss_type="orpo"`` (its β is ORPO's λ): per pair
    ``-ℓ̄(y_w) - λ·log σ(log odds(y_w) - log odds(y_l))``."""
    return dpo_loss(policy_chosen_logps, policy_rejected_logps, beta=lam, loss_type="orpo",
                    chosen_num_tokens=chosen_num_tokens, rejected_num_tokens=rejected_num_tokens)[0]


def _log_odds(mean_logp: torch.Tensor) -> torch.Tensor:
    return mean_logp - torch.log1p(-torch.exp(mean_logp))


def _orpo(score: Callable = lambda pc, pr, nc, nr: (pc / nc, pr / nr),
          odds: Callable = _log_odds,
          combine: Callable = lambda nll, odds_term, lam: nll - lam * odds_term,
          nll: Callable | None = None) -> Callable:
    """An ORPO-shaped loss from its parts: the scores of the two replies, the log odds of a score, the way the NLL
    and the odds-ratio term are combined, and the NLL (default: minus the chosen score)."""
    def fn(pc, pr, nc, nr, lam):
        c, r = score(pc, pr, nc.to(pc.dtype), nr.to(pr.dtype))
        sft = -c if nll is None else nll(pc, pr, nc.to(pc.dtype), nr.to(pr.dtype))
        return combine(sft, F.logsigmoid(odds(c) - odds(r)), lam)
    return fn


ORPO_MISTAKES = [
    Mistake("the per-token means are missing: both terms are built on ℓ̄(y) = log π(y)/|y|, the summed log-prob "
            "divided by the reply's own length — the NLL is -ℓ̄(y_w) and P = exp(ℓ̄(y)) in the odds.",
            _orpo(score=lambda pc, pr, nc, nr: (pc, pr))),
    Mistake("the odds are of the probability of the whole reply, exp(summed log-prob): ORPO's P is the per-token "
            "*mean* probability, exp(log π(y)/|y|), each reply divided by its own length (otherwise every long reply "
            "has odds near 0, whatever its quality).",
            _orpo(score=lambda pc, pr, nc, nr: (pc, pr), nll=lambda pc, pr, nc, nr: -pc / nc)),
    Mistake("the NLL is the summed log-prob of the chosen reply: ORPO's supervised term is the negative "
            "log-likelihood *per token*, -log π(y_w)/|y_w| (the same mean the odds are made of).",
            _orpo(nll=lambda pc, pr, nc, nr: -pc)),
    Mistake("that is a ratio of probabilities, not of odds: log odds(y) = log P - log(1 - P), and the log(1 - P) "
            "terms are what make ORPO's ratio different from SimPO's difference of mean log-probs.",
            _orpo(odds=lambda m: m)),
    Mistake("the supervised term is missing: ORPO is the chosen reply's NLL per token *plus* λ times the "
            "odds-ratio term; without the NLL nothing trains the model to produce the chosen replies.",
            _orpo(combine=lambda nll, o, lam: -lam * o)),
    Mistake("λ weighs the wrong term: it scales the odds-ratio term, -λ·log σ(log odds ratio), and the NLL keeps "
            "weight 1.", _orpo(combine=lambda nll, o, lam: lam * nll - o)),
    Mistake("λ is missing: the odds-ratio term is weighted by λ (lam).", _orpo(combine=lambda nll, o, lam: nll - o)),
    Mistake("the sign of the odds-ratio term is wrong: the loss adds -λ·log σ(·), a positive number that shrinks as "
            "the chosen reply's odds grow.", _orpo(combine=lambda nll, o, lam: nll + lam * o)),
    Mistake("the sign of the NLL is wrong: the supervised term is -log π(y_w)/|y_w|, a positive number.",
            _orpo(combine=lambda nll, o, lam: -nll - lam * o)),
    Mistake("chosen and rejected are swapped in the odds ratio: it is odds(y_w)/odds(y_l).",
            _orpo(score=lambda pc, pr, nc, nr: (pr / nr, pc / nc), nll=lambda pc, pr, nc, nr: -pc / nc)),
    Mistake("the lengths are swapped: divide the chosen log-prob by |y_w| (chosen_num_tokens) and the rejected one "
            "by |y_l|.", _orpo(score=lambda pc, pr, nc, nr: (pc / nr, pr / nc))),
    Mistake("you returned the batch mean: return one loss per pair (shape [B]).",
            lambda *a: reference_orpo_loss(*a).mean()),
    Mistake("the loss is cut from the autograd graph (.detach(), .item(), numpy or torch.no_grad): its values are "
            "right but no gradient reaches the policy.", lambda *a: reference_orpo_loss(*a).detach()),
]


def _loss_in_graph(args, out):
    if args[0].requires_grad and not (isinstance(out[0], torch.Tensor) and out[0].requires_grad):
        return "the loss is cut from the autograd graph: don't .detach() it or go through .item()/numpy."


_ARGS = ("policy_chosen_logps", "policy_rejected_logps", "chosen_num_tokens", "rejected_num_tokens", "lam")
_GRADS = (("losses", "policy_chosen_logps"), ("losses", "policy_rejected_logps"))

ORPO_GRADERS: dict[str, Grader] = {
    "orpo_loss": Grader("orpo_loss", reference_orpo_loss, _orpo_case, _ARGS, ("losses",), ORPO_MISTAKES,
                        (_loss_in_graph,), grads=_GRADS),
}


def check_orpo_loss(fn: Callable) -> None:
    """``fn(policy_chosen_logps [B], policy_rejected_logps [B], chosen_num_tokens [B], rejected_num_tokens [B], lam)
    -> losses [B]``: ORPO (Hong et al. 2024, Eqs. 6-7); gradients compared too."""
    ORPO_GRADERS["orpo_loss"](fn)
