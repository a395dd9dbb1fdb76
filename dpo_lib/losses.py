r"""Preference losses on sequence log-probabilities.

Every loss here sees four ``[B]`` tensors of *summed* completion log-probabilities
(the paper's convention, see :mod:`dpo_lib.logprobs`): the policy's and the frozen
reference's, for the chosen response :math:`y_w` and the rejected one :math:`y_l`.

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

DPO + NLL (Pang et al. 2024, "Iterative Reasoning Preference Optimization", Eq. 1; TRL's
old ``rpo_alpha``) adds :math:`\alpha\,\text{NLL}(y_w)` with the NLL averaged over the
chosen tokens: see :func:`chosen_nll`; the trainer adds it with weight ``nll_weight``.

Rewards returned are :math:`\beta(\log\pi_\theta - \log\pi_\text{ref})`, detached:
they are metrics, not part of the graph. Accuracy is ``chosen_rewards > rejected_rewards``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dpo_lib.config import LOSS_TYPES  # one list, shared with the command line


def dpo_loss(
    policy_chosen_logps: torch.Tensor,    # (B,)
    policy_rejected_logps: torch.Tensor,  # (B,)
    ref_chosen_logps: torch.Tensor,       # (B,)
    ref_rejected_logps: torch.Tensor,     # (B,)
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example preference loss and implicit rewards.

    Returns ``(losses, chosen_rewards, rejected_rewards)``, each of shape ``[B]``.
    Take ``losses.mean()`` for the batch loss. See the module docstring for formulas.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {LOSS_TYPES}")

    chosen_logratios = policy_chosen_logps - ref_chosen_logps        # (B,)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # (B,)
    h = chosen_logratios - rejected_logratios                        # (B,)

    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:  # ipo
        losses = (h - 1 / (2 * beta)) ** 2

    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


def chosen_nll(policy_chosen_logps: torch.Tensor, chosen_num_tokens: torch.Tensor) -> torch.Tensor:
    """Per-example negative log-likelihood of the chosen response, averaged per token.

    ``policy_chosen_logps`` are summed log-probs ``[B]``; ``chosen_num_tokens`` the number
    of scored tokens ``[B]``. Used for the DPO + NLL objective (module docstring).
    """
    return -policy_chosen_logps / chosen_num_tokens.clamp(min=1).to(policy_chosen_logps.dtype)
