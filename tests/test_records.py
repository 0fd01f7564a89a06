"""The one JSON / JSON-lines reader: every failure is a ValueError naming the file and line."""
import json

import pytest

from nanollm.data import load_meta, read_jsonl as read_text_documents
from nanollm.records import read_json, read_jsonl

DEPTH = 100_000  # far past Python's recursion limit: json.loads raises RecursionError, naming no file


def test_jsonl_records_with_line_numbers_blank_lines_and_bom(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_bytes("\ufeff".encode() + b'{"a": 1}\r\n\n  \n[2, "\xc3\xa9"]\n"last"')  # BOM, CRLF, no final newline
    assert list(read_jsonl(path)) == [(1, {"a": 1}), (4, [2, "é"]), (5, "last")]


def test_json_file_with_bom(tmp_path):
    path = tmp_path / "meta.json"
    path.write_bytes("\ufeff".encode() + json.dumps({"vocab_size": 7}).encode())
    assert read_json(path) == {"vocab_size": 7}


def test_deeply_nested_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_text('{"text": "fine"}\n' + "[" * DEPTH + "]" * DEPTH + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"deep\.jsonl:2: JSON nested too deeply"):
        list(read_jsonl(path))
    with pytest.raises(ValueError, match=r"deep\.jsonl:2: JSON nested too deeply"):
        read_text_documents(path)  # the pretraining reader goes through it


def test_deeply_nested_json_file_names_the_file(tmp_path):
    (tmp_path / "meta.json").write_text('{"vocab_size": ' + "[" * DEPTH + "]" * DEPTH + "}", encoding="utf-8")
    with pytest.raises(ValueError, match=r"meta\.json:1: JSON nested too deeply"):
        read_json(tmp_path / "meta.json")
    with pytest.raises(ValueError, match=r"meta\.json:1: JSON nested too deeply"):
        load_meta(tmp_path)


def test_malformed_json_names_the_line_inside_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "a": 1,\n  "b": \n}', encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken\.json:4: malformed JSON \(Expecting value, column 1\)"):
        read_json(path)
    path.write_bytes(b'{"a":\n "caf\xe9"}')
    with pytest.raises(ValueError, match=r"broken\.json:2: not valid UTF-8"):
        read_json(path)
