"""dpo_lib.course.mask_view: role counts, the logit that scores each token and its log-prob, worked out by
hand on one row (the lesson-02 view itself is exercised in tests/test_tokens.py).

The row: 7 positions, completion_mask [0, 0, 1, 1, 0, 1, 0], attention_mask [1, 1, 1, 1, 1, 1, 0].
Scored: positions 2, 3, 5 (read from logits 1, 2, 4). Before the first scored token: 0, 1 (prompt).
Attended, after the start, not scored: 4 (unscored, a gap). Not attended: 6 (pad).
"""

import math

import pytest
import torch

from dpo_lib.course.mask_view import mask_counts, mask_table, show_mask, token_info, visible
from dpo_lib.models import tiny_tokenizer

IDS = [40, 41, 42, 43, 44, 45, 2]
COMPLETION = [0, 0, 1, 1, 0, 1, 0]
ATTENTION = [1, 1, 1, 1, 1, 1, 0]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_counts_by_hand():
    assert mask_counts(COMPLETION, ATTENTION) == {"prompt": 2, "scored": 3, "unscored": 1, "pad": 1}
    # without an attention mask nothing is padding: position 6 becomes a second unscored token
    assert mask_counts(COMPLETION) == {"prompt": 2, "scored": 3, "unscored": 2, "pad": 0}
    # a batch: row 1 is picked
    assert mask_counts([[1] * 7, COMPLETION], [[1] * 7, ATTENTION], row=1)["unscored"] == 1


def test_uniform_logits_give_minus_log_v_per_scored_token(tok):
    # all-zero logits: every token has probability 1/V, so each scored token's log-prob is -log V
    V = len(tok)
    infos = token_info(tok, IDS, COMPLETION, ATTENTION, logits=torch.zeros(7, V))
    assert [i.role for i in infos] == ["prompt", "prompt", "scored", "scored", "unscored", "scored", "pad"]
    assert [i.scored_by for i in infos] == [None, None, 1, 2, None, 4, None]
    for i in infos:
        if i.mask:
            assert i.logprob == pytest.approx(-math.log(V), abs=1e-5)
        else:
            assert i.logprob is None
    table = mask_table(tok, IDS, COMPLETION, ATTENTION, logits=torch.zeros(7, V))
    assert "7 positions: 2 prompt, 3 scored, 1 unscored, 1 pad" in table
    assert "scored tokens at positions 2..5 are read from logits 1..4" in table
    assert f"sum of their log-probs = {-3 * math.log(V):.4f}" in table
    assert "1 token(s) after the completion started are not scored (positions 4..4)" in table


def test_text_view_marks_by_role(tok):
    text = show_mask(tok, IDS, COMPLETION, ATTENTION).text().splitlines()[0]
    assert text.count("[") == 3 and text.count("{") == 1 and text.endswith("·")   # 3 scored, 1 gap, 1 pad


def test_visible_whitespace():
    assert visible("a\nb\t") == "a↵b→"
    assert visible(" ") == "␣" and visible("  ") == "  "               # only a lone space is marked


def test_shape_errors_say_what_differs(tok):
    with pytest.raises(ValueError, match="shapes differ"):
        token_info(tok, IDS, COMPLETION[:-1])
    with pytest.raises(ValueError, match="logits have 6 positions"):
        token_info(tok, IDS, COMPLETION, logits=torch.zeros(6, len(tok)))
