"""Iterative on-policy DPO: sample from the current policy, judge, make pairs, train, repeat.

Pairs sampled from the starting model are off-policy after one round of DPO. Iterative DPO
(Xiong et al. 2024; Yuan et al. 2024; Guo et al. 2024) samples again from the policy it has
just trained. :func:`iterate` runs ``R`` rounds; round ``k``:

1. samples ``N`` answers per training prompt from the current policy, has the judge score them
   and keeps best vs worst, skipping prompts whose gap is under ``min_gap`` or whose best and
   worst answers are the same text (:func:`dpo_lib.sampling.make_pairs`);
2. trains DPO on those pairs (:class:`dpo_lib.trainer.DPOTrainer`) against a reference whose
   log-probs are computed once (:func:`dpo_lib.reference.precompute_reference_logps`): the
   starting model (``reference="initial"``) or the policy round ``k - 1`` ended with
   (``"previous"``, so every round's first step has implicit rewards exactly 0);
3. evaluates as the main job does (:func:`dpo_lib.job.evaluate`, :func:`dpo_lib.job.summarize`),
   always against the *starting* model, so rounds and reference modes share one yardstick:
   held-out implicit-reward accuracy, the true reward of samples on held-out prompts and its
   paired gain over the starting model's samples (same prompts, same seed) with standard errors,
   the KL to the starting model, and the judge's mean score of those samples (with a learned
   judge, where it and the true reward part ways).

The judge is any callable ``texts -> list[float]`` (VADER, :func:`dpo_lib.rewards.sentiment_reward`,
by default) or a reward model (:class:`dpo_lib.rlhf.reward_model.RewardModelJudge`). A judge that
fails on a sample stops the run with :class:`IterationError` naming the round and the sample's
prompt index (:func:`dpo_lib.sampling.score_samples`).

This module sits at the top of ``dpo_lib``, beside :mod:`dpo_lib.job`, not in :mod:`dpo_lib.rlhf`:
it is a DPO recipe built only on the DPO core (sampling, reference, trainer, evaluation) and
needs nothing from RLHF; a reward model is merely one judge a caller may pass in.

Files under ``OUT``::

    run_card.json          settings, data and model fingerprints (a re-run must match them)
    baseline.json          the starting model's held-out samples, true rewards and judge scores
    summary.json           a list: one entry per finished round (the round summaries)
    round_K/pairs.jsonl    the round's pairs (course schema, plus score_chosen / score_rejected)
    round_K/metrics.jsonl  the trainer's metrics, one line per step
    round_K/policy/        the policy after round K (safetensors, with its tokenizer)
    round_K/summary.json   written last, atomically: the round is finished iff it exists

Resume: a re-run with the same settings continues at the first round without a summary (that
round's folder is cleared and the round redone from the last finished round's ``policy/``); with
other settings it is refused (:class:`dpo_lib.job.ResumeMismatch`) once a round is finished (before
that there is nothing to continue, and the run starts afresh). ``rounds`` may grow between runs: a
finished run given more rounds continues. While only round 1 is finished the reference mode may
change too: round 1 trains against the starting model in both modes. :func:`branch` uses that to
start a ``previous`` run from an ``initial`` run's round 1 instead of training it again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from dpo_lib import data as D
from dpo_lib.checkpoints import atomic_write_text
from dpo_lib.config import IterateConfig, JobConfig, TrainConfig
from dpo_lib.evaluation import HeldoutEval, mean_and_se
from dpo_lib.features import tokenize_rows
from dpo_lib.job import ResumeMismatch, Setup, claim_folder, evaluate, resume_conflicts, summarize
from dpo_lib.logger import package_versions
from dpo_lib.losses import needs_reference
from dpo_lib.models import load_model
from dpo_lib.precision import autocast, resolve_precision
from dpo_lib.reference import FrozenReference, model_fingerprint, precompute_reference_logps
from dpo_lib.sampling import JudgeError, make_pairs, score_samples
from dpo_lib.trainer import DPOTrainer

# settings a re-run may change: they change no round's result (rounds: a longer run continues)
ITERATE_FREE = {"print_every", "threads", "out", "rounds", "prompts", "eval_dataset", "save_every",
                "keep_checkpoints"}
TIMING_KEYS = ("train_seconds", "round_seconds")  # the only figures of a summary that differ between runs


class IterationError(RuntimeError):
    """A round that cannot go on: the judge failed on a sample, or too few pairs to train on."""


def round_dir(out: Path, k: int) -> Path:
    return Path(out) / f"round_{k}"


def finished_rounds(out: Path) -> int:
    """How many rounds, 1, 2, … in a row, have their ``summary.json`` (written last, atomically)."""
    k = 0
    while (round_dir(out, k + 1) / "summary.json").is_file():
        k += 1
    return k


def sample_seed(seed: int, k: int) -> int:
    """The sampling seed of round ``k``'s training answers (the evaluation samples use ``seed + 1``)."""
    return seed + 1000 * k


def judge_name(judge) -> str:
    return getattr(judge, "name", None) or getattr(judge, "__qualname__", None) or type(judge).__qualname__


def _prompts_hash(rows: list[dict]) -> str:
    return hashlib.sha256(json.dumps([r["prompt"] for r in rows], ensure_ascii=False).encode()).hexdigest()[:16]


def _card(settings: IterateConfig, job: JobConfig, config: TrainConfig, judge, prompt_rows, eval_rows,
          fingerprint: str) -> dict:
    def plain(d: dict) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}
    return {"command": " ".join(sys.argv), "iterate": plain(asdict(settings)), "config": asdict(config),
            "job": plain({k: v for k, v in asdict(job).items() if k not in ("dataset", "resume", "force_resume")}),
            "judge": judge_name(judge), "data_sha256_16": _prompts_hash(prompt_rows),
            "heldout_data_sha256_16": D.data_hash(eval_rows) if eval_rows else None,
            "model_fingerprint": fingerprint, "versions": package_versions()}


# settings round 1 does not read: its reference is the starting model in both modes
ROUND_1_FREE = {"reference"}


def _check_card(out: Path, card: dict, done: int) -> None:
    path = out / "run_card.json"
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    free = ITERATE_FREE | (ROUND_1_FREE if done == 1 else set())
    diffs = resume_conflicts(old, card, sections=("iterate", "config", "job"), free=free)
    for k, what in (("judge", "the judge"), ("heldout_data_sha256_16", "the held-out data")):
        if old.get(k) != card.get(k):
            diffs.append(f"{what} changed ({old.get(k)} -> {card.get(k)})")
    if diffs:
        raise ResumeMismatch(f"{out} holds an iterative run started with other settings: " + "; ".join(diffs)
                             + ". Use the same flags to continue it, or another --out.")


def iterate(out: str | Path, settings: IterateConfig, job: JobConfig | None = None,
            config: TrainConfig | None = None, judge=None, true_reward=None) -> list[dict]:
    """Run rounds ``finished + 1 … settings.rounds`` of iterative on-policy DPO (module docstring).

    ``settings``: the prompts, rounds, samples per prompt, minimum gap, reference mode and
    sampling of the training answers; ``job``: the starting model (``job.model``), the held-out
    pairs and the evaluation (``eval_dataset``, ``eval_samples``, ``max_eval_prompts``,
    ``max_new_tokens``, ``reward``), the token limits; ``config``: each round's DPO training.
    ``judge`` scores the sampled answers (default: the reward named ``settings.judge``);
    ``true_reward`` scores the evaluation samples (default: the reward named ``job.reward``).
    Returns the summaries of every finished round (``OUT/summary.json``).
    """
    out = Path(out)
    job, config = job or JobConfig(out=out), config or TrainConfig()
    from dpo_lib.rewards import get_reward
    judge = judge or get_reward(settings.judge)
    true_reward = true_reward or (get_reward(job.reward) if job.reward else None)
    lock = claim_folder(out)
    try:
        torch.manual_seed(config.seed)
        config = replace(config, precision=resolve_precision(config.precision, "cpu"))
        prompt_rows = D.load_prompts(settings.prompts)
        eval_rows = D.load_preferences(job.eval_dataset, skip_invalid=job.skip_invalid)[0] if job.eval_dataset else []
        start, tokenizer = load_model(job.model, trust_remote_code=job.trust_remote_code, attn_implementation="eager")
        card = _card(settings, job, config, judge, prompt_rows, eval_rows, model_fingerprint(start))
        done = finished_rounds(out)
        if done:
            _check_card(out, card, done)
        else:  # nothing finished to continue: start afresh, with these settings
            (out / "baseline.json").unlink(missing_ok=True)
        atomic_write_text(out / "run_card.json", json.dumps(card, indent=1))
        pad = tokenizer.pad_token_id
        initial = FrozenReference(start)
        eval_features = tokenize_rows(tokenizer, eval_rows, job.max_length, job.max_prompt_length)[0] \
            if eval_rows else []
        with autocast(config.precision):
            if eval_features:
                eval_features = precompute_reference_logps(initial, eval_features, pad)
        base = Setup(start, tokenizer, initial, [], eval_rows, [], eval_features,
                     [r["prompt"] for r in eval_rows][:job.max_eval_prompts], "", card["model_fingerprint"])
        baseline = _baseline(out, base, job, config, true_reward, judge)
        summaries = [json.loads((round_dir(out, k) / "summary.json").read_text()) for k in range(1, done + 1)]
        if done >= settings.rounds:
            print(f"[dpo_lib] {out}: {done} rounds are finished already (--rounds {settings.rounds})")
        else:
            policy = start
            if done:
                print(f"[dpo_lib] resuming {out}: rounds 1-{done} finished, starting round {done + 1} from "
                      f"{round_dir(out, done) / 'policy'}")
                policy = load_model(round_dir(out, done) / "policy", attn_implementation="eager")[0]
            for k in range(done + 1, settings.rounds + 1):
                summaries.append(_round(k, out, policy, replace(base, model=policy), prompt_rows, baseline,
                                        settings, job, config, judge, true_reward))
                atomic_write_text(out / "summary.json", json.dumps(summaries, indent=1))
        atomic_write_text(out / "summary.json", json.dumps(summaries, indent=1))
        return summaries
    finally:
        lock.close()


def branch(src: str | Path, dst: str | Path) -> Path:
    """Start the run in ``dst`` from round 1 of the finished run in ``src``: copies its run card,
    baseline and ``round_1/``, so that :func:`iterate` on ``dst`` resumes at round 2. Round 1 does not
    depend on the reference mode (both train against the starting model), so ``dst`` may be continued
    with ``reference="previous"`` from an ``initial`` run (the other settings must stay the same, as
    on any resume). Saves one round of sampling and training per extra arm; ``dst`` must not exist."""
    src, dst = Path(src), Path(dst)
    if finished_rounds(src) < 1:
        raise IterationError(f"{src}: no finished round 1 to branch from (no {round_dir(src, 1) / 'summary.json'})")
    if dst.exists():
        raise IterationError(f"{dst} exists already: branch into a new folder")
    dst.mkdir(parents=True)
    for name in ("run_card.json", "baseline.json"):
        shutil.copy2(src / name, dst / name)
    shutil.copytree(round_dir(src, 1), round_dir(dst, 1))
    first = json.loads((round_dir(src, 1) / "summary.json").read_text())
    atomic_write_text(dst / "summary.json", json.dumps([first], indent=1))
    return dst


def _judged(judge, samples: list[dict], prompts: list, where: str) -> list[float]:
    try:
        return score_samples(judge, samples, prompts)
    except JudgeError as e:
        raise IterationError(f"{where}: {e}") from e


def _baseline(out: Path, s: Setup, job: JobConfig, config: TrainConfig, true_reward, judge) -> dict:
    """The starting model's evaluation (``OUT/baseline.json``, computed once: a resumed run reads it)."""
    path = out / "baseline.json"
    if path.is_file():
        return json.loads(path.read_text())
    before = evaluate(s, job, config, true_reward, with_kl=False)
    if "samples" in before:
        before["judge_scores"] = _judged(judge, before["samples"], s.eval_prompts,
                                         "before round 1 (the starting model's evaluation)")
        before["texts"] = [x["text"] for x in before.pop("samples")]
    atomic_write_text(path, json.dumps(before, indent=1))
    return before


def _round(k: int, out: Path, policy, s: Setup, prompt_rows: list[dict], baseline: dict, settings: IterateConfig,
           job: JobConfig, config: TrainConfig, judge, true_reward) -> dict:
    """Round ``k``: sample, judge, pair, train, save, evaluate; ``summary.json`` is written last."""
    t0 = time.perf_counter()
    rd = round_dir(out, k)
    shutil.rmtree(rd, ignore_errors=True)  # what an interrupted attempt at this round left
    rd.mkdir(parents=True)
    tokenizer, pad = s.tokenizer, s.tokenizer.pad_token_id
    previous = settings.reference == "previous" and k > 1
    reference = FrozenReference(policy) if previous else s.reference
    print(f"[dpo_lib] round {k}/{settings.rounds}: sampling {settings.samples_per_prompt} answers for each of "
          f"{len(prompt_rows)} prompts")
    with autocast(config.precision):
        try:
            rows, stats = make_pairs(policy, tokenizer, prompt_rows, judge, n=settings.samples_per_prompt,
                                     min_gap=settings.min_gap, max_new_tokens=settings.sample_max_new_tokens,
                                     temperature=settings.temperature, seed=sample_seed(config.seed, k))
        except JudgeError as e:
            raise IterationError(f"round {k}: {e}; the round is not finished (no {rd / 'summary.json'})") from e
    atomic_write_text(rd / "pairs.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    features, tok_stats = tokenize_rows(tokenizer, rows, job.max_length, job.max_prompt_length) if rows \
        else ([], None)
    if len(features) < config.batch_size:
        raise IterationError(
            f"round {k}: {len(features)} pairs to train on from {stats['prompts']} prompts "
            f"({stats['skipped_no_preference']} without a preference: best and worst closer than --min-gap "
            f"{settings.min_gap}, or the same text), fewer than one batch of --batch-size {config.batch_size}; "
            "sample more answers or prompts, or lower --min-gap")
    with autocast(config.precision):
        if needs_reference(config.loss_type):
            features = precompute_reference_logps(reference, features, pad)
        round_eval = precompute_reference_logps(reference, s.eval_features, pad) if previous and s.eval_features \
            else s.eval_features
    # from round 2 on, "initial" trains a policy that is not its reference: the trainer must keep the
    # precomputed log-probs at step 1 (it would otherwise take the policy's own as the reference's)
    trainer = DPOTrainer(policy, features, config, pad_token_id=pad, out_dir=rd, policy_is_reference=k == 1 or previous)
    heldout = HeldoutEval(round_eval, pad, every=job.eval_every or trainer.total_steps)
    print(f"[dpo_lib] round {k}: {len(features)} pairs, training {trainer.total_steps} steps against the "
          f"{'previous policy' if previous else 'starting model'}")
    t_train = time.perf_counter()
    history = trainer.train(callbacks=[heldout])
    train_seconds = time.perf_counter() - t_train
    policy.save_pretrained(rd / "policy", safe_serialization=True)
    tokenizer.save_pretrained(rd / "policy")
    final = heldout.last if heldout.last and heldout.last["step"] == trainer.total_steps else None
    after = evaluate(s, job, config, true_reward, with_kl=True, accuracy=None if previous else final)
    summary = {"round": k, "reference": settings.reference, "judge": judge_name(judge),
               "prompts": stats["prompts"], "pairs": len(features),
               "skipped_no_preference": stats["skipped_no_preference"], "judge_mean_of_training_samples":
               stats["score_mean"], "steps": len(history), "final_loss": history[-1]["loss"],
               "tokenize": tok_stats.summary()}
    summary.update(summarize(baseline, after))
    if "kl_to_reference" in summary:  # summarize's name; here the KL is always to the starting model
        summary["kl_to_start"], summary["kl_to_start_se"] = summary.pop("kl_to_reference"), \
            summary.pop("kl_to_reference_se")
    if "samples" in after:
        scores = _judged(judge, after["samples"], s.eval_prompts, f"round {k}'s evaluation")
        summary["judge_before"], summary["judge_before_se"] = mean_and_se(baseline["judge_scores"])
        summary["judge_after"], summary["judge_after_se"] = mean_and_se(scores)
        summary["judge_gain"], summary["judge_gain_se"] = mean_and_se(
            [a - b for a, b in zip(scores, baseline["judge_scores"])])
    if previous and final:
        summary["heldout_accuracy_vs_round_reference"] = final["accuracy"]
    summary["train_seconds"], summary["round_seconds"] = train_seconds, time.perf_counter() - t0
    atomic_write_text(rd / "summary.json", json.dumps(summary, indent=1))
    print(f"[dpo_lib] round {k} finished: " + ", ".join(f"{key} {summary[key]:+.4f}" for key in
          ("reward_gain", "kl_to_start", "heldout_accuracy_after") if key in summary))
    return summary


__all__ = ["ITERATE_FREE", "IterationError", "branch", "finished_rounds", "iterate", "round_dir", "sample_seed"]
