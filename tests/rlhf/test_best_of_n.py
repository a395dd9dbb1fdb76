"""dpo_lib.rlhf.best_of_n: best-of-N, its unbiased estimate from N samples, sampling and scoring; the expected
numbers are worked out by hand in the comments."""

import math

import pytest
import torch
from _rlhf import close, frac_a

from dpo_lib.models import tiny_model
from dpo_lib.rlhf.best_of_n import best_of_n, best_of_n_kl, expected_best_of_n, sample_and_score
from dpo_lib.rlhf.reward_model import RewardModel, end_of_turn_ids


def test_best_of_n(tok):
    torch.manual_seed(0)
    lm = tiny_model(vocab_size=len(tok), seed=0)
    out = best_of_n(lm, tok, tok.encode("abc"), n=8, reward_fn=frac_a, max_new_tokens=16)
    assert len(out["texts"]) == len(out["rewards"]) == 8
    assert out["best_reward"] == max(out["rewards"]) and out["best"] in out["texts"]
    assert best_of_n_kl(1) == 0.0
    close(best_of_n_kl(4), math.log(4) - 0.75)


def test_expected_best_of_n_equals_brute_force_over_subsets():
    import itertools
    torch.manual_seed(0)
    rewards, proxy = torch.randn(3, 6), torch.randn(3, 6)
    for n in range(1, 7):
        for select in (None, proxy):
            key = rewards if select is None else select
            brute = sum(
                sum(float(rewards[p, max(s, key=lambda j: float(key[p, j]))])
                    for s in itertools.combinations(range(6), n))
                / math.comb(6, n) for p in range(3)) / 3
            close(expected_best_of_n(rewards, n, select), brute, atol=1e-5)
    close(expected_best_of_n(rewards, 1), rewards.mean(), atol=1e-6)        # best of 1 = a plain sample
    close(expected_best_of_n(rewards, 6), rewards.max(1).values.mean(), atol=1e-6)
    with pytest.raises(ValueError):
        expected_best_of_n(rewards, 7)
    per = expected_best_of_n(rewards, 3, proxy, per_prompt=True)                # (P,): their mean is the estimate
    assert per.shape == (3,)
    close(per.mean(), expected_best_of_n(rewards, 3, proxy), atol=1e-6)


def test_sample_and_score_shapes_and_zero_kl_against_itself(tok):
    lm = tiny_model(vocab_size=len(tok), seed=0)
    prompts = [tok.encode("hi"), tok.encode("abc"), tok.encode("x")]
    rm = RewardModel.from_causal_lm(lm)
    out = sample_and_score(lm, tok, prompts, frac_a, max_new_tokens=5, ref_model=lm, n=4, batch_size=5,
                           reward_model=rm, reward_suffix_ids=end_of_turn_ids(tok))
    assert out["rewards"].shape == out["kl"].shape == out["proxy"].shape == (3, 4) and len(out["texts"]) == 12
    close(out["kl"], torch.zeros(3, 4))
    again = sample_and_score(lm, tok, prompts, frac_a, max_new_tokens=5, n=4, batch_size=5)
    assert again["texts"] == out["texts"]        # seeded
    other = sample_and_score(lm, tok, prompts, frac_a, max_new_tokens=5, ref_model=tiny_model(len(tok), seed=5), n=4)
    assert other["kl"].abs().sum() > 0


def _only_token_model(tok, logit_of_eos: float):
    """A tiny LM whose next-token logits are 0 everywhere except EOS's, ``logit_of_eos``; or, with a large positive
    value, EOS and nothing else (the other logits are pushed to -1e4)."""
    lm = tiny_model(vocab_size=len(tok), seed=0)
    lm.lm_head = torch.nn.Linear(lm.config.hidden_size, len(tok), bias=True)   # untied, so the embeddings stay
    with torch.no_grad():
        lm.lm_head.weight.zero_()
        lm.lm_head.bias.fill_(-1e4 if logit_of_eos > 0 else 0.0)
        lm.lm_head.bias[tok.eos_token_id] = logit_of_eos
    return lm


def test_sample_and_score_lengths_count_to_the_eos_and_flag_answers_cut_at_the_cap(tok):
    """A model that can only say EOS ends every answer after 1 token (the EOS counts); one that can never say it
    is cut at the cap, 5 tokens, and no answer is flagged as ended."""
    prompts = [tok.encode("hi"), tok.encode("abc")]
    out = sample_and_score(_only_token_model(tok, 1.0), tok, prompts, frac_a, max_new_tokens=5, n=3)
    torch.testing.assert_close(out["lengths"], torch.ones(2, 3))
    assert out["ended"].all()
    out = sample_and_score(_only_token_model(tok, -1e4), tok, prompts, frac_a, max_new_tokens=5, n=3)
    torch.testing.assert_close(out["lengths"], torch.full((2, 3), 5.0))
    assert not out["ended"].any()
