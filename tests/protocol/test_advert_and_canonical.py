from __future__ import annotations

import time

import pytest

from protocol.advert import Advert, ModelOffer, sign_registration, verify_registration
from protocol.canonical import canonical_json, parse_canonical
from protocol.errors import InvalidSignature, MalformedMessage
from protocol.identity import Identity


def _advert(identity: Identity) -> Advert:
    offer = ModelOffer("tiny", 4, 100_000, 200_000, 512)
    return Advert(identity.node_id, time.time_ns() // 1_000_000, (offer,))


def test_registration_round_trip() -> None:
    identity = Identity.generate()
    nonce = b"n" * 32
    data, sig = sign_registration(identity, nonce, _advert(identity))
    advert = verify_registration(identity.public_key, nonce, data, sig)
    assert advert == Advert.from_bytes(data)
    assert advert.offer("tiny") == ModelOffer("tiny", 4, 100_000, 200_000, 512)
    assert advert.offer("other") is None


def test_registration_signed_for_another_challenge_is_refused() -> None:
    identity = Identity.generate()
    data, sig = sign_registration(identity, b"a" * 32, _advert(identity))
    with pytest.raises(InvalidSignature):
        verify_registration(identity.public_key, b"b" * 32, data, sig)


def test_advert_naming_someone_else_is_refused() -> None:
    signer, victim = Identity.generate(), Identity.generate()
    data, sig = sign_registration(signer, b"n" * 32, _advert(victim))
    with pytest.raises(MalformedMessage, match="not the signer"):
        verify_registration(signer.public_key, b"n" * 32, data, sig)


def test_offers_validate_their_numbers() -> None:
    with pytest.raises(MalformedMessage):
        ModelOffer("tiny", 0, 1, 1)
    with pytest.raises(MalformedMessage):
        ModelOffer("tiny", 1, -1, 1)


def test_canonical_json_refuses_floats_and_sorts_keys() -> None:
    with pytest.raises(MalformedMessage, match="floats"):
        canonical_json({"price": 0.1})
    assert (
        canonical_json({"b": 1, "a": [True, None, "é"]}) == '{"a":[true,null,"é"],"b":1}'.encode()
    )
    assert parse_canonical(canonical_json({"x": 1})) == {"x": 1}
