"""What the VRAM planner (:mod:`dpo_lib.tools.vram`) and the FLOP counter (:mod:`dpo_lib.tools.flops`)
know about models and GPUs: one model-shape class and one GPU table.

* :class:`ModelSpec` — the shape of a Llama-style decoder, from a ``transformers`` config, a
  preset of :data:`MODELS` (copied from the hub, so the planner works offline) or the four
  numbers of a model card: parameter counts (``P``, ``P_lin``, the non-embedding ``N`` of the
  FLOP count); :func:`lora_trainable_params` counts LoRA's ``r·(d_in + d_out)``.
* :class:`GPU` — a device's memory, bf16 support and peak dense FLOP/s: a preset of :data:`GPUS`,
  the CPU (:func:`cpu_device`) or whatever torch sees (:func:`detect_device`);
  :func:`pick_precision` chooses bf16, fp16 or fp32 for it (the rule of :mod:`dpo_lib.precision`),
  :func:`peak_flops` finds the peak of a GPU by its torch name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from dpo_lib.lora import ALL_LINEAR, LINEAR_MODULES  # the names LoRA adapts, defined with LoRA
from dpo_lib.precision import choose_precision

__all__ = [
    "GPU", "GPUS", "GiB", "MODELS", "ModelSpec", "cpu_device", "detect_device", "gpu_spec", "lora_trainable_params",
    "model_spec", "peak_flops", "pick_precision",
]

GiB = 2 ** 30


# ----------------------------------------------------------------------------- model


@dataclass(frozen=True)
class ModelSpec:
    """The shape of a Llama-style decoder (Llama, Mistral, Qwen2, SmolLM2): all that the planner and
    the FLOP counter need."""

    name: str
    vocab: int
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int | None = None   # None: hidden // heads
    tied: bool = True             # LM head shares the embedding matrix
    qkv_bias: bool = False        # Qwen2 has biases on q, k, v

    @property
    def q_dim(self) -> int:
        return self.heads * (self.head_dim or self.hidden // self.heads)

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.head_dim or self.hidden // self.heads)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """``(d_in, d_out)`` of each linear layer of one decoder block."""
        h, q, kv, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def linear_params(self) -> int:
        """``P_lin``: weights (and biases) of the decoder's linear layers, all layers."""
        per_layer = sum(a * b for a, b in self.linear_shapes().values())
        if self.qkv_bias:
            per_layer += self.q_dim + 2 * self.kv_dim
        return self.layers * per_layer

    @property
    def non_embedding_params(self) -> int:
        """``N`` of the FLOP count: linear layers + RMSNorm weights, i.e. every parameter but the
        input embedding and the LM head (whose ``2dV`` per scored position is counted apart)."""
        return self.linear_params + (2 * self.layers + 1) * self.hidden

    @property
    def params(self) -> int:
        """``P``: embedding + LM head (if untied) + linear layers + RMSNorm weights."""
        embed = self.vocab * self.hidden
        head = 0 if self.tied else self.vocab * self.hidden
        return embed + head + self.non_embedding_params

    @classmethod
    def from_config(cls, config: Any, name: str | None = None) -> "ModelSpec":
        """From a ``transformers`` config (``AutoConfig.from_pretrained(...)`` or ``model.config``)."""
        get = (lambda k, d=None: config.get(k, d)) if isinstance(config, dict) else (
            lambda k, d=None: getattr(config, k, d))
        model_type = get("model_type", "")
        return cls(name=name or get("_name_or_path") or model_type or "model", vocab=get("vocab_size"),
                   hidden=get("hidden_size"), layers=get("num_hidden_layers"),
                   intermediate=get("intermediate_size"), heads=get("num_attention_heads"),
                   kv_heads=get("num_key_value_heads") or get("num_attention_heads"),
                   head_dim=get("head_dim"), tied=bool(get("tie_word_embeddings", True)),
                   qkv_bias=bool(get("attention_bias", model_type == "qwen2")))

    @classmethod
    def from_size(cls, params: float, layers: int, hidden: int, vocab: int, tied: bool = True,
                  name: str = "custom") -> "ModelSpec":
        """A coarse spec from the four numbers of a model card. Assumes full multi-head
        attention (K/V as wide as Q) and solves ``4h² + 3h·I`` per layer for ``I``."""
        embed = vocab * hidden * (1 if tied else 2)
        per_layer = (params - embed - (2 * layers + 1) * hidden) / layers
        intermediate = round((per_layer - 4 * hidden * hidden) / (3 * hidden))
        if intermediate <= 0:
            raise ValueError(f"{params:.3g} parameters are too few for {layers} layers of width {hidden} "
                             f"and a {vocab}-token vocabulary")
        heads = max(1, hidden // 64)
        return cls(name=name, vocab=vocab, hidden=hidden, layers=layers, intermediate=intermediate,
                   heads=heads, kv_heads=heads, head_dim=hidden // heads, tied=tied)


# Configs copied from the models' config.json on the hub, so the planner works offline.
MODELS: dict[str, ModelSpec] = {s.name: s for s in [
    ModelSpec("SmolLM2-135M-Instruct", vocab=49152, hidden=576, layers=30, intermediate=1536, heads=9,
              kv_heads=3, head_dim=64),
    ModelSpec("SmolLM2-360M-Instruct", vocab=49152, hidden=960, layers=32, intermediate=2560, heads=15,
              kv_heads=5, head_dim=64),
    ModelSpec("Qwen2.5-0.5B-Instruct", vocab=151936, hidden=896, layers=24, intermediate=4864, heads=14,
              kv_heads=2, head_dim=64, qkv_bias=True),
    ModelSpec("Qwen2.5-1.5B-Instruct", vocab=151936, hidden=1536, layers=28, intermediate=8960, heads=12,
              kv_heads=2, head_dim=128, qkv_bias=True),
    ModelSpec("SmolLM2-1.7B-Instruct", vocab=49152, hidden=2048, layers=24, intermediate=8192, heads=32,
              kv_heads=32, head_dim=64),
    ModelSpec("Llama-3.1-8B-Instruct", vocab=128256, hidden=4096, layers=32, intermediate=14336, heads=32,
              kv_heads=8, head_dim=128, tied=False),
]}


def model_spec(model: Any) -> ModelSpec:
    """A :class:`ModelSpec` from a spec, a preset name (hub ids work: ``HuggingFaceTB/SmolLM2-360M-Instruct``),
    a ``transformers`` config or model, or a dict ``{"params", "layers", "hidden", "vocab"}``."""
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, str):
        key = model.rsplit("/", 1)[-1]
        if key in MODELS:
            return MODELS[key]
        raise KeyError(f"unknown model {model!r}; presets: {', '.join(MODELS)} "
                       "(or pass a transformers config, or ModelSpec.from_size(...))")
    if isinstance(model, dict) and "params" in model:
        return ModelSpec.from_size(**model)
    config = getattr(model, "config", model)
    return ModelSpec.from_config(config)


def lora_trainable_params(model: Any, r: int, target_modules: str | Iterable[str] = ALL_LINEAR) -> int:
    """LoRA parameters: ``r·(d_in + d_out)`` for every adapted matrix, summed over the layers.

    ``target_modules`` is ``"all-linear"`` (peft's name for every linear layer of the
    decoder, LM head excluded) or names from :data:`LINEAR_MODULES`.
    """
    spec = model_spec(model)
    targets = LINEAR_MODULES if target_modules == ALL_LINEAR else tuple(target_modules)
    shapes = spec.linear_shapes()
    unknown = [t for t in targets if t not in shapes]
    if unknown:
        raise ValueError(f"unknown target modules {unknown}; known: {', '.join(LINEAR_MODULES)} or 'all-linear'")
    return spec.layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)


# ----------------------------------------------------------------------------- GPU


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float                     # total memory as nvidia-smi / torch.cuda report it
    bf16: bool                            # bf16 tensor cores (compute capability >= 8.0)
    cuda: bool = True                     # False: a CPU (memory = RAM), no CUDA context
    peak_flops: float | None = None       # dense (no sparsity) bf16 tensor FLOP/s of the data sheet
    peak_flops_pcie: float | None = None  # the PCIe card of the same chip, where its clocks are lower

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GiB)


GPUS: dict[str, GPU] = {g.name.split()[0]: g for g in [
    GPU("T4 16GB", 15.0, bf16=False, peak_flops=65e12),     # Turing, c.c. 7.5 (Colab's free GPU): fp16 peak, no bf16
    GPU("L4 24GB", 22.5, bf16=True, peak_flops=121e12),     # Ada (242 with 2:4 sparsity)
    GPU("A100-40GB", 40.0, bf16=True, peak_flops=312e12),   # Ampere, SXM and PCIe alike
    GPU("A100-80GB", 80.0, bf16=True, peak_flops=312e12),
    GPU("H100-80GB", 79.6, bf16=True, peak_flops=989e12, peak_flops_pcie=756e12),  # Hopper SXM (1979 sparse); PCIe
]}


def gpu_spec(gpu: Any) -> GPU:
    """A :class:`GPU` from a GPU, a name in :data:`GPUS` (``"T4"``, ``"A100-80GB"``...), ``"cpu"``,
    or a dict ``{"name", "memory_gib", "bf16"}`` (optionally ``"cuda"``, ``"peak_flops"``)."""
    if isinstance(gpu, GPU):
        return gpu
    if isinstance(gpu, dict):
        return GPU(name=gpu.get("name", "GPU"), memory_gib=float(gpu["memory_gib"]), bf16=bool(gpu.get("bf16", False)),
                   cuda=bool(gpu.get("cuda", True)), peak_flops=gpu.get("peak_flops"))
    if isinstance(gpu, str):
        if gpu.lower() == "cpu":
            return cpu_device()
        for key, g in GPUS.items():
            if gpu.lower() in (key.lower(), g.name.lower()):
                return g
        matches = [g for key, g in GPUS.items() if key.lower().startswith(gpu.lower())]
        if len(matches) == 1:  # "H100" -> "H100-80GB"
            return matches[0]
        raise KeyError(f"unknown GPU {gpu!r}; known: {', '.join(GPUS)}, 'cpu', or a dict "
                       "{'name', 'memory_gib', 'bf16'}")
    raise TypeError(f"cannot read a GPU from {type(gpu).__name__}")


def peak_flops(device_name: str) -> float | None:
    """Peak FLOP/s of a GPU named like ``torch.cuda.get_device_name()`` (``"NVIDIA H100 PCIe"``),
    from :data:`GPUS`; ``None`` when unknown (then time a matmul:
    :func:`dpo_lib.tools.flops.measure_matmul_flops`)."""
    name = device_name.upper().replace(" ", "")
    for key, g in GPUS.items():
        if key.split("-")[0].upper() in name:
            return g.peak_flops_pcie if "PCIE" in name and g.peak_flops_pcie else g.peak_flops
    return None


def cpu_device() -> GPU:
    """The CPU as a 'device': its RAM, no bf16 training (fp32), no CUDA context."""
    import os
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        ram = 16 * GiB
    return GPU("CPU", round(ram / GiB, 1), bf16=False, cuda=False)


def detect_device() -> GPU:
    """The GPU torch sees (name, memory, bf16 support, data-sheet peak), or the CPU."""
    import torch
    if not torch.cuda.is_available():
        return cpu_device()
    props = torch.cuda.get_device_properties(0)
    return GPU(props.name, round(props.total_memory / GiB, 1), bf16=torch.cuda.is_bf16_supported(),
               peak_flops=peak_flops(props.name))


def pick_precision(gpu: Any) -> tuple[str, str]:
    """``(precision, why)``: bf16 where supported, else fp16 on a GPU, fp32 on a CPU
    (:func:`dpo_lib.precision.choose_precision` on the GPU's spec)."""
    g = gpu_spec(gpu)
    return choose_precision(g.cuda, g.bf16, name=g.name)
