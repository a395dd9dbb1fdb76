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
3. evaluates as the main job does (:func:`dpo_lib.recipes.run.evaluate`, :func:`~dpo_lib.recipes.run.summarize`),
   always against the *starting* model, so rounds and reference modes share one yardstick:
   held-out implicit-reward accuracy, the true reward of samples on held-out prompts and its
   paired gain over the starting model's samples (same prompts, same seed) with standard errors,
   the KL to the starting model, and the judge's mean score of those samples (with a learned
   judge, where it and the true reward part ways).

The judge is any callable ``texts -> list[float]`` (VADER, :func:`dpo_lib.rewards.sentiment_reward`,
by default) or a reward model (:class:`dpo_lib.rlhf.reward_model.RewardModelJudge`). A judge that
fails on a sample stops the run with :class:`IterationError` naming the round and the sample's
prompt index (:func:`dpo_lib.sampling.score_samples`).

This recipe sits beside the main job (:mod:`dpo_lib.recipes.train`), on the same run layer
(:mod:`dpo_lib.recipes.run`), not in :mod:`dpo_lib.rlhf`: it is built only on the DPO core (sampling,
reference, trainer, evaluation) and needs nothing from RLHF; a reward model is merely one judge a
caller may pass in.

Files under ``OUT``::

    run_card.json          settings, data and model fingerprints (a re-run must match them)
    baseline.json          the starting model's held-out samples, true rewards and judge scores
    summary.json           a list: one entry per finished round (the round summaries)
    round_K/pairs.jsonl    the round's pairs (course schema, plus score_chosen / score_rejected)
    round_K/metrics.jsonl  the trainer's metrics, one line per step
    round_K/policy/        the policy after round K (safetensors, with its tokenizer): kept for round 1
                           (:func:`branch` starts from it) and the last finished round (resume starts from
                           it); once round K + 1 is finished, round K's is deleted (``keep_every_policy``
                           keeps them all)
    round_K/summary.json   written last, atomically: the round is finished iff it exists

Resume: a re-run with the same settings continues at the first round without a summary (that
round's folder is cleared and the round redone from the last finished round's ``policy/``); with
other settings it is refused (:class:`dpo_lib.recipes.run.ResumeMismatch`) once a round is finished (before
that there is nothing to continue, and the run starts afresh). ``rounds`` may grow between runs: a
finished run given more rounds continues. While only round 1 is finished the reference mode may
change too: round 1 trains against the starting model in both modes. :func:`branch` uses that to
start a ``previous`` run from an ``initial`` run's round 1 instead of training it again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from dpo_lib.checkpoints import atomic_write_text
from dpo_lib.config import IterateConfig, JobConfig, TrainConfig
from dpo_lib.data import load_prompts
from dpo_lib.evaluation import HeldoutEval, mean_and_se
from dpo_lib.features import tokenize_rows
from dpo_lib.losses import needs_reference
from dpo_lib.models import load_model
from dpo_lib.precision import autocast
from dpo_lib.recipes.run import (
    Setup,
    check_card,
    claim_folder,
    evaluate,
    plain,
    run_card,
    save_model,
    start,
    summarize,
    write_json,
)
from dpo_lib.reference import FrozenReference, precompute_reference_logps
from dpo_lib.sampling import JudgeError, make_pairs, score_samples
from dpo_lib.settings import UserError
from dpo_lib.stats import gain
from dpo_lib.trainer import DPOTrainer

__all__ = ["ITERATE_FREE", "IterationError", "branch", "finished_rounds", "iterate", "round_dir", "sample_seed"]

# settings a re-run may change: they change no round's result (rounds: a longer run continues)
ITERATE_FREE = {"print_every", "threads", "out", "rounds", "prompts", "eval_dataset", "save_every", "capability",
                "keep_checkpoints", "keep_every_policy"}
ROUND_1_FREE = {"reference"}  # settings round 1 does not read: its reference is the starting model in both modes
CARD_KEYS = {"data_sha256_16": "the training data", "model_fingerprint": "the model", "judge": "the judge",
             "heldout_data_sha256_16": "the held-out data"}
TIMING_KEYS = ("train_seconds", "round_seconds")  # the only figures of a summary that differ between runs


class IterationError(UserError):
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


@dataclass
class Loop:
    """What every round reads: the settings, the starting set-up, the prompts, the judges and the baseline."""
    out: Path
    settings: IterateConfig
    job: JobConfig
    base: Setup
    prompt_rows: list
    judge: object
    true_reward: object
    baseline: dict | None = None


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
        prompt_rows = load_prompts(settings.prompts)
        base = start(job, config)
        job_card = {k: v for k, v in plain(asdict(job)).items() if k not in ("dataset", "resume", "force_resume")}
        done = _claim_run(out, run_card(job_card, base.config, base.fingerprint, base.eval_rows,
                                        iterate=plain(asdict(settings)), judge=judge_name(judge),
                                        data_sha256_16=_prompts_hash(prompt_rows)))
        loop = Loop(out, settings, job, base, prompt_rows, judge, true_reward)
        loop.baseline = _baseline(loop)
        summaries = [json.loads((round_dir(out, k) / "summary.json").read_text()) for k in range(1, done + 1)]
        if done >= settings.rounds:
            print(f"[dpo_lib] {out}: {done} rounds are finished already (--rounds {settings.rounds})")
            return summaries
        policy = _resumed_policy(out, done) if done else base.model  # trained in place, round after round
        for k in range(done + 1, settings.rounds + 1):
            summaries.append(_round(k, loop, policy))
            write_json(out / "summary.json", summaries)
            if k > 2 and not settings.keep_every_policy:  # round k - 1's policy: neither round 1's nor the last
                shutil.rmtree(round_dir(out, k - 1) / "policy", ignore_errors=True)
        return summaries
    finally:
        lock.close()


def _claim_run(out: Path, card: dict) -> int:
    """Compare ``card`` with the run card of the finished rounds in ``out`` (refuse a mismatch), write it,
    and return how many rounds are finished (none: the run starts afresh, with these settings)."""
    done = finished_rounds(out)
    if done:
        free = ITERATE_FREE | (ROUND_1_FREE if done == 1 else set())
        check_card(out, card, ("iterate", "config", "job"), free, CARD_KEYS,
                   how="Use the same flags to continue it, or another --out")
    else:
        (out / "baseline.json").unlink(missing_ok=True)
    write_json(out / "run_card.json", card)
    return done


def _resumed_policy(out: Path, done: int):
    """The policy the last finished round saved, to continue from."""
    path = round_dir(out, done) / "policy"
    print(f"[dpo_lib] resuming {out}: rounds 1-{done} finished, starting round {done + 1} from {path}")
    return load_model(path, attn_implementation="eager")[0]


def branch(src: str | Path, dst: str | Path) -> Path:
    """Start the run in ``dst`` from round 1 of the finished run in ``src``: copies its run card,
    baseline and ``round_1/``, so that :func:`iterate` on ``dst`` resumes at round 2. Round 1 does not
    depend on the reference mode (both train against the starting model), so ``dst`` may be continued
    with ``reference="previous"`` from an ``initial`` run (the other settings must stay the same, as
    on any resume). Saves one round of sampling and training per extra arm; ``dst`` must not exist.
    The files are hard links where the file system allows (no second copy of the policy on disk)."""
    src, dst = Path(src), Path(dst)
    if finished_rounds(src) < 1:
        raise IterationError(f"{src}: no finished round 1 to branch from (no {round_dir(src, 1) / 'summary.json'})")
    if dst.exists():
        raise IterationError(f"{dst} exists already: branch into a new folder")
    dst.mkdir(parents=True)
    for name in ("run_card.json", "baseline.json"):
        shutil.copy2(src / name, dst / name)
    shutil.copytree(round_dir(src, 1), round_dir(dst, 1), copy_function=_link_or_copy)
    first = json.loads((round_dir(src, 1) / "summary.json").read_text())
    write_json(dst / "summary.json", [first])
    return dst


def _link_or_copy(src: str, dst: str) -> None:
    """A hard link (no new disk space: :func:`branch`'s copy of a round is never written to, only
    replaced or deleted), or a copy where the file system has none (another device, FAT)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _judged(judge, samples: list[dict], prompts: list, where: str) -> list[float]:
    try:
        return score_samples(judge, samples, prompts)
    except JudgeError as e:
        raise IterationError(f"{where}: {e}") from e


def _baseline(loop: Loop) -> dict:
    """The starting model's evaluation (``OUT/baseline.json``, computed once: a resumed run reads it)."""
    path = loop.out / "baseline.json"
    if path.is_file():
        return json.loads(path.read_text())
    before = evaluate(loop.base, loop.job, loop.true_reward, with_kl=False)
    if "samples" in before:
        before["judge_scores"] = _judged(loop.judge, before["samples"], loop.base.eval_prompts,
                                         "before round 1 (the starting model's evaluation)")
        before["texts"] = [x["text"] for x in before.pop("samples")]
    write_json(path, before)
    return before


def _round_pairs(k: int, loop: Loop, policy, rd: Path) -> tuple[list[dict], dict, str]:
    """Round ``k``'s training pairs: sample from ``policy``, judge, best vs worst; tokenized (too few: an error)."""
    s, settings, config = loop.base, loop.settings, loop.base.config
    print(f"[dpo_lib] round {k}/{settings.rounds}: sampling {settings.samples_per_prompt} answers for each of "
          f"{len(loop.prompt_rows)} prompts")
    with autocast(config.precision):
        try:
            rows, stats = make_pairs(policy, s.tokenizer, loop.prompt_rows, loop.judge, n=settings.samples_per_prompt,
                                     min_gap=settings.min_gap, incomplete=settings.incomplete,
                                     max_new_tokens=settings.sample_max_new_tokens,
                                     temperature=settings.temperature, seed=sample_seed(config.seed, k),
                                     sampler=loop.job.sampler)
        except JudgeError as e:
            raise IterationError(f"round {k}: {e}; the round is not finished (no {rd / 'summary.json'})") from e
    atomic_write_text(rd / "pairs.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    features, tok_stats = tokenize_rows(s.tokenizer, rows, loop.job.max_length, loop.job.max_prompt_length) \
        if rows else ([], None)
    if len(features) < config.batch_size:
        raise IterationError(
            f"round {k}: {len(features)} pairs to train on from {stats['prompts']} prompts "
            f"({stats['skipped_no_preference']} without a preference: best and worst closer than --min-gap "
            f"{settings.min_gap}, or the same text), fewer than one batch of --batch-size {config.batch_size}; "
            "sample more answers or prompts, or lower --min-gap")
    return features, stats, tok_stats.summary()


def _round(k: int, loop: Loop, policy) -> dict:
    """Round ``k``: sample, judge, pair, train, save, evaluate; ``summary.json`` is written last."""
    t0 = time.perf_counter()
    rd = round_dir(loop.out, k)
    shutil.rmtree(rd, ignore_errors=True)  # what an interrupted attempt at this round left
    rd.mkdir(parents=True)
    s, config, pad = loop.base, loop.base.config, loop.base.tokenizer.pad_token_id
    features, stats, tokenized = _round_pairs(k, loop, policy, rd)
    previous = loop.settings.reference == "previous" and k > 1
    reference = FrozenReference(policy, **config.scoring) if previous else s.reference
    with autocast(config.precision):
        if needs_reference(config.loss_type):
            features = precompute_reference_logps(reference, features, pad)
        round_eval = precompute_reference_logps(reference, s.eval_features, pad) if previous and s.eval_features \
            else s.eval_features
    # from round 2 on, "initial" trains a policy that is not its reference
    trainer = DPOTrainer(policy, features, config, pad_token_id=pad, out_dir=rd, policy_is_reference=k == 1 or previous)
    heldout = HeldoutEval(round_eval, pad, every=loop.job.eval_every or trainer.total_steps, **config.scoring)
    print(f"[dpo_lib] round {k}: {len(features)} pairs, training {trainer.total_steps} steps against the "
          f"{'previous policy' if previous else 'starting model'}")
    t_train = time.perf_counter()
    history = trainer.train(callbacks=[heldout])
    train_seconds = time.perf_counter() - t_train
    save_model(rd / "policy", policy, s.tokenizer, f"round {k}'s policy")
    final = heldout.last if heldout.last and heldout.last["step"] == trainer.total_steps else None
    after = evaluate(replace(s, model=policy), loop.job, loop.true_reward, with_kl=True,
                     accuracy=None if previous else final)
    summary = {"round": k, "reference": loop.settings.reference, "judge": judge_name(loop.judge),
               "prompts": stats["prompts"], "pairs": len(features),
               "skipped_no_preference": stats["skipped_no_preference"], "samples_ended": stats["ended"],
               "samples_trimmed": stats["trimmed"], "samples_dropped": stats["dropped"],
               "judge_mean_of_training_samples": stats["score_mean"], "steps": len(history),
               "final_loss": history[-1]["loss"], "tokenize": tokenized}
    summary.update(_round_figures(k, loop, after))
    if previous and final:
        summary["heldout_accuracy_vs_round_reference"] = final["accuracy"]
    summary["train_seconds"], summary["round_seconds"] = train_seconds, time.perf_counter() - t0
    write_json(rd / "summary.json", summary)
    print(f"[dpo_lib] round {k} finished: " + ", ".join(f"{key} {summary[key]:+.4f}" for key in
          ("reward_gain", "kl_to_start", "heldout_accuracy_after") if key in summary))
    return summary


def _round_figures(k: int, loop: Loop, after: dict) -> dict:
    """The round's figures against the starting model: true reward, KL to the start, the judge's gain."""
    figures = summarize(loop.baseline, after)
    if "kl_to_reference" in figures:  # summarize's name; here the KL is always to the starting model
        figures["kl_to_start"] = figures.pop("kl_to_reference")
        figures["kl_to_start_se"] = figures.pop("kl_to_reference_se")
    if "samples" in after:
        scores = _judged(loop.judge, after["samples"], loop.base.eval_prompts, f"round {k}'s evaluation")
        base = loop.baseline["judge_scores"]
        figures["judge_before"], figures["judge_before_se"] = mean_and_se(base)
        figures["judge_after"], figures["judge_after_se"] = mean_and_se(scores)
        judge_gain = gain(scores, base)
        figures["judge_gain"], figures["judge_gain_se"] = judge_gain.value, judge_gain.se
        figures["judge_scores_after"] = [float(x) for x in scores]  # per sample, like rewards_after
    return figures
