"""Canonical JSON: the exact bytes that get signed and hashed.

Signed structures use sorted keys, no whitespace, UTF-8, and only strings, integers, booleans,
lists and objects: floats are refused because their text form is not portable. Anyone can
re-derive the bytes in any language, which is what makes receipts verifiable offline.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from protocol.errors import MalformedMessage


def _check(value: Any, path: str) -> None:
    if isinstance(value, bool | int | str) or value is None:
        return
    if isinstance(value, float):
        raise MalformedMessage(f"floats are not allowed in canonical JSON (at {path})")
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check(item, f"{path}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise MalformedMessage(f"object keys must be strings (at {path})")
            _check(item, f"{path}.{key}")
        return
    raise MalformedMessage(f"type {type(value).__name__} is not allowed (at {path})")


def canonical_json(value: Any) -> bytes:
    """Deterministic bytes for a signed structure (no floats)."""
    _check(value, "$")
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def parse_canonical(data: bytes) -> dict[str, Any]:
    """Decode canonical bytes and refuse anything that is not their own canonical form."""
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedMessage(f"not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise MalformedMessage("expected a JSON object")
    if canonical_json(value) != data:
        raise MalformedMessage("bytes are not in canonical form")
    return value


def stable_digest(value: Any) -> str:
    """SHA-256 hex of a JSON value with sorted keys; floats allowed (used for prompt hashes,
    which both sides compute with the same rules rather than sign as text)."""
    data = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return hashlib.sha256(data).hexdigest()
