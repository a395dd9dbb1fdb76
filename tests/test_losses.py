import math

import pytest
import torch

from dpo_lib.losses import chosen_nll, dpo_loss


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
    """Eq. 8: d loss / d log pi(y_w) = -beta * sigma(r_l - r_w), d / d log pi(y_l) = +beta * sigma(r_l - r_w)."""
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


@pytest.mark.parametrize("kwargs", [{"beta": 0}, {"loss_type": "kto"}, {"label_smoothing": 0.5}])
def test_bad_arguments_raise(kwargs):
    pc, pr, rc, rr = rand_logps()
    with pytest.raises(ValueError):
        dpo_loss(pc, pr, rc, rr, **kwargs)
