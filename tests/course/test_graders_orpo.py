"""The grader of exercise 06's ORPO loss, fed the way a learner writes it: correct answers written differently pass,
and wrong answers written out here (not taken from the grader's own list) fail with the hint that names the mistake.
``tests/course/test_graders.py`` also runs the reference and every listed mistake."""

import pytest
import torch
import torch.nn.functional as F

from dpo_lib.course import graders as grading
from dpo_lib.course.graders_orpo import ORPO_GRADERS, _orpo_case


def _passes(fn, capsys):
    grading.check_orpo_loss(fn)
    assert capsys.readouterr().out == "✓ orpo_loss: 6/6 cases match\n"


def _fails(fn, *words):
    with pytest.raises(AssertionError) as err:
        grading.check_orpo_loss(fn)
    message = str(err.value)
    assert message.startswith("✗ orpo_loss:"), message
    for w in words:
        assert w in message, message
    return message


def _means(pc, pr, nc, nr):
    return pc / nc, pr / nr


def orpo_by_odds(pc, pr, nc, nr, lam):
    """Odds written out as P / (1 - P), then their log."""
    c, r = _means(pc, pr, nc, nr)
    odds_c, odds_r = torch.exp(c) / (1 - torch.exp(c)), torch.exp(r) / (1 - torch.exp(r))
    return -c - lam * F.logsigmoid(torch.log(odds_c / odds_r))


def orpo_stable(pc, pr, nc, nr, lam):
    """log(1 - P) as log(-expm1(log P)), the ratio through a softplus."""
    c, r = _means(pc, pr, nc, nr)
    log_or = (c - torch.log(-torch.expm1(c))) - (r - torch.log(-torch.expm1(r)))
    return -c + lam * F.softplus(-log_or)


def orpo_by_loop(pc, pr, nc, nr, lam):
    """One pair at a time, with math-like torch scalars, stacked."""
    out = []
    for i in range(len(pc)):
        c, r = pc[i] / nc[i], pr[i] / nr[i]
        log_odds = lambda m: torch.log(torch.exp(m)) - torch.log1p(-torch.exp(m))  # noqa: E731
        out.append(-c - lam * torch.log(torch.sigmoid(log_odds(c) - log_odds(r))))
    return torch.stack(out)


@pytest.mark.parametrize("fn", [orpo_by_odds, orpo_stable, orpo_by_loop], ids=lambda f: f.__name__)
def test_correct_answers_written_differently_pass(fn, capsys):
    _passes(fn, capsys)


def test_the_cases_are_where_a_learner_needs_no_special_numerics():
    """Mean log-probs of -0.05 to -2.5 nats per token, lengths that always differ, λ never 1 and never repeated."""
    g = torch.Generator().manual_seed(0)
    cases = [_orpo_case(g, k) for k in range(6)]
    for pc, pr, nc, nr, lam in cases:
        for logps, n in ((pc, nc), (pr, nr)):
            means = logps.detach() / n
            assert (means <= -0.05 + 1e-6).all() and (means >= -2.5 - 1e-6).all()
        assert (nc != nr).all() and lam != 1.0
    assert len({c[-1] for c in cases}) == 6


# ------------------------------------------------------------------ the typical mistakes, each with its own hint

def test_sums_in_place_of_means_everywhere():
    lo = lambda m: m - torch.log1p(-torch.exp(m))  # noqa: E731
    _fails(lambda pc, pr, nc, nr, lam: -pc - lam * F.logsigmoid(lo(pc) - lo(pr)), "per-token means are missing")


def test_odds_of_the_whole_reply():
    def whole_reply_odds(pc, pr, nc, nr, lam):
        odds = lambda logp: torch.exp(logp) / (1 - torch.exp(logp))  # noqa: E731
        return -pc / nc - lam * F.logsigmoid(torch.log(odds(pc)) - torch.log(odds(pr)))

    _fails(whole_reply_odds, "probability of the whole reply")


def test_summed_nll():
    def summed_nll(pc, pr, nc, nr, lam):
        return orpo_by_odds(pc, pr, nc, nr, lam) + pc / nc - pc

    _fails(summed_nll, "the NLL is the summed log-prob", "*per token*")


def test_probability_ratio_in_place_of_odds_ratio():
    _fails(lambda pc, pr, nc, nr, lam: -pc / nc - lam * F.logsigmoid(pc / nc - pr / nr),
           "a ratio of probabilities, not of odds")


def test_nll_missing():
    def odds_ratio_only(pc, pr, nc, nr, lam):
        return orpo_by_odds(pc, pr, nc, nr, lam) + pc / nc

    _fails(odds_ratio_only, "the supervised term is missing")


def test_lambda_on_the_nll():
    def lam_on_nll(pc, pr, nc, nr, lam):
        c, r = _means(pc, pr, nc, nr)
        log_or = (c - torch.log1p(-torch.exp(c))) - (r - torch.log1p(-torch.exp(r)))
        return -lam * c - F.logsigmoid(log_or)

    _fails(lam_on_nll, "λ weighs the wrong term")


def test_odds_ratio_term_with_the_wrong_sign():
    def plus_log_sigmoid(pc, pr, nc, nr, lam):
        c, r = _means(pc, pr, nc, nr)
        log_or = (c - torch.log1p(-torch.exp(c))) - (r - torch.log1p(-torch.exp(r)))
        return -c + lam * F.logsigmoid(log_or)

    _fails(plus_log_sigmoid, "sign of the odds-ratio term")


def test_detached_loss_fails_on_its_gradient():
    _fails(lambda *a: orpo_by_odds(*a).detach(), "cut from the autograd graph")


def test_batch_mean():
    _fails(lambda *a: orpo_by_odds(*a).mean(), "batch mean")


def test_every_listed_mistake_has_a_hint_of_its_own():
    """No two listed mistakes give the same outputs: each one's hint, and only that, explains it."""
    grader = ORPO_GRADERS["orpo_loss"]
    for mistake in grader.mistakes:
        with pytest.raises(AssertionError) as err:
            grader(mistake.fn)
        assert str(err.value).count("Likely mistake") == 1 and mistake.hint in str(err.value)
