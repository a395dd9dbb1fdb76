"""Graders for the exercise notebooks.

A check cell calls a grader with the learner's function, e.g. ``check_dpo_loss(dpo_loss)``.
The grader runs the function and the reference implementation on several random cases
(seeded, so a failure is reproducible) and either prints one pass line::

    ✓ dpo_loss: 6/6 cases match

or raises a ``GradingError`` (an ``AssertionError`` that IPython shows as its message alone, without
the library's frames) whose message names the likely mistake. To name it, each
grader also runs a list of *known-wrong variants* of the reference (missing β, mean instead
of sum, labels not shifted, ...): when the learner's output agrees with a variant, its hint
is reported. Outputs are compared component by component, so two mistakes in two
different outputs (say, the loss and the rewards) give two hints.

Lessons add graders by building a :class:`Grader`: a name, the reference, a function that
makes the arguments of case ``k``, and the mistakes. ``GRADERS`` lists the ready-made ones. Where the
learner's output feeds a backward pass, the grader compares its gradient too (``Grader.grads``): a loss
with the right values and a detached term fails with its own hint.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from dpo_lib.course.bandit import optimal_policy
from dpo_lib.course.graders_adapter import *  # noqa: F401,F403 (the check cells of each lesson import from here)
from dpo_lib.course.graders_adapter import ADAPTER_GRADERS
from dpo_lib.course.graders_bandit import *  # noqa: F401,F403
from dpo_lib.course.graders_bandit import BANDIT_GRADERS
from dpo_lib.course.graders_gpu import *  # noqa: F401,F403 (lesson 05: the check cells import them from here)
from dpo_lib.course.graders_gpu import GPU_GRADERS
from dpo_lib.course.graders_iterate import *  # noqa: F401,F403 (lesson 07: the check cells import them from here)
from dpo_lib.course.graders_iterate import ITERATE_GRADERS
from dpo_lib.course.graders_lm import (  # noqa: F401 (lessons 02 and 03: the check cells import them from here)
    LM_GRADERS,
    check_concatenated_logps,
    check_dpo_train_step,
    check_reference_logps,
    check_split_prompt_completion,
    reference_concatenated_logps,
    reference_dpo_train_step,
    reference_reference_logps,
    reference_split_prompt_completion,
)
from dpo_lib.course.graders_logprobs import *  # noqa: F401,F403
from dpo_lib.course.graders_logprobs import LOGPROB_GRADERS, right_padded_batch
from dpo_lib.course.graders_noise import *  # noqa: F401,F403
from dpo_lib.course.graders_noise import NOISE_GRADERS
from dpo_lib.course.graders_orpo import *  # noqa: F401,F403
from dpo_lib.course.graders_orpo import ORPO_GRADERS
from dpo_lib.course.graders_ppo import *  # noqa: F401,F403
from dpo_lib.course.graders_ppo import PPO_GRADERS
from dpo_lib.course.graders_rlhf import *  # noqa: F401,F403 (lesson 04: the check cells import them from here)
from dpo_lib.course.graders_rlhf import RLHF_GRADERS
from dpo_lib.course.graders_round import *  # noqa: F401,F403
from dpo_lib.course.graders_round import ROUND_GRADERS
from dpo_lib.course.graders_stats import *  # noqa: F401,F403
from dpo_lib.course.graders_stats import STATS_GRADERS
from dpo_lib.course.graders_variants import *  # noqa: F401,F403 (lesson 06: the check cells import them from here)
from dpo_lib.course.graders_variants import VARIANT_GRADERS
from dpo_lib.course.grading_engine import BETAS, Grader, GradingError, HarnessGrader, Mistake, _gather  # noqa: F401 (re-exported)
from dpo_lib.logprobs import sequence_logprobs
from dpo_lib.losses import dpo_loss

__all__ = ["GRADERS", "check_completion_mask", "check_dpo_gradient", "check_dpo_loss", "check_implicit_rewards",
           "check_optimal_policy", "check_reward_accuracy", "check_sequence_logprobs",
           "reference_completion_mask", "reference_dpo_loss"]

# --------------------------------------------------------------------------- case makers
def _bandit_case(g: torch.Generator, k: int) -> tuple:
    """Float32 cases; the last one has β = 0.01 and rewards up to 2.5, where exp(r/β) overflows (> 3.4e38)."""
    K = 3 + k % 5
    ref = torch.softmax(torch.randn(K, generator=g), -1)
    rewards = torch.randn(K, generator=g)
    if k == 5:
        rewards[0] = 2.5
        return ref, rewards, 0.01
    return ref, rewards, BETAS[k % len(BETAS)]


def _logp_case(g: torch.Generator, k: int) -> tuple:
    """Summed log-probs of a batch of pairs; case 0 is step 0 (policy == reference)."""
    B = (4, 1, 7, 3, 5, 8)[k % 6]
    pc = -(1 + 30 * torch.rand(B, generator=g))
    pr = -(1 + 30 * torch.rand(B, generator=g))
    rc = pc + (0 if k == 0 else 3 * torch.randn(B, generator=g))
    rr = pr + (0 if k == 0 else 3 * torch.randn(B, generator=g))
    return pc.requires_grad_(), pr.requires_grad_(), rc, rr, BETAS[k % len(BETAS)]


def _rewards_case(g: torch.Generator, k: int) -> tuple:
    policy = -(1 + 30 * torch.rand(5 + k, generator=g))
    ref = policy + 3 * torch.randn(5 + k, generator=g)
    return policy.requires_grad_(), ref, BETAS[k % len(BETAS)]


def _accuracy_case(g: torch.Generator, k: int) -> tuple:
    B = 6 + k
    if k == 0:  # step 0: policy == reference, every reward is 0
        return torch.zeros(B), torch.zeros(B)
    chosen = torch.randn(B, generator=g)
    rejected = torch.randn(B, generator=g)
    rejected[: k % 3 + 1] = chosen[: k % 3 + 1]  # a few exact ties
    return chosen, rejected


def _sequence_case(g: torch.Generator, k: int) -> tuple:
    """Right-padded prompt+completion batch: mask = 1 on completion tokens only."""
    return right_padded_batch(g, (2, 3, 1, 4, 2, 3)[k % 6], 7 + k, 5 + 2 * k)


def _mask_case(g: torch.Generator, k: int) -> tuple:
    B, T = 2 + k % 3, 6 + k
    prompt_len = torch.randint(1, T - 3, (B,), generator=g)
    total = torch.minimum(prompt_len + torch.randint(2, T, (B,), generator=g), torch.tensor(T))
    attention_mask = (torch.arange(T) < total[:, None]).long()  # right padding
    return attention_mask, prompt_len


# --------------------------------------------------------------------------- references and variants
def _rewards(pc, pr, rc, rr, beta):
    return beta * (pc - rc).detach(), beta * (pr - rr).detach()


def _sigmoid_loss(loss_of_h: Callable, rewards: Callable = _rewards) -> Callable:
    def fn(pc, pr, rc, rr, beta):
        return (loss_of_h(pc, pr, rc, rr, beta), *rewards(pc, pr, rc, rr, beta))
    return fn


def _h(pc, pr, rc, rr):
    return (pc - rc) - (pr - rr)


def reference_dpo_loss(pc, pr, rc, rr, beta):
    """The sigmoid DPO loss of :func:`dpo_lib.losses.dpo_loss`: ``(losses, chosen_rewards, rejected_rewards)``."""
    return dpo_loss(pc, pr, rc, rr, beta=beta)


DPO_LOSS_MISTAKES = [
    Mistake("β is missing: the loss is -log σ(β·h) with h = (logπ_c - logref_c) - (logπ_r - logref_r).",
            _sigmoid_loss(lambda pc, pr, rc, rr, b: -F.logsigmoid(_h(pc, pr, rc, rr)))),
    Mistake("the sign is flipped (or chosen and rejected are swapped): the loss must shrink as the chosen "
            "response gains log-probability relative to the rejected one.",
            _sigmoid_loss(lambda pc, pr, rc, rr, b: -F.logsigmoid(-b * _h(pc, pr, rc, rr)))),
    Mistake("chosen and rejected are swapped.",
            lambda pc, pr, rc, rr, b: reference_dpo_loss(pr, pc, rr, rc, b)),
    Mistake("the minus sign is missing: the loss is -log σ(β·h), a positive number (ln 2 at step 0).",
            _sigmoid_loss(lambda pc, pr, rc, rr, b: F.logsigmoid(b * _h(pc, pr, rc, rr)))),
    Mistake("you returned the batch mean: return one loss per example (shape [B]); the caller takes .mean().",
            lambda *a: (reference_dpo_loss(*a)[0].mean(), *reference_dpo_loss(*a)[1:])),
    Mistake("the reference log-probs are missing: each log-ratio is log π_θ(y) - log π_ref(y).",
            _sigmoid_loss(lambda pc, pr, rc, rr, b: -F.logsigmoid(b * (pc - pr)),
                          lambda pc, pr, rc, rr, b: (b * pc.detach(), b * pr.detach()))),
    Mistake("the rewards are missing β: reward = β·(log π_θ(y) - log π_ref(y)).",
            _sigmoid_loss(lambda pc, pr, rc, rr, b: reference_dpo_loss(pc, pr, rc, rr, b)[0],
                          lambda pc, pr, rc, rr, b: ((pc - rc).detach(), (pr - rr).detach()))),
    Mistake("the rewards have the wrong sign: reward = β·(log π_θ(y) - log π_ref(y)), policy minus reference.",
            _sigmoid_loss(lambda pc, pr, rc, rr, b: reference_dpo_loss(pc, pr, rc, rr, b)[0],
                          lambda pc, pr, rc, rr, b: (b * (rc - pc).detach(), b * (rr - pr).detach()))),
    Mistake("the loss is cut from the autograd graph (.detach(), .item(), numpy or torch.no_grad): its values are "
            "right but no gradient reaches the policy, so training would change nothing.",
            lambda *a: (reference_dpo_loss(*a)[0].detach(), *reference_dpo_loss(*a)[1:])),
    Mistake("the chosen log-ratio is detached inside the loss: the values are right, but no gradient reaches "
            "policy_chosen_logps, so training could never raise the chosen reply's probability. Detach only the "
            "rewards you return, not the terms of the loss.",
            _sigmoid_loss(lambda pc, pr, rc, rr, b: -F.logsigmoid(b * _h(pc.detach(), pr, rc, rr)))),
    Mistake("the rejected log-ratio is detached inside the loss: the values are right, but no gradient reaches "
            "policy_rejected_logps, so training could never lower the rejected reply's probability. Detach only "
            "the rewards you return, not the terms of the loss.",
            _sigmoid_loss(lambda pc, pr, rc, rr, b: -F.logsigmoid(b * _h(pc, pr.detach(), rc, rr)))),
]


def _loss_in_graph(args, out):
    if args[0].requires_grad and not out[0].requires_grad:
        return "the loss is cut from the autograd graph: don't .detach() it or go through .item()/numpy."


def _rewards_detached(args, out):
    if any(isinstance(o, torch.Tensor) and o.requires_grad for o in out[1:]):
        return "the rewards must be detached (.detach()): they are metrics, not part of the loss."


def _detached(args, out):
    if isinstance(out[0], torch.Tensor) and out[0].requires_grad:
        return "the rewards must be detached (.detach()): they are metrics, not part of the loss."


def reference_dpo_gradient(pc, pr, rc, rr, beta):
    """∂ℓ/∂log π_θ(y_w) and ∂ℓ/∂log π_θ(y_l) of the per-pair DPO loss, by autograd: ``([B], [B])``."""
    pc, pr = pc.detach().requires_grad_(), pr.detach().requires_grad_()
    return torch.autograd.grad(dpo_loss(pc, pr, rc, rr, beta=beta)[0].sum(), (pc, pr))


def _gradient_pair(weight: Callable, chosen_sign: float = -1.0, rejected_sign: float = 1.0) -> Callable:
    def fn(pc, pr, rc, rr, b):
        w = weight(pc.detach(), pr.detach(), rc, rr, b)
        return chosen_sign * w, rejected_sign * w
    return fn


DPO_GRADIENT_MISTAKES = [
    Mistake("β is missing in front: ∂ℓ/∂log π_θ(y_w) = -β·σ(r̂_l - r̂_w); the chain rule through σ(β·h) brings "
            "out a factor β.", _gradient_pair(lambda pc, pr, rc, rr, b: torch.sigmoid(-b * _h(pc, pr, rc, rr)))),
    Mistake("the argument of σ is reversed: the weight is σ(r̂_l - r̂_w), large when the implicit reward orders "
            "the pair wrongly (d/dz of -log σ(z) is -σ(-z)).",
            _gradient_pair(lambda pc, pr, rc, rr, b: b * torch.sigmoid(b * _h(pc, pr, rc, rr)))),
    Mistake("β is missing inside σ: the implicit rewards r̂ = β·(log π_θ - log π_ref) include β, so the weight "
            "is σ(β·((log π_θ(y_l) - log π_ref(y_l)) - (log π_θ(y_w) - log π_ref(y_w)))).",
            _gradient_pair(lambda pc, pr, rc, rr, b: b * torch.sigmoid(-_h(pc, pr, rc, rr)))),
    Mistake("the signs are swapped: gradient descent must raise log π_θ(y_w), so ∂ℓ/∂log π_θ(y_w) is negative "
            "and ∂ℓ/∂log π_θ(y_l) positive.",
            _gradient_pair(lambda pc, pr, rc, rr, b: b * torch.sigmoid(-b * _h(pc, pr, rc, rr)), 1.0, -1.0)),
    Mistake("both derivatives have the same sign: h = (chosen log-ratio) - (rejected log-ratio), so they are "
            "opposite, -w and +w.",
            _gradient_pair(lambda pc, pr, rc, rr, b: b * torch.sigmoid(-b * _h(pc, pr, rc, rr)), -1.0, -1.0)),
]


def reference_implicit_rewards(policy_logps, ref_logps, beta):
    """Eq. 5 without the log Z term: ``β·(log π_θ(y) - log π_ref(y))``, detached."""
    return beta * (policy_logps - ref_logps).detach()


IMPLICIT_REWARD_MISTAKES = [
    Mistake("β is missing: reward = β·(log π_θ(y) - log π_ref(y)).", lambda p, r, b: (p - r).detach()),
    Mistake("multiply by β, don't divide.", lambda p, r, b: ((p - r) / b).detach()),
    Mistake("the sign is flipped: policy minus reference.", lambda p, r, b: (b * (r - p)).detach()),
    Mistake("the reference is missing: reward = β·(log π_θ(y) - log π_ref(y)).", lambda p, r, b: (b * p).detach()),
]


def reference_reward_accuracy(chosen_rewards, rejected_rewards):
    """Fraction of pairs the implicit reward model orders correctly (strictly): a float."""
    return (chosen_rewards > rejected_rewards).float().mean().item()


ACCURACY_MISTAKES = [
    Mistake("ties count as correct: use a strict > (at step 0 every reward is 0 and accuracy is 0, not 1).",
            lambda c, r: (c >= r).float().mean().item()),
    Mistake("the comparison is reversed: a pair is correct when chosen_reward > rejected_reward.",
            lambda c, r: (c < r).float().mean().item()),
    Mistake("you returned a count: return the fraction of correct pairs (.float().mean()).",
            lambda c, r: (c > r).float().sum().item()),
]


def reference_completion_mask(attention_mask, prompt_lengths):
    """1 on completion tokens: real tokens (attention_mask, right-padded) at positions >= prompt length."""
    pos = torch.arange(attention_mask.shape[1], device=attention_mask.device)  # (T,)
    return ((pos >= prompt_lengths[:, None]) & attention_mask.bool()).long()   # (B, T)


def _positions(am, pl, keep):
    pos = torch.arange(am.shape[1])
    return (keep(pos[None, :], pl[:, None]) & am.bool()).long()


MASK_MISTAKES = [
    Mistake("the prompt is not masked: set the first prompt_length positions to 0.", lambda am, pl: am.long()),
    Mistake("padding is scored: multiply by the attention mask.",
            lambda am, pl: (torch.arange(am.shape[1])[None] >= pl[:, None]).long()),
    Mistake("off by one: the first completion token sits at index prompt_length (use >=, not >).",
            lambda am, pl: _positions(am, pl, lambda p, n: p > n)),
    Mistake("off by one: the last prompt token is not part of the completion (positions >= prompt_length).",
            lambda am, pl: _positions(am, pl, lambda p, n: p >= n - 1)),
    Mistake("the mask is inverted: it should mark the completion, not the prompt.",
            lambda am, pl: _positions(am, pl, lambda p, n: p < n)),
    Mistake("off by one: the mask is one position early (it marks the last prompt token and drops the completion's "
            "last token); mark input_ids' own positions: sequence_logprobs does the shift.",
            lambda am, pl: torch.nn.functional.pad(reference_completion_mask(am, pl)[:, 1:], (0, 1))),
]


def reference_sequence_logprobs(logits, input_ids, completion_mask):
    """:func:`dpo_lib.logprobs.sequence_logprobs`: summed, shifted, masked log-probs ``[B]``."""
    return sequence_logprobs(logits, input_ids, completion_mask)


SEQUENCE_MISTAKES = [
    Mistake("the labels are not shifted: the logit at position t scores token t+1 "
            "(use logits[:, :-1] with input_ids[:, 1:]).",
            lambda lg, ids, m: (_gather(lg.log_softmax(-1), ids) * m).sum(-1)),
    Mistake("off by one: shift the mask together with the labels (completion_mask[:, 1:]).",
            lambda lg, ids, m: (_gather(lg[:, :-1].log_softmax(-1), ids[:, 1:]) * m[:, :-1]).sum(-1)),
    Mistake("mean instead of sum: DPO sums the token log-probs of the completion.",
            lambda lg, ids, m: sequence_logprobs(lg, ids, m, average=True)),
    Mistake("the prompt is not masked (and padding is scored): multiply by the completion mask.",
            lambda lg, ids, m: sequence_logprobs(lg, ids, torch.ones_like(m))),
    Mistake("log_softmax is missing: score tokens with log-probabilities, not raw logits.",
            lambda lg, ids, m: (_gather(lg[:, :-1], ids[:, 1:]) * m[:, 1:]).sum(-1)),
    Mistake("use log-probabilities (log_softmax), not probabilities (softmax).",
            lambda lg, ids, m: (_gather(lg[:, :-1].softmax(-1), ids[:, 1:]) * m[:, 1:]).sum(-1)),
]


def _normalise(x):
    return x / x.sum(-1, keepdim=True)


OPTIMAL_POLICY_MISTAKES = [
    Mistake("divide the reward by β: π* ∝ π_ref·exp(r/β), not exp(β·r).",
            lambda p, r, b: _normalise(p * torch.exp(b * r))),
    Mistake("β is missing: π* ∝ π_ref·exp(r/β).", lambda p, r, b: _normalise(p * torch.exp(r))),
    Mistake("the normalisation is missing: divide by Z = Σ_y π_ref(y)·exp(r(y)/β) so π* sums to 1.",
            lambda p, r, b: p * torch.exp(r / b)),
    Mistake("π_ref is missing: π* = π_ref·exp(r/β)/Z, not softmax(r/β).", lambda p, r, b: torch.softmax(r / b, -1)),
    Mistake("the sign of the reward is flipped: exp(+r/β) favours high reward.",
            lambda p, r, b: _normalise(p * torch.exp(-r / b))),
    Mistake("exp(r/β) overflows: in float32 it is inf as soon as r/β > 88 (β = 0.01 and r = 2.5 here), and "
            "inf/inf is nan. Work in log space: softmax(log π_ref + r/β) subtracts the largest term before "
            "exponentiating, so nothing overflows.", lambda p, r, b: _normalise(p * torch.exp(r / b))),
]

_LOGPS = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps", "beta")
_LOSS_GRADS = (("losses", "policy_chosen_logps"), ("losses", "policy_rejected_logps"))

GRADERS: dict[str, Grader] = {
    "optimal_policy": Grader("optimal_policy", optimal_policy, _bandit_case, ("ref_probs", "rewards", "beta"),
                             ("probs",), OPTIMAL_POLICY_MISTAKES),
    "dpo_loss": Grader("dpo_loss", reference_dpo_loss, _logp_case, _LOGPS,
                       ("losses", "chosen_rewards", "rejected_rewards"), DPO_LOSS_MISTAKES,
                       (_loss_in_graph, _rewards_detached), grads=_LOSS_GRADS),
    "dpo_gradient": Grader("dpo_gradient", reference_dpo_gradient, _logp_case, _LOGPS,
                           ("d_chosen", "d_rejected"), DPO_GRADIENT_MISTAKES),
    "implicit_rewards": Grader("implicit_rewards", reference_implicit_rewards, _rewards_case,
                               ("policy_logps", "ref_logps", "beta"), ("rewards",), IMPLICIT_REWARD_MISTAKES,
                               (_detached,)),
    "reward_accuracy": Grader("reward_accuracy", reference_reward_accuracy, _accuracy_case,
                              ("chosen_rewards", "rejected_rewards"), ("accuracy",), ACCURACY_MISTAKES),
    "sequence_logprobs": Grader("sequence_logprobs", reference_sequence_logprobs, _sequence_case,
                                ("logits", "input_ids", "completion_mask"), ("logps",), SEQUENCE_MISTAKES),
    "completion_mask": Grader("completion_mask", reference_completion_mask, _mask_case,
                              ("attention_mask", "prompt_lengths"), ("completion_mask",), MASK_MISTAKES),
    **BANDIT_GRADERS,  # lesson 01: dpo_lib.course.graders_bandit
    **LM_GRADERS, **LOGPROB_GRADERS,  # lessons 02 and 03: dpo_lib.course.graders_lm, graders_logprobs
    **STATS_GRADERS,  # lesson 03: dpo_lib.course.graders_stats
    **RLHF_GRADERS, **PPO_GRADERS,  # lesson 04: dpo_lib.course.graders_rlhf, graders_ppo
    **GPU_GRADERS, **ADAPTER_GRADERS,  # lesson 05: dpo_lib.course.graders_gpu, graders_adapter
    **VARIANT_GRADERS, **NOISE_GRADERS, **ORPO_GRADERS,  # lesson 06: graders_variants, graders_noise, graders_orpo
    **ITERATE_GRADERS, **ROUND_GRADERS,  # lesson 07: dpo_lib.course.graders_iterate, graders_round
}


def check_optimal_policy(fn: Callable) -> None:
    """``fn(ref_probs [K], rewards [K], beta) -> probs [K]``: Eq. 4."""
    GRADERS["optimal_policy"](fn)


def check_dpo_loss(fn: Callable) -> None:
    """``fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)``
    ``-> (losses [B], chosen_rewards [B], rejected_rewards [B])``: Eq. 7, rewards detached."""
    GRADERS["dpo_loss"](fn)


def check_dpo_gradient(fn: Callable) -> None:
    """Same arguments as :func:`check_dpo_loss`; ``fn`` returns ``(d_chosen [B], d_rejected [B])``, the derivatives
    of each pair's loss with respect to the policy's two log-probs (the paper's §4 gradient, unnumbered), compared
    with autograd."""
    GRADERS["dpo_gradient"](fn)


def check_implicit_rewards(fn: Callable) -> None:
    """``fn(policy_logps [B], ref_logps [B], beta) -> rewards [B]``, detached."""
    GRADERS["implicit_rewards"](fn)


def check_reward_accuracy(fn: Callable) -> None:
    """``fn(chosen_rewards [B], rejected_rewards [B]) -> float``: fraction with chosen > rejected."""
    GRADERS["reward_accuracy"](fn)


def check_sequence_logprobs(fn: Callable) -> None:
    """``fn(logits [B,T,V], input_ids [B,T], completion_mask [B,T]) -> [B]`` summed, shifted log-probs."""
    GRADERS["sequence_logprobs"](fn)


def check_completion_mask(fn: Callable) -> None:
    """``fn(attention_mask [B,T] (right-padded), prompt_lengths [B]) -> mask [B,T]`` of completion tokens."""
    GRADERS["completion_mask"](fn)
