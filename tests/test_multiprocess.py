"""DPOTrainer under `accelerate launch` (DDP, 2 CPU processes, gloo) equals one process.

The test launches this file with ``configs/accelerate_ddp_cpu.yaml``; run as a script, it is
the worker: every process builds the same tiny model (seeded), takes its share of each global
batch of 8 pairs, and the main process writes the loss history and the weights. The test then
trains the same configs in one process and compares: same losses, same weights after 2 steps.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from _tiny import tiny, toy_rows  # noqa: E402

from dpo_lib.config import TrainConfig  # noqa: E402
from dpo_lib.features import tokenize_rows  # noqa: E402
from dpo_lib.reference import FrozenReference, precompute_reference_logps  # noqa: E402
from dpo_lib.trainer import DPOTrainer  # noqa: E402

# the settings these tests were written for (TrainConfig defaults before they became the main job's)
LEGACY = dict(grad_accum=1, sort_by_length=False, compact_lm_head=False, precision="fp32")
CONFIGS = {
    # one micro-batch per process; checkpoints written (main process only) every step
    "plain": dict(grad_accum=1, save_every=1),
    # two micro-batches per process (DDP no_sync on the first), length-sorted shards, compact LM head
    "fast": dict(grad_accum=2, sort_by_length=True, compact_lm_head=True),
}


def make_trainer(name: str, out: Path | None, accelerator=None) -> DPOTrainer:
    torch.manual_seed(0)
    policy, tok = tiny(seed=0)
    feats, _ = tokenize_rows(tok, toy_rows(16))
    feats = precompute_reference_logps(FrozenReference(policy), feats, tok.pad_token_id)
    config = TrainConfig(batch_size=8, max_steps=2, learning_rate=1e-3, warmup_ratio=0.0, schedule="constant",
                         print_every=0, **{**LEGACY, **CONFIGS[name]})
    return DPOTrainer(policy, feats, config, tok.pad_token_id, out_dir=out, accelerator=accelerator)


def worker(out: Path) -> None:
    from accelerate import Accelerator

    torch.set_num_threads(1)
    acc = Accelerator(cpu=True)  # on a CPU-only machine: without cpu=True accelerate finds no backend
    assert acc.num_processes == 2, acc.state
    for name in CONFIGS:
        trainer = make_trainer(name, out / name, accelerator=acc)
        history = trainer.train(progress=False)
        if acc.is_main_process:
            (out / name / "history.json").write_text(json.dumps(history))
            weights = {k: v.detach().clone() for k, v in acc.unwrap_model(trainer.model).state_dict().items()}
            torch.save(weights, out / name / "weights.pt")
        acc.wait_for_everyone()
    # tear the gloo process group down before exit: left to the interpreter's shutdown, its threads
    # can be destroyed while still joinable ("terminate called without an active exception", SIGABRT)
    acc.end_training()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--config_file", str(ROOT / "configs" / "accelerate_ddp_cpu.yaml"),
           "--main_process_port", str(free_port()), "--num_processes", "2", __file__, str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    for name in CONFIGS:
        multi = json.loads((tmp_path / name / "history.json").read_text())
        weights = torch.load(tmp_path / name / "weights.pt", weights_only=True)
        single = make_trainer(name, None)
        history = single.train(progress=False)

        assert len(multi) == len(history) == 2
        assert abs(multi[0]["loss"] - 0.693147) < 1e-4  # policy = reference at step 0
        for step, (mine, theirs) in enumerate(zip(history, multi)):
            # at step 0 every reward is 0 up to rounding, so accuracy (chosen > rejected) is a coin toss
            keys = ("loss", "rewards/margins", "logps/chosen", "grad_norm", "num_tokens") + (("rewards/accuracies",)
                                                                                             if step else ())
            for k in keys:
                assert abs(mine[k] - theirs[k]) <= 1e-5 * max(1.0, abs(mine[k])), (name, step, k, mine[k], theirs[k])
        assert history[1]["rewards/margins"] != 0.0
        for k, v in single.model.state_dict().items():
            assert torch.allclose(v, weights[k], atol=1e-5), (name, k)
        # only the main process wrote files: one line per step in metrics.jsonl
        assert len((tmp_path / name / "metrics.jsonl").read_text().splitlines()) == 2
    assert (tmp_path / "plain" / "checkpoints" / "latest").read_text().strip() == "step-000002"


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
    # Leave without the interpreter's shutdown: even after end_training, gloo's threads were sometimes still
    # joinable when their C++ destructors ran, and rank 1 died of SIGABRT ("terminate called without an active
    # exception") after writing everything (local CI of 121f29b, 1 run in 3). Every file is closed by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
