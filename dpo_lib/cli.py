"""``python -m dpo_lib COMMAND``: train, pairs, validate, exercises, bench.

Errors a user can fix (bad data, a missing model, a diverging run) print a message and
exit non-zero: 2 for bad input, 3 for a run stopped by a non-finite loss.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .data import DataError
from .models import PRECISIONS, ModelNotFoundError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="a folder with config.json + *.safetensors, or a hub id (online); "
                        "default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")


def build_parser() -> argparse.ArgumentParser:
    from .job import DEFAULT_TEST, DEFAULT_TRAIN

    parser = argparse.ArgumentParser(prog="python -m dpo_lib", description="Direct Preference Optimization, small and tested.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,pairs,validate,exercises,bench}")

    t = sub.add_parser("train", help="DPO-train a model on preference pairs (default: the embedded model on the bundled sentiment pairs)")
    _add_model_args(t)
    t.add_argument("--dataset", type=Path, default=DEFAULT_TRAIN, help="training pairs, JSONL (default: %(default)s)")
    t.add_argument("--eval-dataset", type=Path, default=DEFAULT_TEST, help="held-out pairs, JSONL (default: %(default)s)")
    t.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation")
    t.add_argument("--reward", default="sentiment", help="ground-truth reward for sampled completions ('none' to skip)")
    t.add_argument("--out", type=Path, default=None, help="output folder (default: runs/dpo-TIMESTAMP)")
    t.add_argument("--learning-rate", type=float, default=1e-5)
    t.add_argument("--beta", type=float, default=0.1)
    t.add_argument("--loss-type", default="sigmoid", choices=["sigmoid", "ipo", "hinge", "robust"])
    t.add_argument("--label-smoothing", type=float, default=0.0)
    t.add_argument("--nll-weight", type=float, default=0.0)
    t.add_argument("--batch-size", type=int, default=8, help="pairs per optimizer step")
    t.add_argument("--grad-accum", type=int, default=2, help="micro-batches per step")
    t.add_argument("--max-steps", type=int, default=0, help="0: --epochs passes over the data")
    t.add_argument("--epochs", type=int, default=2,
                   help="passes over the data (default 2: one pass stops at ~0.73 held-out accuracy)")
    t.add_argument("--sort-by-length", action=argparse.BooleanOptionalAction, default=True,
                   help="sort each step's pairs by length into micro-batches: less padding, same loss")
    t.add_argument("--compact-lm-head", action=argparse.BooleanOptionalAction, default=True,
                   help="LM head only on the positions that score a completion token: same numbers, fewer FLOPs")
    t.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="bf16: forwards under bf16 autocast (weights and optimizer stay float32); "
                        "auto (default): bf16 where the CPU has bf16 matmul units (AMX/AVX512-BF16), else fp32")
    t.add_argument("--warmup-ratio", type=float, default=0.1)
    t.add_argument("--max-length", type=int, default=160, help="tokens per prompt+response")
    t.add_argument("--max-prompt-length", type=int, default=64, help="prompt tokens kept (from the end)")
    t.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: none)")
    t.add_argument("--print-every", type=int, default=8)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    t.add_argument("--skip-invalid", action="store_true", help="drop bad rows instead of stopping")
    t.add_argument("--eval-samples", type=int, default=2, help="samples per held-out prompt for the true reward")
    t.add_argument("--max-eval-prompts", type=int, default=64)
    t.add_argument("--max-new-tokens", type=int, default=40, help="length of evaluation samples")
    t.add_argument("--_kill-after-save", type=int, default=None, help=argparse.SUPPRESS)

    p = sub.add_parser("pairs", help="sample N responses per prompt, score them, keep best vs worst")
    _add_model_args(p)
    p.add_argument("--prompts", type=Path, required=True, help="JSONL with a 'prompt' per line")
    p.add_argument("--out", type=Path, required=True, help="output JSONL of pairs")
    p.add_argument("-n", "--num-samples", type=int, default=4)
    p.add_argument("--reward", default="sentiment")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--min-gap", type=float, default=0.05, help="skip prompts whose best and worst differ less")
    p.add_argument("--seed", type=int, default=0)

    v = sub.add_parser("validate", help="check preference JSONL files; report FILE:LINE for every bad row")
    v.add_argument("files", nargs="+", type=Path)
    v.add_argument("--skip-invalid", action="store_true", help="report, keep the good rows, exit 0 if any remain")
    v.add_argument("--max-length", type=int, default=None, help="also flag prompts too long for this many tokens")
    v.add_argument("--model", default=None, help="tokenizer for --max-length (default: the embedded model)")

    from .bench import add_arguments as add_bench_arguments
    b = sub.add_parser("bench", help="time dpo_lib's trainer against TRL's DPOTrainer on the same work (--vs trl)")
    add_bench_arguments(b)

    e = sub.add_parser("exercises", help="generate exercises/ from solutions/ (or --check they are in sync)")
    e.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def _threads(n: int | None) -> None:
    import os

    import torch
    torch.set_num_threads(n or os.cpu_count() or 1)


def cmd_train(a) -> int:
    from .job import run
    from .trainer import TrainConfig

    if a.resume and a.out is None:
        print("error: --resume needs the --out folder of the run to continue", file=sys.stderr)
        return 2
    out = a.out or Path("runs") / time.strftime("dpo-%Y%m%d-%H%M%S")
    print(f"[dpo_lib] output folder: {out}")
    _threads(a.threads)
    config = TrainConfig(beta=a.beta, loss_type=a.loss_type, label_smoothing=a.label_smoothing,
                         nll_weight=a.nll_weight, learning_rate=a.learning_rate, batch_size=a.batch_size,
                         grad_accum=a.grad_accum, max_steps=a.max_steps, epochs=a.epochs,
                         warmup_ratio=a.warmup_ratio, seed=a.seed, print_every=a.print_every,
                         save_every=a.save_every, sort_by_length=a.sort_by_length,
                         compact_lm_head=a.compact_lm_head, precision=a.precision)
    summary = run(out, model_name=a.model, dataset=a.dataset, eval_dataset=None if a.no_eval else a.eval_dataset,
                  config=config, reward=None if a.reward == "none" else a.reward, max_length=a.max_length,
                  max_prompt_length=a.max_prompt_length, eval_samples=a.eval_samples, max_new_tokens=a.max_new_tokens,
                  max_eval_prompts=a.max_eval_prompts, skip_invalid=a.skip_invalid, resume=a.resume,
                  trust_remote_code=a.trust_remote_code, kill_after_save=a._kill_after_save)
    keys = ["heldout_accuracy_before", "heldout_accuracy_after", "reward_before", "reward_after", "reward_gain",
            "reward_gain_se", "win_rate", "kl_to_reference", "train_seconds", "tokens_per_second", "total_seconds"]
    print("\nSummary (" + str(out / "summary.json") + ")")
    for k in keys:
        if k in summary:
            print(f"  {k:<24} {summary[k]:.4f}")
    print(f"  files: {', '.join(sorted(p.name for p in out.iterdir()))}")
    return 0


def cmd_pairs(a) -> int:
    from .data import load_prompts
    from .models import load_model
    from .rewards import get_reward
    from .sampling import make_pairs

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


def cmd_validate(a) -> int:
    from .data import load_preferences, tokenize_rows

    tokenizer = None
    if a.max_length:
        from .models import load_tokenizer
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["exercises"]:  # its own options (--check, --solutions, --exercises) pass straight through
        from .exercises import main as exercises_main
        return exercises_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            return cmd_train(args)
        if args.command == "pairs":
            return cmd_pairs(args)
        if args.command == "validate":
            return cmd_validate(args)
        if args.command == "bench":
            from .bench import main as bench_main
            return bench_main(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ModelNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a diverging run: say what happened, keep the checkpoint
        from .trainer import NonFiniteError
        if isinstance(e, NonFiniteError):
            print(f"error: {e}", file=sys.stderr)
            return 3
        raise
    return 1
