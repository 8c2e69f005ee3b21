"""A libp2p peer that speaks only plaintext (py-libp2p's insecure transport) and tries to dial
the address given on the command line; prints `connected` or the error. Run as a separate
process: py-libp2p leaks the raw socket of a failed security upgrade."""

from __future__ import annotations

import sys

import multiaddr
import trio
from libp2p import new_host
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport

from p2p.node import _key_pair
from protocol.identity import Identity


async def dial(target: str) -> str:
    key_pair = _key_pair(Identity.generate().seed())
    host = new_host(key_pair=key_pair, sec_opt={PLAINTEXT_PROTOCOL_ID: InsecureTransport(key_pair)})
    async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        try:
            with trio.fail_after(10):
                await host.connect(info_from_p2p_addr(multiaddr.Multiaddr(target)))
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return "connected"


if __name__ == "__main__":
    print(trio.run(dial, sys.argv[1]), flush=True)
