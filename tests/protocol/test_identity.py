from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from protocol.errors import InvalidSignature, KeyFileError, MalformedMessage
from protocol.identity import (
    Identity,
    node_id_from_public_key,
    public_key_from_node_id,
    verify_signature,
)


def test_node_id_is_a_libp2p_ed25519_peer_id_that_embeds_the_key() -> None:
    identity = Identity.generate()
    assert identity.node_id.startswith("12D3KooW")  # identity multihash of an Ed25519 key
    assert public_key_from_node_id(identity.node_id) == identity.public_key
    assert node_id_from_public_key(identity.public_key) == identity.node_id


def test_distinct_keys_have_distinct_ids() -> None:
    assert len({Identity.generate().node_id for _ in range(50)}) == 50


@pytest.mark.parametrize(
    "bad", ["", "12D3KooW", "not-base58-0OIl", "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"]
)
def test_malformed_node_ids_are_refused(bad: str) -> None:
    with pytest.raises(MalformedMessage):
        public_key_from_node_id(bad)


def test_key_file_is_owner_only_and_reloads(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "node.key"
    identity = Identity.generate()
    identity.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Identity.load(path).node_id == identity.node_id


def test_key_file_is_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    Identity.generate().save(path)
    before = path.read_bytes()
    with pytest.raises(KeyFileError, match="already exists"):
        Identity.generate().save(path)
    assert path.read_bytes() == before


def test_a_key_file_appears_only_once_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process reading the key while the node writes it (a supervisor, a second start) must
    never find half a PEM: the bytes are on disk before the name appears."""
    path = tmp_path / "node.key"
    seen_while_writing: list[bool] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        seen_while_writing.append(path.exists())
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    identity = Identity.generate()
    identity.save(path)
    assert seen_while_writing[0] is False  # the key's bytes were on disk before its name
    assert Identity.load(path).node_id == identity.node_id
    assert [p.name for p in tmp_path.iterdir()] == ["node.key"]  # no partial file left


def test_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    Identity.generate().save(path)
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        Identity.load(path)


def test_load_or_create_is_stable(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    first = Identity.load_or_create(path)
    assert Identity.load_or_create(path).node_id == first.node_id


def test_signatures_verify_only_for_the_signer_and_message() -> None:
    a, b = Identity.generate(), Identity.generate()
    sig = a.sign(b"message")
    verify_signature(a.public_key, sig, b"message")
    with pytest.raises(InvalidSignature):
        verify_signature(b.public_key, sig, b"message")
    with pytest.raises(InvalidSignature):
        verify_signature(a.public_key, sig, b"messagE")
