r"""Sequence log-probabilities of completions: :math:`\log\pi(y|x)=\sum_t \log\pi(y_t|x,y_{<t})`.

A causal LM's logit at position ``t`` predicts token ``t+1``. So, for a batch of
``input_ids`` (prompt followed by completion) and a ``completion_mask`` that marks the
completion tokens *of input_ids*, the score of token ``t+1`` is read from
``logits[:, t]``: we shift by one inside :func:`sequence_logprobs`, never outside it.

DPO (Rafailov et al. 2023, Eq. 7) uses the *sum* over completion tokens; ``average=True``
gives the per-token mean used by length-normalised variants (SimPO, TRL's IPO).

Memory: ``log_softmax(logits)`` would allocate a second ``[B, T, V]`` tensor — for a
49k-token vocabulary that is the largest tensor of the whole step. We compute
``log p(token) = logit[token] - logsumexp(logits)`` one sequence at a time, so the
largest temporary is ``[T, V]``.
"""

from __future__ import annotations

import torch


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[..., labels]`` for ``logits [B, T, V]`` and ``labels [B, T]``.

    Returns ``[B, T]`` without materialising ``log_softmax`` of the whole batch.
    """
    picked = torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1)      # (B, T)
    lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])     # (B, T), one (T, V) temp at a time
    return picked - lse


def sequence_logprobs(
    logits: torch.Tensor,           # (B, T, V) model output for input_ids
    input_ids: torch.Tensor,        # (B, T)
    completion_mask: torch.Tensor,  # (B, T) 1 where input_ids[t] is a scored completion token
    average: bool = False,
) -> torch.Tensor:
    """Summed (or, with ``average=True``, mean) log-prob of the masked tokens. Returns ``[B]``."""
    if logits.dim() != 3 or input_ids.shape != logits.shape[:2] or completion_mask.shape != input_ids.shape:
        raise ValueError(
            "expected logits [B, T, V], input_ids [B, T], completion_mask [B, T]; got "
            f"{tuple(logits.shape)}, {tuple(input_ids.shape)}, {tuple(completion_mask.shape)}"
        )
    labels = input_ids[:, 1:]                                  # (B, T-1) token t+1 ...
    mask = completion_mask[:, 1:].to(logits.dtype)             # (B, T-1)
    per_token = token_logprobs(logits[:, :-1], labels)         # (B, T-1) ... scored by logit t
    summed = (per_token * mask).sum(-1)                        # (B,)
    if average:
        return summed / mask.sum(-1).clamp(min=1)
    return summed


def concatenated_forward(model, batch: dict, average: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over the ``[chosen; rejected]`` batch of :func:`dpo_lib.data.collate`.

    Returns ``(chosen_logps, rejected_logps)``, each ``[B]``. One forward instead of two
    halves the number of kernel launches and keeps batch statistics identical for both.

    The LM head runs only from the position before the earliest completion token onward
    (``logits_to_keep``): logits over the shared prompt prefix are never needed, and with
    a 49k vocabulary they are most of the step's memory.
    """
    input_ids, completion_mask = batch["input_ids"], batch["completion_mask"]    # (2B, T)
    T = input_ids.shape[1]
    has_completion = completion_mask.any(dim=1)
    if not bool(has_completion.all()):
        raise ValueError("every row of the batch needs at least one completion token")
    first = int(completion_mask.float().argmax(dim=1).min())                      # earliest completion token
    start = max(first - 1, 0)                                                      # its logit sits one before
    attention_mask = batch["attention_mask"]
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)                   # left padding works too
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                logits_to_keep=T - start)
    logits = out.logits                                                            # (2B, T - start, V)
    logps = sequence_logprobs(logits, input_ids[:, start:], completion_mask[:, start:], average=average)
    return logps.chunk(2)                                                          # (B,), (B,)
