"""One libp2p host (TCP + Noise + yamux), a Kademlia DHT and gossipsub, run by trio in a thread
of its own. Coroutines of the asyncio side are shipped to the trio thread and their results
shipped back; gossip messages arrive on the asyncio loop through a callback.

Security: the host is built with Noise as its only security transport (py-libp2p's defaults
also offer plaintext, secio and TLS), so a peer that cannot speak Noise cannot connect.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import threading
import warnings
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost
from libp2p.crypto.ed25519 import Ed25519PrivateKey
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.kad_dht import kad_dht as kad_dht_module
from libp2p.kad_dht import peer_routing as peer_routing_module
from libp2p.kad_dht import provider_store as provider_store_module
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT, _encode_key
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.records.validator import Validator
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.tools.anyio_service.context import background_trio_service

from p2p.errors import P2PError, P2PTimeout, P2PUnavailable
from p2p.sockets import SocketTracker

log = logging.getLogger("agora.p2p")
T = TypeVar("T")
GOSSIPSUB = TProtocol("/meshsub/1.1.0")
OnMessage = Callable[[str, bytes, str], None]  # topic, data, sender peer id
RecordCheck = Callable[[str, bytes], None]  # raises to refuse a DHT record
RecordVersion = Callable[[bytes], int]  # of two records under one key, the higher one wins


@dataclass(frozen=True)
class P2PConfig:
    listen: str = "/ip4/0.0.0.0/tcp/4001"  # multiaddr to listen on (tcp/0 = any free port)
    bootstrap: tuple[str, ...] = ()  # multiaddrs ending in /p2p/<peer id>
    dht_server: bool = True  # answer DHT queries (coordinators); workers behind NAT: False
    topics: tuple[str, ...] = ()  # gossip topics to join
    op_timeout_s: float = 15.0  # a DHT lookup / store gives up after this
    maintain_s: float = 5.0  # how often to re-dial bootstrap peers and DHT neighbours
    # py-libp2p admits at most 2 peers per /24 into each routing-table bucket and wants 3
    # distinct IPs in a gossip mesh; every peer on one host (tests, a lab) shares 127.0.0.1
    same_host_peers: bool = False
    gossip_heartbeat_s: int = 1  # gossipsub mesh maintenance (py-libp2p's default is 120)
    query_timeout_s: float = 2.0  # one DHT peer's answer (py-libp2p waits 10 s; see below)


def _succeed(future: asyncio.Future[T], value: T) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


def _set_query_timeout(seconds: float) -> None:
    """py-libp2p gives every peer in a lookup 10 s (a module constant, copied into three
    modules), and one peer that never answers (a coordinator just killed, still in someone's
    routing table) then stalls the whole lookup that long; a worker looking for a replacement
    coordinator cannot wait that. Process-wide: every node in a process shares it."""
    for module in (kad_dht_module, peer_routing_module, provider_store_module):
        module.QUERY_TIMEOUT = seconds  # type: ignore[attr-defined]


def _key_pair(seed: bytes) -> KeyPair:
    private = Ed25519PrivateKey.from_bytes(seed)
    return KeyPair(private, private.get_public_key())


class _RecordValidator(Validator):
    """Every DHT peer runs this on what it is asked to store and on what it reads back; of
    several values it keeps the newest (py-libp2p keeps the first stored when select says 0,
    so a re-announced record would never replace its predecessor)."""

    def __init__(self, check: RecordCheck, version: RecordVersion) -> None:
        self._check = check
        self._version = version

    def validate(self, key: str, value: bytes) -> None:
        self._check(key, value)

    def select(self, key: str, values: list[bytes]) -> int:
        versions = []
        for value in values:
            try:
                versions.append(self._version(value))
            except Exception:
                versions.append(-1)
        return versions.index(max(versions))


class P2PNode:
    def __init__(
        self,
        seed: bytes,
        config: P2PConfig,
        *,
        record_namespace: str = "agora",
        check_record: RecordCheck | None = None,
        record_version: RecordVersion | None = None,
        on_message: OnMessage | None = None,
    ) -> None:
        self.config = config
        self._key_pair = _key_pair(seed)
        self._namespace = record_namespace
        self._check_record = check_record or (lambda _key, _value: None)
        self._record_version = record_version or (lambda _value: 0)
        self._on_message = on_message
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._stop: trio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._host: IHost | None = None
        self._dht: KadDHT | None = None
        self._pubsub: Pubsub | None = None
        self.addrs: list[str] = []
        self.peer_id = ""
        self._sockets = SocketTracker()

    # ------------------------------------------------------------------ lifecycle (asyncio)
    async def start(self, timeout_s: float = 30.0) -> list[str]:
        """Start the trio thread; return the listen addresses (…/p2p/<peer id>)."""
        library_log = logging.getLogger("libp2p")
        if library_log.level == logging.NOTSET:  # it warns about every peer that is not a DHT
            library_log.setLevel(logging.ERROR)  # server or went away: routine in a market
        self._loop = asyncio.get_running_loop()
        ready: asyncio.Future[list[str]] = self._loop.create_future()
        self._thread = threading.Thread(
            target=self._thread_main, args=(ready,), name="agora-p2p", daemon=True
        )
        self._thread.start()
        try:
            self.addrs = await asyncio.wait_for(ready, timeout_s)
        except TimeoutError as exc:
            raise P2PUnavailable(f"libp2p host did not start in {timeout_s:.0f} s") from exc
        return self.addrs

    async def stop(self) -> None:
        token, stop = self._token, self._stop
        if token is not None and stop is not None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(stop.set)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)
        self._token = None

    @property
    def running(self) -> bool:
        return self._token is not None and self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------ operations (asyncio)
    async def put(self, key: str, value: bytes) -> None:
        await self._call(lambda: self._dht_().put_value(key, value))

    async def get(self, key: str) -> bytes | None:
        async def lookup() -> bytes | None:
            self._forget_cached(self._dht_().value_store.store, key.encode())
            return await self._dht_().get_value(key)

        return await self._call(lookup)

    async def provide(self, key: str) -> bool:
        return await self._call(lambda: self._dht_().provide(key))

    async def providers(self, key: str) -> list[str]:
        async def find() -> list[str]:
            self._forget_cached(self._dht_().provider_store.providers, _encode_key(key))
            found = await self._dht_().find_providers(key)
            for info in found:  # remember their addresses so that a dial can follow
                self._host_().get_peerstore().add_addrs(info.peer_id, info.addrs, 3600)
            return list(dict.fromkeys(str(info.peer_id) for info in found))

        return await self._call(find)

    async def forget(self, peer_id: str) -> None:
        """A peer we know to be gone (e.g. a coordinator that stopped answering): out of the
        routing table, so lookups stop waiting on it."""

        async def drop() -> None:
            self._dht_().routing_table.remove_peer(ID.from_base58(peer_id))

        await self._call(drop)

    async def publish(self, topic: str, data: bytes) -> None:
        await self._call(lambda: self._pubsub_().publish(topic, data))

    async def connected_peers(self) -> list[str]:
        async def peers() -> list[str]:
            return [str(p) for p in self._host_().get_connected_peers()]

        return await self._call(peers)

    def _forget_cached(self, store: dict[bytes, Any], key: bytes) -> None:
        """py-libp2p answers a lookup from its local store when it has anything there, so a
        DHT client would keep seeing the market as it was at its first lookup (new coordinators
        never, dead ones until their record lapses). A client's local copy is only a cache:
        drop it and ask the network. A server's copies are the DHT itself: kept."""
        if not self.config.dht_server:
            store.pop(key, None)

    # ------------------------------------------------------------------ the trio side
    def _dht_(self) -> KadDHT:
        assert self._dht is not None
        return self._dht

    def _host_(self) -> IHost:
        assert self._host is not None
        return self._host

    def _pubsub_(self) -> Pubsub:
        assert self._pubsub is not None
        return self._pubsub

    async def _call(self, make: Callable[[], Awaitable[T]]) -> T:
        loop, token, nursery = asyncio.get_running_loop(), self._token, self._nursery
        if token is None or nursery is None or not self.running:
            raise P2PUnavailable("the p2p node is not running")
        future: asyncio.Future[T] = loop.create_future()
        timeout = self.config.op_timeout_s

        def settle(result: Any, error: BaseException | None) -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        async def run() -> None:
            try:
                with trio.fail_after(timeout):
                    result = await make()
            except trio.TooSlowError:
                loop.call_soon_threadsafe(settle, None, P2PTimeout(f"no answer in {timeout} s"))
            except Exception as exc:  # translated at the boundary
                error = P2PError(f"{type(exc).__name__}: {exc}")
                loop.call_soon_threadsafe(settle, None, error)
            else:
                loop.call_soon_threadsafe(settle, result, None)

        try:
            token.run_sync_soon(nursery.start_soon, run)
        except trio.RunFinishedError as exc:
            raise P2PUnavailable("the p2p node stopped") from exc
        return await future

    def _thread_main(self, ready: asyncio.Future[list[str]]) -> None:
        try:
            trio.run(self._main, ready)
        except BaseException as exc:  # the thread must not die silently
            log.exception("p2p node stopped with an error")
            assert self._loop is not None
            if not self._loop.is_closed():
                self._loop.call_soon_threadsafe(_fail, ready, P2PUnavailable(str(exc)))
        finally:
            self._token = None
            self._release_sockets()

    def _release_sockets(self) -> None:
        """Close the sockets py-libp2p left open (see p2p.sockets) now that the run is over,
        then collect what it left behind."""
        self._host = self._dht = self._pubsub = None
        self._nursery = None
        ports = {int(a.split("/tcp/")[1].split("/")[0]) for a in self.addrs if "/tcp/" in a}
        try:
            left_open = self._sockets.close_all(ports)
        except Exception:  # never let the tidy-up take the node's thread down
            log.exception("could not close the sockets py-libp2p left open")
        else:
            if left_open:
                log.debug("closed %d socket(s) py-libp2p left open", left_open)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()

    def _new_host(self) -> IHost:
        noise = NoiseTransport(self._key_pair, noise_privkey=new_x25519_key_pair().private_key)
        return new_host(key_pair=self._key_pair, sec_opt={NOISE_PROTOCOL_ID: noise})

    async def _main(self, ready: asyncio.Future[list[str]]) -> None:
        cfg = self.config
        trio.socket.set_custom_socket_factory(self._sockets)  # this run's sockets only
        _set_query_timeout(cfg.query_timeout_s)
        host = self._host = self._new_host()
        self.peer_id = str(host.get_id())
        self._stop = trio.Event()
        dht = self._dht = KadDHT(
            host,
            DHTMode.SERVER if cfg.dht_server else DHTMode.CLIENT,
            max_peers_per_subnet=0 if cfg.same_host_peers else None,
        )
        validator = _RecordValidator(self._check_record, self._record_version)
        dht.register_validator(self._namespace, validator)
        gossip = GossipSub(
            protocols=[GOSSIPSUB], degree=6, degree_low=4, degree_high=12,
            heartbeat_interval=cfg.gossip_heartbeat_s,
            eclipse_protection_enabled=not cfg.same_host_peers,
        )  # fmt: skip
        pubsub = self._pubsub = Pubsub(host, gossip)
        async with (
            host.run([multiaddr.Multiaddr(cfg.listen)]),
            background_trio_service(dht),
            background_trio_service(pubsub),
            background_trio_service(gossip),
            trio.open_nursery() as nursery,
        ):
            await pubsub.wait_until_ready()
            for topic in cfg.topics:
                subscription = await pubsub.subscribe(topic)
                nursery.start_soon(self._deliver, topic, subscription)
            self._nursery = nursery
            self._token = trio.lowlevel.current_trio_token()
            addrs = [str(a) for a in host.get_addrs()]
            assert self._loop is not None
            self._loop.call_soon_threadsafe(_succeed, ready, addrs)
            nursery.start_soon(self._maintain)
            await self._stop.wait()
            nursery.cancel_scope.cancel()
            with trio.move_on_after(5):  # close sockets now, not whenever they are collected
                await host.get_network().close()

    async def _deliver(self, topic: str, subscription: Any) -> None:
        me = self._host_().get_id()
        while True:
            message = await subscription.get()
            sender = ID(message.from_id)
            if sender == me or self._on_message is None or self._loop is None:
                continue
            self._loop.call_soon_threadsafe(self._on_message, topic, message.data, str(sender))

    async def _maintain(self) -> None:
        """Keep bootstrap peers dialled and every DHT neighbour connected (gossip only flows
        between connected peers)."""
        host, dht = self._host_(), self._dht_()
        while True:
            for addr in self.config.bootstrap:
                await self._dial_bootstrap(host, dht, addr)
            with trio.move_on_after(self.config.op_timeout_s):
                try:
                    await dht.refresh_routing_table()
                except Exception as exc:  # a lookup failing now is retried next round
                    log.debug("routing table refresh failed: %s", exc)
            connected = set(host.get_connected_peers())
            for peer in dht.routing_table.get_peer_ids():
                if peer not in connected and peer != host.get_id():
                    await self._dial(host, peer)
            await trio.sleep(self.config.maintain_s)

    async def _dial_bootstrap(self, host: IHost, dht: KadDHT, addr: str) -> None:
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        except Exception as exc:
            log.warning("bad bootstrap address %s: %s", addr, exc)
            return
        if info.peer_id == host.get_id():
            return
        if info.peer_id not in host.get_connected_peers():
            with trio.move_on_after(self.config.op_timeout_s):
                try:
                    await host.connect(info)
                except Exception as exc:
                    log.info("bootstrap peer %s unreachable: %s", addr, exc)
                    return
        await dht.add_peer(info.peer_id)

    async def _dial(self, host: IHost, peer: ID) -> None:
        addrs: Sequence[multiaddr.Multiaddr] = host.get_peerstore().addrs(peer)
        if not addrs:
            return
        with trio.move_on_after(self.config.op_timeout_s):
            try:
                await host.connect(host.get_peerstore().peer_info(peer))
            except Exception as exc:
                log.debug("could not dial %s: %s", peer, exc)
