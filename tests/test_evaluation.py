"""dpo_lib.evaluation: the statistics the lessons print, checked against hand arithmetic (and where
answers end, also on the tiny model's own samples)."""

from __future__ import annotations

import math

import pytest
from _tiny import tiny, toy_rows

from dpo_lib.evaluation import cap_for, ended_by, ending_profile, implicit_reward_accuracy, mean_and_se, win_rate
from dpo_lib.features import tokenize_rows
from dpo_lib.reference import FrozenReference, precompute_reference_logps
from dpo_lib.sampling import generate
from dpo_lib.stats import mean_se

EOS = 9


def test_mean_and_se_hand_case():
    """[1, 2, 3, 6]: mean 3, sample variance (4 + 1 + 0 + 9) / 3 = 14/3, SE sqrt(14/3 / 4)."""
    mean, se = mean_and_se([1.0, 2.0, 3.0, 6.0])
    assert mean == 3.0
    assert se == pytest.approx(math.sqrt(14 / 3 / 4))
    assert math.isnan(mean_and_se([2.0])[1])


def test_mean_and_se_is_stats_mean_se_and_reports_broken_values_as_nan():
    """The tuple of dpo_lib.stats.mean_se; where stats refuses (no values, a NaN or an inf) a run's evaluation
    gets (nan, nan) instead, so the figures beside it are still written."""
    e = mean_se([1.0, 2.0, 3.0, 6.0])
    assert mean_and_se([1.0, 2.0, 3.0, 6.0]) == (e.value, e.se)
    for broken in ([], [1.0, float("nan")], [float("inf"), 1.0]):
        assert all(math.isnan(x) for x in mean_and_se(broken)), broken


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


# ----------------------------------------------------------------------------- where answers end

def answers(*specs):
    """(length, ended) -> a sample whose response has that many tokens, the last EOS when it ended."""
    return [{"response_ids": [5] * (n - 1) + [EOS if ended else 7]} for n, ended in specs]


def test_fractions_by_hand():
    """Lengths 3, 5, 2 ended (EOS counted), one cut at the cap of 8. Caps 2, 4, 8:
    ended within 2: {2} -> 1/4; within 4: {2, 3} -> 2/4; within 8: 3/4; mean ended length (3+5+2)/3."""
    p = ending_profile(answers((3, True), (5, True), (8, False), (2, True)), EOS, 8, caps=[2, 4])
    assert p["caps"] == [2, 4, 8]                         # the cap itself is always a column
    assert p["ended_by"] == [0.25, 0.5, 0.75]
    assert p["ended"] == 0.75 and p["mean_length_ended"] == pytest.approx(10 / 3) and p["samples"] == 4
    assert cap_for(p, 0.5) == 4 and cap_for(p, 0.25) == 2 and cap_for(p, 0.9) is None


def test_an_answer_ending_on_the_last_allowed_token_has_ended_and_caps_above_the_limit_are_dropped():
    p = ending_profile(answers((8, True), (8, False)), EOS, 8)
    assert p["caps"] == [8]                                # 16, 32, ... are above max_new_tokens
    assert p["ended_by"] == [0.5]
    p = ending_profile(answers((4, False)), EOS, 100)
    assert p["caps"] == [16, 32, 64, 96, 100] and p["ended"] == 0 and p["mean_length_ended"] is None
    with pytest.raises(ValueError, match="no samples"):
        ending_profile([], EOS, 8)


def test_profile_of_sampled_answers_matches_their_tokens():
    model, tok = tiny()
    prompts = [[{"role": "user", "content": w}] for w in ("Hi", "Tell me", "Why?", "Ok")]
    samples = generate(model, tok, prompts, n=4, max_new_tokens=24, seed=3, progress=False)
    p = ending_profile(samples, tok.eos_token_id, 24, caps=[4, 8, 16])
    lengths = [s["response_ids"].index(tok.eos_token_id) + 1 for s in samples if tok.eos_token_id in s["response_ids"]]
    assert all(len(s["response_ids"]) == 24 for s in samples if tok.eos_token_id not in s["response_ids"])
    assert 0 < len(lengths) < len(samples)                 # some end, some are cut: both cases are counted
    assert p["ended_by"] == [sum(n <= c for n in lengths) / 16 for c in (4, 8, 16, 24)]
    assert p["ended_by"] == sorted(p["ended_by"])


def test_heldout_chosen_reward_and_margin_with_their_ses():
    """implicit_reward_accuracy's chosen reward and margin are the means over the held-out pairs of
    r̂_w = β·(log π(y_w) − log π_ref(y_w)) and r̂_w − r̂_l, each with the SE of dpo_lib.stats.mean_se: here the
    policy is the tiny model of seed 0 and the reference the one of seed 1, so the rewards are not 0; the
    policy's own log-probs come from the same length-sorted batches (precompute_reference_logps on it)."""
    model, tok = tiny(seed=0)
    features, _ = tokenize_rows(tok, toy_rows(9))
    held = precompute_reference_logps(FrozenReference(tiny(seed=1)[0]), features, tok.pad_token_id)
    own = precompute_reference_logps(FrozenReference(model), features, tok.pad_token_id)
    beta = 0.1
    chosen = [beta * (p["ref_chosen_logps"] - r["ref_chosen_logps"]) for p, r in zip(own, held)]
    margin = [c - beta * (p["ref_rejected_logps"] - r["ref_rejected_logps"]) for c, p, r in zip(chosen, own, held)]
    got = implicit_reward_accuracy(model, held, tok.pad_token_id, beta=beta)
    for key, values in (("chosen_reward", chosen), ("margin", margin)):
        e = mean_se(values)
        assert e.se > 0 and abs(e.value) > 1e-3                      # the reference differs: rewards are not 0
        assert got[key] == pytest.approx(e.value, abs=1e-5) and got[f"{key}_se"] == pytest.approx(e.se, abs=1e-5)


@pytest.mark.parametrize("scoring", [{}, {"compact_head": True}, {"compact_head": True, "shared_prompt": True},
                                     {"compact_head": True, "shared_prompt": True, "padding_free": True}])
def test_untrained_policy_scored_as_its_reference_has_rewards_exactly_zero(scoring):
    """The reference log-probs precomputed by FrozenReference(model, **scoring) and the policy scored by
    implicit_reward_accuracy(..., **scoring) (the same length-sorted batches, the same layout): every implicit
    reward is exactly 0, so the strict accuracy is 0 and the margin and chosen reward 0 with SE 0; the
    HeldoutEval callback passes the same switches on."""
    from dpo_lib.config import TrainConfig
    from dpo_lib.evaluation import HeldoutEval, untrained_accuracy
    model, tok = tiny(seed=0)
    features, _ = tokenize_rows(tok, toy_rows(11))
    held = precompute_reference_logps(FrozenReference(model, **scoring), features, tok.pad_token_id)  # batches of 8
    got = implicit_reward_accuracy(model, held, tok.pad_token_id, beta=0.1, **scoring)
    assert (got["accuracy"], got["margin"], got["margin_se"], got["chosen_reward"]) == (0.0, 0.0, 0.0, 0.0)
    assert got == untrained_accuracy(len(held))  # what the main job reports before training, without measuring

    class Trainer:  # what HeldoutEval reads of a trainer
        step, total_steps, config = 1, 1, TrainConfig(precision="fp32")
        model = None
    trainer = Trainer()
    trainer.model = model
    callback = HeldoutEval(held, tok.pad_token_id, every=1, **scoring)
    metrics: dict = {}
    callback(trainer, metrics)
    assert metrics["eval/margin"] == 0.0 and metrics["eval/accuracy"] == 0.0


def test_sequence_kl_with_the_compact_head_equals_the_full_head():
    """sequence_kl(..., compact_head=True) scores both models on the response positions only: the same estimate
    as the full head to float32 rounding (policy: tiny seed 0, reference: tiny seed 1, so the KL is not 0; each
    term is a difference of two sums of tens of nats, so the rounding is ~1e-6 nats, checked at 1e-5)."""
    from dpo_lib.evaluation import sequence_kl
    policy, tok = tiny(seed=0)
    reference = tiny(seed=1)[0]
    samples = generate(policy, tok, [r["prompt"] for r in toy_rows(5)], n=2, max_new_tokens=6, seed=3,
                       progress=False)
    full = sequence_kl(policy, reference, samples, tok.pad_token_id)
    compact = sequence_kl(policy, reference, samples, tok.pad_token_id, compact_head=True)
    assert abs(full[0]) > 1e-2
    assert compact[0] == pytest.approx(full[0], abs=1e-5) and compact[1] == pytest.approx(full[1], abs=1e-5)
