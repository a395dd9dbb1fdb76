r"""Sequence log-probabilities of completions: :math:`\log\pi(y|x)=\sum_t \log\pi(y_t|x,y_{<t})`.

A causal LM's logit at position ``t`` predicts token ``t+1``. So, for a batch of
``input_ids`` (prompt followed by completion) and a ``completion_mask`` that marks the
completion tokens *of input_ids*, the score of token ``t+1`` is read from
``logits[:, t]``: we shift by one inside :func:`sequence_logprobs`, never outside it.

DPO (Rafailov et al. 2023, Eq. 7) uses the *sum* over completion tokens; ``average=True``
gives the per-token mean used by length-normalised variants (SimPO, TRL's IPO).

Precision: a sequence log-prob is a sum of ~100 token log-probs of size ~1-10. In bf16 (8 bits
of mantissa) each term is rounded by up to ~0.03 and the sum by much more, which is the same
order as the DPO reward margins early in training. So :func:`concatenated_forward` upcasts the
logits it asks for to fp32 before the log-softmax and the sums, as TRL does: the log-probs are
fp32 whatever the model's dtype. The half-precision logits are freed as soon as they are cast,
so one ``[2B, T, V]`` fp32 tensor stays alive (the VRAM planner counts the logits in fp32); on
an fp32 model the cast is free.

Memory: ``log_softmax(logits)`` would allocate a second ``[B, T, V]`` tensor — for a
49k-token vocabulary that is the largest tensor of the whole step. We compute
``log p(token) = logit[token] - logsumexp(logits)`` one sequence at a time, so the
largest temporary is ``[T, V]``.

Speed (``concatenated_forward(..., compact_head=True)``): the LM head is a ``d x V``
matmul per position — for SmolLM2-135M about a fifth of the forward. Only the positions
that score a completion token need it, so the compact path runs the backbone, gathers the
``M`` hidden states that score completion tokens (``M`` = completion tokens in the batch,
typically well under half of ``B x T``), and computes ``[M, V]`` logits once, with a fused
log-softmax-gather whose backward writes the logits gradient in place
(:func:`linear_token_logprobs`). Same numbers as the default path to float rounding. The padding a
micro-batch's rows carry is the subject of :mod:`dpo_lib.padding_free`.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from dpo_lib.padding_free import model_attention, padding_free_layout, segment_attention

__all__ = ["SHARED_PROMPT_ATTENTION", "concatenated_forward", "linear_token_logprobs", "sequence_logprobs",
           "shared_prompt_layout", "sparse_embedding_grad", "token_logprobs"]


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


class _LinearTokenLogprobs(torch.autograd.Function):
    """``log softmax(h @ W.T + b)[target]`` for ``M`` rows; the ``[M, V]`` logits are kept once
    (float32) and turned into their own gradient in place in the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets):                                 # (M, d), (V, d), (V,)|None, (M,)
        dev = hidden.device.type
        cdt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
        with torch.autocast(dev, enabled=False):
            logits = hidden.to(cdt) @ weight.to(cdt).t()                              # (M, V)
            if bias is not None:
                logits = logits + bias.to(cdt)
            logits = logits.float()
            lse = torch.logsumexp(logits, dim=-1)                                     # (M,)
            picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)            # (M,)
        ctx.save_for_backward(hidden, weight, bias, targets, logits, lse)
        ctx.cdt, ctx.used = cdt, False
        return picked - lse

    @staticmethod
    def backward(ctx, grad):                                                          # (M,)
        if ctx.used:
            raise RuntimeError("linear_token_logprobs: backward can run only once (retain_graph is not supported)")
        ctx.used = True
        hidden, weight, bias, targets, logits, lse = ctx.saved_tensors
        g = logits.sub_(lse.unsqueeze(-1)).exp_()                                     # softmax, in place
        g.mul_(-grad.unsqueeze(-1))                                                   # d logp / d logits = onehot - p
        g.scatter_add_(-1, targets.unsqueeze(-1), grad.unsqueeze(-1).float())
        cdt = ctx.cdt
        with torch.autocast(hidden.device.type, enabled=False):
            gc = g.to(cdt)
            grad_hidden = (gc @ weight.to(cdt)).to(hidden.dtype) if ctx.needs_input_grad[0] else None
            grad_weight = (gc.t() @ hidden.to(cdt)).to(weight.dtype) if ctx.needs_input_grad[1] else None
            grad_bias = g.sum(0).to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        return grad_hidden, grad_weight, grad_bias, None


def linear_token_logprobs(hidden: torch.Tensor, lm_head: torch.nn.Module, targets: torch.Tensor) -> torch.Tensor:
    """Log-prob of ``targets [M]`` under ``lm_head(hidden [M, d])``; returns ``[M]`` in float32.

    A plain ``nn.Linear`` head goes through a fused function (one ``[M, V]`` float32 buffer,
    reused for the gradient); any other head (LoRA-wrapped, quantised) through its own forward.
    """
    if type(lm_head) is torch.nn.Linear:
        return _LinearTokenLogprobs.apply(hidden, lm_head.weight, lm_head.bias, targets)
    logits = lm_head(hidden).float()                                                  # (M, V)
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


@contextmanager
def sparse_embedding_grad(model, enabled: bool = True):
    """Forwards inside give the input embedding a *sparse* gradient, where the embedding is tied to the LM
    head (SmolLM2, Llama 3.2 1B …) and trains.

    Why: an ``nn.Embedding``'s backward fills a dense ``[V, d]`` zero tensor and adds the rows of the
    batch's tokens; autograd then adds it to the LM head's dense ``[V, d]`` gradient of the same tied
    weight. For a 49k × 576 vocabulary that is two passes over 113 MB of float32 per micro-batch for
    a few hundred non-zero rows. A sparse embedding gradient is added into the head's dense one row by
    row instead, so the weight's ``.grad`` is dense as before (the fused AdamW needs that) and equal to
    it up to the order in which a repeated token's rows are summed. Untied or frozen embeddings, and
    models wrapped for several processes, are left as they are (their ``.grad`` would be sparse)."""
    embedding = _tied_trainable_embedding(model) if enabled else None
    if embedding is None:
        yield
        return
    before, embedding.sparse = embedding.sparse, True
    try:
        yield
    finally:
        embedding.sparse = before


def _tied_trainable_embedding(model) -> torch.nn.Embedding | None:
    """The model's input ``nn.Embedding`` when it shares its weight with the LM head and that weight trains."""
    try:
        embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if type(embedding) is not torch.nn.Embedding or head is None or getattr(head, "weight", None) is None:
        return None
    tied = embedding.weight is head.weight and embedding.weight.requires_grad
    return embedding if tied else None


_LOGIT_MODIFIERS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier",
                    "lm_head_multiplier")


def _compact_head_parts(model):
    """``(decoder, lm_head)`` when the compact path reproduces the model's logits exactly, else ``None``
    (logit soft-capping or scaling, FSDP-sharded weights, no ``get_decoder``)."""
    inner = model
    while isinstance(inner, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        inner = inner.module
    if any(type(m).__name__.startswith(("FullyShardedDataParallel", "FSDP")) for m in inner.modules()):
        return None
    try:
        config = inner.config.get_text_config() if hasattr(inner.config, "get_text_config") else inner.config
        decoder, lm_head = inner.get_decoder(), inner.get_output_embeddings()
    except (AttributeError, NotImplementedError, ValueError):
        return None
    if decoder is None or decoder is inner or lm_head is None:
        return None
    if any(getattr(config, k, None) not in (None, 1.0) for k in _LOGIT_MODIFIERS):
        return None
    weight = getattr(lm_head, "weight", None)
    if weight is None or weight.dim() != 2 or type(weight) not in (torch.nn.Parameter, torch.Tensor):
        return None
    return decoder, lm_head


def _decoder_states(model, decoder, **inputs) -> torch.Tensor:
    """The decoder's last hidden states ``(N, L, d)`` of ``model(**inputs)``, the model called as a whole (so DDP and
    peft wrappers work) with its own LM head on one position only."""
    seen = {}
    handle = decoder.register_forward_hook(lambda mod, args, out: seen.__setitem__("h", out[0]))
    try:
        model(**inputs, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    return seen["h"]


def _scored_sums(hidden, lm_head, targets, rows, n_rows: int, average: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(chosen, rejected)`` log-probs from ``hidden (M, d)`` scoring ``targets (M,)`` of sequence ``rows (M,)``."""
    per_token = linear_token_logprobs(hidden, lm_head, targets)                   # (M,) float32
    logps = per_token.new_zeros(n_rows).index_add(0, rows, per_token)             # (2B,)
    if average:
        logps = logps / torch.bincount(rows, minlength=n_rows).clamp(min=1)
    return logps.chunk(2)


def shared_prompt_layout(batch: dict, pad_id: int = 0) -> dict | None:
    """One row per pair, ``[prompt | chosen | rejected]``, from a collated ``[chosen; rejected]`` batch (2B rows).

    The chosen and the rejected sequence of a pair share their prompt, so its tokens need one pass, not two:
    the rejected tokens attend to the prompt and to themselves, never to the chosen tokens, and take the
    positions they have in their own sequence (``P .. P+R-1``), so each token sees exactly the context and
    the rotary positions it has in the two-row layout. The rejected reply's first token is scored by the
    prompt's last hidden state, like the chosen one's.

    Returns ``input_ids`` and ``position_ids`` ``(B, L)``, ``allowed`` ``(B, 1, L, L)`` (True: query may attend
    to key), ``lengths`` ``(B,)`` (each row's real tokens), and the scored tokens: ``hidden_index`` ``(M, 2)``
    (row, position of the hidden state that scores each), ``targets`` ``(M,)``, ``out_rows`` ``(M,)`` (i for the
    chosen reply of pair i, B+i for its rejected one). ``None`` when a pair does not fit it (different prompts,
    scored tokens not one contiguous run).
    """
    ids, attn, scored = (batch[k].tolist() for k in ("input_ids", "attention_mask", "completion_mask"))
    B = len(ids) // 2
    rows = []
    for i in range(B):
        seqs = []
        for r in (i, B + i):
            tokens = [t for t, a in zip(ids[r], attn[r]) if a]                   # left or right padding dropped
            marks = [m for m, a in zip(scored[r], attn[r]) if a]
            first = marks.index(1) if 1 in marks else 0
            end = len(marks) - marks[::-1].index(1) if 1 in marks else 0
            if first < 1 or not all(marks[first:end]):
                return None
            seqs.append((tokens[:first], tokens[first:end]))
        (prompt, chosen), (prompt_r, rejected) = seqs
        if prompt != prompt_r:
            return None
        rows.append((prompt, chosen, rejected))
    lengths = [len(p) + len(c) + len(r) for p, c, r in rows]
    L = max(lengths)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    position_ids = torch.zeros((B, L), dtype=torch.long)
    allowed = torch.zeros((B, 1, L, L), dtype=torch.bool)
    causal = torch.ones((L, L), dtype=torch.bool).tril()                          # (L, L) key <= query
    hidden_index, targets, out_rows = [], [], []
    for i, (prompt, chosen, rejected) in enumerate(rows):
        P, C, R = len(prompt), len(chosen), len(rejected)
        n = P + C + R
        input_ids[i, :n] = torch.tensor(prompt + chosen + rejected)
        position_ids[i, :n] = torch.cat([torch.arange(P + C), torch.arange(P, P + R)])
        allowed[i, 0, :n, :n] = causal[:n, :n]
        allowed[i, 0, P + C:n, P:P + C] = False                                   # rejected never sees chosen
        allowed[i, 0, n:, 0] = True                                               # padding rows: one key, no NaN
        hidden_index += [(i, P - 1 + j) for j in range(C)] + [(i, P - 1)] + [(i, P + C + k) for k in range(R - 1)]
        targets += chosen + rejected
        out_rows += [i] * C + [B + i] * R
    return {"input_ids": input_ids, "position_ids": position_ids, "allowed": allowed,
            "lengths": torch.tensor(lengths),
            "hidden_index": torch.tensor(hidden_index), "targets": torch.tensor(targets),
            "out_rows": torch.tensor(out_rows)}


SHARED_PROMPT_ATTENTION = ("eager", "sdpa")  # attention implementations that take a custom 4D mask as given


def _shared_prompt_forward(model, parts, batch: dict, average: bool,
                           padding_free: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`concatenated_forward` on the :func:`shared_prompt_layout`; ``None`` where it does not apply."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) not in SHARED_PROMPT_ATTENTION:
        return None
    layout = shared_prompt_layout(batch)
    if layout is None:
        return None
    device = batch["input_ids"].device
    allowed = layout["allowed"].to(device)                                       # (B, 1, L, L)
    if config._attn_implementation == "eager":                                   # eager adds the mask to the scores
        dtype = next(model.parameters()).dtype
        allowed = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
    decoder, lm_head = parts
    attention = model_attention(model, config._attn_implementation) if padding_free else None
    if attention is not None and not (model.training and getattr(decoder, "gradient_checkpointing", False)):
        # (recomputed checkpoints would run after the attention function is put back: those keep the padded rows)
        packed = padding_free_layout(layout)
        with segment_attention(model, packed, attention, device):
            states = _decoder_states(model, decoder, input_ids=packed["input_ids"].to(device),
                                     attention_mask=allowed, position_ids=packed["position_ids"].to(device))
        scored = states[0][packed["hidden_index"].to(device)]                      # (1, T, d) -> (M, d)
    else:
        states = _decoder_states(model, decoder, input_ids=layout["input_ids"].to(device), attention_mask=allowed,
                                 position_ids=layout["position_ids"].to(device))  # (B, L, d)
        index = layout["hidden_index"].to(device)
        scored = states[index[:, 0], index[:, 1]]                                  # (M, d)
    return _scored_sums(scored, lm_head, layout["targets"].to(device), layout["out_rows"].to(device),
                        batch["input_ids"].shape[0], average)


def concatenated_forward(model, batch: dict, average: bool = False, compact_head: bool = False,
                         shared_prompt: bool = False, padding_free: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over the ``[chosen; rejected]`` batch of :func:`dpo_lib.features.collate`.

    Returns ``(chosen_logps, rejected_logps)``, each ``[B]``. One forward instead of two
    halves the number of kernel launches and keeps batch statistics identical for both.

    ``compact_head=True`` runs the LM head only on the positions that score a completion
    token (see the module docstring); it falls back to the path below for models whose
    logits it cannot reproduce (soft-capping, logit scaling, FSDP). The model is still
    called as a whole (with ``logits_to_keep=1``), so DDP and peft wrappers work.

    The LM head runs only from the position before the earliest completion token onward
    (``logits_to_keep``): logits over the shared prompt prefix are never needed, and with
    a 49k vocabulary they are most of the step's memory.

    ``shared_prompt=True`` (with ``compact_head``) runs each pair as one row ``[prompt | chosen | rejected]``
    (:func:`shared_prompt_layout`): the prompt's tokens go through the model once instead of twice, the same
    numbers to float rounding. It falls back to the two-row layout where the attention implementation cannot
    take a custom mask (:data:`SHARED_PROMPT_ATTENTION`) or a pair's prompts differ. ``padding_free=True`` (with
    ``shared_prompt``) lays those rows end to end, so the linear layers run on real tokens only, and attention
    runs pair by pair as before (:func:`dpo_lib.padding_free.padding_free_layout`): the same numbers.

    The log-probs are fp32 even from a bf16/fp16 model: the logits are upcast before they
    are summed (see the module docstring).
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
    parts = _compact_head_parts(model) if compact_head else None
    shared = None
    if parts is not None and shared_prompt:
        shared = _shared_prompt_forward(model, parts, batch, average, padding_free)
    if shared is not None:
        return shared
    if parts is not None:
        decoder, lm_head = parts
        states = _decoder_states(model, decoder, input_ids=input_ids, attention_mask=attention_mask,
                                 position_ids=position_ids)                        # (2B, T, d)
        scored = completion_mask[:, 1:].bool()                                     # (2B, T-1): logit t scores t+1
        rows = scored.nonzero(as_tuple=True)[0]                                    # (M,)
        return _scored_sums(states[:, :-1][scored], lm_head, input_ids[:, 1:][scored], rows, input_ids.shape[0],
                            average)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                   logits_to_keep=T - start).logits.float()                        # (2B, T - start, V) fp32
    logps = sequence_logprobs(logits, input_ids[:, start:], completion_mask[:, start:], average=average)
    return logps.chunk(2)                                                          # (B,), (B,)
