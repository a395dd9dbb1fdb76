"""``python -m dpo_lib COMMAND``: train, iterate, pairs, lengths, validate, exercises, colab, bench.

The ``train`` flags are built from :class:`dpo_lib.config.TrainConfig` and
:class:`dpo_lib.config.JobConfig`, whose checks run before anything heavy is imported: a bad
flag ends in ``error: --FLAG: what is wrong`` and exit status 2 within a second. ``iterate`` takes
the same flags (less those of one fixed dataset, checkpoints and ``--resume``: a re-run of the same
command resumes) and those of :class:`dpo_lib.config.IterateConfig`. Errors a
user can fix (bad data, a missing model, a busy output folder) print one line and exit 2;
a run stopped by a non-finite loss exits 3; Ctrl-C during training exits 130 after saying
how to resume.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from dpo_lib.config import (
    DEFAULT_TEST_PROMPTS,
    ConfigError,
    IterateConfig,
    JobConfig,
    TrainConfig,
    add_arguments,
    at_least,
    from_args,
    in_range,
    positive,
)

MODEL_FLAGS = ("model", "trust_remote_code", "threads")
# train flags that iterate leaves out: its training pairs are sampled, and it resumes by rounds
ITERATE_SKIP = ("dataset", "resume", "force_resume", "skip_invalid", "save_every", "keep_checkpoints")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    """The model flags of ``pairs`` and ``validate``, with the same help as ``train``'s."""
    add_arguments(p, JobConfig, skip=tuple(f for f in JobConfig.__dataclass_fields__ if f not in MODEL_FLAGS))
    p.set_defaults(**{f: getattr(JobConfig, f) for f in MODEL_FLAGS})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dpo_lib",
                                     description="Direct Preference Optimization, small and tested.")
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{train,iterate,pairs,lengths,validate,exercises,colab,bench}")

    t = sub.add_parser("train", help="DPO-train a model on preference pairs (default: the embedded model on the "
                                     "bundled sentiment pairs)")
    add_arguments(t, JobConfig)
    t.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation")
    add_arguments(t, TrainConfig)

    it = sub.add_parser("iterate", help="iterative on-policy DPO: R rounds of sample, judge, best-vs-worst pairs, "
                                        "train, evaluate (a re-run of the same command resumes)",
                        description="Iterative on-policy DPO (dpo_lib.iterate). The training flags apply to every "
                                    "round (--max-steps: steps per round); the evaluation is against the starting "
                                    "model. A re-run of the same command continues at the first unfinished round.")
    add_arguments(it, IterateConfig)
    add_arguments(it, JobConfig, skip=ITERATE_SKIP)
    add_arguments(it, TrainConfig, skip=ITERATE_SKIP)

    p = sub.add_parser("pairs", help="sample N responses per prompt, score them, keep best vs worst")
    _add_model_args(p)
    p.add_argument("--prompts", type=Path, required=True, help="JSONL with a 'prompt' per line")
    p.add_argument("--out", type=Path, required=True, help="output JSONL of pairs")
    p.add_argument("-n", "--num-samples", type=int, default=4, help="samples per prompt (>= 2)")
    p.add_argument("--reward", default="sentiment")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--min-gap", type=float, default=0.05, help="skip prompts whose best and worst differ less")
    p.add_argument("--seed", type=int, default=0)

    n = sub.add_parser("lengths", help="sample answers and report where they end: the fraction ended (EOS) "
                                       "by each token count, to choose a --max-new-tokens at which most end",
                       description="Sample answers and report where they end. An answer cut at --max-new-tokens "
                                   "has a length that is only a lower bound: measure length changes at a cap "
                                   "by which most answers end on their own.")
    _add_model_args(n)
    n.add_argument("--prompts", type=Path, default=DEFAULT_TEST_PROMPTS,
                   help="JSONL with a 'prompt' per line (default: the bundled held-out sentiment prompts)")
    n.add_argument("-n", "--num-samples", type=int, default=2, help="samples per prompt")
    n.add_argument("--max-new-tokens", type=int, default=512, help="the longest answer sampled")
    n.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    n.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling; 1: the full distribution")
    n.add_argument("--system", default=None, help="a system message put before every (conversational) prompt, "
                                                  "replacing the prompt's own")
    n.add_argument("--batch-size", type=int, default=32)
    n.add_argument("--seed", type=int, default=0)
    n.add_argument("--json", type=Path, default=None, help="also write the profile to this JSON file")

    v = sub.add_parser("validate", help="check preference JSONL files; report FILE:LINE for every bad row")
    v.add_argument("files", nargs="+", type=Path)
    v.add_argument("--skip-invalid", action="store_true", help="report, keep the good rows, exit 0 if any remain")
    v.add_argument("--max-length", type=int, default=None, help="also flag prompts too long for this many tokens")
    v.add_argument("--model", default=None, help="tokenizer for --max-length (default: the embedded model)")

    from dpo_lib.tools.bench import add_arguments as add_bench_arguments
    b = sub.add_parser("bench", help="time dpo_lib's trainer against TRL's DPOTrainer on the same work (--vs trl)")
    add_bench_arguments(b)

    e = sub.add_parser("exercises", help="generate exercises/ from solutions/ (or --check they are in sync)")
    e.add_argument("rest", nargs=argparse.REMAINDER)
    c = sub.add_parser("colab", help="write the Colab badges, links and install cells from [project.urls] "
                                     "(or --check they are up to date)")
    c.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


# ---------------------------------------------------------------- flag checks of the other commands

def _check(flag: str, value, check) -> None:
    problem = check(value) if value is not None else None
    if problem:
        raise ConfigError(flag.lstrip("-").replace("-", "_"), problem)


def _check_input(flag: str, path: Path) -> None:
    from dpo_lib.config import readable_file
    _check(flag, path, readable_file)


def _check_output(flag: str, path: Path | None) -> None:
    if path is not None and path.is_dir():
        raise ConfigError(flag.lstrip("-").replace("-", "_"), f"is a folder, expected a file to write: {path}")


def check_pairs(a) -> None:
    _check_input("--prompts", a.prompts)
    _check_output("--out", a.out)
    _check("--num-samples", a.num_samples, at_least(2))
    for flag in ("max_new_tokens", "batch_size"):
        _check(flag, getattr(a, flag), at_least(1))
    _check("--temperature", a.temperature, positive)
    _check("--min-gap", a.min_gap, at_least(0.0))
    _check("--seed", a.seed, at_least(0))
    _check("--threads", a.threads, at_least(1))


def check_lengths(a) -> None:
    _check_input("--prompts", a.prompts)
    for flag in ("num_samples", "max_new_tokens", "batch_size"):
        _check(flag, getattr(a, flag), at_least(1))
    _check("--temperature", a.temperature, at_least(0.0))
    _check("--top-p", a.top_p, in_range(0.0, 1.0, hi_open=False))
    if a.top_p == 0:
        raise ConfigError("top_p", "must be > 0")
    _check("--seed", a.seed, at_least(0))
    _check_output("--json", a.json)
    _check("--threads", a.threads, at_least(1))


def check_validate(a) -> None:
    _check("--max-length", a.max_length, at_least(2))


def check_bench(a) -> None:
    if a.dataset is not None:
        _check_input("--dataset", a.dataset)
    _check_output("--json", a.json)
    _check("--steps", a.steps, at_least(2))  # the first step of each run is a warm-up, not timed
    for flag in ("batch_size", "repeats", "threads", "micro_batch_size"):
        _check(flag, getattr(a, flag), at_least(1))
    if a.micro_batch_size is not None and a.batch_size % a.micro_batch_size:
        raise ConfigError("micro_batch_size", f"must divide --batch-size {a.batch_size} (got {a.micro_batch_size})")
    _check("--max-length", a.max_length, at_least(2))
    for flag in ("learning_rate", "beta", "peak_flops"):
        _check(flag, getattr(a, flag), positive)
    _check("--seed", a.seed, at_least(0))


# ---------------------------------------------------------------- commands

def _threads(n: int | None) -> None:
    import torch
    torch.set_num_threads(n or os.cpu_count() or 1)


def train_configs(a) -> tuple[JobConfig, TrainConfig]:
    """The two configs from the parsed ``train`` flags (raises :class:`ConfigError`)."""
    overrides = {"eval_dataset": None} if a.no_eval else {}
    if getattr(a, "reward", None) == "none":
        overrides["reward"] = None
    if getattr(a, "out", None) is None and not getattr(a, "resume", False):  # --resume needs the run's own --out
        overrides["out"] = Path("runs") / time.strftime("dpo-%Y%m%d-%H%M%S")
    return from_args(JobConfig, a, **overrides), from_args(TrainConfig, a)


def cmd_train(a) -> int:
    job, config = train_configs(a)  # every check, before torch and the model are loaded
    from dpo_lib.job import run

    print(f"[dpo_lib] output folder: {job.out}")
    _threads(job.threads)
    summary = run(job.out, job, config)
    keys = ["heldout_accuracy_before", "heldout_accuracy_after", "reward_before", "reward_after", "reward_gain",
            "reward_gain_se", "win_rate", "kl_to_reference", "train_seconds", "tokens_per_second", "total_seconds"]
    print("\nSummary (" + str(job.out / "summary.json") + ")")
    for k in keys:
        if k in summary:
            print(f"  {k:<24} {summary[k]:.4f}")
    print(f"  files: {', '.join(sorted(p.name for p in job.out.iterdir() if not p.name.startswith('.')))}")
    return 0


def iterate_configs(a) -> tuple[IterateConfig, JobConfig, TrainConfig]:
    """The three configs from the parsed ``iterate`` flags (raises :class:`ConfigError`)."""
    settings = from_args(IterateConfig, a)
    job = from_args(JobConfig, a, **({"reward": None} if getattr(a, "reward", None) == "none" else {}))
    config = from_args(TrainConfig, a)
    if job.out is None:
        raise ConfigError("out", "is required: the run folder (the same --out again resumes the run) (got nothing)")
    return settings, job, config


def cmd_iterate(a) -> int:
    settings, job, config = iterate_configs(a)  # every check, before torch and the model are loaded
    from dpo_lib.iterate import iterate

    print(f"[dpo_lib] output folder: {job.out}")
    _threads(job.threads)
    try:
        summaries = iterate(job.out, settings, job, config)
    except KeyboardInterrupt:
        from dpo_lib.iterate import finished_rounds
        done = finished_rounds(job.out)
        print(f"\ninterrupted in round {done + 1}; {done} rounds finished in {job.out}. Re-run the same command to "
              f"continue at round {done + 1}.", file=sys.stderr)
        return 130
    keys = ["pairs", "heldout_accuracy_after", "reward_gain", "reward_gain_se", "kl_to_start", "judge_gain"]
    print("\nSummary (" + str(job.out / "summary.json") + ")\n  round " + " ".join(f"{k:>22}" for k in keys))
    for s in summaries:
        print(f"  {s['round']:>5} " + " ".join(f"{s[k]:>22.4f}" if k in s else f"{'-':>22}" for k in keys))
    return 0


def cmd_pairs(a) -> int:
    from dpo_lib.data import load_prompts
    from dpo_lib.models import load_model
    from dpo_lib.rewards import get_reward
    from dpo_lib.sampling import make_pairs

    _threads(a.threads)
    prompts = load_prompts(a.prompts)
    model, tokenizer = load_model(a.model, trust_remote_code=a.trust_remote_code)
    rows, stats = make_pairs(model, tokenizer, prompts, get_reward(a.reward), n=a.num_samples, min_gap=a.min_gap,
                             max_new_tokens=a.max_new_tokens, temperature=a.temperature, batch_size=a.batch_size,
                             seed=a.seed)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"[dpo_lib] {stats['pairs']} pairs from {stats['prompts']} prompts x {a.num_samples} samples "
          f"({stats['skipped_no_preference']} skipped: no preference) -> {a.out}")
    return 0


def with_system(rows: list[dict], system: str, path: Path) -> list[dict]:
    """The prompts of ``rows`` with ``system`` as their system message (replacing their own)."""
    out = []
    for i, row in enumerate(rows, 1):
        if not isinstance(row["prompt"], list):
            raise ConfigError("system", f"{path}: prompt {i} is a plain string; a system message needs "
                                        "conversational prompts (lists of messages)")
        turns = [m for m in row["prompt"] if m["role"] != "system"]
        out.append(dict(row, prompt=[{"role": "system", "content": system}] + turns))
    return out


def cmd_lengths(a) -> int:
    from dpo_lib.data import load_prompts
    from dpo_lib.evaluation import cap_for, ending_profile
    from dpo_lib.models import load_model
    from dpo_lib.sampling import generate

    rows = load_prompts(a.prompts)
    if a.system is not None:
        rows = with_system(rows, a.system, a.prompts)
    _threads(a.threads)
    model, tokenizer = load_model(a.model, trust_remote_code=a.trust_remote_code)
    start = time.perf_counter()
    samples = generate(model, tokenizer, [r["prompt"] for r in rows], n=a.num_samples, max_new_tokens=a.max_new_tokens,
                       temperature=a.temperature, top_p=a.top_p, batch_size=a.batch_size, seed=a.seed)
    profile = ending_profile(samples, tokenizer.eos_token_id, a.max_new_tokens)
    seconds = time.perf_counter() - start
    print(f"[dpo_lib] {profile['samples']} answers ({len(rows)} prompts x {a.num_samples}) from {a.prompts}, "
          f"temperature {a.temperature}, top-p {a.top_p}, cap {a.max_new_tokens} tokens: {seconds:.0f} s")
    w = max(4, *(len(str(c)) for c in profile["caps"])) + 2        # a column: the cap, or a fraction 0.00
    print(f"{'ended by (tokens)':<20}" + "".join(f"{c:>{w}}" for c in profile["caps"]))
    print(f"{'fraction of answers':<20}" + "".join(f"{f:>{w}.2f}" for f in profile["ended_by"]))
    mean = profile["mean_length_ended"]
    print(f"{profile['ended']:.0%} ended before the cap" + (f" (mean length {mean:.1f} tokens)" if mean else "")
          + f"; {1 - profile['ended']:.0%} were cut at {a.max_new_tokens} tokens, so their lengths are lower bounds")
    for fraction in (0.5, 0.9):
        cap = cap_for(profile, fraction)
        print(f"{fraction:.0%} of the answers end within {cap} tokens" if cap else
              f"fewer than {fraction:.0%} of the answers end within {a.max_new_tokens} tokens")
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({**profile, "prompts": str(a.prompts), "temperature": a.temperature,
                                      "top_p": a.top_p, "system": a.system, "seed": a.seed, "seconds": seconds},
                                     indent=1) + "\n")
    return 0


def cmd_validate(a) -> int:
    from dpo_lib.data import DataError, load_preferences
    from dpo_lib.features import tokenize_rows

    tokenizer = None
    if a.max_length:
        from dpo_lib.models import load_tokenizer
        tokenizer = load_tokenizer(a.model)
    status = 0
    for path in a.files:
        try:
            rows, report = load_preferences(path, skip_invalid=True)
        except DataError as e:
            print(e, file=sys.stderr)
            status = 2
            continue
        problems = list(report.problems)
        if tokenizer is not None:
            features, stats = tokenize_rows(tokenizer, rows, max_length=a.max_length)
            problems += stats.problems
            report.kept, report.dropped = len(features), report.dropped + stats.dropped_too_long
        for p in problems:
            print(p, file=sys.stderr)
        print(f"{path}: {report.kept} valid rows, {report.dropped} invalid")
        if problems and not (a.skip_invalid and report.kept):
            status = 2
    return status


def _bench(a) -> int:
    from dpo_lib.tools.bench import main as bench_main
    return bench_main(a)


COMMANDS = {"train": (None, cmd_train), "iterate": (None, cmd_iterate),
            "pairs": (check_pairs, cmd_pairs), "lengths": (check_lengths, cmd_lengths),
            "validate": (check_validate, cmd_validate),
            "bench": (check_bench, _bench)}


def _interrupted(e) -> int:
    from dpo_lib.trainer import TrainingInterrupted
    if isinstance(e, TrainingInterrupted) and e.checkpoint is not None:
        print(f"\ninterrupted after step {e.step}; checkpoint {e.checkpoint}. Resume with the same command "
              "and --resume.", file=sys.stderr)
    elif isinstance(e, TrainingInterrupted):
        print(f"\ninterrupted after step {e.step}; no checkpoint (train with --save-every N to be able to "
              "resume)", file=sys.stderr)
    else:
        print("\ninterrupted", file=sys.stderr)
    return 130


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["exercises"]:  # its own options (--check, --solutions, --exercises) pass straight through
        from dpo_lib.course.exercises import main as exercises_main
        return exercises_main(argv[1:])
    if argv[:1] == ["colab"]:
        from dpo_lib.course.colab import main as colab_main
        return colab_main(argv[1:])
    args = build_parser().parse_args(argv)
    check, command = COMMANDS[args.command]
    try:
        if check:
            check(args)
        return command(args)
    except ConfigError as e:
        print(f"error: {e.flag}: {e.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        return _interrupted(e)
    except Exception as e:  # errors with a one-line message for the user; anything else is a bug: traceback
        return _user_error(e)


def _user_error(e: Exception) -> int:
    from dpo_lib.data import DataError
    from dpo_lib.iterate import IterationError
    from dpo_lib.job import ResumeMismatch, RunFolderBusy
    from dpo_lib.models import ModelNotFoundError
    from dpo_lib.trainer import NonFiniteError
    if isinstance(e, NonFiniteError):
        print(f"error: {e}", file=sys.stderr)
        return 3
    if isinstance(e, (DataError, ModelNotFoundError, RunFolderBusy, ResumeMismatch, IterationError)):
        print(f"error: {e}", file=sys.stderr)
        return 2
    raise e
