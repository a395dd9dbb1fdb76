"""The token-mask visualiser: roles, the shift, log-probs, warnings, text and HTML renderings."""

import pytest
import torch
from _tiny import conv_row

from dpo_lib.course.mask_view import mask_counts, mask_table, show_mask, token_info, visible
from dpo_lib.features import collate, tokenize_pair
from dpo_lib.logprobs import sequence_logprobs
from dpo_lib.models import tiny_tokenizer


@pytest.fixture
def batch():
    tok = tiny_tokenizer()
    pair = tokenize_pair(tok, conv_row("Hi?", "Hello there!", "No."))
    return tok, pair, collate([pair], tok.pad_token_id)  # row 0: prompt+chosen, row 1: prompt+rejected (padded)


def test_roles_and_shift(batch):
    tok, pair, b = batch
    n_prompt, n_chosen, n_rejected = len(pair["prompt_ids"]), len(pair["chosen_ids"]), len(pair["rejected_ids"])
    infos = token_info(tok, b["input_ids"], b["completion_mask"], b["attention_mask"], row=1)
    expected = ["prompt"] * n_prompt + ["scored"] * n_rejected + ["pad"] * (n_chosen - n_rejected)
    assert [i.role for i in infos] == expected
    for i in infos:
        assert i.scored_by == (i.position - 1 if i.role == "scored" else None)
        assert i.token_id == int(b["input_ids"][1, i.position])
    assert mask_counts(b["completion_mask"], b["attention_mask"], row=1) == {
        "prompt": n_prompt, "scored": n_rejected, "unscored": 0, "pad": n_chosen - n_rejected}
    assert "".join(i.text for i in infos if i.role == "scored") == visible("No.<|im_end|>\n")


def test_single_row_and_lists_accepted(batch):
    tok, pair, b = batch
    ids, mask = b["input_ids"][0].tolist(), b["completion_mask"][0].tolist()
    assert token_info(tok, ids, mask) == token_info(tok, b["input_ids"], b["completion_mask"], row=0)
    with pytest.raises(ValueError, match="shapes differ"):
        token_info(tok, ids, mask[:-1])


def test_table_shows_logit_positions_and_logprob_sum(batch):
    tok, pair, b = batch
    torch.manual_seed(0)
    logits = torch.randn(*b["input_ids"].shape, len(tok))
    table = mask_table(tok, b["input_ids"], b["completion_mask"], b["attention_mask"], row=0, logits=logits)
    first = len(pair["prompt_ids"])
    last = first + len(pair["chosen_ids"]) - 1
    assert f"logit {first - 1}" in table and f"logit {last - 1}" in table
    assert f"positions {first}..{last} are read from logits {first - 1}..{last - 1}" in table
    expected = sequence_logprobs(logits, b["input_ids"], b["completion_mask"])[0].item()
    assert f"sum of their log-probs = {expected:.4f}" in table
    infos = token_info(tok, b["input_ids"], b["completion_mask"], row=0, logits=logits)
    assert sum(i.logprob for i in infos if i.mask) == pytest.approx(expected, abs=1e-4)
    assert all(i.logprob is None for i in infos if not i.mask)
    part = mask_table(tok, b["input_ids"], b["completion_mask"], row=0, positions=slice(first, first + 2))
    assert len(part.splitlines()) == 2 + 2 + 2  # header, rule, two tokens, rule, summary
    assert "warning" not in table


def test_warnings_name_the_bugs(batch):
    tok, pair, b = batch
    ids, attn, mask = b["input_ids"], b["attention_mask"], b["completion_mask"].clone()
    eos_gap = mask.clone()
    eos_gap[(ids == tok.eos_token_id) & eos_gap.bool()] = 0  # mask built with `ids != pad_id`: EOS dropped
    assert "not scored" in mask_table(tok, ids, eos_gap, attn, row=0)
    assert mask_counts(eos_gap, attn, row=0)["unscored"] == 1
    padded = mask.clone()
    padded[1] = (torch.arange(ids.shape[1]) >= len(pair["prompt_ids"])).long()  # pads scored too
    assert "padding is marked as scored" in str(show_mask(tok, ids, padded, attn, row=1))
    first = mask.clone()
    first[0, 0] = 1
    assert "position 0" in mask_table(tok, ids, first, attn, row=0)
    assert "no token is scored" in mask_table(tok, ids, torch.zeros_like(mask), attn, row=0)


def test_text_and_html(batch):
    tok, pair, b = batch
    view = show_mask(tok, b["input_ids"], b["completion_mask"], b["attention_mask"], row=1, title="rejected")
    text = str(view)
    assert text == repr(view)
    assert text.splitlines()[0] == "rejected"
    assert "[N][o][.][<|im_end|>][↵]" in text
    assert text.splitlines()[1].endswith("·" * (len(pair["chosen_ids"]) - len(pair["rejected_ids"])))
    page = view._repr_html_()
    assert page.count("<span title=") == b["input_ids"].shape[1]
    assert "&lt;|im_end|&gt;" in page and "<|im_end|>" not in page  # escaped
    assert "scored by logit" in page and "background:#b7e4b0" in page
