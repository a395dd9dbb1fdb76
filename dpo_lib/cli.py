"""``python -m dpo_lib COMMAND``: train, iterate, pairs, lengths, validate, bench, doctor, exercises, colab.

Every command's flags come from a config dataclass of :mod:`dpo_lib.config` (built by
:func:`dpo_lib.settings.add_arguments`) whose checks run before anything heavy is imported: a bad
flag ends in ``error: --FLAG: what is wrong`` and exit status 2 within a second. ``doctor``,
``exercises`` and ``colab`` are tools with their own flags; their arguments pass straight through.
Errors a user can fix (:class:`dpo_lib.settings.UserError`: bad data, a missing model, a busy
output folder, a full disk) print one line and exit 2; a run stopped by a non-finite loss exits 3;
Ctrl-C (SIGINT) and SIGTERM during training let the step finish, write a checkpoint when checkpoints
are on, say how to resume and exit 130 and 143 (128 + the signal).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys
import time
from pathlib import Path

from dpo_lib.config import (
    BenchConfig,
    IterateConfig,
    JobConfig,
    LengthsConfig,
    ModelConfig,
    PairsConfig,
    TrainConfig,
    ValidateConfig,
)
from dpo_lib.settings import ConfigError, UserError, add_arguments, from_args

__all__ = ["build_parser", "iterate_configs", "main", "train_configs", "with_system"]

# train flags that iterate leaves out: its training pairs are sampled, and it resumes by rounds
ITERATE_SKIP = ("dataset", "resume", "force_resume", "overwrite", "skip_invalid", "save_every", "keep_checkpoints",
                "capability")
# tools with flags of their own: `python -m dpo_lib NAME ARGS...` calls MODULE.main(ARGS)
TOOLS = {"doctor": ("dpo_lib.tools.doctor", "read a DPO run's logs (dpo_lib's or TRL's) and say what went wrong"),
         "exercises": ("dpo_lib.course.exercises", "generate exercises/ from solutions/ (or --check they are in sync)"),
         "colab": ("dpo_lib.course.colab", "write the Colab badges, links and install cells from [project.urls] "
                                           "(or --check they are up to date)")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dpo_lib",
                                     description="Direct Preference Optimization, small and tested.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    t = sub.add_parser("train", help="DPO-train a model on preference pairs (default: the embedded model on the "
                                     "bundled sentiment pairs)")
    add_arguments(t, JobConfig)
    t.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation")
    add_arguments(t, TrainConfig)
    it = sub.add_parser("iterate", help="iterative on-policy DPO: R rounds of sample, judge, best-vs-worst pairs, "
                                        "train, evaluate (a re-run of the same command resumes)",
                        description="Iterative on-policy DPO (dpo_lib.recipes.iterate). The training flags apply to "
                                    "every round (--max-steps: steps per round); the evaluation is against the "
                                    "starting model. A re-run of the same command continues at the first unfinished "
                                    "round.")
    for cls in (IterateConfig, JobConfig, TrainConfig):
        add_arguments(it, cls, skip=ITERATE_SKIP)
    add_arguments(sub.add_parser("pairs", help="sample N responses per prompt, score them, keep best vs worst"),
                  PairsConfig)
    add_arguments(sub.add_parser("lengths", help="sample answers and report where they end: the fraction ended (EOS) "
                                                 "by each token count, to choose a --max-new-tokens at which most end",
                                 description="Sample answers and report where they end. An answer cut at "
                                             "--max-new-tokens has a length that is only a lower bound: measure "
                                             "length changes at a cap by which most answers end on their own."),
                  LengthsConfig)
    v = sub.add_parser("validate", help="check preference JSONL files; report FILE:LINE for every bad row")
    v.add_argument("files", nargs="+", type=Path)
    add_arguments(v, ValidateConfig)
    add_arguments(sub.add_parser("bench", help="time dpo_lib's trainer against TRL's DPOTrainer on the same work "
                                               "(--vs trl)"), BenchConfig)
    for name, (_, help_text) in TOOLS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


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
    job = from_args(JobConfig, a, **overrides)
    job.check_out_folder()
    return job, from_args(TrainConfig, a)


def cmd_train(a) -> int:
    job, config = train_configs(a)  # every check, before torch and the model are loaded
    from dpo_lib.recipes.train import run

    print(f"[dpo_lib] output folder: {job.out}")
    _threads(job.threads)
    summary = run(job.out, job, config)
    keys = ["heldout_accuracy_before", "heldout_accuracy_after", "reward_before", "reward_after", "reward_gain",
            "reward_gain_se", "win_rate", "kl_to_reference", "general_nll_change", "general_nll_change_se",
            "instruction_following_change", "instruction_following_change_se", "train_seconds", "tokens_per_second",
            "total_seconds"]
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
    from dpo_lib.recipes.iterate import finished_rounds, iterate

    print(f"[dpo_lib] output folder: {job.out}")
    _threads(job.threads)
    try:
        summaries = iterate(job.out, settings, job, config)
    except KeyboardInterrupt as e:
        done = finished_rounds(job.out)
        print(f"\ninterrupted in round {done + 1}; {done} rounds finished in {job.out}. Re-run the same command to "
              f"continue at round {done + 1}.", file=sys.stderr)
        return 128 + getattr(e, "signum", signal.SIGINT)
    keys = ["pairs", "heldout_accuracy_after", "reward_gain", "reward_gain_se", "kl_to_start", "judge_gain"]
    print("\nSummary (" + str(job.out / "summary.json") + ")\n  round " + " ".join(f"{k:>22}" for k in keys))
    for s in summaries:
        print(f"  {s['round']:>5} " + " ".join(f"{s[k]:>22.4f}" if k in s else f"{'-':>22}" for k in keys))
    return 0


def _model(c: ModelConfig):
    """Threads, then the model and tokenizer of ``c`` (after every check)."""
    from dpo_lib.models import load_model
    _threads(c.threads)
    return load_model(c.model, trust_remote_code=c.trust_remote_code)


def cmd_pairs(a) -> int:
    c = from_args(PairsConfig, a)
    from dpo_lib.data import load_prompts
    from dpo_lib.rewards import get_reward
    from dpo_lib.sampling import make_pairs

    prompts, reward = load_prompts(c.prompts), get_reward(c.reward)
    if c.check:  # the full run's first batches: the same jobs, padding and seeds
        per_batch = c.batch_size // c.num_samples
        prompts = prompts[: -(-c.check_prompts // per_batch) * per_batch]
    model, tokenizer = _model(c)
    start = time.perf_counter()
    rows, stats = make_pairs(model, tokenizer, prompts, reward, n=c.num_samples, min_gap=c.min_gap,
                             incomplete=c.incomplete, max_new_tokens=c.max_new_tokens, temperature=c.temperature,
                             top_p=c.top_p, batch_size=c.batch_size, seed=c.seed, sampler=c.sampler)
    seconds = time.perf_counter() - start
    lines = [json.dumps(row, ensure_ascii=False) + "\n" for row in rows]
    if c.check:
        return _check_pairs(c.out, prompts, lines)
    c.out.parent.mkdir(parents=True, exist_ok=True)
    with open(c.out, "w") as f:
        f.writelines(lines)
    print(f"[dpo_lib] {stats['pairs']} pairs from {stats['prompts']} prompts x {c.num_samples} samples "
          f"({stats['skipped_no_preference']} skipped: no preference) -> {c.out}")
    print(f"[dpo_lib] samples: {stats['ended']} of {stats['samples']} ended by the model, {stats['trimmed']} trimmed "
          f"to their last complete sentence, {stats['dropped']} dropped (--incomplete {c.incomplete}); "
          f"sampling and scoring {seconds:.0f} s")
    return 0


def _check_pairs(out: Path, prompts: list[dict], lines: list[str]) -> int:
    """``pairs --check``: the rows regenerated for ``prompts`` against the rows of ``out`` for the same prompts."""
    key = lambda row: json.dumps(row["prompt"], sort_keys=True)  # noqa: E731
    wanted = {key(r) for r in prompts}
    with open(out, encoding="utf-8") as f:
        stored = [line for line in f if key(json.loads(line)) in wanted]
    if stored == lines:
        print(f"[dpo_lib] check: the first {len(prompts)} prompts give the {len(lines)} rows of {out}, byte for byte")
        return 0
    bad = next((k for k, (x, y) in enumerate(zip(stored, lines)) if x != y), min(len(stored), len(lines)))
    print(f"[dpo_lib] check FAILED: {out} holds {len(stored)} rows for the first {len(prompts)} prompts, "
          f"regenerated {len(lines)}; first difference at row {bad + 1}:\n  stored:      "
          f"{stored[bad][:160] if bad < len(stored) else '(none)'}\n  regenerated: "
          f"{lines[bad][:160] if bad < len(lines) else '(none)'}", file=sys.stderr)
    return 1


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
    c = from_args(LengthsConfig, a)
    from dpo_lib.data import load_prompts
    from dpo_lib.evaluation import ending_profile
    from dpo_lib.sampling import generate

    rows = load_prompts(c.prompts)
    if c.system is not None:
        rows = with_system(rows, c.system, c.prompts)
    model, tokenizer = _model(c)
    start = time.perf_counter()
    samples = generate(model, tokenizer, [r["prompt"] for r in rows], n=c.num_samples, max_new_tokens=c.max_new_tokens,
                       temperature=c.temperature, top_p=c.top_p, batch_size=c.batch_size, seed=c.seed,
                       sampler=c.sampler)
    profile = ending_profile(samples, tokenizer.eos_token_id, c.max_new_tokens)
    seconds = time.perf_counter() - start
    print(f"[dpo_lib] {profile['samples']} answers ({len(rows)} prompts x {c.num_samples}) from {c.prompts}, "
          f"temperature {c.temperature}, top-p {c.top_p}, cap {c.max_new_tokens} tokens: {seconds:.0f} s")
    _print_profile(profile, c.max_new_tokens)
    if c.json is not None:
        c.json.parent.mkdir(parents=True, exist_ok=True)
        c.json.write_text(json.dumps({**profile, "prompts": str(c.prompts), "temperature": c.temperature,
                                      "top_p": c.top_p, "system": c.system, "seed": c.seed, "seconds": seconds},
                                     indent=1) + "\n")
    return 0


def _print_profile(profile: dict, cap: int) -> None:
    """The table of :func:`dpo_lib.evaluation.ending_profile`: the fraction ended by each token count."""
    from dpo_lib.evaluation import cap_for
    w = max(4, *(len(str(c)) for c in profile["caps"])) + 2        # a column: the cap, or a fraction 0.00
    print(f"{'ended by (tokens)':<20}" + "".join(f"{c:>{w}}" for c in profile["caps"]))
    print(f"{'fraction of answers':<20}" + "".join(f"{f:>{w}.2f}" for f in profile["ended_by"]))
    mean = profile["mean_length_ended"]
    print(f"{profile['ended']:.0%} ended before the cap" + (f" (mean length {mean:.1f} tokens)" if mean else "")
          + f"; {1 - profile['ended']:.0%} were cut at {cap} tokens, so their lengths are lower bounds")
    for fraction in (0.5, 0.9):
        within = cap_for(profile, fraction)
        print(f"{fraction:.0%} of the answers end within {within} tokens" if within else
              f"fewer than {fraction:.0%} of the answers end within {cap} tokens")


def cmd_validate(a) -> int:
    c = from_args(ValidateConfig, a)
    from dpo_lib.data import DataError, load_preferences

    tokenizer = None
    if c.max_length:
        from dpo_lib.models import load_tokenizer
        tokenizer = load_tokenizer(c.model)
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
            from dpo_lib.features import tokenize_rows
            features, stats = tokenize_rows(tokenizer, rows, max_length=c.max_length)
            problems += stats.problems
            report.kept, report.dropped = len(features), report.dropped + stats.dropped_too_long
        for p in problems:
            print(p, file=sys.stderr)
        print(f"{path}: {report.kept} valid rows, {report.dropped} invalid")
        if problems and not (c.skip_invalid and report.kept):
            status = 2
    return status


def cmd_bench(a) -> int:
    c = from_args(BenchConfig, a)
    from dpo_lib.tools.bench import main as bench_main
    return bench_main(c)


COMMANDS = {"train": cmd_train, "iterate": cmd_iterate, "pairs": cmd_pairs, "lengths": cmd_lengths,
            "validate": cmd_validate, "bench": cmd_bench, **{name: None for name in TOOLS}}


class Terminated(KeyboardInterrupt):
    """SIGTERM outside the training loop (which finishes its step first): stop as Ctrl-C would, exit 143."""

    signum = signal.SIGTERM


def _on_sigterm(_signum, _frame):
    raise Terminated("SIGTERM")


def _catch_sigterm() -> None:
    """SIGTERM (a scheduler, ``docker stop``) stops the command as Ctrl-C does, not silently; the training loop
    defers it to the end of its step (:func:`dpo_lib.trainer.deferred_sigint`). Main thread only."""
    try:
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:
        pass


def _interrupted(e) -> int:
    from dpo_lib.trainer import TrainingInterrupted
    signum = getattr(e, "signum", signal.SIGINT)
    how = "" if signum == signal.SIGINT else f" by {signal.Signals(signum).name}"
    if isinstance(e, TrainingInterrupted) and e.checkpoint is not None:
        print(f"\ninterrupted after step {e.step}{how}; checkpoint {e.checkpoint}. Resume with the same command "
              "and --resume.", file=sys.stderr)
    elif isinstance(e, TrainingInterrupted):
        print(f"\ninterrupted after step {e.step}{how}; no checkpoint (train with --save-every N to be able to "
              "resume)", file=sys.stderr)
    else:
        print(f"\ninterrupted{how}", file=sys.stderr)
    return 128 + signum


WRITE_ERRORS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EFBIG, errno.EISDIR,
                errno.ENOTDIR, errno.EEXIST}


def _os_error(e: OSError) -> int:
    """A full disk, a read-only folder, a file in the way: one line naming the path, exit 2; else a bug."""
    if e.errno not in WRITE_ERRORS:
        raise e
    where = f": {e.filename}" if e.filename else ""
    print(f"error: {e.strerror or e}{where}", file=sys.stderr)
    return 2


def _run_tool(name: str, argv: list[str]) -> int:
    import importlib
    return importlib.import_module(TOOLS[name][0]).main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command in TOOLS:  # their own flags pass straight through
        return _run_tool(args.command, argv[argv.index(args.command) + 1:])
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _catch_sigterm()
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt as e:
        return _interrupted(e)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        return _os_error(e)
    except Exception as e:  # a non-finite loss: exit 3 with its one-line message; anything else is a bug
        from dpo_lib.trainer import NonFiniteError
        if not isinstance(e, NonFiniteError):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 3
