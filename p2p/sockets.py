"""Closing the sockets py-libp2p leaves open.

py-libp2p drops some sockets without closing them (a failed security upgrade, a connection
cancelled at shutdown, an error path that keeps the socket in a traceback). Left to the garbage
collector they close whenever it runs — file descriptors held for an unknown time, and a
ResourceWarning at some unrelated moment. A node's trio run is its own, so every socket it
opens can be known (trio's per-run socket factory) and closed once the run has ended; sockets
it accepted are the ones whose local port is one of its listening ports.
"""

from __future__ import annotations

import gc
import socket
import weakref

import trio


class SocketTracker(trio.abc.SocketFactory):
    """Install with `trio.socket.set_custom_socket_factory` inside the run to be tracked."""

    def __init__(self) -> None:
        self._opened: weakref.WeakSet[socket.socket] = weakref.WeakSet()

    def socket(
        self,
        family: socket.AddressFamily | int = socket.AF_INET,
        type: socket.SocketKind | int = socket.SOCK_STREAM,  # trio's parameter names
        proto: int = 0,
    ) -> trio.socket.SocketType:
        sock = socket.socket(family, type, proto)
        self._opened.add(sock)
        return trio.socket.from_stdlib_socket(sock)

    def close_all(self, listening_ports: set[int]) -> int:
        """Close what the run opened or accepted and left open (call after the run ended);
        return how many were still open."""
        leftover = [s for s in list(self._opened) if s.fileno() != -1]
        if listening_ports:
            leftover += [s for s in _open_sockets() if _local_port(s) in listening_ports]
        for sock in leftover:
            sock.close()
        return len(leftover)


def _open_sockets() -> list[socket.socket]:
    # type(), not isinstance(): isinstance reads `__class__`, which some objects in a big
    # process (torch's deprecated aliases) answer with a warning
    return [o for o in gc.get_objects() if type(o) is socket.socket and o.fileno() != -1]


def _local_port(sock: socket.socket) -> int | None:
    try:
        name = sock.getsockname()
    except OSError:
        return None
    return int(name[1]) if isinstance(name, tuple) and len(name) >= 2 else None
