"""The libp2p layer for real, on loopback: three hosts find each other through one bootstrap
peer, store and find DHT records and providers, and gossip; a plaintext-only host is refused."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import sys
import time
from collections.abc import AsyncIterator

import pytest

from p2p.errors import P2PUnavailable
from p2p.node import P2PConfig, P2PNode
from protocol.identity import Identity

TOPIC = "agora/test"
LOOPBACK = "/ip4/127.0.0.1/tcp/0"


def refuse_unsigned(key: str, value: bytes) -> None:
    if not value.startswith(b"ok:"):
        raise ValueError("refused")


class Inbox:
    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes, str]] = []
        self.arrived = asyncio.Event()

    def __call__(self, topic: str, data: bytes, sender: str) -> None:
        self.messages.append((topic, data, sender))
        self.arrived.set()


@pytest.fixture
async def network() -> AsyncIterator[tuple[list[P2PNode], list[Identity], list[Inbox]]]:
    identities = [Identity.generate() for _ in range(3)]
    inboxes = [Inbox() for _ in range(3)]
    nodes: list[P2PNode] = []
    bootstrap: tuple[str, ...] = ()
    for identity, inbox in zip(identities, inboxes, strict=True):
        config = P2PConfig(listen=LOOPBACK, bootstrap=bootstrap, topics=(TOPIC,),
                           same_host_peers=True, maintain_s=0.5)  # fmt: skip
        node = P2PNode(identity.seed(), config, check_record=refuse_unsigned, on_message=inbox)
        addrs = await node.start()
        bootstrap = bootstrap or (addrs[0],)  # everyone knows only the first node
        nodes.append(node)
    yield nodes, identities, inboxes
    for node in nodes:
        await node.stop()


async def wait_until(check: object, timeout_s: float = 20.0) -> float:
    started = time.monotonic()
    while not await check():  # type: ignore[operator]
        if time.monotonic() - started > timeout_s:
            raise AssertionError("timed out")
        await asyncio.sleep(0.1)
    return time.monotonic() - started


async def test_peers_find_each_other_through_one_bootstrap_peer_and_the_dht(
    network: tuple[list[P2PNode], list[Identity], list[Inbox]],
) -> None:
    nodes, identities, _ = network
    assert [n.peer_id for n in nodes] == [i.node_id for i in identities]  # one key, one id

    async def meshed() -> bool:  # node 1 and 2 only knew node 0: the DHT introduced them
        return nodes[2].peer_id in await nodes[1].connected_peers()

    await wait_until(meshed)
    await nodes[1].put("/agora/one", b"ok:hello")

    async def readable() -> bool:  # a lookup racing a connection being replaced comes back empty
        return await nodes[2].get("/agora/one") == b"ok:hello"

    await wait_until(readable)
    assert await nodes[1].provide("agora-model:tiny")
    assert nodes[1].peer_id in await nodes[2].providers("agora-model:tiny")


async def test_the_record_check_refuses_bad_values(
    network: tuple[list[P2PNode], list[Identity], list[Inbox]],
) -> None:
    nodes, _, _ = network
    with pytest.raises(Exception, match="refused"):
        await nodes[1].put("/agora/bad", b"forged")


async def test_gossip_reaches_every_subscriber(
    network: tuple[list[P2PNode], list[Identity], list[Inbox]],
) -> None:
    nodes, _, inboxes = network

    async def everyone_hears() -> bool:
        await nodes[2].publish(TOPIC, b"advert")
        return all(inbox.messages for inbox in inboxes[:2])

    await wait_until(everyone_hears)
    assert all(m[:2] == (TOPIC, b"advert") for inbox in inboxes[:2] for m in inbox.messages)
    assert inboxes[0].messages[0][2] == nodes[2].peer_id
    assert not inboxes[2].messages  # a node does not hear itself


async def test_a_plaintext_only_peer_cannot_connect(
    network: tuple[list[P2PNode], list[Identity], list[Inbox]],
) -> None:
    nodes, _, _ = network
    target = nodes[0].addrs[0]

    run = await asyncio.create_subprocess_exec(
        sys.executable, "-W", "ignore", "-m", "tests.p2p.plaintext_peer", target,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, _ = await asyncio.wait_for(run.communicate(), 60)
    outcome = stdout.decode().strip()
    assert outcome != "connected"
    assert "SwarmDialAllFailedError" in outcome
    assert len(await nodes[0].connected_peers()) == 2  # only the two Noise peers


async def test_a_stopped_node_says_so() -> None:
    node = P2PNode(Identity.generate().seed(), P2PConfig(listen=LOOPBACK))
    await node.start()
    await node.stop()
    with pytest.raises(P2PUnavailable):
        await node.publish(TOPIC, b"late")


def open_sockets_on(ports: set[int]) -> list[socket.socket]:
    found = []
    for obj in gc.get_objects():
        if type(obj) is socket.socket and obj.fileno() != -1:  # no isinstance: see p2p.sockets
            ends = set()
            for name in (obj.getsockname, obj.getpeername):
                with contextlib.suppress(OSError):
                    end = name()
                    if isinstance(end, tuple):  # an IP socket
                        ends.add(end[1])
            if ports & ends:
                found.append(obj)
    return found


async def test_stopped_nodes_leave_no_socket_open(
    network: tuple[list[P2PNode], list[Identity], list[Inbox]],
) -> None:
    """py-libp2p leaves sockets to the garbage collector; a stopped node closes them itself."""
    nodes, _, _ = network

    async def meshed() -> bool:
        return len(await nodes[0].connected_peers()) == 2

    await wait_until(meshed)
    refused = await asyncio.create_subprocess_exec(  # a failed upgrade on node 0's side too
        sys.executable, "-W", "ignore", "-m", "tests.p2p.plaintext_peer", nodes[0].addrs[0],
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    await asyncio.wait_for(refused.communicate(), 60)
    ports = {int(a.split("/tcp/")[1].split("/")[0]) for n in nodes for a in n.addrs}
    assert open_sockets_on(ports)  # listeners and connections while running
    for node in nodes:
        await node.stop()
    assert open_sockets_on(ports) == []
