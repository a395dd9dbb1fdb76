"""``--precision auto`` by measurement (issue 41, point 0) and the fp16 precision (issue 40): the probe's result
injected, its cache, the run's set-up printing the choice and keeping it in the run card."""

from __future__ import annotations

import pytest
import torch
from _tiny import save_tiny, train_config

from dpo_lib import precision
from dpo_lib.config import JobConfig
from dpo_lib.precision import (
    ProbeResult,
    autocast,
    choose_auto,
    last_choice,
    measure_matmuls,
    model_shapes,
    probe_matmuls,
    resolve_precision,
)


def fixed(fp32: float, bf16: float):
    return lambda shapes: ProbeResult(fp32, bf16, tuple(shapes))


@pytest.mark.parametrize("fp32, bf16, expected", [(328.0, 200.0, "fp32"),   # the Xeon of issue 41
                                                  (100.0, 166.0, "bf16"),   # the AMD EPYC of issue 41
                                                  (150.0, 150.0, "fp32")])  # a tie: fp32
def test_auto_on_a_cpu_follows_the_probe(fp32, bf16, expected):
    choice = choose_auto("cpu", (576, 1536), probe=fixed(fp32, bf16))
    assert choice.precision == expected
    assert resolve_precision("auto", "cpu", (576, 1536), probe=fixed(fp32, bf16)) == expected
    line = choice.line()
    assert f"precision: {expected}" in line and f"fp32 {fp32:.1f}" in line and f"bf16 {bf16:.1f}" in line
    assert last_choice() == {"precision": expected, "why": choice.why,
                             "probe": {"fp32_gflops": fp32, "bf16_gflops": bf16, "shapes": (576, 1536),
                                       "cached": False}}


def test_auto_on_a_gpu_without_bf16_is_fp16(monkeypatch):
    monkeypatch.setattr(precision, "bf16_is_fast", lambda d: False)
    assert choose_auto("cuda").precision == "fp16"
    monkeypatch.setattr(precision, "bf16_is_fast", lambda d: True)
    assert choose_auto("cuda").precision == "bf16"


def test_fp16_is_a_precision():
    assert resolve_precision("fp16") == "fp16"
    with autocast("fp16"):
        out = torch.ones(2, 2) @ torch.ones(2, 2)
    assert out.dtype == torch.float16
    assert train_config(precision="fp16").precision == "fp16"


def test_probe_is_cached_per_machine_and_shapes(tmp_path):
    calls = []

    def measure(shapes):
        calls.append(shapes)
        return 10.0, 20.0

    cache = tmp_path / "probe.json"
    first = probe_matmuls((64, 128), measure=measure, cache=cache)
    again = probe_matmuls((64, 128), measure=measure, cache=cache)
    other = probe_matmuls((32, 64), measure=measure, cache=cache)
    assert calls == [(64, 128), (32, 64)]
    assert not first.cached and again.cached and not other.cached
    assert (again.fp32_gflops, again.bf16_gflops, again.bf16_faster) == (10.0, 20.0, True)


def test_measure_matmuls_takes_a_fraction_of_a_second():
    import time

    t0 = time.perf_counter()
    fp32, bf16 = measure_matmuls((64, 128), tokens=32, budget_s=0.02)
    assert fp32 > 0 and bf16 > 0 and time.perf_counter() - t0 < 1.0


def test_start_prints_the_choice_and_the_run_card_keeps_it(tmp_path, monkeypatch, capsys):
    from dpo_lib.recipes.run import run_card, start

    monkeypatch.setattr(precision, "probe_matmuls", fixed(300.0, 150.0))
    job = JobConfig(model=str(save_tiny(tmp_path / "tiny")), eval_dataset=None)
    s = start(job, train_config(precision="auto"))
    assert s.config.precision == "fp32"
    assert model_shapes(s.model) == (32, 64)
    out = capsys.readouterr().out
    assert "precision: fp32 (fp32 measured at least as fast as bf16 here); probe of 32x64 matmuls: " \
           "fp32 300.0, bf16 150.0 GFLOP/s" in out
    card = run_card({}, s.config, s.fingerprint, [])
    assert card["precision_choice"]["probe"]["bf16_gflops"] == 150.0
    s = start(job, train_config(precision="bf16"))  # asked for: kept, and the card says so
    assert s.config.precision == "bf16" and run_card({}, s.config, "", [])["precision_choice"]["why"] == "asked for"
