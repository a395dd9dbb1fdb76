"""The run layer under ``train`` and ``iterate``: one output folder, one set-up, one evaluation.

* The output folder: :func:`claim_folder` holds an OS lock on ``OUT/.lock`` for the whole run (a
  killed run's lock goes with its process, so it never stays stuck); :func:`write_json` writes
  atomically; :func:`check_card` compares a resumed run's settings with the run card on disk
  (:func:`resume_conflicts`) and refuses those that change the result.
* The set-up (:func:`start`): the global seed, the precision resolved once for the whole run (``auto``: a
  start-up probe of the model's matmuls, :func:`dpo_lib.precision.choose_auto`, in the run card), the
  policy and tokenizer, a frozen copy as the reference, and the held-out pairs with their reference
  log-probs (:func:`heldout`).
* The evaluation (:func:`evaluate`, the same code before and after training) and the before/after
  figures (:func:`summarize`): held-out implicit-reward accuracy (DPO Eq. 5), samples on held-out
  prompts scored by the ground-truth reward, paired gain, win rate and the KL to the reference.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from dpo_lib.checkpoints import atomic_write_text, safetensors_os_errors
from dpo_lib.config import JobConfig, TrainConfig
from dpo_lib.data import data_hash, load_preferences
from dpo_lib.evaluation import implicit_reward_accuracy, mean_and_se, sequence_kl, win_rate
from dpo_lib.features import tokenize_rows
from dpo_lib.logger import package_versions
from dpo_lib.models import load_model
from dpo_lib.precision import asked, autocast, choose_auto, last_choice, model_shapes
from dpo_lib.reference import FrozenReference, model_fingerprint, precompute_reference_logps
from dpo_lib.sampling import generate
from dpo_lib.settings import UserError
from dpo_lib.stats import gain

__all__ = ["ResumeMismatch", "RunFolderBusy", "Setup", "check_card", "claim_folder", "evaluate", "heldout",
           "plain", "prompt_text", "reference_key", "resume_conflicts", "run_card", "save_model", "start",
           "summarize", "write_json"]


class RunFolderBusy(UserError):
    """Another live run writes to the same output folder."""


class ResumeMismatch(UserError):
    """A resume with settings that differ from the run being continued."""


def prompt_text(prompt) -> str:
    """The text of a prompt: the string, or the last message of a conversational prompt."""
    return prompt[-1]["content"] if isinstance(prompt, list) else prompt


# ---------------------------------------------------------------- the output folder

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


def write_json(path: Path, obj) -> None:
    """``obj`` as indented JSON, written atomically (a crash leaves the old file or the new one)."""
    atomic_write_text(path, json.dumps(obj, indent=1))


def save_model(folder: Path, model, tokenizer, what: str) -> None:
    """``model`` (safetensors) and ``tokenizer`` in ``folder``. A save that fails (a full disk, a read-only
    folder), or leaves no weights, is a :class:`UserError` naming ``what`` and the folder."""
    try:
        with safetensors_os_errors(Path(folder) / "model.safetensors"):
            model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
    except OSError as e:
        raise UserError(f"cannot write {what} in {folder}: {e.strerror or e}") from e
    if not any(Path(folder).glob("*.safetensors")):
        raise UserError(f"{what} was not saved in {folder} (no *.safetensors there)")


def plain(d: dict) -> dict:
    """A settings dict with its paths as strings (JSON-ready)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}


def run_card(job: dict, config: TrainConfig, fingerprint: str, eval_rows: list, **extra) -> dict:
    """What a run was made with: the command, seed, settings (``job``: the job settings the recipe reads,
    :func:`plain`), model fingerprint, held-out data hash, package versions and threads; ``extra`` adds the
    recipe's own entries (its data hash, …)."""
    return {"command": " ".join(sys.argv), "seed": config.seed, "config": asdict(config), "job": job,
            "model_fingerprint": fingerprint, "heldout_data_sha256_16": data_hash(eval_rows) if eval_rows else None,
            "versions": package_versions(), "threads": torch.get_num_threads(),
            "precision_choice": last_choice(), **extra}


def resume_conflicts(old: dict, new: dict, sections: tuple[str, ...], free: set[str],
                     keys: dict[str, str]) -> list[str]:
    """The settings that change the result and differ between two run cards, as ``--flag OLD (now NEW)``:
    those of ``sections`` except the ``free`` ones, and the top-level ``keys`` (name -> what it is)."""
    diffs = []
    for section in sections:
        for k, v in new.get(section, {}).items():
            if k not in free and k in old.get(section, {}) and old[section][k] != v:
                diffs.append(f"--{k.replace('_', '-')} {old[section][k]} (now {v})")
    for k, what in keys.items():
        if old.get(k) != new.get(k):
            diffs.append(f"{what} changed ({k} {old.get(k)} -> {new.get(k)})")
    return diffs


def check_card(out: Path, card: dict, sections: tuple[str, ...], free: set[str], keys: dict[str, str],
               force: bool = False, how: str = "Use the same flags, or another --out") -> None:
    """Refuse (:class:`ResumeMismatch`) to continue the run in ``out`` with settings that differ from its run
    card (:func:`resume_conflicts`); with ``force``, say what differs and go on."""
    path = out / "run_card.json"
    if not path.is_file():
        return
    diffs = resume_conflicts(json.loads(path.read_text()), card, sections, free, keys)
    if diffs and not force:
        raise ResumeMismatch(f"{out} holds a run started with other settings: " + "; ".join(diffs) + f". {how}.")
    if diffs:
        print("[dpo_lib] --force-resume: continuing despite " + "; ".join(diffs))


# ---------------------------------------------------------------- the set-up

@dataclass
class Setup:
    """What a recipe trains and evaluates: the policy, tokenizer, frozen reference, held-out set."""
    model: torch.nn.Module
    tokenizer: object
    reference: FrozenReference
    config: TrainConfig                      # precision resolved
    fingerprint: str                         # of the starting weights
    eval_rows: list = field(default_factory=list)
    eval_features: list = field(default_factory=list)
    eval_prompts: list = field(default_factory=list)


def start(job: JobConfig, config: TrainConfig) -> Setup:
    """Seed, resolve the precision once for every forward of the run (reference log-probs, evaluations and
    samples use the same autocast as training, so the untrained policy's implicit rewards are exactly 0),
    load the policy and its frozen reference, and the held-out pairs (:func:`heldout`)."""
    torch.manual_seed(config.seed)
    # eager attention: on 2 CPU cores and ~80-token pairs, PyTorch's fused SDPA backward is the slower
    # one (bf16 steps of 8 pairs: 3.9-4.2 s eager vs 4.6-5.1 s sdpa, measured 2026-11-21)
    model, tokenizer = load_model(job.model, trust_remote_code=job.trust_remote_code, attn_implementation="eager")
    # auto: bf16 only where a probe of this model's matmul shapes measures it faster (cached per machine)
    choice = choose_auto("cpu", model_shapes(model)) if config.precision == "auto" else asked(config.precision)
    config = replace(config, precision=choice.precision)
    print(f"[dpo_lib] {choice.line()} (weights and optimizer stay float32; --precision fp32|bf16 to choose)")
    s = Setup(model, tokenizer, FrozenReference(model, **config.scoring), config, model_fingerprint(model))
    return heldout(s, job)


def reference_key(s: Setup) -> str:
    """The reference log-prob cache's model key: the starting weights, the precision and how pairs are scored
    (the compact head's numbers differ from the full head's by rounding, which a cache must not mix)."""
    return "-".join([s.fingerprint, s.config.precision] + [k for k, on in s.config.scoring.items() if on])


def heldout(s: Setup, job: JobConfig, cache_dir: Path | None = None) -> Setup:
    """``s`` with the held-out pairs of ``job.eval_dataset``, their reference log-probs, and the prompts
    sampled for the true reward."""
    if job.eval_dataset is None:
        return s
    rows, report = load_preferences(job.eval_dataset, skip_invalid=job.skip_invalid)
    print(f"[dpo_lib] {report.summary()}")
    features = tokenize_rows(s.tokenizer, rows, job.max_length, job.max_prompt_length)[0]
    with autocast(s.config.precision):
        features = precompute_reference_logps(s.reference, features, s.tokenizer.pad_token_id, cache_dir=cache_dir,
                                              model_key=reference_key(s))
    prompts = [r["prompt"] for r in rows][:job.max_eval_prompts]
    return replace(s, eval_rows=rows, eval_features=features, eval_prompts=prompts)


# ---------------------------------------------------------------- the evaluation

def evaluate(s: Setup, job: JobConfig, reward_fn, with_kl: bool, accuracy: dict | None = None) -> dict:
    """Held-out implicit-reward accuracy (``accuracy``, when the training loop's last
    :class:`~dpo_lib.evaluation.HeldoutEval` already measured it on the final weights), samples on the held-out
    prompts with their true rewards, and (``with_kl``) the sequence-level KL of the samples' policy to the
    reference."""
    result: dict = {}
    pad, c = s.tokenizer.pad_token_id, s.config
    with autocast(c.precision):
        if s.eval_features:
            result["accuracy"] = accuracy or implicit_reward_accuracy(s.model, s.eval_features, pad, c.beta,
                                                                      **c.scoring)
        if reward_fn and s.eval_prompts:
            result["samples"] = generate(s.model, s.tokenizer, s.eval_prompts, n=job.eval_samples,
                                         max_new_tokens=job.max_new_tokens, seed=c.seed + 1, sampler=job.sampler)
            if with_kl:
                result["kl"] = sequence_kl(s.model, s.reference.model, result["samples"], pad,
                                           compact_head=c.compact_lm_head)
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
        reward_gain = gain(pol, ref)
        out["reward_gain"], out["reward_gain_se"] = reward_gain.value, reward_gain.se
        out["win_rate"], out["win_rate_se"] = win_rate(pol, ref)
        out["kl_to_reference"], out["kl_to_reference_se"] = after["kl"]
        # each held-out sample's true reward, in the order sampled (prompt-major, the baseline's order): runs
        # evaluated on the same prompts and seed are compared by their paired difference
        # (dpo_lib.stats.arms_difference), not by their summaries' SEs
        out["rewards_after"] = [float(r) for r in pol]
    return out
