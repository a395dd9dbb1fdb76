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

Each loss's formula, with the paper's equation number, is on its function below; the
reference-free ones (``simpo``, ``orpo``) score a response by its length-normalised log-prob,
the per-token mean :math:`\bar\ell(y) = \frac{1}{|y|}\log\pi_\theta(y|x)`, computed from the summed
log-probs and the token counts. Label smoothing ε (cDPO) applies to the logistic losses.

DPO + NLL (Pang et al. 2024, "Iterative Reasoning Preference Optimization", Eq. 1; TRL's
old ``rpo_alpha``) adds :math:`\alpha\,\text{NLL}(y_w)` with the NLL averaged over the
chosen tokens: see :func:`chosen_nll`; the trainer adds it with weight ``nll_weight``.

Rewards returned are :math:`\beta(\log\pi_\theta - \log\pi_\text{ref})`, detached:
they are metrics, not part of the graph. Accuracy is ``chosen_rewards > rejected_rewards``.
For the reference-free losses there is no log-ratio: the rewards are :math:`\beta\bar\ell(y)`,
β times the per-token mean log-prob (what TRL's ``CPOTrainer`` and ``ORPOTrainer`` log), so
their accuracy is "the chosen response has the higher mean log-prob".

The registry. Each loss is one function decorated with :func:`register`, which records in
:data:`LOSSES` its name, its own parameters (default, help, check: they become ``TrainConfig``
fields and ``--flags``), and whether it needs the reference and the completion lengths. The
command line's ``--loss-type`` choices and per-loss flags, the trainer's call
(:func:`loss_params`) and the job's "skip the reference pass" (:func:`needs_reference`) are all
read from it. Adding a loss is one function, one ``@register`` line in this module and its tests
(``TrainConfig``'s fields and the derived tuples are made when this module is imported, so a loss
registered later from outside can be called through :func:`dpo_loss` with its default parameters
but is not a ``TrainConfig`` choice).

This module loads torch only when a loss is computed, so the command line can read the registry
and reject a bad flag without it.

TRL 1.16 implements SimPO (``CPOTrainer.cpo_loss``, ``loss_type="simpo"``) and ORPO's odds-ratio
term (``ORPOTrainer.odds_ratio_loss``); ``tests/test_trl_parity.py`` checks both against them.
It implements neither DPOP nor R-DPO (its only length option is LD-DPO's ``ld_alpha``, a
different method), so those two are tested against hand arithmetic only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from dpo_lib.settings import at_least

if TYPE_CHECKING:
    import torch

__all__ = ["LOSSES", "LOSS_TYPES", "LENGTH_LOSSES", "REFERENCE_FREE_LOSSES", "Loss", "LossInputs", "Param",
           "chosen_nll", "dpo_loss", "log1mexp", "loss_params", "needs_reference", "register"]


# ----------------------------------------------------------------------------- the registry

@dataclass(frozen=True)
class Param:
    """A loss's own setting: it becomes a ``TrainConfig`` field and a ``--flag`` of the same name."""
    default: float
    help: str
    check: Callable = at_least(0.0)


@dataclass(frozen=True)
class Loss:
    """One preference loss: its function ``fn(inputs, beta, eps, **params) -> losses [B]`` and what it needs."""
    name: str
    fn: Callable
    help: str
    needs_reference: bool = True     # reads the reference log-probs (False: simpo, orpo)
    needs_lengths: bool = False      # reads the completion token counts |y_w|, |y_l|
    smoothing: bool = True           # accepts label_smoothing ε (orpo does not)
    holds_nll: bool = False          # holds the chosen NLL already, so nll_weight must stay 0 (orpo)
    params: dict[str, Param] = field(default_factory=dict)


LOSSES: dict[str, Loss] = {}


def register(name: str, help: str, *, needs_reference: bool = True, needs_lengths: bool = False,
             smoothing: bool = True, holds_nll: bool = False, **params: Param) -> Callable:
    """Decorator: add the function to :data:`LOSSES` under ``name`` (the order of registration is
    the order of the ``--loss-type`` choices)."""
    def add(fn: Callable) -> Callable:
        LOSSES[name] = Loss(name, fn, help, needs_reference, needs_lengths, smoothing, holds_nll, dict(params))
        return fn
    return add


def needs_reference(loss_type: str) -> bool:
    """Whether ``loss_type`` uses the reference log-probs (all but ``simpo`` and ``orpo``)."""
    return LOSSES[loss_type].needs_reference


def loss_params(config) -> dict[str, float]:
    """The parameters of ``config.loss_type``'s loss, read from ``config`` (a ``TrainConfig``)."""
    return {name: getattr(config, name) for name in LOSSES[config.loss_type].params}


@dataclass
class LossInputs:
    """The ``[B]`` tensors a loss reads: summed completion log-probs of the policy and the reference
    for y_w and y_l, and the completion token counts (``None`` where the loss does not need them)."""
    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None
    n_chosen: torch.Tensor | None = None
    n_rejected: torch.Tensor | None = None

    @property
    def chosen_logratios(self) -> torch.Tensor:
        return self.chosen - self.ref_chosen                              # (B,)

    @property
    def rejected_logratios(self) -> torch.Tensor:
        return self.rejected - self.ref_rejected                          # (B,)

    @property
    def h(self) -> torch.Tensor:
        """The log-ratio difference h of the module docstring."""
        return self.chosen_logratios - self.rejected_logratios            # (B,)

    def means(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token mean log-probs of y_w and y_l (the reference-free losses' score)."""
        return (self.chosen / self.n_chosen.clamp(min=1).to(self.chosen.dtype),       # (B,)
                self.rejected / self.n_rejected.clamp(min=1).to(self.rejected.dtype))  # (B,)


# ----------------------------------------------------------------------------- shared pieces

def _logsigmoid(z: torch.Tensor) -> torch.Tensor:
    from torch.nn.functional import logsigmoid  # torch loads on the first loss computed (module docstring)
    return logsigmoid(z)


def _smoothed_logistic_loss(z: torch.Tensor, eps: float) -> torch.Tensor:
    r""":math:`-(1-ε)\log\sigma(z) - ε\log\sigma(-z)`: the logistic loss of DPO, SimPO, DPOP and R-DPO on
    their logit ``z``, with cDPO's label smoothing ε (ε = 0: plain :math:`-\log\sigma(z)`)."""
    return -(1 - eps) * _logsigmoid(z) - eps * _logsigmoid(-z)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    r""":math:`\log(1 - e^x)` for ``x <= 0``, without cancellation: ``log1p(-exp(x))`` for
    ``x < -ln 2``, ``log(-expm1(x))`` above (Mächler 2012; TRL's ``odds_ratio_loss`` uses the same)."""
    return (-x.exp()).log1p().where(x < -0.6931471805599453, (-x.expm1()).log())


# ----------------------------------------------------------------------------- the losses (module docstring)

@register("sigmoid", "DPO (Rafailov et al. 2023, Eq. 7); with --label-smoothing: cDPO")
def sigmoid(x: LossInputs, beta: float, eps: float) -> torch.Tensor:
    r"""DPO (Rafailov et al. 2023, Eq. 7): :math:`\ell = -\log\sigma(\beta h)`; ln 2 at initialisation (h = 0).
    Its gradient (§4, "What does the DPO update do?", unnumbered) is :math:`-\beta\,\sigma(-\beta h)\,\nabla h`:
    each pair weighted by how wrong the implicit reward model is, :math:`\sigma(\hat r_l - \hat r_w)`.
    With ε > 0, conservative DPO (the authors' code; Mitchell 2023): the label is taken as flipped with
    probability ε, :math:`\ell = -(1-ε)\log\sigma(\beta h) - ε\log\sigma(-\beta h)` (TRL 1.x ignores
    ``label_smoothing`` for ``sigmoid``; we keep the authors')."""
    return _smoothed_logistic_loss(beta * x.h, eps)


@register("ipo", "IPO (Azar et al. 2023, Eq. 17), on summed log-probs")
def ipo(x: LossInputs, beta: float, eps: float) -> torch.Tensor:
    r"""IPO (Azar et al. 2023, Eq. 17, τ = β): :math:`\ell = (h - \tfrac{1}{2\beta})^2`, on summed log-probs as
    in the paper; :math:`1/(4\beta^2)` at initialisation. TRL 1.x divides each log-ratio by the completion length
    first: pass per-token means (``sequence_logprobs(..., average=True)``) for that variant."""
    return (x.h - 1 / (2 * beta)) ** 2


@register("hinge", "SLiC's hinge (Zhao et al. 2023, Eq. 2)")
def hinge(x: LossInputs, beta: float, eps: float) -> torch.Tensor:
    r"""SLiC's hinge (Zhao et al. 2023, Eq. 2, δ = 1/β): :math:`\ell = \max(0, 1 - \beta h)`."""
    return (1 - beta * x.h).relu()


@register("robust", "rDPO (Chowdhury et al. 2024, Eq. 8): unbiased under label-flip rate --label-smoothing")
def robust(x: LossInputs, beta: float, eps: float) -> torch.Tensor:
    r"""rDPO (Chowdhury et al. 2024, Eq. 8): an unbiased estimate of the clean loss under label-flip rate ε,
    :math:`\ell = \frac{(1-ε)(-\log\sigma(\beta h)) - ε(-\log\sigma(-\beta h))}{1-2ε}`; ``sigmoid`` at ε = 0."""
    h = x.h
    return (-(1 - eps) * _logsigmoid(beta * h) + eps * _logsigmoid(-beta * h)) / (1 - 2 * eps)


# 50: the λ of the Smaug runs as public DPOP code quotes it (the paper's value, not re-checked here)
@register("dpop", "DPO-Positive (Pal et al. 2024, Eq. 3)",
          dpop_lambda=Param(50.0, "dpop: weight λ of the penalty max(0, log π_ref(y_w) − log π(y_w)) inside the "
                                  "sigmoid"))
def dpop(x: LossInputs, beta: float, eps: float, dpop_lambda: float) -> torch.Tensor:
    r"""DPO-Positive (Pal et al. 2024, "Smaug", Eq. 3): DPO plus a penalty, inside the sigmoid and scaled by β,
    for every nat the chosen response falls below the reference,
    :math:`\ell = -\log\sigma\big(\beta\,[\,h - \lambda\max(0,\ \log\pi_\text{ref}(y_w|x)
    - \log\pi_\theta(y_w|x))\,]\big)`. DPO can raise h while *lowering* the chosen log-prob (both fall, the
    rejected faster); the penalty removes that way out. Equal to ``sigmoid`` while the chosen log-prob stays at
    or above the reference's."""
    return _smoothed_logistic_loss(beta * (x.h - dpop_lambda * (x.ref_chosen - x.chosen).relu()), eps)


# 0.05: a starting value for ~10-40-token answers, not the paper's (R-DPO tunes α per dataset)
@register("rdpo", "R-DPO (Park et al. 2024, Eq. 9)", needs_lengths=True,
          rdpo_alpha=Param(0.05, "rdpo: α per token of the length gap |y_w| − |y_l| added to the logit (0: plain DPO)"))
def rdpo(x: LossInputs, beta: float, eps: float, rdpo_alpha: float) -> torch.Tensor:
    r"""R-DPO (Park et al. 2024, "Disentangling Length from Quality in DPO", Eq. 9):
    :math:`\ell = -\log\sigma\big(\beta h + \alpha(|y_w| - |y_l|)\big)`, |y| the completion tokens. The sign
    follows the paper's derivation: it maximises :math:`r(x,y) - \alpha|y|` under the KL constraint, so the
    Bradley-Terry logit gains :math:`+\alpha(|y_w| - |y_l|)`: the part of a preference the length gap already
    explains no longer has to be learnt, so length stops paying. ``sigmoid`` at α = 0."""
    h = x.h
    length_gap = (x.n_chosen - x.n_rejected).to(h.dtype)                  # (B,) |y_w| - |y_l|
    return _smoothed_logistic_loss(beta * h + rdpo_alpha * length_gap, eps)


# 0.5: TRL's CPOConfig.simpo_gamma
@register("simpo", "SimPO (Meng et al. 2024, Eq. 6), reference-free", needs_reference=False, needs_lengths=True,
          simpo_gamma=Param(0.5, "simpo: target reward margin γ between the chosen and rejected β·mean log-probs"))
def simpo(x: LossInputs, beta: float, eps: float, simpo_gamma: float) -> torch.Tensor:
    r"""SimPO (Meng et al. 2024, Eq. 6), reference-free: :math:`\ell = -\log\sigma\big(\beta\bar\ell(y_w)
    - \beta\bar\ell(y_l) - \gamma\big)`, γ the target reward margin (0.5: TRL's ``CPOConfig.simpo_gamma``).
    β is a reward scale for per-token means here, not a KL strength: the authors train with β = 2 to 10 (at the
    DPO default 0.1 every logit starts near −γ). Smoothed like cDPO with ε, as TRL's ``CPOTrainer`` does."""
    chosen_mean, rejected_mean = x.means()                                # (B,), (B,)
    return _smoothed_logistic_loss(beta * (chosen_mean - rejected_mean) - simpo_gamma, eps)


@register("orpo", "ORPO (Hong et al. 2024, Eqs. 6-7), reference-free; β is the odds-ratio weight λ",
          needs_reference=False, needs_lengths=True, smoothing=False, holds_nll=True)
def orpo(x: LossInputs, beta: float, eps: float) -> torch.Tensor:
    r"""ORPO (Hong et al. 2024, Eqs. 6-7), reference-free; β is the weight λ of the odds-ratio term (TRL's
    ``ORPOConfig.beta``): :math:`\ell = \text{NLL}(y_w) - \lambda\log\sigma\big(\log\frac{\text{odds}(y_w)}
    {\text{odds}(y_l)}\big)`, :math:`\text{odds}(y) = \frac{P}{1-P}`, :math:`P = e^{\bar\ell(y)}`, in float32
    with the stable :func:`log1mexp`. :math:`\text{NLL}(y_w) = -\bar\ell(y_w)` per pair, over the chosen
    *completion* tokens (TRL takes one cross-entropy over the batch's chosen sequences, prompt included, so only
    the odds-ratio term is compared with TRL). It holds its NLL: ``nll_weight`` must stay 0; no smoothing."""
    chosen_mean, rejected_mean = x.means()
    c, r = chosen_mean.float(), rejected_mean.float()                     # float32, as TRL computes it
    log_odds = (c - r) - (log1mexp(c) - log1mexp(r))                      # log odds(y_w) - log odds(y_l)
    return -c - beta * _logsigmoid(log_odds)                              # NLL(y_w) - λ log σ(log odds ratio)


LOSS_TYPES = tuple(LOSSES)
REFERENCE_FREE_LOSSES = tuple(k for k, v in LOSSES.items() if not v.needs_reference)
LENGTH_LOSSES = tuple(k for k, v in LOSSES.items() if v.needs_lengths)
_ALL_PARAMS = {name: p for loss in LOSSES.values() for name, p in loss.params.items()}


# ----------------------------------------------------------------------------- the entry point

def _check_call(loss: Loss | None, loss_type: str, beta: float, eps: float, x: LossInputs, params: dict) -> dict:
    """The parameters ``loss`` reads (defaults filled in), after every check of its inputs."""
    if loss is None:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {LOSS_TYPES}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {eps}")
    for name, value in params.items():
        if name not in _ALL_PARAMS:
            raise TypeError(f"dpo_loss() got an unexpected keyword argument {name!r}")
        if problem := _ALL_PARAMS[name].check(value):
            raise ValueError(f"{name} {problem}")
    if loss.needs_reference and (x.ref_chosen is None or x.ref_rejected is None):
        raise ValueError(f"loss_type {loss_type!r} needs the reference log-probs (ref_chosen_logps, "
                         f"ref_rejected_logps); {' and '.join(REFERENCE_FREE_LOSSES)} are the reference-free ones")
    if loss.needs_lengths and (x.n_chosen is None or x.n_rejected is None):
        raise ValueError(f"loss_type {loss_type!r} needs chosen_num_tokens and rejected_num_tokens")
    if eps and not loss.smoothing:
        raise ValueError(f"label_smoothing does not apply to {loss_type}")
    return {name: params.get(name, p.default) for name, p in loss.params.items()}


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
    **params: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example preference loss and implicit rewards.

    Returns ``(losses, chosen_rewards, rejected_rewards)``, each of shape ``[B]``.
    Take ``losses.mean()`` for the batch loss. See the module docstring for formulas.
    ``params`` are the losses' own settings (``simpo_gamma``, ``dpop_lambda``, ``rdpo_alpha``:
    :data:`LOSSES`); each loss reads only its own, and the others are checked and ignored.
    """
    x = LossInputs(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                   chosen_num_tokens, rejected_num_tokens)
    loss = LOSSES.get(loss_type)
    own = _check_call(loss, loss_type, beta, label_smoothing, x, params)
    losses = loss.fn(x, beta, label_smoothing, **own)
    if loss.needs_reference:
        return losses, beta * x.chosen_logratios.detach(), beta * x.rejected_logratios.detach()
    chosen_mean, rejected_mean = x.means()
    return losses, beta * chosen_mean.detach(), beta * rejected_mean.detach()


def chosen_nll(policy_chosen_logps: torch.Tensor, chosen_num_tokens: torch.Tensor) -> torch.Tensor:
    """Per-example negative log-likelihood of the chosen response, averaged per token.

    ``policy_chosen_logps`` are summed log-probs ``[B]``; ``chosen_num_tokens`` the number
    of scored tokens ``[B]``. Used for the DPO + NLL objective (module docstring).
    """
    return -policy_chosen_logps / chosen_num_tokens.clamp(min=1).to(policy_chosen_logps.dtype)
