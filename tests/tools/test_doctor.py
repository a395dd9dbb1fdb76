"""``python -m dpo_lib doctor`` (dpo_lib.tools.doctor): each finding on synthetic logs in both layouts
(dpo_lib's metrics.jsonl and TRL's trainer_state.json), reading files and checkpoints, the exit codes
(through ``python -m dpo_lib.tools.doctor`` and the main CLI ``python -m dpo_lib doctor``), the plot,
and real tiny-model runs of dpo_lib's trainer and of TRL's DPOTrainer. The synthetic logs and the
thresholds are tests/tools/test_doctor_checks.py's."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
from _tiny import tiny, toy_rows, train_config
from test_doctor_checks import FAILURES, healthy, likelihood_displacement, nonfinite, overfitting, saturation

from dpo_lib.tools.doctor import DoctorError, main, read_run
from dpo_lib.tools.doctor_checks import CHECKS, diagnose

REPO = Path(__file__).resolve().parents[2]
LN2 = math.log(2)


# ---------------------------------------------------------------- the two layouts

def write_dpo_lib(folder: Path, rows: list[dict], evals: list[dict], config: dict | None = None) -> Path:
    """A dpo_lib run folder: metrics.jsonl (held-out points in its lines, as HeldoutEval writes them), run_card.json."""
    folder.mkdir(parents=True, exist_ok=True)
    at = {e["step"]: e for e in evals}
    lines = [{**r, **({"eval/accuracy": at[r["step"]]["accuracy"], "eval/accuracy_se": at[r["step"]]["accuracy_se"],
                       "eval/margin": 1.0} if r["step"] in at else {})} for r in rows]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (folder / "run_card.json").write_text(json.dumps({"config": config or {"beta": 0.1, "loss_type": "sigmoid"}}))
    return folder


def write_trl(folder: Path, rows: list[dict], evals: list[dict], logging_steps: int = 1) -> Path:
    """A TRL output folder: trainer_state.json with its log_history (train entries, eval_ entries, the summary)."""
    folder.mkdir(parents=True, exist_ok=True)
    log = []
    for r in rows:
        log.append({k: v for k, v in r.items() if k != "num_tokens"})
        log += [{"eval_loss": 0.6, "eval_rewards/accuracies": e["accuracy"], "eval_rewards/margins": 0.8,
                 "epoch": r["epoch"], "step": r["step"]} for e in evals if e["step"] == r["step"]]
    log.append({"train_runtime": 12.0, "train_loss": 0.5, "epoch": rows[-1]["epoch"], "step": rows[-1]["step"]})
    state = {"global_step": rows[-1]["step"], "logging_steps": logging_steps, "max_steps": rows[-1]["step"],
             "log_history": log}
    (folder / "trainer_state.json").write_text(json.dumps(state, indent=1))
    return folder


WRITERS = {"dpo_lib": write_dpo_lib, "trl": write_trl}


def doctor(path, tmp_path) -> tuple[int, list[dict]]:
    out = tmp_path / "report.json"
    code = main([str(path), "--json", str(out)])
    return code, json.loads(out.read_text())["findings"]


def flagged(findings: list[dict]) -> set[str]:
    return {f["id"] for f in findings if f["severity"] in ("problem", "warning")}


# ---------------------------------------------------------------- one finding per synthetic run

@pytest.mark.parametrize("layout", WRITERS)
def test_healthy_synthetic_run_has_no_problem_or_warning(layout, tmp_path):
    rows, evals = healthy(), [{"step": 40, "accuracy": 0.82, "accuracy_se": 0.05}]
    code, findings = doctor(WRITERS[layout](tmp_path / "run", rows, evals), tmp_path)
    assert code == 0 and flagged(findings) == set()


@pytest.mark.parametrize("layout", WRITERS)
@pytest.mark.parametrize("failure", FAILURES)
def test_each_failure_is_found_alone_in_both_layouts(failure, layout, tmp_path):
    rows, evals = FAILURES[failure]()
    code, findings = doctor(WRITERS[layout](tmp_path / "run", rows, evals), tmp_path)
    assert code == 1
    assert flagged(findings) == {failure}
    (f,) = [f for f in findings if f["id"] == failure]
    assert set(f) == {"id", "severity", "steps", "evidence", "meaning", "lesson", "try"}
    assert f["steps"] and all(isinstance(s, int) for s in f["steps"]) and "lesson 0" in f["lesson"]


def test_json_report_schema_and_checked_ids(tmp_path):
    write_dpo_lib(tmp_path / "run", *nonfinite())
    main([str(tmp_path / "run"), "--json", str(tmp_path / "r.json")])
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["checked"] == list(CHECKS) and report["source"] == "dpo_lib" and report["steps_logged"] == 40
    (f,) = report["findings"]
    assert f["severity"] == "problem" and f["steps"] == [31, 32] and "step 31" in f["evidence"]


def test_displacement_reports_nats_when_beta_is_known(tmp_path):
    write_dpo_lib(tmp_path / "run", *likelihood_displacement(), config={"beta": 0.1, "loss_type": "sigmoid"})
    (f,) = diagnose(read_run(tmp_path / "run"))
    assert "nats" in f.evidence and "DPOP" in f.try_ and "Part 2" in f.lesson


def test_reference_is_unchecked_when_the_first_entry_averages_steps(tmp_path):
    rows = healthy()[4:]  # TRL with logging_steps=5: the first entry is step 5
    code, findings = doctor(write_trl(tmp_path / "run", rows, [], logging_steps=5), tmp_path)
    assert code == 0
    assert [(f["id"], f["severity"]) for f in findings] == [("reference_mismatch", "info")]



# ---------------------------------------------------------------- reading, exit codes, the plot

def test_reads_files_checkpoints_and_histories(tmp_path):
    rows, _ = healthy(), []
    write_dpo_lib(tmp_path / "ours", rows, [])
    assert read_run(tmp_path / "ours" / "metrics.jsonl").config["beta"] == 0.1
    write_trl(tmp_path / "trl" / "checkpoint-10", rows[:10], [])
    write_trl(tmp_path / "trl" / "checkpoint-40", rows, [])
    run = read_run(tmp_path / "trl")  # an output folder with checkpoints only: the latest one
    assert run.source == "trl" and run.train[-1]["step"] == 40 and run.path.endswith("checkpoint-40/trainer_state.json")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 40, "config": {"beta": 0.1}, "history": rows}))
    assert read_run(ckpt / "trainer_state.json").source == "dpo_lib"


def written(name: str, text: str):
    def make(folder: Path) -> Path:
        (folder / name).write_text(text)
        return folder
    return make


@pytest.mark.parametrize("make, why", [
    (lambda p: p / "missing", "no such file"),
    (lambda p: p, "neither metrics.jsonl"),
    (written("metrics.jsonl", '{"step": 1, "loss": 0.69}\n{oops\n'), "line 2 is not JSON"),
    (written("trainer_state.json", '{"log_history": []}'), "no training entry"),
    (written("trainer_state.json", '[1, 2]'), "holds no object"),
])
def test_unreadable_path_is_one_line_and_exit_2(make, why, tmp_path, capsys):
    path = make(tmp_path)
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: ") and why in err and err.count("\n") == 1
    with pytest.raises(DoctorError):
        read_run(path)


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dpo_lib.tools.doctor", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_command_line_exit_codes(tmp_path):
    good = write_trl(tmp_path / "good", healthy(), [])
    bad = write_dpo_lib(tmp_path / "bad", *saturation())
    ok, problem, unreadable = run_cli(good), run_cli(bad, "--plot", tmp_path / "p.png"), run_cli(tmp_path / "none")
    assert ok.returncode == 0 and "verdict: 0 problems, 0 warnings" in ok.stdout
    assert problem.returncode == 1 and "WARNING saturation" in problem.stdout
    assert unreadable.returncode == 2 and unreadable.stdout == "" and "Traceback" not in unreadable.stderr
    assert unreadable.stderr == f"error: {tmp_path / 'none'}: no such file or folder\n"
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_main_cli_doctor_exit_codes(tmp_path):
    """``python -m dpo_lib doctor PATH``, the command the README shows: 0 on a healthy run, 2 and one
    line on a path it cannot read."""
    def dpo_lib_cli(*args) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dpo_lib", "doctor", *map(str, args)], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
    good = write_dpo_lib(tmp_path / "good", healthy(), [{"step": 40, "accuracy": 0.82, "accuracy_se": 0.05}])
    ok, unreadable = dpo_lib_cli(good), dpo_lib_cli(tmp_path / "none")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith(f"doctor: {good / 'metrics.jsonl'}\n")
    assert "verdict: 0 problems, 0 warnings" in ok.stdout
    assert unreadable.returncode == 2 and unreadable.stdout == ""
    assert unreadable.stderr == f"error: {tmp_path / 'none'}: no such file or folder\n"


def test_plot_marks_every_finding(tmp_path):
    from dpo_lib.tools.doctor_plot import plot_run
    rows, evals = overfitting()
    rows[30]["grad_norm"] = float("nan")
    run = read_run(write_dpo_lib(tmp_path / "run", rows, evals))
    findings = diagnose(run)
    assert {f.id for f in findings} == {"overfitting", "nonfinite"}
    plot_run(run, findings, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 10_000


# ---------------------------------------------------------------- real tiny-model runs

def dpo_lib_run(out: Path, rows: list[dict], heldout: list[dict] = (), reference_seed: int | None = None,
                **kw) -> Path:
    """Train the tiny model with dpo_lib's trainer into ``out`` (metrics.jsonl) and write a run card."""
    from dpo_lib.evaluation import HeldoutEval
    from dpo_lib.features import tokenize_rows
    from dpo_lib.reference import FrozenReference, precompute_reference_logps
    from dpo_lib.trainer import DPOTrainer
    model, tok = tiny()
    start = FrozenReference(model)
    feats, _ = tokenize_rows(tok, rows)
    reference = FrozenReference(tiny(seed=reference_seed)[0]) if reference_seed is not None else None
    if reference is None:
        feats = precompute_reference_logps(start, feats, tok.pad_token_id)
    evals = precompute_reference_logps(start, tokenize_rows(tok, heldout)[0], tok.pad_token_id) if heldout else []
    config = train_config(batch_size=4, warmup_ratio=0.0, schedule="constant", print_every=0, **kw)
    trainer = DPOTrainer(model, feats, config, tok.pad_token_id, reference=reference, out_dir=out,
                         policy_is_reference=reference is None)  # else step 1 would score the policy against itself
    trainer.train(progress=False, callbacks=[HeldoutEval(evals, tok.pad_token_id, every=4)] if evals else [])
    (out / "run_card.json").write_text(json.dumps({"config": asdict(config)}))
    return out


def test_tiny_dpo_lib_run_healthy(tmp_path, capsys):
    out = dpo_lib_run(tmp_path / "run", toy_rows(64), heldout=toy_rows(80)[64:], learning_rate=1e-3)
    code = main([str(out)])
    text = capsys.readouterr().out
    print(text)
    assert code == 0 and "verdict: 0 problems, 0 warnings" in text and "held-out accuracy" in text
    assert len(read_run(out).eval) == 4


def test_tiny_dpo_lib_run_with_no_learning_rate(tmp_path):  # TrainConfig needs lr > 0: 1e-12 moves nothing
    code, findings = doctor(dpo_lib_run(tmp_path / "run", toy_rows(32), learning_rate=1e-12), tmp_path)
    assert code == 1 and flagged(findings) == {"no_learning"}


def test_tiny_dpo_lib_run_against_another_reference(tmp_path):
    out = dpo_lib_run(tmp_path / "run", toy_rows(32), reference_seed=1, learning_rate=1e-3)
    code, findings = doctor(out, tmp_path)
    assert code == 1 and "reference_mismatch" in flagged(findings)
    (f,) = [f for f in findings if f["id"] == "reference_mismatch"]
    assert f["severity"] == "problem" and f["steps"] == [1]


def trl_run(out: Path, ref_seed: int = 0) -> Path:
    """TRL's DPOTrainer on the tiny model, 16 steps with two evaluations, a checkpoint at the end."""
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    model, tok = tiny(seed=0)
    ref, _ = tiny(seed=ref_seed)
    args = trl.DPOConfig(output_dir=str(out), per_device_train_batch_size=4, max_steps=16, learning_rate=1e-3,
                         lr_scheduler_type="constant", beta=0.1, logging_steps=1, report_to="none", use_cpu=True,
                         max_length=None, save_strategy="steps", save_steps=16, seed=0, bf16=False,
                         disable_tqdm=True, eval_strategy="steps", eval_steps=8, per_device_eval_batch_size=8)
    data = {split: datasets.Dataset.from_list(rows) for split, rows in (("train", toy_rows(64)),
                                                                         ("eval", toy_rows(80)[64:]))}
    trainer = trl.DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=data["train"],
                             eval_dataset=data["eval"], processing_class=tok)
    trainer.train()
    return out


@pytest.mark.filterwarnings("ignore")
def test_tiny_trl_run_healthy_and_with_another_reference(tmp_path, capsys):
    good = trl_run(tmp_path / "good")
    assert main([str(good)]) == 0
    text = capsys.readouterr().out
    print(text)
    assert "trl run, 16 logged steps" in text and "held-out accuracy" in text
    run = read_run(good / "checkpoint-16" / "trainer_state.json")
    assert len(run.eval) == 2 and run.train[0]["loss"] == pytest.approx(LN2, abs=1e-6)
    code, findings = doctor(trl_run(tmp_path / "bad", ref_seed=1), tmp_path)
    assert code == 1 and "reference_mismatch" in flagged(findings)
