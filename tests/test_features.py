"""Tokenized pairs and their batches (dpo_lib.features): the chat template applied once, one EOS,
truncation that keeps the prompt's end and the responses' start, chosen-then-rejected collation."""

import pytest
import torch
from _tiny import conv_row, toy_rows, write_jsonl

from dpo_lib.data import DataError, load_preferences
from dpo_lib.features import collate, tokenize_pair, tokenize_rows, truncate_pair
from dpo_lib.models import tiny_tokenizer

GOOD = conv_row("Hi?", "Hello!", "Go away.")


def test_chat_template_applied_once_and_prompt_is_prefix():
    tok = tiny_tokenizer()
    pair = tokenize_pair(tok, GOOD)
    full = tok.apply_chat_template(GOOD["prompt"] + GOOD["chosen"], tokenize=True, return_dict=True)["input_ids"]
    assert pair["prompt_is_prefix"]
    assert pair["prompt_ids"] + pair["chosen_ids"] == list(full)
    assert pair["prompt_ids"].count(tok.bos_token_id) == 2  # <|im_start|>user, <|im_start|>assistant: no extra
    assert tok.decode(pair["chosen_ids"]) == "Hello!<|im_end|>\n"
    assert pair["chosen_ids"].count(tok.eos_token_id) == 1


def test_duplicated_bos_is_caught():
    tok = tiny_tokenizer(add_bos=True)
    with pytest.raises(DataError, match="duplicated BOS"):
        tokenize_pair(tok, {"prompt": "<|im_start|>user\nhi", "chosen": "a", "rejected": "b"})


def test_doubled_eos_is_caught():
    tok = tiny_tokenizer()
    row = conv_row("Hi?", "Hello!<|im_end|>", "Bye.")
    with pytest.raises(DataError, match="doubled EOS"):
        tokenize_pair(tok, row)


def test_standard_rows_get_exactly_one_eos():
    tok = tiny_tokenizer()
    for chosen in ("yes", "yes<|im_end|>"):
        pair = tokenize_pair(tok, {"prompt": "Q: ok?", "chosen": chosen, "rejected": "no"})
        assert pair["chosen_ids"][-1] == tok.eos_token_id and pair["chosen_ids"].count(tok.eos_token_id) == 1


def test_truncation_keeps_prompt_end_and_response_start():
    pair = {"prompt_ids": list(range(10)), "chosen_ids": list(range(100, 108)), "rejected_ids": [200, 201]}
    out, changed = truncate_pair(pair, max_length=10, max_prompt_length=4)
    assert changed
    assert out["prompt_ids"] == [6, 7, 8, 9]
    assert out["chosen_ids"] == list(range(100, 106)) and out["rejected_ids"] == [200, 201]
    dropped, _ = truncate_pair(pair, max_length=10, max_prompt_length=None)
    assert dropped is None


def test_too_long_prompts_are_dropped_counted_and_named(tmp_path):
    tok = tiny_tokenizer()
    rows = toy_rows(3) + [conv_row("x" * 200, "yes", "no")]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    rows, _ = load_preferences(path)
    feats, stats = tokenize_rows(tok, rows, max_length=60)
    assert stats.kept == 3 and stats.dropped_too_long == 1
    assert stats.problems[0].startswith(f"{path}:4: prompt is ")


def test_collate_concatenates_chosen_then_rejected_and_masks_padding():
    tok = tiny_tokenizer()
    feats, _ = tokenize_rows(tok, toy_rows(3))
    b = collate(feats, tok.pad_token_id)
    assert b["input_ids"].shape[0] == 6
    for i, f in enumerate(feats):
        n_c = len(f["prompt_ids"]) + len(f["chosen_ids"])
        assert b["input_ids"][i, :n_c].tolist() == f["prompt_ids"] + f["chosen_ids"]
        assert b["input_ids"][i + 3, :len(f["prompt_ids"]) + len(f["rejected_ids"])].tolist() == \
            f["prompt_ids"] + f["rejected_ids"]
        assert int(b["completion_mask"][i].sum()) == len(f["chosen_ids"])
        assert int(b["completion_mask"][i + 3].sum()) == len(f["rejected_ids"])
        assert int(b["completion_mask"][i, :len(f["prompt_ids"])].sum()) == 0  # prompt never scored
    assert torch.all(b["completion_mask"] <= b["attention_mask"])  # padding never scored
