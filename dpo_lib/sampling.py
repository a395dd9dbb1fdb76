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

**Replies that end.** A sampled reply either ends with the model's own end of turn (``ended``) or is cut
by ``max_new_tokens``, often mid-word. Scored through the chat template, a cut reply gets an end-of-turn
token the model never wrote, after a broken sentence. :func:`complete_reply` handles the cut ones as
``make_pairs(..., incomplete=...)`` asks: ``"trim"`` cuts them back to their last complete sentence and
flags them (``chosen_trimmed`` / ``rejected_trimmed`` in the rows: the end of turn there is the data's,
not the model's), ``"drop"`` keeps only replies the model ended, ``"keep"`` keeps them as cut.
"""

from __future__ import annotations

import math
import re

import torch
from tqdm.auto import tqdm

# INCOMPLETE: what make_pairs does with a reply the token cap cut (module docstring); SAMPLERS: generate's loop
from dpo_lib.config import INCOMPLETE, SAMPLERS
from dpo_lib.features import encode_prompt  # the chat template's home; notebooks import it from here
from dpo_lib.models import attention_implementation
from dpo_lib.settings import UserError

__all__ = ["INCOMPLETE", "SAMPLERS", "JudgeError", "best_vs_worst", "complete_reply", "complete_samples", "decode",
           "decode_attention", "draw", "generate", "left_pad", "make_pairs", "sampling_batch_size", "score_samples"]

# A sentence ends at . ! ? or … (closing quotes, brackets or markdown may follow) before a space or the text's end:
# "3.5" and "e.g.," do not end one.
SENTENCE_END = re.compile(r"[.!?…][\"'”’»)\]*_]*(?=\s|$)")


@torch.no_grad()
def generate(model, tokenizer, prompts: list, n: int = 1, max_new_tokens: int = 48, temperature: float = 1.0,
             top_p: float = 1.0, batch_size: int | None = None, seed: int = 0, progress: bool = True,
             sampler: str = "dpo_lib") -> list[dict]:
    """Sample ``n`` completions for each prompt (string or message list).

    Returns one dict per sample: ``prompt_index``, ``prompt_ids``, ``response_ids`` (up to and
    including the first EOS), ``ended`` (the model wrote that EOS; False: ``max_new_tokens`` cut it)
    and ``text`` (decoded, special tokens dropped). Prompts are left-padded so that every row's next
    token sits in the last column.

    ``batch_size``: rows sampled together; ``None`` takes :func:`sampling_batch_size` of the longest prompt.

    ``sampler="dpo_lib"`` runs :func:`decode` (the same distribution as ``model.generate``, drawn by the
    inverse CDF: ``python -m dpo_lib bench --vs generate`` measures the two); ``"hf"`` calls
    ``model.generate`` itself, e.g. to reproduce samples drawn before :func:`decode` existed.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r}: expected one of {', '.join(SAMPLERS)}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    jobs = [(i, encode_prompt(tokenizer, p)) for i, p in enumerate(prompts) for _ in range(n)]
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    batch_size = batch_size or sampling_batch_size(max((len(ids) for _, ids in jobs), default=1), max_new_tokens)
    out = []
    for b in tqdm(range(0, len(jobs), batch_size), desc="sampling", disable=not progress, leave=False):
        chunk = jobs[b:b + batch_size]
        input_ids, attention = left_pad([ids for _, ids in chunk], pad)      # (N, L) each
        L = input_ids.shape[1]
        torch.manual_seed(seed + b)
        if sampler == "hf":
            gen = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                 do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
                                 top_p=top_p, top_k=0, max_new_tokens=max_new_tokens, pad_token_id=pad,
                                 eos_token_id=eos)[:, L:]
        else:
            gen = decode(model, input_ids.to(device), attention.to(device), max_new_tokens, eos, pad,
                         temperature=temperature, top_p=top_p)
        for r, (i, ids) in enumerate(chunk):
            resp = gen[r].tolist()
            ended = eos in resp
            if ended:
                resp = resp[: resp.index(eos) + 1]
            out.append({"prompt_index": i, "prompt_ids": ids, "response_ids": resp, "ended": ended,
                        "text": tokenizer.decode(resp, skip_special_tokens=True).strip()})
    model.train(was_training)
    return out


def left_pad(prompts: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, each ``(N, L)``: the token ids padded on the left, so that every row's
    next token sits in the last column."""
    L = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), L), pad_token_id, dtype=torch.long)   # (N, L)
    attention = torch.zeros((len(prompts), L), dtype=torch.long)                # (N, L)
    for r, ids in enumerate(prompts):
        input_ids[r, L - len(ids):] = torch.tensor(ids)
        attention[r, L - len(ids):] = 1
    return input_ids, attention


# Rows x tokens held in the key/value cache at once: 16k tokens are 0.75 GB in float32 for SmolLM2-135M
# (30 layers x keys and values x 3 heads x 64 x 4 bytes = 46 KB a token). At 128 rows a decode step's matmuls are
# big enough to run near a CPU's matmul speed; 32 rows were 1.3x slower per token on 2 cores (2026-12-07).
SAMPLING_TOKENS, SAMPLING_MAX_ROWS = 16_384, 128


def sampling_batch_size(prompt_tokens: int, max_new_tokens: int) -> int:
    """Rows per :func:`generate` batch: as many as keep :data:`SAMPLING_TOKENS` prompt + new tokens in the cache,
    at most :data:`SAMPLING_MAX_ROWS` (the main job's evaluation, prompts of ~45 tokens and 40 new ones: 128; 512
    new tokens: 29)."""
    return max(1, min(SAMPLING_MAX_ROWS, SAMPLING_TOKENS // (prompt_tokens + max_new_tokens)))


def draw(scores: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of ``scores`` ``(N, V)``: the argmax when ``temperature`` is 0, else a draw from
    softmax(scores / temperature) restricted to the top-``p`` nucleus (transformers' ``TopPLogitsWarper``).

    The draw inverts the CDF (one uniform number per row and a binary search) where ``torch.multinomial``
    draws an exponential number for every one of the V entries: the same distribution, a fraction of the work
    on a CPU (a 32 x 49k multinomial was 18 % of a sampling step)."""
    if temperature <= 0:
        return scores.argmax(dim=-1)
    scores = scores.float() / temperature                                        # (N, V)
    if top_p < 1.0:
        from transformers.generation.logits_process import TopPLogitsWarper
        scores = TopPLogitsWarper(top_p)(None, scores)
    cdf = scores.softmax(dim=-1).cumsum(dim=-1)                                  # (N, V), last column ~1
    u = torch.rand(scores.shape[0], 1, generator=generator, device=scores.device) * cdf[:, -1:]   # (N, 1)
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=scores.shape[1] - 1)      # (N,)


def decode_attention(model) -> str:
    """The attention :func:`decode` runs: SDPA for a model set to eager that has SDPA, else the model's own.
    Eager attention copies each key/value head out for every query head that shares it (``repeat_kv``: 3 → 9
    heads in SmolLM2) at every step, over the whole cache; SDPA reads them in place. 128 rows, 40 new tokens on
    2 CPU cores (2026-12-07): 14.6 → 12.7 s in bf16, 24.7 → 22.4 s in fp32 (120 of 128 fp32 samples identical,
    the others parted by rounding)."""
    name = model.config._attn_implementation
    return "sdpa" if name == "eager" and getattr(model, "_supports_sdpa", False) else name


@torch.no_grad()
def decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, eos_token_id: int,
           pad_token_id: int, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """The sampling loop of ``model.generate`` for a left-padded batch: the prompt through the model once
    (logits of its last position only), then one token per step with the key/value cache, each drawn by
    :func:`draw`; a row that has written ``eos_token_id`` gets ``pad_token_id`` after it, and the loop stops
    when every row has ended. Attention is :func:`decode_attention`'s. Returns the new tokens, ``(N, steps)``
    with ``steps <= max_new_tokens``."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1 (got {max_new_tokens})")
    with attention_implementation(model, decode_attention(model)):
        return _decode(model, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, temperature,
                       top_p)


def _decode(model, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, temperature, top_p):
    N = input_ids.shape[0]
    position = (attention_mask.cumsum(-1) - 1).clamp(min=0)                       # (N, L): left padding
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position, use_cache=True,
                logits_to_keep=1)
    position = position[:, -1:]                                                    # (N, 1)
    cache = "cache" if "cache" in out else "past_key_values"                       # the older transformers 5 name
    done = torch.zeros(N, dtype=torch.bool, device=input_ids.device)
    tokens = []
    for step in range(max_new_tokens):
        token = draw(out.logits[:, -1], temperature, top_p)                        # (N,)
        token = token.masked_fill(done, pad_token_id)
        tokens.append(token)
        done |= token == eos_token_id
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(N, 1)], dim=1)   # (N, L + step + 1)
        position = position + 1
        out = model(input_ids=token[:, None], attention_mask=attention_mask, position_ids=position,
                    use_cache=True, **{cache: out[cache]})
    return torch.stack(tokens, dim=1)                                              # (N, steps)


def complete_reply(text: str, ended: bool, incomplete: str = "trim") -> tuple[str, bool] | None:
    """``(text, trimmed)``: a reply the model ended as it is; a cut one as ``incomplete`` says (``"trim"``: up
    to its last complete sentence, ``trimmed=True`` — also when the cap fell just after a sentence end, since
    the model did not end it there; ``"keep"``: as cut, ``trimmed=False``). ``None``: the reply is dropped
    (``"drop"``, or ``"trim"`` and no sentence ended before the cap)."""
    if ended or incomplete == "keep":
        return text, False
    if incomplete == "drop":
        return None
    ends = [m.end() for m in SENTENCE_END.finditer(text)]
    return (text[:ends[-1]], True) if ends else None


def complete_samples(samples: list[dict], incomplete: str = "trim") -> tuple[list[dict], int]:
    """The samples of :func:`generate` after :func:`complete_reply`: each kept one with its new ``text`` and a
    ``trimmed`` flag; returns ``(kept, dropped)``. ``"keep"`` returns the samples as they are (no flag).
    Samples without ``ended`` count as ended (canned samples)."""
    if incomplete not in INCOMPLETE:
        raise ValueError(f"incomplete={incomplete!r}: expected one of {', '.join(INCOMPLETE)}")
    if incomplete == "keep":
        return list(samples), 0
    kept = []
    for sample in samples:
        done = complete_reply(sample["text"], sample.get("ended", True), incomplete)
        if done is not None:
            kept.append(dict(sample, text=done[0], trimmed=done[1]))
    return kept, len(samples) - len(kept)


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
               incomplete: str = "keep", **generate_kwargs) -> tuple[list[dict], dict]:
    """Best-vs-worst pairs: for each prompt sample ``n`` responses, make the cut ones complete as
    ``incomplete`` says (:func:`complete_samples`; ``"keep"``, the default, leaves them as cut; ``pairs``
    and ``iterate`` trim them by default), score them with ``reward_fn(texts) -> list[float]``, keep the highest as
    chosen and the lowest as rejected (:func:`best_vs_worst`).

    Prompts whose best and worst differ by less than ``min_gap`` (or whose texts are equal, or with
    fewer than two replies left) carry no preference and are skipped. The scores are checked
    (:func:`score_samples`: a failing judge raises :class:`JudgeError`). Returns ``(rows, stats)``;
    ``stats["score_mean"]`` is the judge's mean over the samples kept, ``ended`` / ``trimmed`` /
    ``dropped`` count the samples the model ended, the ones trimmed and the ones dropped.
    """
    prompts = [r["prompt"] for r in prompt_rows]
    samples = generate(model, tokenizer, prompts, n=n, **generate_kwargs)
    kept, dropped = complete_samples(samples, incomplete)
    scores = score_samples(reward_fn, kept, prompts)
    rows, skipped = best_vs_worst(prompt_rows, kept, scores, min_gap)
    return rows, {"prompts": len(prompt_rows), "pairs": len(rows), "skipped_no_preference": skipped,
                  "samples": len(samples), "score_mean": sum(scores) / len(scores) if scores else float("nan"),
                  "ended": sum(s.get("ended", True) for s in samples),
                  "trimmed": sum(s.get("trimmed", False) for s in kept), "dropped": dropped}


def best_vs_worst(prompt_rows: list[dict], samples: list[dict], scores: list[float],
                  min_gap: float = 0.05) -> tuple[list[dict], int]:
    """The pairs of :func:`make_pairs` from scored samples: ``samples[j]`` (a dict with ``prompt_index``
    and ``text``, in any order) has the score ``scores[j]``.

    For each prompt, in the order of ``prompt_rows``, the highest-scored sample is chosen and the
    lowest rejected; the prompt is skipped when ``best - worst < min_gap``, when the two texts are
    equal, when either is empty, or when it has fewer than two samples. Returns ``(rows, skipped)``:
    rows in the course schema (message lists when the prompt is one) plus ``score_chosen`` /
    ``score_rejected`` (and ``chosen_trimmed`` / ``rejected_trimmed`` when the samples carry a
    ``trimmed`` flag: :func:`complete_samples`), and how many prompts were skipped.
    """
    by_prompt: dict[int, list] = {}
    for s, score in zip(samples, scores):
        by_prompt.setdefault(s["prompt_index"], []).append((score, s["text"], s.get("trimmed")))
    rows, skipped = [], 0
    for i, row in enumerate(prompt_rows):
        scored = sorted(by_prompt.get(i, []), key=lambda t: t[0])  # stable: among equal scores, sampling order
        if len(scored) < 2:
            skipped += 1
            continue
        (lo, worst, worst_cut), (hi, best, best_cut) = scored[0], scored[-1]
        if hi - lo < min_gap or best == worst or not best or not worst:
            skipped += 1
            continue
        chosen, rejected = (best, worst)
        if isinstance(row["prompt"], list):
            chosen, rejected = [{"role": "assistant", "content": best}], [{"role": "assistant", "content": worst}]
        rows.append({"prompt": row["prompt"], "chosen": chosen, "rejected": rejected,
                     "score_chosen": round(hi, 4), "score_rejected": round(lo, 4)})
        if best_cut is not None:
            rows[-1].update(chosen_trimmed=best_cut, rejected_trimmed=worst_cut)
    return rows, skipped
