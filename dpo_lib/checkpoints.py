"""Resumable checkpoints of a DPO run: atomic to write, exact to resume.

``OUT/checkpoints/step-NNNNNN/`` holds the model (safetensors), the optimizer and scheduler
state with the torch RNG (``optimizer.pt``: tensors and numbers only, loaded with
``weights_only=True``), ``trainer_state.json`` (step, token count, config, history), and last
``manifest.json`` (each file's size and sha256). A checkpoint is written to a temporary folder,
flushed, renamed, and only then named in ``checkpoints/latest``: a crash mid-save leaves the last
good checkpoint in place, and a failed write (a full disk, a read-only folder) removes its temporary folder and raises
:class:`CheckpointWriteError` naming the folder. Every checkpoint is verified against its manifest
before it is loaded (:func:`verify`); ``--resume`` takes the newest one that passes and says why it
skipped the others (:func:`resume`), and deletes nothing.
The data order is a function of the step (:meth:`dpo_lib.trainer.DPOTrainer.batch_indices`),
so a resumed float32 run ends with bitwise the weights of an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from dpo_lib.settings import UserError

__all__ = ["CheckpointWriteError", "atomic_write_text", "checkpoint_folders", "file_sha256", "latest_checkpoint",
           "load", "read_checkpoint", "resume", "safetensors_os_errors", "save", "trainer_state", "verify",
           "write_checkpoint"]

MANIFEST = "manifest.json"
FILES = ("model.safetensors", "optimizer.pt", "trainer_state.json")


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (a full disk, a read-only folder): nothing half-written is left."""


_IO_ERROR = re.compile(r"I/O error: (.*\(os error (\d+)\))")


@contextmanager
def safetensors_os_errors(path: Path):
    """A safetensors write that fails for the operating system's reasons (a full disk) raises safetensors'
    own ``SafetensorError``: ``Error while serializing: I/O error: No space left on device (os error 28)``.
    Within the block it is raised as the ``OSError`` it was (strerror ``No space left on device (os error
    28)``, filename ``path``), so that the callers' ``except OSError`` see every failed write."""
    try:
        yield
    except SafetensorError as e:
        found = _IO_ERROR.search(str(e))
        if found is None:
            raise
        raise OSError(int(found[2]), found[1], str(path)) from e


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a flushed temporary file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, read in 1 MiB blocks (checkpoint manifests, the model cache)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(path: Path) -> str | None:
    """Why the checkpoint ``path`` cannot be loaded (a missing, truncated or changed file, no manifest), or
    ``None`` when every file has the size and sha256 its ``manifest.json`` says."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        return f"no {MANIFEST} (the write did not finish)"
    except (OSError, ValueError) as e:
        return f"unreadable {MANIFEST} ({e})"
    for name, entry in manifest.get("files", {}).items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != entry["size"]:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {entry['size']} (truncated?)"
        if file_sha256(f) != entry["sha256"]:
            return f"{name} does not match its sha256 in the manifest (changed or damaged)"
    return None


def checkpoint_folders(out: Path | None) -> list[Path]:
    """The ``step-N`` folders of ``OUT/checkpoints``, newest first (complete or not)."""
    root = Path(out) / "checkpoints" if out is not None else None
    if root is None or not root.is_dir():
        return []
    return sorted((p for p in root.glob("step-*") if p.is_dir()), reverse=True)


def latest_checkpoint(out: Path | None) -> Path | None:
    """The newest checkpoint in ``OUT/checkpoints`` that passes :func:`verify`, else ``None``."""
    return next((p for p in checkpoint_folders(out) if verify(p) is None), None)


def _write_files(tmp: Path, model, optimizer, scheduler, state: dict) -> None:
    """The checkpoint's files, flushed, then its manifest (sizes and sha256), written last."""
    with safetensors_os_errors(tmp / "model.safetensors"):
        save_model(model, str(tmp / "model.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state()}, tmp / "optimizer.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(state))
    for name in FILES:  # flush file contents before the manifest and the rename make them count
        with open(tmp / name, "rb") as fh:
            os.fsync(fh.fileno())
    files = {n: {"size": (tmp / n).stat().st_size, "sha256": file_sha256(tmp / n)} for n in FILES}
    atomic_write_text(tmp / MANIFEST, json.dumps({"step": state["step"], "files": files}, indent=1))


def write_checkpoint(root: Path, model, optimizer, scheduler, state: dict, keep: int) -> Path:
    """Write ``root/step-N`` atomically (``N = state["step"]``), point ``latest`` at it, keep the newest ``keep``
    complete ones. A failed write removes its temporary folder, keeps every complete checkpoint and raises
    :class:`CheckpointWriteError`; a damaged checkpoint of the same step is set aside (``damaged-step-N``)."""
    name = f"step-{state['step']:06d}"
    tmp, final, old = root / f".tmp-{name}", root / name, root / f".old-{name}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _write_files(tmp, model, optimizer, scheduler, state)
        if final.exists():  # the same step again (Ctrl-C just after a periodic save), or a damaged one
            os.replace(final, old if verify(final) is None else root / f"damaged-{name}")
        os.replace(tmp, final)
        atomic_write_text(root / "latest", name)
    except OSError as e:
        raise CheckpointWriteError(f"cannot write checkpoint {name} in {root}: {e.strerror or e} "
                                   f"(last complete checkpoint: {_name(latest_checkpoint(root.parent))})") from e
    finally:  # whatever stopped the write (an error, a second Ctrl-C), no temporary folder stays behind
        if old.exists() and not final.exists():
            os.replace(old, final)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    kept = sorted(p for p in root.glob("step-*") if (p / MANIFEST).is_file())
    for stale in kept[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _name(path: Path | None) -> str:
    return path.name if path is not None else "none"


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
    """Continue ``trainer`` from the newest complete checkpoint in its output folder: one that fails
    :func:`verify` or does not load is skipped, with a line saying which and why, and left on disk;
    none at all: say so (and why, when there were damaged ones), start at step 0."""
    bad = []
    for path in checkpoint_folders(trainer.out):
        problem = verify(path)
        if problem is None:
            try:
                trainer.load_checkpoint(path)
            except Exception as e:  # noqa: BLE001 - the manifest vouched for it, yet it fails: try an older one
                problem = f"does not load ({type(e).__name__}: {e})"
        if problem is not None:
            bad.append(f"{path.name}: {problem}")
            continue
        skipped = f"; skipped {'; '.join(bad)} (left on disk)" if bad else ""
        return print(f"[dpo_lib] resumed from {path} (step {trainer.step}/{trainer.total_steps}){skipped}")
    why = f": none is complete ({'; '.join(bad)}; left on disk)" if bad else ""
    print(f"[dpo_lib] --resume: no complete checkpoint in {trainer.out}{why}; starting from step 0")
