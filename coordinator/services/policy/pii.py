"""Finding personal data and secrets in text: one detector per entity kind, each a regular
expression for the shape and, where the shape alone over-matches, a check of the value
(Luhn for payment cards, ISO 7064 mod 97 for IBANs, the address parser for IPs).

Pure functions over strings; `find` returns non-overlapping spans in text order, the earlier
kind in `KINDS` winning where two overlap (a card number is not also a phone number)."""

from __future__ import annotations

import bisect
import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

EMAIL = "email"
PHONE = "phone"
CARD = "card"
IBAN = "iban"
NATIONAL_ID = "national_id"
IP = "ip"
SECRET = "secret"
# the order overlaps are settled in: the most specific shapes first, phone numbers last
KINDS = (SECRET, EMAIL, IBAN, CARD, NATIONAL_ID, IP, PHONE)


@dataclass(frozen=True)
class Span:
    kind: str
    start: int
    end: int


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card(value: str) -> bool:
    digits = re.sub(r"[ -]", "", value)
    return 13 <= len(digits) <= 19 and _luhn(digits)


def _iban(value: str) -> bool:
    compact = value.replace(" ", "").upper()
    if not 15 <= len(compact) <= 34:
        return False
    moved = compact[4:] + compact[:4]
    number = "".join(str(int(ch, 36)) for ch in moved)
    return int(number) % 97 == 1


def _ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _ssn(value: str) -> bool:
    if not value[0].isdigit():
        return True  # a UK National Insurance number: its shape is its check
    area, group, serial = value.split("-")
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


_DATE = re.compile(r"\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{4}")
_DOTTED_QUAD = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")  # an address-like number, valid or not


def _phone(value: str) -> bool:
    """Enough digits for a full number (a + prefix: 8, else 10), and not a date."""
    digits = sum(ch.isdigit() for ch in value)
    if _DATE.fullmatch(value) or _DOTTED_QUAD.fullmatch(value):
        return False
    return (8 if value.startswith("+") else 10) <= digits <= 15


_SECRETS = "|".join(
    (
        r"sk-[A-Za-z0-9_-]{20,}",  # OpenAI-style and Agora keys (sk-agora-…)
        r"AKIA[0-9A-Z]{16}",  # AWS access key ids
        r"gh[pousr]_[A-Za-z0-9]{36,}",  # GitHub tokens
        r"xox[abposr]-[A-Za-z0-9-]{10,}",  # Slack tokens
        r"AIza[0-9A-Za-z_-]{35}",  # Google API keys
        r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
        # `password: …`, `api_key=…`: the value after the name
        r"(?i:\b(?:api[_-]?key|password|passwd|secret|token)[\"']?\s*[:=]\s*[\"']?)"
        r"(?P<v>[^\s\"',;]{7,}[^\s\"',;.:!?)])",
    )
)

_DETECTORS: dict[str, tuple[re.Pattern[str], Callable[[str], bool] | None]] = {
    SECRET: (re.compile(_SECRETS), None),
    # bounded parts and a start that cannot be inside another local part: linear on any text
    EMAIL: (
        re.compile(
            r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}"
            r"(?:\.[A-Za-z0-9-]{1,63}){0,8}\.[A-Za-z]{2,24}(?![A-Za-z])"
        ),
        None,
    ),
    IBAN: (re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b"), _iban),
    CARD: (re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])"), _card),
    NATIONAL_ID: (
        re.compile(r"(?<![\d-])\d{3}-\d{2}-\d{4}(?![\d-])|\b[A-CEGHJ-PR-TW-Z]{2}\d{6}[A-D]\b"),
        _ssn,
    ),
    IP: (
        re.compile(
            r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.])"
            r"|(?<![0-9A-Fa-f:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![0-9A-Fa-f:])"
        ),
        _ip,
    ),
    PHONE: (
        re.compile(
            r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}[ .-]\d{2,4}"
            r"(?:[ .-]\d{2,4}){0,2}(?![\w-])"
        ),
        _phone,
    ),
}


def find(text: str, kinds: Iterable[str] = KINDS) -> list[Span]:
    """Every span of the given kinds, non-overlapping, in text order."""
    wanted = set(kinds)
    taken: list[Span] = []  # in text order, never overlapping
    starts: list[int] = []
    for kind in KINDS:
        if kind not in wanted:
            continue
        pattern, check = _DETECTORS[kind]
        for match in pattern.finditer(text):
            group = "v" if match.groupdict().get("v") is not None else 0
            start, end = match.span(group)
            at = bisect.bisect_left(starts, start)
            if (at < len(taken) and taken[at].start < end) or (at and taken[at - 1].end > start):
                continue  # an earlier kind has (part of) it
            if check is not None and not check(match.group(group)):
                continue
            taken.insert(at, Span(kind, start, end))
            starts.insert(at, start)
    return taken
