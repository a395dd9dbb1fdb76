r"""Best-of-N and evaluation by sampling (lesson 04): the baseline that needs no training.

* :func:`sample_and_score` — sample responses from a policy, score them with the true reward
  (and optionally a reward model), and keep each sample's log-ratio to the reference;
* :func:`expected_best_of_n` — an unbiased estimate of best-of-``n``'s expected reward from
  ``N >= n`` samples per prompt;
* :func:`best_of_n` and :func:`best_of_n_kl` — best-of-N itself, and its KL to the sampler.
"""

from __future__ import annotations

import math

import torch

from dpo_lib.rlhf.ppo import closed_turns, rollout
from dpo_lib.rlhf.reward_model import RewardModel

__all__ = ["best_of_n", "best_of_n_kl", "expected_best_of_n", "sample_and_score"]


@torch.no_grad()
def sample_and_score(policy, tokenizer, prompts_ids, reward_fn, max_new_tokens: int, ref_model=None,
                     n: int = 1, batch_size: int = 32, seed: int = 0, temperature: float = 1.0,
                     reward_model: RewardModel | None = None, reward_suffix_ids=None) -> dict:
    r"""Sample ``n`` responses to each of ``P`` prompts from ``policy`` (full distribution) and score them.

    Returns ``texts`` (``P * n``, prompt-major), ``rewards`` ``(P, n)`` from ``reward_fn(texts)`` and
    ``kl`` ``(P, n)``, each sample's :math:`\log\pi(y|x) - \log\pi_\text{ref}(y|x)` (its mean is the
    Monte-Carlo sequence KL; all zeros without ``ref_model``), ``lengths`` ``(P, n)``, the response tokens
    up to and including the EOS, and ``ended`` ``(P, n)``, whether the response ended on its own before
    ``max_new_tokens`` (``False``: cut at the cap, so its length is a lower bound). With ``reward_model`` also
    ``proxy`` ``(P, n)``, its scores of the responses closed with ``reward_suffix_ids``."""
    torch.manual_seed(seed)
    jobs = [list(ids) for ids in prompts_ids for _ in range(n)]
    texts, rewards, kls, proxy, lengths, ended = [], [], [], [], [], []
    for i in range(0, len(jobs), batch_size):
        batch = rollout(policy, tokenizer, jobs[i:i + batch_size], max_new_tokens, ref_model, temperature)
        texts += batch.texts
        rewards += [float(r) for r in reward_fn(batch.texts)]
        kls += (batch.logprobs - batch.ref_logprobs).sum(-1).tolist()
        lengths += batch.response_mask.sum(-1).tolist()
        ended += ((batch.response_ids == tokenizer.eos_token_id) & batch.response_mask.bool()).any(-1).tolist()
        if reward_model is not None:
            proxy += reward_model(*closed_turns(batch, reward_suffix_ids or [], tokenizer.eos_token_id,
                                                tokenizer.pad_token_id)).tolist()
    P = len(prompts_ids)
    out = {"texts": texts, "rewards": torch.tensor(rewards).view(P, n), "kl": torch.tensor(kls).view(P, n),
           "lengths": torch.tensor(lengths, dtype=torch.float32).view(P, n), "ended": torch.tensor(ended).view(P, n)}
    if reward_model is not None:
        out["proxy"] = torch.tensor(proxy).view(P, n)
    return out


def expected_best_of_n(rewards: torch.Tensor, n: int, select_by: torch.Tensor | None = None,
                       per_prompt: bool = False) -> float | torch.Tensor:
    r"""Expected reward of best-of-``n`` sampling, estimated from ``N >= n`` samples per prompt
    (``rewards`` ``(P, N)``) without bias: the average, over all :math:`\binom{N}{n}` subsets of size
    ``n``, of the reward of the subset's best member, then the mean over prompts. "Best" is by
    ``select_by`` ``(P, N)`` (e.g. a reward model's scores) or, when ``None``, by ``rewards`` itself.
    ``per_prompt=True`` returns the ``(P,)`` estimates before the mean, for a paired standard error.

    Sorted ascending by the selection score, sample ``i`` (0-based) is the best of a random subset with
    probability :math:`\binom{i}{n-1}/\binom{N}{n}`."""
    P, N = rewards.shape
    if not 1 <= n <= N:
        raise ValueError(f"need 1 <= n <= N, got n={n}, N={N}")
    key = rewards if select_by is None else select_by
    ranked = rewards.gather(1, key.argsort(dim=1, stable=True))                    # (P, N) by selection score
    weights = torch.tensor([math.comb(i, n - 1) / math.comb(N, n) for i in range(N)], dtype=rewards.dtype)
    per = (ranked * weights).sum(1)                                              # (P,)
    return per if per_prompt else float(per.mean())


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
    r"""KL of best-of-n to its sampler, :math:`\log n - (n-1)/n` (Stiennon et al. 2020): exact when no
    single answer has noticeable probability under the sampler (a continuous-like distribution), an
    upper bound otherwise (Beirami et al. 2024, Theorem 1)."""
    return math.log(n) - (n - 1) / n
