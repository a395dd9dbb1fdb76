"""dpo_lib.rlhf.frozen_trunk: the top blocks that train, the shared frozen trunk and the cached pair pass,
against the whole model's forward."""

import math

import pytest
import torch
from _rlhf import T, close, frac_a

from dpo_lib.models import tiny_model
from dpo_lib.rlhf.frozen_trunk import FrozenTrunk, pair_logps_and_hidden, train_only_top_blocks
from dpo_lib.rlhf.ppo import (
    PolicyWithValue,
    PPOConfig,
    PPOTrainer,
)
from dpo_lib.rlhf.reward_model import RewardModel


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
