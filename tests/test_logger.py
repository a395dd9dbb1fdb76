"""dpo_lib.logger: the printed table and the metrics file (one JSON line per step, cut back on resume)."""

from __future__ import annotations

import json

import pytest

from dpo_lib.logger import MetricsLogger, format_table, table_rows


def test_format_table_exact():
    """Widths: the metric column is max(len('metric'), len('num_pairs')) = 9, the value column
    max(len('value'), len('0.75')) = 5; the line is 1 + (9 + 2) + 1 + (5 + 2) + 1 = 21 wide and the title is
    centred in it (15 spaces: 8 left, 7 right, as str.center splits them)."""
    assert format_table("Step 2", {"accuracy": 0.75, "num_pairs": 16}) == "\n".join([
        "        Step 2       ",
        "+-----------+-------+",
        "| metric    | value |",
        "+-----------+-------+",
        "| accuracy  | 0.75  |",
        "| num_pairs | 16    |",
        "+-----------+-------+",
    ])


def test_format_table_lines_are_one_width_and_floats_have_6_digits():
    """Short names and values: the header row ('metric', 'value') sets the widths, every line is as wide."""
    text = format_table("t", {"lr": 1e-05, "loss": 0.6931471805599453, "n": 3})
    lines = text.splitlines()
    assert len({len(line) for line in lines}) == 1
    assert "| lr     | 1e-05    |" in lines and "| loss   | 0.693147 |" in lines and "| n      | 3        |" in lines


def _metrics(step: int, **extra) -> dict:
    return {"step": step, "loss": 0.5 + step, "rewards/accuracies": 0.25, "rewards/margins": 0.1,
            "rewards/chosen": 0.3, "rewards/rejected": 0.2, "learning_rate": 1e-5, "grad_norm": 2.0,
            "num_tokens": 100 * step, "tokens_per_second": 50.0, **extra}


def test_table_rows_arithmetic():
    """Step 3 of 12 with batches of 8: 3 x 8 = 24 pairs seen, progress 3 / 12 = 0.25."""
    rows = table_rows(_metrics(3), step=3, total_steps=12, batch_size=8)
    assert list(rows) == ["accuracy", "dpo_loss", "margin", "chosen_reward", "rejected_reward", "learning_rate",
                          "grad_norm", "num_pairs", "num_tokens", "tokens_per_second", "progress"]
    assert rows["num_pairs"] == 24 and rows["progress"] == 0.25
    assert (rows["accuracy"], rows["dpo_loss"], rows["margin"], rows["num_tokens"]) == (0.25, 3.5, 0.1, 300)
    with_eval = table_rows(_metrics(3, **{"eval/accuracy": 0.8, "eval/margin": 0.4}), 3, 12, 8)
    assert (with_eval["heldout_accuracy"], with_eval["heldout_margin"]) == (0.8, 0.4)
    assert list(with_eval)[-3:] == ["heldout_accuracy", "heldout_margin", "progress"]


def test_metrics_logger_one_line_per_step_and_truncate(tmp_path):
    log = MetricsLogger(tmp_path, start_step=0, total_steps=4, batch_size=8, print_every=0)
    for step in (1, 2, 3):
        log.log(_metrics(step))
    log.close()
    path = tmp_path / "metrics.jsonl"
    assert [json.loads(line) for line in path.read_text().splitlines()] == [_metrics(1), _metrics(2), _metrics(3)]

    MetricsLogger.truncate(tmp_path, 2)  # resuming the checkpoint of step 2: step 3's line goes
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    log = MetricsLogger(tmp_path, start_step=2, total_steps=4, batch_size=8, print_every=0)  # appends
    log.log(_metrics(3, loss=9.0))
    log.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3] and lines[2]["loss"] == 9.0
    MetricsLogger.truncate(tmp_path / "nowhere", 1)  # no file: nothing to do


def test_metrics_logger_writes_nothing_when_disabled(tmp_path):
    for log in (MetricsLogger(None, 0, 4, 8, 0), MetricsLogger(tmp_path, 0, 4, 8, 0, enabled=False)):
        log.log(_metrics(1))
        log.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("print_every, printed", [(2, [2, 3]), (0, []), (5, [3])])
def test_metrics_logger_prints_every_n_steps_and_the_last(tmp_path, capsys, print_every, printed):
    """3 steps: every 2nd step and the last one (3) are printed; print_every 0 prints nothing."""
    log = MetricsLogger(tmp_path, 0, total_steps=3, batch_size=8, print_every=print_every)
    for step in (1, 2, 3):
        log.log(_metrics(step))
    log.close()
    out = capsys.readouterr().out
    assert [int(line.split()[1]) for line in out.splitlines() if line.strip().startswith("Step ")] == printed
