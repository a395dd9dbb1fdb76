"""The settings of a DPO run, in one place: their defaults, their help and their allowed values.

:class:`TrainConfig` holds what the optimisation depends on (the loss, β, the optimizer, the
batches); :class:`JobConfig` what the main job adds around it (the model, the data, the
evaluation); :class:`IterateConfig` what ``python -m dpo_lib iterate`` adds (the rounds of iterative
on-policy DPO). Each field carries its help text and its check in ``metadata``, and
``python -m dpo_lib train`` builds its flags from these fields (:func:`add_arguments`), so a
default, its ``--help`` line and ``TrainConfig()`` cannot disagree. The defaults are the main
job's: the embedded SmolLM2-135M-Instruct on the bundled sentiment pairs, on a CPU.

Every check runs when a config is made (``__post_init__``): a bad value raises
:class:`ConfigError` naming the field, before any model is loaded. This module imports no torch,
so the command line rejects a bad flag in a fraction of a second; the names of the losses and
precisions live here for that reason (:data:`dpo_lib.losses.LOSS_TYPES`, ``REFERENCE_FREE_LOSSES``,
``LENGTH_LOSSES`` and :data:`dpo_lib.precision.PRECISIONS` are these tuples).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

REPO_DATA = Path(__file__).resolve().parent.parent / "data"
DEFAULT_TRAIN = REPO_DATA / "sentiment" / "train.jsonl"
DEFAULT_TEST = REPO_DATA / "sentiment" / "test.jsonl"
DEFAULT_TEST_PROMPTS = REPO_DATA / "sentiment" / "prompts_test.jsonl"
SCHEDULES = ("cosine", "linear", "constant")
LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "dpop", "rdpo", "simpo", "orpo")  # dpo_lib.losses.dpo_loss
REFERENCE_FREE_LOSSES = ("simpo", "orpo")          # no reference log-probs: the trainer skips the reference
LENGTH_LOSSES = ("simpo", "orpo", "rdpo")          # also take the completion token counts |y_w|, |y_l|
PRECISIONS = ("auto", "fp32", "bf16")                # dpo_lib.precision


class ConfigError(ValueError):
    """A setting out of its range; ``name`` is the field (the flag is ``--name`` with dashes)."""

    def __init__(self, name: str, message: str):
        super().__init__(f"{name}: {message}")
        self.name, self.message = name, message

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


# ---------------------------------------------------------------- checks: value -> problem or None

def positive(v) -> str | None:
    return None if v > 0 else f"must be > 0 (got {v})"


def at_least(lo) -> Callable:
    return lambda v: None if v >= lo else f"must be >= {lo} (got {v})"


def in_range(lo, hi, hi_open: bool = True) -> Callable:
    def check(v):
        ok = lo <= v < hi if hi_open else lo <= v <= hi
        return None if ok else f"must be in [{lo}, {hi}{')' if hi_open else ']'} (got {v})"
    return check


def one_of(choices) -> Callable:
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)} (got {v!r})"


def optional(check: Callable) -> Callable:
    return lambda v: None if v is None else check(v)


def readable_file(v) -> str | None:
    p = Path(v)
    if not p.exists():
        return f"no such file: {p}"
    if not p.is_file():
        return f"not a file (a folder?): {p}"
    return None if os.access(p, os.R_OK) else f"cannot read {p}"


def writable_folder(v) -> str | None:
    p = Path(v)
    if p.exists() and not p.is_dir():
        return f"exists and is not a folder: {p}"
    parent = next((q for q in [p, *p.parents] if q.exists()), Path("."))
    return None if os.access(parent, os.W_OK) else f"cannot write in {parent}"


def setting(default: Any, help: str, check: Callable | None = None, choices=None, cli: bool = True):
    """A config field with its ``--help`` text, its check and (for strings) its choices."""
    if choices is not None and check is None:
        check = one_of(choices)
    return field(default=default, metadata={"help": help, "check": check, "choices": choices, "cli": cli})


class _Checked:
    def __post_init__(self):
        for f in fields(self):
            check = f.metadata.get("check")
            problem = check(getattr(self, f.name)) if check else None
            if problem:
                raise ConfigError(f.name, problem)
        self.check_combinations()

    def check_combinations(self) -> None:
        pass


@dataclass
class TrainConfig(_Checked):
    """Settings of :class:`dpo_lib.trainer.DPOTrainer`. Defaults: the main job (62 steps of 8 pairs)."""

    beta: float = setting(0.1, "KL strength β: higher keeps the policy closer to the reference (simpo: the reward "
                          "scale, its authors train with 2-10; orpo: the weight λ of the odds-ratio term, as TRL's)",
                          positive)
    loss_type: str = setting("sigmoid", "sigmoid (DPO), ipo, hinge, robust, dpop or rdpo; simpo and orpo need no "
                             "reference (see dpo_lib.losses)", choices=LOSS_TYPES)
    label_smoothing: float = setting(0.0, "ε > 0: conservative DPO (sigmoid, dpop, rdpo, simpo) or robust DPO "
                                     "(robust); not for orpo", in_range(0.0, 0.5))
    nll_weight: float = setting(0.0, "α > 0: DPO + α·NLL of the chosen response (not for orpo, which has its own)",
                                at_least(0.0))
    # 0.5: TRL's CPOConfig.simpo_gamma
    simpo_gamma: float = setting(0.5, "simpo: target reward margin γ between the chosen and rejected "
                                 "β·mean log-probs", at_least(0.0))
    # 50: the λ of the Smaug runs as public DPOP code quotes it (the paper's value, not re-checked here)
    dpop_lambda: float = setting(50.0, "dpop: weight λ of the penalty max(0, log π_ref(y_w) − log π(y_w)) "
                                 "inside the sigmoid", at_least(0.0))
    # 0.05: a starting value for ~10-40-token answers, not the paper's (R-DPO tunes α per dataset)
    rdpo_alpha: float = setting(0.05, "rdpo: α per token of the length gap |y_w| − |y_l| added to the logit "
                                "(0: plain DPO)", at_least(0.0))
    # 1e-5: DPO starts from a good model and wants ~10x less than SFT; 2 epochs reach ~0.75 held-out accuracy
    learning_rate: float = setting(1e-5, "peak learning rate of AdamW", positive)
    batch_size: int = setting(8, "pairs per optimizer step", at_least(1))
    grad_accum: int = setting(2, "micro-batches per step (micro-batch = batch size / this)", at_least(1))
    max_steps: int = setting(0, "optimizer steps (0: --epochs passes over the data)", at_least(0))
    epochs: int = setting(2, "passes over the data when --max-steps is 0", at_least(1))
    warmup_ratio: float = setting(0.1, "fraction of the steps with a linear warm-up", in_range(0.0, 1.0))
    schedule: str = setting("cosine", "learning-rate decay after the warm-up", choices=SCHEDULES)
    weight_decay: float = setting(0.0, "AdamW weight decay (not on biases and norms)", at_least(0.0))
    max_grad_norm: float = setting(1.0, "clip the gradient norm to this", positive)
    seed: int = setting(0, "seed of the data order, dropout-free init and sampling", at_least(0))
    print_every: int = setting(8, "print the metrics table every N steps (0: never)", at_least(0))
    save_every: int = setting(0, "write a resumable checkpoint every N steps (0: none)", at_least(0))
    keep_checkpoints: int = setting(2, "how many checkpoints to keep", at_least(1))
    shuffle: bool = setting(True, "shuffle the pairs each epoch (off: file order)")
    # the two speed levers: same loss to float rounding, fewer FLOPs (python -m dpo_lib bench)
    sort_by_length: bool = setting(True, "sort each step's pairs by length into micro-batches: less padding")
    compact_lm_head: bool = setting(True, "LM head only on the positions that score a completion token")
    precision: str = setting("auto", "bf16: forwards under bf16 autocast (weights and optimizer stay float32); "
                             "auto: bf16 where the CPU/GPU has bf16 matmul units, else fp32", choices=PRECISIONS)

    def check_combinations(self) -> None:
        if self.batch_size % self.grad_accum:
            raise ConfigError("grad_accum", f"must divide --batch-size {self.batch_size} (got {self.grad_accum})")
        if self.loss_type == "orpo" and self.nll_weight:
            raise ConfigError("nll_weight", f"must be 0 with --loss-type orpo, whose loss holds the NLL already "
                              f"(got {self.nll_weight})")
        if self.loss_type == "orpo" and self.label_smoothing:
            raise ConfigError("label_smoothing", f"does not apply to --loss-type orpo (got {self.label_smoothing})")


@dataclass
class JobConfig(_Checked):
    """What ``python -m dpo_lib train`` adds around the trainer: model, data, evaluation, output."""

    model: str | None = setting(None, "a folder with config.json + *.safetensors, or a hub id (online); "
                                "default: the embedded SmolLM2-135M-Instruct")
    dataset: Path = setting(DEFAULT_TRAIN, "training pairs, JSONL", readable_file)
    eval_dataset: Path | None = setting(DEFAULT_TEST, "held-out pairs, JSONL", optional(readable_file))
    reward: str | None = setting("sentiment", "ground-truth reward of sampled answers ('none' to skip)")
    out: Path | None = setting(None, "output folder (default: runs/dpo-TIMESTAMP)", optional(writable_folder))
    max_length: int = setting(160, "tokens per prompt + response", at_least(2))
    max_prompt_length: int = setting(64, "prompt tokens kept (from the end)", optional(at_least(1)))
    eval_samples: int = setting(2, "samples per held-out prompt for the true reward", at_least(1))
    max_eval_prompts: int = setting(64, "held-out prompts sampled for the true reward", at_least(0))
    max_new_tokens: int = setting(40, "length cap of the evaluation samples", at_least(1))
    # 16: four held-out points over the default 2 epochs of 31 steps; each is one forward over the held-out pairs
    eval_every: int = setting(16, "held-out accuracy and margin every N steps, for the curves (0: only at the end)",
                              at_least(0))
    skip_invalid: bool = setting(False, "drop bad rows (and say how many) instead of stopping")
    resume: bool = setting(False, "continue from the last checkpoint in --out")
    force_resume: bool = setting(False, "with --resume: continue even if settings differ from the run card")
    trust_remote_code: bool = setting(False, "allow model code from the hub (off unless you ask)")
    threads: int | None = setting(None, "torch CPU threads (default: all cores)", optional(at_least(1)))

    def check_combinations(self) -> None:
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise ConfigError("max_prompt_length", f"must be < --max-length {self.max_length} "
                              f"(got {self.max_prompt_length})")
        if self.resume and self.out is None:
            raise ConfigError("resume", "needs the --out folder of the run to continue")


JUDGES = ("sentiment",)            # judges available offline by name (dpo_lib.rewards.REWARDS); others via the API
REFERENCE_MODES = ("initial", "previous")


@dataclass
class IterateConfig(_Checked):
    """What ``python -m dpo_lib iterate`` adds to the training settings: the rounds of iterative
    on-policy DPO (:func:`dpo_lib.iterate.iterate`)."""

    prompts: Path | None = setting(None, "training prompts, JSONL with a 'prompt' per line (required)",
                                   optional(readable_file))
    rounds: int = setting(2, "rounds of sample, judge, pair, train; a re-run with more rounds continues", at_least(1))
    samples_per_prompt: int = setting(4, "answers sampled per prompt and round", at_least(2))
    min_gap: float = setting(0.05, "skip prompts whose best and worst judged answers differ by less", at_least(0.0))
    judge: str = setting("sentiment", "what scores the sampled answers (sentiment: VADER, the ground truth)",
                         choices=JUDGES)
    reference: str = setting("initial", "the DPO reference of each round: the starting model (initial) or the "
                             "policy the last round ended with (previous)", choices=REFERENCE_MODES)
    temperature: float = setting(1.0, "sampling temperature of the training answers", positive)
    sample_max_new_tokens: int = setting(40, "length cap of the sampled training answers", at_least(1))

    def check_combinations(self) -> None:
        if self.prompts is None:
            raise ConfigError("prompts", "is required: a JSONL file with a 'prompt' per line (got nothing)")


# ---------------------------------------------------------------- the command line, built from the fields

def _arg_type(annotation: str):
    """The argparse type of a field from its annotation (a string: ``from __future__ import annotations``)."""
    for name, kind in (("Path", Path), ("float", float), ("int", int)):
        if name in annotation:
            return kind
    return str


def add_arguments(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One ``--flag`` per field of ``cls``; argparse defaults are left unset (``SUPPRESS``) so that
    :func:`from_args` takes every default from the dataclass itself."""
    for f in fields(cls):
        if not f.metadata.get("cli", True) or f.name in skip:
            continue
        flag, meta = "--" + f.name.replace("_", "-"), f.metadata
        shown = f.default if not isinstance(f.default, Path) else _short(f.default)
        help_text = f"{meta['help']} (default: {shown})"
        if isinstance(f.default, bool):  # off by default: --flag; on by default: --flag / --no-flag
            action = argparse.BooleanOptionalAction if f.default else "store_true"
            parser.add_argument(flag, action=action, default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, type=_arg_type(str(f.type)), choices=meta.get("choices"),
                                default=argparse.SUPPRESS, help=help_text, metavar=None if meta.get("choices")
                                else f.name.upper())


def _short(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def from_args(cls, args: argparse.Namespace, **overrides):
    """``cls`` from the parsed flags: a flag the user gave wins, else the dataclass default."""
    given = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    return cls(**{**given, **overrides})
