"""Graders for lesson 05 (a small LLM on a GPU); re-exported by :mod:`dpo_lib.course.graders`, where
the check cells find them.

Each grader compares the learner's function with the library's own implementation on six seeded
cases: LoRA's parameter count and the memory bill (:mod:`dpo_lib.tools.vram`), the win rate and
the KL to the reference (:mod:`dpo_lib.evaluation`).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from dpo_lib.course.graders_rlhf import _right_padded_mask
from dpo_lib.course.grading_engine import Grader, Mistake
from dpo_lib.evaluation import mean_and_se, win_rate
from dpo_lib.lora import ALL_LINEAR, LINEAR_MODULES
from dpo_lib.tools.vram import BYTES, ModelSpec, estimate, lora_trainable_params, model_spec

__all__ = [
    "GPU_GRADERS", "check_lora_parameters", "check_memory_bill", "check_win_rate", "check_sequence_kl",
    "reference_lora_parameters", "reference_memory_bill", "reference_sequence_kl",
]


# --------------------------------------------------------------------------- 05: LoRA's trainable parameters
_SPECS = [
    ModelSpec("tiny-gqa", vocab=1000, hidden=64, layers=2, intermediate=176, heads=4, kv_heads=2),
    model_spec("SmolLM2-135M-Instruct"),
    ModelSpec("tiny-mha", vocab=512, hidden=48, layers=3, intermediate=128, heads=4, kv_heads=4),
    model_spec("SmolLM2-360M-Instruct"),
    ModelSpec("tiny-wide-heads", vocab=800, hidden=32, layers=4, intermediate=96, heads=4, kv_heads=1, head_dim=16),
    model_spec("Llama-3.1-8B-Instruct"),
]
_TARGETS = [ALL_LINEAR, ("q_proj", "v_proj"), ALL_LINEAR, ("q_proj", "k_proj", "v_proj", "o_proj"),
            ("gate_proj", "up_proj", "down_proj"), ALL_LINEAR]


def _lora_case(g: torch.Generator, k: int) -> tuple:
    return _SPECS[k], (8, 16, 4, 32, 2, 16)[k], _TARGETS[k]


def reference_lora_parameters(spec, r, target_modules):
    """:func:`dpo_lib.tools.specs.lora_trainable_params`: ``r·(d_in + d_out)`` per adapted matrix, all layers."""
    return lora_trainable_params(spec, r, target_modules)


def _lora_count(per_matrix: Callable, layers: bool = True, all_linear=LINEAR_MODULES) -> Callable:
    def fn(spec, r, targets):
        names = all_linear if targets == ALL_LINEAR else tuple(targets)
        shapes = spec.linear_shapes()
        per_layer = sum(per_matrix(spec, r, *shapes[t]) for t in names)
        return per_layer * (spec.layers if layers else 1)
    return fn


LORA_MISTAKES = [
    Mistake("that counts the frozen matrix W (d_in·d_out): LoRA trains A (r × d_in) and B (d_out × r), "
            "r·(d_in + d_out) parameters per adapted matrix.", _lora_count(lambda s, r, i, o: i * o)),
    Mistake("one block only: every decoder layer has its own adapters, so multiply by spec.layers.",
            _lora_count(lambda s, r, i, o: r * (i + o), layers=False)),
    Mistake("not every matrix is h × h: with grouped-query attention k_proj and v_proj are h × kv_dim, and the "
            "MLP's are h × I. Read each (d_in, d_out) from spec.linear_shapes().",
            _lora_count(lambda s, r, i, o: 2 * r * s.hidden)),
    Mistake("count both factors: A has r·d_in parameters and B has d_out·r.", _lora_count(lambda s, r, i, o: r * i)),
    Mistake('"all-linear" means every linear layer of the block: the four attention projections and the three '
            "MLP ones (dpo_lib.lora.LINEAR_MODULES).",
            _lora_count(lambda s, r, i, o: r * (i + o), all_linear=LINEAR_MODULES[:4])),
]


# --------------------------------------------------------------------------- 05: the memory bill
_BILLS = [("full", "bf16", 16), ("lora", "bf16", 16), ("full", "fp32", 8), ("lora", "fp16", 8),
          ("full", "fp16", 16), ("lora", "fp32", 4)]


def _bill_case(g: torch.Generator, k: int) -> tuple:
    mode, precision, r = _BILLS[k]
    return _SPECS[(0, 1, 2, 3, 1, 4)[k]], mode, precision, r


def reference_memory_bill(spec, mode, precision, lora_r):
    """Bytes of ``(weights, gradients, optimizer)``, from :func:`dpo_lib.tools.vram.estimate` (LoRA: all linear)."""
    m = estimate(spec, mode=mode, seq_len=1, micro_batch=1, precision=precision, lora_r=lora_r, cuda=False)
    return m.weights, m.gradients, m.optimizer


def _bill(master: str = "half", moments: int = 2, adapter_bytes: int | None = 4, lora_grads: str = "adapters",
          lora_optimizer: str = "adapters", adapters_in_weights: bool = True, full_grad_bytes: int | None = None):
    """A memory bill with one deliberate change per flag (the mistakes of :data:`BILL_MISTAKES`)."""
    def fn(spec, mode, precision, lora_r):
        P, b = spec.params, BYTES[precision]
        if mode == "full":
            has_master = {"half": b < 4, "never": False, "always": True}[master]
            return P * b, P * (full_grad_bytes or b), P * (4 * moments + (4 if has_master else 0))
        n = lora_trainable_params(spec, lora_r)
        a = adapter_bytes or b
        weights = P * b + (n * a if adapters_in_weights else 0)
        gradients = P * b if lora_grads == "all" else n * a
        return weights, gradients, 4 * moments * (P if lora_optimizer == "all" else n)
    return fn


BILL_MISTAKES = [
    Mistake("mixed precision keeps an fp32 master copy of every trained weight (4 bytes) besides AdamW's moments "
            "(8 bytes): 12 bytes of optimizer state per trained parameter in bf16/fp16.", _bill(master="never")),
    Mistake("in fp32 the weights are already fp32: there is no master copy, only AdamW's two moments (8 bytes "
            "per trained parameter).", _bill(master="always")),
    Mistake("AdamW keeps two fp32 moments per trained parameter, m and v: 8 bytes, not 4.", _bill(moments=1)),
    Mistake("peft keeps the LoRA adapters in fp32 (4 bytes each, and so are their gradients), whatever the dtype "
            "of the base.", _bill(adapter_bytes=None)),
    Mistake("with LoRA only the adapters get gradients: 4·P_LoRA bytes, not one per weight of the model.",
            _bill(lora_grads="all")),
    Mistake("with LoRA, AdamW keeps moments for the adapters only: 8·P_LoRA bytes, not 8·P.",
            _bill(lora_optimizer="all")),
    Mistake("the adapters are weights too: add their 4·P_LoRA bytes to the base's b·P.",
            _bill(adapters_in_weights=False)),
    Mistake("in mixed precision the gradients have the compute dtype, like the weights (2 bytes in bf16/fp16); "
            "only the master copy and AdamW's moments are fp32.", _bill(full_grad_bytes=4)),
]


# --------------------------------------------------------------------------- 05: the win rate
def _win_case(g: torch.Generator, k: int) -> tuple:
    """Rewards on a coarse grid, so that ties are common; case 0 is all ties (a policy equal to its reference)."""
    n = (6, 9, 20, 5, 30, 12)[k]
    reference = (torch.randint(-3, 4, (n,), generator=g) / 2).tolist()
    if k == 0:
        return list(reference), reference
    return (torch.randint(-3, 4, (n,), generator=g) / 2).tolist(), reference


def _wins(score: Callable, se: Callable = lambda w: mean_and_se(w)[1]) -> Callable:
    def fn(policy, reference):
        w = [score(p, r) for p, r in zip(policy, reference)]
        return sum(w) / len(w), se(w)
    return fn


def _half_tie(p, r):
    return 1.0 if p > r else 0.5 if p == r else 0.0


def _population_se(w):
    m = sum(w) / len(w)
    return math.sqrt(sum((x - m) ** 2 for x in w) / len(w) / len(w))


WIN_RATE_MISTAKES = [
    Mistake("ties count as losses: a tie counts ½ (a policy equal to its reference wins half the time).",
            _wins(lambda p, r: float(p > r))),
    Mistake("ties count as wins: a tie counts ½, not 1.", _wins(lambda p, r: float(p >= r))),
    Mistake("the comparison is reversed: the policy wins when its reward is higher than the reference's.",
            _wins(lambda p, r: _half_tie(r, p))),
    Mistake("the standard error uses the sample standard deviation (divide by n - 1), then divides by √n.",
            _wins(_half_tie, _population_se)),
    Mistake("that is the standard deviation of the outcomes: the standard error of their mean divides it by √n.",
            _wins(_half_tie, lambda w: mean_and_se(w)[1] * math.sqrt(len(w)))),
    Mistake("with ties the outcomes are 0, ½ and 1, not a coin flip: the standard error is s/√n of those "
            "outcomes, not the binomial √(p(1-p)/n).",
            _wins(_half_tie, lambda w: math.sqrt((sum(w) / len(w)) * (1 - sum(w) / len(w)) / len(w)))),
]


# --------------------------------------------------------------------------- 05: the KL to the reference
def _kl_case(g: torch.Generator, k: int) -> tuple:
    """Per-token log-probs of ``N`` sampled answers under the policy and the reference; garbage on padding."""
    N, T = (4, 7, 3, 10, 5, 8)[k], (5, 3, 6, 4, 8, 5)[k]
    policy = -3 * torch.rand(N, T, generator=g)
    reference = policy - 0.3 * torch.rand(N, T, generator=g) + 0.1 * torch.randn(N, T, generator=g)
    return policy, reference, _right_padded_mask(g, N, T)


def reference_sequence_kl(policy_logps, ref_logps, mask):
    """The estimate of :func:`dpo_lib.evaluation.sequence_kl`: mean and SE over answers of
    ``Σ_t (log π - log π_ref)``."""
    return mean_and_se(((policy_logps - ref_logps) * mask).sum(-1).tolist())


def _kl_estimate(per_answer: Callable, se: Callable = lambda x: mean_and_se(x)[1]) -> Callable:
    def fn(lp, lr, m):
        x = per_answer(lp, lr, m).tolist()
        return sum(x) / len(x), se(x)
    return fn


SEQUENCE_KL_MISTAKES = [
    Mistake("the sign is flipped: on samples from π, KL(π‖π_ref) is the mean of log π - log π_ref (policy minus "
            "reference).", _kl_estimate(lambda lp, lr, m: ((lr - lp) * m).sum(-1))),
    Mistake("mean per token instead of sum: an answer's log-probability sums its tokens, and the KL is in nats "
            "per answer.", _kl_estimate(lambda lp, lr, m: ((lp - lr) * m).sum(-1) / m.sum(-1))),
    Mistake("padding is counted: multiply the per-token log-ratios by the mask before summing.",
            _kl_estimate(lambda lp, lr, m: (lp - lr).sum(-1))),
    Mistake("the standard error uses the sample standard deviation (divide by n - 1), then divides by √n.",
            _kl_estimate(lambda lp, lr, m: ((lp - lr) * m).sum(-1), _population_se)),
    Mistake("that is the standard deviation of the log-ratios: the standard error of their mean divides it by √n.",
            _kl_estimate(lambda lp, lr, m: ((lp - lr) * m).sum(-1), lambda x: mean_and_se(x)[1] * math.sqrt(len(x)))),
]


# --------------------------------------------------------------------------- the graders
GPU_GRADERS: dict[str, Grader] = {g.name: g for g in [
    Grader("lora_parameters", reference_lora_parameters, _lora_case, ("spec", "r", "target_modules"),
           ("n_trainable",), LORA_MISTAKES),
    Grader("memory_bill", reference_memory_bill, _bill_case, ("spec", "mode", "precision", "lora_r"),
           ("weights", "gradients", "optimizer"), BILL_MISTAKES),
    Grader("win_rate", win_rate, _win_case, ("policy_rewards", "reference_rewards"), ("win_rate", "se"),
           WIN_RATE_MISTAKES),
    Grader("sequence_kl", reference_sequence_kl, _kl_case, ("policy_logps", "ref_logps", "mask"), ("kl", "se"),
           SEQUENCE_KL_MISTAKES),
]}


def check_lora_parameters(fn: Callable) -> None:
    """``fn(spec, r, target_modules) -> int``: LoRA's trainable parameters over all layers."""
    GPU_GRADERS["lora_parameters"](fn)


def check_memory_bill(fn: Callable) -> None:
    """``fn(spec, mode, precision, lora_r) -> (weights, gradients, optimizer)`` in bytes, for mode "full" or "lora"."""
    GPU_GRADERS["memory_bill"](fn)


def check_win_rate(fn: Callable) -> None:
    """``fn(policy_rewards, reference_rewards) -> (win_rate, se)``: ties count ½, SE of the mean outcome."""
    GPU_GRADERS["win_rate"](fn)


def check_sequence_kl(fn: Callable) -> None:
    """``fn(policy_logps [N,T], ref_logps [N,T], mask [N,T]) -> (kl, se)`` in nats per answer."""
    GPU_GRADERS["sequence_kl"](fn)
