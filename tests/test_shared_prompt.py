"""dpo_lib.logprobs: the shared-prompt layout, one row [prompt | chosen | rejected] per pair.

The arithmetic: in the two-row layout a pair costs 2P + C + R token passes; shared, P + C + R. Every
scored token sees the same context at the same rotary positions in both layouts (the rejected tokens'
attention to the chosen ones is masked, their positions restart at P), so the summed log-probs, and
their gradients, agree to float32 rounding; a 3-token prompt with replies of 2 and 4 tokens gives
positions 0 1 2 | 3 4 | 3 4 5 6.
"""

import pytest
import torch
from _tiny import conv_row, tiny, toy_rows

from dpo_lib.features import collate, tokenize_rows
from dpo_lib.logprobs import concatenated_forward, shared_prompt_layout


def _batch(tok, n=6):
    features, _ = tokenize_rows(tok, toy_rows(n), max_length=64)
    return collate(features, tok.pad_token_id)


def test_layout_positions_mask_and_scored_tokens():
    batch = {"input_ids": torch.tensor([[9, 5, 6, 7, 1, 2, 0, 0], [9, 5, 6, 7, 3, 4, 4, 8]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0], [1] * 8]),
             "completion_mask": torch.tensor([[0, 0, 0, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1, 1, 0]])}
    # the chosen row scores tokens 7 1 after prompt 9 5 6 (its trailing 2 is not scored); rejected: 7 3 4 4
    lay = shared_prompt_layout(batch)
    assert lay["input_ids"].tolist() == [[9, 5, 6, 7, 1, 7, 3, 4, 4]]
    assert lay["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 4, 5, 6]]
    allowed = lay["allowed"][0, 0]
    assert allowed[5].tolist() == [True, True, True, False, False, True, False, False, False]  # rejected's 7
    assert allowed[4].tolist() == [True] * 5 + [False] * 4                                     # chosen: causal
    assert lay["targets"].tolist() == [7, 1, 7, 3, 4, 4]
    assert lay["hidden_index"][:, 1].tolist() == [2, 3, 2, 5, 6, 7]   # the prompt's last state scores both firsts
    assert lay["out_rows"].tolist() == [0, 0, 1, 1, 1, 1]


def test_layout_refuses_pairs_with_different_prompts():
    batch = {"input_ids": torch.tensor([[9, 5, 7], [9, 6, 7]]), "attention_mask": torch.ones(2, 3, dtype=torch.long),
             "completion_mask": torch.tensor([[0, 0, 1], [0, 0, 1]])}
    assert shared_prompt_layout(batch) is None


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("average", [False, True])
def test_same_logps_and_gradients_as_two_rows(attention, average):
    model, tok = tiny()
    model.config._attn_implementation = attention
    batch = _batch(tok)
    out = {}
    for shared in (False, True):
        model.zero_grad(set_to_none=True)
        chosen, rejected = concatenated_forward(model, batch, average=average, compact_head=True, shared_prompt=shared)
        (chosen.sum() - 0.7 * rejected.sum()).backward()
        out[shared] = (chosen.detach(), rejected.detach(), [p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[True][1], out[False][1], rtol=1e-5, atol=1e-5)
    for g_shared, g_rows in zip(out[True][2], out[False][2]):
        torch.testing.assert_close(g_shared, g_rows, rtol=1e-4, atol=1e-6)


def test_falls_back_when_the_attention_cannot_take_a_mask(monkeypatch):
    model, tok = tiny()
    batch = _batch(tok, 4)
    expected = concatenated_forward(model, batch, compact_head=True)
    monkeypatch.setattr("dpo_lib.logprobs.SHARED_PROMPT_ATTENTION", ("flash_attention_2",))  # sdpa not among them
    got = concatenated_forward(model, batch, compact_head=True, shared_prompt=True)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_left_padded_prompts_of_different_lengths():
    model, tok = tiny()
    rows = [conv_row("a much longer question here?", "yes", "no no"), conv_row("hi?", "fine thanks a lot", "bad")]
    features, _ = tokenize_rows(tok, rows, max_length=64)
    batch = collate(features, tok.pad_token_id)
    with torch.no_grad():
        two = concatenated_forward(model, batch, compact_head=True)
        one = concatenated_forward(model, batch, compact_head=True, shared_prompt=True)
    for a, b in zip(one, two):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
