"""See which tokens a DPO batch scores: a token-by-token view of the completion mask.

A causal LM's logit at position ``t`` predicts token ``t+1``, so a token at position ``t``
that the ``completion_mask`` marks is scored by the logit at ``t-1`` (see
:mod:`dpo_lib.logprobs`). Every token of one row falls in one of four roles:

* ``prompt``   — attended to but not scored (before the first scored token);
* ``scored``   — ``completion_mask == 1``: its log-prob enters the sequence sum;
* ``unscored`` — attended to, after the completion started, but not scored (usually a bug);
* ``pad``      — ``attention_mask == 0``: padding, never scored.

:func:`mask_table` prints one line per token (position, id, text, mask, role, the logit
position that scores it and, given ``logits``, its log-prob). :func:`show_mask` returns an
object that renders as coloured spans in a notebook (``_repr_html_``) and as compact text
anywhere else (``str``). Both take a single row (``[T]``) or a batch (``[B, T]``, pick one
with ``row``).
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["mask_counts", "mask_table", "show_mask", "token_info", "visible"]

ROLES = ("prompt", "scored", "unscored", "pad")
COLOURS = {"prompt": "#e6e6e6", "scored": "#b7e4b0", "unscored": "#f7c6c5", "pad": "#ffffff"}
TEXT_MARKS = {"prompt": ("", ""), "scored": ("[", "]"), "unscored": ("{", "}"), "pad": ("", "")}


@dataclass
class TokenInfo:
    """One token of a row: where it is, what it is, and whether (and by what) it is scored."""

    position: int
    token_id: int
    text: str              # decoded, with newlines and tabs made visible
    mask: int              # completion_mask at this position
    role: str              # prompt | scored | unscored | pad
    scored_by: int | None  # the logit position that scores it (position - 1), or None
    logprob: float | None  # log p(token | tokens before it), when logits are given
    attended: bool = True  # attention_mask at this position


def _row(x, row: int) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dim() == 2:
        t = t[row]
    if t.dim() != 1:
        raise ValueError(f"expected a row [T] or a batch [B, T], got shape {tuple(torch.as_tensor(x).shape)}")
    return t


def visible(text: str) -> str:
    """Token text with whitespace made visible: newline ↵, tab →, a lone space ␣."""
    text = text.replace("\n", "↵").replace("\t", "→")
    return "␣" if text == " " else text


def token_info(tokenizer, input_ids, completion_mask, attention_mask=None, row: int = 0,
               logits: torch.Tensor | None = None) -> list[TokenInfo]:
    """One :class:`TokenInfo` per position of one row.

    ``input_ids``, ``completion_mask`` and ``attention_mask`` are ``[T]`` or ``[B, T]``
    (tensors or lists); without ``attention_mask`` nothing is padding. ``logits``
    (``[T, V]`` or ``[B, T, V]``, the model output for ``input_ids``) adds the log-prob of
    each token that has a logit before it.
    """
    ids = _row(input_ids, row).long()
    mask = _row(completion_mask, row).long()
    attn = torch.ones_like(ids) if attention_mask is None else _row(attention_mask, row).long()
    if not (ids.shape == mask.shape == attn.shape):
        raise ValueError(f"shapes differ: input_ids {tuple(ids.shape)}, completion_mask {tuple(mask.shape)}, "
                         f"attention_mask {tuple(attn.shape)}")
    logps = None
    if logits is not None:
        lg = torch.as_tensor(logits)
        lg = lg[row] if lg.dim() == 3 else lg                                   # (T, V)
        if lg.shape[0] != ids.shape[0]:
            raise ValueError(f"logits have {lg.shape[0]} positions, input_ids {ids.shape[0]}")
        with torch.no_grad():
            lp = torch.log_softmax(lg[:-1].float(), dim=-1)                      # (T-1, V): logit t ...
            logps = [None] + lp.gather(-1, ids[1:, None]).squeeze(-1).tolist()   # ... scores token t+1
    started = False
    out = []
    for t in range(ids.shape[0]):
        m, a = int(mask[t]), int(attn[t])
        if m:
            role, started = "scored", True
        elif not a:
            role = "pad"
        else:
            role = "unscored" if started else "prompt"
        scored_by = t - 1 if m and t > 0 else None
        out.append(TokenInfo(t, int(ids[t]), visible(tokenizer.decode([int(ids[t])])), m, role, scored_by,
                             logps[t] if logps is not None and m else None, bool(a)))
    return out


def mask_counts(completion_mask, attention_mask=None, row: int = 0) -> dict[str, int]:
    """How many tokens of one row are ``prompt``, ``scored``, ``unscored`` and ``pad``."""
    mask = _row(completion_mask, row).long()
    attn = torch.ones_like(mask) if attention_mask is None else _row(attention_mask, row).long()
    scored = mask.bool()
    first = int(scored.float().argmax()) if scored.any() else mask.shape[0]
    before = torch.arange(mask.shape[0]) < first
    real = attn.bool() & ~scored
    return {"prompt": int((real & before).sum()), "scored": int(scored.sum()),
            "unscored": int((real & ~before).sum()), "pad": int((~attn.bool() & ~scored).sum())}


def _problems(infos: Sequence[TokenInfo]) -> list[str]:
    problems = []
    if infos and infos[0].mask:
        problems.append("position 0 is marked but no logit comes before it: it can never be scored")
    if any(i.mask and not i.attended for i in infos):
        problems.append("padding is marked as scored (completion_mask is 1 where attention_mask is 0)")
    unscored = [i.position for i in infos if i.role == "unscored"]
    if unscored:
        problems.append(f"{len(unscored)} token(s) after the completion started are not scored "
                        f"(positions {unscored[0]}..{unscored[-1]}): a gap in the mask?")
    if not any(i.mask for i in infos):
        problems.append("no token is scored")
    return problems


def mask_table(tokenizer, input_ids, completion_mask, attention_mask=None, row: int = 0,
               logits: torch.Tensor | None = None, positions: slice | None = None) -> str:
    """A plain-text table, one line per token: position, id, text, mask, role, the logit that
    scores it (``t-1`` for a scored token at ``t``) and, with ``logits``, its log-prob.

    ``positions`` (a slice) shows only part of the row; the summary line counts all of it.
    """
    infos = token_info(tokenizer, input_ids, completion_mask, attention_mask, row, logits)
    shown = infos[positions] if positions is not None else infos
    width = max([len(repr(i.text)) for i in shown] + [5])
    head = f"{'pos':>4}  {'id':>6}  {'token':<{width}}  mask  {'role':<8}  scored by"
    if logits is not None:
        head += "   log-prob"
    lines = [head, "-" * len(head)]
    for i in shown:
        by = f"logit {i.scored_by}" if i.scored_by is not None else ("(none!)" if i.mask else "-")
        line = f"{i.position:>4}  {i.token_id:>6}  {repr(i.text):<{width}}  {i.mask:>4}  {i.role:<8}  {by:<9}"
        if logits is not None:
            line += f"  {i.logprob:9.4f}" if i.logprob is not None else f"  {'':>9}"
        lines.append(line.rstrip())
    c = mask_counts(completion_mask, attention_mask, row)
    summary = (f"{len(infos)} positions: {c['prompt']} prompt, {c['scored']} scored, "
               f"{c['unscored']} unscored, {c['pad']} pad")
    scored = [i for i in infos if i.mask and i.scored_by is not None]
    if scored:
        summary += (f"; scored tokens at positions {scored[0].position}..{scored[-1].position} "
                    f"are read from logits {scored[0].scored_by}..{scored[-1].scored_by}")
    if logits is not None and scored:
        summary += f"; sum of their log-probs = {sum(i.logprob for i in scored):.4f}"
    lines += ["-" * len(head), summary] + [f"warning: {p}" for p in _problems(infos)]
    return "\n".join(lines)


class MaskView:
    """The tokens of one row, coloured by role. Renders as HTML in a notebook, as text elsewhere."""

    def __init__(self, infos: list[TokenInfo], counts: dict[str, int], title: str = ""):
        self.infos, self.counts, self.title = infos, counts, title

    def text(self) -> str:
        """Compact text: scored tokens in ``[...]``, unscored-after-start in ``{...}``,
        padding as ``·``, prompt tokens as they are."""
        parts = []
        for i in self.infos:
            if i.role == "pad":
                parts.append("·")
            else:
                left, right = TEXT_MARKS[i.role]
                parts.append(f"{left}{i.text}{right}")
        legend = ("legend: [scored]  prompt as is  {not scored after the completion started}  · padding  | "
                  + ", ".join(f"{k} {v}" for k, v in self.counts.items()))
        lines = ([self.title] if self.title else []) + ["".join(parts), legend]
        lines += [f"warning: {p}" for p in _problems(self.infos)]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.text()

    __repr__ = __str__

    def _repr_html_(self) -> str:
        spans = []
        for i in self.infos:
            tip = f"pos {i.position}, id {i.token_id}, {i.role}"
            if i.scored_by is not None:
                tip += f", scored by logit {i.scored_by}"
            if i.logprob is not None:
                tip += f", log p = {i.logprob:.3f}"
            style = f"background:{COLOURS[i.role]};padding:1px 1px;margin:0 1px;border-radius:3px;"
            if i.role == "pad":
                style += "color:#aaa;border:1px dashed #ccc;"
            if i.role == "unscored":
                style += "outline:1px solid #c00;"
            text = "·" if i.role == "pad" else html.escape(i.text)
            spans.append(f'<span title="{html.escape(tip)}" style="{style}">{text}</span>')
            if i.text.endswith("↵"):
                spans.append("<br>")
        legend = " ".join(f'<span style="background:{COLOURS[r]};padding:1px 4px;border-radius:3px;'
                          f'{"border:1px dashed #ccc;" if r == "pad" else ""}">{r} {self.counts[r]}</span>'
                          for r in ROLES)
        title = f"<div><b>{html.escape(self.title)}</b></div>" if self.title else ""
        warnings = "".join(f'<div style="color:#c00">warning: {html.escape(p)}</div>' for p in _problems(self.infos))
        return (f'<div style="font-family:monospace;font-size:12px;line-height:1.9">{title}'
                f'<div style="white-space:pre-wrap">{"".join(spans)}</div>'
                f'<div style="margin-top:4px">{legend} (hover a token for its position and logit)</div>'
                f"{warnings}</div>")


def show_mask(tokenizer, input_ids, completion_mask, attention_mask=None, row: int = 0,
              logits: torch.Tensor | None = None, title: str = "") -> MaskView:
    """The row's tokens coloured by role: prompt (grey), scored (green), unscored after the
    completion started (red), padding (dotted). Display it in a notebook, or ``print`` it."""
    infos = token_info(tokenizer, input_ids, completion_mask, attention_mask, row, logits)
    return MaskView(infos, mask_counts(completion_mask, attention_mask, row), title)
