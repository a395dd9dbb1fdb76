"""Notebooks stored as JupyterLab writes them, with outputs that read as finished anywhere.

A lesson's stored outputs are what a learner reads first, often in a static viewer (GitHub,
nbviewer) or in a JupyterLab that has not trusted the notebook. Two things spoil them:

* **Progress bars.** In a notebook, tqdm draws an ipywidget; its stored output is the widget's
  id plus the text of its *first* frame (``0%|          | 0/32``), and only a trusted
  JupyterLab with the widget state can redraw the finished bar. :func:`tidy` replaces each bar by
  the text of its final state (read from the widget state stored in the notebook's metadata,
  ``DPO: 100%|██████████| 31/31 [07:10<00:00, ...]``), drops the bars that were closed
  (``leave=False``: they vanished in the live run too), and then drops the widget state.
* **Metadata JupyterLab rewrites on opening.** JupyterLab names the default kernel
  ``Python 3 (ipykernel)``; a notebook stored with another display name is marked modified the
  moment it opens. :func:`tidy` stores the kernelspec JupyterLab writes, and :func:`dumps` writes
  the file byte for byte as JupyterLab saves it (nbformat's JSON: sorted keys, indent 1,
  multi-line strings as lists, a final newline) — checked by the browser test, which opens a
  lesson, saves it and compares.

``python -m dpo_lib.course.store [--check] [FILE ...]`` tidies the lessons, solutions and
exercises (all of them by default) and, with ``--check``, only lists the files that need it
(exit 1). Run it after executing a lesson (``jupyter nbconvert --execute``) and before committing.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import sys
from pathlib import Path

import nbformat

__all__ = ["dumps", "main", "progress_text", "run", "targets", "tidy", "widget_outputs"]

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("notebooks", "solutions", "exercises")
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
BAR_WIDTH = 10  # tqdm's bar width when it writes to a notebook's text output


def _text(value: str) -> str:
    """An HTML widget's value as plain text (tqdm writes U+2007 figure spaces and escapes ``<``)."""
    return html.unescape(re.sub(r"<[^>]+>", "", value)).replace("\u2007", " ")


def progress_text(state: dict, model_id: str) -> str | None:
    """The final text of the tqdm bar drawn by widget ``model_id``, e.g. ``DPO: 100%|██████████| 31/31 [...]``;
    None when the bar was closed (its state is gone or it is hidden), or is not a tqdm bar."""
    box = state.get(model_id)
    if not box or box.get("model_name") != "HBoxModel":
        return None
    layout = state.get(box["state"].get("layout", "").removeprefix("IPY_MODEL_"), {}).get("state", {})
    if layout.get("display") == "none" or layout.get("visibility") == "hidden":
        return None
    parts = [state.get(c.removeprefix("IPY_MODEL_"), {}) for c in box["state"].get("children", [])]
    if len(parts) != 3 or parts[1].get("model_name") != "FloatProgressModel":
        return None
    prefix, bar, suffix = (p.get("state", {}) for p in parts)
    total, value = bar.get("max") or 0, bar.get("value") or 0
    filled = int(BAR_WIDTH * min(1.0, value / total)) if total else 0
    drawn = f"|{'█' * filled}{' ' * (BAR_WIDTH - filled)}|" if total else ""
    return f"{_text(prefix.get('value', ''))}{drawn}{_text(suffix.get('value', ''))}".rstrip()


def _tidy_outputs(outputs: list, state: dict) -> list:
    kept = []
    for out in outputs:
        view = out.get("data", {}).get(WIDGET_VIEW)
        if view is None:
            kept.append(out)
            continue
        text = progress_text(state, view["model_id"])
        if text is not None:
            kept.append({"data": {"text/plain": [text]}, "metadata": {}, "output_type": "display_data"})
    return kept


def tidy(nb: dict) -> dict:
    """``nb`` (a notebook as a dict, changed in place and returned) with finished progress bars as text,
    no widget state, and JupyterLab's kernelspec."""
    widgets = nb.get("metadata", {}).get("widgets", {})
    state = widgets.get(WIDGET_STATE, {}).get("state", {})
    for cell in nb["cells"]:
        if cell.get("cell_type") == "code":
            cell["outputs"] = _tidy_outputs(cell.get("outputs", []), state)
    if not any(WIDGET_VIEW in o.get("data", {}) for c in nb["cells"] for o in c.get("outputs", [])):
        nb.get("metadata", {}).pop("widgets", None)
    nb.setdefault("metadata", {})["kernelspec"] = dict(KERNELSPEC)
    return nb


def dumps(nb: dict) -> str:
    """The file JupyterLab writes for ``nb`` (it saves through nbformat, then adds a newline)."""
    return nbformat.writes(nbformat.from_dict(nb)) + "\n"


def widget_outputs(nb: dict) -> int:
    """How many stored outputs are widgets (0 in a tidy notebook)."""
    return sum(WIDGET_VIEW in o.get("data", {}) for c in nb["cells"] for o in c.get("outputs", []))


def targets(root: Path = ROOT) -> list[Path]:
    return sorted(p for folder in FOLDERS for p in (root / folder).glob("*.ipynb"))


def run(paths: list[Path], check: bool = False) -> list[Path]:
    """Tidy ``paths`` (or with ``check`` only list those that are not tidy); returns the untidy ones."""
    untidy = []
    for path in paths:
        text = path.read_text(encoding="utf-8")
        new = dumps(tidy(json.loads(text)))
        if new != text:
            untidy.append(path)
            if not check:
                path.write_text(new, encoding="utf-8")
    return untidy


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dpo_lib.course.store", description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="*", type=Path, help="notebooks (default: notebooks/, solutions/, exercises/)")
    p.add_argument("--check", action="store_true", help="only list the notebooks that are not tidy (exit 1 if any)")
    a = p.parse_args(argv)
    untidy = run(a.files or targets(), check=a.check)
    for path in untidy:
        print(f"{'not tidy' if a.check else 'tidied'}: {path}")
    if not untidy:
        print("every notebook is stored as JupyterLab writes it, with no widget outputs")
    return 1 if a.check and untidy else 0


if __name__ == "__main__":
    sys.exit(main())
