"""The library's shape (the architecture issue): short modules, functions and classes, a docstring on every
module, and tests that mirror the package (``dpo_lib/a/b.py`` is tested in ``tests/a/test_b.py``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dpo_lib"
LIMITS = {"module": 400, "function": 60, "class": 180}
SCRIPTS = {"__init__.py", "__main__.py"}


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name not in SCRIPTS)


def mirrored_test(module: Path) -> Path:
    """``dpo_lib/rlhf/ppo.py`` -> ``tests/rlhf/test_ppo.py``; ``dpo_lib/tools/bench/worker.py`` ->
    ``tests/tools/test_bench_worker.py`` (a sub-subpackage's modules sit in their subpackage's test folder)."""
    parts = module.relative_to(PACKAGE).parts
    folder = ROOT / "tests" / (parts[0] if len(parts) > 1 else "")
    name = "_".join(parts[1:]) if len(parts) > 1 else parts[0]
    name = name.replace("___init__", "").replace("__init__", "")
    return folder / f"test_{name}"


@pytest.mark.parametrize("path", modules() + [PACKAGE / "__init__.py"], ids=lambda p: str(p.relative_to(ROOT)))
def test_sizes_and_docstring(path):
    source = path.read_text()
    tree = ast.parse(source)
    assert ast.get_docstring(tree), f"{path.name}: a module docstring says what the module is for"
    assert len(source.splitlines()) <= LIMITS["module"]
    too_long = [f"{n.name}: {n.end_lineno - n.lineno + 1} lines" for n in ast.walk(tree)
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                and n.end_lineno - n.lineno + 1 > LIMITS["class" if isinstance(n, ast.ClassDef) else "function"]]
    assert not too_long, too_long


def test_the_trainer_only_loops():
    """DPOTrainer is at most 150 lines: the step function, the backends, checkpoints and signals live elsewhere."""
    tree = ast.parse((PACKAGE / "trainer.py").read_text())
    (trainer,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "DPOTrainer"]
    assert trainer.end_lineno - trainer.lineno + 1 <= 150


def test_tests_mirror_the_package():
    """At least three quarters of the modules have their ``test_<module>.py`` in the mirrored folder."""
    mods = modules()
    tested = [m for m in mods if mirrored_test(m).is_file()]
    missing = sorted(str(m.relative_to(PACKAGE)) for m in mods if m not in tested)
    assert len(tested) >= 0.75 * len(mods), f"{len(tested)}/{len(mods)} modules tested; untested: {missing}"


def test_mirrored_test_paths():
    assert mirrored_test(PACKAGE / "losses.py") == ROOT / "tests" / "test_losses.py"
    assert mirrored_test(PACKAGE / "rlhf" / "ppo.py") == ROOT / "tests" / "rlhf" / "test_ppo.py"
    assert mirrored_test(PACKAGE / "tools" / "bench" / "worker.py") == ROOT / "tests" / "tools" / "test_bench_worker.py"
