"""The main job: DPO on a preference file, evaluated before and after, with every artifact on disk.

``python -m dpo_lib train`` calls :func:`run`. Steps:

1. load the policy (default: the embedded SmolLM2-135M-Instruct) and the data;
2. keep a frozen copy as the reference and precompute its log-probs on train and held-out
   pairs once (cached), so training needs one forward per step;
3. before training: sample completions on held-out prompts and score them with the
   ground-truth reward (``reward_before``);
4. train (:class:`dpo_lib.trainer.DPOTrainer`);
5. after: held-out implicit-reward accuracy, ``reward_after``, win rate against the
   reference samples, KL to the reference, a side-by-side table;
6. write ``metrics.jsonl``, ``summary.json``, ``samples.md``, plots, ``run_card.json``, and the
   final weights as safetensors in ``OUT/final/``.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import asdict, replace
from importlib import metadata
from pathlib import Path

import torch

from . import data as D
from .evaluation import implicit_reward_accuracy, mean_and_se, sequence_kl, side_by_side, win_rate
from .models import autocast, load_model, resolve_precision
from .plots import plot_training
from .reference import FrozenReference, model_fingerprint, precompute_reference_logps
from .sampling import generate
from .trainer import DPOTrainer, TrainConfig

REPO_DATA = Path(__file__).resolve().parent.parent / "data"
DEFAULT_TRAIN = REPO_DATA / "sentiment" / "train.jsonl"
DEFAULT_TEST = REPO_DATA / "sentiment" / "test.jsonl"


def versions() -> dict:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("dpo_lib", "torch", "transformers", "trl", "peft", "safetensors", "gguf", "vaderSentiment"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def prompt_text(prompt) -> str:
    return prompt[-1]["content"] if isinstance(prompt, list) else prompt


def run(out: Path, model_name=None, dataset: Path = DEFAULT_TRAIN, eval_dataset: Path | None = DEFAULT_TEST,
        config: TrainConfig = TrainConfig(), reward: str | None = "sentiment", max_length: int = 160,
        max_prompt_length: int | None = 64, eval_samples: int = 2, max_new_tokens: int = 40,
        max_eval_prompts: int = 64, skip_invalid: bool = False, resume: bool = False,
        trust_remote_code: bool = False, kill_after_save: int | None = None) -> dict:
    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    # one precision for every forward of the job: the reference log-probs, the evaluations and the
    # samples use the same autocast as training, so the untrained policy's implicit rewards are exactly 0
    config = replace(config, precision=resolve_precision(config.precision, "cpu"))
    print(f"[dpo_lib] precision: {config.precision}" + (" (bf16 autocast: this CPU has bf16 matmul units; "
          "weights and optimizer stay float32; --precision fp32 to turn it off)" if config.precision == "bf16" else ""))

    train_rows, train_report = D.load_preferences(dataset, skip_invalid=skip_invalid)
    print(f"[dpo_lib] {train_report.summary()}")
    eval_rows = []
    if eval_dataset is not None:
        eval_rows, eval_report = D.load_preferences(eval_dataset, skip_invalid=skip_invalid)
        print(f"[dpo_lib] {eval_report.summary()}")

    # eager attention: on 2 CPU cores and ~80-token pairs, PyTorch's fused SDPA backward is the slower
    # one (bf16 steps of 8 pairs: 3.9-4.2 s eager vs 4.6-5.1 s sdpa, measured 2026-11-21)
    model, tokenizer = load_model(model_name, trust_remote_code=trust_remote_code, attn_implementation="eager")
    pad = tokenizer.pad_token_id
    train_f, stats = D.tokenize_rows(tokenizer, train_rows, max_length, max_prompt_length)
    print(f"[dpo_lib] train: {stats.summary()}")
    eval_f, eval_stats = D.tokenize_rows(tokenizer, eval_rows, max_length, max_prompt_length) if eval_rows else ([], None)

    reference = FrozenReference(model)
    key = model_fingerprint(model)
    cache, ref_key = out / "cache", f"{key}-{config.precision}"
    with autocast(config.precision):
        train_f = precompute_reference_logps(reference, train_f, pad, cache_dir=cache, model_key=ref_key)
        eval_f = precompute_reference_logps(reference, eval_f, pad, cache_dir=cache, model_key=ref_key) if eval_f else []
    timings = {"load_and_reference_logps": time.perf_counter() - t_start}

    reward_fn = None
    if reward:
        from .rewards import get_reward
        reward_fn = get_reward(reward)
    eval_prompts = [r["prompt"] for r in eval_rows][:max_eval_prompts]
    summary: dict = {"model": model_name or "SmolLM2-135M-Instruct (embedded)", "dataset": str(dataset),
                     "train_pairs": len(train_f), "heldout_pairs": len(eval_f), "config": asdict(config)}

    t0 = time.perf_counter()
    ref_samples = []
    with autocast(config.precision):
        if eval_f:
            before = implicit_reward_accuracy(model, eval_f, pad, config.beta)
            summary["heldout_accuracy_before"] = before["accuracy"]
        if reward_fn and eval_prompts:
            ref_samples = generate(model, tokenizer, eval_prompts, n=eval_samples, max_new_tokens=max_new_tokens,
                                   seed=config.seed + 1)
            ref_rewards = reward_fn([s["text"] for s in ref_samples])
            summary["reward_before"], summary["reward_before_se"] = mean_and_se(ref_rewards)
    timings["evaluate_before"] = time.perf_counter() - t0

    trainer = DPOTrainer(model, train_f, config, pad_token_id=pad, out_dir=out)
    print(f"[dpo_lib] training {trainer.total_steps} steps of {config.batch_size} pairs "
          f"(beta={config.beta}, lr={config.learning_rate}, loss={config.loss_type})")
    t_train = time.perf_counter()
    history = trainer.train(resume=resume, kill_after_save=kill_after_save)
    train_seconds = time.perf_counter() - t_train
    if config.save_every:
        trainer.save_checkpoint()

    final = out / "final"
    model.save_pretrained(final, safe_serialization=True)
    tokenizer.save_pretrained(final)

    tokens = sum(m["num_tokens"] - (history[i - 1]["num_tokens"] if i else 0) for i, m in enumerate(history))
    step_time = sum(m["step_seconds"] for m in history)
    summary.update({"steps": len(history), "train_seconds": train_seconds,
                    "tokens_per_second": tokens / step_time if step_time else float("nan")})
    t0 = time.perf_counter()
    with autocast(config.precision):
        if eval_f:
            after = implicit_reward_accuracy(model, eval_f, pad, config.beta)
            summary.update({"heldout_accuracy_after": after["accuracy"],
                            "heldout_accuracy_after_se": after["accuracy_se"], "heldout_margin_after": after["margin"]})
        if reward_fn and eval_prompts:
            pol_samples = generate(model, tokenizer, eval_prompts, n=eval_samples, max_new_tokens=max_new_tokens,
                                   seed=config.seed + 1)
            summary["kl_to_reference"], summary["kl_to_reference_se"] = sequence_kl(model, reference.model,
                                                                                    pol_samples, pad)
    if reward_fn and eval_prompts:
        pol_rewards = reward_fn([s["text"] for s in pol_samples])
        summary["reward_after"], summary["reward_after_se"] = mean_and_se(pol_rewards)
        diffs = [a - b for a, b in zip(pol_rewards, ref_rewards)]
        summary["reward_gain"], summary["reward_gain_se"] = mean_and_se(diffs)
        summary["win_rate"], summary["win_rate_se"] = win_rate(pol_rewards, ref_rewards)
        table = side_by_side([prompt_text(eval_prompts[s["prompt_index"]]) for s in ref_samples],
                             [s["text"] for s in ref_samples], [s["text"] for s in pol_samples],
                             ref_rewards, pol_rewards, k=8)
        (out / "samples.md").write_text("# Held-out prompts: reference vs DPO policy\n\n" + table + "\n")
    timings["evaluate_after"] = time.perf_counter() - t0
    summary["total_seconds"] = time.perf_counter() - t_start
    summary["phase_seconds"] = {**timings, "train": train_seconds}

    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    plot_training(history, out)
    card = {"command": " ".join(sys.argv), "seed": config.seed, "data_sha256_16": D.data_hash(train_rows),
            "heldout_data_sha256_16": D.data_hash(eval_rows) if eval_rows else None,
            "model_fingerprint": key, "versions": versions(), "config": asdict(config),
            "max_length": max_length, "max_prompt_length": max_prompt_length, "tokenize": stats.summary(),
            "threads": torch.get_num_threads()}
    (out / "run_card.json").write_text(json.dumps(card, indent=1))
    return summary
