"""Sampling completions, and making on-policy preference pairs from them.

:func:`make_pairs` is the data recipe of the DPO paper's controlled-sentiment task
(Rafailov et al. 2023, §6.1) at small scale: sample N responses per prompt from the
policy itself, score them with a ground-truth reward, keep best vs worst. On-policy pairs
keep the preference data in-distribution for the reference model.

:func:`score_samples` runs the judge (the reward function) and checks what it returns: a judge
that raises, or gives a non-finite score or the wrong number of scores, stops with a
:class:`JudgeError` that names the sample and its prompt index. A judge that needs the prompts
(e.g. :class:`dpo_lib.rlhf.reward_model.RewardModelJudge`) says so with ``takes_prompts = True``
and is called as ``judge(texts, prompts=...)``.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from dpo_lib.features import encode_prompt  # the chat template's home; notebooks import it from here
from dpo_lib.settings import UserError

__all__ = ["JudgeError", "best_vs_worst", "generate", "make_pairs", "score_samples"]


@torch.no_grad()
def generate(model, tokenizer, prompts: list, n: int = 1, max_new_tokens: int = 48, temperature: float = 1.0,
             top_p: float = 1.0, batch_size: int = 32, seed: int = 0, progress: bool = True) -> list[dict]:
    """Sample ``n`` completions for each prompt (string or message list).

    Returns one dict per sample: ``prompt_index``, ``prompt_ids``, ``response_ids`` (up to and
    including the first EOS) and ``text`` (decoded, special tokens dropped). Prompts are
    left-padded so that every row's next token sits in the last column.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    jobs = [(i, encode_prompt(tokenizer, p)) for i, p in enumerate(prompts) for _ in range(n)]
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    out = []
    for b in tqdm(range(0, len(jobs), batch_size), desc="sampling", disable=not progress, leave=False):
        chunk = jobs[b:b + batch_size]
        L = max(len(ids) for _, ids in chunk)
        input_ids = torch.full((len(chunk), L), pad, dtype=torch.long)       # (N, L) left-padded
        attention = torch.zeros((len(chunk), L), dtype=torch.long)
        for r, (_, ids) in enumerate(chunk):
            input_ids[r, L - len(ids):] = torch.tensor(ids)
            attention[r, L - len(ids):] = 1
        torch.manual_seed(seed + b)
        gen = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                             do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
                             top_p=top_p, top_k=0, max_new_tokens=max_new_tokens, pad_token_id=pad,
                             eos_token_id=eos)
        for r, (i, ids) in enumerate(chunk):
            resp = gen[r, L:].tolist()
            if eos in resp:
                resp = resp[: resp.index(eos) + 1]
            out.append({"prompt_index": i, "prompt_ids": ids, "response_ids": resp,
                        "text": tokenizer.decode(resp, skip_special_tokens=True).strip()})
    model.train(was_training)
    return out


class JudgeError(UserError, ValueError):
    """The judge failed on a sample; ``prompt_index`` is that sample's prompt (``None``: no single sample)."""

    def __init__(self, message: str, prompt_index: int | None = None):
        super().__init__(message)
        self.prompt_index = prompt_index


def score_samples(reward_fn, samples: list[dict], prompts: list | None = None) -> list[float]:
    """``reward_fn`` of every sample's ``text``, checked: one finite float per sample.

    When the call over all samples fails (raises, or returns the wrong number of scores), the
    samples are scored one at a time to find the first one it fails on; the :class:`JudgeError`
    names it (sample number, ``prompt_index`` and the start of its text).
    """
    def call(chunk: list[dict]) -> list[float]:
        texts = [s["text"] for s in chunk]
        if getattr(reward_fn, "takes_prompts", False):
            return [float(x) for x in reward_fn(texts, prompts=[prompts[s["prompt_index"]] for s in chunk])]
        return [float(x) for x in reward_fn(texts)]

    def where(k: int) -> str:
        return f"sample {k} (prompt {samples[k]['prompt_index']}, text {samples[k]['text'][:40]!r})"

    try:
        scores = call(samples)
        problem = None if len(scores) == len(samples) else f"returned {len(scores)} scores for {len(samples)} texts"
    except Exception as e:  # noqa: BLE001 (any failure of user code is reported with the sample it failed on)
        scores, problem = [], f"raised {type(e).__name__}: {e}"
    if problem is None:
        bad = next((k for k, x in enumerate(scores) if not math.isfinite(x)), None)
        if bad is None:
            return scores
        raise JudgeError(f"the judge gave a non-finite score ({scores[bad]}) to {where(bad)}",
                         samples[bad]["prompt_index"])
    for k in range(len(samples)):  # find the sample it fails on
        try:
            one = call(samples[k:k + 1])
        except Exception as e:  # noqa: BLE001
            raise JudgeError(f"the judge raised {type(e).__name__}: {e} on {where(k)}", samples[k]["prompt_index"]) \
                from e
        if len(one) != 1 or not math.isfinite(one[0]):
            what = f"{len(one)} scores" if len(one) != 1 else f"a non-finite score ({one[0]})"
            raise JudgeError(f"the judge returned {what} for {where(k)}", samples[k]["prompt_index"])
    raise JudgeError(f"the judge {problem} (each text alone scores fine)")


def make_pairs(model, tokenizer, prompt_rows: list[dict], reward_fn, n: int = 4, min_gap: float = 0.05,
               **generate_kwargs) -> tuple[list[dict], dict]:
    """Best-vs-worst pairs: for each prompt sample ``n`` responses, score them with
    ``reward_fn(texts) -> list[float]``, keep the highest as chosen and the lowest as rejected
    (:func:`best_vs_worst`).

    Prompts whose best and worst differ by less than ``min_gap`` (or whose texts are equal)
    carry no preference and are skipped. The scores are checked (:func:`score_samples`: a failing
    judge raises :class:`JudgeError`). Returns ``(rows, stats)``; ``stats["score_mean"]`` is the
    judge's mean over all samples.
    """
    prompts = [r["prompt"] for r in prompt_rows]
    samples = generate(model, tokenizer, prompts, n=n, **generate_kwargs)
    scores = score_samples(reward_fn, samples, prompts)
    rows, skipped = best_vs_worst(prompt_rows, samples, scores, min_gap)
    return rows, {"prompts": len(prompt_rows), "pairs": len(rows), "skipped_no_preference": skipped,
                  "samples": len(samples), "score_mean": sum(scores) / len(scores) if scores else float("nan")}


def best_vs_worst(prompt_rows: list[dict], samples: list[dict], scores: list[float],
                  min_gap: float = 0.05) -> tuple[list[dict], int]:
    """The pairs of :func:`make_pairs` from scored samples: ``samples[j]`` (a dict with ``prompt_index``
    and ``text``, in any order) has the score ``scores[j]``.

    For each prompt, in the order of ``prompt_rows``, the highest-scored sample is chosen and the
    lowest rejected; the prompt is skipped when ``best - worst < min_gap``, when the two texts are
    equal, or when either is empty. Returns ``(rows, skipped)``: rows in the course schema (message
    lists when the prompt is one) plus ``score_chosen`` / ``score_rejected``, and how many prompts
    were skipped.
    """
    by_prompt: dict[int, list] = {}
    for s, score in zip(samples, scores):
        by_prompt.setdefault(s["prompt_index"], []).append((score, s["text"]))
    rows, skipped = [], 0
    for i, row in enumerate(prompt_rows):
        scored = sorted(by_prompt[i], key=lambda t: t[0])
        (lo, worst), (hi, best) = scored[0], scored[-1]
        if hi - lo < min_gap or best == worst or not best or not worst:
            skipped += 1
            continue
        chosen, rejected = (best, worst)
        if isinstance(row["prompt"], list):
            chosen, rejected = [{"role": "assistant", "content": best}], [{"role": "assistant", "content": worst}]
        rows.append({"prompt": row["prompt"], "chosen": chosen, "rejected": rejected,
                     "score_chosen": round(hi, 4), "score_rejected": round(lo, 4)})
    return rows, skipped
