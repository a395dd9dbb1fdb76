"""``python -m dpo_lib doctor PATH --plot FILE``: the curves a diagnosis rests on, with the findings marked.

Five panels from a :class:`dpo_lib.tools.doctor_run.Run`: the loss against ln 2 (its value while the
policy is the reference), the chosen and rejected log-prob change from the reference (rewards / β,
in nats, when β is known; the rewards themselves otherwise: lesson 06's likelihood displacement is
the chosen curve going below 0), the margin βh (with the σ(−margin) = 0.05 saturation line once
the margins reach half of it), the training accuracy next to the held-out one (lesson 03's epoch
pitfall; epoch starts dotted), and the gradient norm (log scale when it spans an order of
magnitude). Each finding's steps are marked on every panel in its severity's colour. 1200 px
wide, text of 9 pt and more: at least 9 px when shown 950 px wide.
Drawn with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dpo_lib.tools.doctor_checks import LN2, SATURATED, Finding  # noqa: E402
from dpo_lib.tools.doctor_run import Run, series  # noqa: E402

__all__ = ["COLOURS", "plot_run"]

COLOURS = {"problem": "tab:red", "warning": "tab:orange", "info": "tab:gray"}


def _xy(s: list[tuple[int, float]], scale: float = 1.0) -> tuple[list[int], list[float]]:
    return [x for x, _ in s], [y / scale for _, y in s]


def _loss(ax, run: Run) -> None:
    ax.plot(*_xy(series(run, "loss")), label="training loss")
    eval_loss = [(e["step"], e["loss"]) for e in run.eval if isinstance(e.get("loss"), (int, float))]
    if eval_loss:
        ax.plot(*_xy(eval_loss), "o-", label="held-out loss")
    ax.axhline(LN2, color="k", ls="--", lw=0.8, label="ln 2 (policy = reference)")
    ax.set_title("Loss against ln 2")


def _logps(ax, run: Run) -> None:
    scale = run.beta or 1.0
    for key, name in (("rewards/chosen", "chosen"), ("rewards/rejected", "rejected")):
        ax.plot(*_xy(series(run, key), scale), label=name)
    held = [(e["step"], e["chosen_reward"]) for e in run.eval if isinstance(e.get("chosen_reward"), (int, float))]
    if held:  # what likelihood_displacement decides on, where it was logged
        ax.plot(*_xy(held, scale), "o-", label="held-out chosen")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_title("log π − log π_ref (nats)" if run.beta else "β·(log π − log π_ref) (β unknown)")


def _margins(ax, run: Run) -> None:
    margins = series(run, "rewards/margins")
    ax.plot(*_xy(margins), label="training margin βh")
    eval_margin = [(e["step"], e["margin"]) for e in run.eval if isinstance(e.get("margin"), (int, float))]
    if eval_margin:
        ax.plot(*_xy(eval_margin), "o-", label="held-out margin")
    saturated = math.log(1 / SATURATED - 1)  # σ(−margin) = SATURATED at margin ln 19 = 2.94
    if max((v for _, v in margins + eval_margin), default=0.0) >= saturated / 2:  # else it would flatten the curves
        ax.axhline(saturated, color="k", ls="--", lw=0.8, label=f"σ(−margin) = {SATURATED:g}")
        ax.set_title("Reward margin")
    else:
        ax.set_title(f"Reward margin (saturation: {saturated:.2f})")


def _accuracy(ax, run: Run) -> None:
    ax.plot(*_xy(series(run, "rewards/accuracies")), label="training batches")
    held = [(e["step"], e["accuracy"]) for e in run.eval if isinstance(e.get("accuracy"), (int, float))]
    if held:
        ax.plot(*_xy(held), "o-", label="held-out")
    ax.axhline(0.5, color="k", ls="--", lw=0.8, label="chance")
    epochs = series(run, "epoch")
    for (_, e0), (s1, e1) in zip(epochs, epochs[1:]):
        if math.ceil(e1 - 1e-9) > math.ceil(e0 - 1e-9):
            ax.axvline(s1, color="k", ls=":", lw=0.8)
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("Implicit-reward accuracy (epoch starts dotted)")


def _grad_norm(ax, run: Run) -> None:
    g = [(s, v) for s, v in series(run, "grad_norm") if v > 0]
    ax.plot(*_xy(g), label="grad norm (before clipping)")
    if g and max(v for _, v in g) > 10 * min(v for _, v in g):  # log scale where it spans an order of magnitude
        ax.set_yscale("log")
    ax.set_title("Gradient norm")


def _mark(axes, findings: list[Finding]) -> None:
    for f in findings:
        colour = COLOURS[f.severity]
        for ax in axes:
            if len(f.steps) > 1 and f.steps == list(range(f.steps[0], f.steps[-1] + 1)) or len(f.steps) > 12:
                ax.axvspan(f.steps[0], f.steps[-1], color=colour, alpha=0.12)
            else:
                for s in f.steps:
                    ax.axvline(s, color=colour, lw=1.2, alpha=0.7)


def _legend(ax, run: Run, findings: list[Finding]) -> None:
    ax.axis("off")
    lines = [f"{run.source} run:", "/".join(Path(run.path).parts[-2:]), ""]
    lines += [f"{f.severity.upper()} {f.id}" for f in findings] or ["no findings"]
    ax.text(0, 1, "\n".join(lines), va="top", family="monospace", fontsize=10, wrap=True)
    for i, (severity, colour) in enumerate(COLOURS.items()):
        ax.text(0, 0.1 - 0.07 * i, f"■ {severity}", color=colour, fontsize=10)


def plot_run(run: Run, findings: list[Finding], path) -> None:
    """Draw the five panels of the module docstring and the list of findings into ``path`` (PNG)."""
    with plt.rc_context({"font.size": 10, "legend.fontsize": 9}):  # 1200 px wide: ≥ 9 px text when shown at 950
        fig, grid = plt.subplots(2, 3, figsize=(12, 7.5), constrained_layout=True)
        panels = [_loss, _logps, _margins, _accuracy, _grad_norm]
        axes = list(grid.flat)
        for draw, ax in zip(panels, axes):
            draw(ax, run)
            ax.set_xlabel("step")
            ax.legend()
        _mark(axes[:5], findings)
        _legend(axes[5], run, findings)
        fig.suptitle("python -m dpo_lib doctor")
        fig.savefig(path, dpi=100)
    plt.close(fig)
