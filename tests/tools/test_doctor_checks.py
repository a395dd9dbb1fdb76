"""The findings of ``python -m dpo_lib doctor`` (dpo_lib.tools.doctor_checks): the synthetic logs the
doctor's tests use (a healthy run, and one run per known failure), and each check's threshold on both
sides of it, on in-memory histories (the two file layouts are tests/tools/test_doctor.py's)."""

from __future__ import annotations

import math

import pytest

from dpo_lib.tools.doctor import run_from_history
from dpo_lib.tools.doctor_checks import diagnose

# ---------------------------------------------------------------- synthetic logs

def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def healthy(n: int = 40, epochs: int = 1, top: float = 1.5) -> list[dict]:
    """A run that learns: the margin rises from 0 (step 1: policy = reference) to ``top``, the chosen
    reward rises too, small deterministic noise, gradient norm about 1, ``epochs`` passes."""
    rows = []
    for i in range(n):
        m = top * i / (n - 1) * (1 + 0.05 * math.sin(3.1 * i)) if i else 0.0
        rows.append({"step": i + 1, "loss": -math.log(sig(m)), "rewards/chosen": 0.6 * m, "rewards/rejected": -0.4 * m,
                     "rewards/accuracies": 0.0 if i == 0 else min(1.0, 0.55 + 0.3 * i / n + 0.05 * math.sin(i)),
                     "rewards/margins": m, "logps/chosen": -60 + 3 * math.sin(i),
                     "logps/rejected": -45 + 3 * math.cos(i),
                     "grad_norm": 1.0 + 0.2 * math.sin(1.7 * i), "learning_rate": 1e-5, "num_tokens": 300 * (i + 1),
                     "epoch": (i + 1) * epochs / n})
    return rows


def with_margins(rows: list[dict], margins: list[float], chosen_share: float) -> list[dict]:
    for r, m in zip(rows, margins):
        r.update({"rewards/margins": m, "loss": -math.log(sig(m)), "rewards/chosen": chosen_share * m,
                  "rewards/rejected": (chosen_share - 1) * m})
    return rows


def reference_mismatch():
    rows = healthy()
    rows[0].update({"rewards/chosen": -0.35, "rewards/rejected": -0.2, "rewards/margins": -0.15,
                    "loss": -math.log(sig(-0.15))})
    return rows, []


def no_learning():
    rows = healthy()
    for i, r in enumerate(rows):
        m = 1e-5 * math.sin(i) if i else 0.0
        r.update({"rewards/margins": m, "loss": -math.log(sig(m)), "rewards/chosen": m / 2, "rewards/rejected": -m / 2,
                  "grad_norm": 0.0})
    return rows, []


def likelihood_displacement():  # the margin grows because the rejected falls faster than the chosen
    rows = healthy()
    return with_margins(rows, [r["rewards/margins"] for r in rows], chosen_share=-0.4), []


def overfitting():  # two epochs: training accuracy 1.0 in the second, held-out 0.70 ± 0.04
    rows = healthy(n=40, epochs=2, top=2.0)
    for r in rows[20:]:
        r["rewards/accuracies"] = 1.0
    return rows, [{"step": 20, "accuracy": 0.72, "accuracy_se": 0.04},
                  {"step": 40, "accuracy": 0.70, "accuracy_se": 0.04}]


def saturation():
    rows = healthy()
    return with_margins(rows, [6.0 * (i / 39) ** 0.5 for i in range(40)], chosen_share=0.6), []


def nonfinite():
    rows = healthy()
    rows[30]["grad_norm"] = float("inf")
    rows[31]["loss"] = float("nan")
    return rows, []


def grad_explosion():
    rows = healthy()
    for i, r in enumerate(rows[25:]):
        r["grad_norm"] = 20.0 * (1 + 0.1 * math.sin(i))
    return rows, []


def length_growth():
    rows = healthy()
    for i, r in enumerate(rows):
        r["completions/mean_length"] = 20 + i + 2 * math.sin(i)
    return rows, []


FAILURES = {f.__name__: f for f in (reference_mismatch, no_learning, likelihood_displacement, overfitting, saturation,
                                    nonfinite, grad_explosion, length_growth)}


# ---------------------------------------------------------------- thresholds, both sides

def findings_of(rows, **config) -> dict:
    """The problems and warnings of a history, by id."""
    return {f.id: f for f in diagnose(run_from_history(rows, config or None)) if f.severity != "info"}


@pytest.mark.parametrize("reward, found", [(5e-4, False), (2e-3, True)])
def test_reference_threshold_is_a_hair_above_rounding(reward, found):
    rows = healthy()
    rows[0].update({"rewards/chosen": reward, "rewards/rejected": 0.0})
    assert ("reference_mismatch" in findings_of(rows)) is found


@pytest.mark.parametrize("top, found", [(2.5, False), (3.5, True)])  # σ(−2.5) = 0.076, σ(−3.5) = 0.029 vs 0.05
def test_saturation_threshold(top, found):
    rows = with_margins(healthy(), [top * min(1.0, i / 8) for i in range(40)], chosen_share=0.6)
    assert ("saturation" in findings_of(rows)) is found


@pytest.mark.parametrize("factor, found", [(5.0, False), (12.0, True)])
def test_grad_explosion_needs_an_order_of_magnitude(factor, found):
    rows = healthy()
    for r in rows[25:]:
        r["grad_norm"] *= factor
    assert ("grad_explosion" in findings_of(rows)) is found


def test_one_gradient_spike_is_not_an_explosion():
    rows = healthy()
    rows[20]["grad_norm"] = 100.0
    assert "grad_explosion" not in findings_of(rows)


@pytest.mark.parametrize("margin, found", [(5e-4, True), (5e-3, False)])
def test_no_learning_threshold(margin, found):
    rows = with_margins(healthy(), [0.0] + [margin] * 39, chosen_share=0.5)
    assert ("no_learning" in findings_of(rows)) is found


def test_displacement_needs_the_chosen_reward_below_zero_beyond_noise():
    rows = with_margins(healthy(), [r["rewards/margins"] for r in healthy()], chosen_share=0.0)
    for i, r in enumerate(rows):  # the chosen reward wobbles around 0
        r["rewards/chosen"] = 0.05 * math.sin(2.3 * i)
    assert "likelihood_displacement" not in findings_of(rows)


def test_overfitting_without_heldout_needs_loss_drops_at_epoch_starts():
    rows = healthy(n=40, epochs=4, top=2.0)
    for r in rows[10:]:
        r["rewards/accuracies"] = 1.0
    assert "overfitting" not in findings_of(rows)  # a steady fall is the trend, not an epoch effect
    for r in rows:  # each epoch starts 0.15 lower than the trend says
        r["loss"] -= 0.15 * (math.ceil(r["epoch"] - 1e-9) - 1)
    f = findings_of(rows)["overfitting"]
    assert f.steps == [11, 21, 31] and "logged none" in f.meaning


def test_gap_within_two_se_is_not_overfitting():
    rows = healthy()
    run = run_from_history(rows)
    run.eval = [{"step": 40, "accuracy": 0.80, "accuracy_se": 0.05}]
    assert not [f for f in diagnose(run) if f.id == "overfitting"]


def test_reference_free_losses_skip_the_reference_checks():
    rows = healthy()
    rows[0].update({"rewards/chosen": -1.2, "rewards/rejected": -1.5, "loss": 0.9})
    assert set(findings_of(rows, beta=2.0, loss_type="simpo")) == set()
