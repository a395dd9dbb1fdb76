"""fp16 with a dynamic loss scaler (dpo_lib.amp), on the CPU: torch has fp16 autocast and a GradScaler there.

The claims of issue 40, point 1: under fp16 autocast a small loss's gradients underflow to zero without the
scaler; with it they match float32's (stated tolerance: 1e-2 relative L2 over all gradients; measured
1.7e-3 on the tiny model); a trainer step in fp16 matches an fp32 step; an overflowing step is skipped,
counted (``amp/skipped_steps``) and logged with the scale (``amp/scale``).
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from _tiny import tiny, toy_rows, train_config

from dpo_lib.amp import INIT_SCALE, LossScaler, check_master_weights
from dpo_lib.features import collate, tokenize_rows
from dpo_lib.trainer import DPOTrainer, batch_loss

SMALL = 1e-6           # a loss this small: its fp16 gradients fall below 2^-24 and round to 0
GRAD_TOLERANCE = 1e-2  # relative L2 error of the unscaled fp16 gradients against float32's


@pytest.fixture(scope="module")
def setup():
    model, tok = tiny()
    features = [dict(f, ref_chosen_logps=-5.0, ref_rejected_logps=-5.0)
                for f in tokenize_rows(tok, toy_rows(8), 64, 32)[0]]
    batch = collate(features[:4], tok.pad_token_id)
    return model, tok, features, batch


def _grads(model, batch, precision: str, scaler: LossScaler | None = None) -> torch.Tensor:
    m = copy.deepcopy(model)
    loss = batch_loss(m, batch, train_config(precision=precision))[0] * SMALL
    (scaler.scale(loss) if scaler else loss).backward()
    g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in m.parameters()])
    return g / scaler.scaler.get_scale() if scaler else g


def test_small_loss_underflows_in_fp16_without_the_scaler(setup):
    model, _, _, batch = setup
    g32 = _grads(model, batch, "fp32")
    assert (g32 != 0).all()
    assert (_grads(model, batch, "fp16") == 0).all()  # every gradient rounded to zero: no update at all


def test_scaled_fp16_gradients_match_fp32(setup):
    model, _, _, batch = setup
    g32 = _grads(model, batch, "fp32")
    g16 = _grads(model, batch, "fp16", LossScaler("cpu"))
    assert ((g16 - g32).norm() / g32.norm()).item() < GRAD_TOLERANCE


def _trainer(model, tok, features, precision: str, out=None) -> DPOTrainer:
    config = train_config(precision=precision, batch_size=4, max_steps=2, learning_rate=1e-3, print_every=0)
    return DPOTrainer(copy.deepcopy(model), features, config, tok.pad_token_id, out_dir=out)


def test_fp16_trainer_step_matches_fp32(setup):
    model, tok, features, _ = setup
    t32, t16 = _trainer(model, tok, features, "fp32"), _trainer(model, tok, features, "fp16")
    m32, m16 = t32.train_step(), t16.train_step()
    assert m16["loss"] == pytest.approx(math.log(2), abs=1e-6)  # step 0: the policy is the reference
    assert m16["grad_norm"] == pytest.approx(m32["grad_norm"], rel=GRAD_TOLERANCE)
    assert m16["amp/skipped_steps"] == 0 and m16["amp/scale"] == INIT_SCALE
    assert "amp/scale" not in m32
    # AdamW's first update is ~lr * sign(g): equal where the gradients agree in sign; allow a few flips
    w32 = torch.cat([p.detach().flatten() for p in t32.model.parameters()])
    w16 = torch.cat([p.detach().flatten() for p in t16.model.parameters()])
    assert all(p.dtype == torch.float32 for p in t16.model.parameters())  # fp32 master weights
    assert ((w16 - w32).abs() > 1e-4).float().mean().item() < 0.01


def test_overflow_skips_the_step_and_logs_it(setup, tmp_path):
    model, tok, features, _ = setup
    trainer = _trainer(model, tok, features, "fp16", out=tmp_path)
    trainer.backend.amp = LossScaler("cpu", init_scale=2.0 ** 100)  # loss x 2^100: fp16 gradients overflow to inf
    before = [p.detach().clone() for p in trainer.model.parameters()]
    history = trainer.train(progress=False)
    # skipped, not stopped, and the scale halved each time (2^99 still overflows)
    assert [m["amp/skipped_steps"] for m in history] == [1, 2]
    assert [m["amp/scale"] for m in history] == [2.0 ** 99, 2.0 ** 98]
    assert not math.isfinite(history[0]["grad_norm"])
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, trainer.model.parameters()))  # no update
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["amp/skipped_steps"] for m in logged] == [m["amp/skipped_steps"] for m in history]


def test_fp32_master_weights_required():
    with pytest.raises(ValueError, match="float32 master weights.*torch.float16"):
        check_master_weights([torch.nn.Parameter(torch.zeros(2, dtype=torch.float16))])
    check_master_weights([torch.nn.Parameter(torch.zeros(2, dtype=torch.float16), requires_grad=False)])
    model, tok = tiny()
    features = [dict(f, ref_chosen_logps=-5.0, ref_rejected_logps=-5.0)
                for f in tokenize_rows(tok, toy_rows(4), 64, 32)[0]]
    with pytest.raises(ValueError, match="master weights"):
        _trainer(model.half(), tok, features, "fp16")


def test_disabled_scaler_is_the_identity():
    scaler = LossScaler("cpu", enabled=False)
    loss = torch.tensor(0.5)
    assert scaler.scale(loss) is loss and scaler.metrics() == {}
    p = torch.nn.Parameter(torch.ones(1))
    p.grad = torch.ones(1)
    opt = torch.optim.SGD([p], lr=0.1)
    assert scaler.step(opt) and p.item() == pytest.approx(0.9)
