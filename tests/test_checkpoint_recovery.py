"""Damaged checkpoints and full disks through the real command line (issue 38, points 2 and 3).

A finished run keeps its checkpoints of steps 2, 4 and 6; copies of it are damaged the ways a crash or a
full disk damages files, and ``--resume`` must take the newest complete checkpoint, say which and why,
delete nothing and end with bitwise the weights of the undamaged run. A full disk and a read-only
folder are simulated inside the CLI process (``tests/_hooks.py``), never on the machine's mounts."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from _hooks import hook_env
from _tiny import save_tiny, toy_rows, write_jsonl
from safetensors.torch import load_file

ENV = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "dpo_lib", *map(str, args)], capture_output=True, text=True,
                          env=env or ENV, timeout=300)


def args(d, out, *extra):
    return ("train", "--model", d / "tiny", "--dataset", d / "train.jsonl", "--no-eval", "--reward", "none",
            "--no-capability", "--out", out, "--batch-size", 4, "--grad-accum", 2, "--max-steps", 6,
            "--learning-rate", 1e-3, "--save-every", 2, "--keep-checkpoints", 3, "--precision", "fp32",
            "--threads", 1, "--print-every", 0, *extra)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    d = tmp_path_factory.mktemp("recovery")
    save_tiny(d / "tiny")
    write_jsonl(d / "train.jsonl", toy_rows(16))
    res = cli(*args(d, d / "run"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert sorted(p.name for p in (d / "run" / "checkpoints").glob("step-*")) == \
        ["step-000002", "step-000004", "step-000006"]
    return d


def weights(out):
    return load_file(out / "final" / "model.safetensors")


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


def errors(stderr: str) -> list[str]:
    """What the command said on stderr, without the progress bar."""
    return [x for x in stderr.strip().splitlines() if not x.startswith("DPO:")]


def truncate(path, keep: int = 100):
    path.write_bytes(path.read_bytes()[:keep])


def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one(finished, tmp_path):
    d = finished
    out = shutil.copytree(d / "run", tmp_path / "run")
    shutil.rmtree(out / "final")
    truncate(out / "checkpoints" / "step-000006" / "model.safetensors")
    res = cli(*args(d, out, "--resume"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"resumed from {out / 'checkpoints' / 'step-000004'} (step 4/6); skipped step-000006: " \
           "model.safetensors has 100 bytes" in res.stdout, res.stdout[-2000:]
    assert same(weights(d / "run"), weights(out))
    assert (out / "checkpoints" / "damaged-step-000006" / "model.safetensors").stat().st_size == 100  # kept


def test_corrupt_state_and_truncated_optimizer_fall_back_two_checkpoints(finished, tmp_path):
    d = finished
    out = shutil.copytree(d / "run", tmp_path / "run")
    shutil.rmtree(out / "final")
    (out / "checkpoints" / "step-000006" / "trainer_state.json").write_text("{not json")
    truncate(out / "checkpoints" / "step-000004" / "optimizer.pt")
    res = cli(*args(d, out, "--resume"))
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
    line = next(x for x in res.stdout.splitlines() if "resumed from" in x)
    assert f"resumed from {out / 'checkpoints' / 'step-000002'} (step 2/6)" in line
    assert "step-000006: trainer_state.json has" in line and "step-000004: optimizer.pt has 100 bytes" in line
    assert same(weights(d / "run"), weights(out))


def test_no_complete_checkpoint_says_why_and_deletes_nothing(finished, tmp_path):
    d = finished
    out = shutil.copytree(d / "run", tmp_path / "run")
    shutil.rmtree(out / "final")
    for step in ("step-000002", "step-000004", "step-000006"):
        (out / "checkpoints" / step / "manifest.json").unlink()  # as if every write had been cut short
    (out / "checkpoints" / "step-000006" / "trainer_state.json").unlink()
    res = cli(*args(d, out, "--resume"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"--resume: no complete checkpoint in {out}: none is complete (step-000006: no manifest.json" \
           in res.stdout and "starting from step 0" in res.stdout
    assert same(weights(d / "run"), weights(out))  # retrained from step 0: the same weights


@pytest.mark.parametrize("error,message", [("ENOSPC", "No space left on device"),
                                           ("EROFS", "Read-only file system")])
def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_last_checkpoint(finished, tmp_path, error,
                                                                                   message):
    d = finished
    out = tmp_path / "run"
    res = cli(*args(d, out), env=hook_env(tmp_path / "hook", fail="checkpoint", call=2, error=error))
    assert res.returncode == 2, res.stderr[-2000:]
    assert errors(res.stderr) == [
        f"error: cannot write checkpoint step-000004 in {out / 'checkpoints'}: {message} "
        "(last complete checkpoint: step-000002)"]
    left = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert left == ["latest", "step-000002"]  # no temporary folder
    res = cli(*args(d, out, "--resume"))
    assert res.returncode == 0 and "resumed from" in res.stdout and "(step 2/6)" in res.stdout
    assert same(weights(d / "run"), weights(out))


def test_a_full_disk_in_a_checkpoints_weights_is_one_line_and_keeps_the_last_checkpoint(finished, tmp_path):
    """The weights' write (safetensors, whose own error a full disk raises, not an OSError) fails in the
    second checkpoint: the same one line as a failed optimizer-state write, no temporary folder left."""
    d = finished
    out = tmp_path / "run"
    res = cli(*args(d, out), env=hook_env(tmp_path / "hook", fail="checkpoint-weights", call=2))
    assert res.returncode == 2, res.stderr[-2000:]
    assert errors(res.stderr) == [
        f"error: cannot write checkpoint step-000004 in {out / 'checkpoints'}: No space left on device "
        "(os error 28) (last complete checkpoint: step-000002)"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-000002"]


@pytest.mark.parametrize("fail,error,message", [("final", "EROFS", "Read-only file system"),
                                                 ("weights", "ENOSPC", "No space left on device (os error 28)")])
def test_a_failed_final_save_is_an_error(finished, tmp_path, fail, error, message):
    """A read-only folder (an OSError) or a full disk in the weights' write (safetensors' own error, not an
    OSError): one line naming the folder, exit 2, no summary, the last checkpoint kept."""
    d = finished
    out = tmp_path / "run"
    res = cli(*args(d, out), env=hook_env(tmp_path / "hook", fail=fail, error=error))
    assert res.returncode == 2, res.stderr[-2000:]
    assert errors(res.stderr) == [f"error: cannot write the final model in {out / 'final'}: {message}"]
    assert not (out / "summary.json").exists()
    assert json.loads((out / "checkpoints" / "step-000006" / "manifest.json").read_text())["step"] == 6
