"""dpo_lib.rlhf.reward_model: the Bradley-Terry loss, the reward model's pooling and its head's training; the
expected numbers are worked out by hand in the comments."""

import math

import pytest
import torch
from _rlhf import T, close
from torch import nn

from dpo_lib.models import tiny_model
from dpo_lib.rlhf.reward_model import RewardModel, end_of_turn_ids, reward_model_loss, train_reward_head


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


def test_end_of_turn_ids_is_what_the_template_writes(tok):
    # the tiny ChatML template writes "<|im_end|>\n" after every message
    assert end_of_turn_ids(tok) == [tok.eos_token_id, tok.convert_tokens_to_ids("\n")]


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
