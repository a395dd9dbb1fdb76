"""The reference policy π_ref of the DPO objective (Rafailov et al. 2023, Eq. 3 and 7).

π_ref never learns: its log-probs are constants of the loss. Three ways to get them:

* :class:`FrozenReference` — a deep copy of the initial policy, ``requires_grad=False``,
  ``eval()`` mode, every forward under ``torch.no_grad()``. Costs a second model in memory.
* :class:`AdapterDisabledReference` — for LoRA (peft): the base model *is* the reference,
  so run the policy with its adapter disabled. No second copy at all.
* :func:`precompute_reference_logps` — run either of the above once over the dataset and
  store the two numbers per pair (cached on disk, keyed by the model and
  :func:`dpo_lib.features.token_ids_hash` of the token ids). Training then
  needs no reference forward at all: one forward per step instead of two.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dpo_lib.features import collate, length_sorted_batches, token_ids_hash
from dpo_lib.logprobs import concatenated_forward

__all__ = ["AdapterDisabledReference", "FrozenReference", "model_fingerprint", "precompute_reference_logps"]


class FrozenReference:
    """A frozen deep copy of ``model``; call it on a collated batch for ``(chosen, rejected)`` log-probs.

    ``compact_head`` / ``shared_prompt`` / ``padding_free``: how :func:`~dpo_lib.logprobs.concatenated_forward`
    scores the pairs (less work, the same numbers to float rounding). Score the policy the same way
    (:meth:`dpo_lib.config.TrainConfig.scoring`), or the untrained policy's implicit rewards are off 0 by
    rounding and a strict accuracy reads noise."""

    def __init__(self, model: torch.nn.Module, compact_head: bool = False, shared_prompt: bool = False,
                 padding_free: bool = False):
        self.model = copy.deepcopy(model).eval()
        self.model.requires_grad_(False)
        self.scoring = {"compact_head": compact_head, "shared_prompt": shared_prompt, "padding_free": padding_free}

    @torch.no_grad()
    def __call__(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return concatenated_forward(self.model, batch, **self.scoring)


class AdapterDisabledReference:
    """The base of a peft model, i.e. the policy with its LoRA adapter switched off (``compact_head`` /
    ``shared_prompt`` / ``padding_free``: as in :class:`FrozenReference`)."""

    def __init__(self, peft_model: torch.nn.Module, compact_head: bool = False, shared_prompt: bool = False,
                 padding_free: bool = False):
        if not hasattr(peft_model, "disable_adapter"):
            raise TypeError("AdapterDisabledReference needs a peft model (with .disable_adapter())")
        self.model = peft_model
        self.scoring = {"compact_head": compact_head, "shared_prompt": shared_prompt, "padding_free": padding_free}

    @torch.no_grad()
    def __call__(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        was_training = self.model.training
        self.model.eval()
        try:
            with self.model.disable_adapter():
                return concatenated_forward(self.model, batch, **self.scoring)
        finally:
            self.model.train(was_training)


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over parameter names, shapes and values: a cache key for log-probs."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def precompute_reference_logps(reference, features: list[dict], pad_token_id: int, batch_size: int = 8,
                               cache_dir: str | Path | None = None, model_key: str | None = None,
                               desc: str = "reference log-probs") -> list[dict]:
    """Add ``ref_chosen_logps`` / ``ref_rejected_logps`` to every feature.

    With ``cache_dir`` and ``model_key`` the numbers are stored in a JSON file named after
    the model and the token ids, and read back the next time instead of recomputed.
    """
    cache_file = None
    if cache_dir is not None and model_key is not None:
        cache_file = Path(cache_dir) / f"ref_logps-{model_key}-{token_ids_hash(features)}.json"
        if cache_file.is_file():
            values = json.loads(cache_file.read_text())
            if len(values) == len(features):
                return [dict(f, ref_chosen_logps=c, ref_rejected_logps=r) for f, (c, r) in zip(features, values)]
    # batches of similar length (sorted, then put back in order): less padding, same numbers
    values: list = [None] * len(features)
    for chunk in tqdm(length_sorted_batches(features, batch_size), desc=desc, leave=False):
        chosen, rejected = reference(collate([features[i] for i in chunk], pad_token_id))
        for i, c, r in zip(chunk, chosen.tolist(), rejected.tolist()):
            values[i] = (c, r)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(values))
        os.replace(tmp, cache_file)
    return [dict(f, ref_chosen_logps=c, ref_rejected_logps=r) for f, (c, r) in zip(features, values)]
