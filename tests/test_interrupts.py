"""Ctrl-C and SIGTERM through the real command line (issue 38, point 5).

The signal is delivered deterministically, from inside the training process, at each point of a step
(before the forward, between the micro-batches, inside the optimizer step, inside the checkpoint write,
and a second one inside the checkpoint written because of the first) by a test-only hook
(``tests/_hooks.py``, installed by a sitecustomize): no timing is involved. Every interrupted run says how
to resume and exits 128 + the signal; every resumed run ends with bitwise the weights of the uninterrupted one."""

import os
import signal
import subprocess
import sys
import time

import pytest
from _hooks import hook_env
from _tiny import save_tiny, toy_rows, write_jsonl
from safetensors.torch import load_file

ENV = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "dpo_lib", *map(str, args)], capture_output=True, text=True,
                          env=env or ENV, timeout=300)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("interrupts")
    model = save_tiny(d / "tiny")
    train = write_jsonl(d / "train.jsonl", toy_rows(16))
    return d, model, train


def args(d, model, train, out, *extra):
    # fp32 on one thread: bitwise the same weights in every process; 6 steps of 2 micro-batches, a checkpoint
    # every 2 steps; no evaluation (only the training is compared)
    return ("train", "--model", model, "--dataset", train, "--no-eval", "--reward", "none", "--no-capability",
            "--out", out, "--batch-size", 4, "--grad-accum", 2, "--max-steps", 6, "--learning-rate", 1e-3,
            "--save-every", 2, "--precision", "fp32", "--threads", 1, "--print-every", 0, *extra)


@pytest.fixture(scope="module")
def straight(setup):
    d, model, train = setup
    out = d / "straight"
    res = cli(*args(d, model, train, out))
    assert res.returncode == 0, res.stderr[-2000:]
    return load_file(out / "final" / "model.safetensors")


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


# (signal, point of the step, 1-based step, the step the checkpoint of the interrupt holds)
POINTS = [("SIGINT", "forward", 3, 3), ("SIGTERM", "micro", 3, 3), ("SIGINT", "optimizer", 5, 5),
          ("SIGTERM", "checkpoint", 2, 2), ("SIGINT", "checkpoint-twice", 2, 2)]


@pytest.mark.parametrize("sig,at,step,saved", POINTS, ids=[f"{s}-{a}" for s, a, *_ in POINTS])
def test_a_signal_at_each_point_of_a_step_resumes_bitwise(setup, straight, tmp_path, sig, at, step, saved):
    d, model, train = setup
    out = tmp_path / "run"
    res = cli(*args(d, model, train, out), env=hook_env(tmp_path / "hook", signal=sig, at=at, step=step))
    code = 128 + getattr(signal, sig)
    assert res.returncode == code, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    if at == "checkpoint-twice":  # the second signal stops the interrupt's checkpoint write at once
        assert res.stderr.strip().splitlines()[-1] == "interrupted" + ("" if sig == "SIGINT" else f" by {sig}")
    else:
        by = "" if sig == "SIGINT" else f" by {sig}"
        assert f"interrupted after step {saved}{by}; checkpoint {out / 'checkpoints' / f'step-{saved:06d}'}. " \
               "Resume with the same command and --resume." in res.stderr, res.stderr[-2000:]
    assert not (out / "final").exists()
    assert not list((out / "checkpoints").glob(".tmp-*")) and not list((out / "checkpoints").glob(".old-*"))
    res = cli(*args(d, model, train, out, "--resume"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"resumed from {out / 'checkpoints' / f'step-{saved:06d}'} (step {saved}/6)" in res.stdout
    assert same(straight, load_file(out / "final" / "model.safetensors"))


def test_sigterm_from_outside_finishes_the_step_checkpoints_and_exits_143(setup, straight, tmp_path):
    """What a scheduler or ``docker stop`` does: SIGTERM from another process, while the run trains."""
    d, model, train = setup
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "dpo_lib", *map(str, args(d, model, train, out, "--max-steps",
                                                                             400))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.monotonic() + 240
    while not (out / "checkpoints" / "latest").is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "by SIGTERM; checkpoint" in err and "--resume" in err and "Traceback" not in err
