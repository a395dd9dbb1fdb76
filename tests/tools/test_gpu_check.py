"""``python -m dpo_lib.tools.gpu_check --dry-run``: the GPU check's path on the CPU (issue 40, point 3). CI runs it."""

from __future__ import annotations

import json
import time

import pytest

from dpo_lib.tools import gpu_check


def test_dry_run_writes_gpu_check_json(tmp_path):
    t0 = time.perf_counter()
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    seconds = time.perf_counter() - t0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry_run"] is True and "finished" in report
    lora = report["lora"]
    assert lora["precision"] == "fp16" and lora["hardware"].startswith("T4")  # the T4 path, forced
    assert lora["first_loss"] == pytest.approx(0.6931, abs=1e-4)
    assert lora["amp"]["amp/skipped_steps"] == 0 and lora["amp"]["amp/scale"] > 0
    assert 0 <= lora["win_rate"] <= 1 and lora["win_rate_se"] >= 0 and lora["planner_allocated_bytes"] > 0
    assert lora["measured_peak_bytes"] is None  # no GPU: no peak is claimed
    assert report["bench"]["returncode"] == 0, report["bench"].get("error")
    assert "notebook" not in report  # the lesson runs only on a GPU
    assert seconds < 90  # under a minute on a quiet 2-core CPU


def test_help_says_what_the_machine_needs(capsys):
    with pytest.raises(SystemExit):
        gpu_check.main(["--help"])
    text = capsys.readouterr().out
    assert "wheels" in text and "GGUF" in text and "two parts" in text


def test_without_a_gpu_only_the_dry_run(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        gpu_check.main(["--out", str(tmp_path)])
