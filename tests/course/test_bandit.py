"""The preference bandit: DPO's minimiser is the closed-form optimum of the KL-constrained objective."""

import math

import pytest
import torch

from dpo_lib.course import bandit as B
from dpo_lib.losses import dpo_loss


def make_problem(seed: int, K: int = 5):
    g = torch.Generator().manual_seed(seed)
    ref = torch.softmax(torch.randn(K, generator=g, dtype=torch.float64), -1)  # [K]
    rewards = 1.5 * torch.randn(K, generator=g, dtype=torch.float64)           # [K]
    return ref, rewards, g


def test_optimal_policy_is_eq4_and_maximises_eq3():
    ref, rewards, g = make_problem(0)
    beta = 0.7
    pi_star = B.optimal_policy(ref, rewards, beta)
    assert torch.isclose(pi_star.sum(), torch.tensor(1.0, dtype=torch.float64))
    # Eq. 4 written out directly
    unnorm = ref * torch.exp(rewards / beta)
    torch.testing.assert_close(pi_star, unnorm / unnorm.sum())
    # Eq. 3 at pi* equals beta * log Z and beats every other policy we try
    best = B.rlhf_objective(pi_star, ref, rewards, beta)
    torch.testing.assert_close(best, beta * B.log_partition(ref, rewards, beta))
    others = torch.softmax(torch.randn(200, len(ref), generator=g, dtype=torch.float64) * 2, -1)  # [200, K]
    assert (B.rlhf_objective(others, ref, rewards, beta) < best).all()
    near = torch.softmax(torch.log(pi_star) + 1e-3 * torch.randn(len(ref), generator=g, dtype=torch.float64), -1)
    assert B.rlhf_objective(near, ref, rewards, beta) < best


def test_kl_basics():
    p = torch.tensor([0.2, 0.8, 0.0])
    q = torch.tensor([0.5, 0.25, 0.25])
    assert B.kl(p, p).item() == pytest.approx(0.0, abs=1e-7)
    assert B.kl(p, q).item() == pytest.approx(0.2 * math.log(0.4) + 0.8 * math.log(3.2), rel=1e-6)


def test_implicit_reward_and_z_cancels():
    ref, rewards, _ = make_problem(1)
    beta = 0.3
    implicit = beta * torch.log(B.optimal_policy(ref, rewards, beta) / ref)  # Eq. 5 without beta log Z
    offset = implicit - rewards
    torch.testing.assert_close(offset, torch.full_like(offset, -beta * B.log_partition(ref, rewards, beta).item()))
    p_true = torch.sigmoid(rewards[:, None] - rewards[None, :])
    p_implicit = torch.sigmoid(implicit[:, None] - implicit[None, :])
    torch.testing.assert_close(p_true, p_implicit)


@pytest.mark.parametrize("proposal", ["uniform", "ref"])
def test_sampled_pairs_follow_bradley_terry(proposal):
    ref, rewards, g = make_problem(2, K=4)
    n = 100_000
    chosen, rejected = B.sample_preference_pairs(ref, rewards, n, g, proposal=proposal)
    assert chosen.shape == rejected.shape == (n,)
    assert (chosen != rejected).all()
    for i in range(4):
        for j in range(i + 1, 4):
            i_wins = ((chosen == i) & (rejected == j)).sum().item()
            j_wins = ((chosen == j) & (rejected == i)).sum().item()
            freq = i_wins / (i_wins + j_wins)
            assert freq == pytest.approx(torch.sigmoid(rewards[i] - rewards[j]).item(), abs=0.03)
    if proposal == "uniform":
        appearances = torch.bincount(torch.cat([chosen, rejected]), minlength=4) / (2 * n)
        torch.testing.assert_close(appearances, torch.full((4,), 0.25), atol=0.01, rtol=0)


def test_all_pairs_weights_are_a_distribution():
    _, rewards, _ = make_problem(3, K=6)
    chosen, rejected, weights = B.all_pairs_with_bt_weights(rewards)
    assert len(chosen) == 6 * 5 and (chosen != rejected).all()
    assert weights.sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize("seed,beta", [(0, 0.1), (1, 0.5), (2, 2.0)])
def test_exact_dpo_converges_to_closed_form(seed, beta):
    ref, rewards, _ = make_problem(seed)
    run = B.train_dpo_bandit_exact(ref, rewards, beta)
    assert run.losses[0] == pytest.approx(math.log(2), abs=1e-12)  # pi_theta = pi_ref at step 0
    assert B.kl(run.probs, B.optimal_policy(ref, rewards, beta)).item() < 1e-3
    assert run.losses[-1] < run.losses[0]


def test_sampled_dpo_approaches_optimum_with_more_pairs():
    ref, rewards, g = make_problem(4)
    beta = 0.5
    pi_star = B.optimal_policy(ref, rewards, beta)
    kls = [B.kl(B.train_dpo_bandit(ref, B.sample_preference_pairs(ref, rewards, n, g), beta).probs, pi_star).item()
           for n in (100, 200_000)]
    assert kls[1] < 2e-3
    assert kls[1] < kls[0]


def test_duplicate_pairs_equal_weights():
    ref, rewards, _ = make_problem(5, K=3)
    pairs = (torch.tensor([0, 0, 0, 1, 2]), torch.tensor([1, 1, 1, 2, 0]))
    by_count = B.train_dpo_bandit(ref, pairs, 0.5, steps=200)
    by_weight = B.train_dpo_bandit(ref, (torch.tensor([0, 1, 2]), torch.tensor([1, 2, 0])), 0.5, steps=200,
                                   weights=torch.tensor([3.0, 1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(by_count.probs, by_weight.probs)


def test_beta_sweep_higher_beta_stays_closer_to_reference():
    ref, rewards, _ = make_problem(6)
    betas = [0.2, 0.5, 1.0, 2.0, 5.0]
    kl_to_ref = [B.kl(B.train_dpo_bandit_exact(ref, rewards, b, steps=800).probs, ref).item() for b in betas]
    assert all(a > b for a, b in zip(kl_to_ref, kl_to_ref[1:])), kl_to_ref
    closed = [B.kl(B.optimal_policy(ref, rewards, b), ref).item() for b in torch.logspace(-1, 2, 50).tolist()]
    assert all(a > b for a, b in zip(closed, closed[1:]))


def test_grad_weight_matches_autograd():
    ref, rewards, g = make_problem(7)
    beta = 0.4
    K = len(ref)
    chosen, rejected = B.sample_preference_pairs(ref, rewards, 64, g)                    # [N]
    theta = (torch.log(ref) + torch.randn(K, generator=g, dtype=torch.float64)).requires_grad_(True)
    logp, log_ref = torch.log_softmax(theta, -1), torch.log(ref)                          # [K]
    args = (logp[chosen], logp[rejected], log_ref[chosen], log_ref[rejected])
    losses, _, _ = dpo_loss(*args, beta=beta)
    losses.mean().backward()
    w = B.dpo_grad_weight(*args, beta)                                                    # [N]
    assert ((w > 0) & (w < 1)).all()
    pi = torch.softmax(theta.detach(), -1)
    eye = torch.eye(K, dtype=torch.float64)
    formula = -beta * (w[:, None] * ((eye[chosen] - pi) - (eye[rejected] - pi))).mean(0)      # [K]
    torch.testing.assert_close(theta.grad, formula)  # the §4 gradient (unnumbered in the paper)
    # and per pair, on the log-probs themselves: d loss_i / d log pi(y_w) = -beta * w_i
    pc = args[0].detach().requires_grad_(True)
    dpo_loss(pc, args[1].detach(), args[2], args[3], beta=beta)[0].sum().backward()
    torch.testing.assert_close(pc.grad, -beta * w)


def test_custom_loss_fn_is_used():
    ref, rewards, _ = make_problem(8, K=3)
    calls = []

    def loss_fn(*logps, beta):
        calls.append(beta)
        return dpo_loss(*logps, beta=beta)

    run = B.train_dpo_bandit_exact(ref, rewards, 0.5, steps=5, loss_fn=loss_fn)
    assert calls == [0.5] * 5 and len(run.losses) == 5


def test_deterministic_preference_dpo_gap_grows_ipo_settles_at_one_over_two_beta():
    """Azar et al. 2023, Sec. 4.2: y_w always beats y_l. DPO's loss -log sigmoid(beta h) has no finite minimiser, so
    with a constant learning rate h keeps growing; IPO's (h - 1/(2 beta))^2 is minimised at h = 1/(2 beta) = 5."""
    ref = torch.tensor([0.05, 0.30, 0.25, 0.20, 0.12, 0.08], dtype=torch.float64)
    pairs = (torch.tensor([5]), torch.tensor([0]))
    gap = lambda thetas: (thetas[:, 5] - thetas[:, 0]) - (ref[5].log() - ref[0].log())   # (steps,)
    dpo = B.train_dpo_bandit(ref, pairs, 0.1, steps=1000, lr=0.05, schedule="constant", record=True)
    ipo = B.train_dpo_bandit(ref, pairs, 0.1, steps=1000, lr=0.05, schedule="constant", record=True, loss_type="ipo")
    h_dpo, h_ipo = gap(dpo.thetas), gap(ipo.thetas)
    assert dpo.thetas.shape == (1000, 6)
    assert h_dpo[999] > h_dpo[499] + 5 > h_dpo[99] + 5 > 10       # still climbing
    assert abs(h_ipo[999].item() - 5.0) < 1e-2 and abs(h_ipo[499].item() - 5.0) < 0.1
    assert B.train_dpo_bandit(ref, pairs, 0.1, steps=3).thetas is None
    with pytest.raises(ValueError, match="schedule"):
        B.train_dpo_bandit(ref, pairs, 0.1, steps=3, schedule="cosine")
