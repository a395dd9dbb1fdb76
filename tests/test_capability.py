"""dpo_lib.capability: the alignment-tax checks. Every verifier on hand-written passing and failing
answers, general_nll against a direct log-softmax computation on the tiny model, the rule that a
cut answer fails, and paired_change against hand arithmetic."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from _tiny import tiny

from dpo_lib import capability as cap
from dpo_lib.capability import VERIFIERS

REPO = Path(__file__).resolve().parents[1]

# (kind, args, passing answers, failing answers): every verifier, hand-written cases.
CASES = [
    ("lowercase", {}, ["a quiet grey afternoon.", "apples, pears and plums 3"],
     ["A quiet afternoon.", "it rained in Paris", "123 ..."]),
    ("uppercase", {}, ["CAUTION: WET FLOOR!", "HELLO 2 YOU"], ["Caution: wet floor", "HELLO you", "42"]),
    ("bullets", {"n": 3}, ["- sun cream\n- towel\n- hat", "Pack these:\n* towel\n* hat\n• book", "-  a\n  - b\n- c"],
     ["- towel\n- hat", "1. towel\n2. hat\n3. book", "- a\n- b\n- c\n- d", "-a\n-b\n-c", "**a**\n**b**\n**c**"]),
    ("max_words", {"n": 5}, ["Paris.", "It is a cow."], ["It is a big cow.", "The answer is a kangaroo.", "  "]),
    ("include_word", {"word": "garden"}, ["My Garden blooms.", "a garden, in spring", "(garden)"],
     ["Gardens bloom.", "the gardener waters", "no such word"]),
    ("exclude_word", {"word": "cat"}, ["A dog is a loyal pet.", "Cats are everywhere.", "concatenate"],
     ["My cat sleeps.", "CAT!", "a cat-like pet"]),
    ("end_question", {}, ["Shall we have lunch?", 'She asked, "Lunch?"', "Lunch? ", "**Lunch?**"],
     ["Lunch? Yes, let's.", "Let's have lunch.", "What about lunch"]),
    ("no_commas", {}, ["I read and I rest.", "one two three"], ["I read, then rest.", "one，two", "  "]),
    ("start_word", {"word": "Yes"}, ["Yes, it is round.", "yes.", '"Yes" is the answer', "**Yes** it is"],
     ["Yesterday it was.", "It is, yes.", "Yes's", ""]),
    ("sentences", {"n": 2}, ["It is green. It is tall!", "Trees grow. Do they sleep?", "It cost 3.50 dollars. Cheap."],
     ["It is green.", "One. Two. Three.", "It is green, tall and old"]),
    ("quoted", {}, ['"Learn, grow, share."', "“Bake with love”", '  "Happy birthday!"  '],
     ['Learn, grow, share.', '"Learn" and grow', '""', '"unclosed']),
    ("digits_only", {}, ["12", " 12. ", "8"], ["12 legs", "twelve", "7 + 5 = 12", "-3", "1 2"]),
]


@pytest.mark.parametrize("kind, args, passing, failing", CASES, ids=[c[0] for c in CASES])
def test_verifier_on_hand_written_answers(kind, args, passing, failing):
    check = VERIFIERS[kind]
    for text in passing:
        assert check(text, **args), f"{kind} should accept {text!r}"
    for text in failing:
        assert not check(text, **args), f"{kind} should reject {text!r}"


def test_every_verifier_has_cases_and_rejects_an_empty_answer():
    assert sorted(c[0] for c in CASES) == sorted(VERIFIERS)
    for kind, args, _, _ in CASES:
        assert not VERIFIERS[kind]("", **args), kind
        assert not VERIFIERS[kind]("   \n", **args), kind


def test_counting_helpers():
    assert cap.count_bullets("Intro\n- a\n* b\n• c\n1. d\n-e") == 3
    assert cap.count_sentences("One. Two! Three? four") == 4
    assert cap.count_sentences("Pi is 3.14 roughly. Yes.") == 2
    assert cap.count_sentences("- a\n- b") == 2          # a line break ends a sentence
    assert cap.count_sentences("He said \"hi.\" Then left.") == 2
    assert cap.count_sentences("") == 0


# ----------------------------------------------------------------------------- the data files

def test_instruction_file_uses_known_kinds_and_valid_arguments():
    rows = cap.load_instructions()
    assert 24 <= len(rows) <= 40
    assert {r["kind"] for r in rows} == set(VERIFIERS)          # every verifier is used
    for r in rows:
        assert r["prompt"][-1]["role"] == "user"
        VERIFIERS[r["kind"]]("some answer", **r["args"])       # the arguments fit the verifier


def test_general_texts_are_paragraphs_then_held_out_replies():
    texts = cap.load_general_texts()
    paragraphs = [t for t in texts if isinstance(t, str)]
    rows = [t for t in texts if isinstance(t, dict)]
    assert 40 <= len(paragraphs) <= 60 and len(set(paragraphs)) == len(paragraphs)
    assert len(rows) == sum(1 for line in open(cap.HELDOUT_REPLIES) if line.strip())
    assert texts == paragraphs + rows
    assert len(cap.load_general_texts(replies=None)) == len(paragraphs)


def test_data_files_match_their_generator(capsys):
    spec = importlib.util.spec_from_file_location("make_general", REPO / "data" / "general" / "make_general.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--check"]) == 0, capsys.readouterr().out


def test_unknown_kind_is_refused(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": [{"role": "user", "content": "hi"}], "kind": "rhymes", "args": {}}\n')
    with pytest.raises(ValueError, match="rhymes"):
        cap.load_instructions(path)


# ----------------------------------------------------------------------------- general_nll

def _direct_nll(model, context: list[int], scored: list[int]) -> float:
    """-mean log softmax of the scored tokens, one unpadded sequence, computed without the library."""
    ids = torch.tensor([context + scored])                                   # (1, T)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)   # (T-1, V): logit t scores t+1
    picked = logp.gather(-1, ids[0, 1:, None])[:, 0]                         # (T-1,)
    return -picked[len(context) - 1:].mean().item()


def test_general_nll_matches_a_direct_computation():
    model, tok = tiny()
    row = {"prompt": [{"role": "user", "content": "Why is ice light?"}],
           "chosen": [{"role": "assistant", "content": "It expands when it freezes."}]}
    texts = ["Sound travels through air.", "Ice floats.", row, {"text": "Bees dance to point at flowers."}]
    got = cap.general_nll(model, tok, texts, batch_size=3)               # mixed lengths: padding in the batch

    plain = [tok(t)["input_ids"] for t in ("Sound travels through air.", "Ice floats.",
                                           "Bees dance to point at flowers.")]
    prompt = tok.apply_chat_template(row["prompt"], tokenize=True, add_generation_prompt=True, return_dict=True)
    full = tok.apply_chat_template(row["prompt"] + row["chosen"], tokenize=True, return_dict=True)
    prompt, full = list(prompt["input_ids"]), list(full["input_ids"])
    reply = full[len(prompt):]                                           # scored as the trainer scores a reply
    assert tok.decode(reply) == "It expands when it freezes.<|im_end|>\n"
    want = [_direct_nll(model, p[:1], p[1:]) for p in plain[:2]] + [_direct_nll(model, prompt, reply),
                                                                    _direct_nll(model, plain[2][:1], plain[2][1:])]
    assert got == pytest.approx(want, abs=1e-5)
    assert cap.general_nll(model, tok, texts, batch_size=1) == pytest.approx(got, abs=1e-5)
    assert all(v > 0 for v in got)


def test_general_nll_refuses_a_text_with_nothing_to_score():
    model, tok = tiny()
    with pytest.raises(ValueError, match="fewer than 2 tokens"):
        cap.general_nll(model, tok, ["a"])


# ----------------------------------------------------------------------------- instruction_following

def test_a_cut_answer_fails_even_when_its_text_would_pass(monkeypatch):
    model, tok = tiny()
    eos = tok.eos_token_id
    fake = [{"text": "shall we?", "response_ids": [5, eos]},                  # ended, follows the instruction
            {"text": "shall we?", "response_ids": [5, 6]},                    # same text, cut at the cap
            {"text": "Shall we.", "response_ids": [5, eos]}]                  # ended, does not follow
    monkeypatch.setattr(cap, "generate", lambda *a, **k: fake)
    prompts = [{"prompt": [{"role": "user", "content": "ask"}], "kind": "end_question", "args": {}}] * 3
    out = cap.instruction_following(model, tok, prompts)
    assert out["pass"] == [1.0, 0.0, 0.0]
    assert out["ended"] == [True, False, True]
    assert out["text"] == ["shall we?", "shall we?", "Shall we."]


def test_measure_on_the_tiny_model_is_greedy_and_deterministic():
    model, tok = tiny()
    prompts = [{"prompt": [{"role": "user", "content": f"say {w}"}], "kind": k, "args": a}
               for w, k, a in [("hi", "lowercase", {}), ("yes", "start_word", {"word": "yes"}),
                               ("no", "max_words", {"n": 3})]]
    texts = ["A short text.", "Another one here."]
    first = cap.measure(model, tok, max_new_tokens=4, batch_size=2, texts=texts, instructions=prompts)
    second = cap.measure(model, tok, max_new_tokens=4, batch_size=2, texts=texts, instructions=prompts, seed=7)
    assert first == second                                               # greedy: the seed changes nothing
    assert set(first) == {"general_nll", "instruction_following", "instruction_ended", "instruction_answers"}
    assert len(first["general_nll"]) == 2 and len(first["instruction_following"]) == 3
    assert set(first["instruction_following"]) <= {0.0, 1.0}


def test_measure_restores_training_mode():
    model, tok = tiny()
    model.train()
    cap.measure(model, tok, max_new_tokens=2, texts=["Some text."],
                instructions=[{"prompt": [{"role": "user", "content": "hi"}], "kind": "lowercase", "args": {}}])
    assert model.training


# ----------------------------------------------------------------------------- paired_change

def test_paired_change_by_hand():
    """NLL [1, 2, 3] -> [1.5, 2, 4]: differences [0.5, 0, 1], mean 0.5, sample variance
    (0 + 0.25 + 0.25) / 2 = 0.25, SE sqrt(0.25 / 3). Following [1, 0, 1, 0] -> [1, 1, 0, 1]:
    differences [0, 1, -1, 1], mean 0.25, variance (0.0625 + 0.5625 + 1.5625 + 0.5625) / 3 = 2.75 / 3,
    SE sqrt(2.75 / 3 / 4)."""
    before = {"general_nll": [1.0, 2.0, 3.0], "instruction_following": [1.0, 0.0, 1.0, 0.0], "other": [9]}
    after = {"general_nll": [1.5, 2.0, 4.0], "instruction_following": [1.0, 1.0, 0.0, 1.0]}
    out = cap.paired_change(before, after)
    assert list(out) == ["general_nll_before", "general_nll_after", "general_nll_change", "general_nll_change_se",
                         "instruction_following_before", "instruction_following_after",
                         "instruction_following_change", "instruction_following_change_se"]
    assert out["general_nll_before"] == pytest.approx(2.0)
    assert out["general_nll_after"] == pytest.approx(7.5 / 3)
    assert out["general_nll_change"] == pytest.approx(0.5)
    assert out["general_nll_change_se"] == pytest.approx(math.sqrt(0.25 / 3))
    assert out["instruction_following_before"] == 0.5
    assert out["instruction_following_after"] == 0.75
    assert out["instruction_following_change"] == 0.25
    assert out["instruction_following_change_se"] == pytest.approx(math.sqrt(2.75 / 3 / 4))


def test_paired_se_is_smaller_than_the_unpaired_one_when_examples_move_together():
    """The same shift on every example: the paired SE is 0, although both arms vary a lot."""
    before = {"general_nll": [1.0, 3.0, 5.0], "instruction_following": [0.0, 1.0, 1.0]}
    after = {"general_nll": [1.2, 3.2, 5.2], "instruction_following": [0.0, 1.0, 1.0]}
    out = cap.paired_change(before, after)
    assert out["general_nll_change"] == pytest.approx(0.2)
    assert out["general_nll_change_se"] == pytest.approx(0.0, abs=1e-12)
    assert out["instruction_following_change"] == 0.0 and out["instruction_following_change_se"] == 0.0


def test_paired_change_refuses_unpaired_lists():
    with pytest.raises(ValueError, match="general_nll has 2 examples before and 3 after"):
        cap.paired_change({"general_nll": [1, 2], "instruction_following": [1]},
                          {"general_nll": [1, 2, 3], "instruction_following": [1]})
