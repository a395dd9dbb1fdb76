"""dpo_lib.sampling.decode / draw: the decode loop against transformers' model.generate, the draw against the
softmax it samples from."""

from __future__ import annotations

import pytest
import torch
from _tiny import tiny, toy_rows

from dpo_lib.features import encode_prompt
from dpo_lib.sampling import decode, draw, generate, left_pad


def _left_padded(tok, prompts):
    return left_pad([encode_prompt(tok, p) for p in prompts], tok.pad_token_id)


def test_greedy_decode_is_model_generate_token_for_token_with_eos_and_padding():
    """Greedy (temperature 0) on left-padded prompts of different lengths: decode's tokens equal model.generate's,
    including a row that writes the EOS early (pad after it) and the stop once every row has ended. The EOS is
    chosen as the token row 0 writes third, so that row ends while the others go on."""
    model, tok = tiny(seed=0)
    model.eval()
    input_ids, attention = _left_padded(tok, [r["prompt"] for r in toy_rows(5)])
    assert attention.sum(1).unique().numel() > 1                                   # prompts of different lengths
    free = model.generate(input_ids=input_ids, attention_mask=attention, do_sample=False, max_new_tokens=10,
                          pad_token_id=tok.pad_token_id, eos_token_id=None)[:, input_ids.shape[1]:]
    eos = int(free[0, 2])
    want = model.generate(input_ids=input_ids, attention_mask=attention, do_sample=False, max_new_tokens=10,
                          pad_token_id=tok.pad_token_id, eos_token_id=eos)[:, input_ids.shape[1]:]
    got = decode(model, input_ids, attention, 10, eos, tok.pad_token_id, temperature=0)
    assert torch.equal(got, want)
    assert (got[0, 3:] == tok.pad_token_id).all()                                  # row 0 ended at its third token


def test_generate_greedy_samples_are_the_same_with_either_sampler():
    model, tok = tiny(seed=1)
    prompts = [r["prompt"] for r in toy_rows(6)]
    ours = generate(model, tok, prompts, max_new_tokens=8, temperature=0, batch_size=4, progress=False)
    theirs = generate(model, tok, prompts, max_new_tokens=8, temperature=0, batch_size=4, progress=False, sampler="hf")
    assert [s["response_ids"] for s in ours] == [s["response_ids"] for s in theirs]
    assert [s["ended"] for s in ours] == [s["ended"] for s in theirs]
    with pytest.raises(ValueError, match="sampler"):
        generate(model, tok, prompts, sampler="beam")


def test_generate_is_reproducible_from_its_seed():
    model, tok = tiny(seed=0)
    prompts = [r["prompt"] for r in toy_rows(4)]
    a, b, c = (generate(model, tok, prompts, n=2, max_new_tokens=6, seed=s, progress=False) for s in (5, 5, 6))
    assert [x["response_ids"] for x in a] == [x["response_ids"] for x in b] != [x["response_ids"] for x in c]


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (1.0, 0.8)])
def test_draw_frequencies_are_the_softmax_it_samples_from(temperature, top_p):
    """20 000 draws from one row of 6 logits: each token's frequency within 4.5 SE (binomial) of
    softmax(logits / T), renormalised on transformers' TopPLogitsWarper nucleus when top_p < 1; tokens outside
    the nucleus are never drawn."""
    from transformers.generation.logits_process import TopPLogitsWarper
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    scores = logits / temperature
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    p = scores.softmax(-1)[0].double()                                             # (6,)
    n = 20_000
    tokens = draw(logits.expand(n, -1), temperature, top_p, torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=6).double() / n
    se = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() <= 4.5 * se + 1e-12).all(), (freq, p)
    if top_p < 1:
        assert (p == 0).any() and (freq[p == 0] == 0).all()


def test_decode_refuses_zero_new_tokens():
    model, tok = tiny(seed=0)
    input_ids, attention = _left_padded(tok, [r["prompt"] for r in toy_rows(2)])
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        decode(model, input_ids, attention, 0, 2, tok.pad_token_id)


def test_draw_at_temperature_zero_is_the_argmax():
    scores = torch.randn(7, 50, generator=torch.Generator().manual_seed(1))
    assert torch.equal(draw(scores, temperature=0), scores.argmax(-1))


def test_sampling_batch_size_keeps_the_cache_within_its_token_budget():
    """16 384 prompt + new tokens in the cache, at most 128 rows, at least 1: 45 + 40 -> 128 (192 would fit);
    45 + 512 -> 16 384 // 557 = 29; a prompt longer than the budget -> 1."""
    from dpo_lib.sampling import sampling_batch_size
    assert (sampling_batch_size(45, 40), sampling_batch_size(45, 512), sampling_batch_size(20_000, 10)) == (128, 29, 1)


def test_decode_runs_an_eager_model_on_sdpa_and_gives_it_back_its_eager_attention(monkeypatch):
    """A model set to eager attention: decode's forwards call the SDPA function (counted through a wrapper
    registered in its place), its greedy tokens are model.generate's under eager attention, and the model is
    eager again afterwards, also when a forward raises."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from dpo_lib.sampling import decode_attention
    model, tok = tiny(seed=2)
    model.eval()
    model.config._attn_implementation = "eager"
    assert decode_attention(model) == "sdpa"
    input_ids, attention = _left_padded(tok, [r["prompt"] for r in toy_rows(4)])
    want = model.generate(input_ids=input_ids, attention_mask=attention, do_sample=False, max_new_tokens=6,
                          pad_token_id=tok.pad_token_id, eos_token_id=None)[:, input_ids.shape[1]:]
    calls = []
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa",
                        lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    got = decode(model, input_ids, attention, 6, -1, tok.pad_token_id, temperature=0)
    assert torch.equal(got, want)
    assert len(calls) == 6 * model.config.num_hidden_layers                        # every layer of every forward
    assert model.config._attn_implementation == "eager"
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        decode(model, input_ids, attention, 6, -1, tok.pad_token_id, temperature=0)
    assert model.config._attn_implementation == "eager"
