"""Preference data: read and validate JSONL, tokenize with the chat template, truncate, collate.

Schema (the same as TRL / HF datasets). Each row has ``prompt``, ``chosen``, ``rejected``:

* standard: three strings; the completion is ``chosen`` followed by EOS;
* conversational: ``prompt`` is a list of ``{"role", "content"}`` messages ending with a
  user (or tool) turn, ``chosen`` / ``rejected`` are one-message lists with role assistant.

Tokenization follows TRL 1.x so that both score exactly the same tokens: the prompt is
rendered with ``add_generation_prompt=True``, prompt+response without it, and the
completion is what comes after their common prefix (normally the whole tokenized prompt:
we count the rows where it is not, see :class:`TokenizeStats`). For ChatML templates the
completion is ``response <|im_end|> \\n``. The chat template is applied once: a duplicated
BOS at the start or a doubled EOS at the end is an error, not a silent loss of signal.

Bad rows are reported as ``FILE:LINE: what is wrong`` (:class:`DataError`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

ROLES = ("system", "user", "assistant", "tool")
KEYS = ("prompt", "chosen", "rejected")


class DataError(ValueError):
    """Invalid preference data. ``problems`` holds one ``FILE:LINE: what`` string per bad row."""

    def __init__(self, problems: list[str], header: str | None = None):
        self.problems = list(problems)
        shown = self.problems[:20]
        more = len(self.problems) - len(shown)
        lines = ([header] if header else []) + shown + ([f"... and {more} more"] if more > 0 else [])
        super().__init__("\n".join(lines))


# ----------------------------------------------------------------------------- validation

def is_conversational(row: dict) -> bool:
    return isinstance(row.get("prompt"), list)


def _message_problems(messages: Any, key: str) -> list[str]:
    if not isinstance(messages, list) or not messages:
        return [f"'{key}' must be a non-empty list of messages"]
    problems = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) < {"role", "content"}:
            problems.append(f"'{key}'[{i}] must be an object with 'role' and 'content'")
        elif m["role"] not in ROLES:
            problems.append(f"'{key}'[{i}] has unknown role {m['role']!r} (expected one of {', '.join(ROLES)})")
        elif not isinstance(m["content"], str):
            problems.append(f"'{key}'[{i}].content must be a string, got {type(m['content']).__name__}")
    return problems


def row_problems(row: Any) -> list[str]:
    """What is wrong with one row (empty list when it is valid)."""
    if not isinstance(row, dict):
        return [f"expected a JSON object, got {type(row).__name__}"]
    missing = [k for k in KEYS if k not in row]
    if missing:
        return [f"missing key{'s' if len(missing) > 1 else ''} {', '.join(repr(k) for k in missing)}"]
    if isinstance(row["prompt"], str):  # standard
        problems = [f"'{k}' must be a string like 'prompt', got {type(row[k]).__name__}"
                    for k in ("chosen", "rejected") if not isinstance(row[k], str)]
        if problems:
            return problems
        if not row["prompt"].strip():
            problems.append("empty prompt")
        problems += [f"empty {k} response" for k in ("chosen", "rejected") if not row[k].strip()]
        if row["chosen"] == row["rejected"]:
            problems.append("chosen is identical to rejected")
        return problems
    if not isinstance(row["prompt"], list):
        return [f"'prompt' must be a string or a list of messages, got {type(row['prompt']).__name__}"]
    problems = [p for k in KEYS for p in _message_problems(row[k], k)]
    if problems:
        return problems
    if row["prompt"][-1]["role"] not in ("user", "tool"):
        problems.append("the prompt's last message must be from the user (or a tool)")
    for k in ("chosen", "rejected"):
        if len(row[k]) != 1 or row[k][0]["role"] != "assistant":
            problems.append(f"'{k}' must be exactly one message with role 'assistant'")
        elif not row[k][0]["content"].strip():
            problems.append(f"empty {k} response")
    if not problems and row["chosen"][0]["content"] == row["rejected"][0]["content"]:
        problems.append("chosen is identical to rejected")
    return problems


# ----------------------------------------------------------------------------- reading files

_UTF8_BOM = b"\xef\xbb\xbf"
_WIDE_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32 (little-endian)"), (b"\x00\x00\xfe\xff", "UTF-32 (big-endian)"),
              (b"\xff\xfe", "UTF-16 (little-endian)"), (b"\xfe\xff", "UTF-16 (big-endian)"))


def _wide_encoding(raw: bytes) -> str | None:
    """``"UTF-16 ..."`` / ``"UTF-32 ..."`` when the file is saved in one (with or without a BOM)."""
    for bom, name in _WIDE_BOMS:
        if raw.startswith(bom):
            return f"{name}, byte-order mark {bom.hex(' ').upper()}"
    head = raw[:4]
    if len(head) >= 2 and b"\x00" in head:  # ASCII text in UTF-16/32 has a NUL next to every character
        return "UTF-16 or UTF-32 (NUL bytes between the characters)"
    return None


def _array_items(text: str) -> Iterable[tuple[int, Any]]:
    """``(offset, item)`` of each element of the JSON array ``text`` (already known to parse)."""
    decoder, n = json.JSONDecoder(), len(text)
    pos = text.index("[") + 1
    while True:
        while pos < n and text[pos] in " \t\n\r,":
            pos += 1
        if pos >= n or text[pos] == "]":
            return
        item, end = decoder.raw_decode(text, pos)
        yield pos, item
        pos = end


def read_records(path: str | Path) -> Iterable[tuple[str, Any, str | None]]:
    """Every record of a JSONL file, as people save them, in file order: ``(where, value, problem)``.

    ``where`` is ``"FILE:LINE"``; ``problem`` (``None`` for a readable record) says why the
    line could not be read, e.g. ``"not UTF-8 (byte 0xe9 at column 17) ..."``. A UTF-8
    byte-order mark, CRLF (or CR) line ends and blank lines are accepted. A file holding one
    JSON array of rows (``.json`` as many tools write it) is read too: ``where`` is then
    ``"FILE:LINE: item N"``, LINE being where item N (from 1) starts. Problems of the whole file
    (unreadable, UTF-16, a JSON object that is not a row per line) raise :class:`DataError`.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError([f"{path}: cannot read ({e.strerror or e})"]) from None
    wide = _wide_encoding(raw)
    if wide:
        raise DataError([f"{path}:1: not UTF-8: the file is saved as {wide}; save it again as UTF-8"])
    raw = raw.removeprefix(_UTF8_BOM).replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    texts: list[str | None] = []
    bad: list[tuple[int, str]] = []
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        try:
            texts.append(line.decode("utf-8").removeprefix("\ufeff"))  # a BOM left by concatenating files
        except UnicodeDecodeError as e:
            texts.append(None)
            bad.append((lineno, f"not UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1}); "
                                "save the file as UTF-8"))
    first = next(("" if t is None else t.strip() for t in texts if t is None or t.strip()), "")
    if first and (first.startswith("[") or (first.startswith("{") and not _parses(first))):
        document = _read_document(path, texts, bad)
        if document is not None:
            yield from document
            return
    bad_lines = dict(bad)
    for lineno, text in enumerate(texts, start=1):
        where = f"{path}:{lineno}"
        if text is None:
            yield where, None, bad_lines[lineno]
        elif text.strip():
            try:
                yield where, json.loads(text), None
            except json.JSONDecodeError as e:
                yield where, None, f"invalid JSON ({e.msg} at column {e.colno})"


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except json.JSONDecodeError:
        return False


def _read_document(path: Path, texts: list[str | None], bad: list[tuple[int, str]]
                   ) -> list[tuple[str, Any, str | None]] | None:
    """The records of a file that is one JSON document (an array of rows), or ``None`` when it
    is not one (then it is read as JSONL)."""
    if bad:  # the array cannot be parsed: say where its bytes are wrong
        return [(f"{path}:{lineno}", None, problem) for lineno, problem in bad]
    text = "\n".join(t for t in texts if t is not None)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" or not text.lstrip().startswith("["):
            return None  # JSONL whose first line is an array, or a bad first line: read line by line
        return [(f"{path}:{e.lineno}", None, f"invalid JSON in the array of rows ({e.msg} at column {e.colno})")]
    if isinstance(doc, list):
        if not doc:
            raise DataError([f"{path}: empty JSON array, no rows"])
        return [(f"{path}:{text.count(chr(10), 0, pos) + 1}: item {n}", item, None)
                for n, (pos, item) in enumerate(_array_items(text), start=1)]
    if isinstance(doc, dict):
        lists = [k for k, v in doc.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
        where = f" (its {lists[0]!r} holds a list: put that list at the top level)" if lists else ""
        raise DataError([f"{path}:1: one JSON object over several lines{where}; expected one row object "
                         "per line (JSONL) or a JSON array of rows"])
    return None


@dataclass
class LoadReport:
    path: str
    kept: int = 0
    dropped: int = 0
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return f"{self.path}: kept {self.kept} rows, dropped {self.dropped}"


def load_preferences(path: str | Path, skip_invalid: bool = False) -> tuple[list[dict], LoadReport]:
    """Read a JSONL preference file (or a JSON array of rows, see :func:`read_records`), validating every row.

    Each returned row gets a ``_where`` key (``"FILE:LINE"``) so later stages can name it.
    With ``skip_invalid=False`` any bad row raises :class:`DataError` listing all of them.
    """
    path = Path(path)
    report = LoadReport(str(path))
    rows = []
    for where, row, problem in read_records(path):
        problems = [problem] if problem else row_problems(row)
        if problems:
            report.problems.append(f"{where}: {'; '.join(problems)}")
            continue
        row["_where"] = where
        rows.append(row)
    report.kept, report.dropped = len(rows), len(report.problems)
    if not rows and not report.problems:
        raise DataError([f"{path}: empty file, no rows"])
    if report.problems and not skip_invalid:
        raise DataError(report.problems, header=f"{path}: {len(report.problems)} bad row(s)"
                        " (fix them, or pass --skip-invalid to train on the good ones)")
    if not rows:
        raise DataError(report.problems, header=f"{path}: no valid rows")
    return rows, report


def load_prompts(path: str | Path) -> list[dict]:
    """Rows with just a ``prompt`` (string or messages), e.g. for sampling pairs. Errors name FILE:LINE."""
    path = Path(path)
    rows, problems = [], []
    for where, row, problem in read_records(path):
        prompt = row.get("prompt") if isinstance(row, dict) else None
        bad = [problem] if problem else _message_problems(prompt, "prompt") if isinstance(prompt, list) else (
            [] if isinstance(prompt, str) and prompt.strip() else ["missing or empty 'prompt'"])
        if bad:
            problems.append(f"{where}: {'; '.join(bad)}")
        else:
            rows.append(row)
    if problems or not rows:
        raise DataError(problems or [f"{path}: empty file, no prompts"])
    return rows


def data_hash(rows: Iterable[dict]) -> str:
    """A short SHA-256 of the rows' content (not their file positions)."""
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps({k: row[k] for k in KEYS}, sort_keys=True, ensure_ascii=False).encode())
    return h.hexdigest()[:16]


def token_ids_hash(features: Iterable[dict]) -> str:
    """A short SHA-256 of tokenized pairs' ``prompt_ids``, ``chosen_ids``, ``rejected_ids``: the key of
    the reference log-prob cache, and the bench's check that two trainers scored the same tokens."""
    h = hashlib.sha256()
    for f in features:
        h.update(json.dumps([list(f["prompt_ids"]), list(f["chosen_ids"]), list(f["rejected_ids"])]).encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- tokenization

def _encode(tokenizer, value: str | list, **template_kwargs) -> list[int]:
    """Token ids of a string (tokenizer's own special tokens added) or of messages (the chat
    template, tokenized by it: the one place the library applies it, so it is applied once)."""
    if isinstance(value, list):
        out = tokenizer.apply_chat_template(value, tokenize=True, return_dict=True, **template_kwargs)
        return list(out["input_ids"])
    return list(tokenizer(value)["input_ids"])


def encode_prompt(tokenizer, prompt: str | list) -> list[int]:
    """Token ids of a prompt as the model sees it at generation time: messages end with the
    template's assistant header (``add_generation_prompt=True``), as in :func:`tokenize_pair`."""
    return _encode(tokenizer, prompt, add_generation_prompt=True)


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_pair(tokenizer, row: dict) -> dict[str, list[int]]:
    """``prompt_ids``, ``chosen_ids``, ``rejected_ids`` of one row (no truncation).

    Raises :class:`DataError` on a duplicated BOS or a doubled EOS.
    """
    where = row.get("_where", "<row>")
    if is_conversational(row):
        prompt_ids = _encode(tokenizer, row["prompt"], add_generation_prompt=True)
        full = {k: _encode(tokenizer, row["prompt"] + row[k]) for k in ("chosen", "rejected")}
    else:
        eos = tokenizer.eos_token or ""
        prompt_ids = _encode(tokenizer, row["prompt"])
        full = {k: _encode(tokenizer, row["prompt"] + row[k] + ("" if row[k].endswith(eos) else eos))
                for k in ("chosen", "rejected")}
    bos = tokenizer.bos_token_id
    if bos is not None and len(prompt_ids) >= 2 and prompt_ids[0] == prompt_ids[1] == bos:
        raise DataError([f"{where}: duplicated BOS: the chat template writes {tokenizer.bos_token!r} and "
                         "the tokenizer adds it again (encode the rendered text with add_special_tokens=False)"])
    n = min(common_prefix_length(prompt_ids, full["chosen"]), common_prefix_length(prompt_ids, full["rejected"]))
    out = {"prompt_ids": prompt_ids[:n], "chosen_ids": full["chosen"][n:], "rejected_ids": full["rejected"][n:],
           "prompt_is_prefix": n == len(prompt_ids)}
    eos_id = tokenizer.eos_token_id
    for k in ("chosen_ids", "rejected_ids"):
        ids = out[k]
        while ids and not tokenizer.decode(ids[-1:]).strip():  # ignore the template's trailing newline
            ids = ids[:-1]
        if eos_id is not None and len(ids) >= 2 and ids[-1] == ids[-2] == eos_id:
            raise DataError([f"{where}: doubled EOS at the end of {k[:-4]}: the response already ends "
                             f"with {tokenizer.eos_token!r} and the template adds another"])
    return out


@dataclass
class TokenizeStats:
    total: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    prompt_not_prefix: int = 0
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"tokenized {self.total} pairs: kept {self.kept}, truncated {self.truncated}, "
                f"dropped {self.dropped_too_long} whose prompt leaves no room for a response"
                + (f", {self.prompt_not_prefix} whose prompt was not a token prefix" if self.prompt_not_prefix else ""))


def truncate_pair(pair: dict, max_length: int | None, max_prompt_length: int | None,
                  min_response_tokens: int = 1) -> tuple[dict | None, bool]:
    """Keep the *end* of the prompt and the *start* of each response.

    The prompt is cut from the left to ``max_prompt_length``; each response is then cut
    from the right so that prompt + response fits ``max_length``. Returns ``(None, _)``
    when fewer than ``min_response_tokens`` of a response would be left.
    """
    prompt, chosen, rejected = pair["prompt_ids"], pair["chosen_ids"], pair["rejected_ids"]
    before = (len(prompt), len(chosen), len(rejected))
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        prompt = prompt[-max_prompt_length:]
    if max_length is not None:
        budget = max_length - len(prompt)
        if budget < min_response_tokens:
            return None, True
        chosen, rejected = chosen[:budget], rejected[:budget]
    out = dict(pair, prompt_ids=prompt, chosen_ids=chosen, rejected_ids=rejected)
    return out, before != (len(prompt), len(chosen), len(rejected))


def tokenize_rows(tokenizer, rows: list[dict], max_length: int | None = None,
                  max_prompt_length: int | None = None) -> tuple[list[dict], TokenizeStats]:
    """Tokenize and truncate every row. Pairs that cannot fit are dropped and counted,
    each named in ``stats.problems`` as ``FILE:LINE: ...``."""
    stats = TokenizeStats(total=len(rows))
    features = []
    for row in rows:
        pair = tokenize_pair(tokenizer, row)
        stats.prompt_not_prefix += not pair.pop("prompt_is_prefix")
        n_prompt = len(pair["prompt_ids"])
        pair, changed = truncate_pair(pair, max_length, max_prompt_length)
        if pair is None:
            stats.dropped_too_long += 1
            stats.problems.append(f"{row.get('_where', '<row>')}: prompt is {n_prompt} tokens, too long for "
                                  f"max_length={max_length} (raise --max-length or set --max-prompt-length)")
            continue
        stats.truncated += changed
        pair["where"] = row.get("_where", "<row>")
        features.append(pair)
    stats.kept = len(features)
    return features, stats


# ----------------------------------------------------------------------------- collation

def collate_sequences(prompts: list[list[int]], completions: list[list[int]], pad_token_id: int,
                      pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` / ``attention_mask`` / ``completion_mask`` (all ``[N, T]``) of
    prompt+completion sequences. Padding is excluded by ``attention_mask`` and never scored,
    because ``completion_mask`` is 0 there (labels are *masked*, not set to the pad id)."""
    T = max(len(p) + len(c) for p, c in zip(prompts, completions))
    if pad_to_multiple_of:
        T = -(-T // pad_to_multiple_of) * pad_to_multiple_of
    N = len(prompts)
    input_ids = torch.full((N, T), pad_token_id, dtype=torch.long)   # (N, T)
    attention_mask = torch.zeros((N, T), dtype=torch.long)           # (N, T)
    completion_mask = torch.zeros((N, T), dtype=torch.long)          # (N, T)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        input_ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        attention_mask[i, : len(p) + len(c)] = 1
        completion_mask[i, len(p): len(p) + len(c)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def pair_length(feature: dict) -> int:
    """Length of a tokenized pair once collated: its prompt plus the longer of its two responses."""
    return len(feature["prompt_ids"]) + max(len(feature["chosen_ids"]), len(feature["rejected_ids"]))


def length_sorted_batches(features: list[dict], batch_size: int) -> list[list[int]]:
    """Indices of ``features`` in batches of similar length (less padding).

    Sorted by ``(pair_length, index)``, so the same features always give the same batches:
    the reference log-probs and the evaluation of the untrained policy then see identical
    padding, and their implicit rewards are exactly 0, not ~1e-6 apart.
    """
    order = sorted(range(len(features)), key=lambda i: (pair_length(features[i]), i))
    return [order[k:k + batch_size] for k in range(0, len(order), batch_size)]


def collate(features: list[dict], pad_token_id: int, pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """One concatenated batch: rows ``0..B-1`` are prompt+chosen, rows ``B..2B-1`` prompt+rejected.

    Returns ``input_ids``, ``attention_mask``, ``completion_mask`` (all ``[2B, T]``, see
    :func:`collate_sequences`) and, when the features carry them, ``ref_chosen_logps`` /
    ``ref_rejected_logps`` (``[B]``).
    """
    prompts = [f["prompt_ids"] for f in features] * 2
    completions = [f["chosen_ids"] for f in features] + [f["rejected_ids"] for f in features]
    batch = collate_sequences(prompts, completions, pad_token_id, pad_to_multiple_of)
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        if key in features[0]:
            batch[key] = torch.tensor([f[key] for f in features], dtype=torch.float32)
    return batch


def batch_to(batch: dict, device: torch.device | str) -> dict:
    """Every tensor of a collated batch on ``device`` (collate builds batches on the CPU)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
