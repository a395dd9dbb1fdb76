"""The settings of every command, in one place: their defaults, their help and their allowed values.

:class:`TrainConfig` holds what the optimisation depends on (the loss, β, the optimizer, the
batches); :class:`JobConfig` what the main job adds around it (the model, the data, the
evaluation); :class:`IterateConfig` what ``python -m dpo_lib iterate`` adds (the rounds of iterative
on-policy DPO); :class:`PairsConfig` and :class:`LengthsConfig` the sampling commands (both built on
:class:`SamplingConfig`); :class:`ValidateConfig` the data check. Fields are made by
:func:`dpo_lib.settings.setting` and checked when a config is made, so a bad value raises
:class:`dpo_lib.settings.ConfigError` naming the field before any model is loaded; the command line
builds its flags from the same fields. Each loss's own knobs (``simpo_gamma``, ``dpop_lambda``,
``rdpo_alpha``) are ``TrainConfig`` fields read from the loss registry (:data:`dpo_lib.losses.LOSSES`).
The defaults are the main job's: the embedded SmolLM2-135M-Instruct on the bundled sentiment pairs,
on a CPU. This module imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dpo_lib.losses import LOSS_TYPES, LOSSES
from dpo_lib.settings import (
    Checked,
    ConfigError,
    at_least,
    in_range,
    input_file,
    one_of,
    optional,
    output_file,
    positive,
    readable_file,
    setting,
    writable_folder,
)

__all__ = ["DEFAULT_TEST", "DEFAULT_TEST_PROMPTS", "DEFAULT_TRAIN", "INCOMPLETE", "JUDGES", "PRECISIONS",
           "REFERENCE_MODES", "REPO_DATA", "RUN_FILES", "RUN_FOLDERS", "SCHEDULES", "IterateConfig", "JobConfig",
           "LengthsConfig", "ModelConfig", "PairsConfig", "SamplingConfig", "TrainConfig", "ValidateConfig",
           "BenchConfig", "model_source", "same_file", "with_loss_params"]

REPO_DATA = Path(__file__).resolve().parent.parent / "data"
DEFAULT_TRAIN = REPO_DATA / "sentiment" / "train.jsonl"
DEFAULT_TEST = REPO_DATA / "sentiment" / "test.jsonl"
DEFAULT_TEST_PROMPTS = REPO_DATA / "sentiment" / "prompts_test.jsonl"
SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")        # dpo_lib.precision
JUDGES = ("sentiment",)            # judges available offline by name (dpo_lib.rewards.REWARDS); others via the API
REFERENCE_MODES = ("initial", "previous")
# the TrainConfig speed switches `bench --vs lever` turns off one at a time
BENCH_LEVERS = ("sort_by_length", "compact_lm_head", "shared_prompt", "padding_free", "sparse_embedding_grad")
INCOMPLETE = ("trim", "drop", "keep")  # what `pairs` does with an answer the token cap cut (dpo_lib.sampling)
SAMPLERS = ("dpo_lib", "hf")  # generate's decode loop: its own (dpo_lib.sampling.decode), or model.generate
# what a train run writes in --out: folders, then files (dpo_lib.recipes.train)
RUN_FOLDERS = ("final", "checkpoints", "cache")
RUN_FILES = ("run_card.json", "summary.json", "metrics.jsonl", "samples.md")


def model_source(v) -> str | None:
    """A model folder with its config and weights (``config.json`` + ``*.safetensors``), or a hub id."""
    p = Path(str(v)).expanduser()
    if p.is_dir():
        missing = [w for w, ok in (("config.json", (p / "config.json").is_file()),
                                   ("*.safetensors", any(p.glob("*.safetensors")))) if not ok]
        return f"{p} is a folder without model weights (no {' or '.join(missing)})" if missing else None
    if p.exists():
        return f"{p} is a file; expected a model folder (config.json + *.safetensors) or a hub id"
    return None  # a hub id, or a folder that does not exist: the loader says which it tried


def _busy(out: Path) -> bool:
    """Whether a live run holds ``out``'s lock (:func:`dpo_lib.recipes.run.claim_folder`)."""
    import fcntl
    if not (out / ".lock").is_file():
        return False
    with open(out / ".lock") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
    return False


def same_file(a, b) -> bool:
    return a is not None and b is not None and Path(a).resolve() == Path(b).resolve()


def with_loss_params(cls):
    """Class decorator: one field per loss parameter of the registry (``simpo_gamma``, ``dpop_lambda``,
    ``rdpo_alpha`` …), with the default, help and check its loss declares; added before ``@dataclass``
    reads the class, after the fields written in the class body."""
    for loss in LOSSES.values():
        for name, p in loss.params.items():
            cls.__annotations__[name] = "float"
            setattr(cls, name, setting(p.default, p.help, p.check))
    return cls

@dataclass
@with_loss_params
class TrainConfig(Checked):
    """Settings of :class:`dpo_lib.trainer.DPOTrainer`. Defaults: the main job (one pass, 31 steps of 8 pairs)."""

    beta: float = setting(0.1, "KL strength β: higher keeps the policy closer to the reference (simpo: the reward "
                          "scale, its authors train with 2-10; orpo: the weight λ of the odds-ratio term, as TRL's)",
                          positive)
    loss_type: str = setting("sigmoid", ", ".join(f"{k}: {v.help}" for k, v in LOSSES.items()), choices=LOSS_TYPES)
    label_smoothing: float = setting(0.0, "ε > 0: conservative DPO (sigmoid, dpop, rdpo, simpo) or robust DPO "
                                     "(robust); not for orpo", in_range(0.0, 0.5))
    nll_weight: float = setting(0.0, "α > 0: DPO + α·NLL of the chosen response (not for orpo, which has its own)",
                                at_least(0.0))
    # 2e-5 for one pass: DPO starts from a good model and wants ~10x less than SFT. Lesson 03 measured one epoch at
    # 2e-5 against two at 1e-5 (the defaults until 2026-12-07): the same held-out accuracy (0.656), a VADER gain within
    # 0.1 SE, a larger KL (2.4 against 1.65 nats), in half the steps and without a second pass over seen pairs
    learning_rate: float = setting(2e-5, "peak learning rate of AdamW", positive)
    batch_size: int = setting(8, "pairs per optimizer step", at_least(1))
    grad_accum: int = setting(2, "micro-batches per step (micro-batch = batch size / this)", at_least(1))
    max_steps: int = setting(0, "optimizer steps (0: --epochs passes over the data)", at_least(0))
    epochs: int = setting(1, "passes over the data when --max-steps is 0", at_least(1))
    warmup_ratio: float = setting(0.1, "fraction of the steps with a linear warm-up", in_range(0.0, 1.0))
    schedule: str = setting("cosine", "learning-rate decay after the warm-up", choices=SCHEDULES)
    weight_decay: float = setting(0.0, "AdamW weight decay (not on biases and norms)", at_least(0.0))
    max_grad_norm: float = setting(1.0, "clip the gradient norm to this", positive)
    seed: int = setting(0, "seed of the data order, dropout-free init and sampling", at_least(0))
    print_every: int = setting(8, "print the metrics table every N steps (0: never)", at_least(0))
    save_every: int = setting(0, "write a resumable checkpoint every N steps (0: none)", at_least(0))
    keep_checkpoints: int = setting(2, "how many checkpoints to keep", at_least(1))
    shuffle: bool = setting(True, "shuffle the pairs each epoch (off: file order)")
    # the speed levers: same loss to float rounding, less work (python -m dpo_lib bench)
    sort_by_length: bool = setting(True, "sort each step's pairs by length into micro-batches: less padding")
    compact_lm_head: bool = setting(True, "LM head only on the positions that score a completion token")
    shared_prompt: bool = setting(True, "with the compact LM head: one row [prompt | chosen | rejected] per pair, "
                                  "the prompt's tokens through the model once instead of twice")
    padding_free: bool = setting(True, "with the shared prompt: a micro-batch's pairs end to end in one row, no "
                                 "padding, for the linear layers (attention still pair by pair)")
    sparse_embedding_grad: bool = setting(True, "a tied input embedding gets a sparse gradient (no dense [V, d] "
                                          "fill per micro-batch; the weight's .grad stays dense)")
    precision: str = setting("auto", "bf16: forwards under bf16 autocast (weights and optimizer stay float32); "
                             "fp16: the same in float16 with a dynamic loss scaler (GPUs without bf16); "
                             "auto: a GPU's bf16, else fp16; on a CPU bf16 only where a start-up probe measures "
                             "it faster than fp32", choices=PRECISIONS)

    @property
    def scoring(self) -> dict:
        """How pairs are scored outside the training step too (reference log-probs, held-out accuracy, KL):
        :func:`dpo_lib.logprobs.concatenated_forward`'s ``compact_head`` / ``shared_prompt`` / ``padding_free``,
        as the step scores them, so the untrained policy's implicit rewards are exactly 0."""
        return {"compact_head": self.compact_lm_head, "shared_prompt": self.shared_prompt,
                "padding_free": self.padding_free}

    def check_combinations(self) -> None:
        if self.batch_size % self.grad_accum:
            raise ConfigError("grad_accum", f"must divide --batch-size {self.batch_size} (got {self.grad_accum})")
        loss = LOSSES[self.loss_type]
        if loss.holds_nll and self.nll_weight:
            raise ConfigError("nll_weight", f"must be 0 with --loss-type {self.loss_type}, whose loss holds the NLL "
                              f"already (got {self.nll_weight})")
        if not loss.smoothing and self.label_smoothing:
            raise ConfigError("label_smoothing", f"does not apply to --loss-type {self.loss_type} "
                              f"(got {self.label_smoothing})")


@dataclass
class ModelConfig(Checked):
    """The model flags every command that loads a model shares."""

    model: str | None = setting(None, "a folder with config.json + *.safetensors, or a hub id (online); "
                                "default: the embedded SmolLM2-135M-Instruct", optional(model_source))
    trust_remote_code: bool = setting(False, "allow model code from the hub (off unless you ask)")
    threads: int | None = setting(None, "torch CPU threads (default: all cores)", optional(at_least(1)))


@dataclass
class JobConfig(ModelConfig):
    """What ``python -m dpo_lib train`` adds around the trainer: model, data, evaluation, output."""

    dataset: Path = setting(DEFAULT_TRAIN, "training pairs, JSONL, or a hub dataset the converters know "
                            "(online: hh-rlhf, ultrafeedback, ultrafeedback-argilla, helpsteer3)", input_file)
    eval_dataset: Path | None = setting(DEFAULT_TEST, "held-out pairs, JSONL", optional(readable_file))
    reward: str | None = setting("sentiment", "ground-truth reward of sampled answers ('none' to skip)",
                                 optional(one_of(("none", *JUDGES))))
    out: Path | None = setting(None, "output folder (default: runs/dpo-TIMESTAMP)", optional(writable_folder))
    max_length: int = setting(160, "tokens per prompt + response", at_least(2))
    max_prompt_length: int = setting(64, "prompt tokens kept (from the end)", optional(at_least(1)))
    eval_samples: int = setting(2, "samples per held-out prompt for the true reward", at_least(1))
    max_eval_prompts: int = setting(64, "held-out prompts sampled for the true reward", at_least(0))
    max_new_tokens: int = setting(40, "length cap of the evaluation samples", at_least(1))
    sampler: str = setting("dpo_lib", "how answers are sampled (the evaluation's; iterate's training answers too): "
                           "dpo_lib's decode loop or transformers' model.generate (hf), the same distribution",
                           choices=SAMPLERS)
    # 16: two held-out points over the default epoch of 31 steps (16, 31); each is one forward over the 64 held-out
    # pairs, 11 s on 2 cores in bf16 (2026-12-07). Their SE is 0.06, so the points 8 steps apart that 8 gave
    # differed by less than their noise
    eval_every: int = setting(16, "held-out accuracy and margin every N steps, for the curves (0: only at the end)",
                              at_least(0))
    skip_invalid: bool = setting(False, "drop bad rows (and say how many) instead of stopping")
    capability: bool = setting(True, "measure the alignment tax before and after (general_nll, "
                               "instruction_following: dpo_lib.capability; 15 s each on 2 CPU cores in bf16, "
                               "24 s in fp32)")
    resume: bool = setting(False, "continue from the last checkpoint in --out")
    overwrite: bool = setting(False, "start over in an --out that holds a run: its final model, checkpoints, "
                              "metrics and summary are deleted first")
    force_resume: bool = setting(False, "with --resume: continue even if settings differ from the run card")

    def check_combinations(self) -> None:
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise ConfigError("max_prompt_length", f"must be < --max-length {self.max_length} "
                              f"(got {self.max_prompt_length})")
        if self.resume and self.out is None:
            raise ConfigError("resume", "needs the --out folder of the run to continue")
        if self.resume and self.overwrite:
            raise ConfigError("overwrite", "and --resume contradict each other: choose one")

    def check_out_folder(self) -> None:
        """``train``'s output folder, before anything is loaded: what the run will write there is not in the way
        (a file where a folder goes, or the reverse), and a run already there is continued (``--resume``) or
        replaced (``--overwrite``), never overwritten by accident."""
        out = Path(self.out)
        for name in RUN_FOLDERS:
            if (out / name).exists() and not (out / name).is_dir():
                raise ConfigError("out", f"{out / name} is a file, where the run writes a folder; move it away")
        for name in RUN_FILES:
            if (out / name).is_dir():
                raise ConfigError("out", f"{out / name} is a folder, where the run writes a file; move it away")
        held = [n for n in ("summary.json", "run_card.json", "final", "checkpoints") if (out / n).exists()]
        if held and not (self.resume or self.overwrite or _busy(out)):  # a live run: the run layer names its pid
            what = "a finished run" if (out / "summary.json").exists() else "a run"
            raise ConfigError("out", f"{out} holds {what} ({', '.join(held)}): --resume to continue it, "
                              "--overwrite to start over (deleting it), or another --out")


@dataclass
class IterateConfig(Checked):
    """What ``python -m dpo_lib iterate`` adds to the training settings: the rounds of iterative
    on-policy DPO (:func:`dpo_lib.recipes.iterate.iterate`)."""

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
    incomplete: str = setting("trim", "a training answer the cap cut: trim it to its last complete sentence, drop "
                              "it, or keep it as cut (as the bundled pairs were made: `pairs --incomplete`)",
                              choices=INCOMPLETE)
    # A policy is the model's full weights (0.5 GB for the default model in float32): by default a finished
    # round deletes the one before it, keeping round 1's (branch starts from it) and the last (resume does).
    keep_every_policy: bool = setting(False, "keep every round's policy/ (default: round 1's and the last round's)")

    def check_combinations(self) -> None:
        if self.prompts is None:
            raise ConfigError("prompts", "is required: a JSONL file with a 'prompt' per line (got nothing)")


@dataclass
class SamplingConfig(Checked):
    """How answers are sampled (:func:`dpo_lib.sampling.generate`): shared by ``pairs`` and ``lengths``;
    ``iterate`` samples with the same defaults under its own names (``--samples-per-prompt``,
    ``--sample-max-new-tokens``, ``--temperature``)."""

    num_samples: int = setting(4, "answers sampled per prompt", at_least(1), flag="-n/--num-samples")
    max_new_tokens: int = setting(40, "the longest answer sampled, in tokens", at_least(1))
    temperature: float = setting(1.0, "sampling temperature (0: greedy)", at_least(0.0))
    top_p: float = setting(1.0, "nucleus sampling; 1: the full distribution", in_range(0.0, 1.0, hi_open=False))
    batch_size: int = setting(32, "prompts per generation batch", at_least(1))
    seed: int = setting(0, "sampling seed", at_least(0))
    sampler: str = setting("dpo_lib", "dpo_lib: the library's decode loop (faster on a CPU); hf: transformers' "
                           "model.generate, the same distribution (how the bundled pairs were drawn: data/README.md)",
                           choices=SAMPLERS)

    def check_combinations(self) -> None:
        if self.top_p == 0:
            raise ConfigError("top_p", "must be > 0")


@dataclass
class PairsConfig(ModelConfig, SamplingConfig):
    """``python -m dpo_lib pairs``: sample answers per prompt, score them, keep best vs worst."""

    prompts: Path | None = setting(None, "JSONL with a 'prompt' per line (required)", optional(readable_file))
    out: Path | None = setting(None, "output JSONL of pairs (required)", optional(output_file))
    reward: str = setting("sentiment", "what scores the answers", choices=JUDGES)
    min_gap: float = setting(0.05, "skip prompts whose best and worst differ less", at_least(0.0))
    # 64: the cap of the bundled pairs (data/README.md): 28 % of the embedded model's answers end by then and
    # 98 % hold a complete sentence to trim to; at 128 only 43 % end, for twice the tokens.
    max_new_tokens: int = setting(64, "the longest answer sampled, in tokens", at_least(1))
    incomplete: str = setting("trim", "an answer the cap cut: trim it to its last complete sentence (flagged "
                              "chosen_trimmed/rejected_trimmed), drop it, or keep it as cut", choices=INCOMPLETE)
    check: bool = setting(False, "regenerate the first --check-prompts prompts and compare them with the --out "
                          "file instead of writing it (exit 1 on a difference)")
    check_prompts: int = setting(8, "how many prompts --check regenerates (rounded up to whole batches)",
                                 at_least(1))

    def check_combinations(self) -> None:
        super().check_combinations()
        for name in ("prompts", "out"):
            if getattr(self, name) is None:
                raise ConfigError(name, "is required (got nothing)")
        if self.check and not Path(self.out).is_file():
            raise ConfigError("out", f"--check compares with --out, which is not a file: {self.out}")
        if self.check and self.batch_size % self.num_samples:
            raise ConfigError("check", f"needs --batch-size ({self.batch_size}) to be a multiple of --num-samples "
                              f"({self.num_samples}), so that its batches are the full run's first batches")
        if self.num_samples < 2:
            raise ConfigError("num_samples", f"must be >= 2 to compare answers (got {self.num_samples})")
        if self.temperature <= 0:
            raise ConfigError("temperature", f"must be > 0: greedy answers to one prompt are all the same "
                              f"(got {self.temperature})")
        if same_file(self.out, self.prompts):
            raise ConfigError("out", f"is the --prompts file {self.prompts}: writing would overwrite the prompts")


@dataclass
class LengthsConfig(ModelConfig, SamplingConfig):
    """``python -m dpo_lib lengths``: sample answers and report where they end."""

    prompts: Path = setting(DEFAULT_TEST_PROMPTS, "JSONL with a 'prompt' per line", readable_file)
    num_samples: int = setting(2, "answers sampled per prompt", at_least(1), flag="-n/--num-samples")
    max_new_tokens: int = setting(512, "the longest answer sampled, in tokens", at_least(1))
    system: str | None = setting(None, "a system message put before every (conversational) prompt, replacing the "
                                 "prompt's own")
    json: Path | None = setting(None, "also write the profile to this JSON file", optional(output_file))

    def check_combinations(self) -> None:
        super().check_combinations()
        if same_file(self.json, self.prompts):
            raise ConfigError("json", f"is the --prompts file {self.prompts}: writing would overwrite the prompts")


@dataclass
class ValidateConfig(Checked):
    """``python -m dpo_lib validate FILE…``: check preference files, name every bad row."""

    skip_invalid: bool = setting(False, "report, keep the good rows, exit 0 if any remain")
    max_length: int | None = setting(None, "also flag prompts too long for this many tokens", optional(at_least(2)))
    model: str | None = setting(None, "tokenizer for --max-length (default: the embedded model)")


@dataclass
class BenchConfig(Checked):
    """``python -m dpo_lib bench --vs trl``: dpo_lib's trainer against TRL's on the same work
    (:mod:`dpo_lib.tools.bench`)."""

    vs: str = setting("trl", "trl: TRL's DPOTrainer; lever: dpo_lib without --lever; generate: dpo_lib's sampling "
                      "loop against transformers' model.generate", choices=("trl", "lever", "generate"))
    lever: str | None = setting(None, "with --vs lever: the lever to measure, on against off",
                                optional(one_of(BENCH_LEVERS)), choices=BENCH_LEVERS)
    json: Path | None = setting(None, "write the results to this JSON file", optional(output_file))
    model: str | None = setting(None, "model folder (default: the embedded SmolLM2-135M-Instruct)",
                                optional(model_source))
    dataset: Path | None = setting(None, "preference JSONL (default: data/sentiment/train.jsonl, else "
                                   "data/assistant/train.jsonl)", optional(readable_file))
    # the first step of each run is a warm-up, not timed
    steps: int = setting(5, "optimizer steps per run (the first is not timed)", at_least(2))
    batch_size: int = setting(4, "pairs per optimizer step", at_least(1))
    micro_batch_size: int | None = setting(None, "dpo_lib pairs per forward (default: up to 4 on a CPU, the whole "
                                           "batch on a GPU)", optional(at_least(1)))
    max_length: int = setting(160, "tokens per prompt+response; longer pairs are skipped", at_least(2))
    repeats: int = setting(2, "runs of each trainer, alternating", at_least(1))
    learning_rate: float = setting(1e-5, "peak learning rate", positive)
    beta: float = setting(0.1, "KL strength β", positive)
    seed: int = setting(0, "seed", at_least(0))
    threads: int | None = setting(None, "torch CPU threads per run (default: all cores)", optional(at_least(1)))
    device: str = setting("cpu", "where both trainers run", choices=("cpu", "cuda"))
    dtype: str = setting("fp32", "bf16: autocast, fp32 master weights", choices=("fp32", "bf16"))
    attention: str = setting("sdpa", "attention of both trainers' models: sdpa (transformers' default) or eager (as "
                             "the main job loads the model)", choices=("sdpa", "eager"))
    peak_flops: float | None = setting(None, "peak FLOP/s for MFU (default: the GPU's data sheet, or a timed matmul "
                                       "on the CPU)", optional(positive))

    def check_combinations(self) -> None:
        if same_file(self.json, self.dataset):
            raise ConfigError("json", f"is the --dataset file {self.dataset}: writing would overwrite the data")
        if (self.vs == "lever") != (self.lever is not None):
            raise ConfigError("lever", "names the lever to measure with --vs lever, and only then "
                              f"(one of {', '.join(BENCH_LEVERS)})")
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size:
            raise ConfigError("micro_batch_size", f"must divide --batch-size {self.batch_size} "
                              f"(got {self.micro_batch_size})")
