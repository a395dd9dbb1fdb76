"""The ground-truth sentiment reward (VADER)."""

from __future__ import annotations

import pytest

from dpo_lib.rewards import REWARDS, get_reward, sentiment_reward

TEXTS = [
    "I loved this film. The acting was wonderful and the ending made me smile.",
    "This phone is terrible. The battery died after an hour and support was useless.",
    "The hotel is on Main Street, next to the station.",
    "",
]


def test_positive_scores_higher_than_negative():
    pos, neg, neutral, empty = sentiment_reward(TEXTS)
    assert pos > 0.5
    assert neg < -0.5
    assert pos > neutral > neg
    assert empty == 0.0


def test_range_and_type():
    scores = sentiment_reward(TEXTS + ["GREAT!!! best day ever :)", "awful, horrible, hateful, disgusting"])
    assert len(scores) == len(TEXTS) + 2
    assert all(isinstance(s, float) and -1.0 <= s <= 1.0 for s in scores)


def test_deterministic():
    assert sentiment_reward(TEXTS) == sentiment_reward(TEXTS)
    assert sentiment_reward(TEXTS[:1]) == sentiment_reward(TEXTS)[:1]  # no batch effects


def test_empty_batch():
    assert sentiment_reward([]) == []


def test_rejects_a_bare_string():
    with pytest.raises(TypeError, match="list of strings"):
        sentiment_reward("a single string")


def test_registry():
    assert REWARDS["sentiment"] is sentiment_reward
    assert get_reward("sentiment") is sentiment_reward
    with pytest.raises(ValueError, match="sentiment"):
        get_reward("helpfulness")
