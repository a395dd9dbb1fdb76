"""dpo_lib.padding_free: a micro-batch's [prompt | chosen | rejected] rows end to end in one row of real tokens
for the linear layers, attention still pair by pair.

The arithmetic of the layout: rows of n_1 .. n_B real tokens padded to L become one row of T = n_1 + .. + n_B;
row b starts at packed position n_1 + .. + n_(b-1), and its slot (b, j) of the padded layout is packed token
that + j. Every pair keeps its positions and its mask, so the log-probs and gradients are the padded layout's to
float32 rounding.
"""

import pytest
import torch
from _tiny import WORDS, conv_row, tiny, toy_rows

import dpo_lib.padding_free as PF
from dpo_lib.features import collate, tokenize_rows
from dpo_lib.logprobs import concatenated_forward, shared_prompt_layout
from dpo_lib.padding_free import padding_free_layout


def _two_pairs():
    """Pair 0: prompt 9 5 6, chosen 7 1, rejected 7 3 4 (a row of 8); pair 1: prompt 8, chosen 2, rejected 3
    (a row of 3, five padding slots in the padded layout)."""
    return {"input_ids": torch.tensor([[9, 5, 6, 7, 1, 0], [8, 2, 0, 0, 0, 0], [9, 5, 6, 7, 3, 4], [8, 3, 0, 0, 0, 0]]),
            "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0], [1] * 6, [1, 1, 0, 0, 0, 0]]),
            "completion_mask": torch.tensor([[0, 0, 0, 1, 1, 0], [0, 1, 0, 0, 0, 0], [0, 0, 0, 1, 1, 1],
                                             [0, 1, 0, 0, 0, 0]])}


def test_padding_free_layout_lays_the_rows_end_to_end():
    """Padded rows of 8 (pair 0: 9 5 6 | 7 1 | 7 3 4) and 3 (pair 1: 8 | 2 | 3, then 5 padding slots) become one
    row of 11 tokens: pair 1's positions restart at 0 (0 | 1 | 1), its padded slots 8, 9, 10 are packed
    tokens 8, 9, 10, its padding slots 11-15 read token 0 (masked), and the state that scores both of its
    replies' first tokens, its prompt's last (padded (1, 0)), is packed position 8."""
    layout = shared_prompt_layout(_two_pairs())
    packed = padding_free_layout(layout)
    assert layout["input_ids"].shape == (2, 8)
    assert packed["input_ids"].tolist() == [[9, 5, 6, 7, 1, 7, 3, 4, 8, 2, 3]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 4, 5, 0, 1, 1]]
    assert packed["slot"].tolist() == list(range(11))
    assert packed["gather"][packed["slot"]].tolist() == list(range(11))      # gather inverts slot
    assert packed["gather"][11:].tolist() == [0] * 5
    assert packed["hidden_index"].tolist() == [2, 3, 2, 5, 6, 8, 8]


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_padding_free_gives_the_padded_rows_numbers_and_gradients(attention):
    """Pairs of 9 to 60 tokens (padding the short ones to the longest): the summed log-probs and every gradient
    agree with the padded layout's to float32 rounding, and the model's attention setting is put back."""
    model, tok = tiny()
    model.config._attn_implementation = attention
    long = " ".join(WORDS * 3)
    features, _ = tokenize_rows(tok, toy_rows(5) + [conv_row(f"{long}?", f"yes {long}", "no")], max_length=256)
    batch = collate(features, tok.pad_token_id)
    out = {}
    for padding_free in (False, True):
        model.zero_grad(set_to_none=True)
        chosen, rejected = concatenated_forward(model, batch, compact_head=True, shared_prompt=True,
                                                padding_free=padding_free)
        (chosen.sum() - 0.7 * rejected.sum()).backward()
        out[padding_free] = (chosen.detach(), rejected.detach(), [p.grad.clone() for p in model.parameters()])
    assert model.config._attn_implementation == attention
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[True][1], out[False][1], rtol=1e-5, atol=1e-5)
    for g_free, g_padded in zip(out[True][2], out[False][2]):
        torch.testing.assert_close(g_free, g_padded, rtol=1e-4, atol=1e-6)


def test_padding_free_runs_the_packed_row_and_restores_the_attention_on_error(monkeypatch):
    """The model sees one row of the pairs' real tokens (no padding), and an error inside the forward leaves the
    model's attention setting as it was."""
    model, tok = tiny()
    features, _ = tokenize_rows(tok, toy_rows(4), max_length=64)
    batch = collate(features, tok.pad_token_id)
    lengths = batch["attention_mask"].sum(1)                                      # (2B,) real tokens per sequence
    shapes = []
    real = PF._segment_attention
    monkeypatch.setattr(PF, "_segment_attention", lambda *a, **k: shapes.append(a[1].shape) or real(*a, **k))
    with torch.no_grad():
        concatenated_forward(model, batch, compact_head=True, shared_prompt=True, padding_free=True)
    layout = shared_prompt_layout(batch)
    T = int(layout["allowed"][:, 0].diagonal(dim1=-2, dim2=-1).sum())
    assert T < int(lengths.sum())                                                 # each prompt once
    assert {s[0] for s in shapes} == {1} and {s[2] for s in shapes} == {T}        # (1, H, T, D) in every layer

    def broken(*a, **k):
        raise RuntimeError("boom")
    monkeypatch.setattr(PF, "_segment_attention", broken)
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
        concatenated_forward(model, batch, compact_head=True, shared_prompt=True, padding_free=True)
    assert model.config._attn_implementation == "sdpa" and PF._SEGMENTS is None
