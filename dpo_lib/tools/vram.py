r"""How much GPU memory will a DPO run need? A planner you can check by hand.

:func:`plan` takes a model (a :class:`ModelSpec`: a preset name, a ``transformers`` config,
or just its size), a GPU (:data:`~dpo_lib.tools.specs.GPUS` or your own ``{"name", "memory_gib", "bf16"}``), a
sequence length, a target global batch and a training mode, and returns a :class:`Plan`:
the precision, the micro-batch, the gradient accumulation and whether to use gradient
checkpointing, each with a one-line reason, and the memory estimate behind the choice
(``plan(...).explain()`` prints it all).

:func:`estimate` adds up one configuration term by term (the formulas are on it and on
:func:`activation_bytes_per_token`); :func:`plan` makes the choices (its docstring says how). The
model and GPU specs come from :mod:`dpo_lib.tools.specs`, the precision rule from
:mod:`dpo_lib.precision`, the LoRA target names from :mod:`dpo_lib.lora`.

Notation
--------
``P`` parameters, ``L`` decoder layers, ``h`` hidden size, ``q`` = heads × head_dim (the
width of Q), ``I`` MLP intermediate size, ``V`` vocabulary, ``T`` sequence length (prompt +
response, tokens), ``B`` micro-batch in *pairs*. A DPO forward runs the chosen and the
rejected sequence of every pair, so it processes ``N = 2·B·T`` tokens. ``b`` is the number of
bytes of the compute dtype: 2 for bf16/fp16, 4 for fp32. ``P_lin`` is the number of
weights in the decoder's linear layers (what LoRA adapts and 4-bit quantises), ``P_train``
the number of trainable parameters.

Modes
-----
``full``
    every weight trains. Mixed precision as in the ZeRO paper: half-precision weights and
    gradients plus fp32 master weights and AdamW moments, ``2 + 2 + 4 + 8 = 16`` bytes per
    parameter (in fp32 on a CPU: ``4 + 4 + 8 = 16`` as well).
``lora``
    the base stays frozen in the compute dtype; only the LoRA adapters train. peft keeps
    the adapters in fp32. A matrix ``W`` of shape ``d_in × d_out`` gets ``A`` (``r × d_in``)
    and ``B`` (``d_out × r``): ``r·(d_in + d_out)`` trainable parameters per adapted matrix.
``qlora``
    ``lora`` on a base whose decoder linear layers are stored in 4-bit NF4 (bitsandbytes).
    Embeddings, norms and the LM head stay in the compute dtype.

Numbers are estimates: expect the measured peak within roughly ±20 % (allocator
behaviour, kernels and library versions differ). Memory sizes are printed in GiB (2**30
bytes), as ``nvidia-smi`` and ``torch.cuda`` report them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from dpo_lib.lora import ALL_LINEAR
from dpo_lib.precision import DTYPES
from dpo_lib.tools.memory import measure_saved_activations  # noqa: F401 (lesson 05 imports it from here)
from dpo_lib.tools.specs import (  # noqa: F401 (lesson 05 and graders_gpu import the specs from here)
    GPU,
    MODELS,
    GiB,
    ModelSpec,
    detect_device,
    gpu_spec,
    lora_trainable_params,
    model_spec,
    pick_precision,
)

__all__ = ["BYTES", "NF4_BYTES", "Memory", "Plan", "activation_bytes_per_token", "estimate", "plan", "plan_table"]

CUDA_CONTEXT_BYTES = GiB // 2     # CUDA context + kernels loaded by torch; not in max_memory_allocated
ALLOCATOR_SLACK = 0.10            # fragmentation, cuBLAS workspaces, caching-allocator rounding
BYTES = {name: dtype.itemsize for name, dtype in DTYPES.items()}   # b: 4 for fp32, 2 for bf16 / fp16
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)   # 4-bit weight + 8-bit absmax per 64 + fp32 per 256 blocks
ADAM_BYTES = 8                    # fp32 first and second moments
MASTER_BYTES = 4                  # fp32 master copy of half-precision trainable weights
ADAPTER_BYTES = 4                 # peft keeps LoRA weights in fp32 (autocast_adapter_dtype=True)
MODES = ("full", "lora", "qlora")


# ----------------------------------------------------------------------------- estimate


@dataclass(frozen=True)
class Memory:
    """Bytes per term, as in :func:`estimate`."""

    weights: float
    reference: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    cuda: bool = True

    @property
    def allocated(self) -> float:
        """What ``torch.cuda.max_memory_allocated()`` should report."""
        return self.weights + self.reference + self.gradients + self.optimizer + self.activations + self.logits

    @property
    def slack(self) -> float:
        return ALLOCATOR_SLACK * self.allocated if self.cuda else 0.0

    @property
    def context(self) -> float:
        return CUDA_CONTEXT_BYTES if self.cuda else 0.0

    @property
    def total(self) -> float:
        return self.allocated + self.slack + self.context

    def rows(self) -> list[tuple[str, float]]:
        return [("weights", self.weights), ("reference", self.reference), ("gradients", self.gradients),
                ("optimizer", self.optimizer), ("activations", self.activations), ("logits", self.logits),
                ("= allocated", self.allocated), ("allocator slack", self.slack), ("CUDA context", self.context),
                ("= total", self.total)]


def activation_bytes_per_token(model: Any, precision: str = "bf16", gradient_checkpointing: bool = False) -> float:
    r"""Bytes autograd saves for the backward pass, per token: ``L·A + (4 + 2b)·h``, where a decoder
    layer saves, per token,

    .. math:: A = (8 + 4b)\,h + 5b\,q + 4b\,I

    Each of the two RMSNorms keeps an fp32 copy of its input (``4h``; transformers upcasts
    inside the norm), the normalised input and the output (``2b·h``); attention keeps Q, K
    and V (transformers repeats the K/V heads to the width of Q when a padding mask is
    passed), the SDPA output and its contiguous copy that enters ``o_proj`` (``5b·q``;
    SDPA/flash attention stores no ``T × T`` matrix); the SwiGLU MLP keeps the gate and up
    projections, SiLU(gate) and their product (``4b·I``). The final norm adds
    ``(4 + 2b)·h``. Total ``N·(L·A + (4 + 2b)·h)``. With gradient checkpointing only each
    layer's input is kept, and one layer is recomputed at a time during the backward pass:
    ``N·(L·b·h + A + (4 + 2b)·h)``. Checked against the bytes that autograd actually saves
    (:func:`dpo_lib.tools.memory.measure_saved_activations`; within 10 % for the SmolLM2 and tiny
    Llama models). LoRA saves a little less, so this is an upper bound there: the RMSNorm weights are
    frozen, so autograd keeps no copy of the normalised inputs they multiply (``b·h`` per norm), while the
    inputs of the adapted linear layers are kept all the same (LoRA's ``A`` needs its input ``x`` for its
    gradient) and the adapters add their small ``A x`` (lesson 05 measures both on one micro-batch).
    Eager attention would also keep the ``T × T`` attention probabilities: roughly ``heads·T·(4 + b)``
    more bytes per token and layer in half precision (an fp32 softmax and its cast), quadratic in ``T``
    overall.
    """
    s, b = model_spec(model), BYTES[precision]
    per_layer = (8 + 4 * b) * s.hidden + 5 * b * s.q_dim + 4 * b * s.intermediate
    final = (4 + 2 * b) * s.hidden
    if gradient_checkpointing:
        return s.layers * b * s.hidden + per_layer + final
    return s.layers * per_layer + final


def estimate(model: Any, mode: str = "lora", seq_len: int = 512, micro_batch: int = 4, precision: str = "bf16",
             gradient_checkpointing: bool = False, precomputed_reference: bool = False, lora_r: int = 16,
             lora_targets: str | Iterable[str] = ALL_LINEAR, cuda: bool = True) -> Memory:
    """The memory of one configuration, term by term (no choices made: see :func:`plan`), in bytes:

    weights
        ``full``: ``P·b``. ``lora``: ``P·b + 4·P_train``. ``qlora``:
        ``P_lin·q4 + (P − P_lin)·b + 4·P_train`` with
        ``q4 = 1/2 + 1/64 + 4/(64·256) ≈ 0.516`` bytes per weight: 4 bits per weight, one 8-bit
        absmax constant per block of 64 weights, and (double quantisation) one fp32 constant per
        256 of those blocks (Dettmers et al. 2023, QLoRA, §3).
    reference
        ``full``: a frozen second copy, ``P·b``, unless the reference log-probs are
        precomputed (then 0). ``lora`` / ``qlora``: 0 — the reference is the base model with the
        adapter switched off (:class:`dpo_lib.reference.AdapterDisabledReference`).
    gradients
        one per trainable parameter: ``P_train·b`` (``full``), ``4·P_train`` (fp32 adapters).
    optimizer
        AdamW keeps two fp32 moments, ``8·P_train``; plus fp32 master weights, ``4·P_train``,
        when ``full`` trains in half precision.
    activations
        ``N·`` :func:`activation_bytes_per_token` (what autograd saves for the backward pass).
    logits
        two ``[2B, T, V]`` fp32 tensors are alive at the peak: the policy's logits and then
        either their gradient (backward) or the reference's logits (its forward):
        ``2·N·V·4``. We count fp32 because TRL, most loss code and dpo_lib upcast the logits
        (a sum of bf16 token log-probs is too coarse for DPO, see :mod:`dpo_lib.logprobs`); dpo_lib
        only computes logits from the first response token on (``logits_to_keep``), so for
        dpo_lib this is an upper bound. For a 150k vocabulary this is often the largest term of all.

    ``allocated`` is the sum of these terms: what ``torch.cuda.max_memory_allocated()`` should
    report. On a GPU the plan adds 10 % of it for the caching allocator's fragmentation and
    cuBLAS workspaces, and a fixed 0.5 GiB for the CUDA context (which ``max_memory_allocated``
    never sees); the result is compared with the GPU's memory.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if precision not in BYTES:
        raise ValueError(f"precision must be one of {tuple(BYTES)}, got {precision!r}")
    s, b = model_spec(model), BYTES[precision]
    P = s.params
    tokens = 2 * micro_batch * seq_len                      # chosen + rejected
    if mode == "full":
        trainable = P
        weights = P * b
        reference = 0 if precomputed_reference else P * b
        gradients = P * b
        optimizer = P * (ADAM_BYTES + (MASTER_BYTES if b < 4 else 0))
    else:
        trainable = lora_trainable_params(s, lora_r, lora_targets)
        base = P * b if mode == "lora" else s.linear_params * NF4_BYTES + (P - s.linear_params) * b
        weights = base + trainable * ADAPTER_BYTES
        reference = 0
        gradients = trainable * ADAPTER_BYTES
        optimizer = trainable * ADAM_BYTES
    activations = tokens * activation_bytes_per_token(s, precision, gradient_checkpointing)
    logits = 2 * tokens * s.vocab * 4
    return Memory(weights, reference, gradients, optimizer, activations, logits, cuda=cuda)


# ----------------------------------------------------------------------------- plan


def fmt_bytes(n: float) -> str:
    """GiB with two decimals (``0.25 GiB``); small sizes in MiB."""
    return f"{n / GiB:.2f} GiB" if n >= 0.1 * GiB or n == 0 else f"{n / 2 ** 20:.1f} MiB"


def fmt_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


@dataclass
class Plan:
    """What to run on ``gpu``, and why. ``memory`` is the estimate for the chosen settings."""

    model: ModelSpec
    gpu: GPU
    mode: str
    precision: str
    seq_len: int
    global_batch: int
    micro_batch: int
    grad_accum: int
    gradient_checkpointing: bool
    precomputed_reference: bool
    lora_r: int
    lora_targets: str | tuple
    trainable_params: int
    memory: Memory
    fits: bool
    why: list[str] = field(default_factory=list)

    def explain(self) -> str:
        """The plan as text: settings, the memory table, and one reason per choice."""
        g, m = self.gpu, self.memory
        mode = self.mode if self.mode == "full" else f"{self.mode} (r={self.lora_r}, {self._targets()})"
        lines = [f"VRAM plan: {self.model.name} ({fmt_count(self.model.params)} params), {mode}, "
                 f"on {g.name} ({g.memory_gib:.1f} GiB)",
                 f"  {self.precision}, sequence length {self.seq_len}, global batch {self.global_batch} pairs = "
                 f"micro-batch {self.micro_batch} x accumulation {self.grad_accum}, gradient checkpointing "
                 f"{'on' if self.gradient_checkpointing else 'off'}, trainable params "
                 f"{fmt_count(self.trainable_params)}"]
        for name, value in m.rows():
            if name in ("allocator slack", "CUDA context") and not m.cuda:
                continue
            lines.append(f"  {name:<16} {fmt_bytes(value):>12}")
        verdict = "fits" if self.fits else "DOES NOT FIT"
        lines.append(f"  -> {verdict}: {fmt_bytes(m.total)} of {g.memory_gib:.1f} GiB")
        lines.append("why:")
        lines += [f"  - {w}" for w in self.why]
        return "\n".join(lines)

    def _targets(self) -> str:
        return self.lora_targets if isinstance(self.lora_targets, str) else "+".join(self.lora_targets)


def _divisors_desc(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def _checkpointing(s: ModelSpec, best: dict, floor: int, given: bool | None, precision: str,
                   seq_len: int) -> tuple[bool, str]:
    """Gradient checkpointing on or off, and why; ``best[ckpt]`` is the largest micro-batch that fits."""
    if given is not None:
        return given, f"{'on' if given else 'off'} (given)"
    if best[False] is not None and best[False] >= floor:
        return False, (f"off: micro-batch {best[False]} already fits without it "
                       "(checkpointing would recompute the forward pass, about a third more compute)")
    if best[True] is not None and (best[False] is None or best[True] > best[False]):
        without = (f"only micro-batch {best[False]} fits without it" if best[False]
                   else "not even micro-batch 1 fits without it")
        return True, (f"on: {without}; keeping only each layer's input cuts activations from "
                      f"{fmt_bytes(activation_bytes_per_token(s, precision) * 2 * seq_len)} to "
                      f"{fmt_bytes(activation_bytes_per_token(s, precision, True) * 2 * seq_len)} per pair")
    if best[False] is None and best[True] is None:
        return True, "on, and still not enough memory (see micro-batch)"
    return False, "off: it would not allow a larger micro-batch"


def _memory_reasons(s: ModelSpec, mode: str, precision: str, precomputed_reference: bool, lora_r: int,
                    targets) -> tuple[int, list[str]]:
    """``(trainable params, [why reference, why trainable])``."""
    if mode == "full":
        ref = ("reference: log-probs precomputed once before training, so no second model" if precomputed_reference
               else f"reference: a frozen second copy of the model ({fmt_bytes(s.params * BYTES[precision])}); "
                    "precompute its log-probs to drop it")
        kind = ("bf16/fp16 weight + gradient, fp32 master + AdamW" if BYTES[precision] == 2
                else "fp32 weight + gradient + AdamW")
        return s.params, [ref, f"trainable: all {s.params:,} params, 16 bytes each ({kind})"]
    trainable = lora_trainable_params(s, lora_r, targets)
    return trainable, ["reference: the base model with the adapter disabled, so no second copy (0 bytes)",
                       f"trainable: LoRA r={lora_r} on {_targets_text(targets)} x {s.layers} layers, "
                       f"r*(d_in + d_out) each = {trainable:,} params ({100 * trainable / s.params:.2f} % of the "
                       "model); fp32 weight + gradient + AdamW = 16 bytes each"]


def _micro_batch_reason(s: ModelSpec, g: GPU, mode: str, mb: int, given: bool, ok: bool, ckpt: bool,
                        candidates: list[int], global_batch: int, mem: Memory, kw: dict) -> str:
    if given:
        return f"micro-batch: {mb} (given)"
    if ok:
        nxt = next((d for d in reversed(candidates) if d > mb), None)
        tail = ""
        if nxt is not None:
            tail = (f"; {nxt} would need "
                    f"{fmt_bytes(estimate(s, micro_batch=nxt, gradient_checkpointing=ckpt, **kw).total)}")
        return f"micro-batch: {mb} pairs, the largest divisor of {global_batch} that fits{tail}"
    suggestion = {"full": "try mode='lora' or precomputed_reference=True",
                  "lora": "try mode='qlora'", "qlora": "use a bigger GPU or a smaller model"}[mode]
    return (f"micro-batch: even {mb} pair(s){' with checkpointing' if ckpt else ''} needs {fmt_bytes(mem.total)} > "
            f"{g.memory_gib:.1f} GiB; shorten the sequences, or {suggestion}")


def plan(model: Any, gpu: Any = "T4", mode: str = "lora", seq_len: int = 512, global_batch: int = 32,
         precomputed_reference: bool = False, precision: str | None = None, micro_batch: int | None = None,
         gradient_checkpointing: bool | None = None, lora_r: int = 16,
         lora_targets: str | Iterable[str] = ALL_LINEAR, min_micro_batch: int = 4) -> Plan:
    """Choose precision, micro-batch, accumulation and gradient checkpointing for ``model`` on ``gpu``.

    Anything you pass explicitly (``precision``, ``micro_batch``, ``gradient_checkpointing``)
    is kept; the rest is chosen so (``global_batch`` is in preference pairs per optimizer step):

    * precision: bf16 when the GPU supports it (Ampere and newer: fp32's exponent range, no loss
      scaling), else fp16 (T4, V100: keep master weights / adapters in fp32), fp32 on a CPU;
    * micro-batch: the largest divisor of the global batch that fits; gradient accumulation
      makes up the rest, ``global = micro × accumulation``;
    * gradient checkpointing: only when without it the micro-batch would be smaller than
      ``min(4, global batch)`` pairs and checkpointing allows a larger one. It costs one extra
      forward pass (about a third more compute), which a tiny micro-batch costs anyway in idle
      GPU time.
    """
    s, g = model_spec(model), gpu_spec(gpu)
    targets = lora_targets if isinstance(lora_targets, str) else tuple(lora_targets)
    why: list[str] = []
    if precision is None:
        precision, reason = pick_precision(g)
        why.append(f"precision: {reason}")
    else:
        why.append(f"precision: {precision} (given)")
    if mode == "qlora" and not g.cuda:
        why.append("qlora: bitsandbytes' 4-bit kernels need a CUDA GPU; this estimate is what it would take on one")
    kw = dict(mode=mode, seq_len=seq_len, precision=precision, precomputed_reference=precomputed_reference,
              lora_r=lora_r, lora_targets=targets, cuda=g.cuda)

    def fits(mb: int, ckpt: bool) -> bool:
        return estimate(s, micro_batch=mb, gradient_checkpointing=ckpt, **kw).total <= g.memory_bytes

    candidates = [micro_batch] if micro_batch else _divisors_desc(global_batch)
    if micro_batch and global_batch % micro_batch:
        raise ValueError(f"micro_batch={micro_batch} does not divide global_batch={global_batch}")
    best = {ck: next((mb for mb in candidates if fits(mb, ck)), None) for ck in (False, True)}
    ckpt, ckpt_reason = _checkpointing(s, best, min(min_micro_batch, global_batch), gradient_checkpointing,
                                       precision, seq_len)
    mb = best[ckpt] or candidates[-1]
    mem = estimate(s, micro_batch=mb, gradient_checkpointing=ckpt, **kw)
    ok = mem.total <= g.memory_bytes
    accum = global_batch // mb
    trainable, reasons = _memory_reasons(s, mode, precision, precomputed_reference, lora_r, targets)
    why += reasons
    why.append(_micro_batch_reason(s, g, mode, mb, bool(micro_batch), ok, ckpt, candidates, global_batch, mem, kw))
    why.append(f"accumulation: {accum} micro-batch(es) per optimizer step so that {mb} x {accum} = "
               f"{global_batch} pairs" + (" (no accumulation needed)" if accum == 1 else ""))
    why.append(f"gradient checkpointing: {ckpt_reason}")
    return Plan(model=s, gpu=g, mode=mode, precision=precision, seq_len=seq_len, global_batch=global_batch,
                micro_batch=mb, grad_accum=accum, gradient_checkpointing=ckpt,
                precomputed_reference=precomputed_reference, lora_r=lora_r, lora_targets=targets,
                trainable_params=trainable, memory=mem, fits=ok, why=why)


def _targets_text(targets) -> str:
    if targets == ALL_LINEAR:
        return "all 7 linear layers"
    return "+".join(targets)


def plan_table(model: Any, gpus: Iterable[Any] = ("T4", "L4", "A100-40GB", "H100-80GB"),
               modes: Iterable[str] = MODES, **kwargs) -> str:
    """A text table of :func:`plan` for every GPU and mode (same model, sequence length, batch)."""
    header = f"{'GPU':<11} {'mode':<6} {'dtype':<5} {'micro x accum':>13} {'ckpt':>5} {'total GiB':>10}  fits"
    lines = [header, "-" * len(header)]
    for gpu in gpus:
        for mode in modes:
            p = plan(model, gpu, mode=mode, **kwargs)
            lines.append(f"{p.gpu.name:<11} {mode:<6} {p.precision:<5} "
                         f"{f'{p.micro_batch} x {p.grad_accum}':>13} {'on' if p.gradient_checkpointing else 'off':>5} "
                         f"{p.memory.total / GiB:>10.2f}  {'yes' if p.fits else 'NO'}")
    return "\n".join(lines)

