"""What a learner meets on opening a notebook: stored as JupyterLab writes it, outputs that read as finished,
hints that open in one click, a collapsed set-up cell, links that resolve, tables that render.

The browser test (tests/test_browser.py) checks the same things in JupyterLab itself; these run in seconds.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dpo_lib.course import colab, exercises, store

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = store.targets(ROOT)


def _nb(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _src(cell: dict) -> str:
    return "".join(cell["source"])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_stored_as_jupyterlab_writes_it_with_no_widget_outputs(path):
    text = path.read_text(encoding="utf-8")
    nb = json.loads(text)
    assert nb["metadata"]["kernelspec"] == store.KERNELSPEC, f"run python -m dpo_lib.course.store {path}"
    assert store.widget_outputs(nb) == 0 and "widgets" not in nb["metadata"], "a progress bar stored as a widget"
    assert store.dumps(nb) == text, f"{path}: not as JupyterLab writes it; run python -m dpo_lib.course.store"


def _bar_state(value: float, total: float, hidden: bool = False) -> dict:
    model = lambda name, **state: {"model_name": name, "state": state}  # noqa: E731
    return {"box": model("HBoxModel", layout="IPY_MODEL_lay", children=["IPY_MODEL_a", "IPY_MODEL_b", "IPY_MODEL_c"]),
            "lay": model("LayoutModel", visibility="hidden" if hidden else None),
            "a": model("HTMLModel", value="DPO:\u2007100%"), "b": model("FloatProgressModel", value=value, max=total),
            "c": model("HTMLModel", value="\u20073/3\u2007[00:09&lt;00:00,\u2007\u20073.00s/it]")}


def test_a_progress_bar_becomes_the_text_of_its_final_state_and_a_closed_one_goes():
    assert store.progress_text(_bar_state(3, 3), "box") == "DPO: 100%|██████████| 3/3 [00:09<00:00,  3.00s/it]"
    assert store.progress_text(_bar_state(3, 3, hidden=True), "box") is None  # leave=False: gone in the live run
    assert store.progress_text(_bar_state(3, 3), "missing") is None
    view = {"application/vnd.jupyter.widget-view+json": {"model_id": "box"}, "text/plain": ["DPO:   0%|  | 0/3"]}
    nb = {"metadata": {"widgets": {store.WIDGET_STATE: {"state": _bar_state(3, 3)}}},
          "cells": [{"cell_type": "code", "outputs": [{"output_type": "display_data", "data": view}]}]}
    store.tidy(nb)
    assert nb["cells"][0]["outputs"][0]["data"] == {"text/plain": [store.progress_text(_bar_state(3, 3), "box")]}
    assert "widgets" not in nb["metadata"] and nb["metadata"]["kernelspec"] == store.KERNELSPEC


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_hints_open_in_one_click_and_the_setup_cell_is_short_collapsed_and_silent(path):
    cells = _nb(path)["cells"]
    for cell in cells:
        if cell["cell_type"] == "markdown" and exercises.HINT.match(_src(cell)):
            assert not cell["metadata"].get("jupyter", {}).get("source_hidden"), "a hint behind a collapsed input"
    (setup,) = [c for c in cells if colab._is_install_cell(c)]
    assert setup["metadata"]["jupyter"]["source_hidden"] and setup["metadata"]["cellView"] == "form"
    assert setup["outputs"] == [] and len(_src(setup).splitlines()) <= 12


def test_exercise_banners_check_with_the_course_interpreter_from_the_terminal_and_from_a_cell():
    for path in sorted((ROOT / "exercises").glob("*.ipynb")):
        nb = _nb(path)
        text = "\n".join(_src(c) for c in nb["cells"] if c["cell_type"] == "markdown")
        terminal, cell = exercises.check_commands(path.name)
        assert terminal in text and cell in text, path
        bare = re.findall(r"`(?:pytest |python -m pytest|python -m dpo_lib \w+ --help)", text)
        assert not bare, f"{path}: {bare}: the system's pytest/python, not the course's (.venv/bin/python)"
        assert "Course authors" not in text  # the generator's note lives in the metadata
        assert nb["metadata"]["dpo_course"]["generated_from"] == f"solutions/{path.name}"


def test_every_relative_link_between_lessons_exercises_and_solutions_resolves_from_the_repository_root():
    """JupyterLab opened at the repository root (the README's way) reaches every linked notebook."""
    links = 0
    for path in NOTEBOOKS:
        for cell in _nb(path)["cells"]:
            for target in re.findall(r"\]\((\.\./[^)#\s]+)\)", _src(cell)) if cell["cell_type"] == "markdown" else []:
                links += 1
                assert (path.parent / target).resolve().is_file(), f"{path.name}: {target}"
    assert links >= 11


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_markdown_table_cells_escape_their_pipes(path):
    """A `|` in a code span splits a GFM table cell (`<|im_end|>` did); it must be written `\\|`."""
    for cell in _nb(path)["cells"]:
        if cell["cell_type"] != "markdown":
            continue
        for line in _src(cell).splitlines():
            if line.lstrip().startswith("|"):
                for span in re.findall(r"`[^`]*`", line):
                    assert "|" not in span.replace("\\|", ""), f"{path.name}: {span} in a table row"
