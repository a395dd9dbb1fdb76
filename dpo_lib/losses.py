r"""Preference losses on sequence log-probabilities.

Every loss here sees four ``[B]`` tensors of *summed* completion log-probabilities
(the paper's convention, see :mod:`dpo_lib.logprobs`): the policy's and the frozen
reference's, for the chosen response :math:`y_w` and the rejected one :math:`y_l`. The
reference-free losses (``simpo``, ``orpo``) take only the policy's; those that use lengths
(``simpo``, ``orpo``, ``rdpo``) also take the completion token counts :math:`|y_w|, |y_l|`.

Notation. The implicit reward of DPO (Rafailov et al. 2023, Eq. 5) is

.. math::  \hat r_\theta(x, y) = \beta \log \frac{\pi_\theta(y|x)}{\pi_\text{ref}(y|x)}

and every loss is a function of the log-ratio difference

.. math::  h = \Big(\log\pi_\theta(y_w|x) - \log\pi_\text{ref}(y_w|x)\Big)
              - \Big(\log\pi_\theta(y_l|x) - \log\pi_\text{ref}(y_l|x)\Big)

so that :math:`\beta h = \hat r_\theta(x, y_w) - \hat r_\theta(x, y_l)`.

``sigmoid`` — DPO, Rafailov et al. 2023, Eq. 7:
    :math:`\ell = -\log\sigma(\beta h)`. At initialisation the policy equals the
    reference, :math:`h = 0` and :math:`\ell = \ln 2`. The gradient (Eq. 8) is
    :math:`-\beta\,\sigma(-\beta h)\,\nabla h`: each pair is weighted by how wrong the
    implicit reward model is, :math:`\sigma(\hat r_l - \hat r_w)`.

``sigmoid`` with ``label_smoothing = ε > 0`` — conservative DPO (cDPO, the paper
    authors' code and Mitchell 2023): the label is assumed flipped with probability ε,
    :math:`\ell = -(1-ε)\log\sigma(\beta h) - ε\log\sigma(-\beta h)`.
    Note that TRL 1.x ignores ``label_smoothing`` for ``sigmoid``; we keep the authors'.

``robust`` — Chowdhury et al. 2024 (rDPO), Eq. 8: an unbiased estimate of the clean loss
    under label-flip rate ε,
    :math:`\ell = \frac{(1-ε)(-\log\sigma(\beta h)) - ε(-\log\sigma(-\beta h))}{1-2ε}`.
    With ε = 0 it equals ``sigmoid``.

``hinge`` — SLiC (Zhao et al. 2023, Eq. 2 with δ = 1/β):
    :math:`\ell = \max(0, 1 - \beta h)`.

``ipo`` — Azar et al. 2023, Eq. 17, with τ = β:
    :math:`\ell = (h - \tfrac{1}{2\beta})^2`. On summed log-probs, as written in the
    paper; at initialisation :math:`\ell = 1/(4\beta^2)`. TRL 1.x divides each log-ratio by
    the completion length before squaring; call with per-token means
    (``sequence_logprobs(..., average=True)``) to get that variant.

``dpop`` — DPO-Positive, Pal et al. 2024 ("Smaug"), Eq. 3: DPO plus a penalty, inside the
    sigmoid and scaled by β like the rest, for every nat the chosen response falls below the
    reference,
    :math:`\ell = -\log\sigma\big(\beta\,[\,h - \lambda\max(0,\ \log\pi_\text{ref}(y_w|x)
    - \log\pi_\theta(y_w|x))\,]\big)` with λ = ``dpop_lambda``. DPO can raise
    :math:`h` while *lowering* :math:`\log\pi_\theta(y_w|x)` (both responses fall, the
    rejected one faster); the penalty removes that way out. While the chosen log-prob stays at
    or above the reference's, it equals ``sigmoid``.

``rdpo`` — length-regularised DPO (R-DPO), Park et al. 2024, "Disentangling Length from Quality
    in Direct Preference Optimization", Eq. 9:
    :math:`\ell = -\log\sigma\big(\beta h + \alpha(|y_w| - |y_l|)\big)` with α =
    ``rdpo_alpha`` and :math:`|y|` the number of completion tokens. The sign follows from the
    paper's derivation: it maximises :math:`r(x,y) - \alpha|y|` under the KL constraint, so
    :math:`r = \beta\log\frac{\pi_\theta}{\pi_\text{ref}} + \alpha|y| + \text{const}`
    and the Bradley-Terry logit gains :math:`+\alpha(|y_w| - |y_l|)`: the part of a preference
    that the length difference already explains no longer has to be learnt by the policy (a
    longer chosen response lowers the loss and the weight of its pair), so length stops paying.
    With α = 0 it equals ``sigmoid``.

Reference-free losses (no :math:`\pi_\text{ref}`: pass ``None`` for its log-probs; the trainer
never asks the reference for them). Both score a response by its length-normalised log-prob, the
per-token mean :math:`\bar\ell(y) = \frac{1}{|y|}\log\pi_\theta(y|x)`, computed here from the
summed log-probs and the token counts.

``simpo`` — SimPO, Meng et al. 2024, Eq. 6:
    :math:`\ell = -\log\sigma\big(\tfrac{\beta}{|y_w|}\log\pi_\theta(y_w|x)
    - \tfrac{\beta}{|y_l|}\log\pi_\theta(y_l|x) - \gamma\big)`, γ = ``simpo_gamma``
    (the target reward margin; 0.5 is TRL's ``CPOConfig.simpo_gamma``). β is the reward scale
    here, not a KL strength: the authors' training configs use β = 2 to 10 (with the DPO default
    0.1 every logit starts near -γ). With ``label_smoothing`` ε it is smoothed like cDPO, as TRL's ``CPOTrainer`` does.

``orpo`` — ORPO, Hong et al. 2024, Eqs. 6-7 (no β: the weight λ of the odds-ratio term is
    ``beta``, as in TRL's ``ORPOConfig.beta``):
    :math:`\ell = \text{NLL}(y_w) - \lambda\log\sigma\Big(\log\frac{\text{odds}(y_w)}
    {\text{odds}(y_l)}\Big)`, :math:`\text{odds}(y) = \frac{P}{1-P}`,
    :math:`P = e^{\bar\ell(y)}`, so :math:`\log\text{odds}(y) = \bar\ell(y) -
    \log(1 - e^{\bar\ell(y)})`, computed in float32 with the stable
    :math:`\log(1-e^x)` of TRL's ``odds_ratio_loss`` (``log1p(-exp(x))`` below :math:`-\ln 2`,
    ``log(-expm1(x))`` above). :math:`\text{NLL}(y_w) = -\bar\ell(y_w)` per pair (the paper's
    :math:`\mathcal L_\text{SFT}`, over the chosen *completion* tokens); TRL instead takes one
    cross-entropy over every token of the batch's chosen sequences, prompt included, so only the
    odds-ratio term is compared with TRL. ORPO already holds its NLL: ``nll_weight`` must stay 0,
    and ``label_smoothing`` does not apply to it.

DPO + NLL (Pang et al. 2024, "Iterative Reasoning Preference Optimization", Eq. 1; TRL's
old ``rpo_alpha``) adds :math:`\alpha\,\text{NLL}(y_w)` with the NLL averaged over the
chosen tokens: see :func:`chosen_nll`; the trainer adds it with weight ``nll_weight``.

Rewards returned are :math:`\beta(\log\pi_\theta - \log\pi_\text{ref})`, detached:
they are metrics, not part of the graph. Accuracy is ``chosen_rewards > rejected_rewards``.
For the reference-free losses there is no log-ratio: the rewards are :math:`\beta\bar\ell(y)`,
β times the per-token mean log-prob (what TRL's ``CPOTrainer`` and ``ORPOTrainer`` log), so
their accuracy is "the chosen response has the higher mean log-prob".

TRL 1.16 implements SimPO (``CPOTrainer.cpo_loss``, ``loss_type="simpo"``) and ORPO's odds-ratio
term (``ORPOTrainer.odds_ratio_loss``); ``tests/test_trl_parity.py`` checks both against them.
It implements neither DPOP nor R-DPO (its only length option is LD-DPO's ``ld_alpha``, a
different method), so those two are tested against hand arithmetic only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# one list of each, shared with the command line
from dpo_lib.config import LENGTH_LOSSES, LOSS_TYPES, REFERENCE_FREE_LOSSES


def needs_reference(loss_type: str) -> bool:
    """Whether ``loss_type`` uses the reference log-probs (all but ``simpo`` and ``orpo``)."""
    return loss_type not in REFERENCE_FREE_LOSSES


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    r""":math:`\log(1 - e^x)` for ``x <= 0``, without cancellation: ``log1p(-exp(x))`` for
    ``x < -ln 2``, ``log(-expm1(x))`` above (Mächler 2012; TRL's ``odds_ratio_loss`` uses the same)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def dpo_loss(
    policy_chosen_logps: torch.Tensor,           # (B,)
    policy_rejected_logps: torch.Tensor,         # (B,)
    ref_chosen_logps: torch.Tensor | None = None,    # (B,); None for reference-free losses
    ref_rejected_logps: torch.Tensor | None = None,  # (B,)
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    *,
    chosen_num_tokens: torch.Tensor | None = None,    # (B,) |y_w|: simpo, orpo, rdpo
    rejected_num_tokens: torch.Tensor | None = None,  # (B,) |y_l|
    simpo_gamma: float = 0.5,
    dpop_lambda: float = 50.0,
    rdpo_alpha: float = 0.05,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example preference loss and implicit rewards.

    Returns ``(losses, chosen_rewards, rejected_rewards)``, each of shape ``[B]``.
    Take ``losses.mean()`` for the batch loss. See the module docstring for formulas.
    ``simpo_gamma``, ``dpop_lambda`` and ``rdpo_alpha`` are read only by their loss.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {LOSS_TYPES}")
    for name, value in (("simpo_gamma", simpo_gamma), ("dpop_lambda", dpop_lambda), ("rdpo_alpha", rdpo_alpha)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if needs_reference(loss_type) and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise ValueError(f"loss_type {loss_type!r} needs the reference log-probs (ref_chosen_logps, "
                         "ref_rejected_logps); simpo and orpo are the reference-free ones")
    if loss_type in LENGTH_LOSSES and (chosen_num_tokens is None or rejected_num_tokens is None):
        raise ValueError(f"loss_type {loss_type!r} needs chosen_num_tokens and rejected_num_tokens")
    if loss_type == "orpo" and label_smoothing:
        raise ValueError("label_smoothing does not apply to orpo")

    eps = label_smoothing
    if not needs_reference(loss_type):
        return _reference_free_loss(policy_chosen_logps, policy_rejected_logps, chosen_num_tokens,
                                    rejected_num_tokens, beta, loss_type, eps, simpo_gamma)

    chosen_logratios = policy_chosen_logps - ref_chosen_logps        # (B,)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # (B,)
    h = chosen_logratios - rejected_logratios                        # (B,)

    if loss_type == "sigmoid":
        losses = _smoothed_logistic_loss(beta * h, eps)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:  # dpop, rdpo: DPO with a changed logit, smoothed like cDPO when eps > 0
        if loss_type == "dpop":
            z = beta * (h - dpop_lambda * torch.relu(ref_chosen_logps - policy_chosen_logps))
        else:  # rdpo
            length_gap = (chosen_num_tokens - rejected_num_tokens).to(h.dtype)   # |y_w| - |y_l|
            z = beta * h + rdpo_alpha * length_gap
        losses = _smoothed_logistic_loss(z, eps)

    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


def _smoothed_logistic_loss(z: torch.Tensor, eps: float) -> torch.Tensor:
    r""":math:`-(1-ε)\log\sigma(z) - ε\log\sigma(-z)`: the logistic loss of DPO, SimPO, DPOP and R-DPO on
    their logit ``z``, with cDPO's label smoothing ε (ε = 0: plain :math:`-\log\sigma(z)`)."""
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def _reference_free_loss(chosen, rejected, n_chosen, n_rejected, beta, loss_type, eps, gamma):
    """``simpo`` and ``orpo`` (module docstring), on per-token mean log-probs."""
    chosen_mean = chosen / n_chosen.clamp(min=1).to(chosen.dtype)          # (B,) mean log-prob of y_w
    rejected_mean = rejected / n_rejected.clamp(min=1).to(rejected.dtype)  # (B,)
    if loss_type == "simpo":
        losses = _smoothed_logistic_loss(beta * (chosen_mean - rejected_mean) - gamma, eps)
    else:  # orpo, in float32 as TRL computes it
        c, r = chosen_mean.float(), rejected_mean.float()
        log_odds = (c - r) - (log1mexp(c) - log1mexp(r))                  # log odds(y_w) - log odds(y_l)
        losses = -c - beta * F.logsigmoid(log_odds)                      # NLL(y_w) - λ log σ(log odds ratio)
    return losses, beta * chosen_mean.detach(), beta * rejected_mean.detach()


def chosen_nll(policy_chosen_logps: torch.Tensor, chosen_num_tokens: torch.Tensor) -> torch.Tensor:
    """Per-example negative log-likelihood of the chosen response, averaged per token.

    ``policy_chosen_logps`` are summed log-probs ``[B]``; ``chosen_num_tokens`` the number
    of scored tokens ``[B]``. Used for the DPO + NLL objective (module docstring).
    """
    return -policy_chosen_logps / chosen_num_tokens.clamp(min=1).to(policy_chosen_logps.dtype)
