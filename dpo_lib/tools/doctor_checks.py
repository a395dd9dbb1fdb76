"""The findings of ``python -m dpo_lib doctor``: one ``check_*`` per known DPO failure, each with the
threshold its definition gives (derived in the check's docstring, quoted in its evidence).

Conventions (COURSE.md; TRL's): rewards include β, ``rewards/chosen = β·(log π(y_w) − log π_ref(y_w))``,
so a negative chosen reward means the chosen reply became less likely than under the reference;
margin = rewards/chosen − rewards/rejected = βh, and a pair's DPO gradient weight is σ(−βh). :func:`diagnose` runs
every check of :data:`CHECKS` on a :class:`~dpo_lib.tools.doctor_run.Run`: :class:`Finding` objects, problems first."""

from __future__ import annotations

import math
from dataclasses import dataclass

from dpo_lib.stats import t_cdf, t_quantile
from dpo_lib.tools.doctor_run import Run, finite, kendall_z, mean_se, rolling_median, series, sigmoid, span, tail

__all__ = ["CHECKS", "HAIR", "LN2", "MIN_MEANS", "ORDER", "SATURATED", "Finding", "check_displacement",
           "check_grad_explosion", "check_length_growth", "check_no_learning", "check_nonfinite", "check_overfitting",
           "check_reference", "check_saturation", "diagnose"]

REFERENCE_FREE = ("simpo", "orpo")
LN2 = math.log(2)
HAIR = 1e-3          # |loss − its step-0 value| and |reward| below this: float rounding, not a difference
ORDER = 10.0         # "an order of magnitude"
SATURATED = 0.05     # σ(−βh) below a tenth of its step-0 value 0.5: the gradient has (nearly) vanished
SIGMOID_LIKE = (None, "sigmoid", "robust", "dpop", "rdpo")  # the logistic loss; None: unknown (TRL's default)
LESSON_06 = "lesson 06 (When DPO goes wrong)"


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


def _nats(reward: float, beta: float | None) -> str:
    """A reward as the log-prob change it stands for (reward / β), when β is known."""
    return f" = {reward / beta:+.3g} nats of log π − log π_ref (β={beta:g})" if beta else ""


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
    rewards = {k: first.get(k) for k in ("rewards/chosen", "rewards/rejected") if finite(first.get(k))}
    off = {k: v for k, v in rewards.items() if abs(v) > HAIR}
    expected = _initial_loss(run.loss_type, run.beta)
    loss_off = finite(first.get("loss")) and expected is not None and abs(first["loss"] - expected) > HAIR
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
                    f"over {len(loss)} logged steps ({span(loss)}) |loss − {expected:.4f}| ≤ {worst_loss:.2g} and "
                    f"|margin| ≤ {worst_margin:.2g} (thresholds {HAIR:g} and {2 * HAIR:g}: near h = 0 the loss is "
                    "ln 2 − margin/2)" + "".join("; " + c for c in causes),
                    "the policy never moved away from the reference on these pairs",
                    "lesson 03 (DPO from scratch: one step by hand, the loss leaves ln 2 after the first update); "
                    "lesson 01 (β: the reward is β times the log-ratio)",
                    "check the learning rate and its warm-up, that the weights (or LoRA adapters) require grad and "
                    "are in the optimizer, that the completion mask is not empty, that β is not ≈ 0, and that chosen "
                    "and rejected differ")]


MIN_MEANS = 7  # training-batch means a 2-SE call needs; on fewer, Student's t 97.5% quantile (check_displacement)


def _batch_bound(n: int) -> float:
    """How many SEs a mean of ``n`` training-batch means must clear: 2, or t_{0.975, n−1} below MIN_MEANS."""
    return 2.0 if n >= MIN_MEANS else t_quantile(0.975, n - 1)


def _heldout_point(run: Run) -> dict | None:
    """The latest held-out point with the chosen reward and the margin (an evaluation, or summary.json's)."""
    return next((e for e in reversed(run.eval) if finite(e.get("chosen_reward")) and finite(e.get("margin"))), None)


DISPLACED = ("the margin grows by pushing the rejected reply down faster than the chosen one: the chosen reply itself "
             "became less likely than under the reference, and the mass went to other replies")


def _displacement_finding(steps: list[int], evidence: str, meaning: str) -> list[Finding]:
    return [Finding("likelihood_displacement", "warning", steps, evidence, meaning,
                    f"{LESSON_06}, Part 2: likelihood displacement, fixed by DPOP and DPO+NLL",
                    "DPOP (--loss-type dpop, --dpop-lambda 50) or DPO+NLL (--nll-weight, e.g. 1.0); fewer steps or a "
                    "larger β; pairs whose chosen and rejected replies differ more")]


def check_displacement(run: Run) -> list[Finding]:
    """The chosen reply's log-prob falls below the reference's while the margin grows (lesson 06, Part 2).

    The rule: the chosen reward r̂_w = β·(log π(y_w) − log π_ref(y_w)) is below 0 by more than 2 SE while
    the margin β·h is above 0 by more than 2 SE.

    **Held-out evidence first.** Where the run logged the chosen reward and the margin on held-out pairs
    (dpo_lib's ``eval/chosen_reward`` and ``eval/margin`` with their ``_se``; TRL's ``eval_rewards/chosen``
    and ``eval_rewards/margins``; or ``summary.json``'s ``heldout_chosen_reward_after(_se)`` and
    ``heldout_margin_after(_se)``), the latest such point decides, with SEs over the held-out pairs. TRL logs
    no SE: then the signs of the two means decide, and the evidence says so. The training batches are then
    not used: under label noise their "chosen" is often the rejected reply (lesson 06, Part 4: three runs on
    40% flipped labels look healthy there while on clean held-out pairs their chosen reply fell 2–3 nats), and
    a batch measures the pairs being fitted.

    **Fallback: the training batches** (``rewards/chosen``, ``rewards/margins`` over the last quarter of the
    logged steps), the margin also above its first logged value. A mean of n batch means over its SE follows
    Student's t with n − 1 degrees of freedom, not the normal that "2 SE" stands for; its 97.5% quantile is
    12.7, 4.30, 3.18, 2.78, 2.57 for n = 2…6 and falls below 2.5 from n = 7 (t_6 = 2.45). So a series needs
    at least :data:`MIN_MEANS` = 7 means for a 2-SE call; on fewer it must clear t_{0.975, n−1} SEs (a
    19-step run's last quarter is 4 means: 3.18 SE; lesson 06's DPO+NLL false alarm was 2.1 SE there). The
    exact t rule for every n is not used: it would also un-flag lesson 06's "DPO, bundled" (margin 2.03 SE
    over 7 means < t_6 = 2.45), a run displaced held out (−3.1 nats, margin beyond 2 SE); the finding's
    ``meaning`` says what 2 SE on few means is worth instead.
    """
    if run.loss_type in REFERENCE_FREE:
        return []
    e = _heldout_point(run)
    if e is not None:
        return _heldout_displacement(run, e)
    chosen, margin = tail(series(run, "rewards/chosen")), series(run, "rewards/margins")
    if len(chosen) < 3 or len(margin) < 4:
        return []
    c, c_se = mean_se([v for _, v in chosen])
    m, m_se = mean_se([v for _, v in tail(margin)])
    kc, km = _batch_bound(len(chosen)), _batch_bound(len(tail(margin)))
    if not (c + kc * c_se < 0 and m - km * m_se > 0 and m > margin[0][1]):
        return []
    rejected = tail(series(run, "rewards/rejected"))
    r = mean_se([v for _, v in rejected])[0] if rejected else float("nan")
    why = "no held-out chosen reward and margin logged" if not run.eval else \
        "the held-out points carry no chosen reward"
    return _displacement_finding(
        [s for s, _ in chosen],
        f"training batches ({why}): over {span(chosen)} ({len(chosen)} batch means) rewards/chosen averages "
        f"{c:+.3g} ± {c_se:.2g}{_nats(c, run.beta)}, below 0 by {-c / c_se if c_se else math.inf:.1f} SE "
        f"(threshold {kc:.2f}), while the margin averages {m:.3g} ± {m_se:.2g} ({m / m_se if m_se else math.inf:.1f} "
        f"SE, threshold {km:.2f}; step {margin[0][0]}: {margin[0][1]:.3g}) and rewards/rejected {r:+.3g}",
        DISPLACED + ". Read from the training batches, measured before each update on the pairs being fitted: "
        f"under label noise their 'chosen' is often the rejected reply; and a 2-SE call on {MIN_MEANS} or a few more "
        f"batch means is looser than it looks (on {MIN_MEANS}, Student's t_{MIN_MEANS - 1} 97.5% quantile is "
        f"{t_quantile(0.975, MIN_MEANS - 1):.2f} and 2 SE is a {1 - t_cdf(2.0, MIN_MEANS - 1):.1%} one-sided false "
        f"alarm per condition, not the normal's 2.3%; on fewer than {MIN_MEANS} the threshold is that quantile). A "
        "held-out evaluation that logs the chosen reward (--eval-every) decides instead")


def _heldout_displacement(run: Run, e: dict) -> list[Finding]:
    """The displacement rule on one held-out point ``e`` (SEs over the held-out pairs, or the signs alone)."""
    c, m = e["chosen_reward"], e["margin"]
    c_se, m_se = e.get("chosen_reward_se"), e.get("margin_se")
    with_se = finite(c_se) and finite(m_se)
    if not (c + 2 * c_se < 0 and m - 2 * m_se > 0 if with_se else c < 0 and m > 0):
        return []
    at = f"step {e['step']}" if e.get("step") is not None else "the end of the run"
    if with_se:
        how = (f"chosen reward {c:+.3g} ± {c_se:.2g}{_nats(c, run.beta)}, below 0 by "
               f"{-c / c_se if c_se else math.inf:.1f} SE, margin {m:.3g} ± {m_se:.2g}, above 0 by "
               f"{m / m_se if m_se else math.inf:.1f} SE (threshold 2 SE, SEs over the held-out pairs)")
    else:
        how = (f"chosen reward {c:+.3g}{_nats(c, run.beta)} below 0 and margin {m:.3g} above 0 (the log gives no "
               "SE, e.g. TRL's eval_ means: the signs alone decide, a mean near 0 may be noise)")
    train_chosen = tail(series(run, "rewards/chosen"))
    seen = (f"; the training batches over {span(train_chosen)}, not used for the call: rewards/chosen "
            f"{mean_se([v for _, v in train_chosen])[0]:+.3g}") if train_chosen else ""
    return _displacement_finding(
        [e["step"]] if isinstance(e.get("step"), int) else [], f"held-out pairs at {at}: {how}{seen}",
        DISPLACED + ", on pairs the policy was not trained on")


def _losses_by_epoch(run: Run) -> list[list[tuple[int, float]]]:
    """The logged ``(step, loss)`` of each epoch (an entry at epoch 1.0 closes the first one)."""
    by_epoch: dict[int, list[tuple[int, float]]] = {}
    for r in run.train:
        if finite(r.get("epoch")) and finite(r.get("loss")):
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
    if e is None or not finite(e.get("accuracy")):
        return None
    acc = tail([(s, v) for s, v in series(run, "rewards/accuracies") if e["step"] is None or s <= e["step"]])
    if len(acc) < 3:
        return None
    t, t_se = mean_se([v for _, v in acc])
    gap = t - e["accuracy"]
    bound = 2 * math.hypot(t_se, e["accuracy_se"]) if finite(e.get("accuracy_se")) else 0.1
    if gap <= bound:
        return None
    se = f" ± {e['accuracy_se']:.2g}" if finite(e.get("accuracy_se")) else ""
    return (f"training accuracy {t:.3f} ± {t_se:.2g} over {span(acc)} vs held-out {e['accuracy']:.3f}{se} at step "
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
        parts.append(f"training accuracy {acc_mean:.3f} over {span(acc)}, and the loss drops at "
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
    """Margins so large that the DPO gradient weight σ(−βh) ≈ 0 (lesson 01's gradient, DPO §4)."""
    margin = tail(series(run, "rewards/margins"))
    if run.loss_type not in SIGMOID_LIKE or len(margin) < 3:
        return []
    weight = sum(sigmoid(-v) for _, v in margin) / len(margin)
    if weight >= SATURATED:
        return []
    m = mean_se([v for _, v in margin])[0]
    return [Finding("saturation", "warning", [s for s, _ in margin],
                    f"over {span(margin)} the margin βh averages {m:.3g}, so the mean gradient weight σ(−margin) is "
                    f"{weight:.3g} (0.5 at step 1; threshold {SATURATED:g}, a tenth of it: ln 19 = 2.94 of margin); "
                    "from batch-mean margins, so pairs with small margins may still get some gradient",
                    "the pairs are fitted: each update is scaled down by more than 10×, further steps mostly add "
                    "drift, not preference",
                    "lesson 01 (From RLHF to DPO: the gradient weight σ(r̂_l − r̂_w); higher β keeps the policy closer "
                    f"to the reference); {LESSON_06}, Part 1 (DPO vs IPO)",
                    "stop earlier or lower the learning rate; the margin is β·h, so a smaller β saturates later "
                    "but lets the policy drift further from the reference; IPO (--loss-type ipo) does not saturate")]


def check_grad_explosion(run: Run) -> list[Finding]:
    """The gradient norm grows by an order of magnitude over its early level (median of 3, so not one spike)."""
    g = [(s, v) for s, v in series(run, "grad_norm") if v > 0]
    if len(g) < 6:
        return []
    early = sorted(v for _, v in g[:max(3, len(g) // 10)])
    base = early[len(early) // 2]
    smooth = rolling_median([v for _, v in g])
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


def check_length_growth(run: Run) -> list[Finding]:
    """Where lengths are logged (any metric named ``*length*``): answers growing step after step (lesson 06, Part 3)."""
    findings = []
    keys = sorted({k for r in run.train for k in r if "length" in k.lower() and finite(r[k])})
    for key in keys:
        s = series(run, key)
        if len(s) < 5:
            continue
        z, first, last = kendall_z([v for _, v in s]), s[0][1], mean_se([v for _, v in tail(s)])[0]
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
