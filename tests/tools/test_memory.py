"""dpo_lib.tools.memory: parameter sizes (shared tensors once), this process's resident and peak memory, and
the bytes autograd saves, against sizes worked out by hand."""

import math

import pytest
import torch
from torch import nn

from dpo_lib.models import tiny_model
from dpo_lib.rlhf.frozen_trunk import train_only_top_blocks
from dpo_lib.rlhf.reward_model import RewardModel
from dpo_lib.tools.memory import (
    PeakMemory,
    max_rss_bytes,
    measure_saved_activations,
    megabytes,
    peak_memory_bytes,
    rss_bytes,
    rss_mb,
)


def close(a, b, atol=1e-6):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32),
                               atol=atol, rtol=0)


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


def test_megabytes_by_hand():
    # Linear(3, 4): a 4x3 weight and 4 biases = 16 numbers; fp32 16 * 4 = 64 bytes, fp16 32 bytes
    lin = nn.Linear(3, 4)
    assert megabytes(lin) == 64 / 2**20
    assert megabytes(lin, lin) == 64 / 2**20              # the same module twice: counted once
    assert megabytes(nn.Linear(3, 4).half()) == 32 / 2**20
    lin.bias.requires_grad_(False)
    assert megabytes(lin, trainable_only=True) == 48 / 2**20   # the 12 weights only
    assert megabytes(lin, nn.Linear(2, 1)) == (64 + 3 * 4) / 2**20   # + a 1x2 weight and 1 bias


class _Scaled(nn.Module):
    """``tanh(x * scale)`` over the ids read as numbers: what autograd keeps is known by hand."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, input_ids, attention_mask=None, use_cache=False, logits_to_keep=0):
        x = input_ids.float().unsqueeze(-1)               # (B, T, 1), a new fp32 storage
        return torch.tanh(x * self.scale)                 # (B, T, 4)


def test_measure_saved_activations_by_hand():
    # x * scale keeps x for scale's gradient: B*T*1 fp32 = 2*3*4 = 24 bytes (scale is a parameter: skipped);
    # tanh keeps its output for its own backward: B*T*4 fp32 = 2*3*4*4 = 96 bytes. 120 in all.
    model = _Scaled().eval()
    assert measure_saved_activations(model, torch.arange(6).view(2, 3)) == 24 + 96
    assert not model.training                             # the caller's mode comes back
    # twice the tokens, twice the bytes
    assert measure_saved_activations(model, torch.arange(12).view(4, 3)) == 2 * 120


def test_resident_memory_readings_agree():
    now = rss_bytes()
    if now is None:
        pytest.skip("no /proc and no psutil here")
    assert now > 0 and rss_mb() == pytest.approx(now / 2**20, rel=0.05)   # the same reading, in MB
    peak = max_rss_bytes()
    assert peak >= now * 0.95                            # the lifetime peak is at least today's level
    assert peak_memory_bytes("cpu") >= peak               # on the CPU the peak *is* the lifetime peak
    assert math.isfinite(rss_mb())
