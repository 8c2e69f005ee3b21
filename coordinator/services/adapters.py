"""The LoRA adapters registered at this coordinator, which workers fetch by hash.

An adapter is registered once, as its canonical archive (protocol.adapter); its SHA-256 names
it everywhere after: in a model version, in the job a worker gets, in the worker's receipt.
Workers ask for the archive over their authenticated session and check the hash themselves,
so the coordinator (or anything between) cannot hand them other weights unnoticed.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from coordinator.errors import InvalidRequest, NotFound, PayloadTooLarge
from coordinator.store import adapters_store
from coordinator.store.db import Engine
from protocol.adapter import digest, pack, unpack
from protocol.errors import MalformedMessage

PART_BYTES = 1 << 20  # an archive goes to a worker in pieces of this size


class AdapterLibrary:
    def __init__(self, db: Engine, max_bytes: int) -> None:
        self._db = db
        self.max_bytes = max_bytes
        self._cards: dict[str, dict[str, Any]] = {}  # sha256 -> card (no bytes)

    def load(self) -> None:
        self._cards = {c["sha256"]: c for c in adapters_store.listed(self._db)}

    def base_of(self, sha256: str) -> str | None:
        """The served model an adapter applies to (None: not registered). Reads the database
        for one registered since load (by another process), once."""
        card = self._cards.get(sha256)
        if card is None:
            card = adapters_store.card(self._db, sha256)
            if card is None:
                return None
            self._cards[sha256] = card
        return str(card["base_model"])

    async def register(
        self, name: str, base_model: str, archive: bytes, actor: str
    ) -> tuple[dict[str, Any], bool]:
        """Check and store an archive; (its card, whether it is new)."""
        if len(archive) > self.max_bytes:
            raise PayloadTooLarge(
                f"The adapter archive is {len(archive)} bytes; this coordinator takes at most "
                f"{self.max_bytes}."
            )
        if not name.strip() or not base_model.strip():
            raise InvalidRequest("Give the adapter a `name` and its `base_model`.", param="name")
        canonical = await asyncio.to_thread(_canonical, archive)
        card, new = await asyncio.to_thread(
            adapters_store.add, self._db, sha256=digest(canonical), name=name,
            base_model=base_model, archive=canonical, actor=actor,
        )  # fmt: skip
        self._cards[card["sha256"]] = card
        return card, new

    async def listed(self) -> list[dict[str, Any]]:
        cards = await asyncio.to_thread(adapters_store.listed, self._db)
        self._cards = {c["sha256"]: c for c in cards}
        return cards

    async def parts(self, sha256: str) -> AsyncIterator[bytes]:
        """An archive in pieces, for a worker that asked for it."""
        archive = await asyncio.to_thread(adapters_store.archive, self._db, sha256)
        if archive is None:
            raise NotFound(f"No adapter {sha256} is registered here.")
        for start in range(0, max(1, len(archive)), PART_BYTES):
            yield archive[start : start + PART_BYTES]


def _canonical(archive: bytes) -> bytes:
    """The canonical archive of what was sent (what workers check a folder's hash against),
    or a 400 for what a worker could not load: not a tar, bad entries, no adapter files."""
    with tempfile.TemporaryDirectory(prefix="agora-adapter-") as folder:
        try:
            unpack(archive, Path(folder))
            return pack(Path(folder))
        except MalformedMessage as exc:
            raise InvalidRequest(f"Not an adapter archive: {exc}", param="archive") from exc
