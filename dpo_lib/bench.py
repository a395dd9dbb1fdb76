r"""``python -m dpo_lib bench --vs trl``: dpo_lib's DPOTrainer against TRL's, on the same work.

What is compared. The same model (default: the embedded SmolLM2-135M-Instruct) is trained
from the same weights on the same preference pairs (default: the bundled sentiment pairs,
``data/sentiment/train.jsonl``, or ``data/assistant/train.jsonl`` when that file is missing),
with the same optimizer steps: ``--steps`` steps of ``--batch-size`` pairs, pairs taken in
file order by both (TRL: ``train_sampling_strategy="sequential"``), AdamW at a constant
learning rate, gradient clipping at 1, β = 0.1, sigmoid loss. Only pairs whose full
tokenization fits ``--max-length`` are used, so neither trainer truncates and both score
exactly the same tokens (checked: ``same_tokens`` in the output compares a hash of the
token ids each trainer built).

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
that the updates carry forward; ``loss_tolerance`` (1e-4) is the bound we expect.

Micro-batches: with one CPU thread dpo_lib uses micro-batches of 2 length-sorted pairs (least
padding); with several threads, and on a GPU, the whole batch in one forward: on a machine
shared with other jobs every parallel kernel waits for all of its threads, and many small
kernels then lose more time than the padding costs.

GPU: ``--device cuda --dtype bf16`` runs both with bf16 autocast on fp32 master weights
(TRL ``bf16=True``; dpo_lib through ``accelerate.Accelerator(mixed_precision="bf16")``).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LOSS_TOLERANCE = 1e-4
REPO_DATA = Path(__file__).resolve().parent.parent / "data"


def default_dataset() -> Path:
    sentiment = REPO_DATA / "sentiment" / "train.jsonl"
    return sentiment if sentiment.is_file() else REPO_DATA / "assistant" / "train.jsonl"


def add_arguments(p) -> None:
    p.add_argument("--vs", default="trl", choices=["trl"], help="what to compare with (default: %(default)s)")
    p.add_argument("--json", type=Path, default=None, help="write the results to this JSON file")
    p.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dataset", type=Path, default=None,
                   help="preference JSONL (default: data/sentiment/train.jsonl, else data/assistant/train.jsonl)")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per run")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per optimizer step")
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help="dpo_lib pairs per forward (default: 2 with --threads 1, else the whole batch)")
    p.add_argument("--max-length", type=int, default=160, help="tokens per prompt+response; longer pairs are skipped")
    p.add_argument("--repeats", type=int, default=2, help="runs of each trainer, alternating")
    p.add_argument("--learning-rate", type=float, default=1e-5)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per run (default: all cores)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast, fp32 master weights")
    p.add_argument("--peak-flops", type=float, default=None,
                   help="peak FLOP/s for MFU (default: the GPU's data sheet, or a timed matmul on the CPU)")


# ----------------------------------------------------------------------------- helpers

def tokens_hash(features: list[dict]) -> str:
    h = hashlib.sha256()
    for f in features:
        h.update(json.dumps([list(f["prompt_ids"]), list(f["chosen_ids"]), list(f["rejected_ids"])]).encode())
    return h.hexdigest()[:16]


def pair_tokens(f: dict) -> int:
    """Non-padding tokens of one pair in the concatenated batch: prompt+chosen and prompt+rejected."""
    return 2 * len(f["prompt_ids"]) + len(f["chosen_ids"]) + len(f["rejected_ids"])


def peak_memory_bytes(device: str) -> int:
    if device == "cuda":
        import torch
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def select_rows(tokenizer, rows: list[dict], n: int, max_length: int) -> tuple[list[dict], list[dict], int]:
    """The first ``n`` rows whose untruncated pair fits ``max_length`` (so no trainer truncates)."""
    from .data import tokenize_rows

    features, _ = tokenize_rows(tokenizer, rows)
    keep_rows, keep_feats, skipped = [], [], 0
    for row, f in zip(rows, features):
        if len(f["prompt_ids"]) + max(len(f["chosen_ids"]), len(f["rejected_ids"])) <= max_length:
            keep_rows.append(row)
            keep_feats.append(f)
        else:
            skipped += 1
        if len(keep_rows) == n:
            break
    return keep_rows, keep_feats, skipped


# ----------------------------------------------------------------------------- the children

def _sync(device: str) -> None:
    if device == "cuda":
        import torch
        torch.cuda.synchronize()


def _autocast(spec: dict):
    import torch
    from contextlib import nullcontext
    if spec["dtype"] == "bf16":
        return torch.autocast(spec["device"], dtype=torch.bfloat16)
    return nullcontext()


class PolicyAsReference:
    """The policy before its first update *is* π_ref: score batches with it under ``no_grad``
    in eval mode (compact LM head), so no second copy of the weights is ever made."""

    def __init__(self, model, spec: dict):
        self.model, self.spec = model, spec

    def __call__(self, batch: dict):
        import torch
        from .logprobs import concatenated_forward
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), _autocast(self.spec):
                batch = {k: v.to(self.spec["device"]) for k, v in batch.items()}
                chosen, rejected = concatenated_forward(self.model, batch, compact_head=True)
                return chosen.float().cpu(), rejected.float().cpu()
        finally:
            self.model.train(was_training)


def run_dpo_lib(spec: dict, model, tokenizer) -> dict:
    from .data import tokenize_rows
    from .reference import precompute_reference_logps
    from .trainer import DPOTrainer, TrainConfig

    pad = tokenizer.pad_token_id
    t0 = time.perf_counter()
    features, _ = tokenize_rows(tokenizer, spec["rows"], max_length=spec["max_length"])
    t_ref, c_ref = time.perf_counter(), time.process_time()
    order = sorted(range(len(features)), key=lambda i: (len(features[i]["prompt_ids"]) +
                                                         max(len(features[i]["chosen_ids"]),
                                                             len(features[i]["rejected_ids"])), i))
    scored = precompute_reference_logps(PolicyAsReference(model, spec), [features[i] for i in order], pad,
                                        batch_size=spec["batch_size"])
    features = [None] * len(order)
    for i, f in zip(order, scored):
        features[i] = f
    reference_seconds = time.perf_counter() - t_ref
    reference_cpu_seconds = time.process_time() - c_ref
    micro = spec["micro_batch_size"]
    config = TrainConfig(beta=spec["beta"], learning_rate=spec["learning_rate"], batch_size=spec["batch_size"],
                         grad_accum=spec["batch_size"] // micro, max_steps=spec["steps"], warmup_ratio=0.0,
                         schedule="constant", weight_decay=0.0, max_grad_norm=1.0, seed=spec["seed"],
                         print_every=0, shuffle=False, sort_by_length=True, compact_lm_head=True)
    accelerator = None
    if spec["device"] == "cuda" or spec["dtype"] == "bf16":
        from accelerate import Accelerator
        accelerator = Accelerator(cpu=spec["device"] == "cpu",
                                  mixed_precision="bf16" if spec["dtype"] == "bf16" else "no")
    trainer = DPOTrainer(model, features, config, pad_token_id=pad, accelerator=accelerator)
    _sync(spec["device"])
    prep_seconds = time.perf_counter() - t0
    stamps, cpu, losses = [time.perf_counter()], [time.process_time()], []
    for _ in range(spec["steps"]):
        m = trainer.train_step()
        _sync(spec["device"])
        stamps.append(time.perf_counter())
        cpu.append(time.process_time())
        losses.append(m["loss"])
    return {"prep_seconds": prep_seconds, "reference_seconds": reference_seconds,
            "reference_cpu_seconds": reference_cpu_seconds,
            "step_seconds": [b - a for a, b in zip(stamps, stamps[1:])],
            "step_cpu_seconds": [b - a for a, b in zip(cpu, cpu[1:])], "losses": losses,
            "tokens_hash": tokens_hash(features), "step_tokens": _step_tokens(features, spec),
            "step_scored_tokens": _step_tokens(features, spec, scored=True)}


def _step_tokens(features: list[dict], spec: dict, scored: bool = False) -> list[int]:
    bs = spec["batch_size"]
    count = (lambda f: len(f["chosen_ids"]) + len(f["rejected_ids"])) if scored else pair_tokens
    return [sum(count(f) for f in features[s * bs:(s + 1) * bs]) for s in range(spec["steps"])]


def run_trl(spec: dict, model, tokenizer, ref_model) -> dict:
    import shutil

    import datasets
    import trl
    from transformers import TrainerCallback

    stamps: list[float] = []
    cpu: list[float] = []

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            _sync(spec["device"])
            stamps.append(time.perf_counter())
            cpu.append(time.process_time())

        def on_step_end(self, args, state, control, **kw):
            _sync(spec["device"])
            stamps.append(time.perf_counter())
            cpu.append(time.process_time())

    tmp = tempfile.mkdtemp(prefix="dpo_lib-bench-trl-")
    args = trl.DPOConfig(
        output_dir=tmp, per_device_train_batch_size=spec["batch_size"], gradient_accumulation_steps=1,
        max_steps=spec["steps"], learning_rate=spec["learning_rate"], lr_scheduler_type="constant", warmup_steps=0,
        beta=spec["beta"], loss_type=["sigmoid"], max_length=spec["max_length"], logging_steps=1, report_to="none",
        save_strategy="no", seed=spec["seed"], max_grad_norm=1.0, weight_decay=0.0, optim="adamw_torch",
        disable_tqdm=True, use_cpu=spec["device"] == "cpu", bf16=spec["dtype"] == "bf16",
        train_sampling_strategy="sequential", dataloader_num_workers=0)
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in spec["rows"]]
    t0 = time.perf_counter()
    trainer = trl.DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tokenizer, callbacks=[StepTimer()])
    prep_seconds = time.perf_counter() - t0
    trainer.train()
    shutil.rmtree(tmp, ignore_errors=True)
    features = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    return {"prep_seconds": prep_seconds, "reference_seconds": 0.0, "reference_cpu_seconds": 0.0,
            "step_seconds": [b - a for a, b in zip(stamps, stamps[1:])],
            "step_cpu_seconds": [b - a for a, b in zip(cpu, cpu[1:])], "losses": losses,
            "tokens_hash": tokens_hash(features), "step_tokens": _step_tokens(features, spec),
            "step_scored_tokens": _step_tokens(features, spec, scored=True)}


def child(spec: dict) -> dict:
    """One run of one trainer, in this (fresh) process."""
    import torch

    from .models import load_model
    from .perf import dpo_step_flops, model_shape

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    if spec["impl"] == "trl":  # import before the baseline below, like dpo_lib's modules already are
        import datasets  # noqa: F401
        import trl  # noqa: F401
    t0 = time.perf_counter()
    model, tokenizer = load_model(spec["model"], device=spec["device"])
    ref_model = load_model(spec["model"], device=spec["device"])[0] if spec["impl"] == "trl" else None
    load_seconds = time.perf_counter() - t0
    rss_after_load = current_rss_bytes()
    if spec["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()  # weights stay allocated, so they are in the peak
    out = run_trl(spec, model, tokenizer, ref_model) if spec["impl"] == "trl" else run_dpo_lib(spec, model, tokenizer)
    steps = out["step_seconds"]
    tokens = out["step_tokens"]
    warm = steps[1:] or steps
    warm_tokens = tokens[1:] or tokens
    ref_share = out["reference_seconds"] * sum(warm_tokens) / max(sum(tokens), 1)
    warm_cpu = out["step_cpu_seconds"][1:] or out["step_cpu_seconds"]
    ref_cpu_share = out["reference_cpu_seconds"] * sum(warm_tokens) / max(sum(tokens), 1)
    # model FLOPs of the DPO algorithm (policy forward+backward, reference forward), the same for both trainers
    shape = model_shape(model)
    warm_scored = out["step_scored_tokens"][1:] or out["step_scored_tokens"]
    flops = dpo_step_flops(shape, sum(warm_tokens), sum(warm_scored), reference="live")["total"]
    out.update({
        "impl": spec["impl"], "load_seconds_excluded": load_seconds,
        "seconds_per_step": statistics.fmean(warm),
        "tokens_per_second": sum(warm_tokens) / (sum(warm) + ref_share),
        "cpu_seconds_per_step": statistics.fmean(warm_cpu),
        "tokens_per_cpu_second": sum(warm_tokens) / (sum(warm_cpu) + ref_cpu_share),
        "total_seconds": out["prep_seconds"] + sum(steps),
        "end_to_end_tokens_per_second": sum(tokens) / (out["prep_seconds"] + sum(steps)),
        "tokens": sum(tokens),
        "model_flops_per_second": flops / (sum(warm) + ref_share),
        "non_embedding_params": shape.non_embedding_params,
        "peak_memory_bytes": peak_memory_bytes(spec["device"]),
        "rss_after_load_bytes": rss_after_load,
        "threads": torch.get_num_threads(),
    })
    return out


# ----------------------------------------------------------------------------- the parent

def _versions() -> dict:
    from importlib import metadata
    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "trl", "accelerate", "datasets"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


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
    done = subprocess.run([sys.executable, "-m", "dpo_lib.bench", "--child", str(spec_file), str(out_file)],
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

        from .perf import measure_matmul_flops, peak_flops
        name = torch.cuda.get_device_name(0)
        peak = peak_flops(name)
        if peak:
            return peak, f"data sheet, {name}"
        return measure_matmul_flops(8192, dtype=torch.bfloat16, device="cuda"), f"timed bf16 matmul, {name}"
    from .perf import measure_cpu_peak_flops
    best = max(measure_cpu_peak_flops(threads=threads), before or 0.0)
    return best, f"timed float32 1024x1024 matmul, {threads} threads, best of before/after the runs"


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def main(args) -> int:
    from .data import load_preferences
    from .models import load_tokenizer

    dataset = args.dataset or default_dataset()
    device = args.device
    if device == "cuda":
        import torch
        if not torch.cuda.is_available():
            print("error: --device cuda but no CUDA GPU is visible", file=sys.stderr)
            return 2
    threads = args.threads or os.cpu_count() or 1
    # one CPU thread: micro-batches of 2 length-sorted pairs (least padding); several threads or a GPU: the
    # whole batch in one forward (fewer, larger kernels; on a busy machine every parallel kernel waits for
    # all of its threads, so many small ones lose more than the padding costs)
    micro = args.micro_batch_size or (2 if device == "cpu" and threads == 1 else args.batch_size)
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
    spec = {"model": args.model, "rows": rows, "steps": args.steps, "batch_size": args.batch_size,
            "micro_batch_size": micro, "max_length": args.max_length, "learning_rate": args.learning_rate,
            "beta": args.beta, "seed": args.seed, "threads": threads, "device": device, "dtype": args.dtype}
    machine = _machine(device)
    print(f"[bench] {need} pairs of {dataset} ({skipped} longer than {args.max_length} tokens skipped), "
          f"{args.steps} steps x {args.batch_size} pairs, {sum(pair_tokens(f) for f in features)} tokens per run; "
          f"{device}/{args.dtype}, {threads} threads; load average {machine.get('load_average_at_start')}")
    cpu_peak_before = None
    if device == "cpu" and not args.peak_flops:
        from .perf import measure_cpu_peak_flops
        cpu_peak_before = measure_cpu_peak_flops(threads=threads)
    runs: dict[str, list[dict]] = {"trl": [], "dpo_lib": []}
    with tempfile.TemporaryDirectory(prefix="dpo_lib-bench-") as tmp:
        for r in range(args.repeats):
            for impl in ("trl", "dpo_lib"):
                res = _spawn(dict(spec, impl=impl), Path(tmp), len(runs["trl"]) + len(runs["dpo_lib"]))
                runs[impl].append(res)
                print(f"[bench] run {r + 1}/{args.repeats} {impl:<7}: {res['tokens_per_second']:8.1f} tokens/s, "
                      f"{res['seconds_per_step']:.2f} s/step, peak {_fmt_bytes(res['peak_memory_bytes'])}, "
                      f"total {res['total_seconds']:.1f} s", flush=True)

    def med(impl, key):
        return statistics.median(run[key] for run in runs[impl])

    summary = {impl: {k: med(impl, k) for k in ("tokens_per_second", "seconds_per_step", "peak_memory_bytes",
                                                 "total_seconds", "end_to_end_tokens_per_second", "prep_seconds",
                                                 "reference_seconds", "model_flops_per_second",
                                                 "cpu_seconds_per_step", "tokens_per_cpu_second")} for impl in runs}
    peak, peak_source = _peak_flops(args, device, threads, before=cpu_peak_before)
    for impl in summary:
        summary[impl]["mfu"] = summary[impl]["model_flops_per_second"] / peak
    diffs = [abs(a - b) for d in runs["dpo_lib"] for t in runs["trl"] for a, b in zip(d["losses"], t["losses"])]
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": machine, "versions": _versions(),
        "settings": {"model": args.model or "SmolLM2-135M-Instruct (embedded)", "dataset": str(dataset),
                     "pairs": need, "steps": args.steps, "batch_size": args.batch_size,
                     "dpo_lib_micro_batch_size": micro, "max_length": args.max_length,
                     "learning_rate": args.learning_rate, "beta": args.beta, "repeats": args.repeats,
                     "device": device, "dtype": args.dtype, "threads": threads, "order": "alternating: trl, dpo_lib, ..."},
        "what_is_timed": ("model loading excluded for both (TRL: policy and reference); counted: everything after it. "
                          "tokens_per_second = tokens of steps 2..N / (their step time + the share of dpo_lib's "
                          "reference precompute spent on their pairs); TRL runs its reference inside each step. "
                          "seconds_per_step excludes the first (warm-up) step; total_seconds = prep (tokenization, "
                          "reference precompute, trainer construction) + every step."),
        "dpo_lib_levers": ["reference log-probs precomputed by the policy itself before training (no second model)",
                           "pairs sorted by length into micro-batches (less padding, same loss)",
                           "LM head only on scored positions (compact_lm_head), fused log-softmax gather"],
        "trl": summary["trl"], "dpo_lib": summary["dpo_lib"],
        "throughput_ratio": summary["dpo_lib"]["tokens_per_second"] / summary["trl"]["tokens_per_second"],
        "end_to_end_ratio": summary["trl"]["total_seconds"] / summary["dpo_lib"]["total_seconds"],
        "cpu_time_throughput_ratio": summary["dpo_lib"]["tokens_per_cpu_second"] / summary["trl"]["tokens_per_cpu_second"],
        "per_repeat_throughput_ratios": [d["tokens_per_second"] / t["tokens_per_second"]
                                         for t, d in zip(runs["trl"], runs["dpo_lib"])],
        "peak_memory_ratio": summary["dpo_lib"]["peak_memory_bytes"] / summary["trl"]["peak_memory_bytes"],
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if device == "cuda" else "ru_maxrss of the run's process",
        "peak_flops": peak, "peak_flops_source": peak_source,
        "mfu_definition": ("model FLOPs of DPO per step (policy 6N per token + 6dV per scored token, reference "
                           "2N + 2dV: dpo_lib.perf), the same for both trainers, over the time of tokens_per_second"),
        "losses": {"trl": runs["trl"][0]["losses"], "dpo_lib": runs["dpo_lib"][0]["losses"]},
        "loss_max_abs_diff": max(diffs) if diffs else float("nan"),
        "loss_tolerance": LOSS_TOLERANCE,
        "same_tokens": len({run["tokens_hash"] for rs in runs.values() for run in rs}) == 1,
        "runs": runs,
    }
    result["loss_within_tolerance"] = result["loss_max_abs_diff"] <= LOSS_TOLERANCE
    if hasattr(os, "getloadavg"):
        result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]

    t, d = summary["trl"], summary["dpo_lib"]
    print(f"\n{'':<28}{'TRL':>14}{'dpo_lib':>14}{'ratio':>10}")
    print(f"{'tokens/s (steps 2..N)':<28}{t['tokens_per_second']:>14.1f}{d['tokens_per_second']:>14.1f}"
          f"{result['throughput_ratio']:>10.2f}")
    print(f"{'seconds/step (steps 2..N)':<28}{t['seconds_per_step']:>14.2f}{d['seconds_per_step']:>14.2f}")
    print(f"{'tokens per CPU-second':<28}{t['tokens_per_cpu_second']:>14.1f}{d['tokens_per_cpu_second']:>14.1f}"
          f"{result['cpu_time_throughput_ratio']:>10.2f}")
    print(f"{'total seconds (after load)':<28}{t['total_seconds']:>14.1f}{d['total_seconds']:>14.1f}"
          f"{result['end_to_end_ratio']:>10.2f}")
    print(f"{'peak memory':<28}{_fmt_bytes(t['peak_memory_bytes']):>14}{_fmt_bytes(d['peak_memory_bytes']):>14}"
          f"{result['peak_memory_ratio']:>10.2f}")
    print(f"{'MFU':<28}{t['mfu']:>14.1%}{d['mfu']:>14.1%}   (peak {peak / 1e9:,.0f} GFLOP/s, {peak_source})")
    print("throughput ratio per repeat: " + ", ".join(f"{x:.2f}" for x in result["per_repeat_throughput_ratios"]))
    print(f"loss trajectories: max |dpo_lib - TRL| = {result['loss_max_abs_diff']:.2e} "
          f"(tolerance {LOSS_TOLERANCE:g}: {'ok' if result['loss_within_tolerance'] else 'EXCEEDED'}); "
          f"same tokens: {result['same_tokens']}")
    print("timed: " + result["what_is_timed"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        print(f"[bench] wrote {args.json}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        spec = json.loads(Path(sys.argv[2]).read_text())
        Path(sys.argv[3]).write_text(json.dumps(child(spec)))
        sys.exit(0)
    print("usage: python -m dpo_lib bench --vs trl [--json FILE] (see --help)", file=sys.stderr)
    sys.exit(2)
