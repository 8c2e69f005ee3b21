"""The canonical adapter archive: the same files give the same hash anywhere, any changed
byte changes it, and unpacking refuses what could escape the folder or is not an adapter."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from protocol.adapter import digest, folder_digest, pack, unpack
from protocol.advert import Advert, ModelOffer
from protocol.errors import MalformedMessage
from protocol.receipt import Receipt


def adapter(folder: Path, weights: bytes = b"\x00\x01weights") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text('{"r": 8}')
    (folder / "adapter_model.safetensors").write_bytes(weights)
    return folder


def test_the_hash_depends_on_the_files_only(tmp_path: Path) -> None:
    one, two = adapter(tmp_path / "one"), adapter(tmp_path / "two")
    os.utime(two / "adapter_config.json", (1, 1))
    (two / "adapter_model.safetensors").chmod(0o600)
    assert folder_digest(one) == folder_digest(two)
    three = adapter(tmp_path / "three", b"\x00\x01weightz")
    assert folder_digest(three) != folder_digest(one)


def test_an_archive_unpacks_to_the_same_hash(tmp_path: Path) -> None:
    archive = pack(adapter(tmp_path / "a"))
    assert sorted(unpack(archive, tmp_path / "b")) == [
        "adapter_config.json", "adapter_model.safetensors"]  # fmt: skip
    assert folder_digest(tmp_path / "b") == digest(archive)


def _tar(entries: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for info, data in entries:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest.mark.parametrize("name", ["../evil", "/etc/evil", "sub/../../evil"])
def test_entries_that_escape_the_folder_are_refused(tmp_path: Path, name: str) -> None:
    good = [
        (tarfile.TarInfo(f), b"x") for f in ("adapter_config.json", "adapter_model.safetensors")
    ]
    archive = _tar([*good, (tarfile.TarInfo(name), b"x")])
    with pytest.raises(MalformedMessage, match="bad entry"):
        unpack(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "evil").exists()


def test_links_and_archives_without_an_adapter_are_refused(tmp_path: Path) -> None:
    link = tarfile.TarInfo("adapter_model.safetensors")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    with pytest.raises(MalformedMessage, match="bad entry"):
        unpack(_tar([(tarfile.TarInfo("adapter_config.json"), b"{}"), (link, b"")]), tmp_path)
    with pytest.raises(MalformedMessage, match="missing"):
        unpack(_tar([(tarfile.TarInfo("adapter_config.json"), b"{}")]), tmp_path / "x")
    with pytest.raises(MalformedMessage, match="not an adapter archive"):
        unpack(b"not a tar at all", tmp_path / "y")
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "adapter_config.json").write_text("{}")
    with pytest.raises(MalformedMessage, match="missing"):
        pack(tmp_path / "z")  # a folder without an adapter's weights


def test_offers_without_adapters_keep_their_signed_form_and_lora_fields_round_trip() -> None:
    plain = ModelOffer("tiny", 8, 100, 200)
    lora = ModelOffer("tiny", 8, 100, 200, max_loras=4, adapter_price_completion_per_mtok=300)
    advert = Advert("node", 1, (plain, lora))
    data = advert.to_bytes()
    assert data.count(b"max_loras") == 1  # only the offer that loads adapters says so
    assert Advert.from_bytes(data).models == (plain, lora)
    assert lora.prices("ab" * 32) == (100, 300)  # the prompt price is inherited
    assert lora.prices() == plain.prices() == (100, 200)


def test_a_receipt_with_an_empty_adapter_field_is_malformed() -> None:
    fields = dict(request_id="r", model="m", worker_id="w", coordinator_nonce="n",
                  prompt_sha256="p", output_sha256="o", prompt_tokens=1, completion_tokens=1,
                  price_prompt_per_mtok=1, price_completion_per_mtok=1, started_at_ms=1,
                  ttft_ms=1, finished_at_ms=1, finish_reason="stop")  # fmt: skip
    plain = Receipt(**fields)  # type: ignore[arg-type]
    assert b"adapter_sha256" not in plain.to_bytes()
    assert Receipt.from_bytes(plain.to_bytes()) == plain
    tampered = plain.to_bytes().replace(
        b'"completion_tokens"', b'"adapter_sha256":"","completion_tokens"'
    )
    with pytest.raises(MalformedMessage, match="adapter_sha256"):
        Receipt.from_bytes(tampered)
