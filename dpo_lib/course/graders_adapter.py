"""Grader for lesson 05's central idea (re-exported by :mod:`dpo_lib.course.graders`): with LoRA the reference
is the policy's own base, its adapter switched off — no second model in memory.

The harness wraps a tiny Llama in peft LoRA adapters whose ``B`` matrices are not zero (a trained adapter: the
policy differs from its base), calls the learner's function, and reports, besides the two log-probs, whether
autograd was on during a forward and whether the adapter is on again afterwards (training continues with it).
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch

from dpo_lib.course.graders_lm import _pair_batch, _tiny_lm, _tracked_logps
from dpo_lib.course.grading_engine import HarnessGrader, Mistake, _Case
from dpo_lib.logprobs import concatenated_forward

__all__ = ["ADAPTER_GRADERS", "check_adapter_reference", "reference_adapter_reference"]


def _peft_case(g: torch.Generator, k: int) -> tuple:
    from dpo_lib.lora import make_lora_model
    with warnings.catch_warnings():  # transformers' deprecation notices, raised inside peft
        warnings.simplefilter("ignore", FutureWarning)
        model = make_lora_model(_tiny_lm(k), r=2, alpha=4)
    with torch.no_grad():  # a trained adapter: B != 0, so the policy is not its base
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    model.train(k % 2 == 0)
    batch = _pair_batch(g, (2, 1, 3, 2, 1, 2)[k])
    return (_Case(f"tiny Llama with a LoRA adapter (seed {k}), {batch['input_ids'].shape[0] // 2} pair(s)",
                  model=model, batch=batch),)


def reference_adapter_reference(model, batch):
    """The reference's ``(chosen_logps, rejected_logps)``: the same peft model with its adapter disabled, no
    autograd (what :class:`dpo_lib.reference.AdapterDisabledReference` computes)."""
    with torch.no_grad(), model.disable_adapter():
        return concatenated_forward(model, batch)


def _run_adapter(fn: Callable, case: _Case) -> tuple:
    chosen, rejected, tracked, model = _tracked_logps(fn, case, "adapter_reference")
    with torch.no_grad():
        after = torch.cat(concatenated_forward(model, case.batch))
        policy = torch.cat(concatenated_forward(case.model, case.batch))
    return chosen, rejected, tracked, float(torch.allclose(after, policy, atol=1e-5))


def _with_adapter(model, batch):
    with torch.no_grad():
        return concatenated_forward(model, batch)


def _with_grad(model, batch):
    with model.disable_adapter():
        return tuple(t.detach() for t in concatenated_forward(model, batch))


def _left_off(model, batch):
    model.base_model.disable_adapter_layers()
    with torch.no_grad():
        return concatenated_forward(model, batch)


def _averaged(model, batch):
    with torch.no_grad(), model.disable_adapter():
        return concatenated_forward(model, batch, average=True)


ADAPTER_MISTAKES = [
    Mistake("the adapter is still on: those are the policy's log-probs, so every implicit reward would be 0. "
            "Switch the adapter off for this forward (get_base_model() is no way out: it returns the model "
            "with its LoRA layers still inside).", _with_adapter),
    Mistake("autograd was on during the reference's forward: the values are right, but the graph and its "
            "activations were kept for a backward that never comes (.detach() afterwards is too late). Run the "
            "forward without autograd.", _with_grad),
    Mistake("the adapter is still off after your function returns: the next training step would train a model "
            "without its adapter. Switch it off only for the reference's forward (a context manager restores "
            "it, even when the forward raises).", _left_off),
    Mistake("mean instead of sum: the reference's log-probs are summed over the completion tokens, like the "
            "policy's.", _averaged),
]

ADAPTER_GRADERS = {
    "adapter_reference": HarnessGrader(
        "adapter_reference", reference_adapter_reference, _peft_case, ("model_and_batch",),
        ("ref_chosen", "ref_rejected", "autograd on", "adapter on afterwards"), ADAPTER_MISTAKES, run=_run_adapter),
}


def check_adapter_reference(fn: Callable) -> None:
    """``fn(model, batch) -> (chosen_logps [B], rejected_logps [B])`` of the reference: the peft ``model`` with its
    adapter disabled, without autograd, the adapter on again afterwards."""
    ADAPTER_GRADERS["adapter_reference"](fn)
