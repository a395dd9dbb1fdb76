"""Convert public preference datasets from the Hugging Face hub into the course schema.

The course schema is TRL's *conversational preference* format, one JSON object per row::

    {"prompt":   [{"role": "user", "content": "..."}, ...],   # ends with a user turn
     "chosen":   [{"role": "assistant", "content": "..."}],   # exactly one message
     "rejected": [{"role": "assistant", "content": "..."}]}

Every hub dataset stores preferences differently; each converter below reads rows in the
dataset's *own* layout and returns ``(rows, stats)``. Converters are pure functions over an
iterable of dicts: they never touch the network, so they are tested on small fixture files
(``tests/fixtures/hub/``). Only :func:`load_hub_preferences` calls ``datasets.load_dataset``.

Supported layouts
-----------------
``Anthropic/hh-rlhf`` (:func:`convert_hh_rlhf`)
    ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}`` — two whole
    transcripts that share every turn except the last assistant reply. We split each at its
    last ``"\\n\\nAssistant:"``; the part before is parsed into alternating user/assistant
    messages (the prompt), the part after is the response. Rows whose two prompts differ,
    that do not parse, or whose two responses are identical are skipped and counted.
``HuggingFaceH4/ultrafeedback_binarized`` (:func:`convert_ultrafeedback`, message layout)
    ``prompt`` (a string), ``chosen`` / ``rejected`` = the *whole* conversation as message
    lists (user turn + assistant reply), ``score_chosen`` / ``score_rejected`` (1–10).
    Splits ``train_prefs`` / ``test_prefs``.
``argilla/ultrafeedback-binarized-preferences`` (:func:`convert_ultrafeedback`, flat layout)
    ``instruction``, ``chosen_response``, ``rejected_response``, ``chosen_avg_rating``,
    ``rejected_avg_rating`` (``chosen_rating`` / ``rejected_rating`` are accepted too).
    Ties (equal scores) are skipped in both layouts; so are rows where the "chosen" side
    scored lower ("inverted").
``nvidia/HelpSteer3``, ``preference`` subset (:func:`convert_helpsteer3`)
    ``context`` (the conversation so far, a message list ending with a user turn),
    ``response1``, ``response2`` and ``overall_preference`` in ``-3..3``: negative means
    response 1 is better, positive response 2, ``0`` a tie (skipped).

Skip reasons recorded in :class:`ConversionStats`: ``malformed`` (does not parse or misses a
field), ``prompt_mismatch`` (chosen and rejected disagree on the conversation so far),
``tie``, ``inverted``, ``identical`` (chosen == rejected), ``empty_response``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

Message = dict[str, str]
Row = dict[str, list[Message]]

__all__ = [
    "ConversionStats",
    "HUB_DATASETS",
    "convert_hh_rlhf",
    "convert_helpsteer3",
    "convert_ultrafeedback",
    "is_hub_dataset",
    "load_hub_preferences",
    "parse_hh_transcript",
]


class _Skip(Exception):
    """Raised inside a converter to skip the current row for ``reason``."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class ConversionStats:
    """What a converter did: rows seen, rows kept, and rows skipped per reason."""

    seen: int = 0
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def _skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def __str__(self) -> str:
        parts = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        return f"seen={self.seen} kept={self.kept} skipped={self.n_skipped} ({parts})"


# --------------------------------------------------------------------------- helpers

def _text(value: Any) -> str:
    """A non-empty stripped string, or raise ``_Skip``."""
    if not isinstance(value, str):
        raise _Skip("malformed")
    value = value.strip()
    if not value:
        raise _Skip("empty_response")
    return value


def _messages(value: Any) -> list[Message]:
    """Validate a hub message list and return clean ``{"role", "content"}`` copies."""
    if not isinstance(value, (list, tuple)) or not value:
        raise _Skip("malformed")
    out = []
    for m in value:
        if not isinstance(m, dict):
            raise _Skip("malformed")
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise _Skip("malformed")
        out.append({"role": role, "content": content.strip()})
    return out


def _check_prompt(prompt: list[Message]) -> None:
    """The prompt must be non-empty, end with a user turn and hold no empty turns."""
    if not prompt or prompt[-1]["role"] != "user":
        raise _Skip("malformed")
    if any(not m["content"] for m in prompt):
        raise _Skip("malformed")
    if any(m["role"] == "system" for m in prompt[1:]):
        raise _Skip("malformed")  # a system message is only allowed as the first turn
    body = prompt[1:] if prompt[0]["role"] == "system" else prompt
    for i, m in enumerate(body):  # strict user/assistant alternation, starting with user
        if m["role"] != ("user" if i % 2 == 0 else "assistant"):
            raise _Skip("malformed")


def _pair(prompt: list[Message], chosen: str, rejected: str) -> Row:
    _check_prompt(prompt)
    if chosen == rejected:
        raise _Skip("identical")
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def _check_scores(row: dict, keys: Iterable[tuple[str, str]]) -> None:
    """Skip ties and inverted pairs, using the first pair of score columns present."""
    for kc, kr in keys:
        if kc in row and kr in row:
            sc, sr = row[kc], row[kr]
            if sc is None or sr is None:
                return  # scores not recorded: trust the dataset's chosen/rejected labels
            try:
                sc, sr = float(sc), float(sr)
            except (TypeError, ValueError):
                raise _Skip("malformed") from None
            if math.isnan(sc) or math.isnan(sr):
                raise _Skip("malformed")
            if sc == sr:
                raise _Skip("tie")
            if sc < sr:
                raise _Skip("inverted")
            return


def _run(rows: Iterable[dict], convert_one: Callable[[dict], Row],
         limit: int | None) -> tuple[list[Row], ConversionStats]:
    stats = ConversionStats()
    out: list[Row] = []
    for row in rows:
        if limit is not None and len(out) >= limit:
            break
        stats.seen += 1
        try:
            if not isinstance(row, dict):
                raise _Skip("malformed")
            out.append(convert_one(row))
        except _Skip as skip:
            stats._skip(skip.reason)
    stats.kept = len(out)
    return out, stats


# --------------------------------------------------------------------------- HH-RLHF

_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLE = {"Human": "user", "Assistant": "assistant"}
_HH_LAST = "\n\nAssistant:"


def parse_hh_transcript(text: str) -> tuple[list[Message], str]:
    """Split one HH-RLHF transcript into ``(prompt_messages, final_assistant_reply)``.

    Raises ``ValueError`` when the text does not follow the ``\\n\\nHuman: ... \\n\\nAssistant:
    ...`` pattern (text before the first speaker, roles that do not alternate, an empty turn,
    or a final reply that is itself followed by a ``Human:`` turn).
    """
    if not isinstance(text, str):
        raise ValueError("transcript is not a string")
    if not text.startswith("\n\n"):
        text = "\n\n" + text.lstrip()
    cut = text.rfind(_HH_LAST)
    if cut < 0:
        raise ValueError("no '\\n\\nAssistant:' turn")
    head, reply = text[:cut], text[cut + len(_HH_LAST):]
    if _HH_TURN.search(reply):
        raise ValueError("the last Assistant turn is followed by another turn")
    pieces = _HH_TURN.split(head)
    if pieces[0].strip():
        raise ValueError("text before the first 'Human:' turn")
    prompt = [{"role": _HH_ROLE[speaker], "content": content.strip()}
              for speaker, content in zip(pieces[1::2], pieces[2::2])]
    try:
        _check_prompt(prompt)
    except _Skip:
        raise ValueError("prompt turns do not alternate Human/Assistant, or one is empty") from None
    return prompt, reply.strip()


def _hh_one(row: dict) -> Row:
    if not isinstance(row.get("chosen"), str) or not isinstance(row.get("rejected"), str):
        raise _Skip("malformed")
    try:
        prompt_c, chosen = parse_hh_transcript(row["chosen"])
        prompt_r, rejected = parse_hh_transcript(row["rejected"])
    except ValueError:
        raise _Skip("malformed") from None
    if prompt_c != prompt_r:
        raise _Skip("prompt_mismatch")
    if not chosen or not rejected:
        raise _Skip("empty_response")
    return _pair(prompt_c, chosen, rejected)


def convert_hh_rlhf(rows: Iterable[dict], limit: int | None = None
                    ) -> tuple[list[Row], ConversionStats]:
    """Convert ``Anthropic/hh-rlhf`` rows (``chosen``/``rejected`` transcripts)."""
    return _run(rows, _hh_one, limit)


# --------------------------------------------------------------------------- UltraFeedback

_UF_SCORE_KEYS = (
    ("score_chosen", "score_rejected"),            # HuggingFaceH4/ultrafeedback_binarized
    ("chosen_avg_rating", "rejected_avg_rating"),  # argilla/ultrafeedback-binarized-preferences
    ("chosen_rating", "rejected_rating"),
    ("chosen-rating", "rejected-rating"),          # argilla/...-preferences-cleaned
)


def _uf_one(row: dict) -> Row:
    if isinstance(row.get("chosen"), (list, tuple)) or isinstance(row.get("rejected"), (list, tuple)):
        # message layout: chosen/rejected hold the whole conversation, last turn = the reply
        chosen_msgs, rejected_msgs = _messages(row.get("chosen")), _messages(row.get("rejected"))
        if chosen_msgs[-1]["role"] != "assistant" or rejected_msgs[-1]["role"] != "assistant":
            raise _Skip("malformed")
        prompt = chosen_msgs[:-1]
        if prompt != rejected_msgs[:-1]:
            raise _Skip("prompt_mismatch")
        _check_scores(row, _UF_SCORE_KEYS)
        chosen, rejected = _text(chosen_msgs[-1]["content"]), _text(rejected_msgs[-1]["content"])
    elif "chosen_response" in row or "rejected_response" in row:
        # flat layout: one instruction, two response strings
        instruction = row.get("instruction", row.get("prompt"))
        if not isinstance(instruction, str) or not instruction.strip():
            raise _Skip("malformed")
        prompt = [{"role": "user", "content": instruction.strip()}]
        _check_scores(row, _UF_SCORE_KEYS)
        chosen, rejected = _text(row.get("chosen_response")), _text(row.get("rejected_response"))
    else:
        raise _Skip("malformed")
    return _pair(prompt, chosen, rejected)


def convert_ultrafeedback(rows: Iterable[dict], limit: int | None = None
                          ) -> tuple[list[Row], ConversionStats]:
    """Convert UltraFeedback-binarized rows; the layout (message lists or flat) is detected per row."""
    return _run(rows, _uf_one, limit)


# --------------------------------------------------------------------------- HelpSteer3

def _hs3_one(row: dict) -> Row:
    prompt = _messages(row.get("context"))
    pref = row.get("overall_preference")
    if isinstance(pref, bool) or not isinstance(pref, (int, float)) or not -3 <= pref <= 3:
        raise _Skip("malformed")
    if pref == 0:
        raise _Skip("tie")
    r1, r2 = _text(row.get("response1")), _text(row.get("response2"))
    chosen, rejected = (r1, r2) if pref < 0 else (r2, r1)
    return _pair(prompt, chosen, rejected)


def convert_helpsteer3(rows: Iterable[dict], limit: int | None = None
                       ) -> tuple[list[Row], ConversionStats]:
    """Convert ``nvidia/HelpSteer3`` preference rows (``overall_preference < 0``: response1 wins)."""
    return _run(rows, _hs3_one, limit)


# --------------------------------------------------------------------------- hub loading

@dataclass(frozen=True)
class HubDataset:
    path: str
    config: str | None
    converter: Callable[..., tuple[list[Row], ConversionStats]]
    splits: dict[str, str]  # course split name -> the dataset's split name


HUB_DATASETS: dict[str, HubDataset] = {
    "hh-rlhf": HubDataset("Anthropic/hh-rlhf", None, convert_hh_rlhf,
                          {"train": "train", "test": "test"}),
    "ultrafeedback": HubDataset("HuggingFaceH4/ultrafeedback_binarized", None, convert_ultrafeedback,
                                {"train": "train_prefs", "test": "test_prefs"}),
    "ultrafeedback-argilla": HubDataset("argilla/ultrafeedback-binarized-preferences", None,
                                        convert_ultrafeedback, {"train": "train"}),
    "helpsteer3": HubDataset("nvidia/HelpSteer3", "preference", convert_helpsteer3,
                             {"train": "train", "test": "validation", "validation": "validation"}),
}
_BY_PATH = {spec.path.lower(): key for key, spec in HUB_DATASETS.items()}


def is_hub_dataset(name: str) -> bool:
    """Whether ``name`` is a key of :data:`HUB_DATASETS` or the hub id of one (and not a local file)."""
    return (name in HUB_DATASETS or name.lower() in _BY_PATH) and not Path(name).exists()


def load_hub_preferences(name: str, split: str = "train", limit: int | None = None,
                         streaming: bool | None = None, **load_kwargs: Any
                         ) -> tuple[list[Row], ConversionStats]:
    """Download a hub preference dataset (online only) and convert it to the course schema.

    ``name`` is a key of :data:`HUB_DATASETS` (``hh-rlhf``, ``ultrafeedback``,
    ``ultrafeedback-argilla``, ``helpsteer3``) or its hub id. ``split`` is ``"train"`` or
    ``"test"`` (mapped to the dataset's own split names, e.g. ``test_prefs``) or a split name
    of the dataset itself. ``limit`` caps the number of *converted* rows; with a limit the
    dataset is streamed by default, so only the first shards are downloaded. Extra keyword
    arguments go to ``datasets.load_dataset`` (e.g. ``data_dir="harmless-base"`` for one
    HH-RLHF subset, or ``revision=`` to pin a dataset commit).

    Never call this in tests: it needs the network and the ``datasets`` package.
    """
    key = name if name in HUB_DATASETS else _BY_PATH.get(name.lower())
    if key is None:
        known = ", ".join(sorted(HUB_DATASETS))
        raise ValueError(f"unknown hub dataset {name!r}; known: {known} (or their hub ids)")
    spec = HUB_DATASETS[key]
    hub_split = spec.splits.get(split, split)
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("load_hub_preferences needs the `datasets` package: "
                          "pip install 'dpo_lib[dev]'") from err
    if streaming is None:
        streaming = limit is not None
    ds = datasets.load_dataset(spec.path, spec.config, split=hub_split, streaming=streaming, **load_kwargs)
    rows: Iterator[dict] = iter(ds)
    return spec.converter(rows, limit=limit)
