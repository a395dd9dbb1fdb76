"""Shared builders for the unit tests: tiny models and toy preference rows, made in code."""

from __future__ import annotations

import json
from pathlib import Path

from dpo_lib.config import TrainConfig
from dpo_lib.models import tiny_model, tiny_tokenizer

WORDS = ["great", "awful", "fine", "lovely", "bad", "nice", "poor", "superb"]


def conv_row(prompt: str, chosen: str, rejected: str) -> dict:
    return {"prompt": [{"role": "user", "content": prompt}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def toy_rows(n: int = 16) -> list[dict]:
    """Pairs where the chosen answer is always 'yes...' and the rejected one 'no...'."""
    return [conv_row(f"q{i} {WORDS[i % len(WORDS)]}?", "yes " + WORDS[i % 8] * (1 + i % 3), "no " + WORDS[(i + 3) % 8])
            for i in range(n)]


def tiny(seed: int = 0):
    tok = tiny_tokenizer()
    return tiny_model(len(tok), seed=seed), tok


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def save_tiny(folder: Path, seed: int = 0) -> Path:
    model, tok = tiny(seed)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


# The settings these tests were written against (TrainConfig's defaults before they became the main
# job's): one micro-batch per step in file-order padding, the full LM head, float32, lr 5e-6, 1 epoch.
PLAIN_FP32 = dict(learning_rate=5e-6, grad_accum=1, epochs=1, sort_by_length=False, compact_lm_head=False,
                  precision="fp32")


def train_config(**kw) -> TrainConfig:
    """A TrainConfig of :data:`PLAIN_FP32` with ``kw`` on top."""
    return TrainConfig(**{**PLAIN_FP32, **kw})
