"""dpo_lib.settings: the checks' messages, a dataclass <-> argparse round trip, and the user-error family."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import pytest

from dpo_lib.settings import (
    Checked,
    ConfigError,
    UserError,
    add_arguments,
    at_least,
    from_args,
    in_range,
    one_of,
    optional,
    output_file,
    positive,
    readable_file,
    setting,
    writable_folder,
)

# ----------------------------------------------------------------------------- checks


def test_number_checks_messages():
    """Each check returns None when the value passes, else the message with the value in it."""
    assert positive(1e-9) is None
    assert positive(0) == "must be > 0 (got 0)"
    assert positive(-2.5) == "must be > 0 (got -2.5)"
    assert at_least(2)(2) is None
    assert at_least(2)(1) == "must be >= 2 (got 1)"
    # half-open [0, 0.5): 0 in, 0.5 out; closed [0, 1]: 1 in
    assert in_range(0.0, 0.5)(0.0) is None
    assert in_range(0.0, 0.5)(0.5) == "must be in [0.0, 0.5) (got 0.5)"
    assert in_range(0.0, 1.0, hi_open=False)(1.0) is None
    assert in_range(0.0, 1.0, hi_open=False)(1.5) == "must be in [0.0, 1.0] (got 1.5)"
    assert in_range(0.0, 1.0, hi_open=False)(-0.1) == "must be in [0.0, 1.0] (got -0.1)"


def test_choice_and_optional_checks():
    assert one_of(("a", "b"))("b") is None
    assert one_of(("a", "b"))("c") == "must be one of a, b (got 'c')"
    assert optional(positive)(None) is None
    assert optional(positive)(0) == "must be > 0 (got 0)"


def test_file_checks(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text("{}\n")
    assert readable_file(f) is None
    assert readable_file(tmp_path / "nope.jsonl") == f"no such file: {tmp_path / 'nope.jsonl'}"
    assert readable_file(tmp_path) == f"not a file (a folder?): {tmp_path}"
    # output_file: a folder is refused, a file in a folder yet to be made is fine, a path under a file is refused
    assert output_file(tmp_path) == f"is a folder, expected a file to write: {tmp_path}"
    assert output_file(tmp_path / "new" / "deeper" / "out.jsonl") is None
    assert output_file(f / "out.jsonl") == f"cannot write under {f}: it is a file, not a folder"
    # writable_folder: an existing file is not a folder; a folder yet to be made is fine
    assert writable_folder(f) == f"exists and is not a folder: {f}"
    assert writable_folder(tmp_path / "run" / "a") is None


# ----------------------------------------------------------------------------- setting / add_arguments / from_args


@dataclass
class Toy(Checked):
    count: int = setting(3, "how many", at_least(1), flag="-n/--count")
    rate: float = setting(0.5, "a rate", in_range(0.0, 1.0))
    mode: str = setting("a", "a mode", choices=("a", "b"))
    path: Path | None = setting(None, "a file", optional(readable_file))
    fast: bool = setting(True, "on by default")
    verbose: bool = setting(False, "off by default")
    hidden: int = setting(7, "not on the command line", cli=False)

    def check_combinations(self) -> None:
        if self.mode == "b" and self.count > 10:
            raise ConfigError("count", f"must be <= 10 with --mode b (got {self.count})")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toy")
    add_arguments(parser, Toy)
    return parser


def test_round_trip_defaults_come_from_the_dataclass():
    """No flag given: every value is the dataclass default (argparse holds none of its own)."""
    args = _parser().parse_args([])
    assert vars(args) == {}  # SUPPRESS: nothing set, so from_args cannot disagree with the dataclass
    assert from_args(Toy, args) == Toy() == Toy(count=3, rate=0.5, mode="a", path=None, fast=True, verbose=False,
                                                 hidden=7)


def test_round_trip_every_flag(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text("{}\n")
    args = _parser().parse_args(["-n", "5", "--rate", "0.25", "--mode", "b", "--path", str(f), "--no-fast",
                                 "--verbose"])
    toy = from_args(Toy, args)
    assert toy == Toy(count=5, rate=0.25, mode="b", path=f, fast=False, verbose=True, hidden=7)
    # the argparse types come from the annotations
    assert type(toy.count) is int and type(toy.rate) is float and isinstance(toy.path, Path)


def test_short_alias_and_long_flag_are_the_same_field():
    assert from_args(Toy, _parser().parse_args(["-n", "4"])).count == 4
    assert from_args(Toy, _parser().parse_args(["--count", "6"])).count == 6


def test_bool_flags():
    """Default True: --fast / --no-fast; default False: only --verbose (store_true)."""
    p = _parser()
    assert from_args(Toy, p.parse_args(["--fast"])).fast is True
    assert from_args(Toy, p.parse_args(["--no-fast"])).fast is False
    assert from_args(Toy, p.parse_args(["--verbose"])).verbose is True
    with pytest.raises(SystemExit):
        p.parse_args(["--no-verbose"])


def test_cli_false_fields_and_bad_choices_are_not_accepted():
    p = _parser()
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--hidden", "3"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--mode", "c"])
    assert e.value.code == 2


def test_help_shows_the_defaults():
    text = _parser().format_help()
    assert "-n COUNT, --count COUNT" in text
    assert "how many (default: 3)" in text
    assert "--fast, --no-fast" in text
    assert "hidden" not in text


def test_from_args_overrides_and_checks():
    args = _parser().parse_args(["-n", "0"])
    with pytest.raises(ConfigError) as e:
        from_args(Toy, args)
    assert e.value.name == "count" and str(e.value) == "--count: must be >= 1 (got 0)"
    assert from_args(Toy, args, count=9).count == 9  # an override wins over the flag


def test_checks_run_on_construction_and_combinations_after():
    with pytest.raises(ConfigError, match=r"^--rate: must be in \[0.0, 1.0\) \(got 1.0\)$"):
        Toy(rate=1.0)
    with pytest.raises(ConfigError, match=r"^--mode: must be one of a, b \(got 'c'\)$"):
        Toy(mode="c")
    Toy(mode="b", count=10)
    with pytest.raises(ConfigError, match=r"^--count: must be <= 10 with --mode b \(got 11\)$"):
        Toy(mode="b", count=11)


# ----------------------------------------------------------------------------- errors


def test_config_error_str_and_flag():
    e = ConfigError("max_new_tokens", "must be >= 1 (got 0)")
    assert e.name == "max_new_tokens" and e.message == "must be >= 1 (got 0)"
    assert e.flag == "--max-new-tokens"
    assert str(e) == "--max-new-tokens: must be >= 1 (got 0)"
    assert isinstance(e, UserError) and isinstance(e, ValueError)


def test_user_error_is_the_base_of_every_user_fixable_error():
    """The command line maps exactly UserError to exit 2: each of these must be one."""
    from dpo_lib.data import DataError
    from dpo_lib.models import ModelNotFoundError
    from dpo_lib.recipes.iterate import IterationError
    from dpo_lib.recipes.run import ResumeMismatch, RunFolderBusy
    from dpo_lib.sampling import JudgeError

    for cls in (DataError, ModelNotFoundError, JudgeError, ConfigError, RunFolderBusy, ResumeMismatch,
                IterationError):
        assert issubclass(cls, UserError), cls
    # and a programming error is not one
    from dpo_lib.trainer import NonFiniteError
    assert not issubclass(NonFiniteError, UserError)
