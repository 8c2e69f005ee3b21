"""Agora's libp2p layer: discovery (Kademlia DHT) and gossip (gossipsub) between coordinators
and workers, on py-libp2p with Noise as the only security transport.

py-libp2p runs on trio; `P2PNode` keeps it in its own thread behind a small asyncio interface,
so the rest of Agora (asyncio: FastAPI, grpc.aio) never touches trio. What travels here is
signed (protocol.market); requests and billing never do.

Errors: P2PError
          ├── P2PUnavailable  (the node is not running, or failed to start)
          └── P2PTimeout      (a DHT/gossip operation took longer than allowed)

The node lives in `p2p.node` (importing it imports libp2p); `p2p.errors` does not.
"""
