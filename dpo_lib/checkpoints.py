"""Resumable checkpoints of a DPO run: atomic to write, exact to resume.

``OUT/checkpoints/step-NNNNNN/`` holds the model (safetensors), the optimizer and scheduler
state with the torch RNG (``optimizer.pt``: tensors and numbers only, loaded with
``weights_only=True``), and ``trainer_state.json`` (step, token count, config, history).
A checkpoint is written to a temporary folder, flushed, renamed, and only then named in
``checkpoints/latest``: a crash mid-save leaves the last good checkpoint in place.
The data order is a function of the step (:meth:`dpo_lib.trainer.DPOTrainer.batch_indices`),
so a resumed float32 run ends with bitwise the weights of an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

__all__ = ["atomic_write_text", "latest_checkpoint", "load", "read_checkpoint", "resume", "save", "trainer_state",
           "write_checkpoint"]


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a flushed temporary file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def latest_checkpoint(out: Path | None) -> Path | None:
    """The checkpoint ``OUT/checkpoints/latest`` names, if it is complete; else ``None``."""
    if out is None:
        return None
    pointer = Path(out) / "checkpoints" / "latest"
    if pointer.is_file():
        path = pointer.parent / pointer.read_text().strip()
        if (path / "trainer_state.json").is_file():
            return path
    return None


def write_checkpoint(root: Path, model, optimizer, scheduler, state: dict, keep: int) -> Path:
    """Write ``root/step-N`` atomically (``N = state["step"]``), point ``latest`` at it, keep the newest ``keep``."""
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{state['step']:06d}"
    tmp = root / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state()}, tmp / "optimizer.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(state))
    for f in tmp.iterdir():  # flush file contents before the rename makes them visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    atomic_write_text(root / "latest", name)
    kept = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in kept[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def trainer_state(step: int, num_tokens: int, config, history: list[dict]) -> dict:
    return {"step": step, "num_tokens": num_tokens, "config": asdict(config), "history": history}


def read_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Load a checkpoint into ``model``, ``optimizer`` and ``scheduler``, restore the torch RNG,
    and return its ``trainer_state.json``."""
    load_model(model, str(path / "model.safetensors"))
    state = torch.load(path / "optimizer.pt", weights_only=True)  # tensors and numbers only: no pickle code
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return json.loads((path / "trainer_state.json").read_text())


def save(trainer) -> Path:
    """Write ``trainer``'s checkpoint under ``OUT/checkpoints`` (main process only; the others wait)."""
    b = trainer.backend
    b.check_checkpoints()
    final = trainer.out / "checkpoints" / f"step-{trainer.step:06d}"
    if b.is_main:
        state = trainer_state(trainer.step, trainer.num_tokens, trainer.config, trainer.history)
        final = write_checkpoint(final.parent, b.unwrap(trainer.model), trainer.optimizer, trainer.scheduler, state,
                                 trainer.config.keep_checkpoints)
    b.wait()
    return final


def load(trainer, path: Path) -> None:
    """Load the checkpoint ``path`` into ``trainer`` (weights, optimizer, schedule, RNG, step, history) and drop
    the lines of ``OUT/metrics.jsonl`` logged after it."""
    from dpo_lib.logger import MetricsLogger  # here, not at the top: the logger imports this module
    meta = read_checkpoint(path, trainer.backend.unwrap(trainer.model), trainer.optimizer, trainer.scheduler)
    trainer.step, trainer.num_tokens, trainer.history = meta["step"], meta["num_tokens"], meta["history"]
    if trainer.out and trainer.backend.is_main:
        MetricsLogger.truncate(trainer.out, trainer.step)


def resume(trainer) -> None:
    """Continue ``trainer`` from the last checkpoint in its output folder (none: say so, start at step 0)."""
    if (last := latest_checkpoint(trainer.out)) is None:
        return print(f"[dpo_lib] --resume: no checkpoint in {trainer.out}, starting from step 0")
    trainer.load_checkpoint(last)
    print(f"[dpo_lib] resumed from {last} (step {trainer.step}/{trainer.total_steps})")
