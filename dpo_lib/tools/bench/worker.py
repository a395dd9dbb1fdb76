"""One run of one trainer for ``python -m dpo_lib bench``, in a fresh process.

The parent (:mod:`dpo_lib.tools.bench`) writes a spec (model, pairs, steps, settings, ``impl``: ``trl`` or
``dpo_lib``) to a JSON file and runs ``python -m dpo_lib.tools.bench SPEC OUT``; :func:`child`
loads the model, trains, and returns the timings, losses, token counts and peak memory that the
parent writes to ``OUT``. What is timed, and how the two trainers are set up, is described in
:mod:`dpo_lib.tools.bench`.
"""

from __future__ import annotations

import statistics
import tempfile
import time

__all__ = ["PolicyAsReference", "child", "levers", "pair_tokens"]


def pair_tokens(f: dict) -> int:
    """Non-padding tokens of one pair in the concatenated batch: prompt+chosen and prompt+rejected."""
    return 2 * len(f["prompt_ids"]) + len(f["chosen_ids"]) + len(f["rejected_ids"])


def _sync(device: str) -> None:
    if device == "cuda":
        import torch
        torch.cuda.synchronize()


def levers(spec: dict) -> dict:
    """The TrainConfig speed switches of a run: every one of :data:`~dpo_lib.config.BENCH_LEVERS` on but those
    in ``spec["levers_off"]``."""
    from dpo_lib.config import BENCH_LEVERS
    return {lever: lever not in spec.get("levers_off", []) for lever in BENCH_LEVERS}


class PolicyAsReference:
    """The policy before its first update *is* π_ref: score batches with it under ``no_grad``
    in eval mode (compact LM head), so no second copy of the weights is ever made."""

    def __init__(self, model, spec: dict):
        from dpo_lib.config import TrainConfig
        self.model, self.spec = model, spec
        self.scoring = TrainConfig(**levers(spec)).scoring    # scored as the training step scores them

    def __call__(self, batch: dict):
        import torch

        from dpo_lib.features import batch_to
        from dpo_lib.logprobs import concatenated_forward
        from dpo_lib.precision import autocast
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), autocast(self.spec["dtype"], self.spec["device"]):
                batch = batch_to(batch, self.spec["device"])
                chosen, rejected = concatenated_forward(self.model, batch, **self.scoring)
                return chosen.float().cpu(), rejected.float().cpu()
        finally:
            self.model.train(was_training)


def run_dpo_lib(spec: dict, model, tokenizer) -> dict:
    from dpo_lib.config import TrainConfig
    from dpo_lib.features import token_ids_hash, tokenize_rows
    from dpo_lib.reference import precompute_reference_logps
    from dpo_lib.trainer import DPOTrainer

    pad = tokenizer.pad_token_id
    t0 = time.perf_counter()
    features, _ = tokenize_rows(tokenizer, spec["rows"], max_length=spec["max_length"])
    t_ref, c_ref = time.perf_counter(), time.process_time()
    features = precompute_reference_logps(PolicyAsReference(model, spec), features, pad,  # length-sorted batches
                                          batch_size=spec["batch_size"])
    reference_seconds = time.perf_counter() - t_ref
    reference_cpu_seconds = time.process_time() - c_ref
    micro = spec["micro_batch_size"]
    config = TrainConfig(beta=spec["beta"], learning_rate=spec["learning_rate"], batch_size=spec["batch_size"],
                         grad_accum=spec["batch_size"] // micro, max_steps=spec["steps"], warmup_ratio=0.0,
                         schedule="constant", weight_decay=0.0, max_grad_norm=1.0, seed=spec["seed"],
                         print_every=0, shuffle=False, precision="fp32",  # bf16: autocast by the Accelerator below
                         **levers(spec))
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
            "tokens_hash": token_ids_hash(features), "step_tokens": _step_tokens(features, spec),
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

    from dpo_lib.features import token_ids_hash

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
        save_strategy="no", seed=spec["seed"], max_grad_norm=1.0, weight_decay=0.0, optim="adamw_torch_fused",
        disable_tqdm=True, use_cpu=spec["device"] == "cpu", bf16=spec["dtype"] == "bf16",
        train_sampling_strategy="sequential", dataloader_num_workers=0)
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in spec["rows"]]
    t0 = time.perf_counter()
    trainer = trl.DPOTrainer(model=model, ref_model=ref_model, args=args,
                             train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer,
                             callbacks=[StepTimer()])
    prep_seconds = time.perf_counter() - t0
    trainer.train()
    shutil.rmtree(tmp, ignore_errors=True)
    features = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    return {"prep_seconds": prep_seconds, "reference_seconds": 0.0, "reference_cpu_seconds": 0.0,
            "step_seconds": [b - a for a, b in zip(stamps, stamps[1:])],
            "step_cpu_seconds": [b - a for a, b in zip(cpu, cpu[1:])], "losses": losses,
            "tokens_hash": token_ids_hash(features), "step_tokens": _step_tokens(features, spec),
            "step_scored_tokens": _step_tokens(features, spec, scored=True)}


def child(spec: dict) -> dict:
    """One run of one trainer, in this (fresh) process."""
    import torch

    from dpo_lib.models import load_model
    from dpo_lib.tools.flops import dpo_step_flops
    from dpo_lib.tools.memory import peak_memory_bytes, rss_bytes
    from dpo_lib.tools.specs import model_spec

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    if spec["impl"] == "trl":  # import before the baseline below, like dpo_lib's modules already are
        import datasets  # noqa: F401
        import trl  # noqa: F401
    t0 = time.perf_counter()
    attention = spec["attention"]
    model, tokenizer = load_model(spec["model"], device=spec["device"], attn_implementation=attention)
    ref_model = load_model(spec["model"], device=spec["device"], attn_implementation=attention)[0] \
        if spec["impl"] == "trl" else None
    load_seconds = time.perf_counter() - t0
    rss_after_load = rss_bytes() or 0
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
    shape = model_spec(model)
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
        "attention": model.config._attn_implementation,        # what the model ran, not only what was asked
    })
    return out
