"""Graders for the exercise notebooks.

A check cell calls a grader with the learner's function, e.g. ``check_dpo_loss(dpo_loss)``.
The grader runs the function and the reference implementation on several random cases
(seeded, so a failure is reproducible) and either prints one pass line::

    ✓ dpo_loss: 6/6 cases match

or raises an ``AssertionError`` whose message names the likely mistake. To name it, each
grader also runs a list of *known-wrong variants* of the reference (missing β, mean instead
of sum, labels not shifted, ...): when the learner's output agrees with a variant, its hint
is reported. Outputs are compared component by component, so two mistakes in two
different outputs (say, the loss and the rewards) give two hints.

Lessons add graders by building a :class:`Grader`: a name, the reference, a function that
makes the arguments of case ``k``, and the mistakes. ``GRADERS`` lists the ready-made ones.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from dpo_lib.bandit import optimal_policy
from dpo_lib.logprobs import concatenated_forward, sequence_logprobs
from dpo_lib.losses import dpo_loss


@dataclass
class Mistake:
    """A known-wrong variant of the reference (same signature) and the hint that names it."""

    hint: str
    fn: Callable


@dataclass
class Grader:
    """Compare a learner's function with ``reference`` on ``n_cases`` random cases.

    ``make_case(generator, k)`` returns the positional arguments of case ``k``.
    ``outputs`` names the returned values (one name: a single output; several: a tuple).
    ``checks`` are structural tests run once the values match: ``check(args, outputs)``
    returns a hint string when something is wrong (e.g. rewards not detached), else None.
    """

    name: str
    reference: Callable
    make_case: Callable[[torch.Generator, int], tuple]
    arg_names: Sequence[str]
    outputs: Sequence[str] = ("output",)
    mistakes: Sequence[Mistake] = ()
    checks: Sequence[Callable[[tuple, tuple], str | None]] = ()
    n_cases: int = 6
    rtol: float = 1e-4
    atol: float = 1e-5
    seed: int = 0
    cases: list = field(default_factory=list, init=False, repr=False)

    def __call__(self, fn: Callable) -> None:
        g = torch.Generator().manual_seed(self.seed)
        self.cases = [self.make_case(g, k) for k in range(self.n_cases)]
        got = [self._outputs(fn, args) for args in self.cases]  # learner errors propagate (TODO cells)
        want = [self._outputs(self.reference, args) for args in self.cases]
        bad = {c: [k for k in range(self.n_cases) if not _close(got[k][c], want[k][c], self.rtol, self.atol)]
               for c in range(len(self.outputs))}
        bad = {c: ks for c, ks in bad.items() if ks}
        if bad:
            raise AssertionError(self._explain(got, want, bad))
        for args, out in zip(self.cases, got):
            for check in self.checks:
                hint = check(args, out)
                if hint:
                    raise AssertionError(f"✗ {self.name}: the values are right, but {hint}")
        print(f"✓ {self.name}: {self.n_cases}/{self.n_cases} cases match")

    def _outputs(self, fn: Callable, args: tuple) -> tuple:
        out = fn(*_clone(args))
        if len(self.outputs) == 1:
            out = (out,)
        elif not isinstance(out, (tuple, list)) or len(out) != len(self.outputs):
            raise AssertionError(f"✗ {self.name}: return a tuple ({', '.join(self.outputs)}), got {_describe(out)}")
        if any(o is None for o in out):
            raise AssertionError(f"✗ {self.name}: your function returned None — did you forget `return`?")
        return tuple(out)

    def _explain(self, got: list, want: list, bad: dict) -> str:
        worst = max(len(ks) for ks in bad.values())
        lines = [f"✗ {self.name}: {worst}/{self.n_cases} cases differ from the reference."]
        variants = [[self._outputs(m.fn, args) for args in self.cases] for m in self.mistakes]
        explained: dict[str, list[str]] = {}  # hint -> the outputs it explains
        unexplained = []
        for c, ks in bad.items():
            hints = [m.hint for m, var in zip(self.mistakes, variants)
                     if all(_close(got[k][c], var[k][c], self.rtol, self.atol) for k in range(self.n_cases))]
            for h in hints:
                explained.setdefault(h, []).append(self.outputs[c])
            if not hints:
                unexplained.append(c)
        for h, names in explained.items():
            label = f" ({', '.join(names)})" if len(self.outputs) > 1 else ""
            lines.append(f"  Likely mistake{label}: {h}")
        for c in unexplained:
            k = bad[c][0]
            inputs = ", ".join(f"{n}={_short(a)}" for n, a in zip(self.arg_names, self.cases[k]))
            lines += [f"  {self.outputs[c]} differs on case {k}: {inputs}",
                      f"    expected {_short(want[k][c])}", f"    got      {_short(got[k][c])}"]
        return "\n".join(lines)


def _clone(args: tuple) -> tuple:
    return tuple(a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                 for a in args)


def _as_tensor(x: Any) -> torch.Tensor | None:
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float64)
    if isinstance(x, (int, float, bool)):
        return torch.tensor(float(x), dtype=torch.float64)
    return None


def _close(a: Any, b: Any, rtol: float, atol: float) -> bool:
    ta, tb = _as_tensor(a), _as_tensor(b)
    if ta is None or tb is None:
        return False
    if tb.dim() == 0 and ta.numel() == 1:  # a scalar may come back as a float or a 1-element tensor
        ta = ta.reshape(())
    return ta.shape == tb.shape and torch.allclose(ta, tb, rtol=rtol, atol=atol)


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {list(x.shape)}"
    return f"a {type(x).__name__}"


def _short(x: Any) -> str:
    if not isinstance(x, torch.Tensor):
        return repr(x)
    t = x.detach()
    if t.numel() > 24:
        return f"a tensor of shape {list(t.shape)}"
    values = t.tolist() if not t.is_floating_point() else (t.to(torch.float64) * 1e4).round().div(1e4).tolist()
    return f"{values} (shape {list(t.shape)})"


# --------------------------------------------------------------------------- case makers
BETAS = (0.1, 0.5, 0.05, 0.3, 2.0, 0.2)  # never 1: a missing β must change the result


def _bandit_case(g: torch.Generator, k: int) -> tuple:
    K = 3 + k % 5
    ref = torch.softmax(torch.randn(K, generator=g), -1)
    rewards = torch.randn(K, generator=g)
    return ref, rewards, BETAS[k % len(BETAS)]


def _logp_case(g: torch.Generator, k: int) -> tuple:
    """Summed log-probs of a batch of pairs; case 0 is step 0 (policy == reference)."""
    B = (4, 1, 7, 3, 5, 8)[k % 6]
    pc = -(1 + 30 * torch.rand(B, generator=g))
    pr = -(1 + 30 * torch.rand(B, generator=g))
    rc = pc + (0 if k == 0 else 3 * torch.randn(B, generator=g))
    rr = pr + (0 if k == 0 else 3 * torch.randn(B, generator=g))
    return pc.requires_grad_(), pr.requires_grad_(), rc, rr, BETAS[k % len(BETAS)]


def _rewards_case(g: torch.Generator, k: int) -> tuple:
    policy = -(1 + 30 * torch.rand(5 + k, generator=g))
    ref = policy + 3 * torch.randn(5 + k, generator=g)
    return policy.requires_grad_(), ref, BETAS[k % len(BETAS)]


def _accuracy_case(g: torch.Generator, k: int) -> tuple:
    B = 6 + k
    if k == 0:  # step 0: policy == reference, every reward is 0
        return torch.zeros(B), torch.zeros(B)
    chosen = torch.randn(B, generator=g)
    rejected = torch.randn(B, generator=g)
    rejected[: k % 3 + 1] = chosen[: k % 3 + 1]  # a few exact ties
    return chosen, rejected


def _sequence_case(g: torch.Generator, k: int) -> tuple:
    """Right-padded prompt+completion batch: mask = 1 on completion tokens only."""
    B, T, V = (2, 3, 1, 4, 2, 3)[k % 6], 7 + k, 5 + 2 * k
    logits = 3 * torch.randn(B, T, V, generator=g)
    input_ids = torch.randint(0, V, (B, T), generator=g)
    prompt_len = torch.randint(1, T - 3, (B,), generator=g)
    total = torch.minimum(prompt_len + torch.randint(2, T, (B,), generator=g), torch.tensor(T))
    pos = torch.arange(T)
    mask = ((pos >= prompt_len[:, None]) & (pos < total[:, None])).long()
    return logits, input_ids, mask


def _mask_case(g: torch.Generator, k: int) -> tuple:
    B, T = 2 + k % 3, 6 + k
    prompt_len = torch.randint(1, T - 3, (B,), generator=g)
    total = torch.minimum(prompt_len + torch.randint(2, T, (B,), generator=g), torch.tensor(T))
    attention_mask = (torch.arange(T) < total[:, None]).long()  # right padding
    return attention_mask, prompt_len


# --------------------------------------------------------------------------- references and variants
def _rewards(pc, pr, rc, rr, beta):
    return beta * (pc - rc).detach(), beta * (pr - rr).detach()


def _sigmoid_loss(loss_of_h: Callable, rewards: Callable = _rewards) -> Callable:
    def fn(pc, pr, rc, rr, beta):
        return (loss_of_h(pc, pr, rc, rr, beta), *rewards(pc, pr, rc, rr, beta))
    return fn


def _h(pc, pr, rc, rr):
    return (pc - rc) - (pr - rr)


def reference_dpo_loss(pc, pr, rc, rr, beta):
    """The sigmoid DPO loss of :func:`dpo_lib.losses.dpo_loss`: ``(losses, chosen_rewards, rejected_rewards)``."""
    return dpo_loss(pc, pr, rc, rr, beta=beta)


DPO_LOSS_MISTAKES = [
    Mistake("β is missing: the loss is -log σ(β·h) with h = (logπ_c - logref_c) - (logπ_r - logref_r).",
            _sigmoid_loss(lambda pc, pr, rc, rr, b: -F.logsigmoid(_h(pc, pr, rc, rr)))),
    Mistake("the sign is flipped (or chosen and rejected are swapped): the loss must shrink as the chosen "
            "response gains log-probability relative to the rejected one.",
            _sigmoid_loss(lambda pc, pr, rc, rr, b: -F.logsigmoid(-b * _h(pc, pr, rc, rr)))),
    Mistake("chosen and rejected are swapped.",
            lambda pc, pr, rc, rr, b: reference_dpo_loss(pr, pc, rr, rc, b)),
    Mistake("the minus sign is missing: the loss is -log σ(β·h), a positive number (ln 2 at step 0).",
            _sigmoid_loss(lambda pc, pr, rc, rr, b: F.logsigmoid(b * _h(pc, pr, rc, rr)))),
    Mistake("you returned the batch mean: return one loss per example (shape [B]); the caller takes .mean().",
            lambda *a: (reference_dpo_loss(*a)[0].mean(), *reference_dpo_loss(*a)[1:])),
    Mistake("the reference log-probs are missing: each log-ratio is log π_θ(y) - log π_ref(y).",
            _sigmoid_loss(lambda pc, pr, rc, rr, b: -F.logsigmoid(b * (pc - pr)),
                          lambda pc, pr, rc, rr, b: (b * pc.detach(), b * pr.detach()))),
    Mistake("the rewards are missing β: reward = β·(log π_θ(y) - log π_ref(y)).",
            _sigmoid_loss(lambda pc, pr, rc, rr, b: reference_dpo_loss(pc, pr, rc, rr, b)[0],
                          lambda pc, pr, rc, rr, b: ((pc - rc).detach(), (pr - rr).detach()))),
    Mistake("the rewards have the wrong sign: reward = β·(log π_θ(y) - log π_ref(y)), policy minus reference.",
            _sigmoid_loss(lambda pc, pr, rc, rr, b: reference_dpo_loss(pc, pr, rc, rr, b)[0],
                          lambda pc, pr, rc, rr, b: (b * (rc - pc).detach(), b * (rr - pr).detach()))),
]


def _loss_in_graph(args, out):
    if args[0].requires_grad and not out[0].requires_grad:
        return "the loss is cut from the autograd graph: don't .detach() it or go through .item()/numpy."


def _rewards_detached(args, out):
    if any(isinstance(o, torch.Tensor) and o.requires_grad for o in out[1:]):
        return "the rewards must be detached (.detach()): they are metrics, not part of the loss."


def _detached(args, out):
    if isinstance(out[0], torch.Tensor) and out[0].requires_grad:
        return "the rewards must be detached (.detach()): they are metrics, not part of the loss."


def reference_ipo_loss(pc, pr, rc, rr, beta):
    """IPO (Azar et al. 2023, Eq. 17, τ = β) per example: ``(h - 1/(2β))**2``."""
    return dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo")[0]


IPO_MISTAKES = [
    Mistake("the target margin is 1/(2β), not 1/β.", lambda pc, pr, rc, rr, b: (_h(pc, pr, rc, rr) - 1 / b) ** 2),
    Mistake("the target margin is 1/(2β) (the 1/(2τ) of the paper), not β/2.",
            lambda pc, pr, rc, rr, b: (_h(pc, pr, rc, rr) - b / 2) ** 2),
    Mistake("in IPO, h is not multiplied by β: the loss is (h - 1/(2β))², β only sets the target.",
            lambda pc, pr, rc, rr, b: (b * _h(pc, pr, rc, rr) - 1 / (2 * b)) ** 2),
    Mistake("chosen and rejected are swapped (or h has the wrong sign).",
            lambda pc, pr, rc, rr, b: (-_h(pc, pr, rc, rr) - 1 / (2 * b)) ** 2),
    Mistake("the square is missing: IPO is a squared loss, (h - 1/(2β))².",
            lambda pc, pr, rc, rr, b: _h(pc, pr, rc, rr) - 1 / (2 * b)),
    Mistake("you returned the batch mean: return one loss per example (shape [B]).",
            lambda *a: reference_ipo_loss(*a).mean()),
    Mistake("the reference log-probs are missing: h uses log π_θ(y) - log π_ref(y) for both responses.",
            lambda pc, pr, rc, rr, b: (pc - pr - 1 / (2 * b)) ** 2),
]


def reference_implicit_rewards(policy_logps, ref_logps, beta):
    """Eq. 5 without the log Z term: ``β·(log π_θ(y) - log π_ref(y))``, detached."""
    return beta * (policy_logps - ref_logps).detach()


IMPLICIT_REWARD_MISTAKES = [
    Mistake("β is missing: reward = β·(log π_θ(y) - log π_ref(y)).", lambda p, r, b: (p - r).detach()),
    Mistake("multiply by β, don't divide.", lambda p, r, b: ((p - r) / b).detach()),
    Mistake("the sign is flipped: policy minus reference.", lambda p, r, b: (b * (r - p)).detach()),
    Mistake("the reference is missing: reward = β·(log π_θ(y) - log π_ref(y)).", lambda p, r, b: (b * p).detach()),
]


def reference_reward_accuracy(chosen_rewards, rejected_rewards):
    """Fraction of pairs the implicit reward model orders correctly (strictly): a float."""
    return (chosen_rewards > rejected_rewards).float().mean().item()


ACCURACY_MISTAKES = [
    Mistake("ties count as correct: use a strict > (at step 0 every reward is 0 and accuracy is 0, not 1).",
            lambda c, r: (c >= r).float().mean().item()),
    Mistake("the comparison is reversed: a pair is correct when chosen_reward > rejected_reward.",
            lambda c, r: (c < r).float().mean().item()),
    Mistake("you returned a count: return the fraction of correct pairs (.float().mean()).",
            lambda c, r: (c > r).float().sum().item()),
]


def reference_completion_mask(attention_mask, prompt_lengths):
    """1 on completion tokens: real tokens (attention_mask, right-padded) at positions >= prompt length."""
    pos = torch.arange(attention_mask.shape[1], device=attention_mask.device)  # (T,)
    return ((pos >= prompt_lengths[:, None]) & attention_mask.bool()).long()   # (B, T)


def _positions(am, pl, keep):
    pos = torch.arange(am.shape[1])
    return (keep(pos[None, :], pl[:, None]) & am.bool()).long()


MASK_MISTAKES = [
    Mistake("the prompt is not masked: set the first prompt_length positions to 0.", lambda am, pl: am.long()),
    Mistake("padding is scored: multiply by the attention mask.",
            lambda am, pl: (torch.arange(am.shape[1])[None] >= pl[:, None]).long()),
    Mistake("off by one: the first completion token sits at index prompt_length (use >=, not >).",
            lambda am, pl: _positions(am, pl, lambda p, n: p > n)),
    Mistake("off by one: the last prompt token is not part of the completion (positions >= prompt_length).",
            lambda am, pl: _positions(am, pl, lambda p, n: p >= n - 1)),
    Mistake("the mask is inverted: it should mark the completion, not the prompt.",
            lambda am, pl: _positions(am, pl, lambda p, n: p < n)),
]


def reference_sequence_logprobs(logits, input_ids, completion_mask):
    """:func:`dpo_lib.logprobs.sequence_logprobs`: summed, shifted, masked log-probs ``[B]``."""
    return sequence_logprobs(logits, input_ids, completion_mask)


def _gather(scores, labels):
    return torch.gather(scores, -1, labels.unsqueeze(-1)).squeeze(-1)


SEQUENCE_MISTAKES = [
    Mistake("the labels are not shifted: the logit at position t scores token t+1 "
            "(use logits[:, :-1] with input_ids[:, 1:]).",
            lambda lg, ids, m: (_gather(lg.log_softmax(-1), ids) * m).sum(-1)),
    Mistake("off by one: shift the mask together with the labels (completion_mask[:, 1:]).",
            lambda lg, ids, m: (_gather(lg[:, :-1].log_softmax(-1), ids[:, 1:]) * m[:, :-1]).sum(-1)),
    Mistake("mean instead of sum: DPO sums the token log-probs of the completion.",
            lambda lg, ids, m: sequence_logprobs(lg, ids, m, average=True)),
    Mistake("the prompt is not masked (and padding is scored): multiply by the completion mask.",
            lambda lg, ids, m: sequence_logprobs(lg, ids, torch.ones_like(m))),
    Mistake("log_softmax is missing: score tokens with log-probabilities, not raw logits.",
            lambda lg, ids, m: (_gather(lg[:, :-1], ids[:, 1:]) * m[:, 1:]).sum(-1)),
    Mistake("use log-probabilities (log_softmax), not probabilities (softmax).",
            lambda lg, ids, m: (_gather(lg[:, :-1].softmax(-1), ids[:, 1:]) * m[:, 1:]).sum(-1)),
]


def _normalise(x):
    return x / x.sum(-1, keepdim=True)


OPTIMAL_POLICY_MISTAKES = [
    Mistake("divide the reward by β: π* ∝ π_ref·exp(r/β), not exp(β·r).",
            lambda p, r, b: _normalise(p * torch.exp(b * r))),
    Mistake("β is missing: π* ∝ π_ref·exp(r/β).", lambda p, r, b: _normalise(p * torch.exp(r))),
    Mistake("the normalisation is missing: divide by Z = Σ_y π_ref(y)·exp(r(y)/β) so π* sums to 1.",
            lambda p, r, b: p * torch.exp(r / b)),
    Mistake("π_ref is missing: π* = π_ref·exp(r/β)/Z, not softmax(r/β).", lambda p, r, b: torch.softmax(r / b, -1)),
    Mistake("the sign of the reward is flipped: exp(+r/β) favours high reward.",
            lambda p, r, b: _normalise(p * torch.exp(-r / b))),
]

_LOGPS = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps", "beta")

GRADERS: dict[str, Grader] = {
    "optimal_policy": Grader("optimal_policy", optimal_policy, _bandit_case, ("ref_probs", "rewards", "beta"),
                             ("probs",), OPTIMAL_POLICY_MISTAKES),
    "dpo_loss": Grader("dpo_loss", reference_dpo_loss, _logp_case, _LOGPS,
                       ("losses", "chosen_rewards", "rejected_rewards"), DPO_LOSS_MISTAKES,
                       (_loss_in_graph, _rewards_detached)),
    "ipo_loss": Grader("ipo_loss", reference_ipo_loss, _logp_case, _LOGPS, ("losses",), IPO_MISTAKES,
                       (_loss_in_graph,)),
    "implicit_rewards": Grader("implicit_rewards", reference_implicit_rewards, _rewards_case,
                               ("policy_logps", "ref_logps", "beta"), ("rewards",), IMPLICIT_REWARD_MISTAKES,
                               (_detached,)),
    "reward_accuracy": Grader("reward_accuracy", reference_reward_accuracy, _accuracy_case,
                              ("chosen_rewards", "rejected_rewards"), ("accuracy",), ACCURACY_MISTAKES),
    "sequence_logprobs": Grader("sequence_logprobs", reference_sequence_logprobs, _sequence_case,
                                ("logits", "input_ids", "completion_mask"), ("logps",), SEQUENCE_MISTAKES),
    "completion_mask": Grader("completion_mask", reference_completion_mask, _mask_case,
                              ("attention_mask", "prompt_lengths"), ("completion_mask",), MASK_MISTAKES),
}


def check_optimal_policy(fn: Callable) -> None:
    """``fn(ref_probs [K], rewards [K], beta) -> probs [K]``: Eq. 4."""
    GRADERS["optimal_policy"](fn)


def check_dpo_loss(fn: Callable) -> None:
    """``fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)``
    ``-> (losses [B], chosen_rewards [B], rejected_rewards [B])``: Eq. 7, rewards detached."""
    GRADERS["dpo_loss"](fn)


def check_ipo_loss(fn: Callable) -> None:
    """Same arguments as :func:`check_dpo_loss`; ``fn`` returns ``losses [B] = (h - 1/(2β))**2``."""
    GRADERS["ipo_loss"](fn)


def check_implicit_rewards(fn: Callable) -> None:
    """``fn(policy_logps [B], ref_logps [B], beta) -> rewards [B]``, detached."""
    GRADERS["implicit_rewards"](fn)


def check_reward_accuracy(fn: Callable) -> None:
    """``fn(chosen_rewards [B], rejected_rewards [B]) -> float``: fraction with chosen > rejected."""
    GRADERS["reward_accuracy"](fn)


def check_sequence_logprobs(fn: Callable) -> None:
    """``fn(logits [B,T,V], input_ids [B,T], completion_mask [B,T]) -> [B]`` summed, shifted log-probs."""
    GRADERS["sequence_logprobs"](fn)


def check_completion_mask(fn: Callable) -> None:
    """``fn(attention_mask [B,T] (right-padded), prompt_lengths [B]) -> mask [B,T]`` of completion tokens."""
    GRADERS["completion_mask"](fn)



# =========================================================================== lessons 02 and 03
# These graders run the learner's function inside a small harness (``HarnessGrader.run``): it
# builds what the function needs from a case (a tokenizer, a tiny model, an optimizer), calls
# it, and turns what comes back into tensors the Grader can compare. Cases use the course's
# tiny ChatML tokenizer and tiny Llama models built in code (no download, milliseconds each).


@dataclass
class HarnessGrader(Grader):
    """A :class:`Grader` whose functions are called through ``run(fn, *case_args) -> outputs``.

    The reference and the mistakes keep the learner's signature; ``run`` adapts all of them
    the same way (and may add outputs of its own, e.g. whether gradients were tracked).
    """

    run: Callable | None = None

    def _outputs(self, fn: Callable, args: tuple) -> tuple:
        run = self.run
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny models: extra threads only wait for each other (10x slower on busy CPUs)
        try:
            return super()._outputs(lambda *a: run(fn, *a), args)
        finally:
            torch.set_num_threads(threads)


class _Case:
    """The arguments of one harness case, shown by a short label in failure messages."""

    def __init__(self, label: str, **parts):
        self.label = label
        self.__dict__.update(parts)

    def __repr__(self) -> str:
        return self.label


_WORDS = ["good", "bad", "film", "cafe", "slow", "warm", "cold", "nice", "plot", "rain", "sun", "tea"]
_TOKENIZERS: dict[bool, Any] = {}


def _tiny_tok(add_bos: bool = False):
    if add_bos not in _TOKENIZERS:
        from dpo_lib.models import tiny_tokenizer
        _TOKENIZERS[add_bos] = tiny_tokenizer(add_bos=add_bos)
    return _TOKENIZERS[add_bos]


def _words(g: torch.Generator, n_min: int, n_max: int) -> str:
    n = int(torch.randint(n_min, n_max + 1, (1,), generator=g))
    return " ".join(_WORDS[int(i)] for i in torch.randint(0, len(_WORDS), (n,), generator=g))


def _messages(g: torch.Generator, turns: int) -> list[dict]:
    msgs = []
    for t in range(turns):
        msgs.append({"role": "user", "content": _words(g, 1, 4) + "?"})
        if t < turns - 1:
            msgs.append({"role": "assistant", "content": _words(g, 1, 3) + "."})
    return msgs


def _ids(x: Any, what: str, name: str) -> torch.Tensor:
    if hasattr(x, "keys") and "input_ids" in x:  # a BatchEncoding from apply_chat_template / tokenizer
        x = x["input_ids"]
    if isinstance(x, torch.Tensor):
        x = x.reshape(-1).tolist()
    if not isinstance(x, (list, tuple)) or not all(isinstance(i, int) for i in x):
        raise AssertionError(f"✗ {name}: {what} must be a list of token ids (ints), got {_describe(x)}")
    return torch.tensor(list(x), dtype=torch.long)


# --------------------------------------------------------------------------- prompt / completion split
def _template_ids(tokenizer, messages, **kwargs) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"])


def reference_split_prompt_completion(tokenizer, prompt, response):
    """Token ids of the prompt (with the assistant header) and of the completion (the answer and
    its end-of-turn tokens), as :func:`dpo_lib.data.tokenize_pair` splits them."""
    prompt_ids = _template_ids(tokenizer, prompt, add_generation_prompt=True)
    full_ids = _template_ids(tokenizer, prompt + response)
    return prompt_ids, full_ids[len(prompt_ids):]


def _split_case(g: torch.Generator, k: int) -> tuple:
    add_bos = k % 2 == 1  # odd cases: a tokenizer that also prepends BOS to every plain encoding
    prompt = _messages(g, 1 + (k % 3 == 2))
    response = [{"role": "assistant", "content": _words(g, 1, 5) + "."}]
    label = (f"tiny ChatML tokenizer ({'adds' if add_bos else 'no'} BOS on encode), "
             f"prompt={prompt!r}, response={response!r}")
    return (_Case(label, tokenizer=_tiny_tok(add_bos), prompt=prompt, response=response),)


def _run_split(fn: Callable, case: _Case) -> tuple:
    out = fn(case.tokenizer, copy.deepcopy(case.prompt), copy.deepcopy(case.response))
    if out is None:
        raise AssertionError("✗ split_prompt_completion: your function returned None — did you forget `return`?")
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise AssertionError(f"✗ split_prompt_completion: return a tuple (prompt_ids, completion_ids), got {_describe(out)}")
    return tuple(_ids(x, what, "split_prompt_completion") for x, what in zip(out, ("prompt_ids", "completion_ids")))


def _split_no_generation_prompt(tokenizer, prompt, response):
    prompt_ids = _template_ids(tokenizer, prompt)
    return prompt_ids, _template_ids(tokenizer, prompt + response)[len(prompt_ids):]


def _split_response_alone(tokenizer, prompt, response):
    return (_template_ids(tokenizer, prompt, add_generation_prompt=True),
            list(tokenizer(response[0]["content"], add_special_tokens=False)["input_ids"]))


def _split_text_then_encode(tokenizer, prompt, response):
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(prompt + response, tokenize=False)
    prompt_ids, full_ids = tokenizer(prompt_text)["input_ids"], tokenizer(full_text)["input_ids"]
    return prompt_ids, full_ids[len(prompt_ids):]


def _split_whole_sequence(tokenizer, prompt, response):
    return _template_ids(tokenizer, prompt, add_generation_prompt=True), _template_ids(tokenizer, prompt + response)


SPLIT_MISTAKES = [
    Mistake("the assistant header ('<|im_start|>assistant\\n') ended up in the completion: render the prompt with "
            "add_generation_prompt=True, so the header belongs to the prompt (the model does not write it).",
            _split_no_generation_prompt),
    Mistake("the completion has no end-of-turn token: take it from the chat template of prompt + response, so it "
            "ends with '<|im_end|>' (the model must learn to stop), instead of tokenizing the response text alone.",
            _split_response_alone),
    Mistake("duplicated BOS: the rendered template already starts with '<|im_start|>' and tokenizer(text) adds "
            "another; use apply_chat_template(..., tokenize=True) or tokenizer(text, add_special_tokens=False).",
            _split_text_then_encode),
    Mistake("the completion still contains the prompt: keep only the tokens after the prompt "
            "(full_ids[len(prompt_ids):]).", _split_whole_sequence),
]


# --------------------------------------------------------------------------- tiny language-model cases
def _tiny_lm(seed: int):
    from dpo_lib.models import tiny_model
    with torch.random.fork_rng(devices=[]):  # tiny_model seeds the global RNG: keep the learner's state
        return tiny_model(vocab_size=len(_tiny_tok()), seed=seed)


def _pair_batch(g: torch.Generator, n_pairs: int) -> dict:
    from dpo_lib.data import collate, tokenize_pair
    rows = [{"prompt": _messages(g, 1),
             "chosen": [{"role": "assistant", "content": _words(g, 1, 4)}],
             "rejected": [{"role": "assistant", "content": _words(g, 1, 4) + " no"}]} for _ in range(n_pairs)]
    tok = _tiny_tok()
    return collate([tokenize_pair(tok, r) for r in rows], tok.pad_token_id)


def _batch_label(batch: dict) -> str:
    B2, T = batch["input_ids"].shape
    return f"{B2 // 2} pair(s), input_ids [{B2}, {T}]"


def _lm_case(g: torch.Generator, k: int) -> tuple:
    batch = _pair_batch(g, (2, 1, 3, 2, 4, 1)[k % 6])
    return (_Case(f"tiny Llama (seed {k}), batch of {_batch_label(batch)}", model=_tiny_lm(k), batch=batch),)


def _clone_batch(batch: dict) -> dict:
    return {k: v.clone() for k, v in batch.items()}


def _pair_of_logps(out: Any, name: str) -> tuple:
    if out is None:
        raise AssertionError(f"✗ {name}: your function returned None — did you forget `return`?")
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise AssertionError(f"✗ {name}: return a tuple (chosen_logps, rejected_logps), got {_describe(out)}")
    return tuple(out)


def reference_concatenated_logps(model, batch):
    """:func:`dpo_lib.logprobs.concatenated_forward`: ``(chosen_logps [B], rejected_logps [B])``."""
    return concatenated_forward(model, batch)


def _run_concatenated(fn: Callable, case: _Case) -> tuple:
    return _pair_of_logps(fn(case.model, _clone_batch(case.batch)), "concatenated_logps")


def _all_logps(model, batch, mask=None, shift=True, average=False):
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    ids, m = batch["input_ids"], batch["completion_mask"] if mask is None else mask
    if shift:
        return sequence_logprobs(out.logits, ids, m, average=average)
    return (_gather(out.logits.log_softmax(-1), ids) * m).sum(-1)


CONCATENATED_MISTAKES = [
    Mistake("chosen and rejected are swapped: rows 0..B-1 of the batch are prompt+chosen, rows B..2B-1 "
            "prompt+rejected.", lambda model, batch: tuple(reversed(_all_logps(model, batch).chunk(2)))),
    Mistake("the rows are not interleaved: the first half of the batch is chosen, the second half rejected "
            "(logps.chunk(2), not logps[0::2] and logps[1::2]).",
            lambda model, batch: (_all_logps(model, batch)[0::2], _all_logps(model, batch)[1::2])),
    Mistake("mean instead of sum: DPO sums the token log-probs of each completion.",
            lambda model, batch: _all_logps(model, batch, average=True).chunk(2)),
    Mistake("the labels are not shifted: the logit at position t scores token t+1.",
            lambda model, batch: _all_logps(model, batch, shift=False).chunk(2)),
    Mistake("the prompt is not masked: score only the completion tokens (completion_mask), not every real "
            "token (attention_mask).",
            lambda model, batch: _all_logps(model, batch, mask=batch["attention_mask"]).chunk(2)),
]


# --------------------------------------------------------------------------- the frozen reference
class _GradModeProbe:
    """Records whether autograd was on during each forward of ``model``."""

    def __init__(self, model):
        self.grad_enabled: list[bool] = []
        self.handle = model.register_forward_pre_hook(lambda *_: self.grad_enabled.append(torch.is_grad_enabled()))

    def close(self) -> bool:
        self.handle.remove()
        return any(self.grad_enabled)


def reference_reference_logps(ref_model, batch):
    """The reference's ``(chosen_logps, rejected_logps)``, computed under ``torch.no_grad()``."""
    with torch.no_grad():
        return concatenated_forward(ref_model, batch)


def _run_reference(fn: Callable, case: _Case) -> tuple:
    model = copy.deepcopy(case.model)  # parameters require grad, as in a plain copy of the policy
    probe = _GradModeProbe(model)
    try:
        chosen, rejected = _pair_of_logps(fn(model, _clone_batch(case.batch)), "reference_logps")
    finally:
        tracked = probe.close()
    tracked = tracked or any(isinstance(t, torch.Tensor) and t.requires_grad for t in (chosen, rejected))
    return chosen, rejected, float(tracked)


def _no_grad(fn: Callable) -> Callable:
    return torch.no_grad()(fn)


def _reference_with_grad(ref_model, batch):
    return concatenated_forward(ref_model, batch)


REFERENCE_MISTAKES = [
    Mistake("the reference ran with gradients enabled: wrap its forward in `with torch.no_grad():` (the reference "
            "is frozen; with autograd on it keeps every activation for a backward that must never happen, and "
            ".detach() afterwards does not give that memory back).", _reference_with_grad),
    Mistake("chosen and rejected are swapped: rows 0..B-1 of the batch are prompt+chosen, rows B..2B-1 "
            "prompt+rejected.", lambda m, b: tuple(reversed(reference_reference_logps(m, b)))),
    Mistake("mean instead of sum: the reference's log-probs are summed like the policy's.",
            lambda m, b: _no_grad(_all_logps)(m, b, average=True).chunk(2)),
]


# --------------------------------------------------------------------------- one DPO training step
def _train_step(logps: Callable = concatenated_forward, beta_in_loss: bool = True, reduce: str = "mean",
                ref: str = "no_grad", swap: bool = False, backward: bool = True, step: bool = True,
                zero_grad: bool = True) -> Callable:
    """A DPO step ``(policy, ref_model, optimizer, batch, beta) -> loss``; the flags make the mistakes."""
    def train_step(policy, ref_model, optimizer, batch, beta):
        chosen, rejected = logps(policy, batch)
        if ref == "no_grad":
            with torch.no_grad():
                ref_chosen, ref_rejected = logps(ref_model, batch)
        elif ref == "grad":
            ref_chosen, ref_rejected = logps(ref_model, batch)
        else:  # the policy as its own reference
            ref_chosen, ref_rejected = chosen.detach(), rejected.detach()
        if swap:
            chosen, rejected, ref_chosen, ref_rejected = rejected, chosen, ref_rejected, ref_chosen
        losses, _, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta if beta_in_loss else 1.0)
        loss = losses.mean() if reduce == "mean" else losses.sum()
        if zero_grad:
            optimizer.zero_grad()
        if backward:
            loss.backward()
        if step:
            optimizer.step()
        return loss.item()
    return train_step


reference_dpo_train_step = _train_step()
reference_dpo_train_step.__doc__ = (
    "Policy log-probs with gradients, reference log-probs under no_grad, mean DPO loss, "
    "zero_grad / backward / step; returns the loss as a float.")


def _train_case(g: torch.Generator, k: int) -> tuple:
    policy = _tiny_lm(k)
    same = k % 2 == 0  # even cases: the reference is a copy of the policy (loss ln 2 at the first step)
    ref = copy.deepcopy(policy) if same else _tiny_lm(100 + k)
    batches = [_pair_batch(g, (2, 1, 3)[k % 3]), _pair_batch(g, (1, 2, 2)[k % 3])]
    beta, lr = BETAS[k % len(BETAS)], 2.0
    label = (f"tiny Llama policy (seed {k}), reference = {'a copy of the policy' if same else f'seed {100 + k}'}, "
             f"beta={beta}, SGD lr={lr}, two steps on batches of {_batch_label(batches[0])} and "
             f"{_batch_label(batches[1])}")
    return (_Case(label, policy=policy, ref=ref, batches=batches, beta=beta, lr=lr),)


def _run_train_step(fn: Callable, case: _Case) -> tuple:
    policy, ref = copy.deepcopy(case.policy), copy.deepcopy(case.ref)  # ref params require grad, like a plain copy
    policy.train()
    optimizer = torch.optim.SGD(policy.parameters(), lr=case.lr)
    probe = _GradModeProbe(ref)
    losses = []
    try:
        for batch in case.batches:
            loss = fn(policy, ref, optimizer, _clone_batch(batch), case.beta)
            if loss is None:
                raise AssertionError("✗ dpo_train_step: your function returned None — did you forget `return`?")
            if isinstance(loss, torch.Tensor) and loss.numel() == 1:
                loss = loss.item()
            if not isinstance(loss, (int, float)):
                raise AssertionError(f"✗ dpo_train_step: return the loss of the step (a float), got {_describe(loss)}")
            losses.append(float(loss))
    finally:
        tracked = probe.close()
    tracked = tracked or any(p.grad is not None for p in ref.parameters())
    weights = torch.cat([p.detach().reshape(-1) for p in policy.parameters()])
    return torch.tensor(losses), weights, float(tracked)


TRAIN_STEP_MISTAKES = [
    Mistake("β is missing: the loss is -log σ(β·h); pass beta to the loss.", _train_step(beta_in_loss=False)),
    Mistake("the reference ran with gradients enabled: compute its log-probs under `with torch.no_grad():` "
            "(otherwise loss.backward() also fills .grad of the frozen reference's parameters).",
            _train_step(ref="grad")),
    Mistake("the weights did not change: call loss.backward(), then optimizer.step() "
            "(and optimizer.zero_grad() before the backward, not between backward and step).",
            _train_step(step=False)),
    Mistake("optimizer.zero_grad() is missing: the gradients of the previous step are added to this one.",
            _train_step(zero_grad=False)),
    Mistake("mean instead of sum: the sequence log-probs are sums over the completion tokens.",
            _train_step(logps=lambda m, b: concatenated_forward(m, b, average=True))),
    Mistake("the loss is summed over the pairs: average it (losses.mean()), so the step size does not grow "
            "with the batch.", _train_step(reduce="sum")),
    Mistake("chosen and rejected are swapped: rows 0..B-1 are prompt+chosen.", _train_step(swap=True)),
    Mistake("the reference log-probs must come from ref_model, not from the policy (the loss is then always ln 2 "
            "and nothing is learned).", _train_step(ref="policy")),
]


def _register(grader: Grader) -> None:
    GRADERS[grader.name] = grader


_register(HarnessGrader("split_prompt_completion", reference_split_prompt_completion, _split_case, ("case",),
                        ("prompt_ids", "completion_ids"), SPLIT_MISTAKES, run=_run_split))
_register(HarnessGrader("concatenated_logps", reference_concatenated_logps, _lm_case, ("case",),
                        ("chosen_logps", "rejected_logps"), CONCATENATED_MISTAKES, run=_run_concatenated))
_register(HarnessGrader("reference_logps", reference_reference_logps, _lm_case, ("case",),
                        ("chosen_logps", "rejected_logps", "gradients_tracked"), REFERENCE_MISTAKES,
                        run=_run_reference))
_register(HarnessGrader("dpo_train_step", reference_dpo_train_step, _train_case, ("case",),
                        ("losses", "policy_weights", "gradients_tracked"), TRAIN_STEP_MISTAKES, run=_run_train_step))


def check_split_prompt_completion(fn: Callable) -> None:
    """``fn(tokenizer, prompt_messages, response_messages) -> (prompt_ids, completion_ids)`` (lists of ints):
    the prompt with the assistant header, and the completion with its end-of-turn token."""
    GRADERS["split_prompt_completion"](fn)


def check_concatenated_logps(fn: Callable) -> None:
    """``fn(model, batch) -> (chosen_logps [B], rejected_logps [B])`` from one forward over the collated
    ``[chosen; rejected]`` batch (rows 0..B-1 chosen, B..2B-1 rejected)."""
    GRADERS["concatenated_logps"](fn)


def check_reference_logps(fn: Callable) -> None:
    """``fn(ref_model, batch) -> (chosen_logps [B], rejected_logps [B])`` under ``torch.no_grad()``."""
    GRADERS["reference_logps"](fn)


def check_dpo_train_step(fn: Callable) -> None:
    """``fn(policy, ref_model, optimizer, batch, beta) -> loss`` (a float): one DPO optimizer step.
    Run twice per case with SGD; the losses, the policy's weights afterwards and whether the
    reference ever ran with gradients are compared with the reference step."""
    GRADERS["dpo_train_step"](fn)
