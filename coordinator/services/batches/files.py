"""The Files API's store: a file's bytes on disk under their SHA-256 (written to a temporary
file and renamed into place, so a reader never sees half a file), its metadata in the
database, owned by the client whose key uploaded it. A batch input is checked line by line
before anything is stored: a bad file is refused whole, with every bad line named."""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from coordinator.errors import InvalidRequest, NotFound, PayloadTooLarge
from coordinator.services.batches.lines import InputLine, InvalidInput, parse_input
from coordinator.store import files_store
from coordinator.store.db import Engine

PURPOSES = ("batch", "batch_output")  # what clients upload; what batches write


class FileLibrary:
    def __init__(self, db: Engine, directory: Path, max_bytes: int, max_lines: int) -> None:
        self._db = db
        self._dir = directory
        self.max_bytes = max_bytes  # larger uploads are a 413
        self.max_lines = max_lines  # requests one batch file may hold

    async def upload(self, client: str, filename: str, purpose: str, data: bytes) -> dict[str, Any]:
        """Check and store a client's upload; its file object."""
        if purpose != "batch":
            raise InvalidRequest(
                f"Files with purpose {purpose!r} are not taken here; upload batch input files "
                "with purpose `batch`.", param="purpose",
            )  # fmt: skip
        if len(data) > self.max_bytes:
            raise PayloadTooLarge(f"The file is {len(data)} bytes; at most {self.max_bytes}.")
        try:
            lines = await asyncio.to_thread(parse_input, data, self.max_lines)
        except InvalidInput as exc:
            raise InvalidRequest(f"The file is not a valid batch input: {exc}",
                                 param="file", code="invalid_batch_file") from exc  # fmt: skip
        return await self.store(client, filename, purpose, data, len(lines))

    async def store(
        self, client: str, filename: str, purpose: str, data: bytes, lines: int
    ) -> dict[str, Any]:
        """Keep bytes as a file of `client` (an upload, or a batch's output)."""
        sha256 = await asyncio.to_thread(self._write, data)
        row = {
            "id": f"file-{uuid.uuid4().hex[:24]}", "client": client, "purpose": purpose,
            "filename": filename[:255] or "upload.jsonl", "size_bytes": len(data),
            "sha256": sha256, "lines": lines, "created_at": datetime.now(UTC),
        }  # fmt: skip
        await asyncio.to_thread(files_store.add, self._db, row)
        return file_object(row)

    def _write(self, data: bytes) -> str:
        sha256 = hashlib.sha256(data).hexdigest()
        path = self._path(sha256)
        if path.exists():
            return sha256
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".upload-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return sha256

    def _path(self, sha256: str) -> Path:
        return self._dir / sha256[:2] / sha256

    async def get(self, client: str, file_id: str) -> dict[str, Any]:
        row = await asyncio.to_thread(files_store.get, self._db, file_id, client)
        if row is None:
            raise NotFound(f"No such file: {file_id}.", param="file_id")
        return row

    async def describe(self, client: str, file_id: str) -> dict[str, Any]:
        return file_object(await self.get(client, file_id))

    async def content(self, client: str, file_id: str) -> bytes:
        return await self._bytes(await self.get(client, file_id))

    async def requests(self, client: str, file_id: str) -> tuple[dict[str, Any], list[InputLine]]:
        """A batch input file's row and its requests (checked again: the bytes are the file's)."""
        row = await self.get(client, file_id)
        if row["purpose"] != "batch":
            raise InvalidRequest(f"{file_id} is not a batch input file (purpose "
                                 f"{row['purpose']!r}).", param="input_file_id")  # fmt: skip
        data = await self._bytes(row)
        try:
            return row, await asyncio.to_thread(parse_input, data, self.max_lines)
        except InvalidInput as exc:  # e.g. the operator lowered the line limit since
            raise InvalidRequest(f"{file_id} cannot run as a batch: {exc}",
                                 param="input_file_id") from exc  # fmt: skip

    async def _bytes(self, row: dict[str, Any]) -> bytes:
        try:
            return await asyncio.to_thread(self._path(row["sha256"]).read_bytes)
        except FileNotFoundError as exc:  # e.g. a replica on another host stored it
            raise NotFound(f"The bytes of {row['id']} are not on this coordinator.",
                           param="file_id") from exc  # fmt: skip

    async def listed(
        self, client: str, purpose: str | None, limit: int, after: str | None
    ) -> list[dict[str, Any]]:
        rows = await asyncio.to_thread(files_store.listed, self._db, client, purpose, limit, after)
        return [file_object(r) for r in rows]

    async def delete(self, client: str, file_id: str) -> dict[str, Any]:
        row = await self.get(client, file_id)
        await asyncio.to_thread(files_store.delete, self._db, file_id, client)
        if not await asyncio.to_thread(files_store.in_use, self._db, row["sha256"]):
            self._path(row["sha256"]).unlink(missing_ok=True)
        return {"id": file_id, "object": "file", "deleted": True}


def file_object(row: dict[str, Any]) -> dict[str, Any]:
    """A file as OpenAI describes it."""
    return {
        "id": row["id"], "object": "file", "bytes": row["size_bytes"],
        "created_at": int(row["created_at"].timestamp()), "filename": row["filename"],
        "purpose": row["purpose"], "status": "processed", "status_details": None,
    }  # fmt: skip
