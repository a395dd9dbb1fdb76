"""Hub preference converters, tested offline on fixtures in each dataset's own row format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpo_lib import hub_datasets as converters
from dpo_lib.hub_datasets import (
    HUB_DATASETS,
    convert_helpsteer3,
    convert_hh_rlhf,
    convert_ultrafeedback,
    load_hub_preferences,
    parse_hh_transcript,
)

FIXTURES = Path(__file__).parent / "fixtures" / "hub"


def load(name: str) -> list[dict]:
    with open(FIXTURES / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def assert_schema(row):
    """The course's conversational preference schema."""
    assert set(row) == {"prompt", "chosen", "rejected"}
    prompt = row["prompt"]
    assert isinstance(prompt, list) and prompt, "prompt must be a non-empty message list"
    assert prompt[-1]["role"] == "user", "prompt must end with a user turn"
    for m in prompt:
        assert set(m) == {"role", "content"} and m["role"] in {"system", "user", "assistant"}
        assert isinstance(m["content"], str) and m["content"]
    for key in ("chosen", "rejected"):
        msgs = row[key]
        assert isinstance(msgs, list) and len(msgs) == 1, f"{key} must be one message"
        assert msgs[0]["role"] == "assistant" and set(msgs[0]) == {"role", "content"}
        assert isinstance(msgs[0]["content"], str) and msgs[0]["content"].strip()
    assert row["chosen"] != row["rejected"]


# ----------------------------------------------------------------------------- HH-RLHF

def test_hh_rlhf_fixture_counts_and_schema():
    rows, stats = convert_hh_rlhf(load("hh_rlhf.jsonl"))
    assert stats.seen == 8 and stats.kept == 3 and len(rows) == 3
    assert stats.skipped == {"prompt_mismatch": 1, "malformed": 2, "identical": 1, "empty_response": 1}
    assert stats.n_skipped == 5
    for row in rows:
        assert_schema(row)


def test_hh_rlhf_single_turn_exact():
    rows, _ = convert_hh_rlhf(load("hh_rlhf.jsonl"))
    assert rows[0] == {
        "prompt": [user("How long should I boil an egg for a runny yolk?")],
        "chosen": [assistant("About six minutes in gently boiling water, then cool it in cold water "
                             "so it stops cooking.")],
        "rejected": [assistant("Eggs are a good source of protein.")],
    }


def test_hh_rlhf_multi_turn_exact():
    rows, _ = convert_hh_rlhf(load("hh_rlhf.jsonl"))
    assert rows[1] == {
        "prompt": [
            user("I want to start running. Any tips?"),
            assistant("Start slowly: alternate one minute of running with two minutes of walking."),
            user("How often should I go?"),
        ],
        "chosen": [assistant("Three times a week, with a rest day in between, is plenty at first.")],
        "rejected": [assistant("Every day, as far as you can. Pain is just weakness leaving the body.")],
    }


def test_hh_rlhf_keeps_inner_newlines():
    rows, _ = convert_hh_rlhf(load("hh_rlhf.jsonl"))
    assert rows[2]["prompt"] == [user("How do I make cold brew coffee?")]
    assert rows[2]["chosen"][0]["content"] == (
        "Step 1: mix coarse coffee with cold water, 1:8 by weight.\n"
        "Step 2: steep 12 to 18 hours in the fridge.\n"
        "Step 3: strain and dilute to taste.")


def test_parse_hh_transcript():
    prompt, reply = parse_hh_transcript("\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Bye\n\nAssistant: See you.")
    assert prompt == [user("Hi"), assistant("Hello!"), user("Bye")]
    assert reply == "See you."
    # a missing leading "\n\n" is tolerated
    assert parse_hh_transcript("Human: Hi\n\nAssistant: Hello!") == ([user("Hi")], "Hello!")
    for bad in ["no speakers at all", "\n\nHuman: only a question",
                "preamble\n\nHuman: Hi\n\nAssistant: Hello",
                "\n\nAssistant: I speak first\n\nHuman: Hi\n\nAssistant: Hello",
                "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: trailing question"]:
        with pytest.raises(ValueError):
            parse_hh_transcript(bad)


def test_limit_caps_kept_rows():
    rows, stats = convert_hh_rlhf(load("hh_rlhf.jsonl"), limit=2)
    assert len(rows) == 2 and stats.kept == 2 and stats.seen == 2


def test_converters_accept_generators_and_non_dict_rows():
    rows, stats = convert_hh_rlhf(r for r in [None, "text", *load("hh_rlhf.jsonl")[:1]])
    assert len(rows) == 1 and stats.skipped == {"malformed": 2}


# ----------------------------------------------------------------------------- UltraFeedback

def test_ultrafeedback_h4_counts_and_schema():
    rows, stats = convert_ultrafeedback(load("ultrafeedback_binarized.jsonl"))
    assert stats.seen == 7 and stats.kept == 3
    assert stats.skipped == {"tie": 1, "malformed": 1, "prompt_mismatch": 1, "inverted": 1}
    for row in rows:
        assert_schema(row)


def test_ultrafeedback_h4_exact():
    rows, _ = convert_ultrafeedback(load("ultrafeedback_binarized.jsonl"))
    assert rows[0] == {
        "prompt": [user("Name the three primary colours of paint.")],
        "chosen": [assistant("Red, yellow and blue are the traditional primary colours of paint.")],
        "rejected": [assistant("Green, orange and purple.")],
    }
    # multi-turn: every turn before the final reply becomes the prompt
    assert rows[1] == {
        "prompt": [user("Give me a synonym for 'happy'."), assistant("Joyful."), user("Another one, please.")],
        "chosen": [assistant("Cheerful.")],
        "rejected": [assistant("Sad.")],
    }
    # a leading system message is kept in the prompt
    assert rows[2]["prompt"] == [
        {"role": "system", "content": "You are a concise science tutor."},
        user("Summarise the water cycle in one sentence."),
    ]
    assert rows[2]["rejected"] == [assistant("The water cycle is a cycle that involves water, which cycles.")]


def test_ultrafeedback_flat_counts_and_exact():
    rows, stats = convert_ultrafeedback(load("ultrafeedback_argilla.jsonl"))
    assert stats.seen == 6 and stats.kept == 3
    assert stats.skipped == {"tie": 1, "malformed": 1, "empty_response": 1}
    for row in rows:
        assert_schema(row)
    assert rows[0] == {
        "prompt": [user("List two uses of baking soda.")],
        "chosen": [assistant("Leavening in baking, and deodorising a fridge.")],
        "rejected": [assistant("Baking soda is sodium bicarbonate.")],
    }
    assert rows[1]["chosen"][0]["content"] == (
        "\"Rise & Shine\": it hints at bread and mornings.\n\n"
        "Alternatives: \"Crumb Club\", \"The Daily Loaf\".")
    assert rows[2]["prompt"] == [user("Can you see the Great Wall of China from the Moon with the naked eye?")]


def test_ultrafeedback_flat_alternative_rating_names():
    base = {"instruction": "Say hi.", "chosen_response": "Hi!", "rejected_response": "No."}
    rows, stats = convert_ultrafeedback([
        {**base, "chosen_rating": 5, "rejected_rating": 2},
        {**base, "chosen_rating": 3, "rejected_rating": 3},
        {**base},  # no ratings at all: the dataset's labels are trusted
        {**base, "chosen_rating": float("nan"), "rejected_rating": 2},
    ])
    assert len(rows) == 2 and stats.skipped == {"tie": 1, "malformed": 1}
    assert rows[0] == {"prompt": [user("Say hi.")], "chosen": [assistant("Hi!")],
                       "rejected": [assistant("No.")]}


def test_ultrafeedback_layouts_can_be_mixed():
    h4 = load("ultrafeedback_binarized.jsonl")[:1]
    flat = load("ultrafeedback_argilla.jsonl")[:1]
    rows, stats = convert_ultrafeedback(h4 + flat)
    assert stats.kept == 2 and stats.n_skipped == 0


# ----------------------------------------------------------------------------- HelpSteer3

def test_helpsteer3_counts_and_schema():
    rows, stats = convert_helpsteer3(load("helpsteer3_preference.jsonl"))
    assert stats.seen == 6 and stats.kept == 3
    assert stats.skipped == {"tie": 1, "malformed": 2}
    for row in rows:
        assert_schema(row)


def test_helpsteer3_sign_convention_exact():
    rows, _ = convert_helpsteer3(load("helpsteer3_preference.jsonl"))
    # overall_preference = -2: response1 is better
    assert rows[0] == {
        "prompt": [user("What should I pack for a weekend hiking trip?")],
        "chosen": [assistant("Layers, a rain jacket, two litres of water, snacks, a map, a head torch "
                             "and a small first-aid kit.")],
        "rejected": [assistant("Pack whatever you like.")],
    }
    # overall_preference = +3: response2 is better; multi-turn context is the prompt
    assert rows[1] == {
        "prompt": [
            user("How do I reverse a list in Python?"),
            assistant("Use `my_list.reverse()` to reverse it in place."),
            user("And without changing the original?"),
        ],
        "chosen": [assistant("Use slicing: `reversed_copy = my_list[::-1]` returns a new list.")],
        "rejected": [assistant("Use `my_list.reverse()`.")],
    }
    # overall_preference = +1 (slightly better) still counts
    assert rows[2]["chosen"] == [assistant("Man sagt 'Danke' oder, etwas herzlicher, 'Dankeschön'.")]


def test_helpsteer3_rejects_out_of_range_preference():
    row = load("helpsteer3_preference.jsonl")[0]
    rows, stats = convert_helpsteer3([{**row, "overall_preference": 5}, {**row, "overall_preference": True}])
    assert rows == [] and stats.skipped == {"malformed": 2}


# ----------------------------------------------------------------------------- hub loading

def test_load_hub_preferences_calls_datasets_lazily(monkeypatch):
    """No network: a fake ``datasets`` module records the call and returns fixture rows."""
    import sys
    import types

    calls = []

    def fake_load_dataset(path, name=None, split=None, streaming=False, **kwargs):
        calls.append((path, name, split, streaming, *kwargs.items()))
        return load("helpsteer3_preference.jsonl")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake_load_dataset))
    rows, stats = load_hub_preferences("helpsteer3", split="test", limit=2)
    assert calls == [("nvidia/HelpSteer3", "preference", "validation", True)]
    assert stats.seen == 2  # streaming stops as soon as `limit` rows are kept
    assert len(rows) == 2 and stats.kept == 2

    calls.clear()
    load_hub_preferences("HuggingFaceH4/ultrafeedback_binarized", split="train")
    assert calls == [("HuggingFaceH4/ultrafeedback_binarized", None, "train_prefs", False)]

    calls.clear()
    load_hub_preferences("hh-rlhf", split="test", data_dir="harmless-base")
    assert calls == [("Anthropic/hh-rlhf", None, "test", False, ("data_dir", "harmless-base"))]


def test_load_hub_preferences_unknown_name():
    with pytest.raises(ValueError, match="hh-rlhf"):
        load_hub_preferences("not/a-dataset")


def test_registry_and_no_eager_datasets_import():
    assert set(HUB_DATASETS) == {"hh-rlhf", "ultrafeedback", "ultrafeedback-argilla", "helpsteer3"}
    assert "datasets" not in vars(converters)
