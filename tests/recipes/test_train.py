"""dpo_lib.recipes.train: the training pairs from a JSONL file or a hub dataset (offline: a fake ``datasets``
module serves the hub-format fixtures of tests/fixtures/hub/), through to the prepared features."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
from _tiny import save_tiny, toy_rows, train_config, write_jsonl

from dpo_lib.config import JobConfig
from dpo_lib.data import DataError, row_problems
from dpo_lib.recipes.train import load_training_pairs, prepare

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "hub"


def fixture_rows(name: str) -> list[dict]:
    with open(FIXTURES / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """``datasets.load_dataset`` replaced: records each call, returns the fixture of that hub id. Runs in an
    empty folder, so no local file shadows a hub name."""
    files = {"HuggingFaceH4/ultrafeedback_binarized": "ultrafeedback_binarized.jsonl",
             "Anthropic/hh-rlhf": "hh_rlhf.jsonl"}
    calls = []

    def load_dataset(path, name=None, split=None, streaming=False, **kwargs):
        calls.append((path, name, split, streaming))
        return fixture_rows(files[path])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.chdir(tmp_path)
    return calls


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def test_hub_dataset_by_name(fake_hub, capsys):
    """The 7 ultrafeedback fixture rows keep 3 (a tie, a missing reply, a prompt mismatch and inverted scores
    are skipped: see tests/test_hub_datasets.py); the train split is the dataset's ``train_prefs``."""
    rows = load_training_pairs(JobConfig(dataset="ultrafeedback"))
    assert fake_hub == [("HuggingFaceH4/ultrafeedback_binarized", None, "train_prefs", False)]
    assert len(rows) == 3
    assert rows[0] == {"prompt": [user("Name the three primary colours of paint.")],
                       "chosen": [assistant("Red, yellow and blue are the traditional primary colours of paint.")],
                       "rejected": [assistant("Green, orange and purple.")]}
    assert rows[1] == {"prompt": [user("Give me a synonym for 'happy'."), assistant("Joyful."),
                                  user("Another one, please.")],
                       "chosen": [assistant("Cheerful.")], "rejected": [assistant("Sad.")]}
    # the converted rows pass the same validation as a JSONL file's
    assert all(row_problems(r) == [] for r in rows)
    assert "ultrafeedback (hub): " in capsys.readouterr().out


def test_hub_dataset_by_hub_id(fake_hub):
    rows = load_training_pairs(JobConfig(dataset="Anthropic/hh-rlhf"))
    assert fake_hub == [("Anthropic/hh-rlhf", None, "train", False)]
    assert len(rows) == 3  # 8 fixture rows, 5 skipped (tests/test_hub_datasets.py)
    assert rows[0]["prompt"] == [user("How long should I boil an egg for a runny yolk?")]


def test_local_file_named_like_a_hub_dataset_is_read_as_jsonl(fake_hub, tmp_path):
    write_jsonl(tmp_path / "ultrafeedback", toy_rows(3))
    rows = load_training_pairs(JobConfig(dataset="ultrafeedback"))
    assert fake_hub == []  # the hub was not asked
    assert [r["chosen"] for r in rows] == [r["chosen"] for r in toy_rows(3)]


def test_local_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", toy_rows(4))
    rows = load_training_pairs(JobConfig(dataset=path))
    assert [{k: v for k, v in r.items() if k != "_where"} for r in rows] == toy_rows(4)
    assert [r["_where"] for r in rows] == [f"{path}:{i}" for i in (1, 2, 3, 4)]


def test_local_jsonl_bad_rows(tmp_path):
    """Row 3 has no 'rejected': an error naming it, or with --skip-invalid the 4 good rows."""
    rows = toy_rows(4)
    path = write_jsonl(tmp_path / "pairs.jsonl", rows[:2] + [{"prompt": "p", "chosen": "c"}] + rows[2:])
    with pytest.raises(DataError, match=f"{path}:3"):
        load_training_pairs(JobConfig(dataset=path))
    assert len(load_training_pairs(JobConfig(dataset=path, skip_invalid=True))) == 4


def test_prepare_trains_on_a_hub_dataset(fake_hub, tmp_path):
    """The hub rows go through the whole set-up: tokenized, with reference log-probs, and the data hash on the
    run card."""
    model = save_tiny(tmp_path / "tiny")
    job = JobConfig(dataset="ultrafeedback", eval_dataset=None, model=str(model), max_length=128,
                    max_prompt_length=64)
    s, features, card = prepare(job, train_config(batch_size=2, grad_accum=1), tmp_path / "out")  # 3 pairs: one batch
    assert len(features) == 3
    assert all("ref_chosen_logps" in f and f["ref_chosen_logps"] < 0 for f in features)
    assert card["job"]["dataset"] == "ultrafeedback" and len(card["data_sha256_16"]) == 16
