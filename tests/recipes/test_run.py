"""dpo_lib.recipes.run: the output folder (lock, atomic JSON, run-card comparison) and the before/after figures."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import Path

import pytest
from _tiny import train_config

from dpo_lib.recipes.run import (
    ResumeMismatch,
    RunFolderBusy,
    check_card,
    claim_folder,
    plain,
    prompt_text,
    reference_key,
    resume_conflicts,
    run_card,
    summarize,
    write_json,
)
from dpo_lib.settings import UserError

# ----------------------------------------------------------------------------- the output folder


def test_claim_folder_refuses_a_second_claim_until_closed(tmp_path):
    out = tmp_path / "run" / "a"
    lock = claim_folder(out)  # makes the folder
    assert (out / ".lock").read_text() == str(os.getpid())
    with pytest.raises(RunFolderBusy) as e:
        claim_folder(out)  # flock: a second open file conflicts, even in the same process
    assert str(e.value) == (f"{out} is in use by another run (pid {os.getpid()}); wait for it, or choose "
                            "another --out")
    assert isinstance(e.value, UserError)
    lock.close()
    again = claim_folder(out)  # freed
    again.close()
    other = claim_folder(tmp_path / "run" / "b")  # another folder is independent
    other.close()


def test_write_json_is_indented_and_atomic(tmp_path, monkeypatch):
    p = tmp_path / "summary.json"
    write_json(p, {"a": 1, "b": [1, 2]})
    assert p.read_text() == '{\n "a": 1,\n "b": [\n  1,\n  2\n ]\n}'

    def crash(src, dst):
        raise OSError("killed mid-rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        write_json(p, {"a": 2})
    assert json.loads(p.read_text()) == {"a": 1, "b": [1, 2]}  # the old file, whole


def test_plain_and_prompt_text():
    assert plain({"out": Path("runs/x"), "beta": 0.1, "model": None}) == {"out": "runs/x", "beta": 0.1,
                                                                         "model": None}
    assert prompt_text("hi") == "hi"
    assert prompt_text([{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]) == "q"


def test_run_card_entries():
    c = train_config(seed=3)
    card = run_card({"max_length": 160}, c, "f" * 16, [], data_sha256_16="abc")
    assert card["seed"] == 3 and card["config"] == asdict(c) and card["job"] == {"max_length": 160}
    assert card["model_fingerprint"] == "f" * 16 and card["heldout_data_sha256_16"] is None
    assert card["data_sha256_16"] == "abc" and "torch" in card["versions"]


# ----------------------------------------------------------------------------- resume comparison

OLD = {"config": {"beta": 0.1, "learning_rate": 1e-5, "print_every": 8},
       "job": {"max_length": 160, "threads": 2},
       "data_sha256_16": "aaa", "model_fingerprint": "m1"}
# beta changed (counts), print_every and threads changed (free), nll_weight new (absent before: not compared),
# the data hash changed (counts), the model the same
NEW = {"config": {"beta": 0.2, "learning_rate": 1e-5, "print_every": 1, "nll_weight": 0.0},
       "job": {"max_length": 160, "threads": 4},
       "data_sha256_16": "bbb", "model_fingerprint": "m1"}
FREE = {"print_every", "threads"}
KEYS = {"data_sha256_16": "the training data", "model_fingerprint": "the model"}
EXPECTED = ["--beta 0.1 (now 0.2)", "the training data changed (data_sha256_16 aaa -> bbb)"]


def test_resume_conflicts_lists_exactly_the_differences_that_count():
    assert resume_conflicts(OLD, NEW, ("config", "job"), FREE, KEYS) == EXPECTED
    assert resume_conflicts(OLD, OLD, ("config", "job"), FREE, KEYS) == []
    # with nothing free, the two free changes count too, in section order
    assert resume_conflicts(OLD, NEW, ("config", "job"), set(), KEYS) == [
        "--beta 0.1 (now 0.2)", "--print-every 8 (now 1)", "--threads 2 (now 4)", EXPECTED[1]]
    # a section not asked for is not compared
    assert resume_conflicts(OLD, NEW, ("job",), FREE, {}) == []
    changed_model = {**OLD, "model_fingerprint": "m2"}
    assert resume_conflicts(OLD, changed_model, (), FREE, KEYS) == ["the model changed (model_fingerprint m1 -> m2)"]


def test_check_card_refuses_or_forces(tmp_path, capsys):
    check_card(tmp_path, NEW, ("config", "job"), FREE, KEYS)  # no run card yet: a fresh run
    write_json(tmp_path / "run_card.json", OLD)
    check_card(tmp_path, OLD, ("config", "job"), FREE, KEYS)  # the same settings
    with pytest.raises(ResumeMismatch) as e:
        check_card(tmp_path, NEW, ("config", "job"), FREE, KEYS, how="Use the same flags")
    assert str(e.value) == (f"{tmp_path} holds a run started with other settings: " + "; ".join(EXPECTED)
                            + ". Use the same flags.")
    assert isinstance(e.value, UserError)
    capsys.readouterr()
    check_card(tmp_path, NEW, ("config", "job"), FREE, KEYS, force=True)
    assert capsys.readouterr().out == "[dpo_lib] --force-resume: continuing despite " + "; ".join(EXPECTED) + "\n"


# ----------------------------------------------------------------------------- summary figures


def test_summarize_paired_figures():
    """Rewards of the same 4 held-out samples before [0.2, 0.4, 0.6, 0.8] and after [0.5, 0.4, 0.9, 0.7].

    before: mean 0.5; deviations ±0.1, ±0.3: sum of squares 0.2, variance 0.2/3, SE sqrt(0.2/3/4) = 0.1290994.
    after: mean 2.5/4 = 0.625; deviations -0.125, -0.225, 0.275, 0.075: sum of squares 0.1475, SE
    sqrt(0.1475/3/4) = 0.1108678.
    paired gain: differences [0.3, 0.0, 0.3, -0.1], mean 0.5/4 = 0.125; deviations 0.175, -0.125, 0.175,
    -0.225: sum of squares 0.1275, SE sqrt(0.1275/3/4) = sqrt(0.010625) = 0.1030776.
    win rate: wins [1, 1/2 (tie), 1, 0], mean 2.5/4 = 0.625; deviations 0.375, -0.125, 0.375, -0.625: sum of
    squares 0.6875, SE sqrt(0.6875/3/4) = 0.2393568. A plain difference of means would give the same gain
    but an unpaired SE sqrt(0.1290994² + 0.1108678²) = 0.1701715: the pairing is what is checked."""
    before = {"accuracy": {"accuracy": 0.5, "accuracy_se": 0.2, "margin": 0.0}, "rewards": [0.2, 0.4, 0.6, 0.8]}
    after = {"accuracy": {"accuracy": 0.75, "accuracy_se": 0.1, "margin": 0.3}, "rewards": [0.5, 0.4, 0.9, 0.7],
             "kl": (1.5, 0.25)}
    out = summarize(before, after)
    expected = {
        "heldout_accuracy_before": 0.5, "heldout_accuracy_after": 0.75, "heldout_accuracy_after_se": 0.1,
        "heldout_margin_after": 0.3,
        "reward_before": 0.5, "reward_before_se": 0.1290994,
        "reward_after": 0.625, "reward_after_se": 0.1108678,
        "reward_gain": 0.125, "reward_gain_se": 0.1030776,
        "win_rate": 0.625, "win_rate_se": 0.2393568,
        "kl_to_reference": 1.5, "kl_to_reference_se": 0.25,
    }
    assert out.pop("rewards_after") == [0.5, 0.4, 0.9, 0.7]  # kept per sample, for paired comparisons of runs
    assert out.keys() == expected.keys()
    for k, v in expected.items():
        assert out[k] == pytest.approx(v, abs=1e-7), k
    assert not math.isclose(out["reward_gain_se"], 0.1701715, abs_tol=1e-3)


def test_summarize_without_samples_or_accuracy():
    assert summarize({}, {}) == {}
    acc_only = summarize({"accuracy": {"accuracy": 0.5}},
                         {"accuracy": {"accuracy": 0.625, "accuracy_se": 0.05, "margin": 0.2}})
    assert acc_only == {"heldout_accuracy_before": 0.5, "heldout_accuracy_after": 0.625,
                        "heldout_accuracy_after_se": 0.05, "heldout_margin_after": 0.2}


def test_reference_key_names_the_weights_the_precision_and_the_scoring():
    """The reference log-prob cache key: fingerprint-precision, then each scoring switch that is on; two runs that
    score pairs differently (full head vs compact head) never read each other's cached numbers."""
    from types import SimpleNamespace

    from dpo_lib.config import TrainConfig
    key = lambda **levers: reference_key(SimpleNamespace(fingerprint="abc", config=TrainConfig(**levers)))  # noqa: E731
    assert key(precision="bf16") == "abc-bf16-compact_head-shared_prompt-padding_free"
    assert key(precision="fp32", shared_prompt=False, padding_free=False) == "abc-fp32-compact_head"
    assert key(precision="fp32", compact_lm_head=False, shared_prompt=False, padding_free=False) == "abc-fp32"
