"""The run the doctor reads: :class:`Run` (a DPO run's logged steps, held-out points, settings) and
the helpers every part of ``python -m dpo_lib doctor`` reads its curves with.

A :class:`Run` is built from files by :func:`dpo_lib.tools.doctor.read_run` (a ``dpo_lib`` run folder
or a TRL ``trainer_state.json``) or from a trainer's in-memory history by
:func:`dpo_lib.tools.doctor.run_from_history`; :func:`dpo_lib.tools.doctor_checks.diagnose` checks it.
Metric names are TRL's (``loss``, ``rewards/chosen``, ``rewards/margins``, ``rewards/accuracies``,
``grad_norm``, ``epoch`` …), one dict per logged step with its ``step``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from dpo_lib import stats

__all__ = ["Run", "finite", "kendall_z", "mean_se", "rolling_median", "series", "sigmoid", "span", "tail"]


@dataclass
class Run:
    """A DPO run's logs: ``train`` holds one dict per logged step (TRL's metric names and ``step``),
    ``eval`` the held-out points ``{"step", "accuracy", "accuracy_se"?, "margin"?, "margin_se"?, "chosen_reward"?,
    "chosen_reward_se"?}`` (rewards β·(log π − log π_ref), means over the held-out pairs), ``config`` what is
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


def finite(v) -> bool:
    """A real, finite number (not a bool, not NaN or inf)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def series(run: Run, key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of ``key`` over the logged training steps, finite values only."""
    return [(r["step"], float(r[key])) for r in run.train if finite(r.get(key))]


def tail(s: list) -> list:
    """The last quarter of a series (at least 3 points, or all of a shorter one): the run's end state."""
    return s[-max(3, len(s) // 4):]


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error, from :func:`dpo_lib.stats.mean_se` (the doctor's SE is 0 for a single value,
    where stats gives nan: its checks then compare the value alone)."""
    estimate = stats.mean_se(values)
    return estimate.value, 0.0 if estimate.n == 1 else estimate.se


def span(s: list) -> str:
    """``steps FIRST–LAST`` of a ``(step, value)`` series."""
    return f"steps {s[0][0]}–{s[-1][0]}"


def rolling_median(values: list[float], w: int = 3) -> list[float]:
    out = []
    for i in range(len(values)):
        window = sorted(values[max(0, i - w // 2):i + w // 2 + 1])
        out.append(window[len(window) // 2])
    return out


def kendall_z(values: list[float]) -> float:
    """Kendall's τ of the values against their order, in units of its SE under no trend."""
    n = len(values)
    s = sum((values[j] > values[i]) - (values[j] < values[i]) for i in range(n) for j in range(i + 1, n))
    tau = 2 * s / (n * (n - 1))
    return tau / math.sqrt(2 * (2 * n + 5) / (9 * n * (n - 1)))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))
