"""The command line as a user meets it: subprocesses, exit codes, files on disk."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from _tiny import conv_row, save_tiny, toy_rows, write_jsonl
from safetensors.torch import load_file


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
    res = cli(*train_args(d, model, train, test, out, "--precision", precision, "--eval-every", 4))
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"output folder: {out}" in res.stdout and "| accuracy" in res.stdout
    for name in ("metrics.jsonl", "summary.json", "run_card.json", "loss.png", "rewards.png", "logps.png",
                 "samples.md", "final"):
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    for key in ("heldout_accuracy_before", "heldout_accuracy_after", "reward_before", "reward_after",
                "kl_to_reference", "train_seconds", "tokens_per_second"):
        assert isinstance(summary[key], float), key
    assert summary["heldout_accuracy_before"] == 0.0  # policy == reference: 0 by construction (test_evaluation)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and abs(lines[0]["loss"] - 0.693147) < 1e-5
    # step 1: the policy is the reference, so every reward is exactly 0 in either precision
    assert lines[0]["rewards/chosen"] == lines[0]["rewards/rejected"] == lines[0]["rewards/margins"] == 0.0
    assert lines[0]["rewards/accuracies"] == 0.0
    # held-out accuracy every 4 steps and at the last; the summary's "after" is the last step's value
    assert [m["step"] for m in lines if "eval/accuracy" in m] == [4, 6]
    assert summary["heldout_accuracy_after"] == lines[-1]["eval/accuracy"]
    assert "| heldout_accuracy" in res.stdout
    # the alignment tax (dpo_lib.capability), before and after, paired per example
    for name in ("general_nll", "instruction_following"):
        for part in ("before", "after", "change", "change_se"):
            assert isinstance(summary[f"{name}_{part}"], float), (name, part)
        assert summary[f"{name}_change"] == pytest.approx(summary[f"{name}_after"] - summary[f"{name}_before"])
    assert summary["general_nll_after"] != summary["general_nll_before"]  # lr 1e-3 moved the tiny model's text NLL
    assert set(summary["phase_seconds"]) >= {"capability_before", "capability_after", "train"}
    assert "general_nll_change" in res.stdout
    card = json.loads((out / "run_card.json").read_text())
    assert card["seed"] == 0 and len(card["data_sha256_16"]) == 16 and "torch" in card["versions"]
    assert card["config"]["precision"] == precision


def _start(*args) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    return subprocess.Popen([sys.executable, "-m", "dpo_lib", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_checkpoint(proc: subprocess.Popen, out, timeout: float = 240.0) -> None:
    """Poll until ``out`` has a complete checkpoint (``checkpoints/latest`` names one)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (out / "checkpoints" / "latest").is_file() or proc.poll() is not None:
            return
        time.sleep(0.005)
    proc.kill()
    raise AssertionError("no checkpoint appeared")


def test_sigkill_then_resume_gives_the_uninterrupted_weights(tiny_setup):
    # float32: its CPU kernels give the same bits in every process. Under bf16 autocast the first
    # matmuls of a process occasionally round differently (3 runs in 83 here, see README,
    # "Precision"), and bitwise equality of two processes would then test the CPU, not the resume.
    # 60 steps with a checkpoint every 2: the kill, sent from outside as soon as the first
    # checkpoint is complete, lands mid-run (each checkpoint is fsynced, so a run takes seconds).
    # One thread: a reduction split over threads may be split differently when the machine is busy (the
    # interrupted twin of this test failed once, bitwise, while two other test runs shared the 2 cores).
    d, model, train, test = tiny_setup
    straight, broken = d / "straight", d / "broken"
    args = ("--save-every", 2, "--no-eval", "--precision", "fp32", "--max-steps", 60, "--threads", 1)
    assert cli(*train_args(d, model, train, test, straight, *args)).returncode == 0
    proc = _start(*train_args(d, model, train, test, broken, *args))
    _wait_for_checkpoint(proc, broken)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -9, "the run ended before the kill; it cannot test a resume"
    assert not (broken / "final").exists()
    killed_at = int((broken / "checkpoints" / "latest").read_text().split("-")[1])
    assert 2 <= killed_at < 60
    res = cli(*train_args(d, model, train, test, broken, *args, "--resume"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resumed from" in res.stdout
    a = load_file(straight / "final" / "model.safetensors")
    b = load_file(broken / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert len((broken / "metrics.jsonl").read_text().splitlines()) == 60


def test_bad_data_exits_2_without_traceback(tiny_setup, tmp_path):
    d, model, train, test = tiny_setup
    bad = write_jsonl(tmp_path / "bad.jsonl", toy_rows(4) + ['{"prompt": "x", "chosen": "", "rejected": "y"}'])
    res = cli(*train_args(d, model, bad, test, tmp_path / "o"))
    assert res.returncode == 2 and f"{bad}:5: empty chosen response" in res.stderr
    assert "Traceback" not in res.stderr


BAD_FLAGS = [
    (("--beta", "-1"), "--beta", "must be > 0"),
    (("--batch-size", "0"), "--batch-size", "must be >= 1"),
    (("--learning-rate", "-0.1"), "--learning-rate", "must be > 0"),
    (("--grad-accum", "3"), "--grad-accum", "must divide --batch-size 8"),
    (("--label-smoothing", "0.5"), "--label-smoothing", "must be in [0.0, 0.5)"),
    (("--max-prompt-length", "200"), "--max-prompt-length", "must be < --max-length 160"),
    (("--warmup-ratio", "1.5"), "--warmup-ratio", "must be in [0.0, 1.0)"),
    (("--dataset", "no-such-file.jsonl"), "--dataset", "no such file"),
    (("--dataset", "."), "--dataset", "not a file"),
    (("--out", "README.md"), "--out", "exists and is not a folder"),
    (("--resume",), "--resume", "needs the --out folder"),
    (("--loss-type", "simpo", "--simpo-gamma", "-1"), "--simpo-gamma", "must be >= 0.0"),
    (("--loss-type", "orpo", "--nll-weight", "1"), "--nll-weight", "must be 0 with --loss-type orpo"),
]


@pytest.mark.parametrize("flags,flag,what", BAD_FLAGS, ids=[f[1] + "=" + f[0][-1] for f in BAD_FLAGS])
def test_bad_train_flag_is_one_line_exit_2_and_loads_nothing(flags, flag, what):
    """Checked before torch is even imported (so no model can have been loaded)."""
    code = ("import sys; from dpo_lib.cli import main; rc = main(sys.argv[1:]); "
            "print('torch loaded' if 'torch' in sys.modules else 'torch not loaded'); sys.exit(rc)")
    res = subprocess.run([sys.executable, "-c", code, "train", *flags], capture_output=True, text=True, timeout=60,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [res.stderr.strip()] and res.stderr.startswith(f"error: {flag}: {what}")
    assert "torch not loaded" in res.stdout


@pytest.mark.parametrize("loss_type", ["simpo", "orpo", "dpop", "rdpo"])
def test_loss_type_flag_accepts_the_new_losses_and_their_settings(loss_type):
    """In-process (no model): the flags reach TrainConfig, and ``train --help`` lists them."""
    from dpo_lib.cli import build_parser, train_configs
    args = build_parser().parse_args(["train", "--loss-type", loss_type, "--beta", "2", "--simpo-gamma", "0.3",
                                      "--dpop-lambda", "5", "--rdpo-alpha", "0.2"])
    _, config = train_configs(args)
    assert (config.loss_type, config.beta, config.simpo_gamma, config.dpop_lambda, config.rdpo_alpha) == \
           (loss_type, 2.0, 0.3, 5.0, 0.2)
    defaults = train_configs(build_parser().parse_args(["train", "--loss-type", loss_type]))[1]
    assert (defaults.simpo_gamma, defaults.dpop_lambda, defaults.rdpo_alpha) == (0.5, 50.0, 0.05)


def test_loss_type_help_and_a_bad_loss_type_is_a_clear_error(capsys):
    from dpo_lib.cli import main
    with pytest.raises(SystemExit) as stop:
        main(["train", "--help"])
    help_text = capsys.readouterr().out
    assert stop.value.code == 0
    for flag in ("--simpo-gamma", "--dpop-lambda", "--rdpo-alpha", "simpo", "orpo", "dpop", "rdpo"):
        assert flag in help_text, flag
    with pytest.raises(SystemExit) as stop:
        main(["train", "--loss-type", "kto"])
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert "argument --loss-type: invalid choice: 'kto'" in err and "'simpo'" in err and "'rdpo'" in err


def test_bad_pairs_flags(tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi"}])
    for flags, message in [(("--prompts", tmp_path / "nope.jsonl"), "error: --prompts: no such file"),
                           (("--prompts", prompts, "-n", 1), "error: --num-samples: must be >= 2"),
                           (("--prompts", prompts, "--temperature", 0), "error: --temperature: must be > 0")]:
        res = cli("pairs", "--out", tmp_path / "o.jsonl", *flags)
        assert res.returncode == 2 and res.stderr.startswith(message), res.stderr


def test_lengths_reports_where_answers_end_and_writes_the_same_profile(tiny_setup):
    d, model, _, _ = tiny_setup
    prompts = write_jsonl(d / "prompts.jsonl", [{"prompt": [{"role": "user", "content": "Hi there"}]},
                                                {"prompt": [{"role": "system", "content": "Be long."},
                                                            {"role": "user", "content": "Tell me"}]}])
    out = cli("lengths", "--model", model, "--prompts", prompts, "--max-new-tokens", 40, "-n", 4, "--seed", 1,
              "--system", "Be brief.", "--json", d / "lengths.json")
    assert out.returncode == 0, out.stderr
    profile = json.loads((d / "lengths.json").read_text())
    assert profile["samples"] == 8 and profile["caps"] == [16, 32, 40] and profile["system"] == "Be brief."
    lines = out.stdout.splitlines()
    assert lines[1].split()[-3:] == ["16", "32", "40"]
    assert [float(x) for x in lines[2].split()[-3:]] == pytest.approx(profile["ended_by"], abs=0.0051)  # 2 places
    assert f"{profile['ended']:.0%} ended before the cap" in out.stdout
    half = next(line for line in lines if "50% of the answers" in line)
    assert half.startswith("50% of the answers end within" if profile["ended"] >= 0.5 else "fewer than 50%")


def test_bad_lengths_flags(tmp_path):
    plain = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi"}])
    for flags, message in [(("--prompts", tmp_path / "nope.jsonl"), "error: --prompts: no such file"),
                           (("--max-new-tokens", 0), "error: --max-new-tokens: must be >= 1"),
                           (("--top-p", 1.5), "error: --top-p: must be in [0.0, 1.0]"),
                           (("--temperature", -1), "error: --temperature: must be >= 0"),
                           (("--prompts", plain, "--system", "Be brief."),
                            f"error: --system: {plain}: prompt 1 is a plain string")]:
        res = cli("lengths", *flags)
        assert res.returncode == 2 and res.stderr.startswith(message), res.stderr


def test_bad_bench_flags(tmp_path):
    for flags, message in [(("--steps", 1), "error: --steps: must be >= 2"),
                           (("--batch-size", 4, "--micro-batch-size", 3), "error: --micro-batch-size: must divide"),
                           (("--dataset", tmp_path), "error: --dataset: not a file"),
                           (("--json", tmp_path), "error: --json: is a folder"),
                           (("--beta", 0), "error: --beta: must be > 0")]:
        res = cli("bench", "--vs", "trl", *flags)
        assert res.returncode == 2 and res.stderr.startswith(message), res.stderr


def _long_run(d, model, train, test, out, *extra):
    # long enough (~10 s at ~40 tiny steps/s) that a second command, which needs seconds to import torch,
    # starts while the first still runs: with 60 steps a fast CPU finished the first run before it.
    # One thread, as in the SIGKILL test: the resumed weights are compared bitwise.
    return train_args(d, model, train, test, out, "--save-every", 2, "--no-eval", "--precision", "fp32",
                      "--max-steps", 400, "--threads", 1, *extra)


def test_second_run_into_a_live_runs_folder_is_refused_and_a_killed_run_frees_it(tiny_setup):
    d, model, train, test = tiny_setup
    out = d / "busy"
    first = _start(*_long_run(d, model, train, test, out))
    _wait_for_checkpoint(first, out)
    second = cli(*_long_run(d, model, train, test, out))
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=60)
    assert second.returncode == 2 and f"{out} is in use by another run (pid {first.pid})" in second.stderr
    assert "Traceback" not in second.stderr
    assert first.returncode == -9, "the first run ended before the second started; nothing was tested"
    res = cli(*_long_run(d, model, train, test, out, "--resume"))  # the lock died with its process
    assert res.returncode == 0, res.stderr[-2000:]


def test_resume_with_other_settings_is_refused_unless_forced(tiny_setup):
    d, model, train, test = tiny_setup
    out = d / "changed"
    proc = _start(*_long_run(d, model, train, test, out))
    _wait_for_checkpoint(proc, out)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    res = cli(*_long_run(d, model, train, test, out, "--resume", "--learning-rate", 2e-3, "--beta", 0.2))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "--learning-rate 0.001 (now 0.002)" in res.stderr and "--beta 0.1 (now 0.2)" in res.stderr
    assert not (out / "final").exists()
    res = cli(*_long_run(d, model, train, test, out, "--resume", "--print-every", 3))  # does not change the result
    assert res.returncode == 0, res.stderr[-2000:]


def test_ctrl_c_saves_says_how_to_resume_exits_130_and_resumes_exactly(tiny_setup):
    d, model, train, test = tiny_setup
    straight, broken = d / "straight-int", d / "interrupted"
    assert cli(*_long_run(d, model, train, test, straight)).returncode == 0
    proc = _start(*_long_run(d, model, train, test, broken))
    _wait_for_checkpoint(proc, broken)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted after step" in err and "--resume" in err and "Traceback" not in err
    assert not (broken / "final").exists()
    res = cli(*_long_run(d, model, train, test, broken, "--resume"))
    assert res.returncode == 0, res.stderr[-2000:]
    a = load_file(straight / "final" / "model.safetensors")
    b = load_file(broken / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
