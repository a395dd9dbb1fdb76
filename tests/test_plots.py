"""dpo_lib.plots and the held-out curve (dpo_lib.evaluation.HeldoutEval).

The curves must tell the story: the log-prob panel plots the change from the reference
(reward / beta, smoothed), the accuracy panel carries held-out points next to the training
batches, and every panel marks where an epoch ends.
"""

import json

import matplotlib.pyplot as plt
import pytest
from _tiny import tiny, toy_rows

from dpo_lib.config import TrainConfig
from dpo_lib.evaluation import HeldoutEval, implicit_reward_accuracy
from dpo_lib.features import tokenize_rows
from dpo_lib.plots import PANELS, epoch_boundaries, plot_curves, plot_panel, smoothed
from dpo_lib.reference import FrozenReference, precompute_reference_logps
from dpo_lib.trainer import DPOTrainer


def test_smoothed_is_a_trailing_mean():
    """window 2 over [2, 4, 6, 10]: [2/1, (2+4)/2, (4+6)/2, (6+10)/2] = [2, 3, 5, 8]."""
    assert smoothed([2.0, 4.0, 6.0, 10.0], 2) == [2.0, 3.0, 5.0, 8.0]
    assert smoothed([1.0, 5.0], 1) == [1.0, 5.0]


def test_epoch_boundaries_sit_between_epochs_not_after_the_last_step():
    """4 steps per epoch, 10 steps: epochs end after steps 4 and 8 -> marks at 4.5 and 8.5."""
    history = [{"step": s, "epoch": s / 4} for s in range(1, 11)]
    assert epoch_boundaries(history) == [4.5, 8.5]
    assert epoch_boundaries(history[:8]) == [4.5]        # step 8 is the last: no mark after it


def _history(beta=0.5):
    return [{"step": s, "epoch": s / 3, "loss": 0.69 - 0.01 * s, "rewards/accuracies": 0.5,
             "rewards/margins": 0.1 * s, "rewards/chosen": beta * (-1.0 * s), "rewards/rejected": beta * (-2.0 * s),
             **({"eval/accuracy": 0.4, "eval/margin": 0.05} if s % 3 == 0 else {})} for s in range(1, 7)]


def test_logps_panel_plots_the_change_from_the_reference():
    """rewards/chosen = beta * (log pi - log pi_ref) = -0.5 s  ->  the raw line is -s, in nats."""
    fig, ax = plt.subplots()
    plot_panel(ax, _history(0.5), "logps", beta=0.5, window=2)
    lines = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
    assert lines["chosen (mean of 2 steps)"] == smoothed([-1.0 * s for s in range(1, 7)], 2)
    assert lines["rejected (mean of 2 steps)"] == smoothed([-2.0 * s for s in range(1, 7)], 2)
    assert [line.get_xdata()[0] for line in ax.get_lines() if line.get_label() == "new epoch"] == [3.5]
    plt.close(fig)
    with pytest.raises(ValueError, match="needs beta"):
        plot_panel(plt.subplots()[1], _history(), "logps")


def test_rewards_panel_has_the_held_out_points():
    fig, ax = plt.subplots()
    plot_panel(ax, _history(), "rewards")
    held = [line for line in ax.get_lines() if line.get_label() == "accuracy (held-out)"][0]
    assert list(held.get_xdata()) == [3, 6] and list(held.get_ydata()) == [0.4, 0.4]
    chance = [line for line in ax.get_lines() if line.get_label() == "chance (accuracy 0.5)"]
    assert len(chance) == 1 and list(chance[0].get_ydata()) == [0.5, 0.5]  # held-out accuracy is read against it
    plt.close(fig)
    fig = plot_curves(_history(), beta=0.5)
    assert [a.get_title() for a in fig.axes] == list(PANELS.values())
    plt.close(fig)


def test_heldout_eval_every_k_steps_equals_a_separate_evaluation(tmp_path):
    """Every 3 of 8 steps, and at the last: evaluated at steps 3, 6 and 8, in the metrics file too;
    the value at the last step is what implicit_reward_accuracy gives on the final weights."""
    model, tok = tiny()
    ref = FrozenReference(model)
    train, _ = tokenize_rows(tok, toy_rows(16))
    held, _ = tokenize_rows(tok, toy_rows(24)[16:])
    train = precompute_reference_logps(ref, train, tok.pad_token_id)
    held = precompute_reference_logps(ref, held, tok.pad_token_id)
    config = TrainConfig(batch_size=4, learning_rate=1e-3, warmup_ratio=0.0, schedule="constant", print_every=0,
                         max_steps=8, grad_accum=1, sort_by_length=False, compact_lm_head=False, precision="fp32")
    trainer = DPOTrainer(model, train, config, tok.pad_token_id, out_dir=tmp_path)
    callback = HeldoutEval(held, tok.pad_token_id, every=3)
    history = trainer.train(progress=False, callbacks=[callback])
    assert [m["step"] for m in history if "eval/accuracy" in m] == [3, 6, 8]
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged if "eval/accuracy" in m] == [3, 6, 8]
    again = implicit_reward_accuracy(model, held, tok.pad_token_id, beta=config.beta)
    assert history[-1]["eval/accuracy"] == again["accuracy"] and history[-1]["eval/margin"] == again["margin"]
    assert history[-1]["eval/accuracy"] > 0.5   # 'yes' beats 'no' on pairs the policy never saw
    with pytest.raises(ValueError, match="every must be >= 1"):
        HeldoutEval(held, tok.pad_token_id, every=0)
