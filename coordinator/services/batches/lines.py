"""Batch files, pure: reading an input file (JSONL, one request per line, OpenAI's format) and
writing output and error lines in OpenAI's exact shape."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
MAX_CUSTOM_ID = 512
MAX_MODEL = 200
_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True)
class InputLine:
    custom_id: str
    url: str
    body: dict[str, Any]


class InvalidInput(ValueError):
    """An input file that is not a batch file; `problems` says which lines and why."""

    def __init__(self, problems: list[str]) -> None:
        shown = "; ".join(problems[:20]) + (f"; … {len(problems) - 20} more"
                                             if len(problems) > 20 else "")  # fmt: skip
        super().__init__(shown)
        self.problems = problems


def _problem(value: Any, seen: set[str]) -> str | None:
    if not isinstance(value, dict):
        return "not a JSON object"
    custom_id = value.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return "`custom_id` must be a non-empty string"
    if len(custom_id) > MAX_CUSTOM_ID:
        return f"`custom_id` is longer than {MAX_CUSTOM_ID} characters"
    if custom_id in seen:
        return f"`custom_id` {custom_id!r} is used twice"
    if value.get("method") != "POST":
        return '`method` must be "POST"'
    if value.get("url") not in ENDPOINTS:
        return f"`url` must be one of {', '.join(ENDPOINTS)}"
    body = value.get("body")
    if not isinstance(body, dict):
        return "`body` must be a JSON object"
    model = body.get("model")
    if not isinstance(model, str) or not 0 < len(model) <= MAX_MODEL:
        return f"`body.model` must be a string of 1 to {MAX_MODEL} characters"
    return None


def parse_input(data: bytes, max_lines: int) -> list[InputLine]:
    """Every request of a batch input file, or InvalidInput naming each bad line (1-based).
    Blank lines are skipped. What a line's body asks is checked when it runs (a bad body is
    that line's error, not the file's)."""
    lines: list[InputLine] = []
    problems: list[str] = []
    seen: set[str] = set()
    try:
        text = data.decode()
    except UnicodeDecodeError as exc:
        raise InvalidInput([f"the file is not UTF-8 ({exc.reason} at byte {exc.start})"]) from exc
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            value = _decode(raw)
        except msgspec.DecodeError:
            problems.append(f"line {number}: not valid JSON")
            continue
        problem = _problem(value, seen)
        if problem is not None:
            problems.append(f"line {number}: {problem}")
            continue
        seen.add(value["custom_id"])
        lines.append(InputLine(value["custom_id"], value["url"], value["body"]))
    if not lines and not problems:
        problems.append("the file holds no requests")
    if len(lines) > max_lines:
        problems.append(f"{len(lines)} requests; a batch takes at most {max_lines}")
    if problems:
        raise InvalidInput(problems)
    return lines


def output_line(custom_id: str, request_id: str, status_code: int, body: Any) -> bytes:
    """A line that ran: its HTTP status and body as the endpoint answered (an error's body is
    the OpenAI error envelope). `response.request_id` is the key of its receipt."""
    return _encode({
        "id": f"batch_req_{request_id}", "custom_id": custom_id,
        "response": {"status_code": status_code, "request_id": request_id, "body": body},
        "error": None,
    })  # fmt: skip


def unrun_line(custom_id: str, request_id: str, code: str, message: str) -> bytes:
    """A line that never ran (the batch expired, was cancelled or ran out of credit)."""
    return _encode({
        "id": f"batch_req_{request_id}", "custom_id": custom_id, "response": None,
        "error": {"code": code, "message": message},
    })  # fmt: skip


def jsonl(lines: list[bytes]) -> bytes:
    return b"".join(line + b"\n" for line in lines)
