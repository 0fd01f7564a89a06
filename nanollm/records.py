"""Reading text, JSON and JSON-lines files so that every error names the file and the line.

The bottom of the data stack: every reader of user files (pretraining text, SFT chats, preference pairs, metadata)
goes through here, so a bad byte, a broken line or a hostile file (JSON nested 100,000 deep) is reported as one
`UserError("<path>:<line>: ...")` (a ValueError; scripts print it as one line) instead of a raw JSONDecodeError or RecursionError that names no file.
A UTF-8 byte-order mark (as some Windows editors write) is accepted at the start of a file.
"""
import json
from pathlib import Path
from typing import Any, Iterator, Tuple, Union

from nanollm.configurator import UserError

BOM = "\ufeff"


def read_lines(path: Union[str, Path]) -> Iterator[Tuple[int, str]]:
    """Yield (line_number, text) for every line (newline removed); invalid UTF-8 is reported by file and line."""
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise UserError(f"{path}:{line_number}: not valid UTF-8 ({error.reason})") from None
            if line_number == 1 and text.startswith(BOM):
                text = text[1:]
            yield line_number, text.rstrip("\r\n")


def parse_json(text: str, where: str, first_line: int = 1) -> Any:
    """json.loads(text), with a parse error or too deep nesting turned into a UserError naming `where`:line.

    `first_line` is the file line on which `text` starts (1 for a whole file, n for line n of a .jsonl).
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        line = first_line + error.lineno - 1
        raise UserError(f"{where}:{line}: malformed JSON ({error.msg}, column {error.colno})") from None
    except RecursionError:  # json recurses once per nesting level: [[[[...]]]] 100k deep overflows the stack
        raise UserError(f"{where}:{first_line}: JSON nested too deeply to parse") from None


def read_json(path: Union[str, Path]) -> Any:
    """The value of a whole .json file."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        line = Path(path).read_bytes()[:error.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not valid UTF-8 ({error.reason})") from None
    return parse_json(text[1:] if text.startswith(BOM) else text, str(path))


def read_jsonl(path: Union[str, Path]) -> Iterator[Tuple[int, Any]]:
    """Yield (line_number, record) for every non-blank line of a .jsonl file (one JSON value per line)."""
    for line_number, line in read_lines(path):
        if line.strip():
            yield line_number, parse_json(line, str(path), first_line=line_number)
