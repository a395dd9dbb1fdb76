r"""``python -m dpo_lib bench --vs trl``: dpo_lib's DPOTrainer against TRL's, on the same work.

What is compared. The same model (default: the embedded SmolLM2-135M-Instruct) is trained
from the same weights on the same preference pairs (default: the bundled sentiment pairs,
``data/sentiment/train.jsonl``, or ``data/assistant/train.jsonl`` when that file is missing),
with the same optimizer steps: ``--steps`` steps of ``--batch-size`` pairs, pairs taken in
file order by both (TRL: ``train_sampling_strategy="sequential"``), PyTorch's fused AdamW
(dpo_lib's optimizer, and TRL's default with torch >= 2.8) at a constant learning rate,
gradient clipping at 1, β = 0.1, sigmoid loss. Only pairs whose full tokenization fits
``--max-length`` are used, so neither trainer truncates and both score exactly the same
tokens (checked: ``same_tokens`` in the output compares the :func:`dpo_lib.features.token_ids_hash`
of the token ids each trainer built).

* TRL: ``trl.DPOTrainer`` with its defaults for everything else — a live reference model
  (a second copy of the weights) run under ``no_grad`` in every step, one forward of the
  whole batch of ``[chosen; rejected]`` sequences, padded to the longest, and its fused
  chunked LM head (on CPU it scores every position).
* dpo_lib: :class:`dpo_lib.trainer.DPOTrainer` with ``sort_by_length`` (each step's pairs
  sorted by length into micro-batches of ``--micro-batch-size`` pairs, each padded to its
  own longest: same loss, less padding), ``compact_lm_head`` (LM head only on the positions
  that score a completion token), and reference log-probs precomputed once by the policy
  itself before its first update (no second copy of the model; the precompute batches are
  sorted by length too).

Both load the model with the same attention, ``--attention`` (default ``sdpa``, transformers' default; ``eager``
is how the main job loads it). On 2 CPU cores ``eager`` runs bf16 steps ~10 % faster for both trainers alike
(the ratio stays: 2.03 against 2.05 on 2026-12-07), but rounds more: it rounds the attention scores and weights
to bf16 where SDPA's kernel keeps them in fp32, and over 4 steps both trainers' bf16 losses drifted up to 3e-2 from the
fp32 trajectory (sdpa: TRL 1.6e-2, dpo_lib 9e-3), beyond the bf16 tolerance below.

Timing. Each run is a fresh subprocess, so peak memory is per run: the child's
``ru_maxrss`` on CPU (resident set: weights, optimizer state, activations, Python and the
libraries), ``torch.cuda.max_memory_allocated`` on a GPU. Runs alternate (TRL, dpo_lib,
TRL, dpo_lib, ...) so that a change in machine load hits both. Model loading (and for TRL
the reference model's) is excluded for both; everything after it is counted:

* ``prep_seconds``: TRL — building ``DPOTrainer`` (tokenizing the dataset, preparing the
  models); dpo_lib — tokenizing, precomputing the reference log-probs, building the trainer;
* ``step_seconds``: wall time of each optimizer step (from the end of the previous one);
  ``seconds_per_step`` is their mean without the first (warm-up) step;
* ``tokens_per_second`` = tokens of steps 2..N / (their step time + the share of the
  reference precompute spent on those steps' pairs). TRL computes its reference inside the
  steps, dpo_lib before them: this charges both for it. Tokens are the non-padding tokens of
  prompt+chosen and prompt+rejected, identical for both;
* ``total_seconds`` = prep + all steps, and ``end_to_end_tokens_per_second`` on it.

* ``tokens_per_cpu_second``: the same with the process's CPU time (all its threads) instead
  of wall time. On a machine shared with other jobs, wall time counts the time spent waiting
  for a core and CPU time does not, so ``cpu_time_throughput_ratio`` is the steadier of the
  two ratios there (it is meaningless on a GPU).

``throughput_ratio`` = median dpo_lib tokens/s / median TRL tokens/s; ``peak_memory_ratio``
= median dpo_lib peak / median TRL peak. ``loss_max_abs_diff`` is the largest difference of
the per-step losses of the two trainers; both start from the same weights, so the losses
differ only by float rounding (different kernels, padding, precomputed vs live reference)
that the updates carry forward; ``loss_tolerance`` is the bound we expect: 1e-4 in float32 on that
difference; in bf16, 2e-2 on each trainer's distance from the float32 trajectory (one extra float32
``dpo_lib`` run gives it: ``fp32_losses``, ``loss_max_abs_diff_vs_fp32``), since two trainers that each
round by up to 2e-2, independently, can differ by twice that. Why 2e-2: bf16 keeps 8 bits of mantissa,
so a logit of size ~10 is rounded by up to ~0.04 and a token log-prob by as much; over the ~40 scored
tokens of a reply such errors, partly independent, move a sequence log-prob by ~0.1 nats, the margin of a
pair by β × (a few of those) ≈ 0.02-0.05 at β = 0.1, and the loss (|dL/dh| ≤ 1, averaged over the step's
pairs) by ~1e-2.

Micro-batches: on a CPU dpo_lib cuts each step's length-sorted pairs into micro-batches of at
most 4 (activations of 8 sequences at a time, whatever the batch; smaller ones run slower); on a
GPU it runs the whole batch in one forward.

Defaults: 5 steps of 4 pairs, 2 repeats: the CPU run takes 4-5 minutes on 2 cores, most of it
TRL's steps. The first step of each run is a warm-up and is not timed.

One lever at a time: ``--vs lever --lever NAME`` runs dpo_lib with the lever and without it (everything
else the same), alternating, no TRL; ``throughput_ratio`` is then with / without, on the same machine in
one run, and the loss check compares the two (same tolerances: a lever that changes the order of a sum
moves bf16 losses by up to ~1e-2, as TRL's kernels do). Levers: ``sort_by_length``,
``compact_lm_head``, ``shared_prompt`` and ``padding_free`` (each off also in the reference precompute),
``sparse_embedding_grad`` (:data:`dpo_lib.config.BENCH_LEVERS`).

Sampling: ``--vs generate`` times :func:`dpo_lib.sampling.generate`'s decode loop against transformers'
``model.generate`` on the main job's evaluation prompts (:mod:`dpo_lib.tools.bench.sampling`).

GPU: ``--device cuda --dtype bf16`` runs both with bf16 autocast on fp32 master weights
(TRL ``bf16=True``; dpo_lib through ``accelerate.Accelerator(mixed_precision="bf16")``).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dpo_lib.config import REPO_DATA
from dpo_lib.tools.bench.worker import pair_tokens

__all__ = ["main"]  # the flags: dpo_lib.config.BenchConfig

LOSS_TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2}  # max |loss difference| per step; the reasons: module docstring
BENCH_PACKAGES = ("torch", "transformers", "trl", "accelerate", "datasets")   # the versions the report records


def default_dataset() -> Path:
    sentiment = REPO_DATA / "sentiment" / "train.jsonl"
    return sentiment if sentiment.is_file() else REPO_DATA / "assistant" / "train.jsonl"


# ----------------------------------------------------------------------------- helpers

def select_rows(tokenizer, rows: list[dict], n: int, max_length: int) -> tuple[list[dict], list[dict], int]:
    """The first ``n`` rows whose untruncated pair fits ``max_length`` (so no trainer truncates)."""
    from dpo_lib.features import pair_length, tokenize_rows

    features, _ = tokenize_rows(tokenizer, rows)
    keep_rows, keep_feats, skipped = [], [], 0
    for row, f in zip(rows, features):
        if pair_length(f) <= max_length:
            keep_rows.append(row)
            keep_feats.append(f)
        else:
            skipped += 1
        if len(keep_rows) == n:
            break
    return keep_rows, keep_feats, skipped


# ----------------------------------------------------------------------------- the parent

def _machine(device: str) -> dict:
    info = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "processor": platform.processor()}
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    if device == "cuda":
        import torch
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _spawn(spec: dict, workdir: Path, k: int) -> dict:
    spec_file, out_file = workdir / f"spec-{k}.json", workdir / f"result-{k}.json"
    spec_file.write_text(json.dumps(spec))
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1",
               HF_DATASETS_DISABLE_PROGRESS_BARS="1", ACCELERATE_DISABLE_RICH="1")
    done = subprocess.run([sys.executable, "-m", "dpo_lib.tools.bench", str(spec_file), str(out_file)],
                          env=env, capture_output=True, text=True)
    if done.returncode != 0 or not out_file.is_file():
        raise RuntimeError(f"the {spec['impl']} run failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(out_file.read_text())


def _peak_flops(args, device: str, threads: int, before: float | None = None) -> tuple[float, str]:
    """The peak for MFU: given, a GPU's data sheet, or the best of two timed matmuls (before and after
    the runs: on a shared machine a single one can catch a busy moment)."""
    if args.peak_flops:
        return args.peak_flops, "given (--peak-flops)"
    if device == "cuda":
        import torch

        from dpo_lib.tools.flops import measure_matmul_flops
        from dpo_lib.tools.specs import peak_flops
        name = torch.cuda.get_device_name(0)
        peak = peak_flops(name)
        if peak:
            return peak, f"data sheet, {name}"
        return measure_matmul_flops(8192, dtype=torch.bfloat16, device="cuda"), f"timed bf16 matmul, {name}"
    from dpo_lib.tools.flops import measure_cpu_peak_flops
    best = max(measure_cpu_peak_flops(threads=threads), before or 0.0)
    return best, f"timed float32 1024x1024 matmul, {threads} threads, best of before/after the runs"


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def _prepare(args) -> tuple[dict, Path, int] | int:
    """``(spec, dataset, skipped)`` of the runs, or an exit status after printing what is wrong."""
    from dpo_lib.data import load_preferences
    from dpo_lib.models import load_tokenizer

    dataset = args.dataset or default_dataset()
    device = args.device
    if device == "cuda":
        import torch
        if not torch.cuda.is_available():
            print("error: --device cuda but no CUDA GPU is visible", file=sys.stderr)
            return 2
    threads = args.threads or os.cpu_count() or 1
    # CPU: micro-batches of at most 4 length-sorted pairs (bounded activations); GPU: the whole batch in one forward
    micro = args.micro_batch_size or (min(4, args.batch_size) if device == "cpu" else args.batch_size)
    if args.batch_size % micro:
        print(f"error: --batch-size {args.batch_size} is not a multiple of --micro-batch-size {micro}", file=sys.stderr)
        return 2
    rows, _ = load_preferences(dataset)
    tokenizer = load_tokenizer(args.model)
    need = args.steps * args.batch_size
    rows, features, skipped = select_rows(tokenizer, rows, need, args.max_length)
    if len(rows) < need:
        print(f"error: only {len(rows)} pairs of {dataset} fit --max-length {args.max_length}; "
              f"{args.steps} steps x {args.batch_size} pairs need {need}", file=sys.stderr)
        return 2
    spec = {"model": args.model, "lever": args.lever if args.vs == "lever" else None, "rows": rows,
            "steps": args.steps, "batch_size": args.batch_size,
            "micro_batch_size": micro, "max_length": args.max_length, "learning_rate": args.learning_rate,
            "beta": args.beta, "seed": args.seed, "threads": threads, "device": device, "dtype": args.dtype,
            "attention": args.attention,
            "tokens": sum(pair_tokens(f) for f in features)}
    return spec, dataset, skipped


def _baseline(spec: dict) -> str:
    """The name of what dpo_lib is compared with: ``trl``, or ``without_LEVER``."""
    return f"without_{spec['lever']}" if spec.get("lever") else "trl"


def _run_alternating(spec: dict, repeats: int) -> dict[str, list[dict]]:
    """``repeats`` runs of each arm, alternating (baseline, dpo_lib, baseline, ...), each in a fresh process."""
    base = _baseline(spec)
    runs: dict[str, list[dict]] = {base: [], "dpo_lib": []}
    arms = {base: dict(spec, impl="dpo_lib", levers_off=[spec["lever"]]) if spec.get("lever") else
            dict(spec, impl="trl"), "dpo_lib": dict(spec, impl="dpo_lib", levers_off=[])}
    with tempfile.TemporaryDirectory(prefix="dpo_lib-bench-") as tmp:
        for r in range(repeats):
            for impl, arm in arms.items():
                res = _spawn(arm, Path(tmp), sum(len(v) for v in runs.values()))
                runs[impl].append(res)
                print(f"[bench] run {r + 1}/{repeats} {impl:<7}: {res['tokens_per_second']:8.1f} tokens/s, "
                      f"{res['seconds_per_step']:.2f} s/step, peak {_fmt_bytes(res['peak_memory_bytes'])}, "
                      f"total {res['total_seconds']:.1f} s", flush=True)
    return runs


def _fp32_losses(spec: dict) -> list[float]:
    """The per-step losses of one float32 ``dpo_lib`` run on the same pairs: the trajectory a bf16 run rounds
    (float32 ``dpo_lib`` and TRL agree on it to ~1e-6)."""
    with tempfile.TemporaryDirectory(prefix="dpo_lib-bench-") as tmp:
        res = _spawn(dict(spec, impl="dpo_lib", dtype="fp32", levers_off=[]), Path(tmp), 0)
    print(f"[bench] float32 run for the bf16 loss check: losses {', '.join(f'{x:.4f}' for x in res['losses'])}")
    return res["losses"]


SUMMARY_KEYS = ("tokens_per_second", "seconds_per_step", "peak_memory_bytes", "total_seconds",
                "end_to_end_tokens_per_second", "prep_seconds", "reference_seconds", "model_flops_per_second",
                "cpu_seconds_per_step", "tokens_per_cpu_second")
WHAT_IS_TIMED = (
    "model loading excluded for both (TRL: policy and reference); counted: everything after it. "
    "tokens_per_second = tokens of steps 2..N / (their step time + the share of dpo_lib's "
    "reference precompute spent on their pairs); TRL runs its reference inside each step. "
    "seconds_per_step excludes the first (warm-up) step; total_seconds = prep (tokenization, "
    "reference precompute, trainer construction) + every step.")


def _summary(runs: dict[str, list[dict]], peak: float) -> dict[str, dict]:
    """The median of each of :data:`SUMMARY_KEYS` over the runs of each trainer, and its MFU."""
    summary = {impl: {k: statistics.median(run[k] for run in runs[impl]) for k in SUMMARY_KEYS} for impl in runs}
    for impl in summary:
        summary[impl]["mfu"] = summary[impl]["model_flops_per_second"] / peak
    return summary


def _result(args, spec: dict, dataset: Path, machine: dict, runs: dict, peak: float, peak_source: str,
            fp32_losses: list[float] | None = None) -> dict:
    """The JSON report: settings, versions, per-trainer medians, the ratios and the loss check (in bf16: each
    arm against ``fp32_losses``)."""
    from dpo_lib.logger import package_versions

    summary, base = _summary(runs, peak), _baseline(spec)
    t, d = summary[base], summary["dpo_lib"]
    diffs = [abs(a - b) for dr in runs["dpo_lib"] for tr in runs[base] for a, b in zip(dr["losses"], tr["losses"])]
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": machine, "versions": package_versions(BENCH_PACKAGES),
        "settings": {"model": args.model or "SmolLM2-135M-Instruct (embedded)", "dataset": str(dataset),
                     "pairs": args.steps * args.batch_size, "steps": args.steps, "batch_size": args.batch_size,
                     "dpo_lib_micro_batch_size": spec["micro_batch_size"], "max_length": args.max_length,
                     "learning_rate": args.learning_rate, "beta": args.beta, "repeats": args.repeats,
                     "device": spec["device"], "dtype": args.dtype, "attention": spec["attention"],
                     "threads": spec["threads"],
                     "order": f"alternating: {base}, dpo_lib, ...", "lever": spec.get("lever")},
        "what_is_timed": WHAT_IS_TIMED,
        "dpo_lib_levers": ["reference log-probs precomputed by the policy itself before training (no second model)",
                           "pairs sorted by length into micro-batches (less padding, same loss)",
                           "LM head only on scored positions (compact_lm_head), fused log-softmax gather",
                           "one row [prompt | chosen | rejected] per pair: the prompt once (shared_prompt)",
                           "those rows end to end, no padding, for the linear layers; attention pair by pair "
                           "(padding_free)",
                           "a sparse gradient for the tied input embedding (sparse_embedding_grad)"],
        "baseline": base, base: t, "dpo_lib": d,
        "throughput_ratio": d["tokens_per_second"] / t["tokens_per_second"],
        "end_to_end_ratio": t["total_seconds"] / d["total_seconds"],
        "cpu_time_throughput_ratio": d["tokens_per_cpu_second"] / t["tokens_per_cpu_second"],
        "per_repeat_throughput_ratios": [dr["tokens_per_second"] / tr["tokens_per_second"]
                                         for tr, dr in zip(runs[base], runs["dpo_lib"])],
        "peak_memory_ratio": d["peak_memory_bytes"] / t["peak_memory_bytes"],
        "peak_memory_kind": ("torch.cuda.max_memory_allocated" if spec["device"] == "cuda"
                             else "ru_maxrss of the run's process"),
        "peak_flops": peak, "peak_flops_source": peak_source,
        "mfu_definition": ("model FLOPs of DPO per step (policy 6N per token + 6dV per scored token, reference "
                           "2N + 2dV: dpo_lib.tools.flops), the same for both trainers, over the time of "
                           "tokens_per_second"),
        "losses": {base: runs[base][0]["losses"], "dpo_lib": runs["dpo_lib"][0]["losses"]},
        "loss_max_abs_diff": max(diffs) if diffs else float("nan"),
        "loss_tolerance": LOSS_TOLERANCE[spec["dtype"]],
        "same_tokens": len({run["tokens_hash"] for rs in runs.values() for run in rs}) == 1,
        "runs": runs,
    }
    if fp32_losses is None:
        result["loss_within_tolerance"] = result["loss_max_abs_diff"] <= result["loss_tolerance"]
    else:   # bf16: each arm against the float32 trajectory it rounds; the two arms' difference is reported only
        result["fp32_losses"] = fp32_losses
        vs = {impl: max(abs(a - b) for run in rs for a, b in zip(run["losses"], fp32_losses))
              for impl, rs in runs.items()}
        result["loss_max_abs_diff_vs_fp32"] = vs
        result["loss_within_tolerance"] = max(vs.values()) <= result["loss_tolerance"]
    if hasattr(os, "getloadavg"):
        result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return result


def _print_report(result: dict) -> None:
    base = result["baseline"]
    t, d, name = result[base], result["dpo_lib"], "TRL" if base == "trl" else base
    print(f"\n{'':<28}{name:>14}{'dpo_lib':>14}{'ratio':>10}")
    print(f"{'tokens/s (steps 2..N)':<28}{t['tokens_per_second']:>14.1f}{d['tokens_per_second']:>14.1f}"
          f"{result['throughput_ratio']:>10.2f}")
    print(f"{'seconds/step (steps 2..N)':<28}{t['seconds_per_step']:>14.2f}{d['seconds_per_step']:>14.2f}")
    print(f"{'tokens per CPU-second':<28}{t['tokens_per_cpu_second']:>14.1f}{d['tokens_per_cpu_second']:>14.1f}"
          f"{result['cpu_time_throughput_ratio']:>10.2f}")
    print(f"{'total seconds (after load)':<28}{t['total_seconds']:>14.1f}{d['total_seconds']:>14.1f}"
          f"{result['end_to_end_ratio']:>10.2f}")
    print(f"{'peak memory':<28}{_fmt_bytes(t['peak_memory_bytes']):>14}{_fmt_bytes(d['peak_memory_bytes']):>14}"
          f"{result['peak_memory_ratio']:>10.2f}")
    print(f"{'MFU':<28}{t['mfu']:>14.1%}{d['mfu']:>14.1%}   (peak {result['peak_flops'] / 1e9:,.0f} GFLOP/s, "
          f"{result['peak_flops_source']})")
    print("throughput ratio per repeat: " + ", ".join(f"{x:.2f}" for x in result["per_repeat_throughput_ratios"]))
    verdict = "ok" if result["loss_within_tolerance"] else "EXCEEDED"
    if "loss_max_abs_diff_vs_fp32" in result:
        vs = result["loss_max_abs_diff_vs_fp32"]
        print(f"loss trajectories: max |bf16 - fp32| {name} {vs[base]:.2e}, dpo_lib {vs['dpo_lib']:.2e} (tolerance "
              f"{result['loss_tolerance']:g} each: {verdict}); max |dpo_lib - {name}| = "
              f"{result['loss_max_abs_diff']:.2e}; same tokens: {result['same_tokens']}")
    else:
        print(f"loss trajectories: max |dpo_lib - {name}| = {result['loss_max_abs_diff']:.2e} "
              f"(tolerance {result['loss_tolerance']:g}: {verdict}); same tokens: {result['same_tokens']}")
    print("timed: " + result["what_is_timed"])


def main(args) -> int:
    if args.vs == "generate":
        from dpo_lib.tools.bench.sampling import main as sampling_main
        return sampling_main(args)
    prepared = _prepare(args)
    if isinstance(prepared, int):
        return prepared
    spec, dataset, skipped = prepared
    device, threads, need = spec["device"], spec["threads"], args.steps * args.batch_size
    machine = _machine(device)
    print(f"[bench] {need} pairs of {dataset} ({skipped} longer than {args.max_length} tokens skipped), "
          f"{args.steps} steps x {args.batch_size} pairs, {spec.pop('tokens')} tokens per run; "
          f"{device}/{args.dtype}, {spec['attention']} attention, {threads} threads; "
          f"load average {machine.get('load_average_at_start')}")
    cpu_peak_before = None
    if device == "cpu" and not args.peak_flops:
        from dpo_lib.tools.flops import measure_cpu_peak_flops
        cpu_peak_before = measure_cpu_peak_flops(threads=threads)
    runs = _run_alternating(spec, args.repeats)
    fp32_losses = _fp32_losses(spec) if spec["dtype"] == "bf16" else None
    peak, peak_source = _peak_flops(args, device, threads, before=cpu_peak_before)
    result = _result(args, spec, dataset, machine, runs, peak, peak_source, fp32_losses)
    _print_report(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        print(f"[bench] wrote {args.json}")
    return 0
