"""The graders of issue 37, fed the way a learner writes answers: correct answers written differently (loops, other
ops, equivalent algebra) pass; wrong answers written out here (not taken from the graders' lists) fail with the hint
that names the mistake. ``tests/course/test_graders.py`` also runs each grader's reference and every listed mistake."""

import itertools
import math
import statistics

import pytest
import torch
import torch.nn.functional as F

from dpo_lib.course import graders as grading
from dpo_lib.logprobs import concatenated_forward, sequence_logprobs


def _passes(check, fn, capsys):
    check(fn)
    assert capsys.readouterr().out.startswith("✓ ")


def _fails(check, fn, *words):
    with pytest.raises(AssertionError) as err:
        check(fn)
    for w in words:
        assert w in str(err.value), str(err.value)


# ------------------------------------------------------------------ 01: β's direction
def test_optimal_kl(capsys):
    def by_loop(ref, r, beta):
        z = sum(float(p) * math.exp(float(x) / beta) for p, x in zip(ref, r))
        return sum(float(p) * math.exp(float(x) / beta) / z * (float(x) / beta - math.log(z)) for p, x in zip(ref, r))

    def by_algebra(ref, r, beta):  # KL = E_pi*[r]/beta - log Z
        log_z = torch.logsumexp(torch.log(ref) + r / beta, -1)
        return (torch.softmax(torch.log(ref) + r / beta, -1) * r).sum() / beta - log_z

    for fn in (by_loop, by_algebra):
        _passes(grading.check_optimal_kl, fn, capsys)
    _fails(grading.check_optimal_kl, lambda ref, r, b: by_algebra(ref, r, 1 / b), "β is backwards")
    _fails(grading.check_optimal_kl,
           lambda ref, r, b: (ref * (ref.log() - torch.log_softmax(ref.log() + r / b, -1))).sum(), "wrong way round")
    _fails(grading.check_optimal_kl, lambda ref, r, b: (torch.softmax(ref.log() + r / b, -1) * r).sum() / b,
           "log-normaliser")
    _fails(grading.check_optimal_kl, lambda ref, r, b: by_algebra(ref, r, b) / math.log(2), "bits")


# ------------------------------------------------------------------ 02: lean log-probs and the left-padded mask
def test_lean_sequence_logprobs(capsys):
    def per_position(logits, ids, mask):  # a double loop: small temporaries only
        out = []
        for b in range(logits.shape[0]):
            total = logits.new_zeros(())
            for t in range(1, logits.shape[1]):
                if mask[b, t]:
                    total = total + logits[b, t - 1, ids[b, t]] - torch.logsumexp(logits[b, t - 1], -1)
            out.append(total)
        return torch.stack(out)

    def per_row_log_softmax(logits, ids, mask):  # log_softmax one row at a time is lean too
        rows = [F.log_softmax(row[:-1], -1).gather(-1, i[1:, None]).squeeze(-1) for row, i in zip(logits, ids)]
        return (torch.stack(rows) * mask[:, 1:]).sum(-1)

    for fn in (per_position, per_row_log_softmax, sequence_logprobs):
        _passes(grading.check_lean_sequence_logprobs, fn, capsys)
    _fails(grading.check_lean_sequence_logprobs,
           lambda lg, ids, m: (F.log_softmax(lg[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
                               * m[:, 1:]).sum(-1), "builds a tensor as large as the logits")
    _fails(grading.check_lean_sequence_logprobs,
           lambda lg, ids, m: ((lg[:, :-1] - lg[:, :-1].logsumexp(-1, keepdim=True)).gather(-1, ids[:, 1:, None])
                               .squeeze(-1) * m[:, 1:]).sum(-1), "builds a tensor as large as the logits")
    _fails(grading.check_lean_sequence_logprobs,
           lambda lg, ids, m: per_row_log_softmax(lg, ids, m) / m[:, 1:].sum(-1).clamp(min=1), "mean instead of sum")
    _fails(grading.check_lean_sequence_logprobs,
           lambda lg, ids, m: (torch.stack([F.log_softmax(r, -1).gather(-1, i[:, None]).squeeze(-1)
                                            for r, i in zip(lg, ids)]) * m).sum(-1), "not shifted")
    _fails(grading.check_lean_sequence_logprobs,
           lambda lg, ids, m: (torch.stack([F.log_softmax(r[:-1], -1).gather(-1, i[1:, None]).squeeze(-1)
                                            for r, i in zip(lg, ids)]) * m[:, :-1]).sum(-1), "shift the mask")


def test_left_padded_mask(capsys):
    def by_cumsum(am, pl):  # real tokens counted along the row
        return (am.cumsum(-1) > pl[:, None]).long()

    def by_loop(am, pl):
        out = torch.zeros_like(am)
        for i in range(am.shape[0]):
            start = int((am[i] == 0).sum()) + int(pl[i])
            out[i, start:] = 1
        return out

    for fn in (by_cumsum, by_loop, grading.reference_left_padded_mask):
        _passes(grading.check_left_padded_mask, fn, capsys)
    right = grading.reference_completion_mask  # the right-padded mask of lesson 02
    _fails(grading.check_left_padded_mask, right, "left-padded")
    _fails(grading.check_left_padded_mask, lambda am, pl: (am.cumsum(-1) >= pl[:, None]).long() * am, "off by one")
    _fails(grading.check_left_padded_mask, lambda am, pl: ((am.cumsum(-1) <= pl[:, None]) & am.bool()).long(),
           "inverted")


# ------------------------------------------------------------------ 03: statistics
def test_heldout_accuracy(capsys):
    def with_statistics(c, r):
        o = [1.0 if a > b else 0.0 for a, b in zip(c.tolist(), r.tolist())]
        return statistics.mean(o) - 0.5, statistics.stdev(o) / math.sqrt(len(o))

    _passes(grading.check_heldout_accuracy, with_statistics, capsys)
    _passes(grading.check_heldout_accuracy, lambda c, r: ((c > r).double().mean() - 0.5,
                                                          (c > r).double().std() / len(c) ** 0.5), capsys)
    acc = lambda c, r: (c > r).double()  # noqa: E731
    _fails(grading.check_heldout_accuracy,
           lambda c, r: (acc(c, r).mean().item(), acc(c, r).std().item() / len(c) ** .5), "against chance")
    _fails(grading.check_heldout_accuracy, lambda c, r: (with_statistics(c, r)[0],
                                                         math.sqrt(acc(c, r).mean() * (1 - acc(c, r).mean()) / len(c))),
           "population standard deviation")
    _fails(grading.check_heldout_accuracy, lambda c, r: ((c >= r).double().mean().item() - 0.5,
                                                         (c >= r).double().std().item() / len(c) ** .5), "ties count")
    _fails(grading.check_heldout_accuracy, lambda c, r: (with_statistics(c, r)[0], acc(c, r).std().item()), "√n")


def test_paired_gain(capsys):
    def by_loop(a, b):
        d = [statistics.mean(x) - statistics.mean(y) for x, y in zip(a.tolist(), b.tolist())]
        return statistics.mean(d), statistics.stdev(d) / math.sqrt(len(d))

    _passes(grading.check_paired_gain, by_loop, capsys)
    _passes(grading.check_paired_gain, lambda a, b: ((a - b).mean(), (a - b).mean(1).std() / a.shape[0] ** .5), capsys)
    _fails(grading.check_paired_gain, lambda a, b: (by_loop(a, b)[0], math.sqrt(
        a.mean(1).var() / a.shape[0] + b.mean(1).var() / b.shape[0])), "independent")
    _fails(grading.check_paired_gain, lambda a, b: ((a - b).mean(), (a - b).std() / (a - b).numel() ** .5),
           "every (prompt, seed)")
    _fails(grading.check_paired_gain, lambda a, b: by_loop(b, a), "wrong sign")


# ------------------------------------------------------------------ 04: value loss, whitening, best-of-n
def test_ppo_value_loss(capsys):
    def by_where(v, old, ret, m, eps):
        v_clip = torch.where(v > old + eps, old + eps, torch.where(v < old - eps, old - eps, v))
        a, b = (v - ret) ** 2, (v_clip - ret) ** 2
        return (torch.where(a > b, a, b) * m).sum() / m.sum() / 2

    _passes(grading.check_ppo_value_loss, by_where, capsys)
    _passes(grading.check_ppo_value_loss, lambda v, old, ret, m, eps: 0.5 * torch.maximum(
        (v - ret) ** 2, (v.clamp(old - eps, old + eps) - ret) ** 2)[m.bool()].mean(), capsys)
    _fails(grading.check_ppo_value_loss, lambda v, old, ret, m, eps: 0.5 * torch.minimum(
        (v - ret) ** 2, (v.clamp(old - eps, old + eps) - ret) ** 2)[m.bool()].mean(), "min instead of max")
    _fails(grading.check_ppo_value_loss, lambda v, old, ret, m, eps: 0.5 * ((v - ret) ** 2)[m.bool()].mean(),
           "clipping is missing")
    _fails(grading.check_ppo_value_loss, lambda v, old, ret, m, eps: 0.5 * torch.maximum(
        (v - ret) ** 2, (v.clamp(old - eps, old + eps) - ret) ** 2).mean(), "padding is averaged")
    _fails(grading.check_ppo_value_loss, lambda v, old, ret, m, eps: torch.maximum(
        (v - ret) ** 2, (v.clamp(old - eps, old + eps) - ret) ** 2)[m.bool()].mean(), "½")

    def detached_clip(v, old, ret, m, eps):  # right values, but the unclipped branch gets no gradient
        return 0.5 * torch.maximum((v.detach() - ret) ** 2, (v.clamp(old - eps, old + eps) - ret) ** 2)[m.bool()].mean()
    _fails(grading.check_ppo_value_loss, detached_clip, "∂loss/∂values")


def test_whiten_advantages(capsys):
    def by_indexing(a, m):
        real = a[m.bool()]
        out = (a - real.mean()) / torch.sqrt(real.var(unbiased=False) + 1e-8)
        return torch.where(m.bool(), out, torch.zeros_like(out))

    _passes(grading.check_whiten_advantages, by_indexing, capsys)
    _fails(grading.check_whiten_advantages, lambda a, m: (a - a.mean()) / a.std(unbiased=False) * m, "padding")
    _fails(grading.check_whiten_advantages, lambda a, m: torch.stack([
        by_indexing(a[i:i + 1], m[i:i + 1])[0] for i in range(a.shape[0])]), "on its own")
    _fails(grading.check_whiten_advantages, lambda a, m: (a - a[m.bool()].mean()) / torch.sqrt(
        a[m.bool()].var(unbiased=False) + 1e-8), "not zeroed")


def test_best_of_n_estimate(capsys):
    def by_subsets(r, n):
        subsets = list(itertools.combinations(r.tolist(), n))
        return sum(max(s) for s in subsets) / len(subsets)

    def by_weights_tensor(r, n):
        s, N = r.sort().values, r.numel()
        w = torch.tensor([math.comb(i - 1, n - 1) for i in range(1, N + 1)], dtype=r.dtype) / math.comb(N, n)
        return float((w * s).sum())

    for fn in (by_subsets, by_weights_tensor):
        _passes(grading.check_best_of_n_estimate, fn, capsys)
    _fails(grading.check_best_of_n_estimate, lambda r, n: r.max().item(), "best of all N")
    _fails(grading.check_best_of_n_estimate, lambda r, n: r[:n].max().item(), "only the first n")
    _fails(grading.check_best_of_n_estimate, lambda r, n: float(sum(
        math.comb(i - 1, n - 1) * x for i, x in enumerate(r.tolist(), 1)) / math.comb(len(r), n)), "sorted first")


# ------------------------------------------------------------------ 05: the adapter-disabled reference
def test_adapter_reference(capsys):
    def explicit_toggle(model, batch):  # switch off and on by hand, autograd off
        model.base_model.disable_adapter_layers()
        try:
            with torch.inference_mode():
                return tuple(t.clone() for t in concatenated_forward(model, batch))
        finally:
            model.base_model.enable_adapter_layers()

    _passes(grading.check_adapter_reference, explicit_toggle, capsys)
    _fails(grading.check_adapter_reference,
           lambda model, batch: torch.no_grad()(concatenated_forward)(model.get_base_model(), batch),
           "adapter is still on")

    def detached_after(model, batch):
        with model.disable_adapter():
            return tuple(t.detach() for t in concatenated_forward(model, batch))
    _fails(grading.check_adapter_reference, detached_after, "autograd was on")

    def never_back_on(model, batch):
        model.base_model.disable_adapter_layers()
        with torch.no_grad():
            return concatenated_forward(model, batch)
    _fails(grading.check_adapter_reference, never_back_on, "still off after")


# ------------------------------------------------------------------ 06: IPO and rDPO
def _h(pc, pr, rc, rr):
    return (pc - pr) - (rc - rr)  # the same margin, grouped by policy and reference


def test_ipo_written_differently(capsys):
    _passes(grading.check_ipo_loss, lambda pc, pr, rc, rr, b: _h(pc, pr, rc, rr) ** 2 - _h(pc, pr, rc, rr) / b
            + 1 / (4 * b * b), capsys)
    _fails(grading.check_ipo_loss, lambda pc, pr, rc, rr, b: (_h(pc, pr, rc, rr) - 1 / b) ** 2, "1/(2β), not 1/β")
    _fails(grading.check_ipo_loss, lambda pc, pr, rc, rr, b: (b * _h(pc, pr, rc, rr) - 0.5 / b) ** 2,
           "not multiplied by β")
    _fails(grading.check_ipo_loss, lambda pc, pr, rc, rr, b: (pc - pr - 0.5 / b) ** 2, "reference log-probs")


def test_robust_dpo(capsys):
    def via_softplus(pc, pr, rc, rr, b, e):  # -log σ(z) = softplus(-z)
        z = b * _h(pc, pr, rc, rr)
        return ((1 - e) * F.softplus(-z) - e * F.softplus(z)) / (1 - 2 * e)

    _passes(grading.check_robust_dpo_loss, via_softplus, capsys)
    _fails(grading.check_robust_dpo_loss, lambda pc, pr, rc, rr, b, e: (1 - e) * F.softplus(-b * _h(pc, pr, rc, rr))
           + e * F.softplus(b * _h(pc, pr, rc, rr)), "conservative DPO")
    _fails(grading.check_robust_dpo_loss, lambda pc, pr, rc, rr, b, e: (1 - e) * F.softplus(-b * _h(pc, pr, rc, rr))
           - e * F.softplus(b * _h(pc, pr, rc, rr)), "division by 1-2ε")
    _fails(grading.check_robust_dpo_loss, lambda *a: via_softplus(*a[:4], 1.0, a[5]), "β is missing")
    _fails(grading.check_robust_dpo_loss, lambda pc, pr, rc, rr, b, e: (e * F.softplus(-b * _h(pc, pr, rc, rr))
           - (1 - e) * F.softplus(b * _h(pc, pr, rc, rr))) / (1 - 2 * e), "swapped")

    def detached_rejected(pc, pr, rc, rr, b, e):
        return via_softplus(pc, pr.detach(), rc, rr, b, e)
    with pytest.raises(AssertionError, match="∂losses/∂policy_rejected_logps"):
        grading.check_robust_dpo_loss(detached_rejected)


# ------------------------------------------------------------------ 07: one round
def test_one_round(capsys):
    def by_hand(prompt_rows, sample, judge, n, min_gap):
        rows, everything = [], []
        for row in prompt_rows:
            scored = [(judge(row["prompt"], a), a) for a in sample(row["prompt"], n)]
            everything += [s for s, _ in scored]
            best, worst = max(scored), min(scored)
            if best[0] - worst[0] >= min_gap and best[1] != worst[1]:
                rows.append({"prompt": row["prompt"], "chosen": best[1], "rejected": worst[1]})
        return rows, statistics.mean(everything)

    _passes(grading.check_one_round, by_hand, capsys)
    _fails(grading.check_one_round, lambda *a: (by_hand(*a)[0], max(
        max(a[2](r["prompt"], x) for x in a[1](r["prompt"], a[3])) for r in a[0])), "mean_score differs")

    def chosen_mean(prompt_rows, sample, judge, n, min_gap):
        rows, _ = by_hand(prompt_rows, sample, judge, n, min_gap)
        best = [max(judge(r["prompt"], x) for x in sample(r["prompt"], n)) for r in prompt_rows]
        return rows, sum(best) / len(best)
    _fails(grading.check_one_round, chosen_mean, "chosen answers only")
    _fails(grading.check_one_round, lambda *a: ([{**r, "chosen": r["rejected"], "rejected": r["chosen"]}
                                                 for r in by_hand(*a)[0]], by_hand(*a)[1]), "swapped")
    _fails(grading.check_one_round, lambda p, s, j, n, g: by_hand(p, s, j, n, -1.0), "minimum gap")
