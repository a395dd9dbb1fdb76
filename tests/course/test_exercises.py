"""Exercise notebooks: generated from solutions/, in sync, failing at their TODOs, passing when solved."""

from pathlib import Path

import nbformat
import pytest
from nbclient.exceptions import CellExecutionError
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from dpo_lib.course import exercises as ex

REPO = Path(__file__).resolve().parents[2]
SOLUTIONS = sorted((REPO / "solutions").glob("*.ipynb"))

SOLUTION_CELL = '''def f(x):
    if x > 0:
        # BEGIN SOLUTION double it
        y = 2 * x
        return y
        # END SOLUTION
    return 0


def g(x):
    # BEGIN SOLUTION
    return -x
    # END SOLUTION'''


def _stream(text):
    return new_output("stream", name="stdout", text=text)


def _solution_notebook():
    nb = new_notebook(cells=[
        new_markdown_cell("# Title [badge](https://colab/blob/main/solutions/x.ipynb)"),
        new_code_cell("print('setup')", outputs=[_stream("setup\n")], execution_count=1),
        new_code_cell(SOLUTION_CELL, outputs=[_stream("hidden\n")], execution_count=2),
        new_code_cell("print(f(2))", outputs=[_stream("4\n")], execution_count=3),
        new_code_cell("# NBVAL_CHECK_OUTPUT\nprint(g(1))", outputs=[_stream("-1\n")], execution_count=4),
    ])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def test_strip_keeps_indentation_and_hint():
    stripped = ex.strip_solutions(SOLUTION_CELL)
    assert '        raise NotImplementedError("TODO: double it")' in stripped.splitlines()
    assert f'    raise NotImplementedError("TODO: {ex.DEFAULT_HINT}")' in stripped.splitlines()
    assert "2 * x" not in stripped and "-x" not in stripped and "SOLUTION" not in stripped
    assert "    return 0" in stripped.splitlines()
    compile(stripped, "<exercise>", "exec")


@pytest.mark.parametrize("source", [
    "# BEGIN SOLUTION\nx = 1",
    "x = 1\n# END SOLUTION",
    "# BEGIN SOLUTION\n# BEGIN SOLUTION\n# END SOLUTION",
])
def test_unbalanced_markers_raise(source):
    with pytest.raises(ValueError):
        ex.strip_solutions(source)


def test_make_exercise():
    sol = _solution_notebook()
    nb = ex.make_exercise(sol, "x.ipynb")
    assert sol.cells[2].outputs  # the input is not modified
    title, note, setup, todo, after, checked = nb.cells
    assert "exercises/x.ipynb" in title.source and "solutions/x.ipynb" not in title.source
    assert note.cell_type == "markdown" and note.id == ex.NOTE_ID
    assert setup.outputs and setup.execution_count == 1  # before the first exercise: kept
    assert todo.outputs == [] and todo.execution_count is None and "NotImplementedError" in todo.source
    assert after.outputs == []  # after the first exercise: cleared...
    assert checked.outputs  # ...except the expected output of NBVAL_CHECK_OUTPUT cells
    filled = ex.fill_solutions(nb, sol)
    assert [c.source for c in filled.cells if c.cell_type == "code"] == [
        c.source for c in sol.cells if c.cell_type == "code"]


def test_generate_check_and_main(tmp_path, capsys):
    sol_dir, ex_dir = tmp_path / "solutions", tmp_path / "exercises"
    sol_dir.mkdir()
    nbformat.write(_solution_notebook(), sol_dir / "x.ipynb")
    args = ["--solutions", str(sol_dir), "--exercises", str(ex_dir)]
    assert ex.check(sol_dir, ex_dir) == [ex_dir / "x.ipynb"]  # missing
    assert ex.main(args + ["--check"]) == 1
    assert ex.main(args) == 0
    assert ex.check(sol_dir, ex_dir) == [] and ex.main(args + ["--check"]) == 0
    assert ex.generate(sol_dir, ex_dir) == [ex_dir / "x.ipynb"]
    assert ex.check(sol_dir, ex_dir) == []  # regenerating is deterministic
    (ex_dir / "x.ipynb").write_text((ex_dir / "x.ipynb").read_text().replace("TODO", "DONE"))
    assert ex.check(sol_dir, ex_dir) == [ex_dir / "x.ipynb"]  # edited by hand
    ex.generate(sol_dir, ex_dir)
    nbformat.write(_solution_notebook(), ex_dir / "orphan.ipynb")
    assert ex.check(sol_dir, ex_dir) == [ex_dir / "orphan.ipynb"]  # no solution behind it
    assert "out of sync" in capsys.readouterr().out


def test_committed_exercises_are_in_sync():
    stale = ex.check(REPO / "solutions", REPO / "exercises")
    assert stale == [], f"regenerate with `python -m dpo_lib exercises`: {stale}"


def test_every_solution_has_exercises():
    for path in SOLUTIONS:
        nb = nbformat.read(path, as_version=4)
        assert sum(len(ex.solution_regions(c.source)) for c in nb.cells if c.cell_type == "code") >= 1, path.name


@pytest.mark.notebook
@pytest.mark.parametrize("solution", SOLUTIONS, ids=[p.name for p in SOLUTIONS])
def test_shipped_exercise_fails_at_its_first_todo(solution, execute_notebook):
    exercise = nbformat.read(REPO / "exercises" / solution.name, as_version=4)
    with pytest.raises(CellExecutionError) as err:
        execute_notebook(exercise, cwd=REPO / "exercises")
    assert err.value.ename == "NotImplementedError"
    first_todo = next(line for c in exercise.cells if c.cell_type == "code"
                      for line in c.source.splitlines() if ex.TODO.match(line))
    message = first_todo.split("NotImplementedError(", 1)[1][1:-2]  # the TODO text, without quotes
    assert message in err.value.evalue


@pytest.mark.notebook
@pytest.mark.parametrize("solution", SOLUTIONS, ids=[p.name for p in SOLUTIONS])
def test_exercise_with_solutions_put_back_passes(solution, execute_notebook):
    exercise = nbformat.read(REPO / "exercises" / solution.name, as_version=4)
    filled = ex.fill_solutions(exercise, nbformat.read(solution, as_version=4))
    assert not any(ex.TODO.match(line) for c in filled.cells if c.cell_type == "code"
                   for line in c.source.splitlines())
    execute_notebook(filled, cwd=REPO / "exercises")  # raises CellExecutionError on any failing cell


# ------------------------------------------------------------------ hints, tasks and "What you should see" (issue 16)

def test_hint_cells_are_collapsed_in_the_exercise_and_open_in_one_click():
    """Collapsed by ``<details>``, not by a hidden source (which would take a second click to open)."""
    sol = _solution_notebook()
    sol.cells.insert(2, ex.hint_cell("multiply by two"))
    sol.cells[2].metadata["jupyter"] = {"source_hidden": True}  # even one hidden by hand
    nb = ex.make_exercise(sol, "x.ipynb")
    hint = nb.cells[3]
    assert ex.is_hint(hint) and "jupyter" not in hint.metadata
    assert hint.source.startswith("<details>") and hint.source.endswith("</details>")


def _sections(nb):
    """(markdown cells since the previous code cell, code cell) for every code cell."""
    run = []
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            run.append(cell)
        else:
            yield run, cell
            run = []


@pytest.mark.parametrize("solution", SOLUTIONS, ids=[p.name for p in SOLUTIONS])
def test_every_exercise_has_a_hint_a_task_and_what_you_should_see(solution):
    exercise = nbformat.read(REPO / "exercises" / solution.name, as_version=4)
    n_exercises = 0
    for markdown, cell in _sections(exercise):
        todos = [line for line in cell.source.splitlines() if ex.TODO.match(line)]
        if todos:
            n_exercises += 1
            hints = [m for m in markdown if ex.is_hint(m)]
            assert hints and not hints[-1].metadata.get("jupyter", {}).get("source_hidden"), cell.source[:80]
        for line in todos:  # the TODO states the task, not the solution
            task = line.split("TODO:", 1)[1]
            assert task.strip().startswith(("return", "take")), line
            assert not any(code in task for code in ("torch.", "no_grad", "softmax", "[:, ", ".sum", "=")), line
        if any(line.startswith("check_") for line in cell.source.splitlines()):
            assert markdown and markdown[-1].source.startswith("**What you should see:**"), cell.source
    assert n_exercises >= 3, (solution.name, n_exercises)  # at least three graded TODOs in every notebook


# ------------------------------------------------------------------ tasks that make the learner think (issue 37)

@pytest.mark.parametrize("solution", SOLUTIONS, ids=[p.name for p in SOLUTIONS])
def test_hints_come_in_two_steps_and_tasks_name_no_calls(solution):
    """The idea at the first click, the code one click further; the task text states what to compute, not how."""
    exercise = nbformat.read(REPO / "exercises" / solution.name, as_version=4)
    hints = [c for c in exercise.cells if ex.is_hint(c)]
    assert hints, solution.name
    for cell in hints:
        idea, code = ex.hint_steps(cell)
        assert idea and code.startswith("```python"), cell.source[:120]
        assert "```" not in idea, idea  # no code block in the first step
    tasks = [c.source for c in exercise.cells if c.cell_type == "markdown" and c.source.startswith("## Exercise")]
    for task in tasks:  # calls that were the recipe of earlier task texts
        for call in ("zero_grad()", "backward()", ".step()", "torch.no_grad()", "apply_chat_template(", ".detach()"):
            assert call not in task, (solution.name, call, task[:80])


@pytest.mark.parametrize("solution", SOLUTIONS, ids=[p.name for p in SOLUTIONS])
def test_every_exercise_names_itself_links_its_lesson_and_hides_its_outputs(solution):
    """nbval's report shows a failing cell's source: its first line names the exercise. No output is stored under a
    TODO cell or a check cell; the title cell links back to the lesson."""
    exercise = nbformat.read(REPO / "exercises" / solution.name, as_version=4)
    assert f"](../notebooks/{solution.name})" in exercise.cells[0].source, solution.name
    headings = [c.source for c in exercise.cells if c.cell_type == "markdown" and c.source.startswith("## Exercise")]
    for cell in (c for c in exercise.cells if c.cell_type == "code"):
        lines = cell.source.splitlines()
        if any(ex.TODO.match(line) for line in lines) or any(line.startswith("check_") for line in lines):
            assert lines[0].startswith("# Exercise "), lines[0]
            number = lines[0].split()[2].rstrip(":")
            assert any(h.startswith(f"## Exercise {number} ") for h in headings), (solution.name, lines[0])
            assert cell.outputs == [] and cell.execution_count is None, lines[0]


def test_two_step_hint_cell_round_trips():
    cell = ex.hint_cell("the idea", code="```python\nx = 1\n```")
    assert ex.is_hint(cell) and ex.hint_steps(cell) == ("the idea", "```python\nx = 1\n```")
    assert cell.source.count("<details>") == 2 and ex.hint_steps(ex.hint_cell("only the idea")) == ("only the idea", "")


def test_a_graded_derivation_question_exists():
    sources = [c.source for p in SOLUTIONS for c in nbformat.read(p, as_version=4).cells if c.cell_type == "markdown"]
    assert sum("Derive it" in s for s in sources) >= 1
