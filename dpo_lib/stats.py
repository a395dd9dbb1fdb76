"""The statistics the lessons use: a mean with its standard error, paired differences and seed averages.

Every "N SE" statement in the course is computed here, never typed. The rules (the course's
"Statistics the lessons use"):

* An :class:`Estimate` is a mean over ``n`` items (prompts, pairs, texts) with its standard error

  .. math:: \\bar x = \\frac1n\\sum_i x_i,\\qquad
            \\mathrm{SE} = \\frac{s}{\\sqrt n},\\qquad s^2 = \\frac{1}{n-1}\\sum_i (x_i-\\bar x)^2

  (the sample standard deviation, ``ddof=1``; the SE is ``nan`` when ``n < 2``: one item has no spread),
  and ``z = x̄ / SE``, how many SEs the mean is from zero (:func:`mean_se`).
* Two evaluations of the **same items** are compared item by item: ``d_i = a_i - b_i``, then
  :func:`mean_se` of the ``d_i`` (:func:`paired_difference`). What the items share (a hard prompt, a
  baseline sample) cancels in ``d_i``, so the paired SE is usually far below the unpaired
  ``sqrt(SE_a² + SE_b²)``, which treats the two as independent. A gain against a baseline is one
  (:func:`gain`); two arms evaluated against the **same** baseline are compared by the paired
  difference of their per-prompt gains (:func:`arms_difference`), in which the baseline cancels.
* Several seeds are **averaged per prompt first**, then the SE is taken over prompts
  (:func:`seed_average`, :func:`seed_averaged_se`). The prompts, not the seeds, are the sample: the seeds
  of one prompt share its difficulty, so combining per-seed SEs as if independent
  (``sqrt(Σ SE_s²) / S``) understates the SE when seeds agree per prompt.
* A "fix" (or a tax, or a gain) is a difference **beyond 2 SE** (``|x̄| > 2 SE``,
  :meth:`Estimate.beyond`); anything else is named a null result (:meth:`Estimate.verdict`).

Values may be lists, NumPy arrays or torch tensors of floats; NaN or infinite values are refused with a
``ValueError`` (a broken measurement should stop the statistic, not turn it into ``nan``). The module
imports neither torch nor NumPy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Estimate", "arms_difference", "gain", "mean_se", "over_seeds_and_prompts", "paired_difference",
           "seed_average", "seed_averaged_se", "t_cdf", "t_quantile"]


@dataclass(frozen=True)
class Estimate:
    """A mean ``value`` over ``n`` items with its standard error ``se`` (``nan`` when ``n < 2``)."""

    value: float
    se: float
    n: int

    @property
    def z(self) -> float:
        """``value / se``: ±inf when ``se == 0`` and ``value != 0``, 0.0 when both are 0, nan without an SE."""
        if self.se == 0:
            return math.copysign(math.inf, self.value) if self.value != 0 else 0.0
        return self.value / self.se

    def beyond(self, k: float = 2.0) -> bool:
        """``|value| > k * se`` (strictly; False without an SE)."""
        return abs(self.value) > k * self.se

    def verdict(self, k: float = 2.0) -> str:
        """``"beyond 2 SE"`` or ``"within 2 SE (a null result)"`` (with ``k`` for 2); without an SE (n < 2),
        says that nothing can be told."""
        if math.isnan(self.se):
            return f"no SE from n = {self.n} (cannot tell whether beyond {k:g} SE)"
        return f"beyond {k:g} SE" if self.beyond(k) else f"within {k:g} SE (a null result)"

    def format(self, digits: int = 3) -> str:
        """``+0.159 ± 0.024 (6.6 SE)``: the signed value and its SE to ``digits`` decimals, then ``|z|`` (how
        many SEs from zero) to 1 decimal; ``+0.500 (n = 1, no SE)`` without an SE."""
        if math.isnan(self.se):
            return f"{self.value:+.{digits}f} (n = {self.n}, no SE)"
        return f"{self.value:+.{digits}f} ± {self.se:.{digits}f} ({abs(self.z):.1f} SE)"

    def __str__(self) -> str:
        return self.format()


def _plain(x):
    """NumPy arrays and torch tensors (and their scalars) as Python lists and numbers; anything else as is."""
    return x.tolist() if hasattr(x, "tolist") else x


def _floats(values, what: str) -> list[float]:
    """``values`` (a list, array or tensor of numbers) as finite Python floats, one per item."""
    values = _plain(values)
    if isinstance(values, (int, float)):
        raise ValueError(f"{what}: expects one value per item, got the single number {values!r}")
    out = []
    for i, v in enumerate(values):
        v = _plain(v)
        if isinstance(v, (list, tuple, str)):
            raise ValueError(f"{what}: expects one number per item, item {i} is {type(v).__name__} {v!r:.40}")
        x = float(v)
        if not math.isfinite(x):
            raise ValueError(f"{what}: item {i} is {x} (NaN and infinite values are refused)")
        out.append(x)
    return out


def mean_se(values) -> Estimate:
    """The mean of ``values`` over items and its standard error ``s / sqrt(n)`` (``s`` with ``n - 1``)."""
    xs = _floats(values, "mean_se")
    n = len(xs)
    if n == 0:
        raise ValueError("mean_se: no values (a mean over no items)")
    mean = sum(xs) / n
    if n == 1:
        return Estimate(mean, math.nan, 1)
    var = sum((x - mean) ** 2 for x in xs) / (n - 1)
    return Estimate(mean, math.sqrt(var / n), n)


def paired_difference(a, b) -> Estimate:
    """Mean and SE of ``a[i] - b[i]``: ``a`` and ``b`` are evaluations of the same items, in the same order."""
    xa, xb = _floats(a, "paired_difference (a)"), _floats(b, "paired_difference (b)")
    if len(xa) != len(xb):
        raise ValueError(f"paired_difference: a has {len(xa)} items and b has {len(xb)}; a paired difference "
                         "needs the same items in the same order")
    return mean_se([x - y for x, y in zip(xa, xb)])


def seed_average(per_seed) -> list[float]:
    """The per-prompt mean over seeds: ``per_seed[s][i]`` is seed ``s``'s value on prompt ``i`` (every seed on
    the same prompts, in the same order)."""
    seeds = [_floats(values, f"seed_average (seed {s})") for s, values in enumerate(_plain(per_seed))]
    if not seeds:
        raise ValueError("seed_average: no seeds")
    for s, values in enumerate(seeds):
        if len(values) != len(seeds[0]):
            raise ValueError(f"seed_average: seed {s} has {len(values)} prompts and seed 0 has {len(seeds[0])}; "
                             "every seed must be evaluated on the same prompts")
    return [sum(column) / len(seeds) for column in zip(*seeds)]


def seed_averaged_se(per_seed) -> Estimate:
    """Mean and SE over prompts of the seed-averaged values: average the seeds per prompt first."""
    return mean_se(seed_average(per_seed))


def over_seeds_and_prompts(per_seed) -> Estimate:
    """Mean over seeds and prompts, with an SE that counts both sources of noise: the prompts (the SE over
    prompts of the seed-averaged values, :func:`seed_averaged_se`) and the training runs (the spread of the
    seeds' means, ``s_seeds² / S``):

    .. math:: \\mathrm{SE}^2 = \\mathrm{SE}^2_\\text{prompts} + \\frac{s^2_\\text{seeds}}{S}

    Use it where a whole run is random, not only its evaluation (a KL, a gain of a trained policy): all seeds
    are evaluated on the same prompts, so the prompt term is shared by the seeds and does not shrink with
    ``S``, while a seed that moved the policy further shifts every prompt at once and shows only in the second
    term. Slightly conservative (the seed-by-prompt noise enters both terms). One seed: the prompt term alone."""
    averaged = seed_averaged_se(per_seed)
    means = [mean_se(values).value for values in _plain(per_seed)]
    if len(means) < 2:
        return averaged
    seeds = mean_se(means)
    return Estimate(averaged.value, math.sqrt(averaged.se ** 2 + seeds.se ** 2), averaged.n)


def gain(after, before) -> Estimate:
    """The paired gain ``after[i] - before[i]`` against a baseline evaluated on the same prompts."""
    return paired_difference(after, before)


def _per_prompt(values, what: str) -> list[float]:
    """One value per prompt: ``values`` as is, or averaged over seeds if it is a list of per-seed lists."""
    values = [_plain(v) for v in _plain(values)]
    nested = [isinstance(v, (list, tuple)) for v in values]
    if values and all(nested):
        return seed_average(values)
    if any(nested):
        raise ValueError(f"arms_difference: {what} mixes numbers and per-seed lists")
    return values


def arms_difference(gain_a, gain_b) -> Estimate:
    """Arm a against arm b, both evaluated on the same prompts against the same baseline: the paired difference
    of their per-prompt gains (the baseline cancels). Each gain is one value per prompt, or a list of per-seed
    lists of them, averaged per prompt first (:func:`seed_average`)."""
    return paired_difference(_per_prompt(gain_a, "gain_a"), _per_prompt(gain_b, "gain_b"))


def t_cdf(t: float, df: int) -> float:
    """P(T ≤ t) for Student's t with an integer ``df`` ≥ 1, in closed form (Abramowitz & Stegun 26.7.3–4:
    with θ = atan(t/√df), a finite sum in cos²θ), so the doctor needs no scipy."""
    theta = math.atan(t / math.sqrt(df))
    c2, term, total = math.cos(theta) ** 2, 1.0, 1.0
    if df % 2:     # odd: (2/π)·(θ + sinθ·cosθ·(1 + 2/3·cos²θ + 2·4/(3·5)·cos⁴θ + … up to cos^(df−3)θ))
        for k in range(1, (df - 1) // 2):
            term *= 2 * k / (2 * k + 1) * c2
            total += term
        inside = 2 / math.pi * (theta + (math.sin(theta) * math.cos(theta) * total if df > 1 else 0.0))
    else:          # even: sinθ·(1 + 1/2·cos²θ + 1·3/(2·4)·cos⁴θ + … up to cos^(df−2)θ)
        for k in range(1, df // 2):
            term *= (2 * k - 1) / (2 * k) * c2
            total += term
        inside = math.sin(theta) * total
    return (1 + inside) / 2    # inside = P(|T| < t)


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (0.5 < p < 1) of Student's t with ``df`` degrees of freedom, by bisection on
    :func:`t_cdf`; e.g. 0.975: 12.71 (df 1), 4.30, 3.18, 2.78, 2.57, 2.45 (df 6), 2.23 (df 10), 2.04 (df 30)."""
    lo, hi = 0.0, 1e4
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2
