"""Evaluating a DPO policy against its reference.

* :func:`implicit_reward_accuracy` — on held-out pairs, how often the implicit reward
  :math:`\\hat r = \\beta\\log\\pi_\\theta/\\pi_\\text{ref}` (DPO Eq. 5) ranks chosen above rejected.
  At initialisation every reward is exactly 0, so the (strict) accuracy is 0, as in TRL
  (evaluated in the same length-sorted batches as the reference log-probs, so the padding agrees).
  The reference log-probs are precomputed in the features, or computed on the fly by a
  reference of :mod:`dpo_lib.reference` (for LoRA: the same model with its adapter off).
* :func:`mean_and_se` / :func:`win_rate` — the ground-truth reward of sampled completions,
  with standard errors (from :mod:`dpo_lib.stats`), and how often the policy beats the reference on
  the same prompt.
* :func:`sequence_kl` — a Monte-Carlo estimate of :math:`\\mathrm{KL}(\\pi_\\theta\\|\\pi_\\text{ref})
  = \\mathbb E_{y\\sim\\pi_\\theta}[\\log\\pi_\\theta(y|x)-\\log\\pi_\\text{ref}(y|x)]`
  from the policy's own samples (sequence level, in nats), with its standard error; the
  reference is a model or a reference of :mod:`dpo_lib.reference` (e.g. a LoRA policy's base).
* :func:`side_by_side` — a Markdown table of reference and policy samples.
* :func:`ended_by` — the fraction of sampled answers that have ended within t tokens, for every
  t up to the cap: a length comparison that stays honest when some answers are cut at the cap;
  :func:`ending_profile` reads it at a few caps (``python -m dpo_lib lengths``).
* :class:`HeldoutEval` — a training callback: held-out accuracy, margin and chosen reward every few
  steps, in the step's metrics (``eval/accuracy``, ``eval/margin``, ``eval/chosen_reward``, each with
  its ``_se``), so the curves show them next to the training batches' figures.
"""

from __future__ import annotations

import math

import torch

from dpo_lib.features import batch_to, collate, collate_sequences, length_sorted_batches
from dpo_lib.logprobs import concatenated_forward
from dpo_lib.precision import autocast
from dpo_lib.stats import mean_se

__all__ = ["HeldoutEval", "STANDARD_CAPS", "cap_for", "completion_logps", "ended_by", "ending_profile",
           "implicit_reward_accuracy", "mean_and_se", "sequence_kl", "side_by_side", "untrained_accuracy", "win_rate"]


def mean_and_se(values: list[float]) -> tuple[float, float]:
    """``(mean, standard error)`` of ``values``: :func:`dpo_lib.stats.mean_se` as a tuple (SE ``nan`` for one
    value). No values, or a NaN or infinite one, give ``(nan, nan)`` instead of stats' ``ValueError``: an
    evaluation at the end of a run reports a broken figure rather than stop before the others are written."""
    values = [float(v) for v in values]
    if not values or not all(math.isfinite(v) for v in values):
        return float("nan"), float("nan")
    estimate = mean_se(values)
    return estimate.value, estimate.se


@torch.no_grad()
def implicit_reward_accuracy(model, features: list[dict], pad_token_id: int, beta: float,
                             batch_size: int = 8, reference=None, compact_head: bool = False,
                             shared_prompt: bool = False, padding_free: bool = False) -> dict:
    """Held-out implicit-reward accuracy, mean margin and mean chosen reward, each with its SE over the pairs.

    Returns ``accuracy``, ``accuracy_se``, ``margin`` (mean of β·h = r̂_w − r̂_l), ``margin_se``,
    ``chosen_reward`` (mean of r̂_w = β·(log π_θ(y_w) − log π_ref(y_w)): below 0, the chosen replies became
    less likely than under the reference, likelihood displacement when the margin is above 0),
    ``chosen_reward_se`` and ``pairs``.

    Without ``reference`` the features must carry reference log-probs
    (:func:`dpo_lib.reference.precompute_reference_logps`). With ``reference``, a callable that
    maps a collated batch to ``(ref_chosen, ref_rejected)`` log-probs (e.g.
    :class:`~dpo_lib.reference.AdapterDisabledReference`), they are computed on the fly on the
    model's device: for a LoRA policy, switching the adapter off *is* the reference, so nothing
    needs precomputing.

    ``compact_head`` / ``shared_prompt`` / ``padding_free``: how the policy's pairs are scored
    (:func:`~dpo_lib.logprobs.concatenated_forward`); the same as the reference's, so that the untrained
    policy's rewards are exactly 0.
    """
    was_training = model.training
    model.eval()
    correct, margins, chosen_rewards = [0.0] * len(features), [0.0] * len(features), [0.0] * len(features)
    device = next(model.parameters()).device
    # the same batches as precompute_reference_logps: same padding, so π_θ = π_ref gives exactly 0
    for chunk in length_sorted_batches(features, batch_size):
        batch = batch_to(collate([features[i] for i in chunk], pad_token_id), device)
        chosen, rejected = concatenated_forward(model, batch, compact_head=compact_head, shared_prompt=shared_prompt,
                                                padding_free=padding_free)
        if reference is None:
            ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        else:
            ref_chosen, ref_rejected = reference(batch)
        r_c, r_r = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
        for i, ok, m, c in zip(chunk, (r_c > r_r).float().tolist(), (r_c - r_r).tolist(), r_c.tolist()):
            correct[i], margins[i], chosen_rewards[i] = ok, m, c
    model.train(was_training)
    acc, acc_se = mean_and_se(correct)
    margin, margin_se = mean_and_se(margins)
    chosen, chosen_se = mean_and_se(chosen_rewards)
    return {"accuracy": acc, "accuracy_se": acc_se, "margin": margin, "margin_se": margin_se,
            "chosen_reward": chosen, "chosen_reward_se": chosen_se, "pairs": len(features)}


def untrained_accuracy(pairs: int) -> dict:
    """What :func:`implicit_reward_accuracy` returns for a policy that *is* its reference (before training):
    every implicit reward is exactly 0, so the strict accuracy, the margin and the chosen reward are 0, with no
    spread. The main job reports this instead of spending a forward over the held-out pairs to measure it
    (11 s on 2 CPU cores); ``tests/test_evaluation.py`` checks that the measured figures are these."""
    return {"accuracy": 0.0, "accuracy_se": 0.0, "margin": 0.0, "margin_se": 0.0, "chosen_reward": 0.0,
            "chosen_reward_se": 0.0, "pairs": pairs}


class HeldoutEval:
    """Callback of :meth:`dpo_lib.trainer.DPOTrainer.train`: every ``every`` optimizer steps and at
    the last one, :func:`implicit_reward_accuracy` on ``features`` (held-out pairs that carry their
    reference log-probs, or scored by ``reference``), stored in that step's metrics as
    ``eval/accuracy``, ``eval/accuracy_se``, ``eval/margin``, ``eval/margin_se``, ``eval/chosen_reward`` and
    ``eval/chosen_reward_se`` (so ``metrics.jsonl``, the plots and ``python -m dpo_lib doctor`` carry them).
    With cached reference log-probs it costs one forward pass over ``features``; ``compact_head`` /
    ``shared_prompt`` / ``padding_free`` score the policy as the reference log-probs were scored."""

    def __init__(self, features: list[dict], pad_token_id: int, every: int, reference=None,
                 compact_head: bool = False, shared_prompt: bool = False, padding_free: bool = False):
        if every < 1:
            raise ValueError(f"HeldoutEval: every must be >= 1 (got {every})")
        self.features, self.pad, self.every, self.reference = features, pad_token_id, every, reference
        self.scoring = {"compact_head": compact_head, "shared_prompt": shared_prompt, "padding_free": padding_free}
        self.last: dict | None = None  # the latest result, e.g. the final held-out accuracy

    def __call__(self, trainer, metrics: dict) -> None:
        if not self.features or (trainer.step % self.every and trainer.step != trainer.total_steps):
            return
        with autocast(trainer.config.precision):
            self.last = implicit_reward_accuracy(trainer.model, self.features, self.pad, trainer.config.beta,
                                                 reference=self.reference, **self.scoring)
        self.last["step"] = trainer.step
        metrics.update({f"eval/{key}": self.last[key] for key in
                        ("accuracy", "accuracy_se", "margin", "margin_se", "chosen_reward", "chosen_reward_se")})


@torch.no_grad()
def completion_logps(model, samples: list[dict], pad_token_id: int, batch_size: int = 16,
                     compact_head: bool = False) -> list[float]:
    """Summed log-prob of each sample's ``response_ids`` given its ``prompt_ids``.

    ``model`` is a causal LM, or a reference of :mod:`dpo_lib.reference` (a callable batch ->
    log-probs that runs its ``.model``, e.g. :class:`~dpo_lib.reference.AdapterDisabledReference`).
    ``compact_head``: the LM head only on the response positions (a causal LM; a reference scores as it was made).
    """
    if isinstance(model, torch.nn.Module):
        net, score = model, (lambda batch: concatenated_forward(model, batch, compact_head=compact_head))
    else:
        net, score = model.model, model
    was_training = net.training
    net.eval()
    out = []
    device = next(net.parameters()).device
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        batch = collate_sequences([s["prompt_ids"] for s in chunk], [s["response_ids"] for s in chunk], pad_token_id)
        out += torch.cat(score(batch_to(batch, device))).tolist()
    net.train(was_training)
    return out


def sequence_kl(policy, reference, samples: list[dict], pad_token_id: int,
                compact_head: bool = False) -> tuple[float, float]:
    """KL(π‖π_ref) estimated on ``samples`` drawn from ``policy``: ``(mean, standard error)``.

    ``reference`` is a model, or a reference of :mod:`dpo_lib.reference`: for a LoRA policy,
    ``AdapterDisabledReference(policy)`` makes its own base (the adapter switched off) π_ref.
    """
    lp = completion_logps(policy, samples, pad_token_id, compact_head=compact_head)
    lr = completion_logps(reference, samples, pad_token_id, compact_head=compact_head)
    return mean_and_se([a - b for a, b in zip(lp, lr)])


def win_rate(policy_rewards: list[float], reference_rewards: list[float]) -> tuple[float, float]:
    """P(policy sample beats the reference sample of the same prompt); ties count 1/2."""
    wins = [1.0 if p > r else 0.5 if p == r else 0.0 for p, r in zip(policy_rewards, reference_rewards)]
    return mean_and_se(wins)


def ended_by(samples: list[dict], eos_token_id: int, cap: int) -> list[float]:
    """``out[t - 1]`` = fraction of ``samples`` whose ``response_ids`` hold ``eos_token_id`` within
    their first ``t`` tokens, for ``t = 1 … cap`` (the empirical distribution of the answer length).

    An answer cut at the cap has not ended by any ``t``, so the curve ends at the fraction that
    ended on their own, and two curves compare lengths without pretending cut answers are complete.
    """
    if cap < 1:
        raise ValueError(f"cap must be >= 1, got {cap}")
    counts = [0] * cap
    for s in samples:
        ids = s["response_ids"]
        if eos_token_id in ids and ids.index(eos_token_id) < cap:
            counts[ids.index(eos_token_id)] += 1               # ended with token number index + 1
    out, total = [], 0
    for c in counts:
        total += c
        out.append(total / len(samples) if samples else float("nan"))
    return out


STANDARD_CAPS = (16, 32, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)


def ending_profile(samples: list[dict], eos_token_id: int, max_new_tokens: int, caps=None) -> dict:
    """:func:`ended_by` read at a few caps, for choosing a ``max_new_tokens`` at which most answers end
    (``python -m dpo_lib lengths``): an answer cut at the cap has a length that is only a lower bound,
    so a length change measured on cut answers understates itself.

    ``caps`` defaults to :data:`STANDARD_CAPS` up to ``max_new_tokens``, plus ``max_new_tokens`` itself.
    Returns ``caps``, ``ended_by`` (the fraction ended within each cap, EOS counted), ``ended`` (within
    ``max_new_tokens``), ``mean_length_ended`` (``None`` when none ended), ``samples``, ``max_new_tokens``.
    """
    if not samples:
        raise ValueError("no samples")
    caps = sorted({c for c in (caps or STANDARD_CAPS) if c <= max_new_tokens} | {max_new_tokens})
    curve = ended_by(samples, eos_token_id, max_new_tokens)                    # curve[t - 1]: ended within t
    share = [b - a for a, b in zip([0.0] + curve, curve)]                      # share[t - 1]: ended at token t
    mean = sum(t * f for t, f in enumerate(share, 1)) / curve[-1] if curve[-1] else None
    return {"samples": len(samples), "max_new_tokens": max_new_tokens, "caps": caps,
            "ended_by": [curve[c - 1] for c in caps], "ended": curve[-1], "mean_length_ended": mean}


def cap_for(profile: dict, fraction: float) -> int | None:
    """The smallest cap of ``profile`` (:func:`ending_profile`) by which ``fraction`` of the answers
    ended, or ``None`` when not even ``max_new_tokens`` is enough."""
    return next((c for c, f in zip(profile["caps"], profile["ended_by"]) if f >= fraction), None)


def side_by_side(prompts: list[str], reference: list[str], policy: list[str],
                 reference_rewards: list[float], policy_rewards: list[float], k: int = 6) -> str:
    """A Markdown table of the first ``k`` prompts: reference and policy samples with rewards."""
    def cell(t: str) -> str:
        return t.replace("|", "\\|").replace("\n", " ")[:160]
    lines = ["| prompt | reference | reward | policy | reward |", "|---|---|---|---|---|"]
    for p, a, b, ra, rb in list(zip(prompts, reference, policy, reference_rewards, policy_rewards))[:k]:
        lines.append(f"| {cell(p)} | {cell(a)} | {ra:+.3f} | {cell(b)} | {rb:+.3f} |")
    return "\n".join(lines)
