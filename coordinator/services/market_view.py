"""The market as gossip shows it: other coordinators (their signed records), the workers each
reports (every advert still signed by its worker), and their reputation attestations, weighted
by how far each attesting coordinator's evidence agrees with ours.

Pure bookkeeping over verified values and a clock passed in: the network service feeds it,
routing and the admin API read it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from protocol.advert import Advert
from protocol.errors import ProtocolError
from protocol.market import CoordinatorRecord, DemandBoard, MarketUpdate

Evidence = tuple[float, float]  # decayed (good, bad) outcome weights
AGREEMENT = 0.25  # two scores within this of each other agree
MIN_LOCAL_EVIDENCE = 3.0  # compare an issuer with us only on workers we know this well
# one issuer's word about one worker counts as at most this much evidence (before weighting):
# a coordinator cannot sink (or lift) a worker elsewhere by attesting huge numbers
MAX_ATTESTED = 20.0


@dataclass
class Peer:
    record: CoordinatorRecord
    seq: int
    seen_ms: int
    workers: dict[str, int] = field(default_factory=dict)  # node id -> when last reported
    attestations: dict[str, Evidence] = field(default_factory=dict)


@dataclass(frozen=True)
class RemoteWorker:
    advert: Advert
    via: tuple[str, ...]  # coordinators that report a live session with it


def score(evidence: Evidence) -> float:
    good, bad = evidence
    return (good + 1.0) / (good + bad + 2.0)


class MarketView:
    def __init__(self, self_id: str, attestation_weight: float = 0.5) -> None:
        self.self_id = self_id
        self.attestation_weight = attestation_weight  # a fully trusted peer's evidence counts this
        self._peers: dict[str, Peer] = {}
        self._adverts: dict[str, Advert] = {}  # node id -> newest verified advert
        self._standings: dict[str, float] = {}  # issuer -> standing, see rate_issuers
        self.rejected: Counter[str] = Counter()  # why gossip was refused, for operators and tests
        self.accepted = 0
        # other coordinators' demand boards: newest verified one each, as signed (bytes)
        self._boards: dict[str, tuple[DemandBoard, bytes]] = {}

    # ------------------------------------------------------------------ writing
    def accept(self, update: MarketUpdate, now_ms: int) -> bool:
        """Fold a verified update in; False if it is ours or older than one already seen."""
        if update.issuer == self.self_id:
            return False
        peer = self._peers.get(update.issuer)
        if peer is not None and update.seq <= peer.seq:
            self.rejected["replayed_or_old"] += 1
            return False
        if peer is None:
            peer = self._peers[update.issuer] = Peer(update.record, update.seq, now_ms)
        peer.record, peer.seq, peer.seen_ms = update.record, update.seq, now_ms
        for registration in update.registrations:
            try:
                advert = registration.verify()
            except ProtocolError:
                self.rejected["forged_advert"] += 1
                continue
            known = self._adverts.get(advert.node_id)
            if known is None or known.issued_at_ms <= advert.issued_at_ms:
                self._adverts[advert.node_id] = advert
            peer.workers[advert.node_id] = now_ms
        for attestation in update.attestations:
            good = max(0, attestation.good_milli) / 1000
            bad = max(0, attestation.bad_milli) / 1000
            scale = min(1.0, MAX_ATTESTED / (good + bad)) if good + bad > 0 else 1.0
            peer.attestations[attestation.node_id] = (good * scale, bad * scale)
        self.accepted += 1
        return True

    def reject(self, reason: str) -> None:
        self.rejected[reason] += 1

    def accept_board(self, board: DemandBoard, sealed: bytes) -> bool:
        """Keep a verified board of a known peer (one whose live record we hold: a throwaway
        key cannot fill memory) if it is newer than the one held; False otherwise."""
        if board.coordinator_id == self.self_id:
            return False
        if board.coordinator_id not in self._peers:
            self.rejected["board_of_unknown_coordinator"] += 1
            return False
        held = self._boards.get(board.coordinator_id)
        if held is not None and held[0].issued_at_ms >= board.issued_at_ms:
            return False
        self._boards[board.coordinator_id] = (board, sealed)
        return True

    def boards(self, now_ms: int, max_age_ms: int) -> list[tuple[DemandBoard, bytes]]:
        """Fresh peer boards (a stale one is dropped: its coordinator may be gone)."""
        stale = [c for c, (b, _) in self._boards.items() if now_ms - b.issued_at_ms > max_age_ms]
        for cid in stale:
            del self._boards[cid]
        return sorted(self._boards.values(), key=lambda held: held[0].coordinator_id)

    def expire(self, now_ms: int) -> list[str]:
        """Forget coordinators whose signed record lapsed (dead or partitioned away)."""
        gone = [cid for cid, p in self._peers.items() if p.record.expires_at_ms <= now_ms]
        for cid in gone:
            del self._peers[cid]
            self._boards.pop(cid, None)
        for peer in self._peers.values():  # workers it stopped reporting (left it, or died)
            ttl = peer.record.expires_at_ms - peer.record.issued_at_ms
            peer.workers = {n: at for n, at in peer.workers.items() if now_ms - at < ttl}
        live = {w for p in self._peers.values() for w in p.workers}
        for node in [n for n in self._adverts if n not in live]:
            del self._adverts[node]
        return gone

    # ------------------------------------------------------------------ reading
    def coordinators(self) -> list[Peer]:
        return list(self._peers.values())

    def workers(self) -> dict[str, RemoteWorker]:
        via: dict[str, list[str]] = {}
        for cid, peer in self._peers.items():
            for node in peer.workers:
                via.setdefault(node, []).append(cid)
        return {n: RemoteWorker(self._adverts[n], tuple(sorted(v)))
                for n, v in via.items() if n in self._adverts}  # fmt: skip

    def serving(self, model: str) -> list[CoordinatorRecord]:
        """Other coordinators that report workers for `model`."""
        return [p.record for p in self._peers.values() if model in p.record.models]

    def standing(self, issuer: str, local: Mapping[str, Evidence]) -> float:
        """How far `issuer`'s attestations agree with our own evidence, 0..1 (0.5 unknown)."""
        peer = self._peers.get(issuer)
        agree = disagree = 0
        for node, theirs in (peer.attestations if peer else {}).items():
            ours = local.get(node)
            if ours is None or sum(ours) < MIN_LOCAL_EVIDENCE:
                continue
            if abs(score(ours) - score(theirs)) <= AGREEMENT:
                agree += 1
            else:
                disagree += 1
        return (agree + 1) / (agree + disagree + 2)

    def rate_issuers(self, local: Mapping[str, Evidence]) -> None:
        """Recompute every issuer's standing against our evidence now (periodically: reading
        peer evidence on the routing path must stay O(coordinators))."""
        self._standings = {issuer: self.standing(issuer, local) for issuer in self._peers}

    def peer_evidence(self, node_id: str) -> Evidence:
        """Other coordinators' evidence about `node_id`, each weighted by its standing."""
        good = bad = 0.0
        for issuer, peer in self._peers.items():
            theirs = peer.attestations.get(node_id)
            if theirs is None:
                continue
            weight = self.attestation_weight * self._standings.get(issuer, 0.5)
            good += weight * theirs[0]
            bad += weight * theirs[1]
        return good, bad
