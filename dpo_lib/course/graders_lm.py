"""Graders for lessons 02 and 03 (re-exported by :mod:`dpo_lib.course.graders`, where the check cells find them).

These graders run the learner's function inside a small harness (``HarnessGrader.run``): it builds what the function
needs from a case (a tokenizer, a tiny model, an optimizer), calls it, and turns what comes back into tensors. Cases
use the course's tiny ChatML tokenizer and tiny Llama models built in code (no download, milliseconds each).
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch

from dpo_lib.course.grading_engine import (
    Grader,
    GradingError,
    HarnessGrader,
    Mistake,
    _Case,
    _describe,
    _gather,
    _GradModeProbe,
    probe_weights,
)
from dpo_lib.logprobs import concatenated_forward, sequence_logprobs
from dpo_lib.losses import dpo_loss

__all__ = ["LM_GRADERS", "check_concatenated_logps", "check_dpo_train_step", "check_reference_logps",
           "check_split_prompt_completion", "reference_concatenated_logps", "reference_dpo_train_step",
           "reference_reference_logps", "reference_split_prompt_completion"]

_WORDS = ["good", "bad", "film", "cafe", "slow", "warm", "cold", "nice", "plot", "rain", "sun", "tea"]
_TOKENIZERS: dict[bool, Any] = {}


def _tiny_tok(add_bos: bool = False):
    if add_bos not in _TOKENIZERS:
        from dpo_lib.models import tiny_tokenizer
        _TOKENIZERS[add_bos] = tiny_tokenizer(add_bos=add_bos)
    return _TOKENIZERS[add_bos]


def _words(g: torch.Generator, n_min: int, n_max: int) -> str:
    n = int(torch.randint(n_min, n_max + 1, (1,), generator=g))
    return " ".join(_WORDS[int(i)] for i in torch.randint(0, len(_WORDS), (n,), generator=g))


def _messages(g: torch.Generator, turns: int) -> list[dict]:
    msgs = []
    for t in range(turns):
        msgs.append({"role": "user", "content": _words(g, 1, 4) + "?"})
        if t < turns - 1:
            msgs.append({"role": "assistant", "content": _words(g, 1, 3) + "."})
    return msgs


def _ids(x: Any, what: str, name: str) -> torch.Tensor:
    if hasattr(x, "keys") and "input_ids" in x:  # a BatchEncoding from apply_chat_template / tokenizer
        x = x["input_ids"]
    if isinstance(x, torch.Tensor):
        x = x.reshape(-1).tolist()
    if not isinstance(x, (list, tuple)) or not all(isinstance(i, int) for i in x):
        raise GradingError(f"✗ {name}: {what} must be a list of token ids (ints), got {_describe(x)}")
    return torch.tensor(list(x), dtype=torch.long)


# --------------------------------------------------------------------------- prompt / completion split
def _template_ids(tokenizer, messages, **kwargs) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"])


def reference_split_prompt_completion(tokenizer, prompt, response):
    """Token ids of the prompt (with the assistant header) and of the completion (the answer and
    its end-of-turn tokens), as :func:`dpo_lib.features.tokenize_pair` splits them."""
    prompt_ids = _template_ids(tokenizer, prompt, add_generation_prompt=True)
    full_ids = _template_ids(tokenizer, prompt + response)
    return prompt_ids, full_ids[len(prompt_ids):]


def _split_case(g: torch.Generator, k: int) -> tuple:
    add_bos = k % 2 == 1  # odd cases: a tokenizer that also prepends BOS to every plain encoding
    prompt = _messages(g, 1 + (k % 3 == 2))
    response = [{"role": "assistant", "content": _words(g, 1, 5) + "."}]
    label = (f"tiny ChatML tokenizer ({'adds' if add_bos else 'no'} BOS on encode), "
             f"prompt={prompt!r}, response={response!r}")
    return (_Case(label, tokenizer=_tiny_tok(add_bos), prompt=prompt, response=response),)


def _run_split(fn: Callable, case: _Case) -> tuple:
    out = fn(case.tokenizer, copy.deepcopy(case.prompt), copy.deepcopy(case.response))
    if out is None:
        raise GradingError("✗ split_prompt_completion: your function returned None — did you forget `return`?")
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise GradingError("✗ split_prompt_completion: return a tuple (prompt_ids, completion_ids), "
                             f"got {_describe(out)}")
    return tuple(_ids(x, what, "split_prompt_completion") for x, what in zip(out, ("prompt_ids", "completion_ids")))


def _split_no_generation_prompt(tokenizer, prompt, response):
    prompt_ids = _template_ids(tokenizer, prompt)
    return prompt_ids, _template_ids(tokenizer, prompt + response)[len(prompt_ids):]


def _split_response_alone(tokenizer, prompt, response):
    return (_template_ids(tokenizer, prompt, add_generation_prompt=True),
            list(tokenizer(response[0]["content"], add_special_tokens=False)["input_ids"]))


def _split_text_then_encode(tokenizer, prompt, response):
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(prompt + response, tokenize=False)
    prompt_ids, full_ids = tokenizer(prompt_text)["input_ids"], tokenizer(full_text)["input_ids"]
    return prompt_ids, full_ids[len(prompt_ids):]


def _split_whole_sequence(tokenizer, prompt, response):
    return _template_ids(tokenizer, prompt, add_generation_prompt=True), _template_ids(tokenizer, prompt + response)


SPLIT_MISTAKES = [
    Mistake("the assistant header ('<|im_start|>assistant\\n') ended up in the completion: render the prompt with "
            "add_generation_prompt=True, so the header belongs to the prompt (the model does not write it).",
            _split_no_generation_prompt),
    Mistake("the completion has no end-of-turn token: take it from the chat template of prompt + response, so it "
            "ends with '<|im_end|>' (the model must learn to stop), instead of tokenizing the response text alone.",
            _split_response_alone),
    Mistake("duplicated BOS: the rendered template already starts with '<|im_start|>' and tokenizer(text) adds "
            "another; use apply_chat_template(..., tokenize=True) or tokenizer(text, add_special_tokens=False).",
            _split_text_then_encode),
    Mistake("the completion still contains the prompt: keep only the tokens after the prompt "
            "(full_ids[len(prompt_ids):]).", _split_whole_sequence),
]


# --------------------------------------------------------------------------- tiny language-model cases
def _tiny_lm(seed: int):
    from dpo_lib.models import tiny_model
    with torch.random.fork_rng(devices=[]):  # tiny_model seeds the global RNG: keep the learner's state
        return tiny_model(vocab_size=len(_tiny_tok()), seed=seed)


def _pair_batch(g: torch.Generator, n_pairs: int) -> dict:
    from dpo_lib.features import collate, tokenize_pair
    rows = [{"prompt": _messages(g, 1),
             "chosen": [{"role": "assistant", "content": _words(g, 1, 4)}],
             "rejected": [{"role": "assistant", "content": _words(g, 1, 4) + " no"}]} for _ in range(n_pairs)]
    tok = _tiny_tok()
    return collate([tokenize_pair(tok, r) for r in rows], tok.pad_token_id)


def _batch_label(batch: dict) -> str:
    B2, T = batch["input_ids"].shape
    return f"{B2 // 2} pair(s), input_ids [{B2}, {T}]"


def _lm_case(g: torch.Generator, k: int) -> tuple:
    batch = _pair_batch(g, (2, 1, 3, 2, 4, 1)[k % 6])
    return (_Case(f"tiny Llama (seed {k}), batch of {_batch_label(batch)}", model=_tiny_lm(k), batch=batch),)


def _clone_batch(batch: dict) -> dict:
    return {k: v.clone() for k, v in batch.items()}


def _pair_of_logps(out: Any, name: str) -> tuple:
    if out is None:
        raise GradingError(f"✗ {name}: your function returned None — did you forget `return`?")
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise GradingError(f"✗ {name}: return a tuple (chosen_logps, rejected_logps), got {_describe(out)}")
    return tuple(out)


def reference_concatenated_logps(model, batch):
    """:func:`dpo_lib.logprobs.concatenated_forward`: ``(chosen_logps [B], rejected_logps [B])``."""
    return concatenated_forward(model, batch)


def _weight_gradient(model, chosen, rejected) -> torch.Tensor:
    """The gradient, over every weight of ``model``, of a fixed weighted sum of the chosen and rejected
    log-probs (zeros when they are not in the autograd graph): what a backward through them would see."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = sum((t * probe_weights(t) * sign).sum() for t, sign in ((chosen, 1.0), (rejected, -0.5))
                if isinstance(t, torch.Tensor) and t.requires_grad)
    if not isinstance(total, torch.Tensor):  # neither output is in the graph
        return torch.cat([torch.zeros_like(p).reshape(-1) for p in params])
    grads = torch.autograd.grad(total, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)])


def _run_concatenated(fn: Callable, case: _Case) -> tuple:
    chosen, rejected = _pair_of_logps(fn(case.model, _clone_batch(case.batch)), "concatenated_logps")
    return chosen, rejected, _weight_gradient(case.model, chosen, rejected)


def _all_logps(model, batch, mask=None, shift=True, average=False):
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    ids, m = batch["input_ids"], batch["completion_mask"] if mask is None else mask
    if shift:
        return sequence_logprobs(out.logits, ids, m, average=average)
    return (_gather(out.logits.log_softmax(-1), ids) * m).sum(-1)


CONCATENATED_MISTAKES = [
    Mistake("chosen and rejected are swapped: rows 0..B-1 of the batch are prompt+chosen, rows B..2B-1 "
            "prompt+rejected.", lambda model, batch: tuple(reversed(_all_logps(model, batch).chunk(2)))),
    Mistake("the rows are not interleaved: the first half of the batch is chosen, the second half rejected "
            "(logps.chunk(2), not logps[0::2] and logps[1::2]).",
            lambda model, batch: (_all_logps(model, batch)[0::2], _all_logps(model, batch)[1::2])),
    Mistake("mean instead of sum: DPO sums the token log-probs of each completion.",
            lambda model, batch: _all_logps(model, batch, average=True).chunk(2)),
    Mistake("the labels are not shifted: the logit at position t scores token t+1.",
            lambda model, batch: _all_logps(model, batch, shift=False).chunk(2)),
    Mistake("the prompt is not masked: score only the completion tokens (completion_mask), not every real "
            "token (attention_mask).",
            lambda model, batch: _all_logps(model, batch, mask=batch["attention_mask"]).chunk(2)),
    Mistake("the log-probs carry no gradient: the values are right, but they were computed under torch.no_grad() "
            "(or detached), so loss.backward() cannot reach the policy's weights. The policy's forward must run "
            "with autograd on; only the reference runs under no_grad.",
            lambda model, batch: tuple(t.detach() for t in concatenated_forward(model, batch))),
]


# --------------------------------------------------------------------------- the frozen reference
def reference_reference_logps(ref_model, batch):
    """The reference's ``(chosen_logps, rejected_logps)``, computed under ``torch.no_grad()``."""
    with torch.no_grad():
        return concatenated_forward(ref_model, batch)


def _tracked_logps(fn: Callable, case: _Case, name: str) -> tuple:
    """The learner's log-probs on a copy of the case's model (which requires grad), whether autograd tracked them."""
    model = copy.deepcopy(case.model)
    probe = _GradModeProbe(model)
    try:
        chosen, rejected = _pair_of_logps(fn(model, _clone_batch(case.batch)), name)
    finally:
        tracked = probe.close()
    tracked = tracked or any(isinstance(t, torch.Tensor) and t.requires_grad for t in (chosen, rejected))
    return chosen, rejected, float(tracked), model


def _run_reference(fn: Callable, case: _Case) -> tuple:
    return _tracked_logps(fn, case, "reference_logps")[:3]


def _no_grad(fn: Callable) -> Callable:
    return torch.no_grad()(fn)


def _reference_with_grad(ref_model, batch):
    return concatenated_forward(ref_model, batch)


REFERENCE_MISTAKES = [
    Mistake("the reference ran with gradients enabled: wrap its forward in `with torch.no_grad():` (the reference "
            "is frozen; with autograd on it keeps every activation for a backward that must never happen, and "
            ".detach() afterwards does not give that memory back).", _reference_with_grad),
    Mistake("chosen and rejected are swapped: rows 0..B-1 of the batch are prompt+chosen, rows B..2B-1 "
            "prompt+rejected.", lambda m, b: tuple(reversed(reference_reference_logps(m, b)))),
    Mistake("mean instead of sum: the reference's log-probs are summed like the policy's.",
            lambda m, b: _no_grad(_all_logps)(m, b, average=True).chunk(2)),
]


# --------------------------------------------------------------------------- one DPO training step
def _train_step(logps: Callable = concatenated_forward, beta_in_loss: bool = True, reduce: str = "mean",
                ref: str = "no_grad", swap: bool = False, backward: bool = True, step: bool = True,
                zero_grad: bool = True) -> Callable:
    """A DPO step ``(policy, ref_model, optimizer, batch, beta) -> loss``; the flags make the mistakes."""
    def train_step(policy, ref_model, optimizer, batch, beta):
        chosen, rejected = logps(policy, batch)
        if ref == "no_grad":
            with torch.no_grad():
                ref_chosen, ref_rejected = logps(ref_model, batch)
        elif ref == "grad":
            ref_chosen, ref_rejected = logps(ref_model, batch)
        else:  # the policy as its own reference
            ref_chosen, ref_rejected = chosen.detach(), rejected.detach()
        if swap:
            chosen, rejected, ref_chosen, ref_rejected = rejected, chosen, ref_rejected, ref_chosen
        losses, _, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta if beta_in_loss else 1.0)
        loss = losses.mean() if reduce == "mean" else losses.sum()
        if zero_grad:
            optimizer.zero_grad()
        if backward:
            loss.backward()
        if step:
            optimizer.step()
        return loss.item()
    return train_step


reference_dpo_train_step = _train_step()
reference_dpo_train_step.__doc__ = ("Policy log-probs with gradients, reference log-probs under no_grad, mean DPO "
                                    "loss, zero_grad / backward / step; returns the loss as a float.")


# Well-conditioned steps: β·lr small enough that two SGD steps keep |Δw| < 1, so a correct step written another way
# agrees to float rounding (with lr = 2 and β = 2 the weights reached |w| ≈ 190 and correct answers differed by 1e-3).
_TRAIN_BETAS = (0.1, 0.5, 0.05, 0.3, 0.2, 0.4)


def _train_case(g: torch.Generator, k: int) -> tuple:
    policy = _tiny_lm(k)
    same = k % 2 == 0  # even cases: the reference is a copy of the policy (loss ln 2 at the first step)
    ref = copy.deepcopy(policy) if same else _tiny_lm(100 + k)
    batches = [_pair_batch(g, (2, 1, 3)[k % 3]), _pair_batch(g, (1, 2, 2)[k % 3])]
    beta, lr = _TRAIN_BETAS[k % len(_TRAIN_BETAS)], 0.2
    label = (f"tiny Llama policy (seed {k}), reference = {'a copy of the policy' if same else f'seed {100 + k}'}, "
             f"beta={beta}, SGD lr={lr}, two steps on batches of {_batch_label(batches[0])} and "
             f"{_batch_label(batches[1])}")
    return (_Case(label, policy=policy, ref=ref, batches=batches, beta=beta, lr=lr),)


def _run_train_step(fn: Callable, case: _Case) -> tuple:
    policy, ref = copy.deepcopy(case.policy), copy.deepcopy(case.ref)  # ref params require grad, like a plain copy
    policy.train()
    optimizer = torch.optim.SGD(policy.parameters(), lr=case.lr)
    probe = _GradModeProbe(ref)
    losses = []
    try:
        for batch in case.batches:
            loss = fn(policy, ref, optimizer, _clone_batch(batch), case.beta)
            if loss is None:
                raise GradingError("✗ dpo_train_step: your function returned None — did you forget `return`?")
            if isinstance(loss, torch.Tensor) and loss.numel() == 1:
                loss = loss.item()
            if not isinstance(loss, (int, float)):
                raise GradingError(f"✗ dpo_train_step: return the loss of the step (a float), got {_describe(loss)}")
            losses.append(float(loss))
    finally:
        tracked = probe.close()
    tracked = tracked or any(p.grad is not None for p in ref.parameters())
    weights = torch.cat([p.detach().reshape(-1) for p in policy.parameters()])
    return torch.tensor(losses), weights, float(tracked)


TRAIN_STEP_MISTAKES = [
    Mistake("β is missing: the loss is -log σ(β·h); pass beta to the loss.", _train_step(beta_in_loss=False)),
    Mistake("the reference ran with gradients enabled: compute its log-probs under `with torch.no_grad():` "
            "(otherwise loss.backward() also fills .grad of the frozen reference's parameters).",
            _train_step(ref="grad")),
    Mistake("the weights did not change: call loss.backward(), then optimizer.step() "
            "(and optimizer.zero_grad() before the backward, not between backward and step).",
            _train_step(step=False)),
    Mistake("optimizer.zero_grad() is missing: the gradients of the previous step are added to this one.",
            _train_step(zero_grad=False)),
    Mistake("mean instead of sum: the sequence log-probs are sums over the completion tokens.",
            _train_step(logps=lambda m, b: concatenated_forward(m, b, average=True))),
    Mistake("the loss is summed over the pairs: average it (losses.mean()), so the step size does not grow "
            "with the batch.", _train_step(reduce="sum")),
    Mistake("chosen and rejected are swapped: rows 0..B-1 are prompt+chosen.", _train_step(swap=True)),
    Mistake("the reference log-probs must come from ref_model, not from the policy (the loss is then always ln 2 "
            "and nothing is learned).", _train_step(ref="policy")),
]


LM_GRADERS: dict[str, Grader] = {g.name: g for g in [
    HarnessGrader("split_prompt_completion", reference_split_prompt_completion, _split_case, ("case",),
                  ("prompt_ids", "completion_ids"), SPLIT_MISTAKES, run=_run_split),
    HarnessGrader("concatenated_logps", reference_concatenated_logps, _lm_case, ("case",),
                  ("chosen_logps", "rejected_logps", "weight_gradient"), CONCATENATED_MISTAKES, run=_run_concatenated),
    HarnessGrader("reference_logps", reference_reference_logps, _lm_case, ("case",),
                  ("chosen_logps", "rejected_logps", "gradients_tracked"), REFERENCE_MISTAKES, run=_run_reference),
    HarnessGrader("dpo_train_step", reference_dpo_train_step, _train_case, ("case",),
                  ("losses", "policy_weights", "gradients_tracked"), TRAIN_STEP_MISTAKES, run=_run_train_step),
]}


def check_split_prompt_completion(fn: Callable) -> None:
    """``fn(tokenizer, prompt_messages, response_messages) -> (prompt_ids, completion_ids)`` (lists of ints):
    the prompt with the assistant header, and the completion with its end-of-turn token."""
    LM_GRADERS["split_prompt_completion"](fn)


def check_concatenated_logps(fn: Callable) -> None:
    """``fn(model, batch) -> (chosen_logps [B], rejected_logps [B])`` from one forward over the collated
    ``[chosen; rejected]`` batch (rows 0..B-1 chosen, B..2B-1 rejected)."""
    LM_GRADERS["concatenated_logps"](fn)


def check_reference_logps(fn: Callable) -> None:
    """``fn(ref_model, batch) -> (chosen_logps [B], rejected_logps [B])`` under ``torch.no_grad()``."""
    LM_GRADERS["reference_logps"](fn)


def check_dpo_train_step(fn: Callable) -> None:
    """``fn(policy, ref_model, optimizer, batch, beta) -> loss`` (a float): one DPO optimizer step.
    Run twice per case with SGD; the losses, the policy's weights afterwards and whether the
    reference ever ran with gradients are compared with the reference step."""
    LM_GRADERS["dpo_train_step"](fn)
