r"""The preference bandit: DPO where every quantity has a closed form.

A *bandit* here is a prompt-free language model that can say one of ``K`` canned responses.
Its policy is a softmax over logits :math:`\theta` (``[K]``), :math:`\pi_\theta=\mathrm{softmax}(\theta)`;
there is a frozen reference :math:`\pi_\text{ref}` and a known reward vector :math:`r` (``[K]``).
Equation numbers are those of Rafailov et al. 2023, "Direct Preference Optimization" (arXiv:2305.18290).
The paper writes a prompt :math:`x` in every term; the bandit has one prompt, so :math:`Z(x)` is one number
:math:`Z` here.

* Eq. 1, the Bradley–Terry model: :math:`p(y_1\succ y_2)=\sigma(r(y_1)-r(y_2))` (:func:`preference_prob`).

* Eq. 3, the KL-constrained RLHF objective:
  :math:`\max_\pi \mathbb{E}_{y\sim\pi}[r(y)] - \beta\,\mathrm{KL}(\pi\,\|\,\pi_\text{ref})`.
* Eq. 4, its maximiser: :math:`\pi^*(y) = \pi_\text{ref}(y)\exp(r(y)/\beta)/Z` (:func:`optimal_policy`).
* Eq. 5, the implicit reward: :math:`r(y) = \beta\log\frac{\pi^*(y)}{\pi_\text{ref}(y)} + \beta\log Z`.
* Eq. 6, Bradley–Terry written with the optimal policy (Eq. 5 put into Eq. 1): both replies answer the
  same prompt, so they carry the same :math:`\beta\log Z(x)`, which cancels in the difference.
* Eq. 7, the DPO loss (:func:`dpo_lib.losses.dpo_loss`) with
  :math:`\log\pi_\theta(y)=\theta_y-\mathrm{logsumexp}(\theta)`.
* its gradient (§4, "What does the DPO update do?"; the paper does not number it): each pair is weighted by
  :math:`\sigma(\hat r_l-\hat r_w)` (:func:`dpo_grad_weight`).

Why the DPO minimiser is :math:`\pi^*`. Write :math:`u_y=\beta\log\pi_\theta(y)/\pi_\text{ref}(y)`.
For a pair :math:`\{i, j\}` whose label follows Bradley–Terry, the expected loss
:math:`-\sigma(r_i-r_j)\log\sigma(u_i-u_j)-\sigma(r_j-r_i)\log\sigma(u_j-u_i)` is a cross-entropy,
minimal exactly when :math:`u_i-u_j=r_i-r_j`. Every pair is minimised by the same
:math:`u=r+c`, i.e. by :math:`\pi_\theta=\pi^*`, *whatever the distribution of the pairs*, as
long as the pairs that occur connect all ``K`` responses. A response that is never compared
gets no gradient (the loss only sees differences :math:`\theta_i-\theta_j`), so its logit is
not identified. We therefore sample the two responses of a pair **uniformly** among distinct
responses by default: every pair is compared equally often, even responses that
:math:`\pi_\text{ref}` rarely says. Sampling from :math:`\pi_\text{ref}` (``proposal="ref"``)
has the same minimiser in the limit of many pairs, but rare responses get few comparisons.

With finitely many sampled pairs, DPO finds the Bradley–Terry maximum-likelihood fit, which
approaches :math:`\pi^*` as the number of pairs grows (:func:`train_dpo_bandit`). To reach
:math:`\pi^*` to numerical precision, train on the *population* loss: all ordered pairs,
each weighted by its Bradley–Terry probability (:func:`train_dpo_bandit_exact`).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from dpo_lib.losses import dpo_loss

__all__ = [
    "all_pairs_with_bt_weights", "dpo_grad_weight", "kl", "log_partition", "optimal_policy", "rlhf_objective",
    "sample_preference_pairs", "train_dpo_bandit", "train_dpo_bandit_exact",
]


class BanditRun(NamedTuple):
    """Result of a bandit training run: ``probs, losses = train_dpo_bandit(...)``."""

    probs: torch.Tensor   # (K,) final policy pi_theta
    losses: list[float]   # batch loss at every step (before the update)
    theta: torch.Tensor   # (K,) final logits
    thetas: torch.Tensor | None = None  # (steps, K) the logits after every update, with record=True


def optimal_policy(ref_probs: torch.Tensor, rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """Eq. 4: ``pi*(y) = pi_ref(y) exp(r(y)/beta) / Z``, computed in log space. Returns ``[K]``."""
    return torch.softmax(torch.log(ref_probs) + rewards / beta, dim=-1)  # (K,)


def log_partition(ref_probs: torch.Tensor, rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """``log Z = log sum_y pi_ref(y) exp(r(y)/beta)`` (scalar). ``beta * log Z`` is the maximum of Eq. 3."""
    return torch.logsumexp(torch.log(ref_probs) + rewards / beta, dim=-1)


def rlhf_objective(probs: torch.Tensor, ref_probs: torch.Tensor, rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """Eq. 3 for the bandit: ``E_{y~pi}[r(y)] - beta * KL(pi || pi_ref)`` (scalar)."""
    return (probs * rewards).sum(-1) - beta * kl(probs, ref_probs)


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``KL(p || q) = sum_y p(y) log(p(y)/q(y))`` over the last dim; terms with ``p(y) = 0`` count 0."""
    terms = p * (torch.log(p) - torch.log(q))                      # (..., K)
    return torch.where(p > 0, terms, torch.zeros_like(terms)).sum(-1)


def preference_prob(rewards: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """Bradley–Terry (Eq. 1, with the true reward): ``p(y_i > y_j) = sigmoid(r_i - r_j)``."""
    return torch.sigmoid(rewards[i] - rewards[j])


def sample_preference_pairs(
    ref_probs: torch.Tensor,
    rewards: torch.Tensor,
    n: int,
    generator: torch.Generator | None = None,
    proposal: str = "uniform",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``n`` labelled pairs ``(chosen, rejected)``, two ``[n]`` index tensors.

    The two responses of a pair are distinct, drawn uniformly (``proposal="uniform"``, the
    default, see the module docstring) or from ``pi_ref`` without replacement
    (``proposal="ref"``). The label follows Bradley–Terry: ``a`` is chosen over ``b`` with
    probability ``sigmoid(r_a - r_b)``.
    """
    if proposal not in ("uniform", "ref"):
        raise ValueError(f"proposal must be 'uniform' or 'ref', got {proposal!r}")
    weights = torch.ones_like(ref_probs) if proposal == "uniform" else ref_probs
    ab = torch.multinomial(weights.expand(n, -1), 2, replacement=False, generator=generator)  # (n, 2)
    a, b = ab[:, 0], ab[:, 1]                                                                  # (n,), (n,)
    a_wins = torch.rand(n, generator=generator, dtype=rewards.dtype) < preference_prob(rewards, a, b)  # (n,)
    return torch.where(a_wins, a, b), torch.where(a_wins, b, a)


def all_pairs_with_bt_weights(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All ordered pairs ``i != j`` as ``(chosen, rejected, weights)``, each ``[K(K-1)]``.

    ``weights[k] = sigmoid(r_i - r_j) / (K(K-1)/2)``: the probability of drawing the pair
    uniformly *and* labelling it ``i > j``. They sum to 1, so the weighted DPO loss over these
    pairs is the exact expected (population) loss of uniform Bradley–Terry sampling.
    """
    K = rewards.shape[-1]
    i, j = torch.meshgrid(torch.arange(K), torch.arange(K), indexing="ij")  # (K, K) each
    off_diag = i != j
    chosen, rejected = i[off_diag], j[off_diag]                              # (K(K-1),)
    weights = preference_prob(rewards, chosen, rejected) / (K * (K - 1) / 2)  # (K(K-1),)
    return chosen, rejected, weights


def train_dpo_bandit(
    ref_probs: torch.Tensor,
    pairs: tuple[torch.Tensor, torch.Tensor],
    beta: float,
    steps: int = 1500,
    lr: float = 0.1,
    weights: torch.Tensor | None = None,
    loss_type: str = "sigmoid",
    loss_fn: Callable | None = None,
    schedule: str = "linear",
    record: bool = False,
) -> BanditRun:
    """Minimise the DPO loss (Eq. 7) over the bandit's logits, full batch, starting at ``pi_ref``.

    ``pairs`` is ``(chosen, rejected)``, two ``[N]`` index tensors. The loss only depends on how
    often each ordered pair occurs, so duplicates are merged into counts first (fast for
    large ``N``); ``weights`` (``[N]``) optionally weights the pairs instead. Optimiser: Adam
    with a learning rate decaying linearly to 0, which settles on the minimiser
    (``schedule="constant"`` keeps it fixed: a loss without a finite minimiser then shows that it has
    none, as DPO on a deterministic preference, Azar et al. 2023, Sec. 4.2). ``record=True`` keeps the
    logits after every update in ``thetas``.
    ``loss_fn`` replaces :func:`dpo_lib.losses.dpo_loss` (same signature and return), e.g.
    with a learner's own implementation.
    """
    chosen, rejected = pairs
    if weights is None:
        uniq, counts = torch.unique(torch.stack([chosen, rejected], 1), dim=0, return_counts=True)  # (M, 2), (M,)
        chosen, rejected = uniq[:, 0], uniq[:, 1]                                                  # (M,)
        weights = counts.to(ref_probs.dtype)
    weights = weights / weights.sum()                                   # (M,)
    log_ref = torch.log(ref_probs)                                      # (K,)
    theta = log_ref.clone().requires_grad_(True)                        # (K,) pi_theta = pi_ref at step 0
    if schedule not in ("linear", "constant"):
        raise ValueError(f"schedule must be 'linear' or 'constant', got {schedule!r}")
    opt = torch.optim.Adam([theta], lr=lr)
    decay = (lambda t: 1 - t / steps) if schedule == "linear" else (lambda t: 1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, decay)
    thetas = []
    loss_fn = loss_fn or (lambda *a, beta: dpo_loss(*a, beta=beta, loss_type=loss_type))
    losses = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tensors of a few elements: extra threads only add overhead (a lot, on a busy CPU)
    try:
        for _ in range(steps):
            logp = torch.log_softmax(theta, -1)                          # (K,) log pi_theta(y)
            per_pair, _, _ = loss_fn(logp[chosen], logp[rejected], log_ref[chosen], log_ref[rejected], beta=beta)
            loss = (weights * per_pair).sum()                            # per_pair: (M,)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            if record:
                thetas.append(theta.detach().clone())
    finally:
        torch.set_num_threads(threads)
    theta = theta.detach()
    return BanditRun(torch.softmax(theta, -1), losses, theta, torch.stack(thetas) if record else None)


def train_dpo_bandit_exact(
    ref_probs: torch.Tensor, rewards: torch.Tensor, beta: float, steps: int = 1500, lr: float = 0.1, **kwargs
) -> BanditRun:
    """DPO on the exact population loss (all pairs, Bradley–Terry label probabilities).

    Its minimiser is exactly :func:`optimal_policy`; see the module docstring.
    """
    chosen, rejected, weights = all_pairs_with_bt_weights(rewards)
    return train_dpo_bandit(ref_probs, (chosen, rejected), beta, steps=steps, lr=lr, weights=weights, **kwargs)


def dpo_grad_weight(
    policy_chosen_logps: torch.Tensor,    # (B,)
    policy_rejected_logps: torch.Tensor,  # (B,)
    ref_chosen_logps: torch.Tensor,       # (B,)
    ref_rejected_logps: torch.Tensor,     # (B,)
    beta: float,
) -> torch.Tensor:
    r"""The per-pair weight :math:`\sigma(\hat r_l - \hat r_w)` of the DPO gradient (paper §4, unnumbered): ``[B]``.

    The DPO gradient is
    :math:`\nabla\ell = -\beta\,\sigma(\hat r_l-\hat r_w)\,(\nabla\log\pi_\theta(y_w)-\nabla\log\pi_\theta(y_l))`:
    pairs the implicit reward model already orders correctly get a small weight.
    For the bandit, :math:`\nabla_\theta\log\pi_\theta(y) = e_y - \pi_\theta`.
    """
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)        # (B,)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)  # (B,)
    return torch.sigmoid(rejected_rewards - chosen_rewards).detach()
