"""Sampling completions, and making on-policy preference pairs from them.

:func:`make_pairs` is the data recipe of the DPO paper's controlled-sentiment task
(Rafailov et al. 2023, §6.1) at small scale: sample N responses per prompt from the
policy itself, score them with a ground-truth reward, keep best vs worst. On-policy pairs
keep the preference data in-distribution for the reference model.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from dpo_lib.data import encode_prompt  # the chat template lives in dpo_lib.data; notebooks import it from here


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


def make_pairs(model, tokenizer, prompt_rows: list[dict], reward_fn, n: int = 4, min_gap: float = 0.05,
               **generate_kwargs) -> tuple[list[dict], dict]:
    """Best-vs-worst pairs: for each prompt sample ``n`` responses, score them with
    ``reward_fn(texts) -> list[float]``, keep the highest as chosen and the lowest as rejected.

    Prompts whose best and worst differ by less than ``min_gap`` (or whose texts are equal)
    carry no preference and are skipped. Returns ``(rows, stats)``.
    """
    samples = generate(model, tokenizer, [r["prompt"] for r in prompt_rows], n=n, **generate_kwargs)
    scores = reward_fn([s["text"] for s in samples])
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
    return rows, {"prompts": len(prompt_rows), "pairs": len(rows), "skipped_no_preference": skipped,
                  "samples": len(samples)}
