"""The one settings mechanism of every command: checked dataclass fields that become ``--flags``.

A setting is a dataclass field made by :func:`setting`: its default, its ``--help`` text, its
check and (for strings) its choices. A dataclass built on :class:`Checked` runs every check when
it is made, so ``TrainConfig(beta=-1)`` and ``python -m dpo_lib train --beta -1`` fail the same
way, with :class:`ConfigError` naming the field. :func:`add_arguments` turns the fields into
argparse flags and :func:`from_args` turns the parsed flags back into the dataclass, so a default,
its help line and the dataclass cannot disagree. The configs themselves are in
:mod:`dpo_lib.config`; the per-loss knobs come from :mod:`dpo_lib.losses`' registry.

Every error a user can fix (a bad flag, bad data, a missing model, a busy output folder) is a
:class:`UserError`: the command line prints its one-line message and exits 2.

This module imports no torch, so the command line rejects a bad flag in a fraction of a second.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import field, fields
from pathlib import Path
from typing import Any, Callable

__all__ = ["Checked", "ConfigError", "UserError", "add_arguments", "at_least", "from_args", "in_range",
           "input_file", "one_of", "optional", "output_file", "positive", "readable_file", "setting",
           "writable_folder"]


class UserError(Exception):
    """An error the user can fix; ``python -m dpo_lib`` prints its message on one line and exits 2."""


class ConfigError(UserError, ValueError):
    """A setting out of its range; ``name`` is the field (the flag is ``--name`` with dashes)."""

    def __init__(self, name: str, message: str):
        super().__init__(f"{name}: {message}")
        self.name, self.message = name, message

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def __str__(self) -> str:
        return f"{self.flag}: {self.message}"


# ---------------------------------------------------------------- checks: value -> problem or None

def positive(v) -> str | None:
    return None if v > 0 else f"must be > 0 (got {v})"


def at_least(lo) -> Callable:
    return lambda v: None if v >= lo else f"must be >= {lo} (got {v})"


def in_range(lo, hi, hi_open: bool = True) -> Callable:
    def check(v):
        ok = lo <= v < hi if hi_open else lo <= v <= hi
        return None if ok else f"must be in [{lo}, {hi}{')' if hi_open else ']'} (got {v})"
    return check


def one_of(choices) -> Callable:
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)} (got {v!r})"


def optional(check: Callable) -> Callable:
    return lambda v: None if v is None else check(v)


def readable_file(v) -> str | None:
    p = Path(v)
    if not p.exists():
        return f"no such file: {p}"
    if not p.is_file():
        return f"not a file (a folder?): {p}"
    return None if os.access(p, os.R_OK) else f"cannot read {p}"


def input_file(v) -> str | None:
    """A readable file, or a hub dataset the converters know (:mod:`dpo_lib.hub_datasets`)."""
    from dpo_lib.hub_datasets import is_hub_dataset  # torch-free
    return None if is_hub_dataset(str(v)) else readable_file(v)


def writable_folder(v) -> str | None:
    p = Path(v)
    if p.exists() and not p.is_dir():
        return f"exists and is not a folder: {p}"
    parent = next((q for q in [p, *p.parents] if q.exists()), Path("."))
    return None if os.access(parent, os.W_OK) else f"cannot write in {parent}"


def output_file(v) -> str | None:
    """A file to write: not a folder, in a folder that exists or can be made and written."""
    p = Path(v)
    if p.is_dir():
        return f"is a folder, expected a file to write: {p}"
    parent = next((q for q in p.parents if q.exists()), Path("."))
    if not parent.is_dir():
        return f"cannot write under {parent}: it is a file, not a folder"
    return None if os.access(parent, os.W_OK) else f"cannot write in {parent}"


# ---------------------------------------------------------------- fields and checked dataclasses

def setting(default: Any, help: str, check: Callable | None = None, choices=None, cli: bool = True,
            flag: str | None = None):
    """A config field with its ``--help`` text, its check, its choices (strings) and its flag
    (default ``--name-with-dashes``; e.g. ``-n`` as a short alias is given as ``flag="-n/--num-samples"``)."""
    if choices is not None and check is None:
        check = one_of(choices)
    return field(default=default, metadata={"help": help, "check": check, "choices": choices, "cli": cli,
                                            "flag": flag})


class Checked:
    """Base of the config dataclasses: every field's check runs when one is made, then
    :meth:`check_combinations` (settings that depend on each other)."""

    def __post_init__(self):
        for f in fields(self):
            check = f.metadata.get("check")
            problem = check(getattr(self, f.name)) if check else None
            if problem:
                raise ConfigError(f.name, problem)
        self.check_combinations()

    def check_combinations(self) -> None:
        pass


# ---------------------------------------------------------------- the command line, built from the fields

def _arg_type(annotation: str):
    """The argparse type of a field from its annotation (a string: ``from __future__ import annotations``)."""
    for name, kind in (("Path", Path), ("float", float), ("int", int)):
        if name in annotation:
            return kind
    return str


def _short(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def add_arguments(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One ``--flag`` per field of ``cls``; argparse defaults are left unset (``SUPPRESS``) so that
    :func:`from_args` takes every default from the dataclass itself."""
    for f in fields(cls):
        if not f.metadata.get("cli", True) or f.name in skip:
            continue
        meta = f.metadata
        flags = (meta.get("flag") or "--" + f.name.replace("_", "-")).split("/")
        shown = f.default if not isinstance(f.default, Path) else _short(f.default)
        help_text = f"{meta['help']} (default: {shown})"
        if isinstance(f.default, bool):  # off by default: --flag; on by default: --flag / --no-flag
            action = argparse.BooleanOptionalAction if f.default else "store_true"
            parser.add_argument(*flags, dest=f.name, action=action, default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(*flags, dest=f.name, type=_arg_type(str(f.type)), choices=meta.get("choices"),
                                default=argparse.SUPPRESS, help=help_text,
                                metavar=None if meta.get("choices") else f.name.upper())


def from_args(cls, args: argparse.Namespace, **overrides):
    """``cls`` from the parsed flags: a flag the user gave wins, else the dataclass default."""
    given = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    return cls(**{**given, **overrides})
