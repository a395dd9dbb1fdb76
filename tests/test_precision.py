"""dpo_lib.precision: the precision names, the one rule that picks one per device, and the autocast context."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

from dpo_lib import precision
from dpo_lib.precision import autocast, bf16_is_fast, choose_precision, pick_dtype, resolve_precision


def test_resolve_precision_names():
    assert resolve_precision("fp32") == "fp32"
    assert resolve_precision("bf16") == "bf16"  # asked for: kept, fast or not
    assert resolve_precision("fp16") == "fp16"  # autocast with the loss scaler of dpo_lib.amp
    with pytest.raises(ValueError, match=r"^precision must be one of auto, fp32, bf16, fp16, not 'fp8'$"):
        resolve_precision("fp8")
    with pytest.raises(ValueError, match="not 'float32'"):
        resolve_precision("float32")


@pytest.mark.parametrize("fast, device, expected", [
    (True, "cpu", "bf16"), (False, "cpu", "fp32"),
    (True, "cuda", "bf16"),
    (False, "cuda", "fp16"),  # a GPU without bf16 (T4): fp16 autocast with a dynamic loss scaler
])
def test_resolve_auto(monkeypatch, fast, device, expected):
    monkeypatch.setattr(precision, "bf16_is_fast", lambda d: fast)
    assert resolve_precision("auto", device) == expected


def test_choose_precision_table():
    """bf16 wherever it is supported; else fp16 on a CUDA GPU when allowed; else fp32."""
    assert choose_precision(cuda=True, bf16=True)[0] == "bf16"
    assert choose_precision(cuda=False, bf16=True)[0] == "bf16"  # a CPU with AMX / AVX512-BF16
    assert choose_precision(cuda=True, bf16=False)[0] == "fp16"
    assert choose_precision(cuda=True, bf16=False, fp16=False)[0] == "fp32"
    assert choose_precision(cuda=False, bf16=False)[0] == "fp32"
    assert choose_precision(cuda=False, bf16=False, fp16=True)[0] == "fp32"  # fp16 is for GPUs only
    # the reasons name the device and the trade-off
    assert choose_precision(True, False, name="T4")[1].startswith("T4 has no bf16 support: fp16")
    assert "no loss scaling" in choose_precision(True, True, name="A100")[1]
    assert choose_precision(False, False)[1].startswith("CPU: fp32")


def test_bf16_is_fast_reads_the_cpu_flags(monkeypatch):
    class FakePath:
        text = ""

        def __init__(self, p):
            assert str(p) == "/proc/cpuinfo"

        def read_text(self):
            if FakePath.text is None:
                raise OSError("no /proc")
            return FakePath.text

    monkeypatch.setattr(precision, "Path", FakePath)
    FakePath.text = "flags : fpu sse avx2 avx512f amx_bf16 amx_tile"
    assert bf16_is_fast("cpu") is True
    FakePath.text = "flags : fpu sse avx512_bf16"
    assert bf16_is_fast("cpu") is True
    FakePath.text = "flags : fpu sse avx2 avx512f"
    assert bf16_is_fast("cpu") is False
    FakePath.text = None
    assert bf16_is_fast("cpu") is False
    assert bf16_is_fast("meta") is False  # neither CPU nor CUDA


def test_pick_dtype_on_cpu():
    assert pick_dtype("cpu") == torch.float32


def test_autocast_fp32_is_a_no_op():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    ctx = autocast("fp32")
    assert isinstance(ctx, nullcontext)
    with ctx:
        assert (a @ a).dtype == torch.float32


def test_autocast_bf16_makes_a_matmul_bf16_on_cpu():
    """[[1, 2], [3, 4]] @ I = itself: small integers, exact in bfloat16, so the values are checked exactly too."""
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    with autocast("bf16"):
        out = a @ torch.eye(2)
        assert out.dtype == torch.bfloat16
        assert a.dtype == torch.float32  # the weights stay float32
    assert out.float().tolist() == [[1.0, 2.0], [3.0, 4.0]]
    assert (a @ torch.eye(2)).dtype == torch.float32  # off again after the block
