"""``python -m dpo_lib doctor PATH``: read the logs of a DPO run and say what went wrong.

PATH is a ``dpo_lib`` run folder (``metrics.jsonl``, with ``summary.json`` / ``run_card.json`` when
present), a ``dpo_lib`` checkpoint, a TRL output or checkpoint folder (``trainer_state.json``, its
``log_history``), or one of those files. The doctor rebuilds the curves a DPO user reads (loss
against ln 2, implicit rewards, margins, train and held-out accuracy, gradient norm), checks each
known failure against its definition and prints the findings: evidence in numbers and steps, what
it means, the lesson that shows it, what to try. Exit status: 0 nothing wrong, 1 a problem or a
warning, 2 PATH cannot be read.

Conventions (COURSE.md; TRL's): rewards include β, ``rewards/chosen = β·(log π(y_w) − log π_ref(y_w))``,
so a negative chosen reward means the chosen reply became less likely than under the reference;
margin = rewards/chosen − rewards/rejected = βh, and a pair's DPO gradient weight is σ(−βh).

Public: :func:`read_run` (PATH -> :class:`Run`), :func:`run_from_history` (a trainer's in-memory
history, e.g. lesson 06), :func:`diagnose` (:class:`Run` -> :class:`Finding` list, one ``check_*``
per failure, each threshold derived in its docstring and evidence), :func:`format_report`,
:func:`report_json` and :func:`main`. ``--plot`` is :func:`dpo_lib.tools.doctor_plot.plot_run`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["CHECKS", "LN2", "SATURATED", "DoctorError", "Finding", "Run", "diagnose", "format_report", "main",
           "read_run", "report_json", "run_from_history", "series", "tail"]

REFERENCE_FREE = ("simpo", "orpo")


# ---------------------------------------------------------------- the run and its findings

LN2 = math.log(2)
HAIR = 1e-3          # |loss − its step-0 value| and |reward| below this: float rounding, not a difference
ORDER = 10.0         # "an order of magnitude"
SATURATED = 0.05     # σ(−βh) below a tenth of its step-0 value 0.5: the gradient has (nearly) vanished
SIGMOID_LIKE = (None, "sigmoid", "robust", "dpop", "rdpo")  # the logistic loss; None: unknown (TRL's default)
LESSON_06 = "lesson 06 (When DPO goes wrong)"


@dataclass
class Run:
    """A DPO run's logs: ``train`` holds one dict per logged step (TRL's metric names and ``step``),
    ``eval`` the held-out points ``{"step", "accuracy", "accuracy_se"?, "margin"?}``, ``config`` what is
    known of the settings (``beta``, ``loss_type``, ``epochs``), ``summary`` a dpo_lib ``summary.json``."""
    source: str
    path: str
    train: list[dict]
    eval: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)

    @property
    def beta(self) -> float | None:
        return self.config.get("beta")

    @property
    def loss_type(self) -> str | None:
        return self.config.get("loss_type")


@dataclass
class Finding:
    """One diagnosis; :meth:`to_json` gives the ``--json`` schema of issue 34."""
    id: str
    severity: str            # problem | warning | info
    steps: list[int]
    evidence: str
    meaning: str
    lesson: str
    try_: str

    def to_json(self) -> dict:
        return {"id": self.id, "severity": self.severity, "steps": self.steps, "evidence": self.evidence,
                "meaning": self.meaning, "lesson": self.lesson, "try": self.try_}


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def series(run: Run, key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of ``key`` over the logged training steps, finite values only."""
    return [(r["step"], float(r[key])) for r in run.train if _finite(r.get(key))]


def tail(s: list) -> list:
    """The last quarter of a series (at least 3 points, or all of a shorter one): the run's end state."""
    return s[-max(3, len(s) // 4):]


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error (0 for a single value)."""
    n = len(values)
    m = sum(values) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return m, sd / math.sqrt(n)


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def _nats(reward: float, beta: float | None) -> str:
    """A reward as the log-prob change it stands for (reward / β), when β is known."""
    return f" = {reward / beta:+.3g} nats of log π − log π_ref (β={beta:g})" if beta else ""


def _span(s: list) -> str:
    return f"steps {s[0][0]}–{s[-1][0]}"


# ---------------------------------------------------------------- the checks, one per failure

def check_nonfinite(run: Run) -> list[Finding]:
    """NaN or inf in the loss or the gradient norm (lesson 05: fp16 without a loss scaler)."""
    bad = {}
    for r in run.train:
        for key in ("loss", "grad_norm", "rewards/margins", "logps/chosen", "logps/rejected"):
            v = r.get(key)
            if isinstance(v, float) and not math.isfinite(v):
                bad.setdefault(r["step"], []).append(f"{key}={v}")
    if not bad:
        return []
    steps = sorted(bad)
    return [Finding("nonfinite", "problem", steps,
                    f"{len(steps)} logged step(s) with non-finite values, first at step {steps[0]}: "
                    + "; ".join(bad[steps[0]]),
                    "the forward or the backward overflowed: every update after it is garbage (NaN weights)",
                    "lesson 05 (Train a small LLM on a GPU): bf16/fp16 chosen by the hardware, fp16 needs a dynamic "
                    "loss scaler",
                    "bf16 or fp32 instead of fp16 (or fp16 with a dynamic loss scaler); a lower learning rate; look "
                    "for empty or truncated responses; resume from the last checkpoint before the first bad step")]


def _initial_loss(loss_type: str | None, beta: float | None) -> float | None:
    """The loss when policy = reference (h = 0): ln 2 for the logistic losses, 1 for hinge, 1/(4β²) for IPO."""
    if loss_type in (None, "sigmoid", "robust", "dpop"):
        return LN2
    if loss_type == "hinge":
        return 1.0
    return 1 / (4 * beta * beta) if loss_type == "ipo" and beta else None  # rdpo: depends on the lengths


def check_reference(run: Run) -> list[Finding]:
    """At the first step the policy is the reference: rewards 0, loss ln 2 (lesson 03's first step)."""
    if run.loss_type in REFERENCE_FREE:
        return []
    first = run.train[0]
    lesson = "lesson 03 (DPO from scratch): the loss at step 0 is ln 2 and every reward is 0"
    if first["step"] != 1:
        how = (f"averages the first {first['step']} steps (logging_steps)" if run.source == "trl"
               else f"is step {first['step']}: the earlier steps are not in the log")
        return [Finding("reference_mismatch", "info", [first["step"]], f"the first logged entry {how}",
                        "whether the reference is the starting policy could not be checked", lesson,
                        "log the first step (TRL: logging_first_step=True or logging_steps=1)")]
    rewards = {k: first.get(k) for k in ("rewards/chosen", "rewards/rejected") if _finite(first.get(k))}
    off = {k: v for k, v in rewards.items() if abs(v) > HAIR}
    expected = _initial_loss(run.loss_type, run.beta)
    loss_off = _finite(first.get("loss")) and expected is not None and abs(first["loss"] - expected) > HAIR
    if not off and not loss_off:
        return []
    evidence = (f"step 1: loss {first.get('loss', float('nan')):.6f} (expected {expected:.6f}), "
                if expected is not None else f"step 1: loss {first.get('loss')}, ")
    evidence += ", ".join(f"{k} {v:+.4g}" for k, v in rewards.items()) + f" (0 expected; tolerance {HAIR:g})"
    if off:
        return [Finding("reference_mismatch", "problem", [1], evidence,
                        "the reference is not the policy you started from (another model or checkpoint, another "
                        "precision or quantisation, reference log-probs cached from something else), or dropout is "
                        "on: the implicit rewards are measured against the wrong π_ref from the first step", lesson,
                        "use the starting policy as the reference (LoRA: the base with the adapter disabled), in the "
                        "same precision; turn dropout off (TRL: disable_dropout=True); clear a stale reference cache. "
                        "Nothing to fix when it is meant (iterative DPO against the initial model, lesson 07)")]
    return [Finding("reference_mismatch", "info", [1], evidence,
                    "the rewards are 0 (the reference is the starting policy) but the loss is not the logistic "
                    "loss's ln 2: another loss type, or an extra term (e.g. an NLL) is in the logged loss", lesson,
                    "nothing, if the loss type explains it; pass the loss type when the logs do not say")]


def check_no_learning(run: Run) -> list[Finding]:
    """Loss within a hair of its step-0 value and margins ≈ 0 through the run (TRL #4023, #701)."""
    loss, margin = series(run, "loss"), series(run, "rewards/margins")
    expected = _initial_loss(run.loss_type, run.beta)
    if len(loss) < 2 or expected is None or run.loss_type in REFERENCE_FREE:
        return []
    worst_loss = max(abs(v - expected) for _, v in loss)
    worst_margin = max((abs(v) for _, v in margin), default=0.0)
    if worst_loss >= HAIR or worst_margin >= 2 * HAIR:
        return []
    causes = []
    if all(abs(v) < 1e-12 for _, v in series(run, "grad_norm")) and series(run, "grad_norm"):
        causes.append("grad_norm is 0 at every step: no gradient reaches a trainable weight")
    if all(v == 0 for _, v in series(run, "learning_rate")) and series(run, "learning_rate"):
        causes.append("learning_rate is 0 at every step")
    return [Finding("no_learning", "problem", [s for s, _ in loss],
                    f"over {len(loss)} logged steps ({_span(loss)}) |loss − {expected:.4f}| ≤ {worst_loss:.2g} and "
                    f"|margin| ≤ {worst_margin:.2g} (thresholds {HAIR:g} and {2 * HAIR:g}: near h = 0 the loss is "
                    "ln 2 − margin/2)" + "".join("; " + c for c in causes),
                    "the policy never moved away from the reference on these pairs",
                    "lesson 03 (DPO from scratch: one step by hand, the loss leaves ln 2 after the first update); "
                    "lesson 01 (β: the reward is β times the log-ratio)",
                    "check the learning rate and its warm-up, that the weights (or LoRA adapters) require grad and "
                    "are in the optimizer, that the completion mask is not empty, that β is not ≈ 0, and that chosen "
                    "and rejected differ")]


def check_displacement(run: Run) -> list[Finding]:
    """The chosen reply's log-prob falls below the reference's while the margin grows (lesson 06, Part 2)."""
    chosen, margin = tail(series(run, "rewards/chosen")), series(run, "rewards/margins")
    if run.loss_type in REFERENCE_FREE or len(chosen) < 3 or len(margin) < 4:
        return []
    c, c_se = mean_se([v for _, v in chosen])
    m, m_se = mean_se([v for _, v in tail(margin)])
    if not (c + 2 * c_se < 0 and m - 2 * m_se > 0 and m > margin[0][1]):
        return []
    rejected = tail(series(run, "rewards/rejected"))
    r = mean_se([v for _, v in rejected])[0] if rejected else float("nan")
    return [Finding("likelihood_displacement", "warning", [s for s, _ in chosen],
                    f"over {_span(chosen)} rewards/chosen averages {c:+.3g} ± {c_se:.2g}{_nats(c, run.beta)}, "
                    f"below 0 by more than 2 SE, while the margin averages {m:.3g} ± {m_se:.2g} (step "
                    f"{margin[0][0]}: {margin[0][1]:.3g}) and rewards/rejected {r:+.3g}",
                    "the margin grows by pushing the rejected reply down faster than the chosen one: the chosen "
                    "reply itself became less likely than under the reference, and the mass went to other replies",
                    f"{LESSON_06}, Part 2: likelihood displacement, fixed by DPOP and DPO+NLL",
                    "DPOP (--loss-type dpop, --dpop-lambda 50) or DPO+NLL (--nll-weight, e.g. 1.0); fewer steps or a "
                    "larger β; pairs whose chosen and rejected replies differ more")]


def _losses_by_epoch(run: Run) -> list[list[tuple[int, float]]]:
    """The logged ``(step, loss)`` of each epoch (an entry at epoch 1.0 closes the first one)."""
    by_epoch: dict[int, list[tuple[int, float]]] = {}
    for r in run.train:
        if _finite(r.get("epoch")) and _finite(r.get("loss")):
            by_epoch.setdefault(math.ceil(r["epoch"] - 1e-9), []).append((r["step"], r["loss"]))
    return [by_epoch[e] for e in sorted(by_epoch)]


def _epoch_drops(run: Run) -> list[tuple[int, float, float]]:
    """``(step, drop, se)`` at each epoch start: the mean loss of the last ``w`` (≤ 5) entries of an epoch
    minus that of the first ``w`` of the next, less what the loss's own trend inside the epochs (mean
    change per entry) predicts over those ``w`` entries. A drop beyond that is the epoch effect: the
    batches of the new epoch repeat pairs the policy has already fitted."""
    epochs = _losses_by_epoch(run)
    within = [b[1] - a[1] for ep in epochs for a, b in zip(ep, ep[1:])]
    if len(epochs) < 2 or not within:
        return []
    slope = sum(within) / len(within)
    drops = []
    for before, after in zip(epochs, epochs[1:]):
        w = min(5, len(before), len(after))
        if w < 2:
            continue
        (b, b_se), (a, a_se) = mean_se([v for _, v in before[-w:]]), mean_se([v for _, v in after[:w]])
        drops.append((after[0][0], b - a + slope * w, math.hypot(b_se, a_se)))
    return drops


def _heldout_gap(run: Run) -> tuple[str, list[int]] | None:
    """Evidence that training accuracy is above the held-out one by more than 2 SE (or 0.1 without an SE)."""
    e = run.eval[-1] if run.eval else None
    if e is None or not _finite(e.get("accuracy")):
        return None
    acc = tail([(s, v) for s, v in series(run, "rewards/accuracies") if e["step"] is None or s <= e["step"]])
    if len(acc) < 3:
        return None
    t, t_se = mean_se([v for _, v in acc])
    gap = t - e["accuracy"]
    bound = 2 * math.hypot(t_se, e["accuracy_se"]) if _finite(e.get("accuracy_se")) else 0.1
    if gap <= bound:
        return None
    se = f" ± {e['accuracy_se']:.2g}" if _finite(e.get("accuracy_se")) else ""
    return (f"training accuracy {t:.3f} ± {t_se:.2g} over {_span(acc)} vs held-out {e['accuracy']:.3f}{se} at step "
            f"{e['step']}: a gap of {gap:.3f} > {bound:.3f} (" + ("2 SE)" if se else "no held-out SE: a fixed 0.1)"),
            [s for s, _ in acc])


def check_overfitting(run: Run) -> list[Finding]:
    """Training accuracy far above the held-out one, or at 1.0 with loss drops at epoch starts (lessons 03, 06)."""
    parts, steps = [], []
    gap = _heldout_gap(run)
    if gap:
        parts.append(gap[0])
        steps += gap[1]
    acc = tail(series(run, "rewards/accuracies"))
    acc_mean = mean_se([v for _, v in acc])[0] if acc else 0.0
    drops = [d for d in _epoch_drops(run) if d[1] > 2 * d[2] and d[1] > 0]
    if drops and acc_mean >= 0.99:
        parts.append(f"training accuracy {acc_mean:.3f} over {_span(acc)}, and the loss drops at "
                     + ", ".join(f"the epoch starting at step {s} by {d:.3g} ± {se:.2g}" for s, d, se in drops)
                     + " (beyond 2 SE): the batches repeat pairs the policy has already fitted")
        steps += [s for s, _, _ in drops]
    if not parts:
        return []
    return [Finding("overfitting", "warning", sorted(set(steps)), "; ".join(parts),
                    "the training batches measure memorised pairs, not preference learning: judge the run by "
                    "held-out metrics" + ("" if run.eval else " (this run logged none)"),
                    "lesson 03 (the epoch pitfall: training accuracy on pairs seen twice); "
                    f"{LESSON_06}, Part 1: overfitting deterministic preferences, DPO vs IPO",
                    "evaluate held-out pairs during training (--eval-every) and stop where they peak; one epoch or "
                    "more data; IPO (--loss-type ipo) or a larger β for near-deterministic preferences")]


def check_saturation(run: Run) -> list[Finding]:
    """Margins so large that the DPO gradient weight σ(−βh) ≈ 0 (lesson 01's gradient, Eq. 8)."""
    margin = tail(series(run, "rewards/margins"))
    if run.loss_type not in SIGMOID_LIKE or len(margin) < 3:
        return []
    weight = sum(_sigmoid(-v) for _, v in margin) / len(margin)
    if weight >= SATURATED:
        return []
    m = mean_se([v for _, v in margin])[0]
    return [Finding("saturation", "warning", [s for s, _ in margin],
                    f"over {_span(margin)} the margin βh averages {m:.3g}, so the mean gradient weight σ(−margin) is "
                    f"{weight:.3g} (0.5 at step 1; threshold {SATURATED:g}, a tenth of it: ln 19 = 2.94 of margin); "
                    "from batch-mean margins, so pairs with small margins may still get some gradient",
                    "the pairs are fitted: each update is scaled down by more than 10×, further steps mostly add "
                    "drift, not preference",
                    "lesson 01 (From RLHF to DPO: the gradient weight σ(r̂_l − r̂_w); higher β keeps the policy closer "
                    f"to the reference); {LESSON_06}, Part 1 (DPO vs IPO)",
                    "stop earlier or lower the learning rate; the margin is β·h, so a smaller β saturates later "
                    "but lets the policy drift further from the reference; IPO (--loss-type ipo) does not saturate")]


def _rolling_median(values: list[float], w: int = 3) -> list[float]:
    out = []
    for i in range(len(values)):
        window = sorted(values[max(0, i - w // 2):i + w // 2 + 1])
        out.append(window[len(window) // 2])
    return out


def check_grad_explosion(run: Run) -> list[Finding]:
    """The gradient norm grows by an order of magnitude over its early level (median of 3, so not one spike)."""
    g = [(s, v) for s, v in series(run, "grad_norm") if v > 0]
    if len(g) < 6:
        return []
    early = sorted(v for _, v in g[:max(3, len(g) // 10)])
    base = early[len(early) // 2]
    smooth = _rolling_median([v for _, v in g])
    steps = [s for (s, _), v in zip(g, smooth) if v >= ORDER * base]
    if not steps:
        return []
    peak = max(smooth)
    return [Finding("grad_explosion", "problem", steps,
                    f"grad_norm (median of 3 steps) reaches {peak:.3g} against {base:.3g} over the first steps "
                    f"({peak / base:.0f}×, threshold {ORDER:g}×) at {len(steps)} logged step(s) from step {steps[0]}",
                    "the updates are growing out of control (clipping then hides how big they are): the loss "
                    "surface got steep, usually a too large learning rate or a precision problem, before a NaN",
                    "lesson 03 (DPO from scratch: the training loop clips the gradient norm); lesson 05 (precision: "
                    "fp16 needs a loss scaler)",
                    "a lower learning rate or a longer warm-up; keep --max-grad-norm clipping on; bf16/fp32 instead "
                    "of fp16; look at the pairs of the steps where it starts (very long or empty replies)")]


def _kendall_z(values: list[float]) -> float:
    """Kendall's τ of the values against their order, in units of its SE under no trend."""
    n = len(values)
    s = sum((values[j] > values[i]) - (values[j] < values[i]) for i in range(n) for j in range(i + 1, n))
    tau = 2 * s / (n * (n - 1))
    return tau / math.sqrt(2 * (2 * n + 5) / (9 * n * (n - 1)))


def check_length_growth(run: Run) -> list[Finding]:
    """Where lengths are logged (any metric named ``*length*``): answers growing step after step (lesson 06, Part 3)."""
    findings = []
    keys = sorted({k for r in run.train for k in r if "length" in k.lower() and _finite(r[k])})
    for key in keys:
        s = series(run, key)
        if len(s) < 5:
            continue
        z, first, last = _kendall_z([v for _, v in s]), s[0][1], mean_se([v for _, v in tail(s)])[0]
        if z <= 2 or last <= first:
            continue
        findings.append(Finding("length_growth", "warning", [s_ for s_, _ in s],
                                f"{key} rises from {first:.4g} at step {s[0][0]} to {last:.4g} over the last quarter "
                                f"(+{100 * (last / first - 1) if first else float('inf'):.0f}%), a monotone trend of "
                                f"{z:.1f} SE (Kendall's τ; threshold 2)",
                                "the policy is learning that longer answers win: length exploitation (the preference "
                                "data favour longer replies), not better answers",
                                f"{LESSON_06}, Part 3: length exploitation, fixed by R-DPO and SimPO",
                                "R-DPO (--loss-type rdpo, --rdpo-alpha), SimPO (--loss-type simpo: per-token rewards); "
                                "length-balanced pairs; compare true rewards at equal length"))
    return findings


CHECKS = {"nonfinite": check_nonfinite, "reference_mismatch": check_reference, "no_learning": check_no_learning,
          "likelihood_displacement": check_displacement, "overfitting": check_overfitting,
          "saturation": check_saturation, "grad_explosion": check_grad_explosion,
          "length_growth": check_length_growth}
SEVERITY_ORDER = {"problem": 0, "warning": 1, "info": 2}


def diagnose(run: Run) -> list[Finding]:
    """Every check of :data:`CHECKS` on ``run``; problems first, then warnings, then infos."""
    findings = [f for check in CHECKS.values() for f in check(run)]
    return sorted(findings, key=lambda f: SEVERITY_ORDER[f.severity])


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


def _dpo_lib_eval(rows: list[dict]) -> list[dict]:
    """The held-out points ``HeldoutEval`` wrote into the training lines (``eval/accuracy`` …)."""
    return [{"step": r["step"], "accuracy": r["eval/accuracy"], "accuracy_se": r.get("eval/accuracy_se"),
             "margin": r.get("eval/margin")} for r in rows if "eval/accuracy" in r]


def run_from_history(history: list[dict], config: dict | None = None, summary: dict | None = None,
                     path: str = "(history)", source: str = "dpo_lib") -> Run:
    """A :class:`Run` from per-step metrics as :class:`dpo_lib.trainer.DPOTrainer` returns them
    (``trainer.history``, or the lines of ``metrics.jsonl``); ``config`` gives β and the loss type."""
    rows = [r for r in history if isinstance(r, dict) and "step" in r and "loss" in r]
    if not rows:
        raise DoctorError(f"{path}: no training step with a 'step' and a 'loss' in it")
    evals = _dpo_lib_eval(rows)
    summary = summary or {}
    if not evals and "heldout_accuracy_after" in summary:
        evals = [{"step": rows[-1]["step"], "accuracy": summary["heldout_accuracy_after"],
                  "accuracy_se": summary.get("heldout_accuracy_after_se"),
                  "margin": summary.get("heldout_margin_after")}]
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
                        "margin": entry.get("eval_rewards/margins"), "loss": entry.get("eval_loss")}
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
                     f"{_fmt(_tail_mean(loss))} over the last quarter ({_span(tail(loss))})")
    last = [f"{key} {_fmt(_tail_mean(series(run, key)))}" for key in
            ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected") if series(run, key)]
    if last:
        lines.append("last quarter: " + ", ".join(last))
    if run.eval:
        e = run.eval[-1]
        se = f" ± {_fmt(e['accuracy_se'], 2)}" if _finite(e.get("accuracy_se")) else ""
        acc = [(s, v) for s, v in series(run, "rewards/accuracies") if e["step"] is None or s <= e["step"]]
        lines.append(f"held-out accuracy {_fmt(e['accuracy'])}{se} at step {e['step']} "
                     f"(training batches before it: {_fmt(_tail_mean(acc))})")
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
