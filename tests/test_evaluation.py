"""dpo_lib.evaluation: the statistics the lessons print, checked against hand arithmetic."""

from __future__ import annotations

import math

import pytest

from dpo_lib.evaluation import ended_by, mean_and_se, win_rate

EOS = 9


def test_mean_and_se_hand_case():
    """[1, 2, 3, 6]: mean 3, sample variance (4 + 1 + 0 + 9) / 3 = 14/3, SE sqrt(14/3 / 4)."""
    mean, se = mean_and_se([1.0, 2.0, 3.0, 6.0])
    assert mean == 3.0
    assert se == pytest.approx(math.sqrt(14 / 3 / 4))
    assert math.isnan(mean_and_se([2.0])[1])


def test_win_rate_counts_ties_as_half():
    """Policy vs reference per prompt: win, tie, loss, win -> (1 + 0.5 + 0 + 1) / 4 = 0.625."""
    wins, se = win_rate([0.9, 0.2, 0.1, 0.5], [0.1, 0.2, 0.3, 0.4])
    assert wins == 0.625
    assert se == pytest.approx(mean_and_se([1, 0.5, 0, 1])[1])


def test_ended_by_counts_only_answers_that_emit_eos_before_the_cap():
    """Three answers, cap 3: one ends with its 1st token, one with its 2nd, one is cut (no EOS).
    Ended within t tokens: t=1 -> 1/3, t=2 -> 2/3, t=3 -> 2/3 (the cut one never counts)."""
    samples = [{"response_ids": [EOS]}, {"response_ids": [5, EOS]}, {"response_ids": [5, 5, 5]}]
    assert ended_by(samples, EOS, cap=3) == [1 / 3, 2 / 3, 2 / 3]
    # a shorter cap truncates the curve; an EOS beyond the cap does not count
    assert ended_by([{"response_ids": [5, 5, EOS]}], EOS, cap=2) == [0.0, 0.0]


def test_ended_by_refuses_a_cap_below_one():
    with pytest.raises(ValueError, match="cap"):
        ended_by([{"response_ids": [EOS]}], EOS, cap=0)
