"""Tests of dpo_lib.rlhf (reward_model, ppo, frozen_trunk, best_of_n, masks) and dpo_lib.tools.memory: every
expected number below is worked out by hand in the comments."""

import copy
import math

import pytest
import torch
from torch import nn

from dpo_lib.logprobs import sequence_logprobs
from dpo_lib.models import tiny_model, tiny_tokenizer
from dpo_lib.rlhf.best_of_n import best_of_n, best_of_n_kl, expected_best_of_n, sample_and_score
from dpo_lib.rlhf.frozen_trunk import FrozenTrunk, pair_logps_and_hidden, train_only_top_blocks
from dpo_lib.rlhf.masks import entropy_from_logits, left_pad, mask_after_eos
from dpo_lib.rlhf.ppo import (
    AdaptiveKLController,
    FixedKLController,
    PolicyWithValue,
    PPOConfig,
    PPOTrainer,
    closed_turns,
    compute_gae,
    kl_shaped_rewards,
    ppo_policy_loss,
    ppo_value_loss,
    response_forward,
    rollout,
    sequence_kl,
)
from dpo_lib.rlhf.reward_model import RewardModel, end_of_turn_ids, reward_model_loss, train_reward_head
from dpo_lib.tools.memory import PeakMemory, megabytes

T = torch.tensor


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run ~10x faster on one thread than on 2 oversubscribed cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def close(a, b, atol=1e-6):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32),
                               atol=atol, rtol=0)


# ------------------------------------------------------------------ GAE


def test_gae_hand_example():
    # r = [1, 0, 2], V = [0.5, 1.0, 1.5], gamma = 0.9, lam = 0.8, V after the end = 0.
    # delta_2 = 2 + 0.9*0 - 1.5 = 0.5          A_2 = 0.5
    # delta_1 = 0 + 0.9*1.5 - 1.0 = 0.35       A_1 = 0.35 + 0.72*0.5 = 0.71
    # delta_0 = 1 + 0.9*1.0 - 0.5 = 1.4        A_0 = 1.4 + 0.72*0.71 = 1.9112
    adv, ret = compute_gae(T([[1.0, 0.0, 2.0]]), T([[0.5, 1.0, 1.5]]), gamma=0.9, lam=0.8)
    close(adv, [[1.9112, 0.71, 0.5]])
    close(ret, [[2.4112, 1.71, 2.0]])  # returns = advantages + values


def test_gae_gamma_lam_one_is_reward_to_go_minus_value():
    # reward-to-go of [1, 2, 3] is [6, 5, 3]; minus V = [0.5, 0.25, 4]
    adv, ret = compute_gae(T([[1.0, 2.0, 3.0]]), T([[0.5, 0.25, 4.0]]), gamma=1.0, lam=1.0)
    close(adv, [[5.5, 4.75, -1.0]])
    close(ret, [[6.0, 5.0, 3.0]])


def test_gae_lam_zero_is_one_step_td_error():
    # gamma = 0.5: delta = [1 + 0.5*2 - 1, 2 + 0.5*4 - 2, 3 + 0 - 4] = [1, 2, -1]
    adv, _ = compute_gae(T([[1.0, 2.0, 3.0]]), T([[1.0, 2.0, 4.0]]), gamma=0.5, lam=0.0)
    close(adv, [[1.0, 2.0, -1.0]])


def test_gae_value_after_last_step_is_zero():
    # one step, no reward, V = 3: nothing is bootstrapped after the end, so A = 0 + 0 - 3
    adv, ret = compute_gae(T([[0.0]]), T([[3.0]]), gamma=1.0, lam=1.0)
    close(adv, [[-3.0]])
    close(ret, [[0.0]])


def test_gae_masks_padded_steps():
    # row 0 has 2 valid steps then padding with junk reward/value; it must equal the unpadded row
    rewards = T([[1.0, 2.0, 100.0], [1.0, 2.0, 3.0]])
    values = T([[0.5, 0.25, 50.0], [0.5, 0.25, 4.0]])
    mask = T([[1, 1, 0], [1, 1, 1]])
    adv, ret = compute_gae(rewards, values, gamma=1.0, lam=1.0, mask=mask)
    # row 0: reward-to-go [3, 2] minus V [0.5, 0.25]; padded step 0
    close(adv[0], [2.5, 1.75, 0.0])
    close(ret[0], [3.0, 2.0, 0.0])
    close(adv[1], [5.5, 4.75, -1.0])
    ref_adv, _ = compute_gae(rewards[:1, :2], values[:1, :2], gamma=0.9, lam=0.7)
    close(compute_gae(rewards, values, gamma=0.9, lam=0.7, mask=mask)[0][0, :2], ref_adv[0])


# ------------------------------------------------------------------ PPO losses


def test_policy_loss_at_ratio_one_is_minus_mean_advantage():
    adv = T([[1.0, 2.0, 3.0], [4.0, 5.0, 99.0]])
    mask = T([[1, 1, 1], [1, 1, 0]])          # the 99 is padding: mean over 5 tokens = 15/5
    logp = T([[-1.0, -2.0, -0.5], [-3.0, -0.1, -7.0]])
    loss, clipfrac, approx_kl = ppo_policy_loss(logp, logp.clone(), adv, mask, clip_range=0.2)
    close(loss, -3.0)
    close(clipfrac, 0.0)
    close(approx_kl, 0.0)


@pytest.mark.parametrize("advantage, ratio, expected_loss, clipped, expected_grad", [
    # A > 0: min(1.5*2, 1.2*2) = 2.4 -> clipped at 1+eps, no gradient pushes the ratio further up
    (2.0, 1.5, -2.4, True, 0.0),
    # A > 0, ratio below 1-eps: min(0.5*2, 0.8*2) = 1.0 -> NOT clipped; d(-A*rho)/dlogp = -A*rho = -1
    (2.0, 0.5, -1.0, False, -1.0),
    # A < 0, ratio below 1-eps: min(0.5*-2, 0.8*-2) = -1.6 -> clipped at 1-eps, no gradient
    (-2.0, 0.5, 1.6, True, 0.0),
    # A < 0, ratio above 1+eps: min(1.5*-2, 1.2*-2) = -3 -> NOT clipped; gradient -A*rho = 3
    (-2.0, 1.5, 3.0, False, 3.0),
])
def test_policy_loss_clips_only_in_the_direction_that_matters(advantage, ratio, expected_loss, clipped, expected_grad):
    old = T([[-1.0]])
    logp = (old + math.log(ratio)).requires_grad_(True)
    loss, clipfrac, _ = ppo_policy_loss(logp, old, T([[advantage]]), T([[1]]), clip_range=0.2)
    loss.backward()
    close(loss, expected_loss, atol=1e-5)
    close(clipfrac, 1.0 if clipped else 0.0)
    close(logp.grad, [[expected_grad]], atol=1e-5)


def test_value_loss_clipping_hand_case():
    # eps = 0.2, old value 1 everywhere
    # col 0: V=2,   G=3:   V_clip=1.2; (2-3)^2=1 < (1.2-3)^2=3.24 -> 3.24 (clipped)
    # col 1: V=1.1, G=3:   inside the range -> (1.1-3)^2 = 3.61
    # col 2: V=2,   G=1.5: (2-1.5)^2=0.25 > (1.2-1.5)^2=0.09 -> 0.25 (clipping does not help the value)
    # col 3: padding, ignored
    values = T([[2.0, 1.1, 2.0, 40.0]])
    old = T([[1.0, 1.0, 1.0, 1.0]])
    returns = T([[3.0, 3.0, 1.5, -40.0]])
    loss, clipfrac = ppo_value_loss(values, old, returns, T([[1, 1, 1, 0]]), clip_range_value=0.2)
    close(loss, 0.5 * (3.24 + 3.61 + 0.25) / 3, atol=1e-5)
    close(clipfrac, 1 / 3, atol=1e-6)


def test_kl_shaped_rewards_hand_case():
    logp = T([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]])
    ref = T([[-1.5, -2.0, -1.0], [-2.0, 0.0, 0.0]])
    mask = T([[1, 1, 1], [1, 1, 0]])
    # beta = 0.5. row 0: -0.5*[0.5, 0, -2] = [-0.25, 0, 1], + score 10 at t=2
    #             row 1: -0.5*[1, -1, (masked)] = [-0.5, 0.5, 0], + score 20 at t=1 (its last token)
    rewards = kl_shaped_rewards(T([10.0, 20.0]), logp, ref, mask, kl_coef=0.5)
    close(rewards, [[-0.25, 0.0, 11.0], [-0.5, 20.5, 0.0]])
    # summed over tokens: score - beta * sequence log-ratio
    close(rewards.sum(-1), T([10.0, 20.0]) - 0.5 * ((logp - ref) * mask).sum(-1))


def test_mask_after_eos():
    eos = 2
    ids = T([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9]])
    close(mask_after_eos(ids, eos), [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])


def test_entropy_from_logits():
    logits = torch.randn(2, 3, 7)
    expected = torch.distributions.Categorical(logits=logits).entropy()
    close(entropy_from_logits(logits), expected, atol=1e-5)
    close(entropy_from_logits(torch.zeros(1, 2, 10)), [[math.log(10)] * 2], atol=1e-6)


# ------------------------------------------------------------------ reward model


def test_reward_model_loss_and_accuracy():
    loss, acc = reward_model_loss(T([0.3, -1.0]), T([0.3, -1.0]))
    close(loss, math.log(2))  # equal rewards: a coin flip
    close(acc, 0.0)           # ties are not correct
    loss, acc = reward_model_loss(T([1.0, 2.0, 3.0]), T([0.0, 3.0, 1.0]))
    # margins 1, -1, 2: -log sigma(m) = log(1 + exp(-m))
    close(loss, (math.log1p(math.exp(-1)) + math.log1p(math.exp(1)) + math.log1p(math.exp(-2))) / 3, atol=1e-6)
    close(acc, 2 / 3)


def test_reward_model_reads_last_non_pad_token():
    lm = tiny_model(seed=1)
    rm = RewardModel.from_causal_lm(lm)
    assert rm.backbone is not lm.model  # a copy: training the reward model leaves the policy alone
    seq = T([[1, 40, 41, 42, 43, 44]])        # pad id is 2; the sequence must not end in it for this test
    alone = rm(seq, torch.ones_like(seq))
    right = rm(T([[1, 40, 41, 42, 43, 44, 2, 2, 2]]), T([[1, 1, 1, 1, 1, 1, 0, 0, 0]]))
    left = rm(T([[2, 2, 1, 40, 41, 42, 43, 44]]), T([[0, 0, 1, 1, 1, 1, 1, 1]]))
    close(right, alone, atol=1e-5)
    close(left, alone, atol=1e-4)
    # reading the last *position* instead would see a pad token: a different number
    naive = rm(T([[1, 40, 41, 42, 43, 44, 2, 2, 2]]), torch.ones(1, 9, dtype=torch.long))
    assert (naive - alone).abs().item() > 1e-4


# ------------------------------------------------------------------ KL controllers


def test_adaptive_kl_controller_moves_towards_target():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=100)
    ctl.update(current_kl=6.6, n_steps=10)    # e = 0.1 -> beta * (1 + 0.1 * 0.1)
    close(ctl.value, 0.101)
    ctl = AdaptiveKLController(0.1, 6.0, 100)
    ctl.update(current_kl=60.0, n_steps=10)   # e = 9 clipped to 0.2 -> beta * 1.02
    close(ctl.value, 0.102)
    ctl = AdaptiveKLController(0.1, 6.0, 100)
    ctl.update(current_kl=1.0, n_steps=10)    # below target -> coefficient goes down
    assert ctl.value < 0.1
    fixed = FixedKLController(0.1)
    fixed.update(60.0, 10)
    assert fixed.value == 0.1


# ------------------------------------------------------------------ policy, rollout, PPO


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def frac_a(texts):
    return [t.count("a") / max(len(t), 1) for t in texts]


def test_policy_with_value_one_forward(tok):
    lm = tiny_model(vocab_size=len(tok), seed=0)
    policy = PolicyWithValue(lm)
    ids = T([[1, 40, 41, 42]])
    logits, values = policy(ids, torch.ones_like(ids))
    close(logits, lm(input_ids=ids).logits, atol=1e-5)
    assert values.shape == (1, 4)


def test_rollout_masks_after_eos_and_is_padding_invariant(tok):
    torch.manual_seed(0)
    lm = tiny_model(vocab_size=len(tok), seed=0)
    policy = PolicyWithValue(lm)
    ref = tiny_model(vocab_size=len(tok), seed=3)
    prompts = [tok.encode("hello there"), tok.encode("x"), tok.encode("abc")] * 4
    batch = rollout(policy, tok, prompts, max_new_tokens=12, ref_model=ref)
    B, R = batch.response_ids.shape
    assert batch.logprobs.shape == batch.ref_logprobs.shape == batch.values.shape == batch.response_mask.shape == (B, R)
    close(batch.response_mask, mask_after_eos(batch.response_ids, tok.eos_token_id))
    assert (batch.response_mask.sum(-1) < R).any(), "seed 0 should end some responses early"
    assert (batch.logprobs[batch.response_mask == 0] == 0).all()
    # summed response log-probs agree with the course's shifted sequence_logprobs (lesson 02)
    completion_mask = torch.cat([torch.zeros_like(batch.query_ids), batch.response_mask], 1)
    logits = policy.lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=(batch.attention_mask.cumsum(-1) - 1).clamp(min=0)).logits
    close(batch.logprobs.sum(-1), sequence_logprobs(logits, batch.input_ids, completion_mask), atol=1e-4)
    # each row, recomputed alone without any padding, has the same log-probs (positions follow the mask)
    for i in range(B):
        q = torch.tensor(prompts[i])
        n = int(batch.response_mask[i].sum())
        ids = torch.cat([q, batch.response_ids[i, :n]])[None]
        logp, values, _ = response_forward(policy, ids, torch.ones_like(ids), len(q))
        close(logp[0], batch.logprobs[i, :n], atol=1e-4)
        ref_logp = response_forward(ref, ids, torch.ones_like(ids), len(q))[0]
        close(ref_logp[0], batch.ref_logprobs[i, :n], atol=1e-4)
    assert batch.texts[0] == tok.decode(batch.response_ids[0, : int(batch.response_mask[0].sum())],
                                        skip_special_tokens=True).strip()
    # KL estimate: the same model as reference gives exactly 0, another model gives the rollout's own sum
    assert sequence_kl(policy, policy.lm, batch) == 0.0
    close(sequence_kl(policy, ref, batch), ((batch.logprobs - batch.ref_logprobs).sum(-1)).mean(), atol=1e-4)


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_token_id=2)
    close(ids, [[5, 6, 7], [2, 2, 8]])
    close(mask, [[1, 1, 1], [0, 0, 1]])


def test_ppo_increases_a_ground_truth_reward(tok):
    """Smoke-to-signal: reward = fraction of 'a' in the response; a random tiny model starts near 1/99."""
    torch.manual_seed(0)
    lm = tiny_model(vocab_size=len(tok), seed=0)
    ref = copy.deepcopy(lm)
    config = PPOConfig(learning_rate=3e-3, mini_batch_size=8, ppo_epochs=2, max_new_tokens=8, init_kl_coef=0.01)
    trainer = PPOTrainer(PolicyWithValue(lm), ref, tok, config, reward_fn=frac_a)
    prompts = [tok.encode(p) for p in ("hi", "hello there", "abc", "x")] * 4
    logs = [trainer.step(prompts) for _ in range(24)]
    for key in ("objective/kl", "objective/entropy", "ppo/loss/policy", "ppo/loss/value", "ppo/clipfrac",
                "env/reward_mean", "kl_coef", "time/step_seconds"):
        assert all(math.isfinite(row[key]) for row in logs), key
    first = sum(row["env/reward_mean"] for row in logs[:3]) / 3
    last = sum(row["env/reward_mean"] for row in logs[-3:]) / 3
    assert first < 0.05 and last > 0.25, (first, last)
    assert logs[-1]["objective/kl"] > logs[0]["objective/kl"]  # reward was bought with KL
    assert logs[0]["objective/kl"] == 0.0                       # policy == reference before any update


def test_ppo_monitor_scores_the_rollouts_it_does_not_train_on(tok):
    """monitor_fn sees the same decoded texts as reward_fn: with both = frac_a the two logged means agree;
    with monitor = 1 - frac_a it is 1 - the reward, to float precision."""
    lm = tiny_model(vocab_size=len(tok), seed=0)
    prompts = [tok.encode(p) for p in ("hi", "abc", "x", "hello")]
    config = PPOConfig(learning_rate=1e-3, mini_batch_size=4, ppo_epochs=1, max_new_tokens=5)
    for monitor, expected in ((frac_a, lambda r: r), (lambda t: [1 - v for v in frac_a(t)], lambda r: 1 - r)):
        torch.manual_seed(0)
        trainer = PPOTrainer(PolicyWithValue(copy.deepcopy(lm)), lm, tok, config, reward_fn=frac_a, monitor_fn=monitor)
        logs = trainer.step(prompts)
        assert logs["env/monitor_mean"] == pytest.approx(expected(logs["env/reward_mean"]), abs=1e-6)
    plain = PPOTrainer(PolicyWithValue(copy.deepcopy(lm)), lm, tok, config, reward_fn=frac_a).step(prompts)
    assert "env/monitor_mean" not in plain


def test_ppo_step_with_reward_model_and_adaptive_kl(tok):
    torch.manual_seed(0)
    lm = tiny_model(vocab_size=len(tok), seed=0)
    rm = RewardModel.from_causal_lm(lm)
    config = PPOConfig(learning_rate=1e-3, mini_batch_size=4, ppo_epochs=1, max_new_tokens=4, adaptive_kl=True,
                       init_kl_coef=0.1, target_kl=1e-3, horizon=10)
    trainer = PPOTrainer(PolicyWithValue(lm), copy.deepcopy(lm), tok, config, reward_model=rm)
    prompts = [tok.encode("hi"), tok.encode("abc")] * 4
    logs = trainer.step(prompts)
    assert math.isfinite(logs["env/reward_mean"]) and logs["kl_coef"] == 0.1
    # step 1 had KL = 0 (policy == reference) < target: e = -1 clipped to -0.2, 8 samples, horizon 10
    close(trainer.kl_ctl.value, 0.1 * (1 - 0.2 * 8 / 10))
    logs = trainer.step(prompts)
    assert logs["kl_coef"] == trainer.history[1]["kl_coef"] and len(trainer.history) == 2
    with pytest.raises(ValueError):
        PPOTrainer(PolicyWithValue(lm), lm, tok, config)


def test_best_of_n(tok):
    torch.manual_seed(0)
    lm = tiny_model(vocab_size=len(tok), seed=0)
    out = best_of_n(lm, tok, tok.encode("abc"), n=8, reward_fn=frac_a, max_new_tokens=16)
    assert len(out["texts"]) == len(out["rewards"]) == 8
    assert out["best_reward"] == max(out["rewards"]) and out["best"] in out["texts"]
    assert best_of_n_kl(1) == 0.0
    close(best_of_n_kl(4), math.log(4) - 0.75)


# ------------------------------------------------------------------ lesson 04 helpers


def test_closed_turns_cut_at_eos_and_append_suffix(tok):
    torch.manual_seed(0)
    lm = tiny_model(vocab_size=len(tok), seed=0)
    prompts = [tok.encode("hello there"), tok.encode("x"), tok.encode("abc")] * 4
    batch = rollout(lm, tok, prompts, max_new_tokens=10)
    suffix = [tok.eos_token_id, tok.convert_tokens_to_ids("\n")]
    ids, mask, completion = closed_turns(batch, suffix, tok.eos_token_id, tok.pad_token_id)
    assert (batch.response_mask.sum(-1) < 10).any() and (batch.response_mask.sum(-1) == 10).any()
    for i in range(len(prompts)):
        kept = batch.response_ids[i, : int(batch.response_mask[i].sum())].tolist()
        kept = kept[:-1] if kept and kept[-1] == tok.eos_token_id else kept   # a finished turn loses its EOS
        assert ids[i][mask[i].bool()].tolist() == prompts[i] + kept + suffix   # then gets the template's end
        assert ids[i][completion[i].bool()].tolist() == kept + suffix          # the response part, suffix included


def test_ppo_reward_model_scores_closed_turns(tok):
    torch.manual_seed(0)
    lm = tiny_model(vocab_size=len(tok), seed=0)
    rm = RewardModel.from_causal_lm(lm)
    suffix = end_of_turn_ids(tok)
    trainer = PPOTrainer(PolicyWithValue(copy.deepcopy(lm)), lm, tok, PPOConfig(max_new_tokens=6),
                         reward_model=rm, reward_suffix_ids=suffix)
    batch = rollout(trainer.policy, tok, [tok.encode("hi"), tok.encode("abc")], 6)
    close(trainer.score(batch), rm(*closed_turns(batch, suffix, tok.eos_token_id, tok.pad_token_id)))
    mean_rm = RewardModel.from_causal_lm(lm, pooling="mean")          # scores are finite with mean pooling too
    assert torch.isfinite(PPOTrainer(trainer.policy, lm, tok, PPOConfig(max_new_tokens=6), reward_model=mean_rm,
                                     reward_suffix_ids=suffix).score(batch)).all()
    logs = trainer.step([tok.encode("hi"), tok.encode("abc")] * 4)
    assert 0 < logs["time/rollout_seconds"] < logs["time/step_seconds"]


def test_end_of_turn_ids_is_what_the_template_writes(tok):
    # the tiny ChatML template writes "<|im_end|>\n" after every message
    assert end_of_turn_ids(tok) == [tok.eos_token_id, tok.convert_tokens_to_ids("\n")]


def test_train_only_top_blocks():
    lm = tiny_model(seed=0, num_layers=3)
    total = sum(p.numel() for p in lm.parameters())
    top = sum(p.numel() for p in lm.model.layers[2].parameters()) + sum(p.numel() for p in lm.model.norm.parameters())
    assert train_only_top_blocks(lm, 1) == top
    assert not lm.model.embed_tokens.weight.requires_grad
    assert not lm.model.layers[1].self_attn.q_proj.weight.requires_grad
    ids = T([[1, 40, 41, 42]])
    lm(input_ids=ids).logits.sum().backward()
    assert lm.model.layers[0].mlp.up_proj.weight.grad is None and lm.model.layers[2].mlp.up_proj.weight.grad is not None
    assert train_only_top_blocks(lm, None) == total


def test_pair_logps_and_hidden_match_the_reference_and_the_reward_model(tok):
    from dpo_lib.features import collate, tokenize_rows
    from dpo_lib.logprobs import concatenated_forward
    lm = tiny_model(vocab_size=len(tok), seed=0)
    rows = [{"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]}
            for p, c, r in [("hi", "good day!", "bad"), ("tell me a story please", "ok", "no, never ever"),
                            ("x", "a a a a a a", "b")]]
    features, _ = tokenize_rows(tok, rows)
    out = pair_logps_and_hidden(lm, features, tok.pad_token_id, batch_size=2)   # batches of 2 and 1
    chosen, rejected = concatenated_forward(lm, collate(features, tok.pad_token_id))
    close(out["chosen_logps"], chosen, atol=1e-4)
    close(out["rejected_logps"], rejected, atol=1e-4)
    for pooling in ("last", "mean"):
        rm = RewardModel.from_causal_lm(lm, pooling=pooling)
        for i, f in enumerate(features):  # the head on the cached feature = the reward model on the sequence
            for key, completion in (("chosen", f["chosen_ids"]), ("rejected", f["rejected_ids"])):
                ids = T([f["prompt_ids"] + completion])
                mask = T([[0] * len(f["prompt_ids"]) + [1] * len(completion)])
                close(rm.head(out[f"{key}_{pooling}"][i]), rm(ids, torch.ones_like(ids), mask), atol=1e-4)


def test_reward_model_mean_pooling_reads_the_response_only():
    lm = tiny_model(seed=1)
    rm = RewardModel.from_causal_lm(lm, pooling="mean")
    ids = T([[1, 40, 41, 42, 43, 44]])
    completion = T([[0, 0, 0, 1, 1, 1]])
    hidden = rm.backbone(input_ids=ids).last_hidden_state[0]
    close(rm(ids, torch.ones_like(ids), completion), rm.head(hidden[3:].mean(0)), atol=1e-5)
    left = rm(T([[2, 2, 1, 40, 41, 42, 43, 44]]), T([[0, 0, 1, 1, 1, 1, 1, 1]]), T([[0, 0, 0, 0, 0, 1, 1, 1]]))
    close(left, rm(ids, torch.ones_like(ids), completion), atol=1e-4)   # left padding changes nothing
    with pytest.raises(ValueError):
        rm(ids, torch.ones_like(ids))                                   # mean pooling needs the response mask
    with pytest.raises(ValueError):
        RewardModel(nn.Identity(), 4, pooling="max")


def test_train_reward_head_starts_at_ln2_and_separates_the_pairs():
    torch.manual_seed(0)
    direction = torch.randn(16)
    chosen, rejected = torch.randn(40, 16) + 0.5 * direction, torch.randn(40, 16) - 0.5 * direction
    rm = RewardModel(nn.Identity(), 16)
    history = train_reward_head(rm, chosen, rejected, epochs=100, lr=0.05)
    close(history[0]["loss"], math.log(2))       # zero head: every reward is 0
    assert history[0]["accuracy"] == 0.0          # ties are not correct
    assert history[-1]["loss"] < 0.3 and history[-1]["accuracy"] > 0.9
    scores = rm.head(torch.cat([chosen, rejected])).squeeze(-1)
    close(scores.mean(), 0.0, atol=1e-5)          # standardised on the training responses
    close(scores.std(), 1.0, atol=1e-5)
    close(reward_model_loss(rm.head(chosen).squeeze(-1), rm.head(rejected).squeeze(-1))[1], history[-1]["accuracy"],
          atol=0.05)


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


def test_megabytes_counts_shared_tensors_once():
    lm = tiny_model(seed=0)                       # tied embeddings: lm_head.weight is embed_tokens.weight
    n = sum(p.numel() for p in lm.parameters())   # parameters() already yields the tied tensor once
    close(megabytes(lm), n * 4 / 2**20)
    close(megabytes(lm, lm), megabytes(lm))
    rm = RewardModel.from_causal_lm(lm, copy_weights=False)   # shares the backbone: only the head is new
    close(megabytes(lm, rm) - megabytes(lm), (32 + 1) * 4 / 2**20)
    train_only_top_blocks(lm, 1)
    assert 0 < megabytes(lm, trainable_only=True) < megabytes(lm)


def test_peak_memory_sees_a_block_allocation():
    with PeakMemory() as m:
        x = torch.ones(64 * 2**20 // 4)           # 64 MB, touched
        del x
    assert m.peak_mb > 48 and (m.exact or math.isfinite(m.peak_mb))
    with PeakMemory() as small:
        pass
    if small.exact:
        assert small.peak_mb < 16                 # the earlier 64 MB are not charged to this block


def test_frozen_trunk_branches_compute_what_the_whole_model_computes(tok):
    torch.manual_seed(0)
    base = tiny_model(vocab_size=len(tok), seed=0, num_layers=3)
    trunk = FrozenTrunk(base, n_top=1)
    reference, policy = trunk.branch(trainable=False), trunk.branch()
    assert policy.lm.model.layers[0].mlp.up_proj.weight is base.model.layers[0].mlp.up_proj.weight   # shared
    assert policy.lm.model.layers[2].mlp.up_proj.weight is not base.model.layers[2].mlp.up_proj.weight
    assert {n for n, p in policy.named_parameters() if p.requires_grad} == {
        n for n, p in policy.named_parameters() if ".layers.2." in n or n.endswith("model.norm.weight")}
    ids = T([[1, 40, 41, 42, 43, 44], [2, 2, 2, 1, 45, 46]])             # the second row is left-padded
    mask = T([[1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    full = base(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)
    out = reference(ids, mask, pos, output_hidden_states=True)
    m = mask.bool()
    close(out.logits[m], full.logits[m], atol=1e-5)
    close(out.hidden_states[-1][m], full.hidden_states[-1][m], atol=1e-5)
    assert trunk.misses == 2 and trunk.hits == 0
    # train the policy a little: its memoised path must still equal its own whole-model forward
    opt = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.5)
    policy(ids, mask, pos).logits[m].logsumexp(-1).sum().backward()
    opt.step()
    assert trunk.hits == 2                                              # the trunk ran once for both models
    close(policy(ids, mask, pos).logits[m], policy.lm(input_ids=ids, attention_mask=mask, position_ids=pos).logits[m],
          atol=1e-5)
    close(reference(ids, mask, pos).logits[m], full.logits[m], atol=1e-5)   # the base did not move
    assert (policy(ids, mask, pos).logits[m] - full.logits[m]).abs().max() > 1e-3
    right = reference(T([[1, 45, 46, 2, 2]]), T([[1, 1, 1, 0, 0]])).logits[0, :3]   # padding side is irrelevant
    close(right, full.logits[1, 3:], atol=1e-5)
    with pytest.raises(ValueError):
        FrozenTrunk(base, n_top=3)


def test_frozen_trunk_runs_ppo_dpo_and_the_pair_pass(tok):
    from _tiny import train_config

    from dpo_lib.features import tokenize_rows
    from dpo_lib.trainer import DPOTrainer
    torch.manual_seed(0)
    base = tiny_model(vocab_size=len(tok), seed=0, num_layers=3)
    trunk = FrozenTrunk(base, n_top=1)
    rows = [{"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]}
            for p, c, r in [("hi", "aaa", "b"), ("yo", "a a", "bb")]]
    features, _ = tokenize_rows(tok, rows)
    cached = pair_logps_and_hidden(trunk.branch(trainable=False), features, tok.pad_token_id)
    plain = pair_logps_and_hidden(base, features, tok.pad_token_id)
    for key in plain:
        close(cached[key], plain[key], atol=1e-4)
    features = [dict(f, ref_chosen_logps=float(c), ref_rejected_logps=float(r))
                for f, c, r in zip(features, plain["chosen_logps"], plain["rejected_logps"])]
    policy = trunk.branch()
    history = DPOTrainer(policy, features, train_config(batch_size=2, max_steps=3, learning_rate=1e-2, print_every=0),
                         pad_token_id=tok.pad_token_id).train(progress=False)
    close(history[0]["loss"], math.log(2), atol=1e-5)
    assert history[-1]["loss"] < history[0]["loss"]
    trainer = PPOTrainer(PolicyWithValue(trunk.branch()), trunk.branch(trainable=False), tok,
                         PPOConfig(max_new_tokens=4, mini_batch_size=4, learning_rate=1e-2), reward_fn=frac_a)
    logs = [trainer.step([tok.encode("hi"), tok.encode("abc")] * 2) for _ in range(2)]
    assert logs[0]["objective/kl"] == 0.0 and math.isfinite(logs[1]["objective/kl"])
    assert trainer.policy.value_head.linear.weight.abs().sum() > 0      # the value head trained too
