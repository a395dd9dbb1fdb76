"""Measuring memory: parameter sizes, this process's resident and peak memory, saved activations.

* :func:`megabytes` — the size of some modules' parameters, shared tensors counted once.
* :func:`rss_mb` / :func:`rss_bytes` — this process's resident set size now.
* :class:`PeakMemory` — how far resident memory (and GPU memory) rose during a ``with`` block.
* :func:`peak_memory_bytes` — the peak over the whole life of the process (``python -m dpo_lib
  bench`` runs each trainer in a fresh process and reads it at the end).
* :func:`measure_saved_activations` — the bytes autograd saves for the backward pass, to check
  the activation formula of :mod:`dpo_lib.tools.vram` on any device.
"""

from __future__ import annotations

import gc
import sys

import torch
from torch import nn

__all__ = [
    "PeakMemory", "max_rss_bytes", "measure_saved_activations", "megabytes", "peak_memory_bytes", "rss_bytes",
    "rss_mb",
]


def megabytes(*modules: nn.Module, trainable_only: bool = False) -> float:
    """Size of the parameters of ``modules`` in MB (2**20 bytes); a tensor shared by several
    modules (tied embeddings, a shared backbone) counts once."""
    seen, total = set(), 0
    for module in modules:
        for p in module.parameters():
            if (trainable_only and not p.requires_grad) or p.data_ptr() in seen:
                continue
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total / 2**20


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])                             # kB
    except OSError:
        return None
    return None


def rss_bytes() -> int | None:
    """Resident set size of this process in bytes (``/proc`` on Linux, else psutil, else None)."""
    kb = _status_kb("VmRSS")
    if kb is not None:
        return kb * 1024
    try:
        import psutil
        return psutil.Process().memory_info().rss
    except ImportError:
        return None


def rss_mb() -> float:
    """Resident set size of this process in MB (``/proc`` on Linux, else psutil, else NaN)."""
    value = rss_bytes()
    return value / 2**20 if value is not None else float("nan")


def max_rss_bytes() -> int:
    """The peak resident set size of this process over its whole life (``getrusage``), in bytes."""
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024                # bytes on macOS, kB on Linux


def _maxrss_mb() -> float:
    try:
        return max_rss_bytes() / 2**20
    except ImportError:
        return float("nan")


def peak_memory_bytes(device: str) -> int:
    """Peak memory of this process so far: ``torch.cuda.max_memory_allocated`` on ``"cuda"``,
    else the peak resident set size (weights, optimizer state, activations, Python and the libraries)."""
    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    return max_rss_bytes()


class PeakMemory:
    """``with PeakMemory() as m: ...`` then ``m.peak_mb``: how far this process's resident memory rose
    above its level at the start of the block, at the block's worst moment.

    On Linux the kernel's peak (``VmHWM``) is reset at the start (``/proc/self/clear_refs``) and
    freed heap memory is first handed back (``malloc_trim``), so the number covers this block alone.
    Elsewhere it falls back to ``getrusage``'s lifetime peak, which only shows growth beyond every
    earlier peak (``exact`` is then False). With CUDA, ``gpu_peak_mb`` is the same measure for the
    memory PyTorch allocated on the GPU (``None`` without a GPU)."""
    def __enter__(self) -> "PeakMemory":
        gc.collect()
        self.gpu_peak_mb = None
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._gpu_start = torch.cuda.memory_allocated()
        try:
            import ctypes
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        self.start_mb = rss_mb()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")                                                # reset VmHWM to the current RSS
            self.exact = _status_kb("VmHWM") is not None
        except OSError:
            self.exact = False
        self._lifetime_start = _maxrss_mb()
        return self

    def __exit__(self, *exc) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.gpu_peak_mb = (torch.cuda.max_memory_allocated() - self._gpu_start) / 2**20
        if self.exact:
            self.peak_mb = _status_kb("VmHWM") / 1024 - self.start_mb
        else:
            self.peak_mb = max(_maxrss_mb() - self._lifetime_start, 0.0)     # a lower bound


def measure_saved_activations(model, input_ids, attention_mask=None) -> int:
    """Bytes of the tensors autograd saves for the backward pass of one forward (logits excluded).

    Counts each storage once and skips the model's own parameters. Works on a CPU, so the
    activation formula can be checked without a GPU. The forward runs with
    ``logits_to_keep=1`` so that the LM head's output does not count.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # pragma: no cover - exotic tensors
            return t
        ptr = storage.data_ptr()
        if ptr not in params:
            seen.setdefault(ptr, storage.nbytes())
        return t

    was_training = model.training
    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)
    finally:
        model.train(was_training)
    return sum(seen.values())
