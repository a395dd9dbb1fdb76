"""Graders for exercises 06 (when DPO goes wrong: other losses, noisy labels); re-exported by
:mod:`dpo_lib.course.graders`, where the check cells find them.

The two losses are compared with the library's own (:func:`dpo_lib.losses.dpo_loss` with
``loss_type="simpo"`` and ``"dpop"``), values and gradients, on six seeded cases. Flipping labels is
run on small datasets of text rows through a harness that turns the returned rows into the ids of
their texts (so a row whose chosen and rejected are the same text shows up) and also reports whether
the learner's function changed its input in place. The clean-label accuracy is compared with its
closed form.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F

from dpo_lib.course.failures import clean_accuracy, flip_labels
from dpo_lib.course.grading_engine import Grader, GradingError, HarnessGrader, Mistake
from dpo_lib.losses import dpo_loss

__all__ = [
    "VARIANT_GRADERS", "check_simpo_loss", "check_dpop_loss", "check_flip_labels", "check_clean_accuracy",
    "reference_simpo_loss", "reference_dpop_loss",
]

# SimPO's β is a reward scale (the authors use 2 to 10), never 1; γ never 0 and never equal to β
_SIMPO_BETAS = (2.0, 2.5, 0.5, 10.0, 3.0, 0.3)
_SIMPO_GAMMAS = (0.5, 1.4, 0.3, 2.0, 0.8, 0.25)
_DPOP_BETAS = (0.1, 0.5, 0.05, 0.3, 2.0, 0.2)
_DPOP_LAMBDAS = (50.0, 5.0, 2.0, 20.0, 0.5, 10.0)


# --------------------------------------------------------------------------- 06: SimPO
def _simpo_case(g: torch.Generator, k: int) -> tuple:
    """Summed log-probs of answers of 3 to 40 tokens; chosen and rejected lengths always differ."""
    B = (4, 1, 7, 3, 5, 8)[k]
    n_chosen = torch.randint(3, 41, (B,), generator=g)
    n_rejected = torch.randint(3, 41, (B,), generator=g)
    n_rejected = torch.where(n_rejected == n_chosen, n_chosen + 5, n_rejected)
    chosen = -(n_chosen * (0.3 + 2 * torch.rand(B, generator=g)))      # about -0.3 to -2.3 nats per token
    rejected = -(n_rejected * (0.3 + 2 * torch.rand(B, generator=g)))
    return (chosen.requires_grad_(), rejected.requires_grad_(), n_chosen, n_rejected, _SIMPO_BETAS[k],
            _SIMPO_GAMMAS[k])


def reference_simpo_loss(policy_chosen_logps, policy_rejected_logps, chosen_num_tokens, rejected_num_tokens,
                         beta, gamma):
    """:func:`dpo_lib.losses.dpo_loss` with ``loss_type="simpo"``: per pair
    ``-log σ(β/|y_w|·log π(y_w) - β/|y_l|·log π(y_l) - γ)``."""
    return dpo_loss(policy_chosen_logps, policy_rejected_logps, beta=beta, loss_type="simpo",
                    chosen_num_tokens=chosen_num_tokens, rejected_num_tokens=rejected_num_tokens,
                    simpo_gamma=gamma)[0]


def _simpo(logit: Callable, outer: Callable = lambda z: -F.logsigmoid(z)) -> Callable:
    def fn(pc, pr, nc, nr, b, gm):
        return outer(logit(pc, pr, nc.to(pc.dtype), nr.to(pr.dtype), b, gm))
    return fn


SIMPO_MISTAKES = [
    Mistake("the length normalisation is missing: SimPO scores an answer by its mean log-prob per token, "
            "log π(y)/|y|, not by the summed log-prob (otherwise a long answer is penalised for its length).",
            _simpo(lambda pc, pr, nc, nr, b, gm: b * (pc - pr) - gm)),
    Mistake("the lengths are swapped: divide the chosen log-prob by |y_w| (chosen_num_tokens) and the rejected "
            "one by |y_l|.", _simpo(lambda pc, pr, nc, nr, b, gm: b * (pc / nr - pr / nc) - gm)),
    Mistake("the sign of γ is wrong: γ is a target margin, subtracted from the reward difference "
            "(-log σ(β·Δ - γ)), so the chosen answer must win by γ before the loss gets small.",
            _simpo(lambda pc, pr, nc, nr, b, gm: b * (pc / nc - pr / nr) + gm)),
    Mistake("γ is missing: SimPO's logit is β·(mean log-prob of y_w - mean log-prob of y_l) - γ.",
            _simpo(lambda pc, pr, nc, nr, b, gm: b * (pc / nc - pr / nr))),
    Mistake("γ is multiplied by β: the margin is subtracted after the scaling, β·Δ - γ, not β·(Δ - γ).",
            _simpo(lambda pc, pr, nc, nr, b, gm: b * (pc / nc - pr / nr - gm))),
    Mistake("β is missing: the rewards are β times the mean log-probs, β·log π(y)/|y|.",
            _simpo(lambda pc, pr, nc, nr, b, gm: pc / nc - pr / nr - gm)),
    Mistake("chosen and rejected are swapped (or the reward difference has the wrong sign).",
            _simpo(lambda pc, pr, nc, nr, b, gm: b * (pr / nr - pc / nc) - gm)),
    Mistake("the minus sign is missing: the loss is -log σ(z), a positive number.",
            _simpo(lambda pc, pr, nc, nr, b, gm: b * (pc / nc - pr / nr) - gm, outer=F.logsigmoid)),
    Mistake("you returned the batch mean: return one loss per pair (shape [B]).",
            lambda *a: reference_simpo_loss(*a).mean()),
    Mistake("the loss is cut from the autograd graph (.detach(), .item(), numpy or torch.no_grad): its values "
            "are right but no gradient reaches the policy.", lambda *a: reference_simpo_loss(*a).detach()),
]


# --------------------------------------------------------------------------- 06: DPOP
def _dpop_case(g: torch.Generator, k: int) -> tuple:
    """Summed log-probs; the chosen reply is below the reference in some pairs and above it in others.
    No chosen log-ratio is exactly 0: at the kink of max(0, ·), relu, clamp and maximum have different
    gradients, all of them right. Case 0 is close to step 0: the rejected replies are at the reference and
    the chosen ones 0.5 nat above or below it."""
    B = (4, 3, 7, 5, 6, 8)[k]
    rc = -(5 + 30 * torch.rand(B, generator=g))
    rr = -(5 + 30 * torch.rand(B, generator=g))
    if k == 0:
        pc, pr = rc + 0.5 * torch.tensor([-1.0, 1.0]).repeat(B // 2), rr.clone()
    else:
        pc = rc + 2 * torch.randn(B, generator=g)
        pr = rr + 2 * torch.randn(B, generator=g)
        pc[0], pc[1] = rc[0] - 1.5, rc[1] + 1.5       # one pair below the reference, one above
        pr[0] = rr[0] - 4.0                             # DPO's way out: the chosen falls, the rejected faster
    return pc.requires_grad_(), pr.requires_grad_(), rc, rr, _DPOP_BETAS[k], _DPOP_LAMBDAS[k]


def reference_dpop_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
                        lam):
    """:func:`dpo_lib.losses.dpo_loss` with ``loss_type="dpop"``: per pair
    ``-log σ(β·(h - λ·max(0, log π_ref(y_w) - log π(y_w))))``."""
    return dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=beta,
                    loss_type="dpop", dpop_lambda=lam)[0]


def _hh(pc, pr, rc, rr):
    return (pc - rc) - (pr - rr)


def _dpop(penalty: Callable, combine: Callable | None = None) -> Callable:
    def fn(pc, pr, rc, rr, b, lam):
        p = penalty(pc, pr, rc, rr)
        if combine is not None:
            return combine(_hh(pc, pr, rc, rr), p, b, lam)
        return -F.logsigmoid(b * (_hh(pc, pr, rc, rr) - lam * p))
    return fn


DPOP_MISTAKES = [
    Mistake("the max(0, ·) is on the wrong log-ratio: the penalty is max(0, log π_ref(y_w) - log π_θ(y_w)), "
            "reference minus policy, so it bites when the chosen reply falls *below* the reference (yours "
            "penalises a chosen reply that rises above it).",
            _dpop(lambda pc, pr, rc, rr: torch.relu(pc - rc))),
    Mistake("the penalty is on the rejected reply: DPOP guards the *chosen* one, "
            "max(0, log π_ref(y_w) - log π_θ(y_w)); the rejected reply may fall as far as it likes.",
            _dpop(lambda pc, pr, rc, rr: torch.relu(rr - pr))),
    Mistake("the max(0, ·) is missing: without it a chosen reply above the reference earns a bonus of "
            "λ per nat, and the loss rewards moving away from the reference.",
            _dpop(lambda pc, pr, rc, rr: rc - pc)),
    Mistake("the penalty is added with the wrong sign: subtract λ·max(0, ·) from h inside the sigmoid, so a "
            "falling chosen reply raises the loss.",
            _dpop(lambda pc, pr, rc, rr: torch.relu(rc - pc), lambda h, p, b, lam: -F.logsigmoid(b * (h + lam * p)))),
    Mistake("the penalty is outside the sigmoid: DPOP puts it inside the logit, -log σ(β·(h - λ·max(0, ·))), "
            "not -log σ(β·h) + λ·max(0, ·).",
            _dpop(lambda pc, pr, rc, rr: torch.relu(rc - pc), lambda h, p, b, lam: -F.logsigmoid(b * h) + lam * p)),
    Mistake("the penalty is not scaled by β: it sits inside the bracket, β·(h - λ·max(0, ·)), not β·h - λ·max(0, ·).",
            _dpop(lambda pc, pr, rc, rr: torch.relu(rc - pc), lambda h, p, b, lam: -F.logsigmoid(b * h - lam * p))),
    Mistake("λ (lam) is missing from the penalty: -log σ(β·(h - λ·max(0, ·))).",
            _dpop(lambda pc, pr, rc, rr: torch.relu(rc - pc), lambda h, p, b, lam: -F.logsigmoid(b * (h - p)))),
    Mistake("the penalty is missing: this is plain DPO, -log σ(β·h).",
            _dpop(lambda pc, pr, rc, rr: torch.zeros_like(pc))),
    Mistake("you returned the batch mean: return one loss per pair (shape [B]).",
            lambda *a: reference_dpop_loss(*a).mean()),
    Mistake("the penalty is detached: its values are right, but the gradient of λ·max(0, ·) must reach "
            "policy_chosen_logps, or training never pulls a falling chosen reply back up.",
            _dpop(lambda pc, pr, rc, rr: torch.relu(rc - pc).detach())),
]


# --------------------------------------------------------------------------- 06: flipping labels
_TOPICS = ["the film", "the hotel", "the book", "the phone", "the cafe", "the game", "the album", "the bus ride",
           "the museum", "the concert"]


def _flip_case(g: torch.Generator, k: int) -> tuple:
    """``n`` text rows and a flip mask (a list of bools) with at least one flipped and one kept row."""
    n = (4, 6, 3, 8, 5, 10)[k]
    rows = [{"prompt": f"Write a review of {_TOPICS[i]}.", "chosen": f"I loved {_TOPICS[i]}: {k}.",
             "rejected": f"I hated {_TOPICS[i]}: {k}."} for i in range(n)]
    flip = (torch.rand(n, generator=g) < 0.4).tolist()
    flip[0], flip[-1] = True, False
    return rows, flip


reference_flip_labels = flip_labels  # lesson 06's own, dpo_lib.course.failures


def _run_flip(fn: Callable, rows, flip):
    """The returned rows as ids ``[n, 3]`` of their (prompt, chosen, rejected) texts, and 1.0 when the
    input rows came back unchanged (0.0 when the function edited them in place)."""
    before = copy.deepcopy(rows)
    out = fn(rows, flip)
    if out is None:
        return None, None
    texts = {t: i for i, t in enumerate(dict.fromkeys(r[f] for r in before for f in ("prompt", "chosen",
                                                                                       "rejected")))}
    try:
        ids = torch.tensor([[texts.get(r[f], -1) for f in ("prompt", "chosen", "rejected")] for r in out],
                           dtype=torch.long).reshape(-1, 3)
    except (TypeError, KeyError) as e:
        raise GradingError(f"✗ flip_labels: return a list of rows (dicts with prompt, chosen and rejected); "
                             f"got {type(out).__name__} ({e!r})") from None
    return ids, float(rows == before)


def _swap_in_place_naively(rows, flip):
    for r, f in zip(rows, flip):
        if f:
            r["chosen"] = r["rejected"]
            r["rejected"] = r["chosen"]
    return rows


def _swap_in_place(rows, flip):
    for r, f in zip(rows, flip):
        if f:
            r["chosen"], r["rejected"] = r["rejected"], r["chosen"]
    return rows


FLIP_MISTAKES = [
    Mistake("only one field is swapped: a flipped row must get the old rejected as chosen *and* the old chosen as "
            "rejected. Your flipped rows have the same text on both sides (after r['chosen'] = r['rejected'] the "
            "old chosen is gone: swap both at once, or read both before writing).",
            lambda rows, flip: [{**r, "chosen": r["rejected"]} if f else dict(r) for r, f in zip(rows, flip)]),
    Mistake("only one field is swapped, and in place: after r['chosen'] = r['rejected'] the old chosen is "
            "gone, so r['rejected'] = r['chosen'] copies the rejected text back. Build a new row with both "
            "fields swapped at once.", _swap_in_place_naively),
    Mistake("you changed the input rows in place: build new dicts ({**row, ...}) and leave `rows` as it was. "
            "The clean labels are what you measure the trained model against, so the clean dataset must stay "
            "clean.", _swap_in_place),
    Mistake("the mask is inverted: swap the rows where flip[i] is True and keep the others.",
            lambda rows, flip: reference_flip_labels(rows, [not f for f in flip])),
    Mistake("every row is swapped: only the rows where flip[i] is True get their labels flipped.",
            lambda rows, flip: reference_flip_labels(rows, [True] * len(rows))),
    Mistake("the kept rows are missing: return every row, the flipped ones swapped and the others unchanged "
            "(the noisy dataset has as many pairs as the clean one).",
            lambda rows, flip: [r for r, f in zip(reference_flip_labels(rows, flip), flip) if f]),
    Mistake("the prompts were swapped too (or moved between rows): a flipped row keeps its own prompt; only "
            "chosen and rejected trade places.",
            lambda rows, flip: [{**r, "prompt": rows[(i + 1) % len(rows)]["prompt"]} if f else dict(r)
                                for i, (r, f) in enumerate(zip(reference_flip_labels(rows, flip), flip))]),
]


# --------------------------------------------------------------------------- 06: accuracy on the clean labels
def _clean_case(g: torch.Generator, k: int) -> tuple:
    """Implicit rewards of the noisy dataset's rows and its flip mask; a few exact ties; case 0 is step 0
    (every reward 0: accuracy 0)."""
    B = (6, 9, 12, 5, 16, 10)[k]
    flipped = torch.rand(B, generator=g) < 0.3
    flipped[0], flipped[-1] = True, False
    if k == 0:
        return torch.zeros(B), torch.zeros(B), flipped
    chosen = torch.randn(B, generator=g)
    rejected = torch.randn(B, generator=g)
    rejected[1: 2 + k % 2] = chosen[1: 2 + k % 2]    # ties
    return chosen, rejected, flipped


reference_clean_accuracy = clean_accuracy  # dpo_lib.course.failures


CLEAN_ACCURACY_MISTAKES = [
    Mistake("that is the accuracy on the noisy labels (what the training set says): on a flipped row the "
            "noisy chosen is the clean rejected, so a pair is right there when rejected_reward > chosen_reward.",
            lambda c, r, f: (c > r).float().mean().item()),
    Mistake("the flip mask is inverted: un-flip the rows where flipped is True.",
            lambda c, r, f: reference_clean_accuracy(c, r, ~f)),
    Mistake("the flipped pairs are dropped: measure every pair against its clean label (un-flip them), not "
            "only the pairs whose labels were never flipped.",
            lambda c, r, f: (c[~f] > r[~f]).float().mean().item()),
    Mistake("ties count as correct: use a strict > on both kinds of rows (at step 0 every reward is 0 and the "
            "accuracy is 0).", lambda c, r, f: torch.where(f, r >= c, c >= r).float().mean().item()),
    Mistake("a tie counts as correct on the flipped rows: ~(c > r) is c <= r, not c < r. Compare "
            "rejected_reward > chosen_reward there.", lambda c, r, f: torch.where(f, ~(c > r), c > r).float()
            .mean().item()),
    Mistake("you returned a count: return the fraction of pairs ranked correctly.",
            lambda c, r, f: torch.where(f, r > c, c > r).float().sum().item()),
]


# --------------------------------------------------------------------------- the graders
def _loss_in_graph(args, out):
    if args[0].requires_grad and not (isinstance(out[0], torch.Tensor) and out[0].requires_grad):
        return "the loss is cut from the autograd graph: don't .detach() it or go through .item()/numpy."


_SIMPO_ARGS = ("policy_chosen_logps", "policy_rejected_logps", "chosen_num_tokens", "rejected_num_tokens", "beta",
               "gamma")
_DPOP_ARGS = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps", "beta", "lam")
_GRADS = (("losses", "policy_chosen_logps"), ("losses", "policy_rejected_logps"))

VARIANT_GRADERS: dict[str, Grader] = {g.name: g for g in [
    Grader("simpo_loss", reference_simpo_loss, _simpo_case, _SIMPO_ARGS, ("losses",), SIMPO_MISTAKES,
           (_loss_in_graph,), grads=_GRADS),
    Grader("dpop_loss", reference_dpop_loss, _dpop_case, _DPOP_ARGS, ("losses",), DPOP_MISTAKES,
           (_loss_in_graph,), grads=_GRADS),
    HarnessGrader("flip_labels", reference_flip_labels, _flip_case, ("rows", "flip"), ("rows", "input_unchanged"),
                  FLIP_MISTAKES, run=_run_flip),
    Grader("clean_accuracy", reference_clean_accuracy, _clean_case, ("chosen_rewards", "rejected_rewards",
                                                                     "flipped"), ("accuracy",),
           CLEAN_ACCURACY_MISTAKES),
]}


def check_simpo_loss(fn: Callable) -> None:
    """``fn(policy_chosen_logps [B], policy_rejected_logps [B], chosen_num_tokens [B], rejected_num_tokens [B],
    beta, gamma) -> losses [B]``: SimPO (Meng et al. 2024, Eq. 6); gradients compared too."""
    VARIANT_GRADERS["simpo_loss"](fn)


def check_dpop_loss(fn: Callable) -> None:
    """``fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, lam)
    -> losses [B]``: DPO-Positive (Pal et al. 2024, Eq. 3); gradients compared too."""
    VARIANT_GRADERS["dpop_loss"](fn)


def check_flip_labels(fn: Callable) -> None:
    """``fn(rows, flip) -> new rows``: chosen and rejected swapped where ``flip[i]``; ``rows`` left unchanged."""
    VARIANT_GRADERS["flip_labels"](fn)


def check_clean_accuracy(fn: Callable) -> None:
    """``fn(chosen_rewards [B], rejected_rewards [B], flipped [B] bool) -> float``: accuracy on the clean labels."""
    VARIANT_GRADERS["clean_accuracy"](fn)
