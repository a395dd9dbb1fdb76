"""The grading machinery behind :mod:`dpo_lib.course.graders`: a :class:`Grader` compares a learner's
function with a reference on seeded random cases and names the likely mistake when they differ,
by finding the known-wrong variant (:class:`Mistake`) the learner's outputs agree with.

:class:`HarnessGrader` calls every function through a small harness (a tokenizer, a tiny model,
an optimizer built from the case), for the graders of lessons 02 and 03 (:mod:`dpo_lib.course.graders_lm`).
"""

from __future__ import annotations

import copy
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

__all__ = ["BETAS", "Grader", "GradingError", "HarnessGrader", "Mistake", "probe_weights"]

BETAS = (0.1, 0.5, 0.05, 0.3, 2.0, 0.2)  # never 1: a missing β must change the result


class GradingError(AssertionError):
    """A grader's verdict on the learner's function: the message names the likely mistake.

    It is an ``AssertionError`` (nbval and pytest treat it as a failed check), and it renders itself:
    IPython calls :meth:`_render_traceback_` instead of printing a traceback, so JupyterLab, Colab and
    nbval show the learner the message alone, without the frames of the grading library.
    """

    def _render_traceback_(self) -> list[str]:
        return ["\x1b[0;31m" + line + "\x1b[0m" if i == 0 else line
                for i, line in enumerate(str(self).splitlines() or [type(self).__name__])]


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
    ``grads`` lists ``(output name, argument name)`` pairs whose gradient is compared too, as one
    more output named ``∂output/∂argument`` (the gradient of a fixed weighted sum of the output's
    entries; zero when the output is cut from the graph): right values with a wrong gradient fail.
    """

    name: str
    reference: Callable
    make_case: Callable[[torch.Generator, int], tuple]
    arg_names: Sequence[str]
    outputs: Sequence[str] = ("output",)
    mistakes: Sequence[Mistake] = ()
    checks: Sequence[Callable[[tuple, tuple], str | None]] = ()
    grads: Sequence[tuple[str, str]] = ()
    n_cases: int = 6
    rtol: float = 1e-4
    atol: float = 1e-5
    seed: int = 0
    cases: list = field(default_factory=list, init=False, repr=False)

    @property
    def names(self) -> list[str]:
        """The compared outputs: the returned values, then the gradients of :attr:`grads`."""
        return list(self.outputs) + [f"∂{o}/∂{a}" for o, a in self.grads]

    def __call__(self, fn: Callable) -> None:
        g = torch.Generator().manual_seed(self.seed)
        self.cases = [self.make_case(g, k) for k in range(self.n_cases)]
        got = [self._outputs(fn, args) for args in self.cases]  # learner errors propagate (TODO cells)
        want = [self._outputs(self.reference, args) for args in self.cases]
        bad = {c: [k for k in range(self.n_cases) if not _close(got[k][c], want[k][c], self.rtol, self.atol)]
               for c in range(len(self.names))}
        bad = {c: ks for c, ks in bad.items() if ks}
        if bad:
            raise GradingError(self._explain(got, want, bad))
        for args, out in zip(self.cases, got):
            for check in self.checks:
                hint = check(args, out)
                if hint:
                    raise GradingError(f"✗ {self.name}: the values are right, but {hint}")
        print(f"✓ {self.name}: {self.n_cases}/{self.n_cases} cases match")

    def _outputs(self, fn: Callable, args: tuple) -> tuple:
        args = _clone(args)
        out = fn(*args)
        if len(self.outputs) == 1:
            out = (out,)
        elif not isinstance(out, (tuple, list)) or len(out) != len(self.outputs):
            raise GradingError(f"✗ {self.name}: return a tuple ({', '.join(self.outputs)}), got {_describe(out)}")
        if any(o is None for o in out):
            raise GradingError(f"✗ {self.name}: your function returned None — did you forget `return`?")
        grads = [_gradient(out[list(self.outputs).index(o)], args[list(self.arg_names).index(a)])
                 for o, a in self.grads]
        return tuple(out) + tuple(grads)

    def _explain(self, got: list, want: list, bad: dict) -> str:
        worst = max(len(ks) for ks in bad.values())
        lines = [f"✗ {self.name}: {worst}/{self.n_cases} cases differ from the reference."]
        variants = [[self._outputs(m.fn, args) for args in self.cases] for m in self.mistakes]
        # the outputs on which the learner's function agrees with each mistake, on every case
        agree = [{c for c in range(len(self.names)) if all(_close(got[k][c], var[k][c], self.rtol, self.atol)
                                                          for k in range(self.n_cases))} for var in variants]
        covers = [a & set(bad) for a in agree]  # the differences each mistake explains
        # keep the best explanations: drop a mistake when another explains more, or the same and agrees on more
        keep = [i for i, s in enumerate(covers) if s and not any(
            s < t or (s == t and len(agree[j]) > len(agree[i])) for j, t in enumerate(covers))]
        explained: dict[str, list[str]] = {}  # hint -> the outputs it explains
        for i in keep:
            explained.setdefault(self.mistakes[i].hint, []).extend(self.names[c] for c in sorted(covers[i]))
        for h, names in explained.items():
            label = f" ({', '.join(dict.fromkeys(names))})" if len(self.names) > 1 else ""
            lines.append(f"  Likely mistake{label}: {h}")
        for c in [c for c in bad if not any(c in covers[i] for i in keep)]:
            k = bad[c][0]
            inputs = ", ".join(f"{n}={_short(a)}" for n, a in zip(self.arg_names, self.cases[k]))
            lines += [f"  {self.names[c]} differs on case {k}: {inputs}",
                      *_difference(want[k][c], got[k][c], self.rtol, self.atol)]
        return "\n".join(lines)


def _clone(args: tuple) -> tuple:
    return tuple(a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor)
                 else copy.deepcopy(a) if isinstance(a, (list, dict)) else a for a in args)


def probe_weights(like: torch.Tensor) -> torch.Tensor:
    """Fixed, distinct weights (1 to 2) for the entries of ``like``: a gradient probe that sees order and scale."""
    return torch.linspace(1.0, 2.0, like.numel(), dtype=like.dtype, device=like.device).reshape(like.shape)


def _gradient(out: Any, wrt: torch.Tensor) -> torch.Tensor:
    """∂(Σ w·out)/∂wrt with :func:`probe_weights` ``w``; zeros where ``out`` does not reach ``wrt``."""
    if not (isinstance(out, torch.Tensor) and out.requires_grad and out.is_floating_point()):
        return torch.zeros_like(wrt)
    (grad,) = torch.autograd.grad((out * probe_weights(out)).sum(), wrt, retain_graph=True, allow_unused=True)
    return torch.zeros_like(wrt) if grad is None else grad


def _difference(want: Any, got: Any, rtol: float, atol: float) -> list[str]:
    """Lines that say how ``got`` differs from ``want``: the values, the shapes, or where and by how much."""
    tw, tg = _as_tensor(want), _as_tensor(got)
    if tw is None or tg is None or tw.numel() != tg.numel() or (tw.dim() and tw.shape != tg.shape):
        lines = [f"    expected {_short(want)}", f"    got      {_short(got)}"]
        if tw is not None and tg is not None:
            lines.append(f"    the shapes differ: expected {list(tw.shape)}, got {list(tg.shape)}")
        return lines
    lines = [] if tw.numel() > 24 else [f"    expected {_short(want)}", f"    got      {_short(got)}"]
    tw, tg = tw.reshape(-1), tg.reshape(-1)
    bad = ~torch.isfinite(tg) & torch.isfinite(tw)
    if bad.any():
        i = int(bad.nonzero()[0])
        return lines + [f"    got {tg[i].item()} at index {_index(i, want)} where {tw[i].item():.6g} was expected: "
                        "an overflow, or a division by zero?"]
    diff = (tg - tw).abs().nan_to_num(nan=float("inf"))
    outside = int((diff > atol + rtol * tw.abs()).sum())
    i = int(diff.argmax())
    return lines + [f"    largest difference {diff[i].item():.3g} at index {_index(i, want)} (expected "
                    f"{tw[i].item():.6g}, got {tg[i].item():.6g}); {outside} of {tw.numel()} entries differ by more "
                    f"than the tolerance (rtol={rtol:g}, atol={atol:g})"]


def _index(flat: int, like: Any) -> str:
    shape = list(like.shape) if isinstance(like, torch.Tensor) else []
    if len(shape) <= 1:
        return str(flat) if shape else "0"
    return str(tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), shape)))


def _as_tensor(x: Any) -> torch.Tensor | None:
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float64)
    if isinstance(x, (numbers.Real, np.bool_)):  # Python and numpy numbers (np.int64, np.float32, ...)
        return torch.tensor(float(x), dtype=torch.float64)
    return None


def _close(a: Any, b: Any, rtol: float, atol: float) -> bool:
    ta, tb = _as_tensor(a), _as_tensor(b)
    if ta is None or tb is None:
        return False
    if tb.dim() == 0 and ta.numel() == 1:  # a scalar may come back as a float or a 1-element tensor
        ta = ta.reshape(())
    return ta.shape == tb.shape and torch.allclose(ta, tb, rtol=rtol, atol=atol, equal_nan=True)


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


def _gather(scores, labels):
    """``scores[..., labels]``: the score of each label, for building references and variants."""
    return torch.gather(scores, -1, labels.unsqueeze(-1)).squeeze(-1)


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


class _GradModeProbe:
    """Records whether autograd was on during each forward of ``model`` (graders of a frozen reference)."""

    def __init__(self, model):
        self.grad_enabled: list[bool] = []
        self.handle = model.register_forward_pre_hook(lambda *_: self.grad_enabled.append(torch.is_grad_enabled()))

    def close(self) -> bool:
        self.handle.remove()
        return any(self.grad_enabled)
