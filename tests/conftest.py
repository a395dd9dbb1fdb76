"""Shared test configuration. Notebook side: a helper to execute notebooks with nbclient.

nbval itself is configured on the command line (see tests/nbval_sanitize.cfg):
``pytest --nbval-lax --nbval-sanitize-with tests/nbval_sanitize.cfg notebooks/ solutions/``.

The test run executes the lessons in the ``smoke`` profile unless ``DPO_COURSE_PROFILE`` says otherwise
(:func:`pytest_configure`): the README's test command is the run a newcomer can wait for, with or without
``CI`` set, and ``DPO_COURSE_PROFILE=laptop`` runs the lessons' full results on purpose.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dpo_lib.course import profiles

REPO_ROOT = Path(__file__).resolve().parents[1]
SANITIZE_FILE = REPO_ROOT / "tests" / "nbval_sanitize.cfg"
KERNEL_NAME = "python3"  # the kernel named in the notebooks' metadata, as nbval uses it


def pytest_configure(config):
    config.addinivalue_line("markers", "notebook: executes a notebook in a Jupyter kernel (slow)")
    # The kernels nbval starts inherit this process's environment: the lessons run their mechanics only
    # (minutes, as in CI), not the laptop profile's full results (hours on 2 cores), unless asked for.
    os.environ.setdefault(profiles.ENV, "smoke")


@pytest.fixture
def execute_notebook():
    """``execute_notebook(nb, cwd, timeout=600)`` runs a notebook top to bottom and returns it.

    Raises ``nbclient.exceptions.CellExecutionError`` (with ``.ename``) at the first failing cell.
    """
    import nbclient

    def run(nb, cwd: Path = REPO_ROOT, timeout: int = 600):
        client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name=KERNEL_NAME,
                                         resources={"metadata": {"path": str(cwd)}})
        return client.execute()

    return run
