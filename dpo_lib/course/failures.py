r"""Lesson 06's data surgery: the pairs and measurements that make DPO's failures visible.

* :func:`word_swap_pairs` — *minimal pairs* for likelihood displacement (Razin et al. 2024; Pal et al.
  2024): the rejected reply is the chosen one with a few sentiment words turned into their opposites,
  so the two replies share almost every token;
* :func:`ches` — Razin et al.'s centered hidden embedding similarity, the score that predicts which
  pairs displace the chosen reply's likelihood;
* :func:`flip_mask`, :func:`flip_labels`, :func:`clean_accuracy` — label noise at a known rate
  (Mitchell 2023; Chowdhury et al. 2024) and accuracy measured against the clean labels.

The losses that answer these failures are in :mod:`dpo_lib.losses`.
"""

from __future__ import annotations

import random
import re
from typing import Callable

import torch

__all__ = ["ches", "clean_accuracy", "flip_labels", "flip_mask", "swap_words", "word_swap_pairs"]

# positive word -> an opposite that VADER scores as negative; a pair differs where these words occur
SENTIMENT_SWAPS = {
    "great": "terrible", "good": "bad", "love": "hate", "loved": "hated", "amazing": "awful",
    "wonderful": "horrible", "best": "worst", "beautiful": "ugly", "happy": "sad", "enjoy": "hate",
    "enjoyed": "hated", "excellent": "poor", "fantastic": "dreadful", "perfect": "flawed",
    "delicious": "disgusting", "friendly": "rude", "fun": "dull", "exciting": "boring", "nice": "nasty",
    "incredible": "miserable", "pleasant": "unpleasant", "comfortable": "uncomfortable", "joy": "misery",
    "lovely": "awful", "glad": "sorry", "impressive": "disappointing", "recommend": "avoid",
    "awesome": "awful", "stunning": "dismal", "helpful": "useless", "fresh": "stale", "clean": "dirty",
}


def swap_words(text: str, swaps: dict[str, str] = SENTIMENT_SWAPS) -> str:
    """``text`` with every whole word found in ``swaps`` (any case) replaced by its opposite; a capitalised
    word stays capitalised."""
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, swaps)) + r")\b", re.IGNORECASE)

    def opposite(match: re.Match) -> str:
        word = swaps[match.group(0).lower()]
        return word.capitalize() if match.group(0)[0].isupper() else word
    return pattern.sub(opposite, text)


def word_swap_pairs(rows: list[dict], reward_fn: Callable[[list[str]], list[float]],
                    swaps: dict[str, str] = SENTIMENT_SWAPS, min_gap: float = 0.05) -> list[dict]:
    """Minimal preference pairs from conversational rows: every reply (chosen or rejected) that holds a
    word of ``swaps`` becomes ``chosen``, and the same reply with those words swapped ``rejected``. A pair
    is kept when ``reward_fn`` (e.g. VADER) scores the original at least ``min_gap`` above the swapped
    one, so the label is what the ground truth says. Scores are kept as ``score_chosen`` /
    ``score_rejected``. The two replies have (nearly) the same tokens, the setting in which DPO lowers
    the chosen reply's likelihood while it widens the margin (Razin et al. 2024, Sec. 5)."""
    candidates = []
    for row in rows:
        for key in ("chosen", "rejected"):
            text = row[key][-1]["content"]
            swapped = swap_words(text, swaps)
            if swapped != text:
                candidates.append((row["prompt"], text, swapped))
    good = reward_fn([c[1] for c in candidates])
    bad = reward_fn([c[2] for c in candidates])
    return [{"prompt": prompt, "chosen": [{"role": "assistant", "content": text}],
             "rejected": [{"role": "assistant", "content": swapped}], "score_chosen": float(g),
             "score_rejected": float(b)}
            for (prompt, text, swapped), g, b in zip(candidates, good, bad) if g - b >= min_gap]


def ches(chosen_hidden: torch.Tensor, rejected_hidden: torch.Tensor) -> torch.Tensor:
    r"""Length-normalised CHES score of each pair, ``(N,)`` from two ``(N, H)`` tensors.

    Razin et al. 2024 ("Unintentional Unalignment", Sec. 5) measure how alike the two replies are, as the
    model sees them, by their hidden embeddings summed over each reply's tokens; normalised by length,

    .. math::  \mathrm{CHES}(x, y_w, y_l) = \langle \bar h_w, \bar h_l\rangle - \lVert\bar h_w\rVert^2,

    with :math:`\bar h` the mean hidden state over a reply's tokens (``chosen_mean`` / ``rejected_mean`` of
    :func:`dpo_lib.rlhf.frozen_trunk.pair_logps_and_hidden`: the states *at* the reply's tokens, one position
    after the states that predict them in the paper). The higher, the more a gradient step that pushes
    :math:`y_l` down pushes :math:`y_w` down with it; 0 when the two means coincide."""
    return (chosen_hidden * rejected_hidden).sum(-1) - (chosen_hidden * chosen_hidden).sum(-1)   # (N,)


def flip_mask(n: int, rate: float, seed: int = 0) -> list[bool]:
    """Which of ``n`` rows to flip: exactly ``round(rate * n)`` of them, chosen at random with ``seed``."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    flipped = set(random.Random(seed).sample(range(n), round(rate * n)))
    return [i in flipped for i in range(n)]


def flip_labels(rows: list[dict], flip: list[bool]) -> list[dict]:
    """New rows: ``chosen`` and ``rejected`` swapped where ``flip[i]``, every other field kept; ``rows`` unchanged
    (it holds the clean labels the trained model is measured against)."""
    if len(flip) != len(rows):
        raise ValueError(f"flip has {len(flip)} entries for {len(rows)} rows")
    return [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} if f else dict(r) for r, f in zip(rows, flip)]


def clean_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, flipped: torch.Tensor) -> float:
    """The fraction of pairs whose *clean* chosen reply gets the strictly higher reward, from the rewards of the
    noisy rows' ``chosen`` and ``rejected`` replies (``[B]`` each): a flipped row's clean chosen is its noisy
    rejected."""
    clean_chosen = torch.where(flipped, rejected_rewards, chosen_rewards)     # (B,)
    clean_rejected = torch.where(flipped, chosen_rewards, rejected_rewards)   # (B,)
    return (clean_chosen > clean_rejected).float().mean().item()
