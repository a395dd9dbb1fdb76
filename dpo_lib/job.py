"""The main job: DPO on a preference file, evaluated before and after, with every artifact on disk.

``python -m dpo_lib train`` calls :func:`run`: load → evaluate → train → evaluate → write.

* load: the policy (default: the embedded SmolLM2-135M-Instruct) and the data; a frozen copy
  of the policy is the reference, and its log-probs on the training and held-out pairs are
  computed once (cached in ``OUT/cache``), so training needs one forward per step (with a
  reference-free loss, ``simpo`` or ``orpo``, only the held-out pairs': the evaluation's
  implicit-reward accuracy and KL are DPO's, measured against the reference for every loss);
* evaluate (:func:`evaluate`, the same code before and after training): held-out
  implicit-reward accuracy (DPO Eq. 5), samples on held-out prompts scored by the ground-truth
  reward, and after training the KL of the policy to the reference;
* train: :class:`dpo_lib.trainer.DPOTrainer`;
* write: ``summary.json`` (paired reward gain, win rate, KL), ``samples.md``, the plots,
  ``run_card.json`` and the final weights as safetensors in ``OUT/final/``.

One run per output folder: :func:`claim_folder` holds an OS lock on ``OUT/.lock`` for the
whole run (a killed run's lock goes with its process), and ``--resume`` refuses settings that
differ from the run card of the run it continues (:func:`resume_conflicts`).
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from dpo_lib import data as D
from dpo_lib.config import DEFAULT_TEST, DEFAULT_TRAIN, REPO_DATA, JobConfig, TrainConfig  # noqa: F401 (re-exported)
from dpo_lib.evaluation import HeldoutEval, implicit_reward_accuracy, mean_and_se, sequence_kl, side_by_side, win_rate
from dpo_lib.features import tokenize_rows
from dpo_lib.logger import package_versions
from dpo_lib.losses import needs_reference
from dpo_lib.models import load_model
from dpo_lib.plots import plot_training
from dpo_lib.precision import autocast, resolve_precision
from dpo_lib.reference import FrozenReference, model_fingerprint, precompute_reference_logps
from dpo_lib.sampling import generate
from dpo_lib.trainer import DPOTrainer

# settings that do not change the trained weights: a resume may change them freely
RESUME_FREE = {"print_every", "save_every", "keep_checkpoints", "out", "resume", "force_resume", "threads",
               "eval_every", "eval_samples", "max_eval_prompts", "max_new_tokens", "reward", "eval_dataset",
               "skip_invalid"}


class RunFolderBusy(RuntimeError):
    """Another live run writes to the same output folder."""


class ResumeMismatch(RuntimeError):
    """``--resume`` with settings that differ from the run being continued."""


def prompt_text(prompt) -> str:
    return prompt[-1]["content"] if isinstance(prompt, list) else prompt


def claim_folder(out: Path):
    """Create ``out`` and hold an exclusive lock on ``out/.lock`` until the returned file is closed
    (or the process dies: the OS drops the lock, so a killed run never leaves it stuck)."""
    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        pid = handle.read().strip() or "?"
        handle.close()
        raise RunFolderBusy(f"{out} is in use by another run (pid {pid}); wait for it, or choose another --out") \
            from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


@dataclass
class Setup:
    """What :func:`load` prepares: the model, tokenizer, frozen reference, features and prompts."""
    model: torch.nn.Module
    tokenizer: object
    reference: FrozenReference
    train_rows: list
    eval_rows: list
    train_features: list
    eval_features: list
    eval_prompts: list
    tokenize_summary: str
    model_key: str


def load(job: JobConfig, config: TrainConfig, out: Path) -> Setup:
    train_rows, report = D.load_preferences(job.dataset, skip_invalid=job.skip_invalid)
    print(f"[dpo_lib] {report.summary()}")
    eval_rows = []
    if job.eval_dataset is not None:
        eval_rows, eval_report = D.load_preferences(job.eval_dataset, skip_invalid=job.skip_invalid)
        print(f"[dpo_lib] {eval_report.summary()}")
    # eager attention: on 2 CPU cores and ~80-token pairs, PyTorch's fused SDPA backward is the slower
    # one (bf16 steps of 8 pairs: 3.9-4.2 s eager vs 4.6-5.1 s sdpa, measured 2026-11-21)
    model, tokenizer = load_model(job.model, trust_remote_code=job.trust_remote_code, attn_implementation="eager")
    pad = tokenizer.pad_token_id
    train_f, stats = tokenize_rows(tokenizer, train_rows, job.max_length, job.max_prompt_length)
    print(f"[dpo_lib] train: {stats.summary()}")
    eval_f = tokenize_rows(tokenizer, eval_rows, job.max_length, job.max_prompt_length)[0] if eval_rows else []
    reference = FrozenReference(model)
    key = model_fingerprint(model)
    cache, ref_key = out / "cache", f"{key}-{config.precision}"
    with autocast(config.precision):
        if needs_reference(config.loss_type):  # simpo and orpo never read them; the held-out ones are still needed
            train_f = precompute_reference_logps(reference, train_f, pad, cache_dir=cache, model_key=ref_key)
        if eval_f:
            eval_f = precompute_reference_logps(reference, eval_f, pad, cache_dir=cache, model_key=ref_key)
    prompts = [r["prompt"] for r in eval_rows][:job.max_eval_prompts]
    return Setup(model, tokenizer, reference, train_rows, eval_rows, train_f, eval_f, prompts, stats.summary(), key)


def evaluate(s: Setup, job: JobConfig, config: TrainConfig, reward_fn, with_kl: bool,
             accuracy: dict | None = None) -> dict:
    """Held-out implicit-reward accuracy (``accuracy``, when the training loop's last
    :class:`HeldoutEval` already measured it on the final weights), samples on the held-out prompts
    with their true rewards, and (``with_kl``) the sequence-level KL of the samples' policy to the
    reference."""
    result: dict = {}
    pad = s.tokenizer.pad_token_id
    with autocast(config.precision):
        if s.eval_features:
            result["accuracy"] = accuracy or implicit_reward_accuracy(s.model, s.eval_features, pad, config.beta)
        if reward_fn and s.eval_prompts:
            result["samples"] = generate(s.model, s.tokenizer, s.eval_prompts, n=job.eval_samples,
                                         max_new_tokens=job.max_new_tokens, seed=config.seed + 1)
            if with_kl:
                result["kl"] = sequence_kl(s.model, s.reference.model, result["samples"], pad)
    if "samples" in result:
        result["rewards"] = reward_fn([x["text"] for x in result["samples"]])
    return result


def summarize(before: dict, after: dict) -> dict:
    """The before/after figures of ``summary.json``; the reward gain and win rate are paired by sample."""
    out = {}
    if "accuracy" in before:
        acc = after["accuracy"]
        out.update({"heldout_accuracy_before": before["accuracy"]["accuracy"],
                    "heldout_accuracy_after": acc["accuracy"], "heldout_accuracy_after_se": acc["accuracy_se"],
                    "heldout_margin_after": acc["margin"]})
    if "rewards" in before:
        ref, pol = before["rewards"], after["rewards"]
        out["reward_before"], out["reward_before_se"] = mean_and_se(ref)
        out["reward_after"], out["reward_after_se"] = mean_and_se(pol)
        out["reward_gain"], out["reward_gain_se"] = mean_and_se([a - b for a, b in zip(pol, ref)])
        out["win_rate"], out["win_rate_se"] = win_rate(pol, ref)
        out["kl_to_reference"], out["kl_to_reference_se"] = after["kl"]
    return out


def run_card(s: Setup, job: JobConfig, config: TrainConfig) -> dict:
    return {"command": " ".join(sys.argv), "seed": config.seed, "data_sha256_16": D.data_hash(s.train_rows),
            "heldout_data_sha256_16": D.data_hash(s.eval_rows) if s.eval_rows else None,
            "model_fingerprint": s.model_key, "versions": package_versions(), "config": asdict(config),
            "job": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(job).items()},
            "max_length": job.max_length, "max_prompt_length": job.max_prompt_length,
            "tokenize": s.tokenize_summary, "threads": torch.get_num_threads()}


def resume_conflicts(old: dict, new: dict, sections: tuple[str, ...] = ("config", "job"),
                     free: set[str] = RESUME_FREE) -> list[str]:
    """The settings that change the result and differ between two run cards, as ``--flag OLD (now NEW)``
    (the settings of ``sections``, except those in ``free``, plus the data and model fingerprints)."""
    diffs = []
    for section in sections:
        for k, v in new.get(section, {}).items():
            if k not in free and k in old.get(section, {}) and old[section][k] != v:
                diffs.append(f"--{k.replace('_', '-')} {old[section][k]} (now {v})")
    for k, what in (("data_sha256_16", "the training data"), ("model_fingerprint", "the model")):
        if old.get(k) != new.get(k):
            diffs.append(f"{what} changed ({k} {old.get(k)} -> {new.get(k)})")
    return diffs


def _check_resume(out: Path, card: dict, force: bool) -> None:
    path = out / "run_card.json"
    if not path.is_file():
        return
    diffs = resume_conflicts(json.loads(path.read_text()), card)
    if diffs and not force:
        raise ResumeMismatch(f"--resume: {out} holds a run started with other settings: " + "; ".join(diffs)
                             + ". Use the same flags, another --out, or --force-resume to continue anyway.")
    if diffs:
        print("[dpo_lib] --force-resume: continuing despite " + "; ".join(diffs))


def write_outputs(out: Path, s: Setup, before: dict, after: dict, history: list[dict], summary: dict,
                  card: dict) -> None:
    final = out / "final"
    s.model.save_pretrained(final, safe_serialization=True)
    s.tokenizer.save_pretrained(final)
    if "samples" in before:
        prompts = [prompt_text(s.eval_prompts[x["prompt_index"]]) for x in before["samples"]]
        table = side_by_side(prompts, [x["text"] for x in before["samples"]], [x["text"] for x in after["samples"]],
                             before["rewards"], after["rewards"], k=8)
        (out / "samples.md").write_text("# Held-out prompts: reference vs DPO policy\n\n" + table + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    plot_training(history, out, beta=card["config"]["beta"])
    (out / "run_card.json").write_text(json.dumps(card, indent=1))


def run(out: Path, job: JobConfig | None = None, config: TrainConfig | None = None) -> dict:
    """The main job (module docstring); returns the summary it writes to ``OUT/summary.json``."""
    job, config = job or JobConfig(out=out), config or TrainConfig()
    t_start = time.perf_counter()
    lock = claim_folder(out)
    try:
        torch.manual_seed(config.seed)
        # one precision for every forward of the job: the reference log-probs, the evaluations and the
        # samples use the same autocast as training, so the untrained policy's implicit rewards are exactly 0
        config = replace(config, precision=resolve_precision(config.precision, "cpu"))
        print(f"[dpo_lib] precision: {config.precision}" + (" (bf16 autocast: this CPU has bf16 matmul units; "
              "weights and optimizer stay float32; --precision fp32 to turn it off)" if config.precision == "bf16"
              else ""))
        s = load(job, config, out)
        card = run_card(s, job, config)
        if job.resume:
            _check_resume(out, card, job.force_resume)
        (out / "run_card.json").write_text(json.dumps(card, indent=1))
        timings = {"load_and_reference_logps": time.perf_counter() - t_start}
        reward_fn = None
        if job.reward:
            from dpo_lib.rewards import get_reward
            reward_fn = get_reward(job.reward)
        t0 = time.perf_counter()
        before = evaluate(s, job, config, reward_fn, with_kl=False)
        timings["evaluate_before"] = time.perf_counter() - t0
        history, train_seconds, final_accuracy = _train(s, config, out, job.resume, job.eval_every)
        t0 = time.perf_counter()
        after = evaluate(s, job, config, reward_fn, with_kl=True, accuracy=final_accuracy)
        timings["evaluate_after"] = time.perf_counter() - t0
        summary = {"model": job.model or "SmolLM2-135M-Instruct (embedded)", "dataset": str(job.dataset),
                   "train_pairs": len(s.train_features), "heldout_pairs": len(s.eval_features),
                   "config": asdict(config), **summarize(before, after), **_speed(history, train_seconds)}
        summary["total_seconds"] = time.perf_counter() - t_start
        summary["phase_seconds"] = {**timings, "train": train_seconds}
        write_outputs(out, s, before, after, history, summary, card)
        return summary
    finally:
        lock.close()


def _train(s: Setup, config: TrainConfig, out: Path, resume: bool, eval_every: int):
    """Train; returns the history, the seconds it took, and the held-out accuracy of the final
    weights when the last step evaluated it (``None`` otherwise)."""
    pad = s.tokenizer.pad_token_id
    trainer = DPOTrainer(s.model, s.train_features, config, pad_token_id=pad, out_dir=out)
    heldout = HeldoutEval(s.eval_features, pad, every=eval_every or trainer.total_steps)
    print(f"[dpo_lib] training {trainer.total_steps} steps of {config.batch_size} pairs "
          f"(beta={config.beta}, lr={config.learning_rate}, loss={config.loss_type})")
    t0 = time.perf_counter()
    history = trainer.train(resume=resume, callbacks=[heldout])
    seconds = time.perf_counter() - t0
    if config.save_every:
        trainer.save_checkpoint()
    final = heldout.last if heldout.last and heldout.last["step"] == trainer.total_steps else None
    return history, seconds, final


def _speed(history: list[dict], train_seconds: float) -> dict:
    step_time = sum(m["step_seconds"] for m in history)
    tokens = history[-1]["num_tokens"] if history else 0  # cumulative, resumed steps included
    return {"steps": len(history), "train_seconds": train_seconds,
            "tokens_per_second": tokens / step_time if step_time else float("nan")}
