"""Preference data on disk: read and validate JSONL (or a JSON array), name every bad row.

Schema (the same as TRL / HF datasets). Each row has ``prompt``, ``chosen``, ``rejected``:

* standard: three strings; the completion is ``chosen`` followed by EOS;
* conversational: ``prompt`` is a list of ``{"role", "content"}`` messages ending with a
  user (or tool) turn, ``chosen`` / ``rejected`` are one-message lists with role assistant.

Tokenized pairs and their batches are :mod:`dpo_lib.features`.

Bad rows are reported as ``FILE:LINE: what is wrong`` (:class:`DataError`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from dpo_lib.settings import UserError

__all__ = ["DataError", "KEYS", "LoadReport", "ROLES", "data_hash", "is_conversational", "load_preferences",
           "load_prompts", "read_records", "row_problems"]

ROLES = ("system", "user", "assistant", "tool")
KEYS = ("prompt", "chosen", "rejected")


class DataError(UserError, ValueError):
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
    if isinstance(row["prompt"], str):
        return _standard_problems(row)
    if not isinstance(row["prompt"], list):
        return [f"'prompt' must be a string or a list of messages, got {type(row['prompt']).__name__}"]
    return _conversational_problems(row)


def _standard_problems(row: dict) -> list[str]:
    """A standard row: three strings, none empty, chosen and rejected different."""
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


def _conversational_problems(row: dict) -> list[str]:
    """A conversational row: message lists, the prompt ending on a user (or tool) turn, one assistant reply each."""
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
