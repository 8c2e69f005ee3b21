"""The gossip view: replays and forged adverts are refused, lapsed coordinators dropped, and a
peer's attestations count by how far its evidence agrees with ours, capped per worker."""

from __future__ import annotations

import pytest

from coordinator.services.market_view import MAX_ATTESTED, MarketView, score
from protocol.advert import Advert, ModelOffer, sign_registration
from protocol.identity import Identity
from protocol.market import Attestation, CoordinatorRecord, MarketUpdate, RelayedRegistration

NOW = 1_800_000_000_000
TTL = 30_000


def registration(worker: Identity, signer: Identity | None = None) -> RelayedRegistration:
    advert = Advert(worker.node_id, NOW, (ModelOffer("tiny", 4, 100, 200),))
    data, signature = sign_registration(signer or worker, b"n" * 32, advert)
    return RelayedRegistration(data, b"n" * 32, signature)


def update(peer: Identity, seq: int, at: int = NOW, **parts: object) -> MarketUpdate:
    record = CoordinatorRecord(peer.node_id, "g:1", "http://u/v1", ("tiny",), at, at + TTL)
    return MarketUpdate(peer.node_id, seq, at, record, **parts)  # type: ignore[arg-type]


def test_workers_are_seen_through_the_coordinators_that_report_them() -> None:
    view = MarketView("me")
    a, b, worker = Identity.generate(), Identity.generate(), Identity.generate()
    assert view.accept(update(a, 1, registrations=(registration(worker),)), NOW)
    assert view.accept(update(b, 1, registrations=(registration(worker),)), NOW)
    seen = view.workers()[worker.node_id]
    assert seen.via == tuple(sorted([a.node_id, b.node_id]))
    assert [r.coordinator_id for r in view.serving("tiny")] == [a.node_id, b.node_id]


def test_replays_and_forged_adverts_are_refused() -> None:
    view = MarketView("me")
    peer, worker, forger = Identity.generate(), Identity.generate(), Identity.generate()
    assert view.accept(update(peer, 5), NOW)
    assert not view.accept(update(peer, 5), NOW)  # the same again (or a replay)
    assert not view.accept(update(peer, 4), NOW)
    assert view.accept(update(peer, 6, registrations=(registration(worker, signer=forger),)), NOW)
    assert view.workers() == {}
    assert view.rejected == {"replayed_or_old": 2, "forged_advert": 1}


def test_a_lapsed_coordinator_and_its_workers_are_dropped() -> None:
    view = MarketView("me")
    peer, worker = Identity.generate(), Identity.generate()
    view.accept(update(peer, 1, registrations=(registration(worker),)), NOW)
    assert view.expire(NOW + TTL - 1) == []
    assert view.expire(NOW + TTL) == [peer.node_id]
    assert view.coordinators() == []
    assert view.workers() == {}


def test_an_issuer_that_agrees_with_us_weighs_more_than_one_that_does_not() -> None:
    view = MarketView("me", attestation_weight=0.5)
    honest, liar = Identity.generate(), Identity.generate()
    ours = {f"w{i}": (10.0, 0.0) for i in range(5)}  # five workers we know to be good
    view.accept(update(honest, 1, attestations=tuple(
        Attestation(f"w{i}", 9_000, 0) for i in range(5))), NOW)  # fmt: skip
    view.accept(update(liar, 1, attestations=tuple(
        Attestation(f"w{i}", 0, 9_000) for i in range(5))), NOW)  # fmt: skip
    assert view.standing(honest.node_id, ours) == pytest.approx(6 / 7)
    assert view.standing(liar.node_id, ours) == pytest.approx(1 / 7)
    assert view.standing(Identity.generate().node_id, ours) == 0.5  # nothing to compare
    view.rate_issuers(ours)
    good, bad = view.peer_evidence("w0")
    assert good == pytest.approx(0.5 * 6 / 7 * 9)
    assert bad == pytest.approx(0.5 * 1 / 7 * 9)
    assert score((10 + good, bad)) > score((10.0, 0.0)) - 0.1  # the liar barely moves it


def test_one_issuer_cannot_outweigh_the_cap() -> None:
    view = MarketView("me", attestation_weight=1.0)
    loud = Identity.generate()
    view.accept(update(loud, 1, attestations=(Attestation("w", 0, 10**9),)), NOW)
    view.rate_issuers({})
    assert view.peer_evidence("w") == pytest.approx((0.0, 0.5 * MAX_ATTESTED))
