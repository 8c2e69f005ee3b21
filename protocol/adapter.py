"""A LoRA adapter as one content-addressed archive.

An adapter is a folder (`adapter_config.json`, `adapter_model.safetensors`, sometimes more).
Its identity is the SHA-256 of its canonical archive: an uncompressed tar of its regular files
in name order, with every owner, time and mode field fixed, so the same files give the same
hash on any machine. The coordinator registers an adapter by that hash; a worker asks for it by
hash, checks the bytes it got, and re-checks the folder before every load (a file changed on
disk is refused, not served).
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path, PurePosixPath

from protocol.errors import MalformedMessage

REQUIRED_FILES = ("adapter_config.json", "adapter_model.safetensors")
_MODE = 0o644


def _files(folder: Path) -> list[tuple[str, Path]]:
    if not folder.is_dir():
        raise MalformedMessage(f"{folder} is not a folder")
    found = sorted(
        (p.relative_to(folder).as_posix(), p)
        for p in folder.rglob("*")
        if p.is_file() and not p.is_symlink()
    )
    names = {name for name, _ in found}
    missing = [f for f in REQUIRED_FILES if f not in names]
    if missing:
        raise MalformedMessage(f"not a LoRA adapter folder: {', '.join(missing)} missing")
    return found


def pack(folder: Path) -> bytes:
    """The canonical archive of an adapter folder."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, path in _files(folder):
            data = path.read_bytes()
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), _MODE, 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def digest(archive: bytes) -> str:
    return hashlib.sha256(archive).hexdigest()


def folder_digest(folder: Path) -> str:
    """The hash of what is in the folder now (what a load would read)."""
    return digest(pack(folder))


def unpack(archive: bytes, folder: Path) -> list[str]:
    """Write an archive's files into `folder`; return their names. Refuses anything but plain
    files at relative paths inside the folder, and archives without an adapter's files."""
    names: list[str] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:") as tar:
            members = tar.getmembers()
            for m in members:
                path = PurePosixPath(m.name)
                if not m.isfile() or path.is_absolute() or ".." in path.parts:
                    raise MalformedMessage(f"adapter archive holds a bad entry: {m.name!r}")
                names.append(m.name)
            missing = [f for f in REQUIRED_FILES if f not in names]
            if missing:
                raise MalformedMessage(f"not a LoRA adapter: {', '.join(missing)} missing")
            folder.mkdir(parents=True, exist_ok=True)
            for m in members:
                source = tar.extractfile(m)
                assert source is not None  # a regular file, checked above
                target = folder / m.name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(source.read())
    except tarfile.TarError as exc:
        raise MalformedMessage(f"not an adapter archive: {exc}") from exc
    return names
