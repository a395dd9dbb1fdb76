"""Graders for lesson 02 beyond the lesson's own code (re-exported by :mod:`dpo_lib.course.graders`).

* ``lean_sequence_logprobs``: the summed completion log-probs without a second ``[B, T-1, V]`` tensor. The
  harness watches every tensor the learner's function allocates (a ``TorchDispatchMode`` below autograd) and
  reports, as one more output, whether one of them is as large as half the logits: ``log_softmax`` of the whole
  batch, ``logits - logsumexp``, or a ``.reshape``/``.contiguous`` copy of ``logits[:, :-1]``.
* ``left_padded_mask``: the completion mask of a **left**-padded batch (generation pads on the left).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from dpo_lib.course.grading_engine import Grader, HarnessGrader, Mistake, _gather

__all__ = ["LOGPROB_GRADERS", "check_lean_sequence_logprobs", "check_left_padded_mask", "right_padded_batch",
           "reference_lean_sequence_logprobs", "reference_left_padded_mask"]


# --------------------------------------------------------------------------- lean log-probs
class _AllocationProbe(TorchDispatchMode):
    """The largest tensor (in elements) that an op creates in new memory (not a view of an input)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.numel())
        return out


def right_padded_batch(g: torch.Generator, B: int, T: int, V: int) -> tuple:
    """Random ``logits`` (B, T, V), ``input_ids`` (B, T) and a completion mask (B, T): 1 on each row's completion
    tokens (after a prompt of 1 to T - 4 tokens), 0 on the prompt and the right padding."""
    logits = 3 * torch.randn(B, T, V, generator=g)
    input_ids = torch.randint(0, V, (B, T), generator=g)
    prompt_len = torch.randint(1, T - 3, (B,), generator=g)
    total = torch.minimum(prompt_len + torch.randint(2, T, (B,), generator=g), torch.tensor(T))
    pos = torch.arange(T)
    mask = ((pos >= prompt_len[:, None]) & (pos < total[:, None])).long()
    return logits, input_ids, mask


def _lean_case(g: torch.Generator, k: int) -> tuple:
    """Right-padded batches of 3 to 6 rows (one row's temporaries stay under half the batch's logits)."""
    logits, input_ids, mask = right_padded_batch(g, (3, 4, 5, 3, 4, 6)[k], 6 + k, 7 + 3 * k)
    return logits.requires_grad_(), input_ids, mask


def _run_lean(fn: Callable, logits, input_ids, mask):
    probe = _AllocationProbe()
    with probe:
        out = fn(logits, input_ids, mask)
    B, T, V = logits.shape
    return out, float(probe.largest >= B * (T - 1) * V / 2)


def _lean(per_token: Callable, labels: Callable = lambda ids: ids[:, 1:], scored: Callable = lambda m: m[:, 1:],
          reduce: str = "sum") -> Callable:
    """Summed masked log-probs, one row's ``[T-1, V]`` at a time; ``per_token(row logits, row labels)``."""
    def fn(logits, input_ids, mask):
        lab, m = labels(input_ids), scored(mask).to(logits.dtype)
        rows = torch.stack([per_token(logits[b, : lab.shape[1]], lab[b]) for b in range(logits.shape[0])])
        total = (rows * m).sum(-1)
        return total / m.sum(-1).clamp(min=1) if reduce == "mean" else total
    return fn


def _log_prob(row, labels):
    return _gather(row, labels) - torch.logsumexp(row, -1)


def reference_lean_sequence_logprobs(logits, input_ids, completion_mask):
    """:func:`dpo_lib.logprobs.sequence_logprobs`'s numbers, one row of the batch at a time."""
    return _lean(_log_prob)(logits, input_ids, completion_mask)


def _full_log_softmax(logits, input_ids, mask):
    return (_gather(logits[:, :-1].log_softmax(-1), input_ids[:, 1:]) * mask[:, 1:]).sum(-1)


LEAN_MISTAKES = [
    Mistake("the values are right, but your function builds a tensor as large as the logits: log_softmax (or "
            "logits - logsumexp) over the whole batch, or a .reshape/.contiguous copy of logits[:, :-1]. With "
            "a 49k-token vocabulary that copy is the largest tensor of the step. You only need one number per "
            "token: the label's logit minus the logsumexp of its row, taken one sequence at a time.",
            _full_log_softmax),
    Mistake("the labels are not shifted: the logit at position t scores token t+1.",
            _lean(_log_prob, labels=lambda ids: ids[:, :], scored=lambda m: m)),
    Mistake("off by one: shift the mask together with the labels (the mask of token t+1, not of t).",
            _lean(_log_prob, scored=lambda m: m[:, :-1])),
    Mistake("mean instead of sum: DPO sums the token log-probs of the completion.", _lean(_log_prob, reduce="mean")),
    Mistake("the logsumexp is missing: log softmax(z)[k] = z_k - logsumexp(z), not the raw logit z_k.",
            _lean(lambda row, lab: _gather(row, lab))),
    Mistake("the sign of the logsumexp is flipped: log softmax(z)[k] = z_k - logsumexp(z).",
            _lean(lambda row, lab: _gather(row, lab) + torch.logsumexp(row, -1))),
]


# --------------------------------------------------------------------------- left-padded mask
def _left_case(g: torch.Generator, k: int) -> tuple:
    """A left-padded batch: row i has T - length_i pad tokens, then its prompt, then its completion."""
    B, T = 3 + k % 3, 8 + k
    lengths = torch.randint(4, T + 1, (B,), generator=g)
    lengths[k % B] = T                                            # the longest row has no padding
    prompt = torch.stack([torch.randint(1, int(n) - 1, (1,), generator=g)[0] for n in lengths])
    attention_mask = (torch.arange(T)[None, :] >= (T - lengths)[:, None]).long()
    return attention_mask, prompt


def reference_left_padded_mask(attention_mask, prompt_lengths):
    """1 on the completion tokens of a left-padded batch: positions ≥ (pad tokens + prompt length)."""
    T = attention_mask.shape[1]
    start = (T - attention_mask.sum(-1)) + prompt_lengths                  # [B] first completion position
    return (torch.arange(T)[None, :] >= start[:, None]).long()


def _from(start: Callable, strict: bool = False, invert: bool = False, keep_real: bool = True) -> Callable:
    def fn(am, pl):
        pos = torch.arange(am.shape[1])[None, :]
        s = start(am, pl)[:, None]
        m = (pos > s) if strict else (pos >= s)
        m = ~m if invert else m
        return (m & am.bool() if keep_real else m).long()
    return fn


def _pads(am, pl):
    return am.shape[1] - am.sum(-1) + pl


LEFT_MISTAKES = [
    Mistake("the rows are left-padded: a row's prompt starts after its padding, so its completion starts at "
            "(number of pad tokens) + prompt_length, not at prompt_length.", _from(lambda am, pl: pl)),
    Mistake("the padding sits on the left: the number of pad tokens of a row is T - attention_mask.sum(), and "
            "the completion starts that many positions later than the prompt length.",
            _from(lambda am, pl: pl, keep_real=False)),
    Mistake("off by one: the first completion token sits at index pads + prompt_length (use >=, not >).",
            _from(_pads, strict=True)),
    Mistake("off by one: the last prompt token is not part of the completion.",
            _from(lambda am, pl: _pads(am, pl) - 1)),
    Mistake("the mask is inverted: it should mark the completion, not the prompt.", _from(_pads, invert=True)),
    Mistake("the completion starts at pads + prompt_length, not at (real tokens - prompt_length): the prompt "
            "length counts the prompt, and the completion follows it.",
            _from(lambda am, pl: am.shape[1] - am.sum(-1) + (am.sum(-1) - pl))),
]

LOGPROB_GRADERS: dict[str, Grader] = {
    "lean_sequence_logprobs": HarnessGrader(
        "lean_sequence_logprobs", reference_lean_sequence_logprobs, _lean_case,
        ("logits", "input_ids", "completion_mask"), ("logps", "builds a [B, T-1, V] copy"), LEAN_MISTAKES,
        grads=(("logps", "logits"),), run=_run_lean),
    "left_padded_mask": Grader("left_padded_mask", reference_left_padded_mask, _left_case,
                               ("attention_mask", "prompt_lengths"), ("completion_mask",), LEFT_MISTAKES),
}


def check_lean_sequence_logprobs(fn: Callable) -> None:
    """``fn(logits [B,T,V], input_ids [B,T], completion_mask [B,T]) -> [B]`` summed, shifted log-probs, without
    building a second tensor of the logits' size."""
    LOGPROB_GRADERS["lean_sequence_logprobs"](fn)


def check_left_padded_mask(fn: Callable) -> None:
    """``fn(attention_mask [B,T] (left-padded), prompt_lengths [B]) -> [B,T]`` mask of the completion tokens."""
    LOGPROB_GRADERS["left_padded_mask"](fn)
