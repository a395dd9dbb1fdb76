"""Ground-truth reward functions for the course's controlled-sentiment task.

The DPO paper (Rafailov et al., 2023, Sec. 6.1) tests DPO on *controlled sentiment
generation*: the policy continues IMDB review prefixes and a pre-trained sentiment
classifier (SiEBERT) plays the role of the true reward r*(x, y). Because r* is known,
the authors can plot the reward a method reaches against its KL to the reference — the
"reward/KL frontier" — instead of only reporting win rates.

This course runs the same experiment at laptop scale and uses **VADER** (Hutto & Gilbert,
2014; the ``vaderSentiment`` package) as r*:

* **cheap** — a lexicon plus a handful of rules; scoring thousands of short answers takes
  well under a second on one CPU core, so it fits inside a training loop;
* **deterministic** — no sampling, no GPU kernels, no floating-point drift between
  machines, so stored notebook outputs and tests are reproducible;
* **offline** — the lexicon ships inside the wheel; nothing is downloaded from a hub;
* **a stand-in, not a judge** — VADER is a crude model of sentiment (it counts "not bad"
  words and exclamation marks), which is exactly what makes it useful for teaching: a
  policy optimised hard against it will find its blind spots, the same reward-hacking a
  learned reward model invites.

The score is VADER's ``compound`` value, a normalised sum of word valences in ``[-1, 1]``
(``-1`` most negative, ``+1`` most positive, ``0`` for empty or neutral text).

Use :func:`get_reward` to look a reward up by name (``"sentiment"``), e.g. from the CLI.
"""

from __future__ import annotations

from typing import Callable, Sequence

RewardFn = Callable[[Sequence[str]], list[float]]

_ANALYZER = None


def _analyzer():
    """The VADER analyzer, built once on first use (loading the lexicon takes ~50 ms)."""
    global _ANALYZER
    if _ANALYZER is None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        _ANALYZER = SentimentIntensityAnalyzer()
    return _ANALYZER


def sentiment_reward(texts: Sequence[str]) -> list[float]:
    """VADER compound sentiment of each text, a float in ``[-1, 1]`` (higher = more positive).

    Pass the *response* only (not the prompt): the reward should judge what the policy wrote.

    >>> pos, neg = sentiment_reward(["What a wonderful, delightful day!", "This is awful."])
    >>> pos > 0 > neg
    True
    """
    if isinstance(texts, str):
        raise TypeError("sentiment_reward expects a list of strings, not a single string; "
                        "wrap it: sentiment_reward([text])")
    analyzer = _analyzer()
    scores = []
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"sentiment_reward expects strings, got {type(text).__name__}")
        scores.append(float(analyzer.polarity_scores(text)["compound"]))
    return scores


REWARDS: dict[str, RewardFn] = {
    "sentiment": sentiment_reward,
}


def get_reward(name: str) -> RewardFn:
    """Return the reward function registered under ``name`` (see :data:`REWARDS`)."""
    if name not in REWARDS:
        known = ", ".join(sorted(REWARDS))
        raise ValueError(f"unknown reward {name!r}; known rewards: {known}")
    return REWARDS[name]


__all__ = ["REWARDS", "RewardFn", "get_reward", "sentiment_reward"]
