"""Test-only faults for a ``python -m dpo_lib`` subprocess: a signal at one point of a training step, or a
full disk / read-only folder while a file is written. Installed by a ``sitecustomize.py`` that
:func:`hook_env` writes into a temporary folder put first on ``PYTHONPATH``; the spec is the JSON of
``DPO_TEST_HOOK``. Nothing here touches the machine's mounts: the write functions raise the error
a full disk would. The library itself has no hook."""

from __future__ import annotations

import errno
import json
import os
import signal
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ERRORS = {"ENOSPC": (errno.ENOSPC, "No space left on device"), "EROFS": (errno.EROFS, "Read-only file system")}


def hook_env(tmp: Path, **spec) -> dict:
    """The environment of a CLI subprocess with the fault ``spec`` installed at start-up."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "sitecustomize.py").write_text("import _hooks\n_hooks.install()\n")
    path = os.pathsep.join([str(tmp), str(TESTS), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1", PYTHONPATH=path, DPO_TEST_HOOK=json.dumps(spec))


def install() -> None:
    spec = json.loads(os.environ.get("DPO_TEST_HOOK") or "{}")
    if "signal" in spec:
        _signal_at(getattr(signal, spec["signal"]), spec["at"], spec.get("step", 1))
    if "fail" in spec:
        _fail_at(spec["fail"], spec.get("call", 1), *ERRORS[spec.get("error", "ENOSPC")])


def _signal_at(signum: int, at: str, step: int) -> None:
    """Raise ``signum`` in this process at ``at`` of 1-based training step ``step``: ``forward`` (before the
    first micro-batch's forward), ``micro`` (between the micro-batches), ``optimizer`` (inside AdamW.step),
    ``checkpoint`` (inside the first checkpoint write) or ``checkpoint-twice`` (also inside the second one)."""
    import torch

    from dpo_lib import checkpoints
    from dpo_lib.trainer import DPOTrainer
    calls = {"micro": 0, "opt": 0, "save": 0}
    if at in ("forward", "micro"):
        original = DPOTrainer.compute_loss

        def compute_loss(self, batch):
            k = calls["micro"] if self.step == step - 1 else -1
            calls["micro"] += self.step == step - 1
            if k == (0 if at == "forward" else 1):
                signal.raise_signal(signum)
            return original(self, batch)
        DPOTrainer.compute_loss = compute_loss
    elif at == "optimizer":
        original_step = torch.optim.AdamW.step

        def opt_step(self, *a, **kw):
            calls["opt"] += 1
            if calls["opt"] == step:
                signal.raise_signal(signum)
            return original_step(self, *a, **kw)
        torch.optim.AdamW.step = opt_step
    else:
        original_save = checkpoints.save_model

        def save_model(*a, **kw):
            calls["save"] += 1
            if calls["save"] == 1 or (at == "checkpoint-twice" and calls["save"] == 2):
                signal.raise_signal(signum)
            return original_save(*a, **kw)
        checkpoints.save_model = save_model


def _fail_at(what: str, call: int, code: int, message: str) -> None:
    """The ``call``-th write of ``what`` (``checkpoint``: the optimizer state, after the weights were written;
    ``final``: the final model, refused as a read-only folder refuses it; ``weights``: the safetensors file of
    any ``save_pretrained``, ``checkpoint-weights``: a checkpoint's, each cut short as a full disk cuts it, with
    the error safetensors' writer raises then) fails."""
    from safetensors import SafetensorError
    full = SafetensorError(f"Error while serializing: I/O error: {message} (os error {code})")
    if what == "checkpoint-weights":
        from dpo_lib import checkpoints
        original_save_model = checkpoints.save_model
        counter = {"n": 0}

        def save_model(model, filename, *a, **kw):
            counter["n"] += 1
            if counter["n"] == call:
                Path(filename).write_bytes(b"\0" * 1000)  # what was written before the disk filled up
                raise full
            return original_save_model(model, filename, *a, **kw)
        checkpoints.save_model = save_model
    elif what == "checkpoint":
        from dpo_lib import checkpoints
        original = checkpoints.torch.save
        counter = {"n": 0}

        def save(obj, f, *a, **kw):
            counter["n"] += 1
            if counter["n"] == call:
                Path(f).write_bytes(b"\0" * 1000)  # what was written before the disk filled up
                raise OSError(code, message, str(f))
            return original(obj, f, *a, **kw)
        checkpoints.torch.save = save
    elif what == "weights":
        from transformers import modeling_utils

        def safe_save_file(tensors, filename, *a, **kw):
            Path(filename).write_bytes(b"\0" * 1000)  # what was written before the disk filled up
            raise full
        modeling_utils.safe_save_file = safe_save_file
    else:
        from transformers import PreTrainedModel

        def save_pretrained(self, folder, *a, **kw):
            raise OSError(code, message, str(Path(folder) / "model.safetensors"))
        PreTrainedModel.save_pretrained = save_pretrained
