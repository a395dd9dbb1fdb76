"""Which floating-point precision a forward pass runs in, chosen by the hardware, in one place.

``precision`` is one of :data:`PRECISIONS` for training: ``fp32``; ``bf16`` (matmuls in bfloat16
under ``torch.autocast``, weights, gradients and optimizer state in float32); ``fp16`` (the same in
float16, for GPUs without bf16 such as the T4 and V100, with a dynamic loss scaler: :mod:`dpo_lib.amp`);
``auto``: on a CUDA GPU ``bf16`` where supported, else ``fp16``; on a CPU ``bf16`` only where a short
probe measures it faster than ``fp32`` (:func:`probe_matmuls`: matmuls of the model's own shapes in both
precisions, a fraction of a second, cached per machine), else ``fp32``. Without the model's shapes
(:func:`resolve_precision` called with none) a CPU gets ``bf16`` where it has bf16 matmul units
(:func:`bf16_is_fast`) — a flag, not a measurement: on a 2-core Xeon with AVX512-BF16, bf16 ran at
half fp32's speed (issue 41), which is why every run measures (:func:`choose_auto`).

* :func:`choose_precision` — the one rule: bf16 where supported, else fp16 on a GPU (when
  allowed), else fp32; with the reason. Used by :func:`resolve_precision` (``auto``),
  :func:`pick_dtype` (:mod:`dpo_lib.lora`) and the planner
  (:func:`dpo_lib.tools.specs.pick_precision`).
* :func:`choose_auto` — ``auto`` for a run: the choice, the reason, and the probe's two figures
  (:class:`PrecisionChoice`, printed by the run's set-up and kept in its run card: :func:`last_choice`).
* :func:`autocast` — the mixed-precision context of a forward pass (trainer, job, bench).
"""

from __future__ import annotations

import json
import os
import platform
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dpo_lib.config import PRECISIONS  # one list, shared with the command line

__all__ = ["DTYPES", "PrecisionChoice", "ProbeResult", "asked", "autocast", "bf16_is_fast", "choose_auto",
           "choose_precision", "last_choice", "measure_matmuls", "model_shapes", "pick_dtype", "probe_matmuls",
           "resolve_precision"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def bf16_is_fast(device: str | torch.device = "cpu") -> bool:
    """Whether bfloat16 matmuls run on hardware units here: a CUDA GPU with bf16, or an x86
    CPU with AMX-BF16 or AVX512-BF16 (Linux ``/proc/cpuinfo`` flags). Elsewhere bf16 on the
    CPU is emulated and no faster than float32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def choose_precision(cuda: bool, bf16: bool, fp16: bool = True, name: str = "this GPU") -> tuple[str, str]:
    """``(precision, why)`` for a device: ``bf16`` where ``bf16`` (supported, or fast on a CPU),
    else ``fp16`` on a CUDA GPU when ``fp16`` is allowed (it needs fp32 trainable weights or a
    loss scaler: the planner and LoRA allow it, the trainer does not), else ``fp32``."""
    if bf16:
        return "bf16", (f"{name} supports bf16: same exponent range as fp32, so no loss scaling; "
                        "half the bytes of fp32")
    if not cuda:
        return "fp32", "CPU: fp32 (half-precision matmuls are slow or unsupported on most CPUs)"
    if not fp16:
        return "fp32", f"{name} has no bf16 support: fp32"
    return "fp16", (f"{name} has no bf16 support: fp16 (5-bit exponent, overflows above 65504), so trainable "
                    "weights stay in fp32 (LoRA adapters, master weights) and full fine-tuning needs a loss scaler")


def pick_dtype(device: str | torch.device | None = None) -> torch.dtype:
    """The compute dtype of a model on ``device`` (default: CUDA if there is one): bf16 on a GPU
    that supports it, fp16 on other CUDA GPUs (T4, V100), fp32 on a CPU."""
    cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    return DTYPES[choose_precision(cuda, cuda and torch.cuda.is_bf16_supported())[0]]


def resolve_precision(precision: str, device: str | torch.device = "cpu", shapes: tuple[int, int] | None = None,
                      probe=None) -> str:
    """Checks the name; ``auto`` -> :func:`choose_auto` (a CUDA GPU: bf16 where supported, else fp16; a CPU:
    bf16 only where the probe of ``shapes`` measures it faster, or, without ``shapes``, where
    :func:`bf16_is_fast`; else fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "auto":
        return choose_auto(device, shapes, probe).precision
    return precision


def autocast(precision: str, device: str | torch.device = "cpu"):
    """Mixed precision for a forward pass: with ``bf16`` (``fp16``) the matmuls run in bfloat16 (float16) under
    ``torch.autocast`` while weights, gradients, optimizer state and the log-softmax stay
    float32 (:func:`dpo_lib.logprobs.linear_token_logprobs` upcasts the logits). ``fp32``: no-op.

    Wrap forwards only, never an optimizer step: autocast caches the bf16 copies of the
    weights until its context exits, and an update inside it would leave them stale.
    """
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=DTYPES[precision])


# ---------------------------------------------------------------- auto: measured, not guessed

@dataclass(frozen=True)
class ProbeResult:
    """Throughput of the probe's matmuls, GFLOP/s, in each precision, and whether it came from the cache."""
    fp32_gflops: float
    bf16_gflops: float
    shapes: tuple[int, int]
    cached: bool = False

    @property
    def bf16_faster(self) -> bool:
        return self.bf16_gflops > self.fp32_gflops


@dataclass(frozen=True)
class PrecisionChoice:
    """What ``auto`` became on a device, why, and the probe behind it (None where nothing was measured)."""
    precision: str
    why: str
    probe: ProbeResult | None = None

    def line(self) -> str:
        """One line for the run's log: the choice and, where measured, both figures."""
        text = f"precision: {self.precision} ({self.why})"
        if self.probe:
            p = self.probe
            text += (f"; probe of {p.shapes[0]}x{p.shapes[1]} matmuls: fp32 {p.fp32_gflops:.1f}, "
                     f"bf16 {p.bf16_gflops:.1f} GFLOP/s{' (cached)' if p.cached else ''}")
        return text

    def record(self) -> dict:
        """For the run card."""
        return {"precision": self.precision, "why": self.why, "probe": asdict(self.probe) if self.probe else None}


_LAST: list[PrecisionChoice] = []


def last_choice() -> dict | None:
    """The last ``auto`` decision of this process (:meth:`PrecisionChoice.record`), for the run card."""
    return _LAST[-1].record() if _LAST else None


def asked(precision: str) -> PrecisionChoice:
    """A precision named on the command line (not ``auto``), checked and kept for the run card."""
    choice = PrecisionChoice(resolve_precision(precision), "asked for")
    _LAST[:] = [choice]
    return choice


def model_shapes(model) -> tuple[int, int]:
    """``(hidden, intermediate)`` of a transformers model (or its config): the shapes of its MLP matmuls."""
    config = getattr(model, "config", model)
    hidden = config.hidden_size
    return hidden, getattr(config, "intermediate_size", None) or 4 * hidden


def measure_matmuls(shapes: tuple[int, int], tokens: int = 256, budget_s: float = 0.1,
                    device: str | torch.device = "cpu") -> tuple[float, float]:
    """Best GFLOP/s of ``[tokens, hidden] @ [hidden, intermediate]`` then ``@ [intermediate, hidden]`` (an MLP's
    two matmuls) in fp32 and in bf16, each timed for about ``budget_s`` seconds after one warm-up."""
    hidden, inter = shapes
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    x, w1, w2 = (torch.randn(*s, generator=gen) for s in ((tokens, hidden), (hidden, inter), (inter, hidden)))
    flops = 2 * 2 * tokens * hidden * inter
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        a, b, c = (t.to(device=device, dtype=dtype) for t in (x, w1, w2))
        (a @ b) @ c
        sync()
        best, start = float("inf"), time.perf_counter()
        while time.perf_counter() - start < budget_s or best == float("inf"):
            t0 = time.perf_counter()
            (a @ b) @ c
            sync()
            best = min(best, time.perf_counter() - t0)
        out.append(flops / best / 1e9)
    return out[0], out[1]


def _cache_file() -> Path:
    return Path(os.environ.get("DPO_LIB_CACHE", Path.home() / ".cache" / "dpo_lib")) / "precision_probe.json"


def _machine_key(shapes: tuple[int, int]) -> str:
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), platform.processor())
    except OSError:
        cpu = platform.processor()
    return f"{cpu} | {os.cpu_count()} cpus | {torch.get_num_threads()} threads | torch {torch.__version__} | " \
           f"{shapes[0]}x{shapes[1]}"


def probe_matmuls(shapes: tuple[int, int], measure=measure_matmuls, cache: Path | None = None) -> ProbeResult:
    """:func:`measure_matmuls` of ``shapes``, cached per machine (CPU model, cores, threads, torch version,
    shapes) in ``$DPO_LIB_CACHE/precision_probe.json``; ``measure`` is injectable (tests)."""
    cache = cache or _cache_file()
    key = _machine_key(shapes)
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return ProbeResult(*known[key], shapes=tuple(shapes), cached=True)
    fp32, bf16 = measure(tuple(shapes))
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({**known, key: [fp32, bf16]}, indent=1))
    except OSError:
        pass  # a read-only home: measure again next time
    return ProbeResult(fp32, bf16, tuple(shapes))


def choose_auto(device: str | torch.device = "cpu", shapes: tuple[int, int] | None = None,
                probe=None) -> PrecisionChoice:
    """``auto`` on ``device``. A CUDA GPU: bf16 where supported, else fp16 (with the loss scaler of
    :mod:`dpo_lib.amp`). A CPU with ``shapes`` (:func:`model_shapes`): ``probe(shapes)`` (default
    :func:`probe_matmuls`), bf16 only where it measured bf16 faster. A CPU without: :func:`bf16_is_fast`."""
    device = torch.device(device)
    if device.type == "cuda":
        precision, why = choose_precision(True, bf16_is_fast(device))
        choice = PrecisionChoice(precision, why.split(":")[0])
    elif shapes is None:
        fast = bf16_is_fast(device)
        choice = PrecisionChoice("bf16" if fast else "fp32", "CPU flags: bf16 matmul units" if fast
                                 else "CPU without bf16 matmul units")
    else:
        result = (probe or probe_matmuls)(shapes)
        choice = PrecisionChoice("bf16" if result.bf16_faster else "fp32",
                                 "bf16 measured faster than fp32 here" if result.bf16_faster
                                 else "fp32 measured at least as fast as bf16 here", result)
    if choice.probe or device.type == "cuda":  # a decision worth the run card (not the flag fallback)
        _LAST[:] = [choice]
    return choice
