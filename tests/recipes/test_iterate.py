"""Iterative on-policy DPO (dpo_lib.recipes.iterate and ``python -m dpo_lib iterate``) on the tiny model."""

import json
import math
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from _hooks import hook_env
from _tiny import save_tiny, toy_rows, train_config, write_jsonl

from dpo_lib.config import IterateConfig, JobConfig
from dpo_lib.models import load_model
from dpo_lib.recipes.iterate import (
    TIMING_KEYS,
    IterationError,
    branch,
    finished_rounds,
    iterate,
    round_dir,
    sample_seed,
)
from dpo_lib.recipes.run import ResumeMismatch
from dpo_lib.sampling import JudgeError, make_pairs, score_samples
from dpo_lib.settings import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class CharJudge:
    """Deterministic fake judge: (sum of the character codes mod 101) / 100, in [0, 1]. Counts its calls."""
    name = "chars"

    def __init__(self):
        self.calls = 0

    def __call__(self, texts):
        self.calls += 1
        return [(sum(map(ord, t)) % 101) / 100 for t in texts]


class FlakyJudge(CharJudge):
    """CharJudge until call ``fail_at`` (1-based); from then on it fails on the samples of prompt
    ``bad``: ``raise``s, gives them ``nan``, or leaves their scores out (``count``)."""
    takes_prompts = True

    def __init__(self, fail_at: int, bad: int, mode: str):
        super().__init__()
        self.fail_at, self.bad, self.mode, self.failing = fail_at, bad, mode, False

    def __call__(self, texts, prompts):
        scores = super().__call__(texts)
        self.failing = self.failing or self.calls >= self.fail_at
        if not self.failing:
            return scores
        hit = [p == self.prompts[self.bad] for p in prompts]
        if self.mode == "raise" and any(hit):
            raise ValueError("judge backend down")
        if self.mode == "nan":
            return [math.nan if h else s for s, h in zip(scores, hit)]
        return [s for s, h in zip(scores, hit) if not h]


PROMPTS = [{"prompt": [{"role": "user", "content": f"Tell me about item {i}."}]} for i in range(8)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("iterate")
    return {"dir": d, "model": save_tiny(d / "tiny"), "prompts": write_jsonl(d / "prompts.jsonl", PROMPTS),
            "test": write_jsonl(d / "test.jsonl", toy_rows(4))}


def configs(setup, out, **kw):
    settings = IterateConfig(prompts=setup["prompts"], rounds=kw.pop("rounds", 2), samples_per_prompt=3,
                             min_gap=kw.pop("min_gap", 0.05), reference=kw.pop("reference", "initial"),
                             sample_max_new_tokens=8,
                             incomplete=kw.pop("incomplete", "keep"),  # a random model ends few answers: keep them
                             keep_every_policy=kw.pop("keep_every_policy", False))
    job = JobConfig(model=str(setup["model"]), eval_dataset=setup["test"], out=out, max_new_tokens=8,
                    eval_samples=1, max_eval_prompts=4, eval_every=0)
    config = train_config(batch_size=4, max_steps=3, learning_rate=1e-3, print_every=0, **kw)
    return settings, job, config


def run(setup, name, judge=None, **kw):
    out = setup["dir"] / name
    return out, iterate(out, *configs(setup, out, **kw), judge=judge or CharJudge(), true_reward=CharJudge())


def untimed(summaries):
    return [{k: v for k, v in s.items() if k not in TIMING_KEYS} for s in summaries]


def read_jsonl(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def initial_run(setup):
    return run(setup, "initial")


@pytest.fixture(scope="module")
def previous_run(setup):
    return run(setup, "previous", reference="previous")


def test_two_rounds_write_every_file(initial_run):
    out, summaries = initial_run
    assert [s["round"] for s in summaries] == [1, 2] and finished_rounds(out) == 2
    assert json.loads((out / "summary.json").read_text()) == summaries
    for name in ("run_card.json", "baseline.json"):
        assert (out / name).is_file(), name
    for k in (1, 2):
        rd = round_dir(out, k)
        assert json.loads((rd / "summary.json").read_text()) == summaries[k - 1]
        pairs = read_jsonl(rd / "pairs.jsonl")
        assert len(pairs) == summaries[k - 1]["pairs"] >= 4
        assert summaries[k - 1]["pairs"] + summaries[k - 1]["skipped_no_preference"] == len(PROMPTS)
        for row in pairs:  # the course schema: the prompt's messages, one assistant turn each side
            assert row["prompt"] in [p["prompt"] for p in PROMPTS]
            assert row["chosen"][0]["role"] == row["rejected"][0]["role"] == "assistant"
            assert row["score_chosen"] - row["score_rejected"] >= 0.05 - 1e-9
        metrics = read_jsonl(rd / "metrics.jsonl")
        assert [m["step"] for m in metrics] == [1, 2, 3] and summaries[k - 1]["steps"] == 3
        assert (rd / "policy" / "model.safetensors").is_file()
        for key in ("heldout_accuracy_after", "reward_gain", "reward_gain_se", "kl_to_start", "judge_gain", "win_rate"):
            assert isinstance(summaries[k - 1][key], float), key
    # round 1 trains against the starting model, which is the policy at step 1: rewards exactly 0
    assert read_jsonl(round_dir(out, 1) / "metrics.jsonl")[0]["rewards/chosen"] == 0.0
    # the baseline is the starting model against itself: every implicit reward 0, strict accuracy 0
    assert summaries[0]["heldout_accuracy_before"] == 0.0


def test_round_2_samples_from_round_1s_policy(setup, initial_run):
    """Round 2's pairs are what round 1's saved policy samples with round 2's seed, not the starting model."""
    out, _ = initial_run
    settings, _, config = configs(setup, out)
    round2 = read_jsonl(round_dir(out, 2) / "pairs.jsonl")

    def pairs_of(folder):
        model, tok = load_model(folder, attn_implementation="eager")
        return make_pairs(model, tok, PROMPTS, CharJudge(), n=3, min_gap=0.05, max_new_tokens=8,
                          seed=sample_seed(config.seed, 2), progress=False)[0]

    assert pairs_of(round_dir(out, 1) / "policy") == round2
    assert pairs_of(setup["model"]) != round2
    assert read_jsonl(round_dir(out, 1) / "pairs.jsonl") != round2


def test_reference_previous_vs_initial(initial_run, previous_run):
    """Round 2, step 1: against the previous policy (= the policy) every implicit reward is exactly 0;
    against the starting model the policy has moved in round 1, so they are not."""
    (out_i, s_i), (out_p, s_p) = initial_run, previous_run
    first_i = read_jsonl(round_dir(out_i, 2) / "metrics.jsonl")[0]
    first_p = read_jsonl(round_dir(out_p, 2) / "metrics.jsonl")[0]
    assert first_p["rewards/chosen"] == first_p["rewards/rejected"] == first_p["rewards/margins"] == 0.0
    assert abs(first_p["loss"] - math.log(2)) < 1e-6
    assert first_i["rewards/chosen"] != 0.0 and first_i["rewards/rejected"] != 0.0
    # round 1 is the same in both modes (its reference is the starting model either way)
    assert untimed(s_i)[0] == {**untimed(s_p)[0], "reference": "initial"}
    # the KL and the held-out accuracy stay measured against the starting model; only "previous" has both
    assert "heldout_accuracy_vs_round_reference" in s_p[1] and "heldout_accuracy_vs_round_reference" not in s_i[1]
    assert s_p[1]["kl_to_start"] != s_i[1]["kl_to_start"]


def test_make_pairs_min_gap_and_identical_answers(monkeypatch):
    """Canned samples (3 per prompt) and a judge that reads the score off the text:
    prompt 0: scores 0.1, 0.9, 0.5: kept, chosen "b 0.9", rejected "a 0.1";
    prompt 1: 0.50 vs 0.54, gap 0.04 < 0.5: skipped;
    prompt 2: best and worst have the same text (the judge scores it 0.1 and 0.9 by position): skipped;
    prompt 3: 0.25 vs 0.75, gap exactly 0.5 (binary-exact), not < 0.5: kept."""
    import dpo_lib.sampling as S
    texts = [["a 0.1", "b 0.9", "c 0.5"], ["a 0.50", "b 0.54", "c 0.52"], ["same", "same", "other"],
             ["a 0.25", "b 0.75", "c 0.5"]]
    scores = [[0.1, 0.9, 0.5], [0.50, 0.54, 0.52], [0.1, 0.9, 0.5], [0.25, 0.75, 0.5]]
    monkeypatch.setattr(S, "generate", lambda *a, **k: [{"prompt_index": i, "text": t} for i, ts in
                                                        enumerate(texts) for t in ts])
    flat = [x for s in scores for x in s]
    rows, stats = make_pairs(None, None, [{"prompt": f"p{i}"} for i in range(4)], lambda t: flat[:len(t)], n=3,
                             min_gap=0.5)
    assert stats["pairs"] == 2 and stats["skipped_no_preference"] == 2 and stats["samples"] == 12
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == [("p0", "b 0.9", "a 0.1"),
                                                                        ("p3", "b 0.75", "a 0.25")]
    assert abs(stats["score_mean"] - sum(flat) / 12) < 1e-12


def test_min_gap_filters_a_round(setup):
    """A judge that gives the samples of even prompts all the same score: those 4 of 8 prompts carry no
    preference; odd prompts get 0 and 1 by sample position, a gap of 1 >= min_gap 0.5."""
    class GapJudge:
        takes_prompts = True

        def __call__(self, texts, prompts):
            seen, out = {}, []
            for p in prompts:
                j = seen[json.dumps(p)] = seen.get(json.dumps(p), -1) + 1
                odd = int(p[-1]["content"].split()[-1].rstrip(".")) % 2 if "item" in p[-1]["content"] else 1
                out.append(float(j % 2) if odd else 0.5)
            return out

    out, summaries = run(setup, "gap", judge=GapJudge(), rounds=1, min_gap=0.5)
    assert summaries[0]["pairs"] == 4 and summaries[0]["skipped_no_preference"] == 4
    pairs = read_jsonl(round_dir(out, 1) / "pairs.jsonl")
    assert [p["prompt"][0]["content"] for p in pairs] == [f"Tell me about item {i}." for i in (1, 3, 5, 7)]
    assert all((p["score_chosen"], p["score_rejected"]) == (1.0, 0.0) for p in pairs)


def test_the_round_completes_cut_answers_as_incomplete_says(setup):
    """The tiny random model ends 2 of its 24 answers within 8 tokens: ``keep`` (the other tests) pairs the 22
    cut ones as they are and counts them in the summary; ``drop`` keeps the 2 ended ones alone, at most one pair,
    fewer than a batch of 4, and the round stops unfinished."""
    _, summaries = run(setup, "keep", rounds=1, min_gap=0.0)
    s = summaries[0]
    assert (s["samples_ended"], s["samples_dropped"], s["samples_trimmed"]) == (2, 0, 0)
    with pytest.raises(IterationError, match=r"^round 1: [01] pairs to train on from 8 prompts"):
        run(setup, "drop", rounds=1, min_gap=0.0, incomplete="drop")
    assert not (round_dir(setup["dir"] / "drop", 1) / "summary.json").exists()


@pytest.mark.parametrize("mode", ["raise", "nan", "count"])
def test_a_failing_judge_names_the_round_and_prompt_and_leaves_the_round_unfinished(setup, mode):
    """Calls: 1 the baseline's held-out samples, 2 round 1's training samples, 3 round 1's held-out
    samples, 4 round 2's training samples: the judge fails there, on prompt 5."""
    judge = FlakyJudge(fail_at=4, bad=5, mode=mode)
    judge.prompts = [p["prompt"] for p in PROMPTS]
    out = setup["dir"] / f"flaky-{mode}"
    with pytest.raises(IterationError) as e:
        iterate(out, *configs(setup, out), judge=judge, true_reward=CharJudge())
    message = str(e.value)
    assert message.startswith("round 2: the judge") and "(prompt 5," in message, message
    assert {"raise": "raised ValueError: judge backend down", "nan": "non-finite score (nan)",
            "count": "returned 0 scores"}[mode] in message
    assert finished_rounds(out) == 1 and not (round_dir(out, 2) / "summary.json").exists()
    assert [s["round"] for s in json.loads((out / "summary.json").read_text())] == [1]


def test_a_run_with_no_finished_round_starts_afresh_with_new_settings(setup):
    """Round 1 fails (call 2: its training samples), so nothing is finished: other settings are accepted."""
    judge = FlakyJudge(fail_at=2, bad=0, mode="nan")
    judge.prompts = [p["prompt"] for p in PROMPTS]
    out = setup["dir"] / "fresh"
    with pytest.raises(IterationError, match=r"^round 1: the judge gave a non-finite score \(nan\) to sample 0 "):
        iterate(out, *configs(setup, out), judge=judge, true_reward=CharJudge())
    assert finished_rounds(out) == 0 and not (out / "summary.json").exists()
    summaries = iterate(out, *configs(setup, out, rounds=1, beta=0.2), judge=CharJudge(), true_reward=CharJudge())
    assert [s["round"] for s in summaries] == [1]
    assert json.loads((out / "run_card.json").read_text())["config"]["beta"] == 0.2


def test_score_samples_checks_what_the_judge_returns():
    samples = [{"prompt_index": i // 2, "text": f"t{i}"} for i in range(6)]
    assert score_samples(lambda t: [1.0] * len(t), samples) == [1.0] * 6
    with pytest.raises(JudgeError) as e:
        score_samples(lambda t: [1.0] * len(t) if len(t) == 1 else [1.0], samples)
    assert "returned 1 scores for 6 texts (each text alone scores fine)" in str(e.value)
    assert e.value.prompt_index is None
    with pytest.raises(JudgeError) as e:
        score_samples(lambda t: [float("inf") if x == "t3" else 0.0 for x in t], samples)
    assert e.value.prompt_index == 1 and "sample 3 (prompt 1, text 't3')" in str(e.value)


def test_interrupted_run_resumes_at_round_2_with_the_uninterrupted_summary(setup, initial_run, capsys):
    """Round 2 fails (the judge raises), so round 1 is finished and round 2 is not; the same call
    with a working judge redoes round 2 only (2 judge calls: its training samples and its held-out
    samples; the baseline is read back) and ends with the uninterrupted run's summaries."""
    _, straight = initial_run
    out = setup["dir"] / "resumed"
    flaky = FlakyJudge(fail_at=4, bad=0, mode="raise")
    flaky.prompts = [p["prompt"] for p in PROMPTS]
    with pytest.raises(IterationError):
        iterate(out, *configs(setup, out), judge=flaky, true_reward=CharJudge())
    round1 = (round_dir(out, 1) / "pairs.jsonl").read_text()
    judge = CharJudge()
    capsys.readouterr()
    summaries = iterate(out, *configs(setup, out), judge=judge, true_reward=CharJudge())
    assert "rounds 1-1 finished, starting round 2" in capsys.readouterr().out
    assert judge.calls == 2
    assert (round_dir(out, 1) / "pairs.jsonl").read_text() == round1
    assert untimed(summaries) == untimed(straight)
    # a round whose summary is gone counts as unfinished and is redone, with the same result
    (round_dir(out, 2) / "summary.json").unlink()
    again = iterate(out, *configs(setup, out), judge=CharJudge(), true_reward=CharJudge())
    assert untimed(again) == untimed(straight)


def test_resume_with_other_settings_is_refused(setup, initial_run):
    out, _ = initial_run
    before = (out / "summary.json").read_text()
    with pytest.raises(ResumeMismatch) as e:
        iterate(out, *configs(setup, out, beta=0.2, rounds=3), judge=CharJudge(), true_reward=CharJudge())
    assert "--beta 0.1 (now 0.2)" in str(e.value)
    with pytest.raises(ResumeMismatch) as e:
        iterate(out, *configs(setup, out, min_gap=0.1), judge=CharJudge(), true_reward=CharJudge())
    assert "--min-gap 0.05 (now 0.1)" in str(e.value)
    assert (out / "summary.json").read_text() == before and not round_dir(out, 3).exists()


def test_branch_continues_round_1_with_the_previous_reference(setup, initial_run, previous_run):
    """An ``initial`` run's round 1, branched and continued with ``reference="previous"``, gives the
    round 2 of a ``previous`` run from scratch (same seeds; round 1 is the same in both modes)."""
    src, _ = initial_run
    _, straight = previous_run
    dst = branch(src, setup["dir"] / "branched")
    assert finished_rounds(dst) == 1 and (dst / "baseline.json").read_text() == (src / "baseline.json").read_text()
    judge = CharJudge()
    summaries = iterate(dst, *configs(setup, dst, reference="previous"), judge=judge, true_reward=CharJudge())
    assert judge.calls == 2  # round 2 only: its training samples and its held-out samples
    assert untimed(summaries)[1] == untimed(straight)[1]
    with pytest.raises(IterationError, match="exists already"):
        branch(src, dst)
    with pytest.raises(IterationError, match="no finished round 1"):
        branch(setup["dir"] / "nothing-here", setup["dir"] / "branch-of-nothing")


def test_a_finished_round_deletes_the_policy_before_it_except_round_1s(setup, initial_run):
    """Kept: round 1's policy (a branch starts from it) and the last round's (a resume does); a branch's
    round 1 is a hard link to its source's, not a second copy. ``keep_every_policy`` keeps them all."""
    src, _ = initial_run
    dst = branch(src, setup["dir"] / "pruned")
    weights = [round_dir(out, 1) / "policy" / "model.safetensors" for out in (src, dst)]
    assert os.path.samefile(*weights)
    summaries = iterate(dst, *configs(setup, dst, rounds=3), judge=CharJudge(), true_reward=CharJudge())
    assert [s["round"] for s in summaries] == [1, 2, 3]
    assert all(w.is_file() for w in weights) and (round_dir(src, 2) / "policy").is_dir()
    assert not (round_dir(dst, 2) / "policy").exists()
    assert (round_dir(dst, 3) / "policy" / "model.safetensors").is_file()
    summaries = iterate(dst, *configs(setup, dst, rounds=4, keep_every_policy=True), judge=CharJudge(),
                        true_reward=CharJudge())  # resumes from round 3's policy; the flag is free to change
    assert [s["round"] for s in summaries] == [1, 2, 3, 4]
    assert all((round_dir(dst, k) / "policy" / "model.safetensors").is_file() for k in (1, 3, 4))


def test_the_reference_mode_may_change_only_while_round_1_alone_is_finished(setup, initial_run):
    out, _ = initial_run  # two rounds finished: round 2 depended on the mode
    with pytest.raises(ResumeMismatch, match="--reference initial \\(now previous\\)"):
        iterate(out, *configs(setup, out, reference="previous", rounds=3), judge=CharJudge(), true_reward=CharJudge())
    dst = branch(out, setup["dir"] / "branched-beta")  # one round finished: other settings still count
    with pytest.raises(ResumeMismatch, match="--beta 0.1 \\(now 0.2\\)"):
        iterate(dst, *configs(setup, dst, reference="previous", beta=0.2), judge=CharJudge(), true_reward=CharJudge())


def test_reward_model_judge_scores_prompt_and_answer():
    """The adapter scores what RewardModel scores for prompt + answer + end-of-turn, whatever the batch."""
    from _tiny import tiny

    from dpo_lib.features import encode_prompt
    from dpo_lib.rlhf.reward_model import RewardModel, RewardModelJudge, end_of_turn_ids
    model, tok = tiny()
    rm = RewardModel.from_causal_lm(model)
    torch.nn.init.normal_(rm.head.weight)
    judge = RewardModelJudge(rm, tok)
    prompts = [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "A longer question?"}]]
    scores = judge(["fine", "a long answer"], prompts=prompts)
    ids = encode_prompt(tok, prompts[1]) + tok("a long answer", add_special_tokens=False)["input_ids"] \
        + end_of_turn_ids(tok)
    with torch.no_grad():
        alone = rm(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)).item()
    assert abs(scores[1] - alone) < 1e-5 and abs(judge(["fine"], prompts=prompts[:1])[0] - scores[0]) < 1e-5
    with pytest.raises(ValueError, match="pass prompts="):
        judge(["fine"])


# ---------------------------------------------------------------- the command line

def cli(*args, env=None):
    env = env or dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    return subprocess.run([sys.executable, "-m", "dpo_lib", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300, cwd=REPO)


BAD_ITERATE_FLAGS = [
    (("--rounds", "0"), "--rounds", "must be >= 1 (got 0)"),
    (("--samples-per-prompt", "1"), "--samples-per-prompt", "must be >= 2 (got 1)"),
    (("--min-gap", "-0.1"), "--min-gap", "must be >= 0.0 (got -0.1)"),
    (("--temperature", "0"), "--temperature", "must be > 0 (got 0.0)"),
    (("--prompts", "no-such-file.jsonl"), "--prompts", "no such file"),
    (("--prompts", None), "--prompts", "is required"),
    (("--out", None), "--out", "is required"),
    (("--batch-size", "5"), "--grad-accum", "must divide --batch-size 5 (got 2)"),
]


@pytest.mark.parametrize("flags,flag,what", BAD_ITERATE_FLAGS,
                         ids=[f[1] + "=" + str(f[0][-1]) for f in BAD_ITERATE_FLAGS])
def test_bad_iterate_flag_is_one_line_exit_2_and_loads_nothing(tmp_path, flags, flag, what):
    # a model folder that does not exist: should a check not fire, the run stops at once instead of training
    base = {"--prompts": os.path.join(REPO, "data", "sentiment", "prompts_train.jsonl"), "--out": tmp_path / "o",
            "--model": tmp_path / "no-model"}
    args = [x for k, v in {**base, **{flags[0]: flags[1]}}.items() if v is not None for x in (k, str(v))]
    code = ("import sys; from dpo_lib.cli import main; rc = main(sys.argv[1:]); "
            "print('torch loaded' if 'torch' in sys.modules else 'torch not loaded'); sys.exit(rc)")
    res = subprocess.run([sys.executable, "-c", code, "iterate", *args], capture_output=True, text=True, timeout=60,
                         cwd=REPO)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines() == [res.stderr.strip()], res.stderr
    assert res.stderr.startswith(f"error: {flag}: {what}"), res.stderr
    assert "torch not loaded" in res.stdout
    assert not (tmp_path / "o").exists()


def test_iterate_parser_choices_and_train_flags(capsys):
    from dpo_lib.cli import build_parser, iterate_configs, main
    a = build_parser().parse_args(["iterate", "--prompts", "p.jsonl", "--out", "o", "--rounds", "3",
                                   "--reference", "previous", "--beta", "0.3", "--max-steps", "5", "--reward", "none"])
    with pytest.raises(ConfigError, match="no such file"):
        iterate_configs(a)
    a.prompts = os.path.join(REPO, "data", "sentiment", "prompts_train.jsonl")
    settings, job, config = iterate_configs(a)
    assert (settings.rounds, settings.reference, config.beta, config.max_steps, job.reward) == \
           (3, "previous", 0.3, 5, None)
    for flags, bad in ((["--reference", "last"], "argument --reference: invalid choice: 'last'"),
                       (["--judge", "gpt"], "argument --judge: invalid choice: 'gpt'"),
                       (["--resume"], "unrecognized arguments: --resume")):
        with pytest.raises(SystemExit) as stop:
            main(["iterate", "--prompts", "p.jsonl", "--out", "o", *flags])
        assert stop.value.code == 2 and bad in capsys.readouterr().err


def test_cli_iterate_runs_resumes_and_refuses_other_settings(setup):
    """VADER scores the tiny model's random characters about 0: --min-gap 0 keeps pairs of distinct texts."""
    def iterate_args(out, *extra):
        return ("iterate", "--model", setup["model"], "--prompts", setup["prompts"], "--eval-dataset", setup["test"],
                "--out", out, "--rounds", 1, "--samples-per-prompt", 2, "--min-gap", 0, "--sample-max-new-tokens", 6,
                "--max-new-tokens", 6,
                "--incomplete", "keep", "--eval-samples", 1, "--max-eval-prompts", 2, "--batch-size", 4,
                "--grad-accum", 1, "--max-steps", 2, "--precision", "fp32", "--print-every", 0, *extra)

    out = setup["dir"] / "cli"
    args = iterate_args(out)
    res = cli(*args)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Summary (" in res.stdout and (round_dir(out, 1) / "summary.json").is_file()
    res = cli(*args, "--rounds", 2, "--beta", 0.5)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.startswith("error: ") and "--beta 0.1 (now 0.5)" in res.stderr
    res = cli(*iterate_args(setup["dir"] / "cli-no-pairs", "--min-gap", 3))  # VADER's scores lie in [-1, 1]
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "error: round 1: 0 pairs to train on from 8 prompts (8 without a preference" in res.stderr, res.stderr
    assert not (round_dir(setup["dir"] / "cli-no-pairs", 1) / "summary.json").exists()
    full = setup["dir"] / "cli-disk-full"  # the policy's weights cut short by a full disk: one line, exit 2
    res = cli(*iterate_args(full), env=hook_env(setup["dir"] / "hook", fail="weights"))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1] == f"error: cannot write round 1's policy in " \
        f"{round_dir(full, 1) / 'policy'}: No space left on device (os error 28)"
    assert finished_rounds(full) == 0  # the round is not finished: a re-run redoes it


def test_sampler_setting_reaches_every_sample_of_a_round(setup, monkeypatch):
    """``--sampler hf``: the baseline's, the round's training answers and its evaluation samples all come from
    transformers' model.generate (dpo_lib's decode loop is never called); the default samples with the loop."""
    import dpo_lib.sampling as S
    calls = []
    real_decode = S.decode
    monkeypatch.setattr(S, "decode", lambda *a, **k: calls.append(1) or real_decode(*a, **k))
    settings, job, config = configs(setup, setup["dir"] / "hf", rounds=1)
    iterate(setup["dir"] / "hf", settings, replace(job, sampler="hf"), config,
            judge=CharJudge(), true_reward=CharJudge())
    assert calls == []
    iterate(setup["dir"] / "loop", *configs(setup, setup["dir"] / "loop", rounds=1), judge=CharJudge(),
            true_reward=CharJudge())
    assert len(calls) >= 3                                          # baseline, training answers, evaluation
