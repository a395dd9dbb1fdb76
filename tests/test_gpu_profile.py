"""Lesson 05's ``gpu`` profile code on the CPU with the device forced (issue 40, point 2): the hub-data path
from the local fixtures, the planner at the gpu settings, LoRA at the gpu settings' shapes on a tiny fp16
base trained in fp16 with the loss scaler (a T4's path), and the evaluation with a judge (the tiny stand-in
for the hub reward model) that prints a win rate with its SE."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpo_lib import hub_datasets
from dpo_lib.evaluation import win_rate
from dpo_lib.judges import DEFAULT_REWARD_MODEL, RewardModelJudge, score_samples, tiny_judge
from dpo_lib.models import tiny_model, tiny_tokenizer
from dpo_lib.tools import gpu_check, vram

FIXTURE = Path(__file__).parent / "fixtures" / "hub" / "ultrafeedback_binarized.jsonl"


@pytest.fixture
def offline_hub(monkeypatch):
    """``datasets.load_dataset`` answering from the local fixture, for any split."""
    datasets = pytest.importorskip("datasets")
    rows = [json.loads(line) for line in FIXTURE.read_text().splitlines() if line.strip()]
    calls = []

    def load_dataset(path, config=None, split=None, streaming=False, **kw):
        calls.append((path, split, streaming))
        return rows

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_hub_path_from_fixtures(offline_hub):
    train, stats = hub_datasets.load_hub_preferences("ultrafeedback", "train", limit=2000)
    assert offline_hub == [("HuggingFaceH4/ultrafeedback_binarized", "train_prefs", True)]
    assert len(train) == 3 and stats.n_skipped == 4
    hub_datasets.load_hub_preferences("ultrafeedback", "test", limit=200)
    assert offline_hub[-1][1] == "test_prefs"


def test_planner_at_the_gpu_settings():
    p = vram.plan("SmolLM2-360M-Instruct", "T4", mode="lora", seq_len=gpu_check.GPU_ULTRAFEEDBACK["max_length"],
                  global_batch=gpu_check.GPU_ULTRAFEEDBACK["global_batch"], lora_r=gpu_check.LORA_R)
    assert (p.precision, p.micro_batch, p.grad_accum) == ("fp16", 4, 8)
    assert p.memory.total < 16 * 2**30


def test_lora_fp16_run_with_a_judge(offline_hub, capsys):
    rows = hub_datasets.load_hub_preferences("ultrafeedback", "train", limit=2000)[0]
    tok = tiny_tokenizer()
    settings = dict(gpu_check.GPU_ULTRAFEEDBACK, global_batch=4, max_new_tokens=6)
    r = gpu_check.lora_run(tiny_model(len(tok)).half(), tok, rows * 2, rows, tiny_judge(), "T4", "fp16", settings,
                           steps=2, name="tiny")
    assert r["precision"] == "fp16" and r["plan"]["precision"] == "fp16"
    assert r["trainable_params"] == vram.lora_trainable_params(vram.ModelSpec.from_config(tiny_model(len(tok)).config),
                                                               gpu_check.LORA_R, "all-linear")
    assert r["first_loss"] == pytest.approx(0.6931, abs=1e-4)
    assert r["amp"] == {"amp/scale": 65536.0, "amp/skipped_steps": 0}
    assert r["samples"] == 3 and 0 <= r["win_rate"] <= 1 and r["win_rate_se"] >= 0
    print(f"win rate of the policy against the reference: {r['win_rate']:.3f} +- {r['win_rate_se']:.3f}")
    assert "+-" in capsys.readouterr().out


def test_judge_scores_prompt_answer_pairs():
    judge = tiny_judge()
    prompts = ["Name a colour.", [{"role": "user", "content": "Name a fruit."}]]
    scores = judge(prompts, ["Red.", "Apple."])
    assert len(scores) == 2 and scores == judge(prompts, ["Red.", "Apple."])  # deterministic
    assert judge(prompts[:1], ["Blue."]) != scores[:1]
    samples = [{"prompt_index": 1, "text": "Apple."}, {"prompt_index": 0, "text": "Red."}]
    assert score_samples(judge, prompts, samples) == pytest.approx(scores[::-1], abs=1e-5)
    wins, se = win_rate(scores, [s - 1 for s in scores])
    assert (wins, se) == (1.0, 0.0)
    with pytest.raises(ValueError, match="2 prompts for 1 answers"):
        judge(prompts, ["x"])
    assert DEFAULT_REWARD_MODEL and isinstance(judge, RewardModelJudge)
