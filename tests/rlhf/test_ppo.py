"""dpo_lib.rlhf.ppo: GAE, the clipped policy and value losses, the KL-shaped reward, the KL controllers,
rollouts and PPO steps; the expected numbers are worked out by hand in the comments."""

import copy
import math

import pytest
import torch
from _rlhf import T, close, frac_a

from dpo_lib.logprobs import sequence_logprobs
from dpo_lib.models import tiny_model
from dpo_lib.rlhf.masks import mask_after_eos
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
from dpo_lib.rlhf.reward_model import RewardModel, end_of_turn_ids


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
