"""A rogue peer for the p2p market tests: it speaks Noise and joins the gossip topic like
anyone may, then publishes forgeries and tries to overwrite a coordinator's DHT record.
Run as a separate process (`python -m tests.p2p.rogue BOOTSTRAP VICTIM WORKER`, prints the
outcome as JSON): py-libp2p leaves sockets for the garbage collector, and in the test process
they would surface as ResourceWarnings at some unrelated later moment."""

from __future__ import annotations

import asyncio
import json
import sys
import time

from coordinator.services.network import TOPIC
from p2p.errors import P2PError
from p2p.node import P2PConfig, P2PNode
from protocol.advert import Advert, ModelOffer, sign_registration
from protocol.canonical import canonical_json
from protocol.identity import Identity
from protocol.market import (
    CoordinatorRecord,
    MarketUpdate,
    RelayedRegistration,
    record_key,
    record_version,
)

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
# a loaded machine may run the victim's record refresh late (records live 4 s): ask for a while
READ_WITHIN_S = 40.0


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _forged_registration(signer: Identity, node_id: str) -> RelayedRegistration:
    """An advert that names `node_id` but is signed by `signer`."""
    advert = Advert(node_id, _now_ms(), (ModelOffer("tiny", 64, 0, 0),))
    nonce = b"r" * 32
    data, signature = sign_registration(signer, nonce, advert)
    return RelayedRegistration(data, nonce, signature)


def _record(identity: Identity, claimed_id: str) -> CoordinatorRecord:
    now = _now_ms()
    return CoordinatorRecord(claimed_id, "evil.example:1", "http://evil.example/v1", ("tiny",),
                             now, now + 60_000)  # fmt: skip


def _impersonation(rogue: Identity, victim: str, seq: int) -> bytes:
    """A market update claiming to come from `victim`, signed by the rogue."""
    honest = MarketUpdate(rogue.node_id, seq, _now_ms(), _record(rogue, rogue.node_id))
    envelope = json.loads(honest.seal(rogue))
    envelope["body"]["issuer"] = victim
    envelope["body"]["record"]["coordinator_id"] = victim
    return canonical_json(envelope)


async def publish_forgeries(bootstrap: str, victim: str, worker_id: str) -> dict[str, str]:
    rogue, fake_worker = Identity.generate(), Identity.generate()
    config = P2PConfig(listen=LOOPBACK, bootstrap=(bootstrap,), topics=(TOPIC,),
                       same_host_peers=True, maintain_s=0.5)  # fmt: skip
    node = P2PNode(rogue.seed(), config)  # accepts any DHT record: the checks are remote
    await node.start()
    outcome = {"rogue": rogue.node_id, "fake_worker": fake_worker.node_id}
    try:
        for _ in range(50):  # wait until it is connected and meshed
            if await node.connected_peers():
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(2.5)
        forged_workers = (_forged_registration(rogue, worker_id),
                          _forged_registration(rogue, fake_worker.node_id))  # fmt: skip
        for seq in range(1, 7):  # for 6 s: a mesh still forming gets them too
            await node.publish(TOPIC, _impersonation(rogue, victim, 10**6 + seq))
            own = MarketUpdate(rogue.node_id, seq, _now_ms(), _record(rogue, rogue.node_id),
                               forged_workers)  # fmt: skip
            await node.publish(TOPIC, own.seal(rogue))
            await asyncio.sleep(1.0)
        forged_record = canonical_json(
            {"body": {**_record(rogue, victim).__dict__, "models": ["tiny"]},
             "signature": rogue.sign(b"x").hex()}
        )  # fmt: skip
        try:  # the rogue's own node accepts anything: the peers' validators must refuse it
            await node.put(record_key(victim), forged_record)
        except P2PError as exc:
            outcome["dht_put_error"] = str(exc)
        outcome["dht_read_api_url"] = await read_record(bootstrap, victim)
        return outcome
    finally:
        await node.stop()


def _check(key: str, value: bytes) -> None:
    CoordinatorRecord.open(value, _now_ms())


async def read_record(bootstrap: str, coordinator_id: str) -> str:
    """What a fresh peer, validating like a worker does, reads for `coordinator_id`."""
    config = P2PConfig(listen=LOOPBACK, bootstrap=(bootstrap,), dht_server=False,
                       same_host_peers=True, maintain_s=0.5)  # fmt: skip
    reader = P2PNode(Identity.generate().seed(), config, check_record=_check,
                     record_version=record_version)  # fmt: skip
    await reader.start()
    try:
        for _ in range(50):
            if await reader.connected_peers():
                break
            await asyncio.sleep(0.2)
        deadline = time.monotonic() + READ_WITHIN_S
        while time.monotonic() < deadline:  # a reader just joined may find no holder at first
            data = await reader.get(record_key(coordinator_id))  # only records that validate
            if data:
                return CoordinatorRecord.open(data, _now_ms()).api_url
            await asyncio.sleep(0.5)
        return "none"
    finally:
        await reader.stop()


if __name__ == "__main__":
    bootstrap_addr, victim_id, worker = sys.argv[1:4]
    print(json.dumps(asyncio.run(publish_forgeries(bootstrap_addr, victim_id, worker))), flush=True)
