"""Ed25519 identities for workers and coordinators.

A node id is the libp2p peer id of the node's Ed25519 key ("12D3KooW…"): the identity multihash
of the protobuf-encoded public key, in base58btc. So the same key can later be the node's libp2p
identity, and the public key can be recovered from the id alone, which lets anyone verify a
receipt offline knowing only the worker id written in it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from cryptography.exceptions import InvalidSignature as _CryptoInvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocol.errors import InvalidSignature, KeyFileError, MalformedMessage

_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
# libp2p PublicKey protobuf: field 1 (KeyType) = 1 (Ed25519), field 2 (Data) = 32 bytes
_ED25519_PB_PREFIX = bytes([0x08, 0x01, 0x12, 0x20])
# identity multihash: code 0x00, length 36
_IDENTITY_MH_PREFIX = bytes([0x00, 0x24])


def _b58encode(data: bytes) -> str:
    n = int.from_bytes(data, "big")
    out = ""
    while n:
        n, rem = divmod(n, 58)
        out = _B58[rem] + out
    pad = len(data) - len(data.lstrip(b"\0"))
    return "1" * pad + out


def _b58decode(text: str) -> bytes:
    n = 0
    for ch in text:
        idx = _B58.find(ch)
        if idx < 0:
            raise MalformedMessage(f"invalid base58 character {ch!r}")
        n = n * 58 + idx
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    pad = len(text) - len(text.lstrip("1"))
    return b"\0" * pad + body


def node_id_from_public_key(public_key: bytes) -> str:
    if len(public_key) != 32:
        raise MalformedMessage("an Ed25519 public key is 32 bytes")
    return _b58encode(_IDENTITY_MH_PREFIX + _ED25519_PB_PREFIX + public_key)


def public_key_from_node_id(node_id: str) -> bytes:
    raw = _b58decode(node_id)
    prefix = _IDENTITY_MH_PREFIX + _ED25519_PB_PREFIX
    if len(raw) != len(prefix) + 32 or not raw.startswith(prefix):
        raise MalformedMessage(f"{node_id!r} is not an Ed25519 node id")
    return raw[len(prefix) :]


def verify_signature(public_key: bytes, signature: bytes, message: bytes) -> None:
    """Raise InvalidSignature unless `signature` is `public_key`'s signature of `message`."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (_CryptoInvalidSignature, ValueError) as exc:
        raise InvalidSignature("signature does not verify") from exc


def _write_exclusive(path: Path, data: bytes) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise KeyFileError(f"{path} already exists; refusing to overwrite a key") from exc
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform can open a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclass(frozen=True)
class Identity:
    """A node's private key and what derives from it."""

    private_key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """Deterministic key from 32 bytes (test vectors only)."""
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @cached_property
    def public_key(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @cached_property
    def node_id(self) -> str:
        return node_id_from_public_key(self.public_key)

    def sign(self, message: bytes) -> bytes:
        return self.private_key.sign(message)

    def seed(self) -> bytes:
        """The raw 32-byte private key (the same key becomes the node's libp2p host key)."""
        return self.private_key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    def save(self, path: Path) -> None:
        """Write the key as PKCS#8 PEM, readable by the owner only; never overwrites."""
        pem = self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            raise KeyFileError(f"{path} already exists; refusing to overwrite a key")
        # written whole under a fresh private name, then linked into place: a reader (another
        # process starting, a supervisor reading the node id) never sees half a key, and a
        # link never replaces a key that appeared meanwhile
        fd, partial_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        partial = Path(partial_name)
        try:
            with os.fdopen(fd, "wb") as fh:  # mkstemp: O_EXCL, mode 0600
                fh.write(pem)
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(partial, path)
            except FileExistsError as exc:
                raise KeyFileError(f"{path} already exists; refusing to overwrite a key") from exc
            except OSError:  # a filesystem without hard links: exclusive create instead
                _write_exclusive(path, pem)
            _fsync_directory(path.parent)
        finally:
            partial.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: Path) -> Identity:
        try:
            mode = path.stat().st_mode & 0o777
        except FileNotFoundError as exc:
            raise KeyFileError(f"no key file at {path}") from exc
        if mode & 0o077:
            raise KeyFileError(
                f"{path} is readable by others (mode {mode:o}); run: chmod 600 {path}"
            )
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyFileError(f"{path} does not hold an Ed25519 key")
        return cls(key)

    @classmethod
    def load_or_create(cls, path: Path) -> Identity:
        if path.exists():
            return cls.load(path)
        identity = cls.generate()
        identity.save(path)
        return identity
