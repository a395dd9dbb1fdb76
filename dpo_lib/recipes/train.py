"""The main job: DPO on a preference file, evaluated before and after, with every artifact on disk.

``python -m dpo_lib train`` calls :func:`run`: load → evaluate → train → evaluate → write.

* load: the policy (default: the embedded SmolLM2-135M-Instruct) and the data; a frozen copy
  of the policy is the reference, and its log-probs on the training and held-out pairs are
  computed once (cached in ``OUT/cache``), so training needs one forward per step (with a
  reference-free loss, ``simpo`` or ``orpo``, only the held-out pairs': the evaluation's
  implicit-reward accuracy and KL are DPO's, measured against the reference for every loss);
* evaluate (:func:`dpo_lib.recipes.run.evaluate`, the same code before and after training): held-out
  implicit-reward accuracy (DPO Eq. 5; before training 0 by construction, the policy being its reference:
  :func:`dpo_lib.evaluation.untrained_accuracy`), samples on held-out prompts scored by the ground-truth
  reward, and after training the KL of the policy to the reference;
* train: :class:`dpo_lib.trainer.DPOTrainer`;
* write: ``summary.json`` (paired reward gain, win rate, KL), ``samples.md``, the plots,
  ``run_card.json`` and the final weights as safetensors in ``OUT/final/``.

The output folder, the set-up and the evaluation are the run layer's (:mod:`dpo_lib.recipes.run`),
shared with ``iterate``: one run per folder, and ``--resume`` refuses settings that differ from the
run card of the run it continues.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

from dpo_lib.config import JobConfig, TrainConfig
from dpo_lib.data import data_hash, load_preferences
from dpo_lib.evaluation import HeldoutEval, side_by_side, untrained_accuracy
from dpo_lib.features import tokenize_rows
from dpo_lib.losses import needs_reference
from dpo_lib.plots import plot_training
from dpo_lib.precision import autocast
from dpo_lib.recipes.run import (
    Setup,
    check_card,
    claim_folder,
    evaluate,
    heldout,
    plain,
    prompt_text,
    reference_key,
    run_card,
    save_model,
    start,
    summarize,
    write_json,
)
from dpo_lib.reference import precompute_reference_logps
from dpo_lib.settings import UserError
from dpo_lib.trainer import DPOTrainer

__all__ = ["RESUME_FREE", "load_training_pairs", "prepare", "run"]

# settings that do not change the trained weights: a resume may change them freely
RESUME_FREE = {"print_every", "save_every", "keep_checkpoints", "out", "resume", "force_resume", "threads",
               "eval_every", "eval_samples", "max_eval_prompts", "max_new_tokens", "reward", "eval_dataset",
               "skip_invalid", "capability", "overwrite"}
CARD_KEYS = {"data_sha256_16": "the training data", "model_fingerprint": "the model"}


def load_training_pairs(job: JobConfig) -> list[dict]:
    """The training pairs of ``job.dataset``: a JSONL file, or a hub dataset the converters know (online)."""
    from dpo_lib.hub_datasets import is_hub_dataset, load_hub_preferences
    if is_hub_dataset(str(job.dataset)):
        rows, stats = load_hub_preferences(str(job.dataset), split="train")
        print(f"[dpo_lib] {job.dataset} (hub): {stats}")
        return rows
    rows, report = load_preferences(job.dataset, skip_invalid=job.skip_invalid)
    print(f"[dpo_lib] {report.summary()}")
    return rows


def _enough(n: int, config: TrainConfig, what: str) -> None:
    """Refuse training pairs that cannot fill one optimizer step."""
    if n < config.batch_size:
        raise UserError(f"--dataset: {what} {n} pairs, fewer than one batch of --batch-size {config.batch_size}; "
                        "use more pairs or a smaller --batch-size")


def _training_features(s: Setup, job: JobConfig, rows: list[dict], cache: Path) -> tuple[list[dict], str]:
    """The tokenized training pairs, with their reference log-probs when the loss reads them (cached)."""
    features, stats = tokenize_rows(s.tokenizer, rows, job.max_length, job.max_prompt_length)
    print(f"[dpo_lib] train: {stats.summary()}")
    _enough(len(features), s.config, f"{job.dataset} keeps, after tokenizing to --max-length {job.max_length},")
    if needs_reference(s.config.loss_type):  # simpo and orpo never read them; the held-out ones are still needed
        with autocast(s.config.precision):
            features = precompute_reference_logps(s.reference, features, s.tokenizer.pad_token_id, cache_dir=cache,
                                                  model_key=reference_key(s))
    return features, stats.summary()


def prepare(job: JobConfig, config: TrainConfig, out: Path) -> tuple[Setup, list[dict], dict]:
    """The run's set-up (:func:`dpo_lib.recipes.run.start`), its tokenized training pairs (with reference
    log-probs when the loss reads them, cached in ``OUT/cache``) and its run card."""
    rows = load_training_pairs(job)
    _enough(len(rows), config, f"{job.dataset} has")  # before the model is loaded
    s = start(replace(job, eval_dataset=None), config)
    features, tokenized = _training_features(s, job, rows, out / "cache")
    s = heldout(s, job, cache_dir=out / "cache")
    card = run_card(plain(asdict(job)), s.config, s.fingerprint, s.eval_rows, data_sha256_16=data_hash(rows),
                    max_length=job.max_length, max_prompt_length=job.max_prompt_length, tokenize=tokenized)
    return s, features, card


def run(out: Path, job: JobConfig | None = None, config: TrainConfig | None = None) -> dict:
    """The main job (module docstring); returns the summary it writes to ``OUT/summary.json``."""
    job, config = job or JobConfig(out=out), config or TrainConfig()
    t_start = time.perf_counter()
    lock = claim_folder(out)
    try:
        if job.overwrite:
            _clear(out)
        s, features, card = prepare(job, config, out)
        if job.resume:
            check_card(out, card, ("config", "job"), RESUME_FREE, CARD_KEYS, job.force_resume,
                       how="Use the same flags, another --out, or --force-resume to continue anyway")
        write_json(out / "run_card.json", card)
        timings = {"load_and_reference_logps": time.perf_counter() - t_start}
        reward_fn = _reward(job)
        t0 = time.perf_counter()
        # before training the policy is its reference: the held-out accuracy is 0 by construction, not measured
        before = evaluate(s, job, reward_fn, with_kl=False, accuracy=untrained_accuracy(len(s.eval_features)))
        timings["evaluate_before"] = time.perf_counter() - t0
        tax_before = _capability(s, job, timings, "capability_before")
        history, train_seconds, final_accuracy = _train(s, features, out, job.resume, job.eval_every)
        t0 = time.perf_counter()
        after = evaluate(s, job, reward_fn, with_kl=True, accuracy=final_accuracy)
        timings["evaluate_after"] = time.perf_counter() - t0
        tax = _tax(tax_before, _capability(s, job, timings, "capability_after"))
        summary = {"model": job.model or "SmolLM2-135M-Instruct (embedded)", "dataset": str(job.dataset),
                   "train_pairs": len(features), "heldout_pairs": len(s.eval_features),
                   "config": asdict(s.config), **summarize(before, after), **tax, **_speed(history, train_seconds)}
        summary["total_seconds"] = time.perf_counter() - t_start
        summary["phase_seconds"] = {**timings, "train": train_seconds}
        _write_outputs(out, s, before, after, history, summary, card)
        return summary
    finally:
        lock.close()


def _capability(s: Setup, job: JobConfig, timings: dict, phase: str) -> dict | None:
    """The alignment-tax measures (:func:`dpo_lib.capability.measure`) of the model as it is now, timed."""
    if not job.capability:
        return None
    from dpo_lib.capability import measure
    t0 = time.perf_counter()
    with autocast(s.config.precision):
        result = measure(s.model, s.tokenizer, device=s.model.device, seed=s.config.seed)
    timings[phase] = time.perf_counter() - t0
    return result


def _tax(before: dict | None, after: dict | None) -> dict:
    """``general_nll_*`` and ``instruction_following_*``: before, after, paired change and its SE."""
    if before is None:
        return {}
    from dpo_lib.capability import paired_change
    return paired_change(before, after)


def _reward(job: JobConfig):
    if not job.reward:
        return None
    from dpo_lib.rewards import get_reward
    return get_reward(job.reward)


def _train(s: Setup, features: list[dict], out: Path, resume: bool, eval_every: int):
    """Train; returns the history, the seconds it took, and the held-out accuracy of the final
    weights when the last step evaluated it (``None`` otherwise)."""
    pad, config = s.tokenizer.pad_token_id, s.config
    trainer = DPOTrainer(s.model, features, config, pad_token_id=pad, out_dir=out)
    evaluator = HeldoutEval(s.eval_features, pad, every=eval_every or trainer.total_steps, **config.scoring)
    print(f"[dpo_lib] training {trainer.total_steps} steps of {config.batch_size} pairs "
          f"(beta={config.beta}, lr={config.learning_rate}, loss={config.loss_type})")
    t0 = time.perf_counter()
    history = trainer.train(resume=resume, callbacks=[evaluator])
    seconds = time.perf_counter() - t0
    if config.save_every:
        trainer.save_checkpoint()
    final = evaluator.last if evaluator.last and evaluator.last["step"] == trainer.total_steps else None
    return history, seconds, final


def _clear(out: Path) -> None:
    """``--overwrite``: delete what a previous run wrote in ``out`` (the reference log-prob cache stays)."""
    from dpo_lib.config import RUN_FILES
    for name in ("final", "checkpoints"):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    print(f"[dpo_lib] --overwrite: deleted the previous run in {out}")


def _write_outputs(out: Path, s: Setup, before: dict, after: dict, history: list[dict], summary: dict,
                   card: dict) -> None:
    save_model(out / "final", s.model, s.tokenizer, "the final model")
    if "samples" in before:
        prompts = [prompt_text(s.eval_prompts[x["prompt_index"]]) for x in before["samples"]]
        table = side_by_side(prompts, [x["text"] for x in before["samples"]], [x["text"] for x in after["samples"]],
                             before["rewards"], after["rewards"], k=8)
        (out / "samples.md").write_text("# Held-out prompts: reference vs DPO policy\n\n" + table + "\n")
    write_json(out / "summary.json", summary)
    plot_training(history, out, beta=card["config"]["beta"])
    write_json(out / "run_card.json", card)


def _speed(history: list[dict], train_seconds: float) -> dict:
    step_time = sum(m["step_seconds"] for m in history)
    tokens = history[-1]["num_tokens"] if history else 0  # cumulative, resumed steps included
    return {"steps": len(history), "train_seconds": train_seconds,
            "tokens_per_second": tokens / step_time if step_time else float("nan")}
