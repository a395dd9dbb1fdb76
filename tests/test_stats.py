"""dpo_lib.stats against hand arithmetic: the mean and its SE, paired differences (and why pairing matters),
seed averages (and why they come before the SE), two arms against one baseline, and the printed verdicts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dpo_lib.stats import (
    Estimate,
    arms_difference,
    gain,
    mean_se,
    over_seeds_and_prompts,
    paired_difference,
    seed_average,
    seed_averaged_se,
)

# ----------------------------------------------------------------------------- mean_se


def test_mean_se_by_hand():
    """[1, 2, 3, 6]: mean 12/4 = 3; deviations -2, -1, 0, 3; squares 4 + 1 + 0 + 9 = 14; sample variance
    14/3 (ddof=1); SD sqrt(14/3) = 2.1602469; SE = SD / sqrt(4) = 1.0801234."""
    e = mean_se([1.0, 2.0, 3.0, 6.0])
    assert e == Estimate(3.0, pytest.approx(1.0801234, abs=1e-7), 4)
    assert e.se != pytest.approx(math.sqrt(14 / 4) / 2)  # not the population SD (ddof=0): 0.935
    assert e.z == pytest.approx(3.0 / 1.0801234)


def test_mean_se_takes_arrays_and_tensors():
    """The same four values as a NumPy array and a torch tensor give the same Estimate as the list."""
    expected = mean_se([1.0, 2.0, 3.0, 6.0])
    assert mean_se(np.array([1.0, 2.0, 3.0, 6.0])) == expected
    assert mean_se(torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64)) == expected
    assert mean_se([torch.tensor(1.0), np.float64(2.0), 3, 6.0]) == expected  # scalars of either kind


def test_mean_se_refuses_nan_infinite_empty_and_nested():
    with pytest.raises(ValueError, match="item 1 is nan"):
        mean_se([1.0, float("nan"), 2.0])
    with pytest.raises(ValueError, match="item 0 is inf"):
        mean_se(torch.tensor([float("inf"), 1.0]))
    with pytest.raises(ValueError, match="no values"):
        mean_se([])
    with pytest.raises(ValueError, match="item 0 is list"):
        mean_se([[1.0, 2.0], [3.0, 4.0]])


def test_one_item_has_no_se_and_says_so():
    """n = 1: a mean (2.0) but no spread, so SE, z are nan, nothing is beyond any number of SEs, and the
    verdict and the printed figure say there is no SE rather than calling it a null result."""
    e = mean_se([2.0])
    assert (e.value, e.n) == (2.0, 1) and math.isnan(e.se) and math.isnan(e.z)
    assert not e.beyond()
    assert e.verdict() == "no SE from n = 1 (cannot tell whether beyond 2 SE)"
    assert "null" not in e.verdict()
    assert str(e) == "+2.000 (n = 1, no SE)"


# ----------------------------------------------------------------------------- paired differences


def test_paired_difference_by_hand():
    """a = [1, 2, 3, 6], b = [0, 2, 1, 2] -> d = [1, 0, 2, 4], mean 7/4 = 1.75; deviations -0.75, -1.75,
    0.25, 2.25; squares 0.5625 + 3.0625 + 0.0625 + 5.0625 = 8.75; SD = sqrt(8.75/3) = 1.7078251;
    SE = SD / 2 = 0.8539126; z = 1.75 / 0.8539126 = 2.0494 -> beyond 2 SE."""
    d = paired_difference([1, 2, 3, 6], [0, 2, 1, 2])
    assert d == Estimate(1.75, pytest.approx(0.8539126, abs=1e-7), 4)
    assert d.z == pytest.approx(2.0493902, abs=1e-6)
    assert d.beyond() and d.verdict() == "beyond 2 SE"
    assert str(d) == "+1.750 ± 0.854 (2.0 SE)"
    assert gain([1, 2, 3, 6], [0, 2, 1, 2]) == d  # a gain is after - before, paired
    assert gain([0, 2, 1, 2], [1, 2, 3, 6]).value == -1.75  # and the order is after, before


def test_pairing_removes_the_shared_baseline_noise():
    """The baseline b = [0, 10, 20, 30] varies a lot between prompts; a = b + [1, 0, 2, 4] moves each prompt
    a little. Paired: d = [1, 0, 2, 4], SE 0.854 (above), 2.05 SE: a fix.

    Unpaired: b has mean 15, deviations ±5, ±15, squares 500, variance 500/3, SE^2 = 500/3/4 = 41.667;
    a = [1, 10, 22, 34] has mean 16.75, deviations -15.75, -6.75, 5.25, 17.25, squares 248.0625 + 45.5625 +
    27.5625 + 297.5625 = 618.75, variance 206.25, SE^2 = 51.5625. sqrt(51.5625 + 41.667) = 9.6555: more than
    ten times the paired SE, and the same 1.75 would read 0.18 SE, a null result."""
    a, b = [1, 10, 22, 34], [0, 10, 20, 30]
    paired = paired_difference(a, b)
    unpaired_se = math.hypot(mean_se(a).se, mean_se(b).se)
    assert mean_se(a).se ** 2 == pytest.approx(51.5625) and mean_se(b).se ** 2 == pytest.approx(500 / 12)
    assert unpaired_se == pytest.approx(9.6555252, abs=1e-6)
    assert paired.se == pytest.approx(0.8539126, abs=1e-7)
    assert paired.se < unpaired_se / 10
    assert paired.beyond() and not Estimate(paired.value, unpaired_se, 4).beyond()


def test_paired_difference_refuses_different_lengths():
    with pytest.raises(ValueError, match="a has 3 items and b has 4"):
        paired_difference([1, 2, 3], [1, 2, 3, 4])
    with pytest.raises(ValueError, match="a has 2 items and b has 1"):
        gain([1, 2], [1])


# ----------------------------------------------------------------------------- seeds


def test_seed_average_by_hand():
    """Seeds [0, 2, 4, 6] and [2, 2, 4, 8] on 4 prompts: per prompt (0+2)/2, (2+2)/2, (4+4)/2, (6+8)/2
    = [1, 2, 4, 7]."""
    assert seed_average([[0, 2, 4, 6], [2, 2, 4, 8]]) == [1.0, 2.0, 4.0, 7.0]
    assert seed_average(torch.tensor([[0.0, 2, 4, 6], [2, 2, 4, 8]])) == [1.0, 2.0, 4.0, 7.0]
    assert seed_average([[5, 6]]) == [5.0, 6.0]  # one seed: itself


def test_seed_averaged_se_is_not_independent_per_seed_ses():
    """Seeds s0 = [0, 2, 4, 6], s1 = [2, 2, 4, 8]: the prompts' difficulty shows in both.

    Seed-averaged: [1, 2, 4, 7], mean 3.5, deviations -2.5, -1.5, 0.5, 3.5, squares 6.25 + 2.25 + 0.25 +
    12.25 = 21, variance 7, SE sqrt(7)/2 = 1.3228757.
    Per-seed SEs combined as independent: s0 mean 3, squares 9 + 1 + 1 + 9 = 20, SE^2 = 20/3/4 = 5/3;
    s1 mean 4, squares 4 + 4 + 0 + 16 = 24, SE^2 = 24/3/4 = 2; the mean of the two means has
    SE sqrt(5/3 + 2) / 2 = 0.9574271, too small: the seeds of one prompt are not independent samples.

    Seeds that disagree per prompt, s0 = [0, 2, 4, 6] and [6, 4, 2, 0], average to [3, 3, 3, 3]: SE 0
    where the independent combination gives sqrt(5/3 + 5/3) / 2 = 0.9128709."""
    e = seed_averaged_se([[0, 2, 4, 6], [2, 2, 4, 8]])
    assert e == Estimate(3.5, pytest.approx(math.sqrt(7) / 2), 4)
    independent = math.hypot(mean_se([0, 2, 4, 6]).se, mean_se([2, 2, 4, 8]).se) / 2
    assert independent == pytest.approx(0.9574271, abs=1e-7)
    assert e.se > independent + 0.3

    flat = seed_averaged_se([[0, 2, 4, 6], [6, 4, 2, 0]])
    assert flat == Estimate(3.0, 0.0, 4) and flat.z == math.inf
    assert math.hypot(mean_se([0, 2, 4, 6]).se, mean_se([6, 4, 2, 0]).se) / 2 == pytest.approx(0.9128709)


def test_over_seeds_and_prompts_adds_the_seed_spread():
    """Seeds s0 = [0, 2, 4, 6], s1 = [2, 2, 4, 8]: prompt term sqrt(7)/2 (above), SE^2 = 7/4.
    Seed means 3 and 4: s^2 = 0.5, over S = 2 seeds 0.25. SE = sqrt(7/4 + 1/4) = sqrt(2) = 1.4142136.

    A seed that shifts every prompt by +10, s0 = [0, 2, 4, 6], s1 = [10, 12, 14, 16]: seed-averaged
    [5, 7, 9, 11], prompt SE sqrt(20/3/4) = 1.2909944 (the shift is invisible there); seed means 3 and 13,
    s^2 = 50, / 2 = 25: SE = sqrt(5/3 + 25) = 5.1639778. One seed: the prompt SE alone."""
    e = over_seeds_and_prompts([[0, 2, 4, 6], [2, 2, 4, 8]])
    assert e == Estimate(3.5, pytest.approx(math.sqrt(2)), 4)
    shifted = over_seeds_and_prompts(torch.tensor([[0.0, 2, 4, 6], [10, 12, 14, 16]]))
    assert seed_averaged_se([[0, 2, 4, 6], [10, 12, 14, 16]]).se == pytest.approx(1.2909944)
    assert shifted == Estimate(8.0, pytest.approx(5.1639778), 4)
    assert over_seeds_and_prompts([[0, 2, 4, 6]]) == mean_se([0, 2, 4, 6])


def test_seeds_must_cover_the_same_prompts():
    with pytest.raises(ValueError, match="seed 2 has 3 prompts and seed 0 has 4"):
        seed_average([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3]])
    with pytest.raises(ValueError, match="no seeds"):
        seed_averaged_se([])
    with pytest.raises(ValueError, match="seed 0"):  # one flat list is not a list of seeds
        seed_average([1.0, 2.0])


# ----------------------------------------------------------------------------- two arms, one baseline


def test_arms_difference_by_hand():
    """Baseline [0, 10, 20, 30]; arm a after [1, 10, 22, 34] (gains [1, 0, 2, 4]), arm b after [0, 10, 21, 31]
    (gains [0, 0, 1, 1]). a - b per prompt: [1, 0, 1, 3], mean 1.25; deviations -0.25, -1.25, -0.25, 1.75;
    squares 0.0625 + 1.5625 + 0.0625 + 3.0625 = 4.75, variance 4.75/3, SE sqrt(4.75/3)/2 = 0.6291529;
    z = 1.9868 -> within 2 SE (a null result). The baseline cancels: the same as after_a - after_b."""
    base, after_a, after_b = [0, 10, 20, 30], [1, 10, 22, 34], [0, 10, 21, 31]
    gain_a = [x - y for x, y in zip(after_a, base)]
    gain_b = [x - y for x, y in zip(after_b, base)]
    d = arms_difference(gain_a, gain_b)
    assert d == Estimate(1.25, pytest.approx(0.6291529, abs=1e-7), 4)
    assert d == paired_difference(after_a, after_b)
    assert not d.beyond() and d.verdict() == "within 2 SE (a null result)"
    assert str(d) == "+1.250 ± 0.629 (2.0 SE)"  # 1.9868 prints as 2.0, the verdict still reads the number


def test_arms_difference_averages_seeds_per_prompt_first():
    """Arm a over two seeds, gains [1, 0, 2, 4] and [3, 0, 2, 2] -> per prompt [2, 0, 2, 3]; arm b one list
    [0, 0, 1, 1]. Differences [2, 0, 1, 2], mean 1.25; deviations 0.75, -1.25, -0.25, 0.75; squares
    0.5625 + 1.5625 + 0.0625 + 0.5625 = 2.75; SE sqrt(2.75/3)/2 = 0.4787136."""
    d = arms_difference([[1, 0, 2, 4], [3, 0, 2, 2]], [0, 0, 1, 1])
    assert d == Estimate(1.25, pytest.approx(0.4787136, abs=1e-7), 4)
    assert arms_difference(torch.tensor([[1.0, 0, 2, 4], [3, 0, 2, 2]]), np.array([0.0, 0, 1, 1])) == d
    assert arms_difference([0, 0, 1, 1], [[1, 0, 2, 4], [3, 0, 2, 2]]).value == -1.25


def test_arms_difference_refuses_mismatches():
    with pytest.raises(ValueError, match="a has 4 items and b has 3"):
        arms_difference([1, 0, 2, 4], [0, 0, 1])
    with pytest.raises(ValueError, match="seed 1 has 3 prompts and seed 0 has 4"):
        arms_difference([[1, 0, 2, 4], [3, 0, 2]], [0, 0, 1, 1])
    with pytest.raises(ValueError, match="gain_b mixes numbers and per-seed lists"):
        arms_difference([1, 0, 2, 4], [[0, 0, 1, 1], 2])


# ----------------------------------------------------------------------------- z, verdicts, printing


def test_z_and_beyond_at_the_boundary():
    """value 1.0, SE 0.5: z = 2.0 exactly; |1.0| > 2 * 0.5 = 1.0 is false (strict), > 1.5 * 0.5 is true."""
    e = Estimate(1.0, 0.5, 4)
    assert e.z == 2.0
    assert not e.beyond() and e.verdict() == "within 2 SE (a null result)"
    assert e.beyond(1.5) and e.verdict(1.5) == "beyond 1.5 SE"
    assert Estimate(1.25, 0.5, 4).beyond() and Estimate(-1.25, 0.5, 4).beyond()  # 2.5 SE either way
    assert Estimate(-1.25, 0.5, 4).z == -2.5
    assert Estimate(1.0, 0.5, 4).verdict(3) == "within 3 SE (a null result)"


def test_z_with_a_zero_se():
    assert Estimate(1.0, 0.0, 3).z == math.inf and Estimate(-1.0, 0.0, 3).z == -math.inf
    assert Estimate(0.0, 0.0, 3).z == 0.0
    assert Estimate(1.0, 0.0, 3).beyond() and not Estimate(0.0, 0.0, 3).beyond()


def test_printing():
    """Signed value, SE to 3 decimals (or ``digits``), then |z| to one decimal: 0.159 / 0.024 = 6.625."""
    assert str(Estimate(0.159, 0.024, 10)) == "+0.159 ± 0.024 (6.6 SE)"
    assert str(Estimate(-0.159, 0.024, 10)) == "-0.159 ± 0.024 (6.6 SE)"
    assert Estimate(0.159, 0.024, 10).format(2) == "+0.16 ± 0.02 (6.6 SE)"
    assert Estimate(0.042, 0.012, 75).format(4) == "+0.0420 ± 0.0120 (3.5 SE)"
    assert f"{Estimate(1.0, 0.0, 3)}" == "+1.000 ± 0.000 (inf SE)"
    assert Estimate(2.0, math.nan, 1).format(1) == "+2.0 (n = 1, no SE)"
