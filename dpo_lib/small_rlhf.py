r"""PPO beside DPO at CPU scale: the helpers of lesson 04.

* one frozen pass over the pairs gives the reward model's features and DPO's reference
  log-probs (:func:`pair_logps_and_hidden`), and a reward head trains on those features alone
  (:func:`train_reward_head`);
* a frozen trunk shared and memoised by every model that trains only its top blocks
  (:func:`train_only_top_blocks`, :class:`FrozenTrunk`, :class:`TopBlocksLM`);
* evaluation by sampling (:func:`sample_and_score`), an unbiased best-of-N estimate
  (:func:`expected_best_of_n`), and best-of-N itself with its KL bound (:func:`best_of_n`,
  :func:`best_of_n_kl`).

Memory is measured with :mod:`dpo_lib.memory` (:func:`~dpo_lib.memory.megabytes`,
:class:`~dpo_lib.memory.PeakMemory`).
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager

import torch
from torch import nn

from dpo_lib.data import batch_to, collate
from dpo_lib.logprobs import sequence_logprobs
from dpo_lib.ppo import closed_turns, rollout
from dpo_lib.rlhf import RewardModel, pool_hidden, position_ids_from_mask, reward_model_loss


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
    """One pass of a frozen causal LM over tokenized preference pairs (:func:`dpo_lib.data.tokenize_rows`)
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


def train_reward_head(reward_model: RewardModel, chosen_hidden: torch.Tensor, rejected_hidden: torch.Tensor,
                      epochs: int = 200, lr: float = 1e-2, weight_decay: float = 0.0) -> list[dict]:
    r"""Fit the linear head of a :class:`RewardModel` whose backbone stays frozen, on cached pooled
    features ``(N, H)`` (:func:`pair_logps_and_hidden`): full-batch AdamW on the
    Bradley–Terry loss. The head starts at zero, so every reward is 0 and the first loss is
    exactly :math:`\ln 2`. Returns ``{"loss", "accuracy"}`` per epoch, measured before its update.

    Afterwards the head is rescaled so that the rewards of all the training responses have mean 0
    and standard deviation 1 (an affine change: the ranking, hence the accuracy, is unchanged)."""
    head = reward_model.head
    chosen_hidden, rejected_hidden = chosen_hidden.to(head.weight.device), rejected_hidden.to(head.weight.device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    history = []
    for _ in range(epochs):
        loss, accuracy = reward_model_loss(head(chosen_hidden).squeeze(-1), head(rejected_hidden).squeeze(-1))
        history.append({"loss": float(loss.detach()), "accuracy": float(accuracy)})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        scores = head(torch.cat([chosen_hidden, rejected_hidden])).squeeze(-1)      # (2N,)
        std = scores.std().clamp(min=1e-8)
        head.weight /= std
        head.bias.copy_((head.bias - scores.mean()) / std)
    return history


@torch.no_grad()
def sample_and_score(policy, tokenizer, prompts_ids, reward_fn, max_new_tokens: int, ref_model=None,
                     n: int = 1, batch_size: int = 32, seed: int = 0, temperature: float = 1.0,
                     reward_model: RewardModel | None = None, reward_suffix_ids=None) -> dict:
    r"""Sample ``n`` responses to each of ``P`` prompts from ``policy`` (full distribution) and score them.

    Returns ``texts`` (``P * n``, prompt-major), ``rewards`` ``(P, n)`` from ``reward_fn(texts)`` and
    ``kl`` ``(P, n)``, each sample's :math:`\log\pi(y|x) - \log\pi_\text{ref}(y|x)` (its mean is the
    Monte-Carlo sequence KL; all zeros without ``ref_model``). With ``reward_model`` also
    ``proxy`` ``(P, n)``, its scores of the responses closed with ``reward_suffix_ids``."""
    torch.manual_seed(seed)
    jobs = [list(ids) for ids in prompts_ids for _ in range(n)]
    texts, rewards, kls, proxy = [], [], [], []
    for i in range(0, len(jobs), batch_size):
        batch = rollout(policy, tokenizer, jobs[i:i + batch_size], max_new_tokens, ref_model, temperature)
        texts += batch.texts
        rewards += [float(r) for r in reward_fn(batch.texts)]
        kls += (batch.logprobs - batch.ref_logprobs).sum(-1).tolist()
        if reward_model is not None:
            proxy += reward_model(*closed_turns(batch, reward_suffix_ids or [], tokenizer.eos_token_id,
                                                tokenizer.pad_token_id)).tolist()
    P = len(prompts_ids)
    out = {"texts": texts, "rewards": torch.tensor(rewards).view(P, n), "kl": torch.tensor(kls).view(P, n)}
    if reward_model is not None:
        out["proxy"] = torch.tensor(proxy).view(P, n)
    return out


def expected_best_of_n(rewards: torch.Tensor, n: int, select_by: torch.Tensor | None = None) -> float:
    r"""Expected reward of best-of-``n`` sampling, estimated from ``N >= n`` samples per prompt
    (``rewards`` ``(P, N)``) without bias: the average, over all :math:`\binom{N}{n}` subsets of size
    ``n``, of the reward of the subset's best member, then the mean over prompts. "Best" is by
    ``select_by`` ``(P, N)`` (e.g. a reward model's scores) or, when ``None``, by ``rewards`` itself.

    Sorted ascending by the selection score, sample ``i`` (0-based) is the best of a random subset with
    probability :math:`\binom{i}{n-1}/\binom{N}{n}`."""
    P, N = rewards.shape
    if not 1 <= n <= N:
        raise ValueError(f"need 1 <= n <= N, got n={n}, N={N}")
    key = rewards if select_by is None else select_by
    ranked = rewards.gather(1, key.argsort(dim=1, stable=True))                    # (P, N) by selection score
    weights = torch.tensor([math.comb(i, n - 1) / math.comb(N, n) for i in range(N)], dtype=rewards.dtype)
    return float((ranked * weights).sum(1).mean())


@torch.no_grad()
def best_of_n(policy, tokenizer, prompt_ids, n: int, reward_fn, max_new_tokens: int = 32,
              temperature: float = 1.0) -> dict:
    """Sample ``n`` responses to one prompt and keep the best by ``reward_fn(texts)``: no training,
    KL to the sampler at most :func:`best_of_n_kl`. Returns ``{"best", "best_reward", "texts", "rewards"}``."""
    batch = rollout(policy, tokenizer, [list(prompt_ids)] * n, max_new_tokens, None, temperature)
    rewards = [float(r) for r in reward_fn(batch.texts)]
    best = max(range(n), key=rewards.__getitem__)
    return {"best": batch.texts[best], "best_reward": rewards[best], "texts": batch.texts, "rewards": rewards}


def best_of_n_kl(n: int) -> float:
    r"""KL of best-of-n to its sampler, :math:`\log n - (n-1)/n` (Stiennon et al. 2020);
    an upper bound in general (Beirami et al. 2024)."""
    return math.log(n) - (n - 1) / n
