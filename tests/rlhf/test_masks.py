"""dpo_lib.rlhf.masks: the mask and padding helpers of the reward model and PPO, against hand-worked values."""

import math

import torch
from _rlhf import T, close

from dpo_lib.rlhf.masks import (
    entropy_from_logits,
    last_index,
    left_pad,
    mask_after_eos,
    masked_mean,
    masked_whiten,
    position_ids_from_mask,
)


def test_mask_after_eos():
    eos = 2
    ids = T([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9]])
    close(mask_after_eos(ids, eos), [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])


def test_entropy_from_logits():
    logits = torch.randn(2, 3, 7)
    expected = torch.distributions.Categorical(logits=logits).entropy()
    close(entropy_from_logits(logits), expected, atol=1e-5)
    close(entropy_from_logits(torch.zeros(1, 2, 10)), [[math.log(10)] * 2], atol=1e-6)


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_token_id=2)
    close(ids, [[5, 6, 7], [2, 2, 8]])
    close(mask, [[1, 1, 1], [0, 0, 1]])


def test_masked_mean_counts_only_the_marked_positions():
    # marked: 1, 2 (row 0) and 6 (row 1): (1 + 2 + 6) / 3 = 3; the 3, 4 and 5 are ignored
    x = T([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    close(masked_mean(x, T([[1, 1, 0], [0, 0, 1]])), 3.0)
    close(masked_mean(x, torch.zeros(2, 3)), 0.0)          # nothing marked: 0 / max(0, 1) = 0, not NaN


def test_masked_whiten_uses_the_marked_statistics_and_zeroes_the_rest():
    # marked [1, 2, 3]: mean 2, variance (1 + 0 + 1) / 3 = 2/3, std 0.8165 -> [-1.2247, 0, 1.2247]; the 100 is
    # padding: it moves neither statistic and comes out 0
    out = masked_whiten(T([[1.0, 2.0, 3.0, 100.0]]), T([[1, 1, 1, 0]]))
    s = math.sqrt(2 / 3)
    close(out, [[-1 / s, 0.0, 1 / s, 0.0]], atol=1e-5)
    close(masked_mean(out, T([[1, 1, 1, 0]])), 0.0)


def test_position_ids_count_attended_tokens_only():
    # left padding [0, 0, 1, 1, 1]: cumsum - 1 = [-1, -1, 0, 1, 2], clamped at 0 -> [0, 0, 0, 1, 2]
    # right padding [1, 1, 1, 0, 0]: [0, 1, 2, 2, 2] (positions after the end do not matter: masked out)
    mask = T([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]


def test_last_index_finds_the_last_attended_token_on_either_side():
    # left-padded row: last 1 at 4; right-padded row: at 2; an empty row falls back to 0
    assert last_index(T([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0]])).tolist() == [4, 2, 0]


def test_left_pad_takes_tensors_and_keeps_the_order():
    # widths 1, 3, 2 -> padded to 3 on the left with pad id 0; rows stay in the order given
    ids, mask = left_pad([torch.tensor([9]), torch.tensor([4, 5, 6]), [7, 8]], pad_token_id=0)
    assert ids.tolist() == [[0, 0, 9], [4, 5, 6], [0, 7, 8]]
    assert mask.tolist() == [[0, 0, 1], [1, 1, 1], [0, 1, 1]]
    assert ids.dtype == mask.dtype == torch.long
