"""dpo_lib.distributed: the trainer's backends, with a fake accelerator that records what it is asked."""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from types import SimpleNamespace

import pytest
import torch
from _tiny import tiny, toy_rows, train_config

from dpo_lib import checkpoints
from dpo_lib.distributed import Accelerated, SingleProcess, backend_for
from dpo_lib.features import tokenize_rows
from dpo_lib.reference import FrozenReference, precompute_reference_logps
from dpo_lib.trainer import DPOTrainer


def two_weights():
    """A module with a trainable [1, 2] weight and a frozen [1] weight."""
    m = torch.nn.Module()
    m.w = torch.nn.Parameter(torch.tensor([[1.0, 2.0]]))
    m.frozen = torch.nn.Parameter(torch.tensor([1.0]), requires_grad=False)
    return m


# ----------------------------------------------------------------------------- SingleProcess


def test_single_process_reduce_is_the_identity():
    b = SingleProcess(two_weights())
    assert (b.world, b.rank, b.is_main, b.device) == (1, 0, True, torch.device("cpu"))
    sums = {"loss": 0.6931, "rewards/accuracies": 0.5}
    out, tokens = b.reduce(sums, 37)
    assert out == {"loss": 0.6931, "rewards/accuracies": 0.5} and tokens == 37


def test_single_process_clip_returns_the_norm_before_clipping():
    """Gradient [3, 4] on the trainable weight: norm sqrt(9 + 16) = 5, returned; after clipping to 1 the
    gradient is [3, 4] / 5 = [0.6, 0.8] (to clip_grad_norm_'s 1e-6). The frozen weight's gradient [12] is
    not counted (with it the norm would be sqrt(25 + 144) = 13) and not touched."""
    m = two_weights()
    m.w.grad = torch.tensor([[3.0, 4.0]])
    m.frozen.grad = torch.tensor([12.0])
    norm = SingleProcess(m).clip(m, max_norm=1.0)
    assert norm == pytest.approx(5.0, abs=1e-6)
    torch.testing.assert_close(m.w.grad, torch.tensor([[0.6, 0.8]]), atol=1e-6, rtol=0)
    assert m.frozen.grad.item() == 12.0
    # under the limit: returned, not scaled
    m.w.grad = torch.tensor([[0.3, 0.4]])
    assert SingleProcess(m).clip(m, max_norm=1.0) == pytest.approx(0.5, abs=1e-7)
    assert m.w.grad.tolist() == [[pytest.approx(0.3), pytest.approx(0.4)]]


def test_single_process_contexts_are_no_ops():
    m = two_weights()
    b = SingleProcess(m)
    assert isinstance(b.no_sync(m, last=False), nullcontext) and isinstance(b.autocast(), nullcontext)
    a = torch.tensor([[1.0, 2.0]])
    with b.no_sync(m, last=False), b.autocast():
        assert (a @ a.T).dtype == torch.float32 and (a @ a.T).item() == 5.0
    assert b.prepare_model(m) is m and b.unwrap(m) is m
    b.wait()
    b.check_checkpoints()  # one process: checkpoints allowed


# ----------------------------------------------------------------------------- Accelerated, with a fake accelerator


class FakeAccelerator:
    """An ``accelerate.Accelerator`` stand-in for process ``rank`` of ``world``: it records every call.
    ``reduce`` adds ``others`` (what the other processes hold) to this process's tensor."""

    def __init__(self, world=2, rank=0, distributed_type="DistributedType.MULTI_GPU", others=None):
        self.num_processes, self.process_index, self.is_main_process = world, rank, rank == 0
        self.device, self.distributed_type, self.others = torch.device("cpu"), distributed_type, others
        self.mixed_precision = "no"  # accelerate's default: no loss scaler
        self.calls = []

    def prepare_model(self, model):
        self.calls.append("prepare_model")
        return model

    def prepare_optimizer(self, optimizer):
        self.calls.append("prepare_optimizer")
        return optimizer

    @contextmanager
    def no_sync(self, model):
        self.calls.append("no_sync")
        yield

    def autocast(self):
        self.calls.append("autocast")
        return nullcontext()

    def backward(self, loss):
        self.calls.append("backward")
        loss.backward()

    def reduce(self, tensor, reduction):
        self.calls.append(("reduce", reduction, tensor.dtype))
        return tensor + (self.others if self.others is not None else tensor)

    def clip_grad_norm_(self, params, max_norm):
        self.calls.append("clip")
        return torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_norm)

    def unwrap_model(self, model):
        return model

    def wait_for_everyone(self):
        self.calls.append("wait")


def test_accelerated_reduce_averages_metrics_and_sums_tokens():
    """Process 1 holds loss 0.6, accuracy 0.5 and 30 tokens; process 0 (``others``) loss 0.8, accuracy 1.0,
    50 tokens. Equal shards: loss (0.6 + 0.8) / 2 = 0.7, accuracy (0.5 + 1.0) / 2 = 0.75, tokens 30 + 50 = 80.
    The packed tensor is the metrics in sorted key order, then the tokens, in float64."""
    acc = FakeAccelerator(world=2, rank=1, others=torch.tensor([0.8, 1.0, 50.0], dtype=torch.float64))
    b = Accelerated(acc)
    assert (b.world, b.rank, b.is_main) == (2, 1, False)
    sums, tokens = b.reduce({"rewards/accuracies": 0.5, "loss": 0.6}, 30)
    assert acc.calls == [("reduce", "sum", torch.float64)]
    assert sums == {"loss": pytest.approx(0.7, abs=1e-15), "rewards/accuracies": 0.75} and tokens == 80


def test_accelerated_one_process_does_not_reduce_or_wait():
    acc = FakeAccelerator(world=1)
    b = Accelerated(acc)
    assert b.reduce({"loss": 0.3}, 12) == ({"loss": 0.3}, 12)
    b.wait()
    with b.no_sync(two_weights(), last=False):
        pass
    assert acc.calls == []


def test_accelerated_no_sync_on_all_but_the_last_micro_batch():
    acc = FakeAccelerator(world=2)
    b, m = Accelerated(acc), two_weights()
    for a in range(3):
        with b.no_sync(m, last=a == 2):
            pass
    assert acc.calls == ["no_sync", "no_sync"]
    b.wait()
    assert acc.calls[-1] == "wait"


def test_trainer_step_through_a_fake_accelerator():
    """A real trainer step as process 0 of 2: batch 4, grad_accum 2 -> this process takes 2 of the 4 pairs
    (every other one by length), in 2 micro-batches of 1: the backend is asked for no_sync on the first only,
    backward twice, one reduce, one clip. The fake's other process holds the same sums, so the reduced
    metrics are this process's means and the step's tokens twice this process's."""
    model, tok = tiny()
    features = tokenize_rows(tok, toy_rows(8))[0]
    features = precompute_reference_logps(FrozenReference(model), features, tok.pad_token_id)
    acc = FakeAccelerator(world=2, rank=0)
    trainer = DPOTrainer(model, features, train_config(batch_size=4, grad_accum=2), tok.pad_token_id,
                         accelerator=acc)
    assert acc.calls == ["prepare_model", "prepare_optimizer"]
    idx = trainer.local_indices(0)
    assert len(idx) == 2 and set(idx) <= set(trainer.batch_indices(0))
    acc.calls.clear()
    m = trainer.train_step()
    assert acc.calls == ["no_sync", "autocast", "backward", "autocast", "backward",
                         ("reduce", "sum", torch.float64), "clip"]
    local = sum(len(features[i]["prompt_ids"]) * 2 + len(features[i]["chosen_ids"])
                + len(features[i]["rejected_ids"]) for i in idx)
    assert m["num_tokens"] == 2 * local
    # step 0: the policy is the reference: exact zero rewards and loss ln 2 on both micro-batches
    assert m["rewards/margins"] == 0.0 and m["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_fsdp_refuses_checkpoints(tmp_path):
    with pytest.raises(NotImplementedError, match="FSDP"):
        Accelerated(FakeAccelerator(distributed_type="DistributedType.FSDP")).check_checkpoints()
    Accelerated(FakeAccelerator(distributed_type="DistributedType.MULTI_GPU")).check_checkpoints()
    # checkpoints.save asks the backend before writing anything
    trainer = SimpleNamespace(backend=Accelerated(FakeAccelerator(distributed_type="DistributedType.FSDP")),
                              out=tmp_path, step=1)
    with pytest.raises(NotImplementedError):
        checkpoints.save(trainer)
    assert list(tmp_path.iterdir()) == []


def test_backend_for():
    m = two_weights()
    assert isinstance(backend_for(m), SingleProcess)
    assert isinstance(backend_for(m, FakeAccelerator()), Accelerated)
