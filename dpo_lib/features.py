"""Tokenized pairs ("features") and their batches: the chat template, truncation, collation.

Tokenization follows TRL 1.x so that both score exactly the same tokens: the prompt is
rendered with ``add_generation_prompt=True``, prompt+response without it, and the
completion is what comes after their common prefix (normally the whole tokenized prompt:
we count the rows where it is not, see :class:`TokenizeStats`). For ChatML templates the
completion is ``response <|im_end|> \\n``. The chat template is applied once: a duplicated
BOS at the start or a doubled EOS at the end is an error, not a silent loss of signal.

Each feature holds ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (and, once
:func:`dpo_lib.reference.precompute_reference_logps` has run, ``ref_chosen_logps`` /
``ref_rejected_logps``); :func:`collate` stacks a list of them into one padded batch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Iterable

import torch

from dpo_lib.data import DataError, is_conversational

__all__ = ["TokenizeStats", "batch_to", "collate", "collate_sequences", "common_prefix_length", "encode_prompt",
           "length_sorted_batches", "pair_length", "token_ids_hash", "tokenize_pair", "tokenize_rows", "truncate_pair"]


def token_ids_hash(features: Iterable[dict]) -> str:
    """A short SHA-256 of tokenized pairs' ``prompt_ids``, ``chosen_ids``, ``rejected_ids``: the key of
    the reference log-prob cache, and the bench's check that two trainers scored the same tokens."""
    h = hashlib.sha256()
    for f in features:
        h.update(json.dumps([list(f["prompt_ids"]), list(f["chosen_ids"]), list(f["rejected_ids"])]).encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- tokenization

def _encode(tokenizer, value: str | list, **template_kwargs) -> list[int]:
    """Token ids of a string (tokenizer's own special tokens added) or of messages (the chat
    template, tokenized by it: the one place the library applies it, so it is applied once)."""
    if isinstance(value, list):
        out = tokenizer.apply_chat_template(value, tokenize=True, return_dict=True, **template_kwargs)
        return list(out["input_ids"])
    return list(tokenizer(value)["input_ids"])


def encode_prompt(tokenizer, prompt: str | list) -> list[int]:
    """Token ids of a prompt as the model sees it at generation time: messages end with the
    template's assistant header (``add_generation_prompt=True``), as in :func:`tokenize_pair`."""
    return _encode(tokenizer, prompt, add_generation_prompt=True)


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_pair(tokenizer, row: dict) -> dict[str, list[int]]:
    """``prompt_ids``, ``chosen_ids``, ``rejected_ids`` of one row (no truncation).

    Raises :class:`DataError` on a duplicated BOS or a doubled EOS.
    """
    where = row.get("_where", "<row>")
    if is_conversational(row):
        prompt_ids = _encode(tokenizer, row["prompt"], add_generation_prompt=True)
        full = {k: _encode(tokenizer, row["prompt"] + row[k]) for k in ("chosen", "rejected")}
    else:
        eos = tokenizer.eos_token or ""
        prompt_ids = _encode(tokenizer, row["prompt"])
        full = {k: _encode(tokenizer, row["prompt"] + row[k] + ("" if row[k].endswith(eos) else eos))
                for k in ("chosen", "rejected")}
    bos = tokenizer.bos_token_id
    if bos is not None and len(prompt_ids) >= 2 and prompt_ids[0] == prompt_ids[1] == bos:
        raise DataError([f"{where}: duplicated BOS: the chat template writes {tokenizer.bos_token!r} and "
                         "the tokenizer adds it again (encode the rendered text with add_special_tokens=False)"])
    n = min(common_prefix_length(prompt_ids, full["chosen"]), common_prefix_length(prompt_ids, full["rejected"]))
    out = {"prompt_ids": prompt_ids[:n], "chosen_ids": full["chosen"][n:], "rejected_ids": full["rejected"][n:],
           "prompt_is_prefix": n == len(prompt_ids)}
    eos_id = tokenizer.eos_token_id
    for k in ("chosen_ids", "rejected_ids"):
        ids = out[k]
        while ids and not tokenizer.decode(ids[-1:]).strip():  # ignore the template's trailing newline
            ids = ids[:-1]
        if eos_id is not None and len(ids) >= 2 and ids[-1] == ids[-2] == eos_id:
            raise DataError([f"{where}: doubled EOS at the end of {k[:-4]}: the response already ends "
                             f"with {tokenizer.eos_token!r} and the template adds another"])
    return out


@dataclass
class TokenizeStats:
    total: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    prompt_not_prefix: int = 0
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"tokenized {self.total} pairs: kept {self.kept}, truncated {self.truncated}, "
                f"dropped {self.dropped_too_long} whose prompt leaves no room for a response"
                + (f", {self.prompt_not_prefix} whose prompt was not a token prefix" if self.prompt_not_prefix else ""))


def truncate_pair(pair: dict, max_length: int | None, max_prompt_length: int | None,
                  min_response_tokens: int = 1) -> tuple[dict | None, bool]:
    """Keep the *end* of the prompt and the *start* of each response.

    The prompt is cut from the left to ``max_prompt_length``; each response is then cut
    from the right so that prompt + response fits ``max_length``. Returns ``(None, _)``
    when fewer than ``min_response_tokens`` of a response would be left.
    """
    prompt, chosen, rejected = pair["prompt_ids"], pair["chosen_ids"], pair["rejected_ids"]
    before = (len(prompt), len(chosen), len(rejected))
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        prompt = prompt[-max_prompt_length:]
    if max_length is not None:
        budget = max_length - len(prompt)
        if budget < min_response_tokens:
            return None, True
        chosen, rejected = chosen[:budget], rejected[:budget]
    out = dict(pair, prompt_ids=prompt, chosen_ids=chosen, rejected_ids=rejected)
    return out, before != (len(prompt), len(chosen), len(rejected))


def tokenize_rows(tokenizer, rows: list[dict], max_length: int | None = None,
                  max_prompt_length: int | None = None) -> tuple[list[dict], TokenizeStats]:
    """Tokenize and truncate every row. Pairs that cannot fit are dropped and counted,
    each named in ``stats.problems`` as ``FILE:LINE: ...``."""
    stats = TokenizeStats(total=len(rows))
    features = []
    for row in rows:
        pair = tokenize_pair(tokenizer, row)
        stats.prompt_not_prefix += not pair.pop("prompt_is_prefix")
        n_prompt = len(pair["prompt_ids"])
        pair, changed = truncate_pair(pair, max_length, max_prompt_length)
        if pair is None:
            stats.dropped_too_long += 1
            stats.problems.append(f"{row.get('_where', '<row>')}: prompt is {n_prompt} tokens, too long for "
                                  f"max_length={max_length} (raise --max-length or set --max-prompt-length)")
            continue
        stats.truncated += changed
        pair["where"] = row.get("_where", "<row>")
        features.append(pair)
    stats.kept = len(features)
    return features, stats


# ----------------------------------------------------------------------------- collation

def collate_sequences(prompts: list[list[int]], completions: list[list[int]], pad_token_id: int,
                      pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` / ``attention_mask`` / ``completion_mask`` (all ``[N, T]``) of
    prompt+completion sequences. Padding is excluded by ``attention_mask`` and never scored,
    because ``completion_mask`` is 0 there (labels are *masked*, not set to the pad id)."""
    T = max(len(p) + len(c) for p, c in zip(prompts, completions))
    if pad_to_multiple_of:
        T = -(-T // pad_to_multiple_of) * pad_to_multiple_of
    N = len(prompts)
    input_ids = torch.full((N, T), pad_token_id, dtype=torch.long)   # (N, T)
    attention_mask = torch.zeros((N, T), dtype=torch.long)           # (N, T)
    completion_mask = torch.zeros((N, T), dtype=torch.long)          # (N, T)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        input_ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        attention_mask[i, : len(p) + len(c)] = 1
        completion_mask[i, len(p): len(p) + len(c)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def pair_length(feature: dict) -> int:
    """Length of a tokenized pair once collated: its prompt plus the longer of its two responses."""
    return len(feature["prompt_ids"]) + max(len(feature["chosen_ids"]), len(feature["rejected_ids"]))


def length_sorted_batches(features: list[dict], batch_size: int) -> list[list[int]]:
    """Indices of ``features`` in batches of similar length (less padding).

    Sorted by ``(pair_length, index)``, so the same features always give the same batches:
    the reference log-probs and the evaluation of the untrained policy then see identical
    padding, and their implicit rewards are exactly 0, not ~1e-6 apart.
    """
    order = sorted(range(len(features)), key=lambda i: (pair_length(features[i]), i))
    return [order[k:k + batch_size] for k in range(0, len(order), batch_size)]


def collate(features: list[dict], pad_token_id: int, pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """One concatenated batch: rows ``0..B-1`` are prompt+chosen, rows ``B..2B-1`` prompt+rejected.

    Returns ``input_ids``, ``attention_mask``, ``completion_mask`` (all ``[2B, T]``, see
    :func:`collate_sequences`) and, when the features carry them, ``ref_chosen_logps`` /
    ``ref_rejected_logps`` (``[B]``).
    """
    prompts = [f["prompt_ids"] for f in features] * 2
    completions = [f["chosen_ids"] for f in features] + [f["rejected_ids"] for f in features]
    batch = collate_sequences(prompts, completions, pad_token_id, pad_to_multiple_of)
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        if key in features[0]:
            batch[key] = torch.tensor([f[key] for f in features], dtype=torch.float32)
    return batch


def batch_to(batch: dict, device: torch.device | str) -> dict:
    """Every tensor of a collated batch on ``device`` (collate builds batches on the CPU)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
