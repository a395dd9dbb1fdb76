"""dpo_lib.sampling: the judge's checks (JudgeError with the prompt index) and best-vs-worst pairs on canned samples."""

from __future__ import annotations

import math

import pytest

from dpo_lib import sampling
from dpo_lib.sampling import JudgeError, best_vs_worst, complete_reply, complete_samples, make_pairs, score_samples
from dpo_lib.settings import UserError


def s(i: int, text: str) -> dict:
    return {"prompt_index": i, "text": text}


SAMPLES = [s(0, "aa"), s(0, "b"), s(1, "cccc"), s(2, "dd")]


def test_score_samples_returns_one_float_per_sample():
    assert score_samples(lambda texts: [len(t) for t in texts], SAMPLES) == [2.0, 1.0, 4.0, 2.0]


def test_score_samples_passes_each_sample_its_prompt():
    class Judge:
        takes_prompts = True

        def __call__(self, texts, prompts):
            self.seen = prompts
            return [float(p == "P1") for p in prompts]

    judge = Judge()
    assert score_samples(judge, SAMPLES, ["P0", "P1", "P2"]) == [0.0, 0.0, 1.0, 0.0]
    assert judge.seen == ["P0", "P0", "P1", "P2"]


def test_judge_that_raises_is_named_with_the_sample_and_prompt():
    def judge(texts):
        if "cccc" in texts:
            raise RuntimeError("backend down")
        return [1.0] * len(texts)

    with pytest.raises(JudgeError) as e:
        score_samples(judge, SAMPLES)
    assert e.value.prompt_index == 1
    assert str(e.value) == "the judge raised RuntimeError: backend down on sample 2 (prompt 1, text 'cccc')"
    assert isinstance(e.value, UserError) and isinstance(e.value.__cause__, RuntimeError)


def test_judge_with_a_non_finite_score():
    with pytest.raises(JudgeError) as e:
        score_samples(lambda texts: [math.nan if t == "dd" else 0.5 for t in texts], SAMPLES)
    assert e.value.prompt_index == 2
    assert str(e.value) == "the judge gave a non-finite score (nan) to sample 3 (prompt 2, text 'dd')"


def test_judge_that_drops_a_score():
    """Skipping 'b' gives 3 scores for 4 texts; one at a time, 'b' alone gets 0 scores: sample 1, prompt 0."""
    with pytest.raises(JudgeError) as e:
        score_samples(lambda texts: [1.0 for t in texts if t != "b"], SAMPLES)
    assert e.value.prompt_index == 0
    assert str(e.value) == "the judge returned 0 scores for sample 1 (prompt 0, text 'b')"


def test_judge_wrong_count_only_in_bulk():
    """Fine on each text alone, one score short on the whole list: no single sample to blame."""
    with pytest.raises(JudgeError) as e:
        score_samples(lambda texts: [1.0] * min(len(texts), 3), SAMPLES)
    assert e.value.prompt_index is None
    assert str(e.value) == "the judge returned 3 scores for 4 texts (each text alone scores fine)"


# ----------------------------------------------------------------------------- best vs worst

PROMPTS = [{"prompt": "p0"}, {"prompt": "p1"}, {"prompt": "p2"}, {"prompt": [{"role": "user", "content": "p3"}]},
           {"prompt": "p4"}]
# (prompt, text, score), in no particular order
CANNED = [(3, "good", 0.7), (0, "mid", 0.5), (1, "x", 0.52), (0, "best", 0.912345), (2, "same", 0.9),
          (0, "worst", 0.1), (1, "y", 0.50), (2, "same", 0.1), (3, "bad", 0.2), (4, "", 0.9), (4, "text", 0.1)]


def test_best_vs_worst_on_canned_scores():
    """p0: best 0.912345 ('best') vs worst 0.1 ('worst'), gap 0.81 -> kept, scores rounded to 4 places;
    p1: gap 0.52 - 0.50 = 0.02 < 0.05 -> skipped; p2: the best and worst texts are the same -> skipped;
    p3 (conversational): 0.7 vs 0.2 -> kept as message lists; p4: the best text is empty -> skipped."""
    samples = [s(i, t) for i, t, _ in CANNED]
    scores = [x for _, _, x in CANNED]
    rows, skipped = best_vs_worst(PROMPTS, samples, scores, min_gap=0.05)
    assert skipped == 3
    assert rows == [
        {"prompt": "p0", "chosen": "best", "rejected": "worst", "score_chosen": 0.9123, "score_rejected": 0.1},
        {"prompt": [{"role": "user", "content": "p3"}], "chosen": [{"role": "assistant", "content": "good"}],
         "rejected": [{"role": "assistant", "content": "bad"}], "score_chosen": 0.7, "score_rejected": 0.2},
    ]


def test_best_vs_worst_min_gap():
    """With min_gap 0.01 the 0.02 gap of p1 is enough: 'x' over 'y'; with 0.9 p0's 0.81 is not."""
    samples = [s(i, t) for i, t, _ in CANNED]
    scores = [x for _, _, x in CANNED]
    rows, skipped = best_vs_worst(PROMPTS, samples, scores, min_gap=0.01)
    assert skipped == 2 and [r["prompt"] for r in rows] == ["p0", "p1", [{"role": "user", "content": "p3"}]]
    assert (rows[1]["chosen"], rows[1]["rejected"]) == ("x", "y")
    rows, skipped = best_vs_worst(PROMPTS, samples, scores, min_gap=0.9)
    assert rows == [] and skipped == 5


def test_make_pairs_on_canned_samples(monkeypatch):
    """make_pairs = generate -> score_samples -> best_vs_worst: 11 samples, 2 pairs, 3 skipped, and the judge's
    mean (0.7 + 0.5 + 0.52 + 0.912345 + 0.9 + 0.1 + 0.50 + 0.1 + 0.2 + 0.9 + 0.1) / 11 = 5.432345 / 11."""
    canned = [s(i, t) for i, t, _ in CANNED]
    calls = []

    def fake_generate(model, tokenizer, prompts, n, **kw):
        calls.append((prompts, n, kw))
        return canned

    def judge(texts):  # one call over all samples, in their order
        assert texts == [t for _, t, _ in CANNED]
        return [x for _, _, x in CANNED]

    monkeypatch.setattr(sampling, "generate", fake_generate)
    rows, stats = make_pairs(None, None, PROMPTS, judge, n=3, min_gap=0.05, temperature=0.7)
    assert calls == [([r["prompt"] for r in PROMPTS], 3, {"temperature": 0.7})]
    assert [r["chosen"] for r in rows] == ["best", [{"role": "assistant", "content": "good"}]]
    assert stats == {"prompts": 5, "pairs": 2, "skipped_no_preference": 3, "samples": 11,
                     "score_mean": pytest.approx(5.432345 / 11), "ended": 11, "trimmed": 0, "dropped": 0}


@pytest.mark.parametrize("text, expected", [
    ("It was great. The staff were kind and the ro", "It was great."),             # cut mid-word
    ('She said "wow!" and then the', 'She said "wow!"'),                          # a closing quote follows
    ("Five stars! Would go again? Maybe. Pric", "Five stars! Would go again? Maybe."),
    ("Rated 3.5 out of 5 by the", None),                                           # "3.5" is not a sentence end
    ("I loved it... until the", "I loved it..."),
    ("(Best trip ever.) Then we", "(Best trip ever.)"),
    ("A complete sentence.", "A complete sentence."),                              # the cap fell just after it
    ("no sentence ends here at all", None),
])
def test_a_cut_reply_is_trimmed_to_its_last_complete_sentence(text, expected):
    assert complete_reply(text, ended=False, incomplete="trim") == (None if expected is None else (expected, True))


def test_a_reply_the_model_ended_is_kept_as_written_whatever_its_last_character():
    """The model's own end of turn is kept even mid-sentence: only the cap's cut is 'incomplete'."""
    for incomplete in ("trim", "drop", "keep"):
        assert complete_reply("and then the", ended=True, incomplete=incomplete) == ("and then the", False)
    assert complete_reply("cut. mid wo", ended=False, incomplete="keep") == ("cut. mid wo", False)
    assert complete_reply("cut. mid wo", ended=False, incomplete="drop") is None


def test_complete_samples_counts_and_flags():
    """4 samples: ended (kept, trimmed=False), cut with a sentence (trimmed), cut without one (dropped),
    no 'ended' key (a canned sample: counts as ended). 'keep' returns them untouched, unflagged."""
    samples = [dict(s(0, "Done"), ended=True), dict(s(0, "Good. And th"), ended=False),
               dict(s(1, "no end here"), ended=False), s(1, "canned")]
    kept, dropped = complete_samples(samples, "trim")
    assert dropped == 1 and [(k["text"], k["trimmed"]) for k in kept] == [("Done", False), ("Good.", True),
                                                                         ("canned", False)]
    assert complete_samples(samples, "keep") == (samples, 0) and "trimmed" not in samples[1]
    assert [k["text"] for k in complete_samples(samples, "drop")[0]] == ["Done", "canned"]
    with pytest.raises(ValueError, match="incomplete='cut'"):
        complete_samples(samples, "cut")


def test_pairs_from_trimmed_samples_say_which_reply_was_trimmed_and_a_prompt_with_one_reply_left_is_skipped():
    """p0: 'Great.' (trimmed, 0.9) over 'Bad' (ended, -0.5); p1 keeps one of its replies after trimming: no pair."""
    samples = [dict(s(0, "Great. Re"), ended=False), dict(s(0, "Bad"), ended=True),
               dict(s(1, "one"), ended=True), dict(s(1, "no sentence"), ended=False)]
    kept, dropped = complete_samples(samples, "trim")
    rows, skipped = best_vs_worst(PROMPTS[:2], kept, [0.9, -0.5, 0.3], min_gap=0.05)
    assert dropped == 1 and skipped == 1
    assert rows == [{"prompt": "p0", "chosen": "Great.", "rejected": "Bad", "score_chosen": 0.9,
                     "score_rejected": -0.5, "chosen_trimmed": True, "rejected_trimmed": False}]
