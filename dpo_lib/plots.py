"""Training curves from a metrics history (a list of per-step dicts, as in ``metrics.jsonl``).

Three panels, drawn the same way by ``python -m dpo_lib train`` (one PNG each) and the lessons
(:func:`plot_curves`, one figure):

* ``loss`` — the DPO loss of each training batch (ln 2 at step 0);
* ``rewards`` — implicit-reward accuracy and margin of the training batches, and, when the run
  evaluated them (:class:`dpo_lib.evaluation.HeldoutEval`), of the held-out pairs on the same axes, with a
  dotted line at chance (accuracy 0.5): held-out accuracy is read against it, not against the 0 of the
  step-0 tie;
* ``logps`` — how far the policy's log-probs of the chosen and rejected replies moved from the
  reference's, :math:`\\log\\pi_\\theta - \\log\\pi_\\text{ref} = \\hat r/\\beta` (nats), smoothed.
  The raw summed log-probs swing by tens of nats with the lengths of the replies that landed in a
  batch; the change from the reference, on the same replies, does not, so a fall of the chosen
  reply shows.

Every panel marks the epoch boundaries: from the second epoch on, the training batches repeat
pairs the policy has already fitted, so their accuracy rises faster than the held-out one.

**One style for the course** (:data:`COURSE_STYLE`, applied on import, and by
:func:`use_course_style`): figures at most :data:`SHOWN_WIDTH_PX` pixels wide at 100 dpi, the width
JupyterLab shows an output image at by default, so they are not scaled down, and no text smaller than
:data:`MIN_TEXT_PX` pixels there (:func:`smallest_text_px` measures it; the tests hold every figure of
this module to it). A lesson's own figures use the same rcParams; keep them at most 9.5 inches wide.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

if "inline" not in matplotlib.get_backend():  # notebooks keep their inline backend
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.text import Text  # noqa: E402

__all__ = ["COURSE_STYLE", "MIN_TEXT_PX", "PANELS", "SHOWN_WIDTH_PX", "default_window", "epoch_boundaries",
           "plot_curves", "plot_panel", "plot_training", "smallest_text_px", "smoothed", "use_course_style"]

SHOWN_WIDTH_PX = 950  # how wide JupyterLab shows an output image in its default layout (1280 px window)
MIN_TEXT_PX = 9       # the smallest legible text there, in pixels
COURSE_STYLE = {
    "figure.figsize": (9.0, 3.4), "figure.dpi": 100, "savefig.dpi": 100,
    "font.size": 10, "axes.titlesize": 10, "axes.labelsize": 10,
    "xtick.labelsize": 9, "ytick.labelsize": 9, "legend.fontsize": 8, "legend.framealpha": 0.85,
    "axes.spines.top": False, "axes.spines.right": False, "grid.alpha": 0.3,
}


def use_course_style() -> None:
    """Apply :data:`COURSE_STYLE` to matplotlib's rcParams (done once when this module is imported)."""
    matplotlib.rcParams.update(COURSE_STYLE)


def smallest_text_px(fig, shown_width: int = SHOWN_WIDTH_PX) -> float:
    """The height in pixels of the smallest visible text of ``fig`` (ticks, legends, titles) when the figure is
    shown ``shown_width`` pixels wide (or at its own size, if narrower)."""
    width_px = fig.get_size_inches()[0] * fig.dpi
    scale = min(1.0, shown_width / width_px) * fig.dpi / 72
    fig.canvas.draw()  # tick labels exist once drawn
    sizes = [t.get_fontsize() for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    return min(sizes) * scale if sizes else float("inf")


use_course_style()

PANELS = {
    "loss": "DPO loss of the training batches",
    "rewards": "Implicit-reward accuracy and margin",
    "logps": "Log-prob change from the reference (nats)",
}


def smoothed(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` values (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def default_window(history: list[dict]) -> int:
    """A quarter of an epoch, between 1 and 8 steps: enough to average out which pairs landed in a batch."""
    per_epoch = round(history[0]["step"] / history[0]["epoch"]) if history and history[0].get("epoch") else 1
    return max(1, min(8, per_epoch // 4))


def epoch_boundaries(history: list[dict]) -> list[float]:
    """x positions between the last step of one epoch and the first of the next (``epoch`` is
    the step over the steps per epoch, so it is a whole number at an epoch's last step)."""
    return [m["step"] + 0.5 for m in history[:-1]
            if "epoch" in m and m["epoch"] >= 1 and abs(m["epoch"] - round(m["epoch"])) < 1e-9]


def _mark_epochs(ax, history: list[dict]) -> None:
    for k, x in enumerate(epoch_boundaries(history)):
        ax.axvline(x, color="grey", ls="--", lw=0.8, label="new epoch" if k == 0 else None)


def plot_panel(ax, history: list[dict], name: str, beta: float | None = None, window: int | None = None) -> None:
    """Draw panel ``name`` (a key of :data:`PANELS`) of ``history`` into ``ax``. ``beta`` is needed
    for ``logps`` (the change from the reference is the implicit reward over β)."""
    steps = [m["step"] for m in history]
    window = window or default_window(history)
    if name == "loss":
        ax.plot(steps, [m["loss"] for m in history], marker=".", label="loss")
        ax.axhline(math.log(2), color="grey", ls=":", lw=1, label="ln 2")
    elif name == "rewards":
        for key, label, color in (("accuracies", "accuracy", "C0"), ("margins", "margin", "C1")):
            ax.plot(steps, [m[f"rewards/{key}"] for m in history], color=color, alpha=0.8, marker=".", lw=1,
                    label=f"{label} (training batch)")
        ax.axhline(0.5, color="C0", ls=":", lw=1, label="chance (accuracy 0.5)")
        held = [m for m in history if "eval/accuracy" in m]
        for key, label, color in (("accuracy", "accuracy", "C0"), ("margin", "margin", "C1")):
            if held:
                ax.plot([m["step"] for m in held], [m[f"eval/{key}"] for m in held], color=color, marker="o",
                        ls="--", lw=2, label=f"{label} (held-out)")
    elif name == "logps":
        if beta is None:
            raise ValueError("plot_panel('logps') needs beta: the change from the reference is reward / beta")
        for side, color in (("chosen", "C2"), ("rejected", "C3")):
            change = [m[f"rewards/{side}"] / beta for m in history]  # (log π_θ - log π_ref), batch mean
            ax.plot(steps, change, color=color, alpha=0.25, lw=1)
            ax.plot(steps, smoothed(change, window), color=color, lw=2,
                    label=f"{side} (mean of {window} steps)" if window > 1 else side)
        ax.axhline(0, color="grey", ls=":", lw=1)
    else:
        raise ValueError(f"unknown panel {name!r}: expected one of {', '.join(PANELS)}")
    _mark_epochs(ax, history)
    ax.set_xlabel("optimizer step")
    ax.set_title(PANELS[name], fontsize=10)
    ax.legend(fontsize=7.5)
    ax.grid(alpha=0.3)


def plot_curves(history: list[dict], beta: float, figsize=(9.5, 3.6)):
    """The three panels side by side in one figure (the lessons' view of a run), 950 px wide at 100 dpi."""
    fig, axes = plt.subplots(1, 3, figsize=figsize, dpi=100)
    for ax, name in zip(axes, PANELS):
        plot_panel(ax, history, name, beta)
    fig.tight_layout()
    return fig


def plot_training(history: list[dict], out_dir: str | Path | None = None, beta: float = 0.1,
                  show: bool = False) -> dict:
    """One figure per panel; with ``out_dir`` each is saved as ``NAME.png``. Returns ``{name: path or figure}``."""
    figures = {}
    for name in PANELS:
        fig, ax = plt.subplots(figsize=(5.5, 3.4), dpi=100)
        plot_panel(ax, history, name, beta)
        fig.tight_layout()
        if out_dir is not None:
            path = Path(out_dir) / f"{name}.png"
            fig.savefig(path, dpi=110)
            figures[name] = path
        else:
            figures[name] = fig
        if not show:
            plt.close(fig)
    return figures
