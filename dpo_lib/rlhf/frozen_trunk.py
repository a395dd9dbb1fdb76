r"""PPO beside DPO at CPU scale (lesson 04): a frozen trunk that every model shares.

* one frozen pass over the pairs gives the reward model's features and DPO's reference
  log-probs (:func:`pair_logps_and_hidden`); a reward head then trains on those features alone
  (:func:`dpo_lib.rlhf.reward_model.train_reward_head`);
* a frozen trunk shared and memoised by every model that trains only its top blocks
  (:func:`train_only_top_blocks`, :class:`FrozenTrunk`, :class:`TopBlocksLM`).

Evaluation by sampling and best-of-N are in :mod:`dpo_lib.rlhf.best_of_n`. Memory is measured
with :mod:`dpo_lib.tools.memory` (:func:`~dpo_lib.tools.memory.megabytes`,
:class:`~dpo_lib.tools.memory.PeakMemory`).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
from torch import nn

from dpo_lib.features import batch_to, collate
from dpo_lib.logprobs import sequence_logprobs
from dpo_lib.rlhf.masks import position_ids_from_mask
from dpo_lib.rlhf.reward_model import pool_hidden

__all__ = ["FrozenTrunk", "pair_logps_and_hidden", "train_only_top_blocks"]


def train_only_top_blocks(model: nn.Module, n_blocks: int | None) -> int:
    """Freeze a causal LM except its last ``n_blocks`` transformer blocks and final norm
    (``None``: train everything). Embeddings and the (tied) LM head stay frozen. Backward then
    stops at the first trainable block, and the optimizer keeps state for those blocks only.
    Returns the number of trainable parameters."""
    decoder = model.get_decoder()
    if n_blocks is None:
        model.requires_grad_(True)
    else:
        model.requires_grad_(False)
        for block in list(decoder.layers)[len(decoder.layers) - n_blocks:]:
            block.requires_grad_(True)
        decoder.norm.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@contextmanager
def _swapped_blocks(model: nn.Module, blocks, final_norm=None):
    """Temporarily run ``model``'s decoder with only ``blocks`` (and ``final_norm`` if given)."""
    decoder = model.get_decoder()
    saved = decoder.layers, decoder.norm
    decoder.layers = nn.ModuleList(blocks)
    if final_norm is not None:
        decoder.norm = final_norm
    try:
        yield
    finally:
        decoder.layers, decoder.norm = saved


class FrozenTrunk:
    """The embeddings and the bottom blocks of a causal LM (all but the last ``n_top``), frozen and
    shared by every model built on them with :meth:`branch`, their output memoised per sequence.

    When only the top blocks train, the trunk computes the same thing for the same tokens every time:
    in every PPO epoch over a batch of rollouts, for the reference that scores them, and for every
    DPO run over the same pairs. Memoising it leaves a forward pass only the top blocks and the LM
    head to run. A sequence's trunk output depends on its attended tokens alone (positions are
    counted over the attention mask), so the memo key is that token tuple: padding does not matter."""
    def __init__(self, model: nn.Module, n_top: int, max_items: int = 4096):
        self.model, self.max_items = model.eval().requires_grad_(False), max_items
        blocks = list(model.get_decoder().layers)
        if not 0 < n_top < len(blocks):
            raise ValueError(f"n_top must be between 1 and {len(blocks) - 1}, got {n_top}")
        self.bottom, self.top = blocks[:len(blocks) - n_top], blocks[len(blocks) - n_top:]
        self.memo: dict[tuple, torch.Tensor] = {}
        self.hits = self.misses = 0

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Output of the bottom blocks, ``(B, T, H)``; zeros on padding."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        keys = [tuple(row[m.bool()].tolist()) for row, m in zip(input_ids, attention_mask)]
        todo = [i for i, k in enumerate(keys) if k not in self.memo]
        self.hits, self.misses = self.hits + len(keys) - len(todo), self.misses + len(todo)
        if todo:
            if len(self.memo) + len(todo) > self.max_items:
                self.memo.clear()
            mask = attention_mask[todo]
            with _swapped_blocks(self.model, self.bottom, nn.Identity()):
                hidden = self.model.get_decoder()(input_ids=input_ids[todo], attention_mask=mask, use_cache=False,
                                                  position_ids=position_ids_from_mask(mask)).last_hidden_state
            for row, i in enumerate(todo):
                self.memo[keys[i]] = hidden[row][mask[row].bool()].clone()
        H = self.model.config.hidden_size
        out = torch.zeros(*input_ids.shape, H, dtype=next(self.model.parameters()).dtype, device=input_ids.device)
        for i, key in enumerate(keys):
            out[i][attention_mask[i].bool()] = self.memo[key]
        return out

    def branch(self, trainable: bool = True) -> "TopBlocksLM":
        """A causal LM on this trunk: ``trainable=True`` gives it its own copy of the top blocks and final
        norm, the only parameters that train (a policy); ``False`` runs the original model (the reference)."""
        if not trainable:
            return TopBlocksLM(self.model, self)
        own = {id(p) for block in self.top for p in block.parameters()}
        own |= {id(p) for p in self.model.get_decoder().norm.parameters()}
        shared = {id(p): p for p in self.model.parameters() if id(p) not in own}   # deepcopy keeps these as they are
        lm = copy.deepcopy(self.model, memo=shared)
        train_only_top_blocks(lm, len(self.top))
        return TopBlocksLM(lm, self)


class TopBlocksLM(nn.Module):
    """A causal LM whose bottom blocks are a :class:`FrozenTrunk`: ``forward`` runs only the top blocks
    (on the memoised trunk output), final norm and LM head, and returns what the whole model would;
    ``generate`` runs the whole model. Made by :meth:`FrozenTrunk.branch`."""
    def __init__(self, lm: nn.Module, trunk: FrozenTrunk):
        super().__init__()
        self.lm, self.trunk = lm, trunk
        self.config = lm.config

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        hidden = self.trunk(input_ids, attention_mask)                  # (B, T, H), no gradient
        blocks = list(self.lm.get_decoder().layers)[len(self.trunk.bottom):]
        with _swapped_blocks(self.lm, blocks):
            return self.lm(inputs_embeds=hidden, attention_mask=attention_mask, position_ids=position_ids, **kwargs)

    def generate(self, *args, **kwargs):
        return self.lm.generate(*args, **kwargs)


@torch.no_grad()
def pair_logps_and_hidden(model: nn.Module, features: list[dict], pad_token_id: int,
                          batch_size: int = 8) -> dict[str, torch.Tensor]:
    """One pass of a frozen causal LM over tokenized preference pairs (:func:`dpo_lib.features.tokenize_rows`)
    gives what lesson 04 caches:

    All on the CPU, float32:

    * ``chosen_logps`` / ``rejected_logps`` ``(N,)``: summed completion log-probs, the DPO
      reference (equal to :func:`dpo_lib.logprobs.concatenated_forward`);
    * ``chosen_last`` / ``rejected_last`` and ``chosen_mean`` / ``rejected_mean`` ``(N, H)``: the
      decoder's last hidden states pooled as a :class:`RewardModel` on this frozen backbone pools
      them (``pooling="last"`` or ``"mean"``), the features its head is trained on.
    """
    was_training = model.training
    model.eval()
    keys = ("chosen_logps", "rejected_logps", "chosen_last", "rejected_last", "chosen_mean", "rejected_mean")
    parts: dict[str, list] = {k: [] for k in keys}
    device = next(model.parameters()).device
    for i in range(0, len(features), batch_size):
        batch = batch_to(collate(features[i:i + batch_size], pad_token_id), device)
        ids, mask, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]  # (2B, T)
        start = max(int(completion.float().argmax(1).min()) - 1, 0)  # LM head only where a completion is scored
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False,
                    output_hidden_states=True, logits_to_keep=ids.shape[1] - start)
        hidden = out.hidden_states[-1]                        # (2B, T, H) after the final norm, as a RewardModel reads
        logps = sequence_logprobs(out.logits, ids[:, start:], completion[:, start:])  # (2B,)
        last = pool_hidden(hidden, mask, completion, "last")                           # (2B, H)
        mean = pool_hidden(hidden, mask, completion, "mean")                           # (2B, H)
        for key, value in zip(keys, (*logps.chunk(2), *last.chunk(2), *mean.chunk(2))):
            parts[key].append(value.float().cpu())
    model.train(was_training)
    return {k: torch.cat(v) for k, v in parts.items()}
