"""dpo_lib.checkpoints: atomic writes, the newest ``keep`` checkpoints, the ``latest`` pointer, an exact round trip."""

from __future__ import annotations

import json
import os

import pytest
import torch
from _tiny import tiny, train_config

from dpo_lib.checkpoints import (
    atomic_write_text,
    latest_checkpoint,
    read_checkpoint,
    trainer_state,
    write_checkpoint,
)


def test_atomic_write_text_writes_and_replaces(tmp_path):
    p = tmp_path / "a.txt"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two\n")
    assert p.read_text() == "two\n"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.txt"]  # no temporary file left


def test_atomic_write_text_leaves_the_old_file_when_the_rename_fails(tmp_path, monkeypatch):
    p = tmp_path / "a.txt"
    atomic_write_text(p, "old")

    def crash(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        atomic_write_text(p, "new")
    assert p.read_text() == "old"


def _model_and_optimizer(seed: int = 0):
    model, _ = tiny(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
    return model, optimizer, scheduler


def _one_step(model, optimizer, scheduler):
    ids = torch.tensor([[1, 5, 6, 7, 2]])
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def test_write_checkpoint_keeps_the_newest_and_points_latest(tmp_path):
    """Steps 1, 2, 3 with keep=2: step-000002 and step-000003 stay, latest names step-000003."""
    model, optimizer, scheduler = _model_and_optimizer()
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        path = write_checkpoint(root, model, optimizer, scheduler, {"step": step}, keep=2)
        assert path == root / f"step-{step:06d}"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000002", "step-000003"]
    assert (root / "latest").read_text() == "step-000003"
    assert latest_checkpoint(tmp_path) == root / "step-000003"
    assert json.loads((root / "step-000003" / "trainer_state.json").read_text()) == {"step": 3}
    assert sorted(p.name for p in (root / "step-000003").iterdir()) == ["manifest.json", "model.safetensors",
                                                                       "optimizer.pt", "trainer_state.json"]


def test_latest_checkpoint_ignores_missing_and_incomplete(tmp_path):
    assert latest_checkpoint(None) is None
    assert latest_checkpoint(tmp_path) is None
    root = tmp_path / "checkpoints"
    (root / "step-000004").mkdir(parents=True)  # no trainer_state.json: a checkpoint cut short
    (root / "latest").write_text("step-000004\n")
    assert latest_checkpoint(tmp_path) is None


def test_read_checkpoint_round_trip_is_bitwise(tmp_path):
    """After two AdamW steps, save; load into a model of other weights (seed 1) with a fresh optimizer:
    every weight, every AdamW moment and step count, the schedule and the torch RNG are back exactly."""
    model, optimizer, scheduler = _model_and_optimizer(seed=0)
    for _ in range(2):
        _one_step(model, optimizer, scheduler)
    state = trainer_state(2, 123, train_config(), [{"step": 1}, {"step": 2}])
    path = write_checkpoint(tmp_path / "checkpoints", model, optimizer, scheduler, state, keep=2)
    expected_draw = torch.rand(4)  # the RNG right after the save, as saved

    other, opt2, sched2 = _model_and_optimizer(seed=1)
    assert not torch.equal(other.model.embed_tokens.weight, model.model.embed_tokens.weight)
    torch.rand(100)  # move the RNG on
    meta = read_checkpoint(path, other, opt2, sched2)

    assert meta == json.loads(json.dumps(state)) and meta["num_tokens"] == 123 and meta["config"]["seed"] == 0
    for (name, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    s1, s2 = optimizer.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    assert s1["state"].keys() == s2["state"].keys() and len(s1["state"]) > 0
    for k in s1["state"]:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s1["state"][k][name], s2["state"][k][name]), (k, name)
    assert sched2.last_epoch == scheduler.last_epoch == 2
    assert sched2.get_last_lr() == scheduler.get_last_lr() == [pytest.approx(1e-2 / 3)]
    assert torch.equal(torch.rand(4), expected_draw)
    # and the next step is the same on both
    _one_step(model, optimizer, scheduler)
    _one_step(other, opt2, sched2)
    for (name, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
