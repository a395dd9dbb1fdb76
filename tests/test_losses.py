"""Closed-form checks of :mod:`dpo_lib.losses`.

SimPO and ORPO are also compared with TRL 1.16's own formulas in ``tests/test_trl_parity.py``.
TRL 1.16 implements neither DPOP (Pal et al. 2024) nor R-DPO (Park et al. 2024), so the tests of
those two below check them against hand arithmetic only, written out in each test's docstring.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from dpo_lib.losses import LOSS_TYPES, chosen_nll, dpo_loss, log1mexp, needs_reference


def rand_logps(B=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [-(torch.rand(B, generator=g) * 50 + 1) for _ in range(4)]


@pytest.mark.parametrize("beta", [0.01, 0.1, 0.5, 2.0])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_sigmoid_is_ln2_when_policy_equals_reference(beta, eps):
    pc, pr, _, _ = rand_logps()
    losses, rc, rr = dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=beta, label_smoothing=eps)
    assert torch.allclose(losses, torch.full_like(losses, math.log(2)), atol=1e-6)
    assert torch.count_nonzero(rc) == 0 and torch.count_nonzero(rr) == 0


@pytest.mark.parametrize("beta", [0.05, 0.1, 0.5, 1.0])
def test_ipo_at_init_is_one_over_four_beta_squared_on_summed_logps(beta):
    pc, pr, _, _ = rand_logps()
    losses, _, _ = dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=beta, loss_type="ipo")
    assert torch.allclose(losses, torch.full_like(losses, 1 / (4 * beta ** 2)), rtol=1e-6)


def test_hinge_at_init_is_one_and_zero_past_margin():
    pc, pr, rc, rr = rand_logps()
    losses, _, _ = dpo_loss(pc, pr, pc, pr, beta=0.1, loss_type="hinge")
    assert torch.allclose(losses, torch.ones_like(losses))
    # h = 20, beta*h = 2 > 1: no loss
    losses, _, _ = dpo_loss(pc + 20, pr, pc, pr, beta=0.1, loss_type="hinge")
    assert torch.count_nonzero(losses) == 0


def test_closed_form_value_and_rewards_include_beta():
    pc, pr, rc, rr = rand_logps()
    beta = 0.3
    losses, r_c, r_r = dpo_loss(pc, pr, rc, rr, beta=beta)
    h = (pc - rc) - (pr - rr)
    assert torch.allclose(losses, torch.log1p(torch.exp(-beta * h)), atol=1e-5)
    assert torch.allclose(r_c, beta * (pc - rc)) and torch.allclose(r_r, beta * (pr - rr))


def test_gradient_sign_and_size():
    """The DPO gradient (paper §4, unnumbered): d loss / d log pi(y_w) = -beta * sigma(r_l - r_w),
    d / d log pi(y_l) = +beta * sigma(r_l - r_w)."""
    pc, pr, rc, rr = rand_logps(seed=3)
    pc.requires_grad_(True), pr.requires_grad_(True)
    beta = 0.2
    losses, r_c, r_r = dpo_loss(pc, pr, rc, rr, beta=beta)
    losses.sum().backward()
    weight = torch.sigmoid(r_r - r_c)
    assert torch.allclose(pc.grad, -beta * weight, atol=1e-6)
    assert torch.allclose(pr.grad, beta * weight, atol=1e-6)
    assert (pc.grad < 0).all() and (pr.grad > 0).all()  # descent raises chosen, lowers rejected


def test_rewards_are_detached():
    pc, pr, rc, rr = rand_logps()
    pc.requires_grad_(True)
    _, r_c, _ = dpo_loss(pc, pr, rc, rr)
    assert not r_c.requires_grad


def test_conservative_dpo_formula():
    pc, pr, rc, rr = rand_logps(seed=5)
    beta, eps = 0.1, 0.2
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    z = beta * ((pc - rc) - (pr - rr))
    expected = -(1 - eps) * torch.nn.functional.logsigmoid(z) - eps * torch.nn.functional.logsigmoid(-z)
    assert torch.allclose(losses, expected, atol=1e-6)


def test_robust_dpo_is_unbiased_under_label_flips():
    """rDPO: E over a flip with prob eps of the robust loss equals the clean DPO loss."""
    pc, pr, rc, rr = rand_logps(seed=7)
    beta, eps = 0.1, 0.25
    rob, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="robust", label_smoothing=eps)
    rob_flipped, _, _ = dpo_loss(pr, pc, rr, rc, beta=beta, loss_type="robust", label_smoothing=eps)
    clean, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta)
    assert torch.allclose((1 - eps) * rob + eps * rob_flipped, clean, atol=1e-5)
    rob0, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="robust")
    assert torch.allclose(rob0, clean)


def test_higher_beta_means_stronger_pull_at_same_logratio():
    """Same log-ratio gap h: the loss is steeper in beta*h, so a small h is 'enough' only for large beta."""
    pc, pr, rc, rr = rand_logps()
    small, _, _ = dpo_loss(pc + 1, pr, pc, pr, beta=0.1)
    large, _, _ = dpo_loss(pc + 1, pr, pc, pr, beta=1.0)
    assert (large < small).all()


def test_chosen_nll_is_per_token_mean():
    logps = torch.tensor([-10.0, -3.0])
    n = torch.tensor([5, 3])
    assert torch.allclose(chosen_nll(logps, n), torch.tensor([2.0, 1.0]))


def counts(*n):
    return torch.tensor(n, dtype=torch.long)


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_default_sigmoid_path_is_bitwise_the_formula_it_always_was(eps):
    """Adding losses must not move the default by one ulp: DPO's exact expression, compared with torch.equal,
    with and without the new keyword arguments (which sigmoid does not read)."""
    pc, pr, rc, rr = rand_logps(seed=11)
    beta = 0.1
    h = (pc - rc) - (pr - rr)
    expected = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    for extra in ({}, {"chosen_num_tokens": counts(*[3] * 8), "rejected_num_tokens": counts(*[5] * 8),
                       "simpo_gamma": 1.0, "dpop_lambda": 7.0, "rdpo_alpha": 0.3}):
        losses, r_c, r_r = dpo_loss(pc, pr, rc, rr, beta, "sigmoid", eps, **extra)
        assert torch.equal(losses, expected)
        assert torch.equal(r_c, beta * (pc - rc)) and torch.equal(r_r, beta * (pr - rr))


# ---------------------------------------------------------------- SimPO (Meng et al. 2024, Eq. 6)

def test_simpo_closed_form_without_a_reference():
    """log pi(y_w) = -6 over 3 tokens (mean -2), log pi(y_l) = -12 over 4 tokens (mean -3), beta = 2, gamma = 0.5:
    z = 2*(-2) - 2*(-3) - 0.5 = 1.5, loss = -log sigma(1.5) = log(1 + e^-1.5) = 0.201413;
    rewards = beta * mean log-prob = -4 and -6."""
    losses, r_c, r_r = dpo_loss(torch.tensor([-6.0]), torch.tensor([-12.0]), None, None, beta=2.0,
                                loss_type="simpo", chosen_num_tokens=counts(3), rejected_num_tokens=counts(4),
                                simpo_gamma=0.5)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-1.5)), abs=1e-6)
    assert losses.item() == pytest.approx(0.201413, abs=1e-6)
    assert r_c.item() == pytest.approx(-4.0) and r_r.item() == pytest.approx(-6.0)


def test_simpo_is_length_normalised_and_ignores_any_reference():
    """Doubling a response (twice the tokens, twice the summed log-prob) leaves its mean, and so the loss, unchanged;
    unlike DPO. Reference log-probs, if passed, are not read."""
    pc, pr, rc, rr = rand_logps(seed=2)
    nc, nr = counts(*range(3, 11)), counts(*range(12, 4, -1))
    kw = dict(beta=2.0, loss_type="simpo", simpo_gamma=0.5)
    base, _, _ = dpo_loss(pc, pr, None, None, chosen_num_tokens=nc, rejected_num_tokens=nr, **kw)
    doubled, _, _ = dpo_loss(2 * pc, pr, None, None, chosen_num_tokens=2 * nc, rejected_num_tokens=nr, **kw)
    with_ref, _, _ = dpo_loss(pc, pr, rc, rr, chosen_num_tokens=nc, rejected_num_tokens=nr, **kw)
    assert torch.allclose(base, doubled, atol=1e-6)
    assert torch.equal(base, with_ref)
    z = 2.0 * (pc / nc - pr / nr) - 0.5
    assert torch.allclose(base, F.softplus(-z), atol=1e-6)


def test_simpo_label_smoothing_is_the_cdpo_form_on_its_logit():
    """eps = 0.1, same pair as the closed-form case (z = 1.5): loss = 0.9*softplus(-1.5) + 0.1*softplus(1.5)."""
    losses, _, _ = dpo_loss(torch.tensor([-6.0]), torch.tensor([-12.0]), beta=2.0, loss_type="simpo",
                            label_smoothing=0.1, chosen_num_tokens=counts(3), rejected_num_tokens=counts(4))
    expected = 0.9 * math.log1p(math.exp(-1.5)) + 0.1 * math.log1p(math.exp(1.5))
    assert losses.item() == pytest.approx(expected, abs=1e-6)


# ---------------------------------------------------------------- ORPO (Hong et al. 2024, Eqs. 6-7)

def test_orpo_closed_form():
    """Chosen: 3 tokens of prob 1/2 (mean log-prob ln 0.5, P = 0.5, odds 1); rejected: 2 tokens of prob 0.2
    (P = 0.2, odds 0.25). log odds ratio = ln(1 / 0.25) = ln 4; log sigma(ln 4) = ln(4/5).
    With lambda = beta = 0.1: loss = NLL - lambda*log sigma = ln 2 - 0.1*ln 0.8 = 0.693147 + 0.022314 = 0.715461.
    Rewards: beta * mean log-prob = 0.1 ln 0.5 and 0.1 ln 0.2."""
    pc, pr = torch.tensor([3 * math.log(0.5)]), torch.tensor([2 * math.log(0.2)])
    losses, r_c, r_r = dpo_loss(pc, pr, beta=0.1, loss_type="orpo", chosen_num_tokens=counts(3),
                                rejected_num_tokens=counts(2))
    assert losses.item() == pytest.approx(math.log(2) - 0.1 * math.log(0.8), abs=1e-6)
    assert losses.item() == pytest.approx(0.715461, abs=1e-6)
    assert r_c.item() == pytest.approx(0.1 * math.log(0.5), abs=1e-7)
    assert r_r.item() == pytest.approx(0.1 * math.log(0.2), abs=1e-7)


def test_orpo_is_nll_plus_weighted_odds_ratio_term():
    """loss - chosen_nll = -lambda * log sigma(log odds ratio): linear in lambda, zero at the limit lambda -> 0."""
    pc, pr, _, _ = rand_logps(seed=4)
    nc, nr = counts(*range(10, 18)), counts(*range(20, 12, -1))
    kw = dict(loss_type="orpo", chosen_num_tokens=nc, rejected_num_tokens=nr)
    nll = chosen_nll(pc, nc)
    term1 = dpo_loss(pc, pr, beta=1.0, **kw)[0] - nll
    term3 = dpo_loss(pc, pr, beta=3.0, **kw)[0] - nll
    assert (term1 > 0).all() and torch.allclose(term3, 3 * term1, atol=1e-5)
    c, r = pc / nc, pr / nr
    log_odds = (c - r) - (torch.log(1 - torch.exp(c)) - torch.log(1 - torch.exp(r)))
    assert torch.allclose(term1, -F.logsigmoid(log_odds), atol=1e-5)


@pytest.mark.parametrize("x", [-1e-6, -1e-3, -0.5, -0.6931, -0.6932, -1.0, -5.0, -30.0])
def test_log1mexp_matches_float64_on_both_branches(x):
    """log(1 - e^x) in float32 against the float64 value (log(-expm1(x)), exact to the last bit there)."""
    got = log1mexp(torch.tensor([x], dtype=torch.float32)).item()
    assert got == pytest.approx(math.log(-math.expm1(x)), rel=1e-6)


# ---------------------------------------------------------------- DPOP (Pal et al. 2024, Eq. 3)

def test_dpop_equals_dpo_while_the_chosen_stays_above_the_reference():
    """max(0, log pi_ref(y_w) - log pi(y_w)) = 0 for every pair: z = beta*(h - lambda*0) is beta*h bit for bit."""
    pc, pr, rc, rr = rand_logps(seed=6)
    rc = torch.minimum(rc, pc - 0.5)           # the policy's chosen log-prob is above the reference's
    dpop, r_c, r_r = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="dpop", dpop_lambda=50.0)
    dpo, d_c, d_r = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert torch.equal(dpop, dpo) and torch.equal(r_c, d_c) and torch.equal(r_r, d_r)


def test_dpop_closed_form_value_and_gradient_when_the_chosen_falls_below_the_reference():
    """log pi(y_w) = -10, log pi_ref(y_w) = -8 (penalty 2); log pi(y_l) = -20, log pi_ref(y_l) = -15.
    h = (-10+8) - (-20+15) = -2 + 5 = 3 (DPO alone: loss softplus(-0.3) = 0.554355).
    beta = 0.1, lambda = 50: z = 0.1*(3 - 50*2) = -9.7, loss = softplus(9.7) = 9.700061.
    Gradients: d/d log pi(y_w) = -beta*(1 + lambda)*sigma(-z) = -5.1*sigma(9.7); d/d log pi(y_l) = +0.1*sigma(9.7).
    Rewards are DPO's: beta*(-2) = -0.2 and beta*(-5) = -0.5."""
    pc, pr = torch.tensor([-10.0], requires_grad=True), torch.tensor([-20.0], requires_grad=True)
    losses, r_c, r_r = dpo_loss(pc, pr, torch.tensor([-8.0]), torch.tensor([-15.0]), beta=0.1, loss_type="dpop",
                                dpop_lambda=50.0)
    assert losses.item() == pytest.approx(math.log1p(math.exp(9.7)), abs=1e-5)
    assert losses.item() == pytest.approx(9.700061, abs=1e-5)
    losses.sum().backward()
    s = 1 / (1 + math.exp(-9.7))
    assert pc.grad.item() == pytest.approx(-0.1 * 51 * s, rel=1e-5)
    assert pr.grad.item() == pytest.approx(0.1 * s, rel=1e-5)
    assert r_c.item() == pytest.approx(-0.2) and r_r.item() == pytest.approx(-0.5)


# ---------------------------------------------------------------- R-DPO (Park et al. 2024, Eq. 9)

def test_rdpo_closed_form_and_sign_of_the_length_term():
    """h = 1 (log-ratios +0.5 and -0.5), beta = 0.5, alpha = 0.1, |y_w| = 12, |y_l| = 7:
    z = 0.5*1 + 0.1*(12 - 7) = 1.0, loss = softplus(-1) = 0.313262.
    Swapping the lengths (|y_w| = 7, |y_l| = 12): z = 0.5 - 0.5 = 0, loss = ln 2.
    A longer chosen response explains part of the preference, so its pair costs less than in DPO
    (softplus(-0.5) = 0.474077); a shorter one costs more."""
    pc, pr, rc, rr = torch.tensor([-9.5]), torch.tensor([-10.5]), torch.tensor([-10.0]), torch.tensor([-10.0])
    kw = dict(beta=0.5, loss_type="rdpo", rdpo_alpha=0.1)
    longer, r_c, r_r = dpo_loss(pc, pr, rc, rr, chosen_num_tokens=counts(12), rejected_num_tokens=counts(7), **kw)
    shorter, _, _ = dpo_loss(pc, pr, rc, rr, chosen_num_tokens=counts(7), rejected_num_tokens=counts(12), **kw)
    dpo, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert longer.item() == pytest.approx(math.log1p(math.exp(-1.0)), abs=1e-6)
    assert longer.item() == pytest.approx(0.313262, abs=1e-6)
    assert shorter.item() == pytest.approx(math.log(2), abs=1e-6)
    assert dpo.item() == pytest.approx(0.474077, abs=1e-6)
    assert longer.item() < dpo.item() < shorter.item()
    assert r_c.item() == pytest.approx(0.25) and r_r.item() == pytest.approx(-0.25)


def test_rdpo_with_alpha_zero_or_equal_lengths_is_dpo():
    pc, pr, rc, rr = rand_logps(seed=8)
    n = counts(*range(4, 12))
    dpo, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.2)
    same_length, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.2, loss_type="rdpo", rdpo_alpha=0.3,
                                 chosen_num_tokens=n, rejected_num_tokens=n)
    no_alpha, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.2, loss_type="rdpo", rdpo_alpha=0.0,
                              chosen_num_tokens=n, rejected_num_tokens=n.flip(0))
    assert torch.allclose(same_length, dpo, atol=1e-7) and torch.allclose(no_alpha, dpo, atol=1e-7)


@pytest.mark.parametrize("loss_type", ["dpop", "rdpo"])
def test_dpop_and_rdpo_label_smoothing_is_the_cdpo_form_on_their_logit(loss_type):
    """Same pairs with eps = 0 and eps = 0.2: with z the eps = 0 logit (recovered as -log(e^loss - 1)),
    the smoothed loss is 0.8*softplus(-z) + 0.2*softplus(z)."""
    pc, pr, rc, rr = rand_logps(seed=9)
    kw = dict(beta=0.1, loss_type=loss_type, chosen_num_tokens=counts(*range(5, 13)),
              rejected_num_tokens=counts(*range(9, 1, -1)), dpop_lambda=2.0, rdpo_alpha=0.1)
    plain, _, _ = dpo_loss(pc.double(), pr.double(), rc.double(), rr.double(), **kw)
    smoothed, _, _ = dpo_loss(pc.double(), pr.double(), rc.double(), rr.double(), label_smoothing=0.2, **kw)
    z = -torch.log(torch.expm1(plain))
    assert torch.allclose(smoothed, 0.8 * F.softplus(-z) + 0.2 * F.softplus(z), atol=1e-9)


# ---------------------------------------------------------------- what each loss needs

def test_reference_free_losses_are_simpo_and_orpo():
    assert [t for t in LOSS_TYPES if not needs_reference(t)] == ["simpo", "orpo"]


@pytest.mark.parametrize("kwargs", [{"beta": 0}, {"loss_type": "kto"}, {"label_smoothing": 0.5},
                                    {"simpo_gamma": -0.1}, {"dpop_lambda": -1.0}, {"rdpo_alpha": -0.01}])
def test_bad_arguments_raise(kwargs):
    pc, pr, rc, rr = rand_logps()
    with pytest.raises(ValueError):
        dpo_loss(pc, pr, rc, rr, **kwargs)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust", "dpop", "rdpo"])
def test_losses_with_a_reference_refuse_to_run_without_it(loss_type):
    pc, pr, _, _ = rand_logps()
    n = counts(*[4] * 8)
    with pytest.raises(ValueError, match="needs the reference log-probs"):
        dpo_loss(pc, pr, loss_type=loss_type, chosen_num_tokens=n, rejected_num_tokens=n)


@pytest.mark.parametrize("loss_type", ["simpo", "orpo", "rdpo"])
def test_length_losses_refuse_to_run_without_token_counts(loss_type):
    pc, pr, rc, rr = rand_logps()
    with pytest.raises(ValueError, match="needs chosen_num_tokens and rejected_num_tokens"):
        dpo_loss(pc, pr, rc, rr, loss_type=loss_type, chosen_num_tokens=counts(*[4] * 8))


def test_orpo_refuses_label_smoothing():
    pc, pr, _, _ = rand_logps()
    n = counts(*[4] * 8)
    with pytest.raises(ValueError, match="does not apply to orpo"):
        dpo_loss(pc, pr, loss_type="orpo", label_smoothing=0.1, chosen_num_tokens=n, rejected_num_tokens=n)
