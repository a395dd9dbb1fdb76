"""`python -m dpo_lib bench --vs trl` end to end on a tiny model (no timing assertions)."""

import json

import pytest

pytest.importorskip("trl", reason="the bench compares with TRL (dev extra)")

from _tiny import save_tiny, toy_rows, write_jsonl  # noqa: E402

from dpo_lib.cli import main  # noqa: E402


def test_bench_runs_both_trainers_and_writes_json(tmp_path, capsys):
    model = save_tiny(tmp_path / "model")
    data = write_jsonl(tmp_path / "pairs.jsonl", toy_rows(12))
    out = tmp_path / "bench.json"
    status = main(["bench", "--vs", "trl", "--model", str(model), "--dataset", str(data), "--steps", "2",
                   "--batch-size", "4", "--repeats", "1", "--threads", "1", "--peak-flops", "1e11",
                   "--attention", "eager", "--json", str(out)])
    assert status == 0
    r = json.loads(out.read_text())
    for key in ("throughput_ratio", "peak_memory_ratio", "end_to_end_ratio", "loss_max_abs_diff", "loss_tolerance",
                "same_tokens", "losses", "settings", "machine", "what_is_timed", "runs"):
        assert key in r, key
    for impl in ("trl", "dpo_lib"):
        for key in ("tokens_per_second", "seconds_per_step", "peak_memory_bytes", "total_seconds", "mfu"):
            assert r[impl][key] > 0, (impl, key)
        assert len(r["losses"][impl]) == 2
        assert len(r["runs"][impl]) == 1 and len(r["runs"][impl][0]["step_seconds"]) == 2
    assert r["same_tokens"] is True                  # both trainers scored exactly the same token ids
    assert r["settings"]["attention"] == "eager"     # both models ran the attention asked for (default: sdpa)
    assert {r["runs"][impl][0]["attention"] for impl in ("trl", "dpo_lib")} == {"eager"}
    assert abs(r["losses"]["trl"][0] - 0.693147) < 1e-5
    assert r["loss_max_abs_diff"] <= r["loss_tolerance"] and r["loss_within_tolerance"]
    assert r["throughput_ratio"] == pytest.approx(r["dpo_lib"]["tokens_per_second"] / r["trl"]["tokens_per_second"])
    assert "tokens/s" in capsys.readouterr().out


def test_bench_says_when_the_data_is_too_short(tmp_path, capsys):
    model = save_tiny(tmp_path / "model")
    data = write_jsonl(tmp_path / "pairs.jsonl", toy_rows(4))
    assert main(["bench", "--model", str(model), "--dataset", str(data), "--steps", "2", "--batch-size", "4"]) == 2
    assert "need 8" in capsys.readouterr().err


def test_bench_measures_one_lever_on_against_off(tmp_path, capsys):
    """--vs lever: dpo_lib with the lever and without it, alternating; the ratio is with / without and the
    losses agree to float32 rounding (the lever changes the order of a sum, not the maths)."""
    model = save_tiny(tmp_path / "model")
    data = write_jsonl(tmp_path / "pairs.jsonl", toy_rows(12))
    out = tmp_path / "lever.json"
    status = main(["bench", "--vs", "lever", "--lever", "sparse_embedding_grad", "--model", str(model),
                   "--dataset", str(data), "--steps", "2", "--batch-size", "4", "--repeats", "1", "--threads", "1",
                   "--peak-flops", "1e11", "--json", str(out)])
    assert status == 0
    r = json.loads(out.read_text())
    assert r["baseline"] == "without_sparse_embedding_grad" and "trl" not in r
    assert r["settings"]["lever"] == "sparse_embedding_grad"
    base = r["without_sparse_embedding_grad"]
    assert r["throughput_ratio"] == pytest.approx(r["dpo_lib"]["tokens_per_second"] / base["tokens_per_second"])
    assert r["loss_tolerance"] == 1e-4 and r["loss_max_abs_diff"] <= 1e-4 and r["same_tokens"] is True
    assert abs(r["losses"]["dpo_lib"][0] - 0.693147) < 1e-5
    assert "without_sparse_embedding_grad" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--vs", "lever"], ["--lever", "compact_lm_head"], ["--vs", "lever", "--lever", "x"]])
def test_bench_lever_flags_are_checked(tmp_path, capsys, argv):
    try:
        status = main(["bench", *argv])
    except SystemExit as e:                          # argparse refuses an unknown choice itself
        status = e.code
    assert status == 2
    assert "lever" in capsys.readouterr().err


def test_bench_vs_generate_times_both_loops_at_both_batch_sizes(tmp_path, capsys):
    """--vs generate: model.generate and dpo_lib's decode loop, at 32 rows and at sampling_batch_size's, alternating;
    the ratios are the arms' tokens/s divided as the JSON names them, and greedy decoding gives the same tokens
    (else the exit status is 1)."""
    from dpo_lib.tools.bench.sampling import ARMS
    model = save_tiny(tmp_path / "model")
    data = write_jsonl(tmp_path / "pairs.jsonl", toy_rows(6))
    out = tmp_path / "generate.json"
    status = main(["bench", "--vs", "generate", "--model", str(model), "--dataset", str(data), "--repeats", "1",
                   "--threads", "1", "--json", str(out)])
    assert status == 0
    r = json.loads(out.read_text())
    tps = {arm: r[arm]["tokens_per_second"] for arm in ARMS}
    assert all(v > 0 for v in tps.values()) and r["greedy_identical"] is True
    assert r["loop_ratio"] == pytest.approx(tps["dpo_lib@auto"] / tps["hf@auto"])
    assert r["batch_ratio"] == pytest.approx(tps["dpo_lib@auto"] / tps["dpo_lib@32"])
    assert r["throughput_ratio"] == pytest.approx(tps["dpo_lib@auto"] / tps["hf@32"])
    assert r["settings"]["batch_sizes"]["auto"] == 128 and len(r["runs"]["hf@32"]) == 1
    assert all(r[arm]["tokens"] > 0 for arm in ARMS)
    assert "loop (dpo_lib/hf" in capsys.readouterr().out


def test_bench_in_bf16_checks_each_trainer_against_the_float32_trajectory(tmp_path):
    """In bf16 one extra float32 dpo_lib run gives the trajectory both trainers round: each one's largest
    distance from it is the check (tolerance 2e-2), the two trainers' difference is only reported."""
    model = save_tiny(tmp_path / "model")
    data = write_jsonl(tmp_path / "pairs.jsonl", toy_rows(12))
    out = tmp_path / "bench.json"
    assert main(["bench", "--vs", "trl", "--model", str(model), "--dataset", str(data), "--steps", "2",
                 "--batch-size", "4", "--repeats", "1", "--threads", "1", "--peak-flops", "1e11", "--dtype", "bf16",
                 "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert len(r["fp32_losses"]) == 2 and abs(r["fp32_losses"][0] - 0.693147) < 1e-5   # step 1: log 2 exactly
    vs = r["loss_max_abs_diff_vs_fp32"]
    for impl in ("trl", "dpo_lib"):
        want = max(abs(a - b) for a, b in zip(r["runs"][impl][0]["losses"], r["fp32_losses"]))
        assert vs[impl] == pytest.approx(want, abs=0)
    assert r["loss_within_tolerance"] == (max(vs.values()) <= r["loss_tolerance"] == 2e-2)
