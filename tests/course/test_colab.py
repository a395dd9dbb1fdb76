"""One repository URL, one install cell: the Colab set-up as generated, and run outside Colab."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import venv
from pathlib import Path

from dpo_lib.course import colab

ROOT = Path(__file__).resolve().parents[2]


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def test_every_notebook_has_the_same_generated_install_cell_and_its_own_badge():
    url = colab.repo_url()
    notebooks = colab.targets(ROOT, colab.FOLDERS)
    assert {p.parent.name for p in notebooks} == set(colab.FOLDERS)
    for path in notebooks:
        cells = _cells(path)
        installs = [c for c in cells if colab._is_install_cell(c)]
        assert len(installs) == 1, path
        assert "".join(installs[0]["source"]) == colab.install_cell(url), f"{path}: run python -m dpo_lib colab"
        first_md = "".join(next(c for c in cells if c["cell_type"] == "markdown")["source"])
        assert colab.colab_url(url, str(path.relative_to(ROOT))) in first_md, path


def test_no_other_repository_and_no_link_to_a_missing_notebook():
    assert colab.foreign_links() == []
    res = subprocess.run([sys.executable, "-m", "dpo_lib", "colab", "--check"], capture_output=True, text=True,
                         cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr


def test_publishing_elsewhere_is_one_edit_and_one_command(tmp_path):
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    for folder in colab.FOLDERS:
        shutil.copytree(ROOT / folder, tmp_path / folder)
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace(colab.repo_url(), "https://github.com/someone/dpo-fork"))
    assert colab.foreign_links(tmp_path)  # before the command: every link names the old repository
    stale = colab.run(tmp_path)
    assert tmp_path / "README.md" in stale and len(stale) >= 1 + len(colab.targets(tmp_path))
    problems = colab.foreign_links(tmp_path)
    assert [p for p in problems if "exercises/" not in p] == []  # exercises follow with `dpo_lib exercises`
    assert "someone/dpo-fork" in (tmp_path / "notebooks" / "01_from_rlhf_to_dpo.ipynb").read_text()
    assert colab.run(tmp_path, check=True) == []


def test_a_missing_notebook_link_is_found(tmp_path):
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    link = colab.colab_url(colab.repo_url(), "notebooks/99_missing.ipynb")
    (tmp_path / "README.md").write_text(f"[open]({link}) and https://github.com/other/repo\n")
    for folder in colab.FOLDERS:
        (tmp_path / folder).mkdir()
    problems = colab.foreign_links(tmp_path)
    assert any("99_missing.ipynb, which does not exist" in p for p in problems)
    assert any("names another repository, other/repo" in p for p in problems)


KERNEL = textwrap.dedent('''
    import json, os, subprocess, sys
    import google.colab  # the stand-in: the cell sees a Colab runtime
    calls = []
    _run = subprocess.run
    def logged(cmd, *a, **k):
        calls.append(cmd[1:4] if cmd[0] == sys.executable else cmd[:2])
        return _run(cmd, *a, **k)
    subprocess.run = logged
    cell = open(sys.argv[1]).read()
    exec(cell, {})
    first = list(calls)
    calls.clear()
    exec(cell, {})
    import dpo_lib
    from dpo_lib.models import load_model
    model, tok = load_model()
    print(json.dumps({"first": first, "second": calls, "cwd": os.getcwd(), "dpo_lib": dpo_lib.__file__,
                      "data": os.path.isfile("../data/sentiment/train.jsonl"),
                      "params": sum(p.numel() for p in model.parameters()), "vocab": len(tok)}))
''')


def test_install_cell_in_a_fresh_venv_with_a_stand_in_colab(tmp_path):
    """Run twice in a fresh virtual environment: the first run clones (from a local clone, in place of
    GitHub) and installs; the second changes nothing. Then dpo_lib imports from the clone, ../data is
    the bundled data, and the embedded model loads offline. The packages already installed here are
    visible to the new venv through a .pth file, so pip downloads nothing but its build backend."""
    src = tmp_path / "origin"
    subprocess.run(["git", "clone", "-q", "--depth", "1", f"file://{ROOT}", str(src)], check=True)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "course_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    fake = tmp_path / "fake" / "google" / "colab"  # a namespace package: other google.* stay importable
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    cell = colab.install_cell(colab.repo_url()).replace(f'"{colab.repo_url()}"', f'"file://{src}"')
    (tmp_path / "cell.py").write_text(cell)
    (tmp_path / "kernel.py").write_text(KERNEL)
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HOME=str(home), PYTHONPATH=str(tmp_path / "fake"), HF_HUB_OFFLINE="1",
               DPO_LIB_CACHE=os.environ.get("DPO_LIB_CACHE", str(Path.home() / ".cache" / "dpo_lib")))
    res = subprocess.run([python, str(tmp_path / "kernel.py"), str(tmp_path / "cell.py")], capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    course = home / "dpo-course"
    assert ["git", "clone"] in out["first"] and ["-m", "pip", "install"] in out["first"]
    assert out["second"] == [["-c", "import dpo_lib"]]  # second run: only the check that it is installed
    assert Path(out["cwd"]) == course / "notebooks" and out["data"]
    assert Path(out["dpo_lib"]).resolve().is_relative_to(course.resolve())
    assert out["params"] > 100_000_000 and out["vocab"] > 40_000  # SmolLM2-135M-Instruct
