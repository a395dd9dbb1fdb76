"""Run profiles: how big a lesson runs, chosen once per machine and printed by every lesson.

Three profiles (the README's "Course map"):

* ``smoke``  — CI (the ``CI`` variable is set): the mechanics only, seconds to a few minutes;
* ``laptop`` — no CUDA device: the lesson's real result on 2 CPU cores, within the budget the
  lesson states in its first cell;
* ``gpu``    — a CUDA device: the full settings (they fit a 16 GB T4 by ``dpo_lib.tools.vram``).

``DPO_COURSE_PROFILE=smoke|laptop|gpu`` overrides the automatic choice. A lesson's settings cell
does::

    PROFILE = profiles.current()
    S = profiles.pick(PROFILE, smoke={...}, laptop={...}, gpu={...})
    print(profiles.describe(PROFILE, S))

and the first line it prints is ``profile: NAME``: :func:`stored_profile` reads it back from a
committed notebook (the test that no lesson is stored from a smoke run).

A lesson that reads bundled data passes the files, ``profiles.describe(PROFILE, S, data=[DATA / "train.jsonl"])``,
and prints one ``data: PATH sha256:HEX`` line per file (PATH relative to the repository, HEX the first 12 hex
digits of the file's SHA-256): :func:`stored_data` reads them back, so a test can tell a stored run made on
other data than today's files.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "ENV", "ProfileError", "current", "data_line", "describe", "error_outputs", "measured", "parse_measured",
    "pick", "stored_data", "stored_profile",
]

PROFILES = ("smoke", "laptop", "gpu")
ENV = "DPO_COURSE_PROFILE"
LINE = re.compile(r"^profile: (\S+)$", re.MULTILINE)
DATA_LINE = re.compile(r"^data: (\S+) sha256:([0-9a-f]{12})$", re.MULTILINE)
ROOT = Path(__file__).resolve().parents[2]  # the repository: data lines name files relative to it


class ProfileError(ValueError):
    """An unknown profile name in ``DPO_COURSE_PROFILE``."""


def current(environ: Mapping[str, str] | None = None, cuda: bool | None = None) -> str:
    """The profile of this process: ``DPO_COURSE_PROFILE`` if set, else ``smoke`` under CI,
    ``gpu`` with a CUDA device and ``laptop`` without one."""
    environ = os.environ if environ is None else environ
    chosen = environ.get(ENV, "").strip().lower()
    if chosen:
        if chosen not in PROFILES:
            raise ProfileError(f"{ENV}={environ[ENV]!r}: expected one of {', '.join(PROFILES)}")
        return chosen
    if environ.get("CI", "").strip().lower() not in ("", "0", "false"):
        return "smoke"
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    return "gpu" if cuda else "laptop"


def pick(profile: str, **settings: dict[str, Any]) -> dict[str, Any]:
    """The settings of ``profile`` from one dict per profile; every profile names the same keys
    (so a lesson cannot forget one), and ``gpu`` may be left out to mean "as ``laptop``"."""
    if profile not in PROFILES:
        raise ProfileError(f"unknown profile {profile!r}: expected one of {', '.join(PROFILES)}")
    unknown = set(settings) - set(PROFILES)
    if unknown:
        raise ProfileError(f"settings for unknown profiles: {', '.join(sorted(unknown))}")
    settings.setdefault("gpu", settings.get("laptop"))
    missing = [p for p in PROFILES if settings.get(p) is None]
    if missing:
        raise ProfileError(f"no settings for profile(s): {', '.join(missing)}")
    keys = {p: set(s) for p, s in settings.items()}
    for p in PROFILES:
        if keys[p] != keys["laptop"]:
            diff = sorted(keys[p] ^ keys["laptop"])
            raise ProfileError(f"profile {p!r} and 'laptop' name different settings: {', '.join(diff)}")
    return dict(settings[profile])


def data_line(path: str | Path, root: Path = ROOT) -> str:
    """``data: PATH sha256:HEX`` for one data file: PATH relative to ``root`` (the repository) when the file
    is inside it, HEX the first 12 hex digits of its SHA-256."""
    from dpo_lib.checkpoints import file_sha256

    path = Path(path).resolve()
    shown = path.relative_to(root) if path.is_relative_to(root) else path
    return f"data: {shown.as_posix()} sha256:{file_sha256(path)[:12]}"


def describe(profile: str, settings: Mapping[str, Any] | None = None, data: Iterable[str | Path] = ()) -> str:
    """``profile: NAME`` on a line of its own, one ``  key  value`` line per setting, then one
    :func:`data_line` per file of ``data``."""
    lines = [f"profile: {profile}"]
    width = max((len(k) for k in settings or {}), default=0)
    lines += [f"  {k:<{width}}  {v}" for k, v in (settings or {}).items()]
    lines += [data_line(p) for p in data]
    return "\n".join(lines)


def _stored_texts(notebook) -> Iterable[str]:
    """The text of every stored output of a notebook's code cells, in order."""
    for cell in notebook["cells"]:
        for output in cell.get("outputs", []) if cell.get("cell_type") == "code" else []:
            text = output.get("text") or output.get("data", {}).get("text/plain") or ""
            yield "".join(text) if isinstance(text, list) else text


def stored_profile(notebook) -> str | None:
    """The profile a committed notebook was run under: the first ``profile: NAME`` line in its
    stored outputs (None when no cell printed one)."""
    for text in _stored_texts(notebook):
        found = LINE.search(text)
        if found:
            return found.group(1)
    return None


def stored_data(notebook) -> dict[str, str]:
    """The data a committed notebook's run read: ``{PATH: HEX}`` from its ``data: PATH sha256:HEX`` lines."""
    return {path: hex_ for text in _stored_texts(notebook) for path, hex_ in DATA_LINE.findall(text)}


def error_outputs(notebook) -> list[int]:
    """Indices of the cells whose stored outputs include an error (a traceback)."""
    return [i for i, cell in enumerate(notebook["cells"])
            if any(o.get("output_type") == "error" for o in cell.get("outputs", []))]


def measured(key: str, value: float, se: float | None = None, digits: int = 3) -> str:
    """One headline figure of a lesson as ``measured: KEY = VALUE ± SE`` (or without SE)."""
    text = f"measured: {key} = {value:.{digits}f}"
    return text + (f" ± {se:.{digits}f}" if se is not None else "")


MEASURED = re.compile(r"^measured: (\w+) = (-?[\d.]+(?:e-?\d+)?)(?: ± ([\d.]+(?:e-?\d+)?))?$", re.MULTILINE)


def parse_measured(text: str) -> dict[str, tuple[float, float | None]]:
    """The ``measured:`` lines of a lesson's output as ``{KEY: (VALUE, SE or None)}``."""
    return {k: (float(v), float(se) if se else None) for k, v, se in MEASURED.findall(text)}
