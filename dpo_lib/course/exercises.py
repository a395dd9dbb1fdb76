"""Exercise notebooks are generated from the solution notebooks; never edit them by hand.

In a solution notebook (``solutions/*.ipynb``), the learner's part of a code cell sits
between two marker comments; the text after ``BEGIN SOLUTION`` states the *task* (what to
return), never the way to do it::

    def optimal_policy(ref_probs, rewards, beta):
        # BEGIN SOLUTION return pi*, a [K] tensor that sums to 1
        return torch.softmax(torch.log(ref_probs) + rewards / beta, dim=-1)
        # END SOLUTION

:func:`generate` writes ``exercises/<same name>.ipynb`` where each region (markers
included) becomes one line, at the indentation of the ``BEGIN`` marker::

        raise NotImplementedError("TODO: return pi*, a [K] tensor that sums to 1")

How to do it goes in a **hint cell**: a markdown cell of the solution notebook that starts with
``<details><summary>Hint`` (see :func:`hint_cell`); it renders collapsed, and one click on its
summary opens it. A hint has two steps: the idea, then (one more click, a nested ``<details>``)
the code. (Its source is *not* hidden: JupyterLab would then show a collapsed input first,
and the learner would need two clicks; the generator removes ``source_hidden`` from hint cells.)

Outputs are kept up to the first exercise (the lesson's demos stay readable) and cleared
from there on, except in ``# NBVAL_CHECK_OUTPUT`` cells, whose stored output is what the
learner must reproduce. A short note for the learner is added after the title (how to check the
notebook, from JupyterLab's terminal or from a cell, with the course's interpreter), Colab links
point to the exercise, and the notebook's metadata (not its cells) records that it is generated
(``"dpo_course": {"generated_from": ...}``). :func:`check` lists the exercise files that are out
of sync (CI runs it).

Command line: ``python -m dpo_lib exercises [--check]`` (see :func:`main`).
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path

import nbformat

__all__ = [
    "DEFAULT_HINT", "NOTE_ID", "NotebookError", "TODO", "check", "check_commands", "fill_solutions", "generate",
    "hint_cell", "is_hint", "learner_note", "main",
    "make_exercise", "solution_regions", "strip_solutions",
]

BEGIN = re.compile(r"^(?P<indent>[ \t]*)# BEGIN SOLUTION\b[ \t]*(?P<hint>.*?)[ \t]*$")
END = re.compile(r"^[ \t]*# END SOLUTION\b")
TODO = re.compile(r'^[ \t]*raise NotImplementedError\(["\']TODO')
HINT = re.compile(r"^\s*<details>\s*<summary>(<b>)?\s*Hint", re.IGNORECASE)
DEFAULT_HINT = "write your solution here"  # the TODO text of a region whose BEGIN marker states no task
NOTE_ID = "exercise-note"
CODE_STEP = "<details><summary><b>Show the code</b> (one more click)</summary>"  # a hint's second step


def _todo_line(indent: str, hint: str) -> str:
    message = "TODO: " + (hint or DEFAULT_HINT)
    literal = f'"{message}"' if '"' not in message and "\\" not in message else repr(message)
    return f"{indent}raise NotImplementedError({literal})"


def is_hint(cell) -> bool:
    """A collapsed hint cell: markdown that starts with ``<details><summary>Hint``."""
    return cell.cell_type == "markdown" and bool(HINT.match(cell.source))


def hint_cell(text: str, title: str = "Hint", code: str = "") -> nbformat.NotebookNode:
    """A markdown hint cell, collapsed (``<details>``): one click on its summary opens it; ``text`` is markdown.

    With ``code``, the hint has two steps: the idea (``text``) shows at the first click, and the code sits in
    a second collapsed block inside it (:data:`CODE_STEP`), one more click away."""
    inner = f"\n\n{CODE_STEP}\n\n{code.strip()}\n\n</details>" if code else ""
    return nbformat.v4.new_markdown_cell(f"<details><summary><b>{title}</b> (click to open)</summary>\n\n"
                                         f"{text.strip()}{inner}\n\n</details>")


def hint_steps(cell) -> tuple[str, str]:
    """``(idea, code)`` of a hint cell made by :func:`hint_cell`; ``code`` is empty for a one-step hint."""
    body = HINT.sub("", cell.source, count=1).split("</summary>", 1)[-1].strip()
    body = body[: -len("</details>")].strip() if body.endswith("</details>") else body
    idea, _, code = body.partition(CODE_STEP)
    return idea.strip(), code.strip()[: -len("</details>")].strip() if code else ""


def solution_regions(source: str) -> list[tuple[int, int]]:
    """``(begin, end)`` line indices (inclusive) of each marked region; ``ValueError`` if unbalanced."""
    regions, start = [], None
    for i, line in enumerate(source.splitlines()):
        if BEGIN.match(line):
            if start is not None:
                raise ValueError(f"line {i + 1}: BEGIN SOLUTION inside another solution region")
            start = i
        elif END.match(line):
            if start is None:
                raise ValueError(f"line {i + 1}: END SOLUTION without BEGIN SOLUTION")
            regions.append((start, i))
            start = None
    if start is not None:
        raise ValueError(f"line {start + 1}: BEGIN SOLUTION is never closed")
    return regions


def strip_solutions(source: str) -> str:
    """Replace each solution region of a cell's source by a ``raise NotImplementedError`` line."""
    lines = source.splitlines()
    for begin, end in reversed(solution_regions(source)):
        m = BEGIN.match(lines[begin])
        lines[begin:end + 1] = [_todo_line(m["indent"], m["hint"])]
    return "\n".join(lines)


def make_exercise(solution: nbformat.NotebookNode, name: str = "") -> nbformat.NotebookNode:
    """The exercise version of a solution notebook (a new notebook; the input is unchanged)."""
    nb = copy.deepcopy(solution)
    seen_exercise = False
    for cell in nb.cells:
        if cell.cell_type == "markdown" and name:
            cell.source = cell.source.replace(f"solutions/{name}", f"exercises/{name}")
        cell.metadata.pop("execution", None)  # execution timestamps: noise
        if is_hint(cell):
            _show_source(cell)
        if cell.cell_type != "code":
            continue
        has_solution = bool(solution_regions(cell.source))
        seen_exercise = seen_exercise or has_solution
        if has_solution:
            cell.source = strip_solutions(cell.source)
        if seen_exercise and (has_solution or "# NBVAL_CHECK_OUTPUT" not in cell.source):
            cell.outputs, cell.execution_count = [], None
    note = nbformat.v4.new_markdown_cell(learner_note(name))
    note.id = NOTE_ID
    nb.cells.insert(1 if nb.cells and nb.cells[0].cell_type == "markdown" else 0, note)
    nb.metadata["dpo_course"] = {"generated_from": f"solutions/{name}", "by": "python -m dpo_lib exercises",
                                 "edit": "the solution notebook, then regenerate"}
    return nb


def check_commands(name: str) -> tuple[str, str]:
    """How a learner checks ``exercises/<name>`` with the course's own interpreter: from JupyterLab's terminal
    (it opens in the repository root, where the Quick start made ``.venv``), and from a notebook cell (the
    kernel's interpreter, whatever it is called; the cell runs in ``exercises/``)."""
    return (f".venv/bin/python -m pytest exercises/{name}",
            f'!cd .. && "{{sys.executable}}" -m pytest exercises/{name}')


def learner_note(name: str) -> str:
    """The note under an exercise notebook's title: what to do, and the two ways to check the whole notebook."""
    terminal, cell = check_commands(name)
    return ("> **Practice notebook.** Replace each `raise NotImplementedError(\"TODO: ...\")` with your code and "
            "run the check cell below it: it prints a ✓ line, or the likely mistake. When stuck, open the "
            "**Hint** above the exercise (one click). To check the whole notebook, save it, then run "
            f"`{terminal}` in JupyterLab's terminal (*File → New → Terminal*; it opens in the course's folder), "
            f"or `{cell}` in a cell here (after the set-up cell, which imports `sys`). Cells that start with "
            "`# NBVAL_CHECK_OUTPUT` must print what is stored under them; `# NBVAL_IGNORE_OUTPUT` marks "
            "output that differs between runs (timings, versions).")


def _show_source(cell) -> None:
    """Remove ``source_hidden`` from a cell's metadata (and an emptied ``jupyter`` entry)."""
    jupyter = {k: v for k, v in cell.metadata.get("jupyter", {}).items() if k != "source_hidden"}
    if jupyter:
        cell.metadata["jupyter"] = jupyter
    else:
        cell.metadata.pop("jupyter", None)


def fill_solutions(exercise: nbformat.NotebookNode, solution: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Put the solution regions back into an exercise notebook, in order (used by the tests)."""
    nb = copy.deepcopy(exercise)
    ex_cells = [c for c in nb.cells if c.cell_type == "code"]
    sol_cells = [c for c in solution.cells if c.cell_type == "code"]
    if len(ex_cells) != len(sol_cells):
        raise ValueError("the exercise and the solution have different numbers of code cells")
    for ex, sol in zip(ex_cells, sol_cells):
        sol_lines = sol.source.splitlines()
        regions = iter([sol_lines[b:e + 1] for b, e in solution_regions(sol.source)])
        out = []
        for line in ex.source.splitlines():
            out.extend(next(regions) if TODO.match(line) else [line])
        if next(regions, None) is not None:
            raise ValueError("a solution region has no TODO line in the exercise")
        ex.source = "\n".join(out)
    return nb


def _dumps(nb: nbformat.NotebookNode) -> str:
    return nbformat.writes(nb) + "\n"


class NotebookError(ValueError):
    """A solution notebook that cannot be read, or no solution notebooks at all; the message names the file or
    folder and the command that fixes it."""


def _read(path: Path) -> nbformat.NotebookNode:
    try:
        return nbformat.read(path, as_version=4)
    except Exception as e:  # noqa: BLE001 - NotJSONError, a validation error, a bad encoding: name the file
        raise NotebookError(f"{path}: not a readable notebook ({type(e).__name__}); restore it with "
                            f"`git checkout -- {path}` (or repair it), then run `python -m dpo_lib exercises`") from e


def _expected(solutions_dir: Path) -> dict[str, str]:
    paths = sorted(Path(solutions_dir).glob("*.ipynb"))
    if not paths:
        raise NotebookError(f"no solution notebooks in {Path(solutions_dir).resolve()}: run this at the root of a "
                            "checkout of the course, or pass --solutions DIR --exercises DIR")
    return {p.name: _dumps(make_exercise(_read(p), p.name)) for p in paths}


def generate(solutions_dir: str | Path = "solutions", exercises_dir: str | Path = "exercises") -> list[Path]:
    """Write one exercise notebook per solution notebook; returns the paths written."""
    exercises_dir = Path(exercises_dir)
    exercises_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in _expected(Path(solutions_dir)).items():
        path = exercises_dir / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def check(solutions_dir: str | Path = "solutions", exercises_dir: str | Path = "exercises") -> list[Path]:
    """Exercise files that are missing, stale, or have no solution. Empty list = in sync."""
    exercises_dir = Path(exercises_dir)
    expected = _expected(Path(solutions_dir))
    stale = [exercises_dir / name for name, text in expected.items()
             if not (exercises_dir / name).exists() or (exercises_dir / name).read_text(encoding="utf-8") != text]
    orphans = [p for p in sorted(exercises_dir.glob("*.ipynb")) if p.name not in expected]
    return stale + orphans


def main(argv: list[str] | None = None) -> int:
    """``python -m dpo_lib exercises [--check] [--solutions DIR] [--exercises DIR]``; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m dpo_lib exercises",
                                     description="Generate exercise notebooks from the solution notebooks.")
    parser.add_argument("--check", action="store_true", help="only report out-of-sync exercise files (exit 1 if any)")
    parser.add_argument("--solutions", default="solutions", help="folder of solution notebooks (default: solutions)")
    parser.add_argument("--exercises", default="exercises", help="folder of exercise notebooks (default: exercises)")
    args = parser.parse_args(argv)
    try:
        if args.check:
            return _report(check(args.solutions, args.exercises), Path(args.solutions))
        for path in generate(args.solutions, args.exercises):
            print(f"wrote {path}")
    except NotebookError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _report(bad: list[Path], solutions: Path) -> int:
    """One line per out-of-sync exercise with the command that fixes it; 1 if any."""
    for path in bad:
        solution = solutions / path.name
        if solution.is_file():
            print(f"out of sync: {path} (from {solution}): run `python -m dpo_lib exercises` to regenerate it")
        else:
            print(f"out of sync: {path} has no solution notebook, {solution} is missing: restore it with "
                  f"`git checkout -- {solution}` and run `python -m dpo_lib exercises`, or delete {path}")
    return int(bool(bad))


if __name__ == "__main__":
    sys.exit(main())
