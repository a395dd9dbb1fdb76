"""Training curves from a metrics history (a list of per-step dicts, as in ``metrics.jsonl``)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

if "inline" not in matplotlib.get_backend():  # notebooks keep their inline backend
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS = {
    "loss": ("DPO loss (ln 2 at step 0)", ["loss"]),
    "rewards": ("Implicit-reward accuracy and margin", ["rewards/accuracies", "rewards/margins"]),
    "logps": ("Sequence log-probs of chosen and rejected", ["logps/chosen", "logps/rejected"]),
}


def plot_panel(ax, history: list[dict], keys: list[str], title: str) -> None:
    steps = [m["step"] for m in history]
    for key in keys:
        ax.plot(steps, [m[key] for m in history], marker=".", label=key)
    if keys == ["loss"]:
        ax.axhline(0.6931, color="grey", ls=":", lw=1, label="ln 2")
    ax.set_xlabel("optimizer step")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def plot_training(history: list[dict], out_dir: str | Path | None = None, show: bool = False) -> dict:
    """One figure per panel (loss; accuracy and margins; chosen/rejected log-probs).

    With ``out_dir`` each is saved as ``NAME.png``; returns ``{name: path or figure}``.
    """
    figures = {}
    for name, (title, keys) in PANELS.items():
        fig, ax = plt.subplots(figsize=(5.5, 3.4))
        plot_panel(ax, history, keys, title)
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
