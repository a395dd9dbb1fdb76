"""``python -m dpo_lib doctor PATH``: read the logs of a DPO run and say what went wrong.

PATH is a ``dpo_lib`` run folder (``metrics.jsonl``, with ``summary.json`` / ``run_card.json`` when
present), a ``dpo_lib`` checkpoint, a TRL output or checkpoint folder (``trainer_state.json``, its
``log_history``), or one of those files. The doctor rebuilds the curves a DPO user reads (loss
against ln 2, implicit rewards, margins, train and held-out accuracy, gradient norm), checks each
known failure against its definition and prints the findings: evidence in numbers and steps, what
it means, the lesson that shows it, what to try. Exit status: 0 nothing wrong, 1 a problem or a
warning, 2 PATH cannot be read.

This module reads the two layouts (:func:`read_run`: PATH -> :class:`dpo_lib.tools.doctor_run.Run`;
:func:`run_from_history`: a trainer's in-memory history, e.g. lesson 06), writes the report
(:func:`format_report`, :func:`report_json`) and is the command (:func:`main`). The findings and
their thresholds are :mod:`dpo_lib.tools.doctor_checks` (:func:`~dpo_lib.tools.doctor_checks.diagnose`);
``--plot`` is :func:`dpo_lib.tools.doctor_plot.plot_run`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dpo_lib.tools.doctor_checks import CHECKS, LN2, Finding, diagnose
from dpo_lib.tools.doctor_run import Run, finite, series, span, tail

__all__ = ["HELDOUT_KEYS", "DoctorError", "build_parser", "curves_summary", "format_report", "main", "read_run",
           "report_json", "run_from_history"]


class DoctorError(Exception):
    """PATH cannot be read as a DPO run (the message says why, in one line)."""


# ---------------------------------------------------------------- reading a run

def _load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise DoctorError(f"cannot read {path.name}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise DoctorError(f"{path.name} is not JSON ({e.msg}, line {e.lineno})") from None


def _read_jsonl(path: Path) -> list[dict]:
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DoctorError(f"cannot read {path.name}: {e.strerror or e}") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DoctorError(f"{path.name} line {n} is not JSON ({e.msg})") from None
    return rows


HELDOUT_KEYS = ("accuracy", "accuracy_se", "margin", "margin_se", "chosen_reward", "chosen_reward_se")
"""A held-out point's figures: ``eval/KEY`` in a dpo_lib metrics line (:class:`dpo_lib.evaluation.HeldoutEval`),
``heldout_KEY_after`` (``heldout_KEY_after_se`` for its SE) in summary.json. Rewards include β:
``chosen_reward`` = β·(log π − log π_ref) of the chosen reply, ``margin`` = β·h, each the mean over the held-out
pairs, ``_se`` its standard error over them."""


def _summary_key(key: str) -> str:
    """summary.json's name of a held-out figure: ``heldout_chosen_reward_after``, ``heldout_margin_after_se`` …"""
    return f"heldout_{key[:-3]}_after_se" if key.endswith("_se") else f"heldout_{key}_after"


def _dpo_lib_eval(rows: list[dict]) -> list[dict]:
    """The held-out points ``HeldoutEval`` wrote into the training lines (``eval/accuracy`` …)."""
    return [{"step": r["step"], **{key: r.get(f"eval/{key}") for key in HELDOUT_KEYS}}
            for r in rows if "eval/accuracy" in r]


def run_from_history(history: list[dict], config: dict | None = None, summary: dict | None = None,
                     path: str = "(history)", source: str = "dpo_lib") -> Run:
    """A :class:`Run` from per-step metrics as :class:`dpo_lib.trainer.DPOTrainer` returns them
    (``trainer.history``, or the lines of ``metrics.jsonl``); ``config`` gives β and the loss type.

    ``summary`` (a ``summary.json``, or what a notebook measured on held-out pairs at the end of the run)
    gives the held-out point at the last step: ``heldout_accuracy_after``, ``heldout_margin_after``,
    ``heldout_chosen_reward_after``, each with ``_se`` (rewards in β units: a log-prob change in nats times
    β). Where the history logged a point at the last step, its figures are kept and the summary fills
    the ones it lacks; the displacement check decides on the held-out chosen reward and margin when present."""
    rows = [r for r in history if isinstance(r, dict) and "step" in r and "loss" in r]
    if not rows:
        raise DoctorError(f"{path}: no training step with a 'step' and a 'loss' in it")
    evals = _dpo_lib_eval(rows)
    summary = summary or {}
    end = {key: summary[_summary_key(key)] for key in HELDOUT_KEYS if finite(summary.get(_summary_key(key)))}
    if end:
        last = rows[-1]["step"]
        if evals and evals[-1]["step"] == last:
            evals[-1] = {**evals[-1], **{k: v for k, v in end.items() if not finite(evals[-1].get(k))}}
        else:
            evals.append({"step": last, **{key: end.get(key) for key in HELDOUT_KEYS}})
    return Run(source=source, path=str(path), train=rows, eval=evals, config=dict(config or {}), summary=summary)


def _read_dpo_lib(folder: Path, metrics: Path) -> Run:
    card = _load_json(folder / "run_card.json") if (folder / "run_card.json").is_file() else {}
    summary = _load_json(folder / "summary.json") if (folder / "summary.json").is_file() else {}
    config = card.get("config") or summary.get("config") or {}
    return run_from_history(_read_jsonl(metrics), config, summary, path=str(metrics))


def _trl_entry(entry: dict) -> tuple[str, dict] | None:
    """('train' | 'eval', metrics) for one ``log_history`` entry; None for the end-of-training summary."""
    if any(k.startswith("eval_") for k in entry):
        return "eval", {"step": entry.get("step"), "accuracy": entry.get("eval_rewards/accuracies"),
                        "margin": entry.get("eval_rewards/margins"), "chosen_reward": entry.get("eval_rewards/chosen"),
                        "loss": entry.get("eval_loss")}  # means over the eval set: TRL logs no SE
    if "loss" in entry and "step" in entry:
        return "train", entry
    return None


def _read_trainer_state(path: Path) -> Run:
    state = _load_json(path)
    if not isinstance(state, dict):
        raise DoctorError(f"{path.name} holds no object")
    if "history" in state and "log_history" not in state:  # a dpo_lib checkpoint's trainer_state.json
        return run_from_history(state["history"], state.get("config"), path=str(path))
    if "log_history" not in state:
        raise DoctorError(f"{path.name} has no 'log_history' (TRL) or 'history' (dpo_lib checkpoint)")
    parts: dict[str, list] = {"train": [], "eval": []}
    for entry in state["log_history"]:
        kind = _trl_entry(entry) if isinstance(entry, dict) else None
        if kind:
            parts[kind[0]].append(kind[1])
    if not parts["train"]:
        raise DoctorError(f"{path.name}: log_history holds no training entry with a loss")
    evals = [e for e in parts["eval"] if e["accuracy"] is not None]
    config = {"logging_steps": state.get("logging_steps"), "max_steps": state.get("max_steps")}
    return Run(source="trl", path=str(path), train=parts["train"], eval=evals, config=config, summary={})


def _trl_checkpoint(folder: Path) -> Path | None:
    """The ``trainer_state.json`` of the latest ``checkpoint-N`` of a TRL output folder."""
    found = [(int(p.parent.name.split("-")[-1]), p) for p in folder.glob("checkpoint-*/trainer_state.json")
             if p.parent.name.split("-")[-1].isdigit()]
    return max(found)[1] if found else None


def read_run(path: str | Path) -> Run:
    """Read PATH (see the module docstring); :class:`DoctorError` when it is not a readable run."""
    path = Path(path)
    if not path.exists():
        raise DoctorError("no such file or folder")
    if path.is_file():
        if path.suffix == ".jsonl":
            return _read_dpo_lib(path.parent, path)
        if path.name == "summary.json" and (path.parent / "metrics.jsonl").is_file():
            return _read_dpo_lib(path.parent, path.parent / "metrics.jsonl")
        return _read_trainer_state(path)
    if (path / "metrics.jsonl").is_file():
        return _read_dpo_lib(path, path / "metrics.jsonl")
    state = path / "trainer_state.json" if (path / "trainer_state.json").is_file() else _trl_checkpoint(path)
    if state is None:
        raise DoctorError("neither metrics.jsonl (dpo_lib) nor trainer_state.json (TRL) found here")
    return _read_trainer_state(state)


# ---------------------------------------------------------------- the report

def _fmt(x, digits: int = 3) -> str:
    return "n/a" if x is None or not isinstance(x, (int, float)) else f"{x:.{digits}g}"


def _steps_text(steps: list[int]) -> str:
    if not steps:
        return ""
    if len(steps) > 4 and steps == list(range(steps[0], steps[-1] + 1)) or len(steps) > 8:
        return f"steps {steps[0]}–{steps[-1]}"
    return "step " + ", ".join(map(str, steps)) if len(steps) == 1 else "steps " + ", ".join(map(str, steps))


def _tail_mean(s: list) -> float | None:
    t = tail(s)
    return sum(v for _, v in t) / len(t) if t else None


def curves_summary(run: Run) -> list[str]:
    """What the curves show, in a few lines: loss, accuracy, margin, chosen/rejected rewards, held-out accuracy."""
    lines = [f"{run.source} run, {len(run.train)} logged steps (last step {run.train[-1].get('step')})"
             + (f", beta={run.beta}" if run.beta else "") + (f", loss_type={run.loss_type}" if run.loss_type else "")]
    loss = series(run, "loss")
    if loss:
        lines.append(f"loss {_fmt(loss[0][1], 4)} at step {loss[0][0]} (ln 2 = {LN2:.4f}), "
                     f"{_fmt(_tail_mean(loss))} over the last quarter ({span(tail(loss))})")
    last = [f"{key} {_fmt(_tail_mean(series(run, key)))}" for key in
            ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected") if series(run, key)]
    if last:
        lines.append("last quarter: " + ", ".join(last))
    if run.eval and finite(run.eval[-1].get("accuracy")):
        e = run.eval[-1]
        se = f" ± {_fmt(e['accuracy_se'], 2)}" if finite(e.get("accuracy_se")) else ""
        acc = [(s, v) for s, v in series(run, "rewards/accuracies") if e["step"] is None or s <= e["step"]]
        lines.append(f"held-out accuracy {_fmt(e['accuracy'])}{se} at step {e['step']} "
                     f"(training batches before it: {_fmt(_tail_mean(acc))})")
    held = next((e for e in reversed(run.eval) if finite(e.get("chosen_reward"))), None)
    if held:
        pm = {k: f" ± {_fmt(held[k + '_se'], 2)}" if finite(held.get(k + "_se")) else "" for k in ("chosen_reward",
                                                                                                  "margin")}
        lines.append(f"held-out rewards/chosen {_fmt(held['chosen_reward'])}{pm['chosen_reward']}, rewards/margins "
                     f"{_fmt(held.get('margin'))}{pm['margin']} at step {held['step']}")
    return lines


def format_report(run: Run, findings: list[Finding]) -> str:
    """The text the command prints: what the curves show, then each finding."""
    out = [f"doctor: {run.path}", *("  " + line for line in curves_summary(run)), ""]
    for f in findings:
        where = _steps_text(f.steps)
        out += [f"{f.severity.upper()} {f.id}" + (f" ({where})" if where else ""),
                f"  evidence: {f.evidence}", f"  meaning:  {f.meaning}", f"  lesson:   {f.lesson}",
                f"  try:      {f.try_}", ""]
    counts = {s: sum(f.severity == s for f in findings) for s in ("problem", "warning", "info")}
    verdict = ", ".join(f"{n} {s}{'s' if n != 1 else ''}" for s, n in counts.items())
    out.append(f"verdict: {verdict}" + ("" if counts["problem"] or counts["warning"] else
                                        f" (checked: {', '.join(CHECKS)})"))
    return "\n".join(out)


def report_json(run: Run, findings: list[Finding]) -> dict:
    """The ``--json`` report: ``{"findings": [...], "path", "source", "steps_logged", "curves", "checked"}``."""
    return {"findings": [f.to_json() for f in findings], "path": run.path, "source": run.source,
            "steps_logged": len(run.train), "beta": run.beta, "loss_type": run.loss_type,
            "curves": curves_summary(run), "checked": list(CHECKS)}


# ---------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dpo_lib doctor",
                                description="Read a DPO run's logs (dpo_lib's metrics.jsonl or TRL's "
                                            "trainer_state.json) and say what went wrong.")
    p.add_argument("path", metavar="PATH", help="a dpo_lib run folder, a TRL output/checkpoint folder, or the file")
    p.add_argument("--json", metavar="FILE", help="also write the findings as JSON")
    p.add_argument("--plot", metavar="FILE", help="draw the curves the diagnosis rests on (PNG), findings marked")
    p.add_argument("--beta", type=float, help="β of the run, when the logs do not say (TRL): rewards/β in nats")
    return p


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 nothing wrong, 1 a problem or a warning, 2 PATH cannot be read."""
    args = build_parser().parse_args(argv)
    try:
        run = read_run(args.path)
    except DoctorError as e:
        print(f"error: {args.path}: {e}", file=sys.stderr)
        return 2
    if args.beta:
        run.config["beta"] = args.beta
    findings = diagnose(run)
    print(format_report(run, findings))
    if args.json:
        Path(args.json).write_text(json.dumps(report_json(run, findings), indent=1, default=str) + "\n")
    if args.plot:
        from dpo_lib.tools.doctor_plot import plot_run
        plot_run(run, findings, args.plot)
        print(f"plot: {args.plot}")
    return 1 if any(f.severity in ("problem", "warning") for f in findings) else 0


if __name__ == "__main__":
    sys.exit(main())
