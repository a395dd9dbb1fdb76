"""The command line as a user meets it: subprocesses, exit codes, files on disk."""

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from _tiny import conv_row, save_tiny, toy_rows, write_jsonl


def cli(*args, **kw):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    return subprocess.run([sys.executable, "-m", "dpo_lib", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=kw.get("timeout", 300))


def test_help_lists_commands():
    out = cli("--help")
    assert out.returncode == 0
    for cmd in ("train", "pairs", "validate"):
        assert cmd in out.stdout
    out = cli("train", "--help")
    for opt in ("--model", "--dataset", "--learning-rate", "--beta", "--out", "--max-steps", "--save-every",
                "--seed", "--resume"):
        assert opt in out.stdout


def test_validate_reports_file_line_and_exit_codes(tmp_path):
    good = conv_row("Hi?", "Hello!", "Bye.")
    path = write_jsonl(tmp_path / "d.jsonl", [good, "{oops", {"prompt": "a", "chosen": "x", "rejected": "x"}, good])
    out = cli("validate", path)
    assert out.returncode == 2
    assert f"{path}:2: invalid JSON" in out.stderr and f"{path}:3: chosen is identical to rejected" in out.stderr
    assert "Traceback" not in out.stderr
    out = cli("validate", path, "--skip-invalid")
    assert out.returncode == 0 and "2 valid rows, 2 invalid" in out.stdout
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    out = cli("validate", empty)
    assert out.returncode == 2 and "empty file" in out.stderr


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    model = save_tiny(d / "tiny")
    train = write_jsonl(d / "train.jsonl", toy_rows(24))
    test = write_jsonl(d / "test.jsonl", toy_rows(8))
    return d, model, train, test


def train_args(d, model, train, test, out, *extra):
    return ("train", "--model", model, "--dataset", train, "--eval-dataset", test, "--out", out,
            "--batch-size", 4, "--grad-accum", 2, "--max-steps", 6, "--learning-rate", 1e-3, "--max-new-tokens", 8,
            "--eval-samples", 1, *extra)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_train_writes_every_artifact(tiny_setup, precision):
    d, model, train, test = tiny_setup
    out = d / f"run-{precision}"
    res = cli(*train_args(d, model, train, test, out, "--precision", precision))
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"output folder: {out}" in res.stdout and "| accuracy" in res.stdout
    for name in ("metrics.jsonl", "summary.json", "run_card.json", "loss.png", "rewards.png", "logps.png",
                 "samples.md", "final"):
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    for key in ("heldout_accuracy_before", "heldout_accuracy_after", "reward_before", "reward_after",
                "kl_to_reference", "train_seconds", "tokens_per_second"):
        assert isinstance(summary[key], float), key
    assert summary["heldout_accuracy_before"] == 0.0  # policy == reference: every implicit reward is 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and abs(lines[0]["loss"] - 0.693147) < 1e-5
    card = json.loads((out / "run_card.json").read_text())
    assert card["seed"] == 0 and len(card["data_sha256_16"]) == 16 and "torch" in card["versions"]
    assert card["config"]["precision"] == precision


def test_sigkill_then_resume_gives_the_uninterrupted_weights(tiny_setup):
    # float32: its CPU kernels give the same bits in every process. Under bf16 autocast the first
    # matmuls of a process occasionally round differently (3 runs in 83 here, see README,
    # "Precision"), and bitwise equality of two processes would then test the CPU, not the resume.
    d, model, train, test = tiny_setup
    straight, broken = d / "straight", d / "broken"
    args = ("--save-every", 2, "--no-eval", "--precision", "fp32")
    assert cli(*train_args(d, model, train, test, straight, *args)).returncode == 0
    killed = cli(*train_args(d, model, train, test, broken, *args, "--_kill-after-save", 4))
    assert killed.returncode == -9  # SIGKILL right after the step-4 checkpoint
    assert not (broken / "final").exists()
    res = cli(*train_args(d, model, train, test, broken, *args, "--resume"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resumed from" in res.stdout
    a = load_file(straight / "final" / "model.safetensors")
    b = load_file(broken / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert len((broken / "metrics.jsonl").read_text().splitlines()) == 6


def test_bad_data_exits_2_without_traceback(tiny_setup, tmp_path):
    d, model, train, test = tiny_setup
    bad = write_jsonl(tmp_path / "bad.jsonl", toy_rows(4) + ['{"prompt": "x", "chosen": "", "rejected": "y"}'])
    res = cli(*train_args(d, model, bad, test, tmp_path / "o"))
    assert res.returncode == 2 and f"{bad}:5: empty chosen response" in res.stderr
    assert "Traceback" not in res.stderr
