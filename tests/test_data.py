import json
import os
import subprocess
import sys

import pytest
from _tiny import conv_row, toy_rows, write_jsonl

from dpo_lib.data import DataError, load_preferences, load_prompts, row_problems

GOOD = conv_row("Hi?", "Hello!", "Go away.")


@pytest.mark.parametrize("line,expected", [
    ('{"prompt": "a", "chosen": "b"', "invalid JSON"),
    ('{"prompt": "a", "chosen": "b"}', "missing key 'rejected'"),
    ('{"prompt": "a", "chosen": 3, "rejected": "c"}', "'chosen' must be a string"),
    ('{"prompt": "a", "chosen": "  ", "rejected": "c"}', "empty chosen response"),
    ('{"prompt": "a", "chosen": "same", "rejected": "same"}', "chosen is identical to rejected"),
    (json.dumps({**GOOD, "prompt": [{"role": "robot", "content": "x"}]}), "unknown role 'robot'"),
    ('[1, 2]', "expected a JSON object"),
])
def test_bad_rows_are_named_by_file_and_line(tmp_path, line, expected):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, line])
    with pytest.raises(DataError) as e:
        load_preferences(path)
    assert f"{path}:2: " in str(e.value) and expected in str(e.value)
    rows, report = load_preferences(path, skip_invalid=True)
    assert (report.kept, report.dropped) == (1, 1) and rows[0]["_where"] == f"{path}:1"


def test_not_utf8_and_empty_file(tmp_path):
    path = tmp_path / "bin.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"prompt": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=r"bin.jsonl:2: not UTF-8"):
        load_preferences(path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="empty file"):
        load_preferences(empty)


def test_conversational_structure_rules():
    assert row_problems(GOOD) == []
    bad = {**GOOD, "prompt": GOOD["prompt"] + [{"role": "assistant", "content": "x"}]}
    assert any("last message" in p for p in row_problems(bad))
    bad = {**GOOD, "chosen": [{"role": "user", "content": "x"}]}
    assert any("role 'assistant'" in p for p in row_problems(bad))


# ----------------------------------------------------------------------------- files as people save them

def _lines(*rows) -> list[str]:
    return [r if isinstance(r, str) else json.dumps(r) for r in rows]


def _validate(path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    return subprocess.run([sys.executable, "-m", "dpo_lib", "validate", str(path)], capture_output=True, text=True,
                          env=env, timeout=120)


@pytest.mark.parametrize("kind", ["bom", "crlf", "cr", "blank", "all"])
def test_bom_crlf_and_blank_lines_are_accepted(tmp_path, kind):
    rows = toy_rows(3)
    text = "\n".join(_lines(*rows)) + "\n"
    if kind in ("blank", "all"):
        text = "\n\n" + text.replace("\n", "\n  \n\t\n", 1) + "\n\n"
    if kind in ("crlf", "all"):
        text = text.replace("\n", "\r\n")
    if kind == "cr":
        text = text.replace("\n", "\r")
    data = text.encode()
    if kind in ("bom", "all"):
        data = b"\xef\xbb\xbf" + data
    path = tmp_path / "d.jsonl"
    path.write_bytes(data)
    got, report = load_preferences(path)
    assert [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in got] == rows
    assert (report.kept, report.dropped) == (3, 0)
    prompts = load_prompts(path)
    assert [p["prompt"] for p in prompts] == [r["prompt"] for r in rows]
    if kind == "all":  # line numbers are those an editor shows: blank lines count, CRLF is one line end
        assert [r["_where"] for r in got] == [f"{path}:3", f"{path}:6", f"{path}:7"]


def test_crlf_file_reports_the_right_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(_lines(GOOD, "", '{"prompt": "a", "chosen": "b"}')).encode())
    with pytest.raises(DataError, match=r"d.jsonl:3: missing key 'rejected'"):
        load_preferences(path)


def test_bom_first_row_passes_validate(tmp_path):
    path = tmp_path / "win.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(_lines(*toy_rows(2))).encode() + b"\r\n")
    out = _validate(path)
    assert out.returncode == 0, out.stderr
    assert "2 valid rows, 0 invalid" in out.stdout


def test_json_array_of_rows_loads_and_names_item_lines(tmp_path):
    rows = toy_rows(2)
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows, indent=2))
    got, _ = load_preferences(path)
    assert [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in got] == rows
    assert got[0]["_where"] == f"{path}:2: item 1"
    second = 2 + json.dumps(rows[0], indent=2).count("\n") + 1  # indent=2: item 2 starts after item 1's lines
    assert got[1]["_where"] == f"{path}:{second}: item 2"
    bad = tmp_path / "bad.json"
    bad.write_bytes(b"\xef\xbb\xbf" + json.dumps([GOOD, {"prompt": "a", "chosen": "b"}], indent=1).encode())
    with pytest.raises(DataError, match=r"bad.json:\d+: item 2: missing key 'rejected'"):
        load_preferences(bad)
    assert len(load_preferences(bad, skip_invalid=True)[0]) == 1
    one_line = tmp_path / "one.json"
    one_line.write_text(json.dumps([GOOD, GOOD, {"prompt": ""}]))
    with pytest.raises(DataError, match=r"one.json:1: item 3: missing keys"):
        load_preferences(one_line)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"prompt": "a"}, {"prompt": "b"}], indent=2))
    assert [p["prompt"] for p in load_prompts(prompts)] == ["a", "b"]


def test_json_files_that_are_not_rows_are_refused_in_one_line(tmp_path):
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": toy_rows(2)}, indent=2))
    with pytest.raises(DataError) as e:
        load_preferences(wrapped)
    assert str(e.value).count("\n") == 0
    assert str(e.value).startswith(f"{wrapped}:1: ") and "'data'" in str(e.value) and "JSON array" in str(e.value)
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"prompt": "a", "chosen": "b", "rejected": "c"},\n  {"prompt": "a",\n]\n')
    with pytest.raises(DataError, match=r"broken.json:4: invalid JSON in the array"):
        load_preferences(broken)
    empty = tmp_path / "empty.json"
    empty.write_text("[]\n")
    with pytest.raises(DataError, match="empty JSON array"):
        load_preferences(empty)
    jsonl_named_json = write_jsonl(tmp_path / "lines.json", toy_rows(2))  # JSON Lines under a .json name
    assert len(load_preferences(jsonl_named_json)[0]) == 2


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32"])
def test_utf16_file_is_named_not_a_traceback(tmp_path, encoding):
    path = tmp_path / "wide.jsonl"
    path.write_bytes("\n".join(_lines(*toy_rows(2))).encode(encoding))
    for load in (load_preferences, load_prompts):
        with pytest.raises(DataError, match=r"wide.jsonl:1: not UTF-8: the file is saved as UTF-(16|32)"):
            load(path)


def test_invalid_utf8_byte_names_its_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    rows = toy_rows(2)
    path.write_bytes("\n".join(_lines(*rows)).encode() + b'\n{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(DataError, match=r"latin1.jsonl:3: not UTF-8 \(byte 0xe9 at column 16\)"):
        load_preferences(path)
    assert load_preferences(path, skip_invalid=True)[1].kept == 2
    with pytest.raises(DataError, match=r"latin1.jsonl:3: not UTF-8"):
        load_prompts(path)
    array = tmp_path / "latin1.json"
    array.write_bytes(b'[\n  {"prompt": "a", "chosen": "b", "rejected": "c"},\n  {"prompt": "caf\xe9"}\n]\n')
    with pytest.raises(DataError, match=r"latin1.json:3: not UTF-8"):
        load_preferences(array)


def test_missing_file_and_folder_are_data_errors(tmp_path):
    for load in (load_preferences, load_prompts):
        with pytest.raises(DataError, match=r"nope.jsonl: cannot read"):
            load(tmp_path / "nope.jsonl")
        with pytest.raises(DataError, match=r"cannot read"):
            load(tmp_path)


@pytest.mark.parametrize("name,data,expected", [
    ("wide.jsonl", "\n".join(_lines(GOOD)).encode("utf-16"), ":1: not UTF-8: the file is saved as UTF-16"),
    ("bad.jsonl", "\n".join(_lines(GOOD, GOOD)).encode() + b'\n{"prompt": "\xff"}\n', ":3: not UTF-8 (byte 0xff"),
    ("wrapped.json", json.dumps({"rows": [GOOD]}, indent=2).encode(), ":1: one JSON object over several lines"),
    ("crlf.json", json.dumps([GOOD, {**GOOD, "chosen": []}], indent=2).replace("\n", "\r\n").encode(),
     ": item 2: 'chosen' must be a non-empty list"),
])
def test_validate_command_names_file_and_line(tmp_path, name, data, expected):
    path = tmp_path / name
    path.write_bytes(data)
    out = _validate(path)
    assert out.returncode == 2
    assert f"{path}" in out.stderr and expected in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and "UnicodeDecodeError" not in out.stderr
