"""Grader for lesson 07's loop (re-exported by :mod:`dpo_lib.course.graders`): one full round of iterative DPO
before its training: sample n answers per prompt from the current policy, have the judge score each answer *to
its prompt*, build the best-vs-worst pairs, and report the judge's mean score of everything the round sampled
(the on-policy curve of the lesson).

The harness hands the learner a canned sampler and a judge whose score depends on the prompt as well as on the
answer; it converts the returned rows to ids of their texts and compares them with
:func:`dpo_lib.sampling.best_vs_worst`'s, and the mean score as a number.
"""

from __future__ import annotations

from typing import Callable

import torch

from dpo_lib.course.graders_iterate import _ListCase
from dpo_lib.course.grading_engine import GradingError, HarnessGrader, Mistake
from dpo_lib.sampling import best_vs_worst

__all__ = ["ROUND_GRADERS", "check_one_round", "reference_one_round"]

_GAPS = (0.5, 0.25, 0.375, 0.5, 0.125, 0.75)
_WORDS = ("sunny", "grey", "warm", "cold", "bright", "wet", "calm", "windy")


class _Canned:
    """A named callable (a failure message shows the name, not an address)."""

    def __init__(self, label: str, fn: Callable):
        self.label, self.fn = label, fn

    def __call__(self, *args):
        return self.fn(*args)

    def __repr__(self) -> str:
        return self.label


def _round_case(g: torch.Generator, k: int) -> tuple:
    """P prompts; the sampler's answers to prompt i are the first n of its pool (the pool of prompt 1 repeats one
    answer); prompt 0's answers score less than min_gap apart. The judge scores an answer by its words and by the prompt
    (binary-exact scores, no ties), so judging an answer against the wrong prompt changes its score."""
    P, n, gap = (3, 4, 2, 5, 3, 4)[k], (3, 2, 4, 3, 5, 2)[k], _GAPS[k]
    prompts = [f"Prompt {k}.{i}: how is the weather?" for i in range(P)]
    pools = {p: [f"It is {_WORDS[int(w)]} ({i}.{j})." for j, w in enumerate(torch.randint(0, 8, (n,), generator=g))]
             for i, p in enumerate(prompts)}
    pools[prompts[1]][-1] = pools[prompts[1]][0]
    table = {(p, a): float(torch.randint(0, 64, (1,), generator=g)) / 8 + i / 64 + j / 1024
             for i, p in enumerate(prompts) for j, a in enumerate(pools[p])}
    for j, a in enumerate(pools[prompts[0]]):  # prompt 0: its answers score within 4/1024, below every min_gap
        table[(prompts[0], a)] = 1.5 + j / 1024

    def judge(prompt, answer):
        return table.get((prompt, answer), -10.0)

    rows = _ListCase(f"{P} prompts", [{"prompt": p} for p in prompts])
    return (rows, _Canned(f"sampler ({n} answers per prompt)", lambda prompt, m: list(pools[prompt][:m])),
            _Canned("judge(prompt, answer)", judge), n, gap)


def _scored(prompt_rows, sample, judge, n):
    samples, scores = [], []
    for i, row in enumerate(prompt_rows):
        for text in sample(row["prompt"], n):
            samples.append({"prompt_index": i, "text": text})
            scores.append(judge(row["prompt"], text))
    return samples, scores


def reference_one_round(prompt_rows, sample, judge, n, min_gap):
    """``(rows, mean_score)``: the best-vs-worst rows of the round, and the judge's mean score of all its samples."""
    samples, scores = _scored(prompt_rows, sample, judge, n)
    return best_vs_worst(prompt_rows, samples, scores, min_gap)[0], sum(scores) / len(scores)


def _run_round(fn: Callable, prompt_rows, sample, judge, n, min_gap):
    out = fn(prompt_rows, sample, judge, n, min_gap)
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise GradingError("✗ one_round: return a tuple (rows, mean_score)")
    rows, mean = out
    texts = {t: i for i, t in enumerate(dict.fromkeys(
        [r["prompt"] for r in prompt_rows] + [a for r in prompt_rows for a in sample(r["prompt"], n)]))}
    try:
        ids = torch.tensor([[texts.get(r[f], -1) for f in ("prompt", "chosen", "rejected")] for r in rows],
                           dtype=torch.long).reshape(-1, 3)
    except (TypeError, KeyError) as e:
        raise GradingError(f"✗ one_round: rows must be a list of dicts with prompt, chosen and rejected ({e!r})") \
            from None
    return ids, mean


def _variant(keep: Callable = lambda hi, lo, b, w, gap: hi - lo >= gap and b != w, swap: bool = False,
             mean_of: str = "all", per_prompt: bool = True) -> Callable:
    def fn(prompt_rows, sample, judge, n, min_gap):
        samples, scores = _scored(prompt_rows, sample, judge, n)
        rows, kept = [], []
        for i, row in enumerate(prompt_rows):
            scored = sorted((s, x["text"]) for x, s in zip(samples, scores) if x["prompt_index"] == i or not per_prompt)
            (lo, worst), (hi, best) = scored[0], scored[-1]
            if mean_of == "chosen":
                kept.append(hi)
            if keep(hi, lo, best, worst, min_gap):
                rows.append({"prompt": row["prompt"], "chosen": worst if swap else best,
                             "rejected": best if swap else worst})
                kept.extend([hi, lo] if mean_of == "pairs" else [])
        pool = scores if mean_of == "all" else kept
        return rows, sum(pool) / max(len(pool), 1)
    return fn


ROUND_MISTAKES = [
    Mistake("the mean score is of the chosen answers only: the round's score is the judge's mean over every answer "
            "the policy sampled; the best of n overstates what the policy does.", _variant(mean_of="chosen")),
    Mistake("the mean score is over the kept pairs only: average every sampled answer, including those of the "
            "prompts you skipped, or the curve measures the filter as well as the policy.",
            _variant(mean_of="pairs")),
    Mistake("chosen and rejected are swapped: the best-scored answer is the chosen one.", _variant(swap=True)),
    Mistake("the minimum gap is missing: skip a prompt when its best and worst answers score less than min_gap "
            "apart.", _variant(keep=lambda hi, lo, b, w, gap: b != w)),
    Mistake("the pairs mix prompts: the best and the worst answer are taken over the whole round, not among the "
            "answers to one prompt; a pair compares two answers to the same prompt.", _variant(per_prompt=False)),
]

ROUND_GRADERS = {
    "one_round": HarnessGrader("one_round", reference_one_round, _round_case,
                               ("prompt_rows", "sample", "judge", "n", "min_gap"), ("rows", "mean_score"),
                               ROUND_MISTAKES, run=_run_round),
}


def check_one_round(fn: Callable) -> None:
    """``fn(prompt_rows, sample, judge, n, min_gap) -> (rows, mean_score)``: one round's pairs and mean score."""
    ROUND_GRADERS["one_round"](fn)
