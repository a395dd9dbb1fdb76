"""Lesson 06's data surgery (dpo_lib.course.failures): minimal pairs, CHES, label flips."""

import pytest
import torch

from dpo_lib.course import failures as F


def test_swap_words_whole_words_any_case_keeps_capitals():
    assert F.swap_words("Great food, good service. Goodness!") == "Terrible food, bad service. Goodness!"
    assert F.swap_words("I LOVE it") == "I Hate it"            # capitalised, not upper-cased
    assert F.swap_words("nothing to swap here") == "nothing to swap here"


def row(prompt, chosen, rejected):
    return {"prompt": [{"role": "user", "content": prompt}], "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def test_word_swap_pairs_keeps_pairs_whose_reward_gap_is_large_enough():
    """reward = (# of 'good') - (# of 'bad'): 'good good' -> 'bad bad' is a gap of 4, 'good or bad' -> 'bad or bad'
    a gap of 2; min_gap 3 keeps only the first. Replies without a swappable word make no pair."""
    rows = [row("p1", "good good", "plain"), row("p2", "nothing", "good or bad")]
    score = lambda texts: [t.split().count("good") - t.split().count("bad") for t in texts]
    pairs = F.word_swap_pairs(rows, score, min_gap=3)
    assert len(pairs) == 1
    assert pairs[0]["chosen"][0]["content"] == "good good" and pairs[0]["rejected"][0]["content"] == "bad bad"
    assert pairs[0]["prompt"] == rows[0]["prompt"]
    assert (pairs[0]["score_chosen"], pairs[0]["score_rejected"]) == (2.0, -2.0)
    both = F.word_swap_pairs(rows, score, min_gap=2)
    assert [p["rejected"][0]["content"] for p in both] == ["bad bad", "bad or bad"]   # the rejected reply swapped too


def test_ches_closed_form():
    """h_w = (1, 2), h_l = (3, 0): <h_w, h_l> - |h_w|^2 = 3 - 5 = -2; identical means give 0."""
    h_w = torch.tensor([[1.0, 2.0], [1.0, 1.0]])
    h_l = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    torch.testing.assert_close(F.ches(h_w, h_l), torch.tensor([-2.0, 0.0]))


def test_flip_mask_flips_exactly_the_rate_and_is_seeded():
    mask = F.flip_mask(50, 0.2, seed=3)
    assert sum(mask) == 10 and len(mask) == 50
    assert F.flip_mask(50, 0.2, seed=3) == mask and F.flip_mask(50, 0.2, seed=4) != mask
    assert sum(F.flip_mask(7, 0.0)) == 0 and all(F.flip_mask(7, 1.0))
    with pytest.raises(ValueError, match="rate"):
        F.flip_mask(10, 1.5)


def test_flip_labels_swaps_only_flagged_rows_and_leaves_the_input_alone():
    rows = [row("a", "A+", "A-"), row("b", "B+", "B-")]
    out = F.flip_labels(rows, [True, False])
    assert out[0]["chosen"][0]["content"] == "A-" and out[0]["rejected"][0]["content"] == "A+"
    assert out[1] == rows[1] and out[1] is not rows[1]
    assert rows[0]["chosen"][0]["content"] == "A+"
    with pytest.raises(ValueError, match="1 entries for 2 rows"):
        F.flip_labels(rows, [True])


def test_clean_accuracy_reads_flipped_rows_the_other_way():
    """Noisy rewards (chosen, rejected): (2, 1) clean, right; (0, 3) flipped, so clean (3, 0), right; (5, 4) flipped,
    clean (4, 5), wrong; (1, 1) a tie, wrong: 2 of 4."""
    acc = F.clean_accuracy(torch.tensor([2.0, 0.0, 5.0, 1.0]), torch.tensor([1.0, 3.0, 4.0, 1.0]),
                           torch.tensor([False, True, True, False]))
    assert acc == 0.5
