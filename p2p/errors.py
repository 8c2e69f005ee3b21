"""The p2p package's errors (libp2p's and trio's are translated into these at the boundary)."""

from __future__ import annotations


class P2PError(Exception):
    """Base of every error the p2p layer raises."""


class P2PUnavailable(P2PError):
    """The node is not running (not started, stopped, or its thread died)."""


class P2PTimeout(P2PError):
    """A DHT or gossip operation did not finish in time."""
