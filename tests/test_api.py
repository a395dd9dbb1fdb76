"""The public API: every name ``dpo_lib`` and its modules export resolves, each from one home module."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import pytest

import dpo_lib

SCRIPTS = {"dpo_lib.__main__", "dpo_lib.tools.bench.__main__"}  # run as programs, not imported


def all_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(dpo_lib.__path__, "dpo_lib.") if m.name not in SCRIPTS)


def test_every_top_level_name_resolves_and_is_in_its_home_modules_all():
    for name in dpo_lib.__all__:
        home = importlib.import_module(f"dpo_lib.{dpo_lib._EXPORTS[name]}")
        assert getattr(dpo_lib, name) is getattr(home, name), name
        assert name in home.__all__, f"dpo_lib.{name} comes from {home.__name__}, which does not export it"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        dpo_lib.nope  # noqa: B018


@pytest.mark.parametrize("module", all_modules())
def test_every_module_has_an_all_whose_names_resolve(module):
    mod = importlib.import_module(module)
    assert isinstance(getattr(mod, "__all__", None), (list, tuple)), f"{module} has no __all__"
    missing = [n for n in mod.__all__ if not hasattr(mod, n)]
    assert not missing, f"{module}.__all__ names what it does not define: {missing}"


def test_no_object_is_exported_by_two_modules():
    """One canonical import path per public name: a function or class in two modules' ``__all__`` (one defining
    it, one re-exporting it) would have two."""
    homes: dict[int, list[str]] = {}
    for module in all_modules():
        mod = importlib.import_module(module)
        for name in getattr(mod, "__all__", ()):
            obj = getattr(mod, name)
            if callable(obj):  # functions and classes; constants are compared by value, not identity
                homes.setdefault(id(obj), []).append(f"{module}.{name}")
    twice = [paths for paths in homes.values() if len(paths) > 1]
    assert not twice, twice


def test_importing_dpo_lib_and_its_config_loads_no_torch():
    """The command line checks flags before torch is loaded: ``dpo_lib``, its settings, configs and loss
    registry must import without it."""
    code = ("import sys, dpo_lib, dpo_lib.config, dpo_lib.losses, dpo_lib.settings, dpo_lib.cli; "
            "print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() \
        == "False"
