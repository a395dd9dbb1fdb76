"""Nothing lost, one clear line for every mistake (issue 38, points 1, 4 and 6), through the real command line.

Every case here is refused by the checks that run before torch or a model is loaded: exit 2, one line
naming the flag or the file, nothing written."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _tiny import save_tiny, toy_rows, write_jsonl

ENV = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
REPO = Path(__file__).resolve().parents[1]


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "dpo_lib", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=300, cwd=cwd)


def refused(res, start: str) -> None:
    assert res.returncode == 2, res.stdout[-1000:] + res.stderr[-2000:]
    assert res.stderr.startswith(start) and len(res.stderr.strip().splitlines()) == 1, res.stderr


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    d = tmp_path_factory.mktemp("safety")
    save_tiny(d / "tiny")
    write_jsonl(d / "train.jsonl", toy_rows(16))
    write_jsonl(d / "prompts.jsonl", [{"prompt": "Hi"}])
    return d


def train(d, out, *extra):
    return cli("train", "--model", d / "tiny", "--dataset", d / "train.jsonl", "--no-eval", "--out", out, *extra)


def test_a_finished_run_is_refused_without_resume_or_overwrite(d, tmp_path):
    out = tmp_path / "run"
    (out / "final").mkdir(parents=True)
    (out / "summary.json").write_text("{}")
    before = sorted(p.name for p in out.iterdir())
    refused(train(d, out), f"error: --out: {out} holds a finished run (summary.json, final): --resume to continue "
                           "it, --overwrite to start over (deleting it), or another --out")
    assert sorted(p.name for p in out.iterdir()) == before and (out / "summary.json").read_text() == "{}"
    refused(train(d, out, "--resume", "--overwrite"), "error: --overwrite: and --resume contradict each other")


def test_overwrite_starts_over(d, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / "step-000050").mkdir(parents=True)
    (out / "summary.json").write_text('{"old": 1}')
    res = train(d, out, "--overwrite", "--reward", "none", "--no-capability", "--batch-size", 4, "--grad-accum", 2,
                "--max-steps", 2, "--precision", "fp32", "--threads", 1)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "--overwrite: deleted the previous run" in res.stdout
    assert not (out / "checkpoints").exists() and '"old"' not in (out / "summary.json").read_text()
    assert (out / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("name,kind", [("final", "file"), ("checkpoints", "file"), ("summary.json", "folder"),
                                       ("metrics.jsonl", "folder")])
def test_a_path_in_the_way_of_the_run_is_refused_before_any_work(d, tmp_path, name, kind):
    out = tmp_path / "run"
    out.mkdir()
    (out / name).write_text("x") if kind == "file" else (out / name).mkdir()
    want = "a folder" if kind == "file" else "a file"
    refused(train(d, out), f"error: --out: {out / name} is a {kind}, where the run writes {want}; move it away")


def test_outputs_that_are_inputs_or_blocked_are_refused(d, tmp_path):
    prompts = d / "prompts.jsonl"
    refused(cli("pairs", "--prompts", prompts, "--out", prompts), "error: --out: is the --prompts file")
    refused(cli("lengths", "--prompts", prompts, "--json", prompts), "error: --json: is the --prompts file")
    refused(cli("bench", "--dataset", d / "train.jsonl", "--json", d / "train.jsonl"),
            "error: --json: is the --dataset file")
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    refused(cli("lengths", "--prompts", prompts, "--json", blocker / "p.json"), "error: --json: cannot write under")
    refused(cli("bench", "--json", blocker / "b.json"), "error: --json: cannot write under")
    refused(cli("pairs", "--prompts", prompts, "--out", blocker / "x" / "p.jsonl"), "error: --out: cannot write under")
    refused(train(d, blocker), f"error: --out: exists and is not a folder: {blocker}")


def test_input_that_cannot_work_is_refused_before_loading(d, tmp_path):
    empty = tmp_path / "no-weights"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    refused(train(d, tmp_path / "a", "--model", empty),
            f"error: --model: {empty} is a folder without model weights (no *.safetensors)")
    refused(cli("lengths", "--model", d / "train.jsonl"), f"error: --model: {d / 'train.jsonl'} is a file")
    for cmd in (("train", "--out", tmp_path / "b"), ("iterate", "--prompts", d / "prompts.jsonl", "--out",
                                                     tmp_path / "c")):
        refused(cli(*cmd, "--reward", "bogus"), "error: --reward: must be one of none, sentiment (got 'bogus')")
    res = cli("pairs", "--prompts", d / "prompts.jsonl", "--out", tmp_path / "p.jsonl", "--reward", "bogus")
    assert res.returncode == 2 and "--reward: invalid choice: 'bogus'" in res.stderr
    few = write_jsonl(tmp_path / "few.jsonl", toy_rows(3))
    res = cli("train", "--model", d / "tiny", "--dataset", few, "--no-eval", "--out", tmp_path / "d",
              "--batch-size", 4, "--grad-accum", 2)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1] == f"error: --dataset: {few} has 3 pairs, fewer than one batch of " \
                                                  "--batch-size 4; use more pairs or a smaller --batch-size"
    assert "precision" not in res.stdout  # refused before the model was set up


def _course_copy(tmp_path) -> Path:
    root = tmp_path / "course"
    root.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, root / name)
    for folder in ("notebooks", "solutions", "exercises"):
        shutil.copytree(REPO / folder, root / folder)
    return root


def test_exercises_check_names_the_notebook_and_the_fix(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    res = cli("exercises", "--check", cwd=outside)
    assert res.returncode == 2 and res.stderr.startswith(f"error: no solution notebooks in {outside / 'solutions'}")
    root = _course_copy(tmp_path)
    first = sorted((root / "solutions").glob("*.ipynb"))[0]
    first.unlink()
    res = cli("exercises", "--check", cwd=root)
    assert res.returncode == 1
    assert f"out of sync: exercises/{first.name} has no solution notebook, solutions/{first.name} is missing: " \
           f"restore it with `git checkout -- solutions/{first.name}`" in res.stdout
    broken = sorted((root / "solutions").glob("*.ipynb"))[0]
    broken.write_text(broken.read_text()[:200])
    res = cli("exercises", "--check", cwd=root)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.startswith(f"error: solutions/{broken.name}: not a readable notebook (NotJSONError); restore "
                                 f"it with `git checkout -- solutions/{broken.name}`")


def test_colab_check_finds_a_link_to_a_missing_notebook_and_refuses_outside_a_checkout(tmp_path):
    res = cli("colab", "--check", "--root", tmp_path)
    assert res.returncode == 2 and res.stderr.startswith(f"error: {tmp_path} is not a checkout of the course")
    root = _course_copy(tmp_path)
    lesson = sorted((root / "notebooks").glob("*.ipynb"))[0]
    lesson.unlink()
    res = cli("colab", "--check", "--root", root)
    assert res.returncode == 1, res.stdout + res.stderr
    assert f"README.md: Colab link to notebooks/{lesson.name}, which does not exist: restore the notebook" \
        in res.stdout
