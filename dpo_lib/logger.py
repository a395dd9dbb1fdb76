"""What a training run records: the metrics file, the table printed every few steps, and the
package versions that go into the run card.

* :class:`MetricsLogger` — one JSON line per optimizer step in ``OUT/metrics.jsonl`` (TRL's
  metric names, as in the README), and the boxed table of :func:`format_table` every ``print_every`` steps.
* :func:`package_versions` — the versions of Python and the packages a result depends on.
"""

from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path

from tqdm.auto import tqdm

from dpo_lib.checkpoints import atomic_write_text

__all__ = ["MetricsLogger", "PACKAGES", "format_table", "package_versions", "table_rows"]

PACKAGES = ("dpo_lib", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "safetensors", "gguf",
            "vaderSentiment")


def package_versions(packages=PACKAGES) -> dict:
    """``{"python": ..., "platform": ..., PACKAGE: VERSION}`` for the installed ones of ``packages``."""
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in packages:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def format_table(title: str, metrics: dict) -> str:
    """The boxed metric table printed during training (the tinker guide's layout)."""
    rows = [(k, f"{v:.6g}" if isinstance(v, float) else str(v)) for k, v in metrics.items()]
    w1 = max(len("metric"), *(len(k) for k, _ in rows))  # the header fits too
    w2 = max(len("value"), *(len(v) for _, v in rows))
    line = f"+{'-' * (w1 + 2)}+{'-' * (w2 + 2)}+"
    body = [f"| {k:<{w1}} | {v:<{w2}} |" for k, v in rows]
    return "\n".join([title.center(len(line)), line, f"| {'metric':<{w1}} | {'value':<{w2}} |", line, *body, line])


def table_rows(m: dict, step: int, total_steps: int, batch_size: int) -> dict:
    """The rows of the printed table, from one step's metrics (TRL names -> short names)."""
    return {"accuracy": m["rewards/accuracies"], "dpo_loss": m["loss"], "margin": m["rewards/margins"],
            "chosen_reward": m["rewards/chosen"], "rejected_reward": m["rewards/rejected"],
            "learning_rate": m["learning_rate"], "grad_norm": m["grad_norm"], "num_pairs": step * batch_size,
            "num_tokens": m["num_tokens"], "tokens_per_second": m["tokens_per_second"],
            **({"heldout_accuracy": m["eval/accuracy"], "heldout_margin": m["eval/margin"]}
               if "eval/accuracy" in m else {}),
            "progress": step / total_steps}


class MetricsLogger:
    """``OUT/metrics.jsonl`` (one line per step, flushed) and the table every ``print_every`` steps.

    ``out=None`` (or a process that is not the main one) writes nothing; ``start_step > 0`` (a
    resumed run) appends to the file, which :meth:`truncate` has cut back to the checkpoint's step."""

    def __init__(self, out: Path | None, start_step: int, total_steps: int, batch_size: int, print_every: int,
                 enabled: bool = True):
        self.total_steps, self.batch_size, self.print_every = total_steps, batch_size, print_every
        self.enabled = enabled
        path = Path(out) / "metrics.jsonl" if out is not None else None
        self.file = open(path, "a" if start_step else "w") if path is not None and enabled else None

    def log(self, m: dict) -> None:
        if self.file:
            self.file.write(json.dumps(m) + "\n")
            self.file.flush()
        step = m["step"]
        if self.enabled and self.print_every and (step % self.print_every == 0 or step == self.total_steps):
            tqdm.write(format_table(f"Step {step}", table_rows(m, step, self.total_steps, self.batch_size)))

    def close(self) -> None:
        if self.file:
            self.file.close()

    @staticmethod
    def truncate(out: Path, steps: int) -> None:
        """Keep the first ``steps`` lines of ``OUT/metrics.jsonl`` (those of a checkpoint being resumed)."""
        path = Path(out) / "metrics.jsonl"
        if path.is_file():
            lines = path.read_text().splitlines()
            atomic_write_text(path, "".join(line + "\n" for line in lines[:steps]))
