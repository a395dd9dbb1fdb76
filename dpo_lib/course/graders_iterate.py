"""Graders for exercises 07 (iterative on-policy DPO); re-exported by :mod:`dpo_lib.course.graders`,
where the check cells find them.

``best_vs_worst`` is compared with the library's own pair builder, :func:`dpo_lib.sampling.best_vs_worst`
(what :func:`dpo_lib.sampling.make_pairs` and :func:`dpo_lib.recipes.iterate.iterate` use), on canned scored
samples, shuffled so that a prompt's samples are not next to each other, through a harness that turns
the returned rows into the ids of their texts. ``round_reference`` is compared with the rule of
:func:`dpo_lib.recipes.iterate.iterate`: round ``k`` trains the policy round ``k - 1`` ended with, against the
starting model (``"initial"``) or against that same policy (``"previous"``).
"""

from __future__ import annotations

import copy
from typing import Callable

import torch

from dpo_lib.course.grading_engine import BETAS, Grader, GradingError, HarnessGrader, Mistake
from dpo_lib.sampling import best_vs_worst

__all__ = ["ITERATE_GRADERS", "check_best_vs_worst", "check_round_reference", "reference_best_vs_worst",
           "reference_round_reference"]


# --------------------------------------------------------------------------- 07: best vs worst
_GAPS = (0.5, 0.375, 0.25, 0.5, 1.0, 0.125)  # binary-exact, so that a gap can equal min_gap exactly


def _pairs_case(g: torch.Generator, k: int) -> tuple:
    """``P`` prompts with ``n`` samples each, in a shuffled order. No two scores of a case are equal (whatever
    way a function breaks ties, best and worst are the same). Prompt 0 has a gap of exactly ``min_gap`` (the
    scores are binary-exact: kept), though its best score alone is below ``min_gap``; prompt 1 a gap just
    under it (skipped), though its best score alone is above ``min_gap``; prompt 2 two copies of one text as
    its best and worst, scored apart by more than ``min_gap`` (skipped: no preference between identical
    answers); the other prompts have random scores on a grid of 1/8, each prompt shifted by its own i/256."""
    P, n, min_gap = (4, 5, 3, 6, 4, 5)[k], (3, 4, 2, 3, 5, 4)[k], _GAPS[k]
    prompts = [{"prompt": f"Prompt {k}.{i}: say something about the weather."} for i in range(P)]
    samples, scores = [], []
    for i in range(P):
        texts = [f"answer {j} to prompt {i} (round {k})" for j in range(n)]
        if i == 0:  # best - worst is min_gap, while the best score alone is below min_gap
            grid = torch.linspace(0, min_gap, n, dtype=torch.float64) - 2
        elif i == 1:
            grid = torch.linspace(0, min_gap - 1 / 64, n, dtype=torch.float64) + 2 + 1 / 512  # best ≥ min_gap
        elif i == 2:
            texts[-1] = texts[0]
            grid = torch.linspace(-1, min_gap, n, dtype=torch.float64) + 3 / 512
        else:  # n distinct scores, ascending
            grid = torch.randperm(64, generator=g)[:n].sort().values.double() / 8 - 4 + i / 256
        for j in range(n):
            samples.append({"prompt_index": i, "text": texts[j]})
            scores.append(float(grid[j]))
    order = torch.randperm(len(samples), generator=g).tolist()
    return prompts, [samples[j] for j in order], [scores[j] for j in order], min_gap


def reference_best_vs_worst(prompt_rows, samples, scores, min_gap):
    """:func:`dpo_lib.sampling.best_vs_worst`'s rows (its count of skipped prompts is not asked for)."""
    return best_vs_worst(prompt_rows, samples, scores, min_gap)[0]


def _run_pairs(fn: Callable, prompt_rows, samples, scores, min_gap):
    """The returned rows as ids ``[rows, 3]`` of their (prompt, chosen, rejected) texts; -1 for a text that is
    neither a prompt nor a sample."""
    out = fn(prompt_rows, samples, scores, min_gap)
    if out is None:
        return None
    texts = {t: i for i, t in enumerate(dict.fromkeys([r["prompt"] for r in prompt_rows] +
                                                      [s["text"] for s in samples]))}
    try:
        return torch.tensor([[texts.get(r[f], -1) for f in ("prompt", "chosen", "rejected")] for r in out],
                            dtype=torch.long).reshape(-1, 3)
    except (TypeError, KeyError) as e:
        raise GradingError(f"✗ best_vs_worst: return a list of rows (dicts with prompt, chosen and rejected); "
                             f"got {type(out).__name__} ({e!r})") from None


def _pairs(keep: Callable = lambda hi, lo, best, worst, gap: hi - lo >= gap and best != worst,
           pick: Callable = lambda scored: (scored[-1], scored[0]), by_index: bool = True, ranked: bool = True,
           swap: bool = False) -> Callable:
    """A pair builder with one deliberate change per argument (the mistakes of :data:`PAIR_MISTAKES`)."""
    def fn(prompt_rows, samples, scores, min_gap):
        n = len(samples) // len(prompt_rows)
        by_prompt: dict[int, list] = {}
        for j, (s, x) in enumerate(zip(samples, scores)):
            by_prompt.setdefault(s["prompt_index"] if by_index else j // n, []).append((x, s["text"]))
        rows = []
        for i, row in enumerate(prompt_rows):
            scored = sorted(by_prompt[i], key=lambda t: t[0]) if ranked else by_prompt[i]
            (hi, best), (lo, worst) = pick(scored)
            if keep(hi, lo, best, worst, min_gap):
                chosen, rejected = (worst, best) if swap else (best, worst)
                rows.append({"prompt": row["prompt"], "chosen": chosen, "rejected": rejected})
        return rows
    return fn


PAIR_MISTAKES = [
    Mistake("chosen and rejected are swapped: the best-scored answer is the chosen one.", _pairs(swap=True)),
    Mistake("the minimum gap is missing: skip a prompt when its best and worst answers score less than "
            "min_gap apart (the judge does not prefer one of them enough to trust the label).",
            _pairs(keep=lambda hi, lo, b, w, gap: b != w)),
    Mistake("a gap of exactly min_gap is skipped: keep the prompt when best - worst >= min_gap (skip only "
            "when it is < min_gap).", _pairs(keep=lambda hi, lo, b, w, gap: hi - lo > gap and b != w)),
    Mistake("identical answers are kept: when the best and the worst answer are the same text there is no "
            "preference to learn, whatever the judge scored them (skip the prompt).",
            _pairs(keep=lambda hi, lo, b, w, gap: hi - lo >= gap)),
    Mistake("the gap is best minus worst, not the best score alone: compare best - worst with min_gap.",
            _pairs(keep=lambda hi, lo, b, w, gap: hi >= gap and b != w)),
    Mistake("the rejected answer is the worst-scored one, not the second best: best vs worst gives the largest "
            "gap the samples offer.", _pairs(pick=lambda s: (s[-1], s[-2]))),
    Mistake("the samples are not grouped by their prompt_index: they come in any order (here shuffled), so "
            "collect each prompt's samples by s['prompt_index'] rather than in blocks of n.",
            _pairs(by_index=False)),
    Mistake("the answers are not ranked by score: sort each prompt's samples by their score (or take max/min "
            "with key=score); the first and last sample in the list are not the best and worst.",
            _pairs(ranked=False)),
]


# --------------------------------------------------------------------------- 07: the reference between rounds
_MODES = ("previous", "initial", "previous", "initial", "previous", "initial")
_ROUNDS = (2, 3, 1, 1, 4, 2)


def _round_case(g: torch.Generator, k: int) -> tuple:
    """``logps[j]``: summed log-probs of round ``k``'s pairs under π_j, the policy after round ``j``
    (π_0 the starting model), for rounds 0 to R = ``k + 1``; chosen ``[R+1, B]`` and rejected ``[R+1, B]``."""
    B, r = (3, 4, 2, 5, 3, 6)[k], _ROUNDS[k]
    R = r + 1
    chosen = -(10 + 20 * torch.rand(1, B, generator=g)) + torch.cumsum(torch.rand(R + 1, B, generator=g), 0)
    rejected = -(10 + 20 * torch.rand(1, B, generator=g)) - torch.cumsum(torch.rand(R + 1, B, generator=g), 0)
    return chosen, rejected, r, _MODES[k], BETAS[k]


def reference_round_reference(chosen_logps, rejected_logps, k, reference, beta):
    """Round ``k`` (1-based) starts from π_{k-1}; its reference is π_0 (``"initial"``) or π_{k-1}
    (``"previous"``). Returns ``(ref_chosen [B], ref_rejected [B], chosen_rewards [B], rejected_rewards [B])``:
    the reference's log-probs and the implicit rewards ``β·(log π_{k-1} - log π_ref)`` at round ``k``'s first step."""
    j = k - 1 if reference == "previous" else 0
    ref_c, ref_r = chosen_logps[j], rejected_logps[j]
    return ref_c, ref_r, beta * (chosen_logps[k - 1] - ref_c), beta * (rejected_logps[k - 1] - ref_r)


def _round(ref_index: Callable, policy_index: Callable = lambda k: k - 1, scale: Callable = lambda b: b,
           sign: float = 1.0) -> Callable:
    def fn(c, r, k, mode, beta):
        j, p = ref_index(k, mode), policy_index(k)
        return c[j], r[j], sign * scale(beta) * (c[p] - c[j]), sign * scale(beta) * (r[p] - r[j])
    return fn


def _ref(k, mode):
    return k - 1 if mode == "previous" else 0


ROUND_MISTAKES = [
    Mistake('off by one: in "previous" mode round k\'s reference is π_{k-1}, the policy round k - 1 ended with '
            "(the one that samples round k's answers and starts its training); π_k is what round k produces.",
            _round(lambda k, mode: k if mode == "previous" else 0)),
    Mistake("off by one: round k starts training from π_{k-1} (logps[k - 1]), the policy the previous round ended "
            "with, not from π_k, which does not exist before round k is trained.", _round(_ref, lambda k: k)),
    Mistake('the reference never moves: "previous" means the reference is the last round\'s policy, π_{k-1}; '
            'only "initial" keeps the starting model π_0.', _round(lambda k, mode: 0)),
    Mistake('the reference always moves: "initial" keeps the starting model π_0 as the reference in every '
            'round; only "previous" moves it to π_{k-1}.', _round(lambda k, mode: k - 1)),
    Mistake('the two modes are swapped: "initial" is the starting model π_0, "previous" the last round\'s '
            "policy π_{k-1}.", _round(lambda k, mode: 0 if mode == "previous" else k - 1)),
    Mistake("β is missing from the rewards: β·(log π_{k-1} - log π_ref).", _round(_ref, scale=lambda b: 1.0)),
    Mistake("the rewards have the wrong sign: policy minus reference, β·(log π_{k-1} - log π_ref).",
            _round(_ref, sign=-1.0)),
]


# --------------------------------------------------------------------------- the graders
def _pairs_label(g: torch.Generator, k: int) -> tuple:
    prompts, samples, scores, gap = _pairs_case(g, k)
    return (_ListCase(f"{len(prompts)} prompts", prompts), _ListCase(f"{len(samples)} shuffled samples", samples),
            scores, gap)


class _ListCase(list):
    """A list that a failure message shows by a short label (the engine deep-copies it as a list)."""

    def __init__(self, label: str, items):
        super().__init__(items)
        self.label = label

    def __repr__(self) -> str:
        return self.label

    def __deepcopy__(self, memo):
        return _ListCase(self.label, copy.deepcopy(list(self), memo))


ITERATE_GRADERS: dict[str, Grader] = {g.name: g for g in [
    HarnessGrader("best_vs_worst", reference_best_vs_worst, _pairs_label,
                  ("prompt_rows", "samples", "scores", "min_gap"), ("rows",), PAIR_MISTAKES, run=_run_pairs),
    Grader("round_reference", reference_round_reference, _round_case,
           ("chosen_logps", "rejected_logps", "k", "reference", "beta"),
           ("ref_chosen", "ref_rejected", "chosen_rewards", "rejected_rewards"), ROUND_MISTAKES),
]}

def check_best_vs_worst(fn: Callable) -> None:
    """``fn(prompt_rows, samples, scores, min_gap) -> rows``: one ``{"prompt", "chosen", "rejected"}`` row per
    prompt that has a preference (best - worst >= min_gap, different texts), in the order of the prompts."""
    ITERATE_GRADERS["best_vs_worst"](fn)


def check_round_reference(fn: Callable) -> None:
    """``fn(chosen_logps [R+1, B], rejected_logps [R+1, B], k, reference, beta)``
    ``-> (ref_chosen [B], ref_rejected [B], chosen_rewards [B], rejected_rewards [B])`` for round ``k``."""
    ITERATE_GRADERS["round_reference"](fn)
