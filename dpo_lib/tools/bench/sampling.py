"""``python -m dpo_lib bench --vs generate``: :func:`dpo_lib.sampling.generate`'s own decode loop
(``sampler="dpo_lib"``: :func:`dpo_lib.sampling.decode`) against transformers' ``model.generate``
(``sampler="hf"``), on the same prompts, model and precision, in one process.

The work is the main job's evaluation sampling: the first 64 prompts of the held-out pairs
(``data/sentiment/test.jsonl``, or of ``--dataset``), 2 samples each, at most 40 new tokens, temperature 1.
Four arms, two levers:

* ``hf@32``: ``model.generate`` in batches of 32 rows (what ``generate`` did before 2026-12-07);
* ``hf@auto``: ``model.generate`` in batches of :func:`~dpo_lib.sampling.sampling_batch_size` rows (128 here);
* ``dpo_lib@32`` and ``dpo_lib@auto``: the decode loop at the same two batch sizes.

``loop_ratio`` is dpo_lib@auto over hf@auto (the loop alone), ``batch_ratio`` dpo_lib@auto over dpo_lib@32 (the
batch alone), ``throughput_ratio`` dpo_lib@auto over hf@32 (both: the default now against the default before).
Every arm runs inside the same :func:`~dpo_lib.sampling.generate` (chat template, left padding, decoding the
text): only the loop and the batch differ — and the attention: the model is loaded with eager attention, as
the main job loads it, which ``model.generate`` runs, while the decode loop runs SDPA
(:func:`~dpo_lib.sampling.decode_attention`, from 2026-12-07 on; ``settings["attention"]``), so the loop's ratio
includes it. The greedy check runs both loops on SDPA. The arms alternate, ``--repeats`` rounds after an untimed greedy
warm-up, so a slow minute of a shared machine hits all of them.

``tokens_per_second`` counts the tokens each sample got (up to and including its EOS) over the wall time
of the call. The arms draw different samples (other random streams), so the check that they sample the same
process is made at temperature 0, where the two loops must give the same tokens (``greedy_identical``), and by
the arms' mean answer lengths.
"""

from __future__ import annotations

import json
import statistics
import time

from dpo_lib.config import REPO_DATA

__all__ = ["ARMS", "PROMPTS", "WORK", "main"]

PROMPTS = REPO_DATA / "sentiment" / "test.jsonl"
WORK = {"prompts": 64, "n": 2, "max_new_tokens": 40, "temperature": 1.0}  # the main job's evaluation
ARMS = {"hf@32": ("hf", 32), "hf@auto": ("hf", None), "dpo_lib@32": ("dpo_lib", 32), "dpo_lib@auto": ("dpo_lib", None)}


def _timed(model, tokenizer, prompts, arm: str, seed: int) -> dict:
    from dpo_lib.sampling import generate
    sampler, batch_size = ARMS[arm]
    t0 = time.perf_counter()
    samples = generate(model, tokenizer, prompts, n=WORK["n"], max_new_tokens=WORK["max_new_tokens"],
                       temperature=WORK["temperature"], batch_size=batch_size, seed=seed, progress=False,
                       sampler=sampler)
    seconds = time.perf_counter() - t0
    tokens = sum(len(s["response_ids"]) for s in samples)
    return {"seconds": seconds, "tokens": tokens, "tokens_per_second": tokens / seconds,
            "mean_length": tokens / len(samples), "ended": sum(s["ended"] for s in samples) / len(samples)}


def _ratios(runs: dict[str, list[dict]]) -> dict:
    """The arms' medians and the ratios of the module docstring."""
    median = {s: {k: statistics.median(run[k] for run in runs[s]) for k in runs[s][0]} for s in runs}
    tps = {arm: median[arm]["tokens_per_second"] for arm in ARMS}
    return {**median, "baseline": "hf@32",
            "loop_ratio": tps["dpo_lib@auto"] / tps["hf@auto"], "loop_ratio_at_32": tps["dpo_lib@32"] / tps["hf@32"],
            "batch_ratio": tps["dpo_lib@auto"] / tps["dpo_lib@32"],
            "throughput_ratio": tps["dpo_lib@auto"] / tps["hf@32"],
            "per_repeat_throughput_ratios": [d["tokens_per_second"] / h["tokens_per_second"]
                                             for h, d in zip(runs["hf@32"], runs["dpo_lib@auto"])]}


def _print_report(result: dict, auto: int) -> None:
    print(f"\n{'':<14}" + "".join(f"{arm:>14}" for arm in ARMS))
    print(f"{'tokens/s':<14}" + "".join(f"{result[arm]['tokens_per_second']:>14.1f}" for arm in ARMS))
    print(f"{'mean length':<14}" + "".join(f"{result[arm]['mean_length']:>14.1f}" for arm in ARMS))
    print(f"loop (dpo_lib/hf at {auto} rows) {result['loop_ratio']:.2f}, at 32 rows {result['loop_ratio_at_32']:.2f}; "
          f"batch ({auto}/32 rows, dpo_lib loop) {result['batch_ratio']:.2f}; both, against hf@32 "
          f"{result['throughput_ratio']:.2f} (per repeat "
          + ", ".join(f"{x:.2f}" for x in result["per_repeat_throughput_ratios"]) + ")")
    print(f"greedy samples identical: {result['greedy_identical']}")


def main(args) -> int:
    import os

    import torch

    from dpo_lib.features import encode_prompt
    from dpo_lib.logger import package_versions
    from dpo_lib.models import attention_implementation, load_model
    from dpo_lib.precision import autocast
    from dpo_lib.sampling import decode_attention, generate, sampling_batch_size
    from dpo_lib.tools.bench import BENCH_PACKAGES, _machine

    if args.threads:
        torch.set_num_threads(args.threads)
    machine = _machine("cpu")
    model, tokenizer = load_model(args.model, attn_implementation="eager")   # as the main job loads it
    source = args.dataset or PROMPTS
    prompts = [json.loads(line)["prompt"] for line in source.read_text().splitlines() if line.strip()]
    prompts = prompts[:WORK["prompts"]]
    auto = sampling_batch_size(max(len(encode_prompt(tokenizer, p)) for p in prompts), WORK["max_new_tokens"])
    print(f"[bench] {len(prompts)} prompts x {WORK['n']} samples, <= {WORK['max_new_tokens']} new tokens, "
          f"batches of 32 and {auto} (auto), {args.dtype}, {torch.get_num_threads()} threads")
    runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    with autocast(args.dtype):
        # the loops compared on one attention function (decode's): eager and SDPA round bf16 differently
        with attention_implementation(model, decode_attention(model)):
            greedy = {s: generate(model, tokenizer, prompts[:8], max_new_tokens=16, temperature=0, progress=False,
                                  sampler=s) for s in ("hf", "dpo_lib")}
        for r in range(args.repeats):
            for arm in runs:
                res = _timed(model, tokenizer, prompts, arm, seed=args.seed + r)
                runs[arm].append(res)
                print(f"[bench] run {r + 1}/{args.repeats} {arm:<12}: {res['tokens_per_second']:7.1f} tokens/s, "
                      f"{res['seconds']:.1f} s, mean length {res['mean_length']:.1f}", flush=True)
    machine["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "machine": machine, "versions": package_versions(BENCH_PACKAGES),
        "settings": {"model": args.model or "SmolLM2-135M-Instruct (embedded)", "prompts_file": str(source),
                     **WORK, "batch_sizes": {"32": 32, "auto": auto}, "dtype": args.dtype,
                     "attention": {"hf": model.config._attn_implementation, "dpo_lib": decode_attention(model)},
                     "repeats": args.repeats,
                     "threads": torch.get_num_threads(), "order": "alternating: " + ", ".join(ARMS) + ", ..."},
        "what_is_timed": "each generate() call whole: template, padding, the decode loop, detokenizing",
        **_ratios(runs),
        "greedy_identical": [x["response_ids"] for x in greedy["hf"]] == [x["response_ids"] for x in greedy["dpo_lib"]],
        "runs": runs,
    }
    _print_report(result, auto)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        print(f"[bench] wrote {args.json}")
    return 0 if result["greedy_identical"] else 1
