"""Graders of exercises 06 and 07, fed the way a learner writes them: a correct answer passes, and each wrong
answer (written out here, not taken from the graders' own list of mistakes) fails with the hint that names it.
``tests/course/test_graders.py`` also runs every grader's reference and every one of its listed mistakes."""

import pytest
import torch
import torch.nn.functional as F

from dpo_lib.course import graders as grading


def _passes(check, fn, capsys):
    check(fn)
    assert capsys.readouterr().out.startswith("✓ ")


def _fails(check, fn, *words):
    with pytest.raises(AssertionError) as err:
        check(fn)
    for w in words:
        assert w in str(err.value), str(err.value)


# ------------------------------------------------------------------ 06: SimPO
def simpo(pc, pr, nc, nr, beta, gamma):
    return -F.logsigmoid(beta * pc / nc - beta * pr / nr - gamma)


def test_simpo(capsys):
    _passes(grading.check_simpo_loss, simpo, capsys)
    _fails(grading.check_simpo_loss, lambda pc, pr, nc, nr, b, g: -F.logsigmoid(b * (pc - pr) - g),
           "length normalisation is missing")
    _fails(grading.check_simpo_loss, lambda pc, pr, nc, nr, b, g: -F.logsigmoid(b * pc / nc - b * pr / nr + g),
           "sign of γ")
    _fails(grading.check_simpo_loss, lambda pc, pr, nc, nr, b, g: -F.logsigmoid(b * (pc / nc - pr / nr - g)),
           "γ is multiplied by β")
    _fails(grading.check_simpo_loss, lambda pc, pr, nc, nr, b, g: -F.logsigmoid(b * pc / nr - b * pr / nc - g),
           "lengths are swapped")
    _fails(grading.check_simpo_loss, lambda *a: simpo(*a).detach(), "autograd graph")


# ------------------------------------------------------------------ 06: DPOP
def dpop(pc, pr, rc, rr, beta, lam):
    h = (pc - rc) - (pr - rr)
    return -F.logsigmoid(beta * (h - lam * torch.clamp(rc - pc, min=0)))


def test_dpop(capsys):
    _passes(grading.check_dpop_loss, dpop, capsys)
    _fails(grading.check_dpop_loss,
           lambda pc, pr, rc, rr, b, lam: -F.logsigmoid(b * ((pc - rc) - (pr - rr) - lam * torch.relu(pc - rc))),
           "wrong log-ratio")
    _fails(grading.check_dpop_loss,
           lambda pc, pr, rc, rr, b, lam: -F.logsigmoid(b * ((pc - rc) - (pr - rr))) + lam * torch.relu(rc - pc),
           "outside the sigmoid")
    _fails(grading.check_dpop_loss, lambda pc, pr, rc, rr, b, lam: -F.logsigmoid(b * ((pc - rc) - (pr - rr))),
           "plain DPO")

    def detached_penalty(pc, pr, rc, rr, b, lam):
        return -F.logsigmoid(b * ((pc - rc) - (pr - rr) - lam * torch.relu(rc - pc.detach())))

    _fails(grading.check_dpop_loss, detached_penalty, "detached")


# ------------------------------------------------------------------ 06: flipping labels
def flip_labels(rows, flip):
    return [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} if f else dict(r) for r, f in zip(rows, flip)]


def test_flip_labels(capsys):
    _passes(grading.check_flip_labels, flip_labels, capsys)

    def one_field(rows, flip):
        out = []
        for r, f in zip(rows, flip):
            r = dict(r)
            if f:
                r["chosen"] = r["rejected"]
                r["rejected"] = r["chosen"]
            out.append(r)
        return out

    _fails(grading.check_flip_labels, one_field, "only one field is swapped")

    def in_place(rows, flip):
        for r, f in zip(rows, flip):
            if f:
                r["chosen"], r["rejected"] = r["rejected"], r["chosen"]
        return rows

    _fails(grading.check_flip_labels, in_place, "in place")
    _fails(grading.check_flip_labels, lambda rows, flip: [r for r, f in zip(flip_labels(rows, flip), flip) if f],
           "kept rows are missing")
    _fails(grading.check_flip_labels, lambda rows, flip: flip_labels(rows, [not f for f in flip]), "inverted")


def clean_accuracy(c, r, flipped):
    correct = torch.where(flipped, r > c, c > r)
    return correct.float().mean().item()


def test_clean_accuracy(capsys):
    _passes(grading.check_clean_accuracy, clean_accuracy, capsys)
    _fails(grading.check_clean_accuracy, lambda c, r, f: (c > r).float().mean().item(), "noisy labels")
    _fails(grading.check_clean_accuracy, lambda c, r, f: (c[~f] > r[~f]).float().mean().item(), "dropped")
    _fails(grading.check_clean_accuracy, lambda c, r, f: torch.where(f, c <= r, c > r).float().mean().item(),
           "tie counts as correct on the flipped rows")


# ------------------------------------------------------------------ 07: best vs worst
def best_vs_worst(prompt_rows, samples, scores, min_gap):
    by_prompt = {}
    for s, x in zip(samples, scores):
        by_prompt.setdefault(s["prompt_index"], []).append((x, s["text"]))
    rows = []
    for i, row in enumerate(prompt_rows):
        (lo, worst), (hi, best) = min(by_prompt[i]), max(by_prompt[i])
        if hi - lo >= min_gap and best != worst:
            rows.append({"prompt": row["prompt"], "chosen": best, "rejected": worst})
    return rows


def test_best_vs_worst(capsys):
    _passes(grading.check_best_vs_worst, best_vs_worst, capsys)

    def no_gap(prompt_rows, samples, scores, min_gap):
        return best_vs_worst(prompt_rows, samples, scores, float("-inf"))

    _fails(grading.check_best_vs_worst, no_gap, "minimum gap is missing")

    def strict(prompt_rows, samples, scores, min_gap):
        return best_vs_worst(prompt_rows, samples, scores, min_gap + 1e-9)

    _fails(grading.check_best_vs_worst, strict, "exactly min_gap")

    def blocks(prompt_rows, samples, scores, min_gap):
        n = len(samples) // len(prompt_rows)
        relabelled = [{**s, "prompt_index": j // n} for j, s in enumerate(samples)]
        return best_vs_worst(prompt_rows, relabelled, scores, min_gap)

    _fails(grading.check_best_vs_worst, blocks, "not grouped by their prompt_index")

    def identical(prompt_rows, samples, scores, min_gap):
        by_prompt = {}
        for s, x in zip(samples, scores):
            by_prompt.setdefault(s["prompt_index"], []).append((x, s["text"]))
        rows = []
        for i, row in enumerate(prompt_rows):
            (lo, worst), (hi, best) = min(by_prompt[i]), max(by_prompt[i])
            if hi - lo >= min_gap:
                rows.append({"prompt": row["prompt"], "chosen": best, "rejected": worst})
        return rows

    _fails(grading.check_best_vs_worst, identical, "identical answers are kept")


# ------------------------------------------------------------------ 07: the reference between rounds
def round_reference(chosen_logps, rejected_logps, k, reference, beta):
    j = 0 if reference == "initial" else k - 1
    return (chosen_logps[j], rejected_logps[j], beta * (chosen_logps[k - 1] - chosen_logps[j]),
            beta * (rejected_logps[k - 1] - rejected_logps[j]))


def test_round_reference(capsys):
    _passes(grading.check_round_reference, round_reference, capsys)
    _fails(grading.check_round_reference,
           lambda c, r, k, mode, b: round_reference(c, r, k + 1, mode, b)[:2] + round_reference(c, r, k, mode, b)[2:]
           if mode == "previous" else round_reference(c, r, k, mode, b), "off by one")
    _fails(grading.check_round_reference, lambda c, r, k, mode, b: round_reference(c, r, k, "initial", b),
           "never moves")
    _fails(grading.check_round_reference, lambda c, r, k, mode, b: round_reference(c, r, k, mode, 1.0),
           "β is missing")


def test_library_pair_builder_matches_make_pairs_rules():
    """The grader's reference is the library's own builder; make_pairs is a thin wrapper around it."""
    from dpo_lib.sampling import best_vs_worst as library
    prompts = [{"prompt": "p0"}, {"prompt": [{"role": "user", "content": "p1"}]}, {"prompt": "p2"}]
    samples = [{"prompt_index": i, "text": t} for i, t in [(0, "a"), (1, "b"), (0, "c"), (1, "d"), (2, "e"), (2, "")]]
    rows, skipped = library(prompts, samples, [0.0, 1.0, 1.0, 0.0, 0.0, 5.0], min_gap=0.5)
    assert skipped == 1  # prompt 2: an empty answer
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("c", "a"), ([{"role": "assistant", "content": "b"}],
                                                                         [{"role": "assistant", "content": "d"}])]
