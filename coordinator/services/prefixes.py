"""Which workers recently saw which prompt prefixes: what prefix-aware routing reads.

A worker's engine keeps the KV cache of prompts it served (vLLM's prefix cache), so the next
turn of a conversation, or another request with the same long system prompt, starts faster and
costs less there. The coordinator cannot see those caches; it remembers what it sent where. A
prompt becomes a chain of block hashes, each covering the prompt up to a point (a chat message,
or a fixed run of characters or token ids), each hash chained to the one before, so two prompts
share a block only if everything before it is the same. The index maps (model, block) to the
workers that were sent it and when; entries expire after `ttl_s` (an engine evicts what it has
not used) and the index holds at most `capacity` blocks (least recently used dropped first).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from protocol.completions import CHAT

BLOCK_CHARS = 256  # a text prompt's block: about 64 tokens
BLOCK_IDS = 64  # a token-id prompt's block
_encode = msgspec.json.Encoder(order="sorted").encode


@dataclass(frozen=True)
class Block:
    digest: bytes
    covers: int  # characters (or ids) of the prompt up to the end of this block


Chain = tuple[Block, ...]


def _chain(pieces: Sequence[tuple[bytes, int]]) -> Chain:
    """Blocks of (bytes, how much of the prompt they are), each hash over all before it."""
    blocks, running, covered = [], hashlib.sha256(), 0
    for piece, size in pieces:
        running.update(len(piece).to_bytes(8, "big") + piece)
        covered += size
        blocks.append(Block(running.copy().digest()[:16], covered))
    return tuple(blocks)


def prefix_chain(endpoint: str, prompt: Any) -> Chain:
    """The prompt's block chain: chat messages one block each; a text prompt in runs of
    BLOCK_CHARS; token ids in runs of BLOCK_IDS; a batch of prompts is not chained."""
    if endpoint == CHAT and isinstance(prompt, list):
        return _chain([(piece, len(piece)) for piece in map(_encode, prompt)])
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        runs = [prompt[i : i + BLOCK_IDS] for i in range(0, len(prompt), BLOCK_IDS)]
        return _chain([(_encode(run), len(run)) for run in runs])
    if isinstance(prompt, str):
        text = prompt.encode()
        runs_of_text = [text[i : i + BLOCK_CHARS] for i in range(0, len(text), BLOCK_CHARS)]
        return _chain([(run, len(run)) for run in runs_of_text])
    return ()


class PrefixIndex:
    def __init__(self, capacity: int = 200_000, ttl_s: float = 600.0) -> None:
        self.capacity = capacity
        self.ttl_s = ttl_s
        self._blocks: OrderedDict[tuple[str, bytes], dict[str, float]] = OrderedDict()
        self._sessions: OrderedDict[tuple[str, str], tuple[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def record(self, model: str, chain: Chain, node_id: str, now: float, session: str = "") -> None:
        """`node_id` was just sent this prompt (its engine now caches it)."""
        for block in chain:
            key = (model, block.digest)
            nodes = self._blocks.pop(key, None) or {}
            nodes[node_id] = now
            self._blocks[key] = nodes  # most recently used last
        while len(self._blocks) > self.capacity:
            self._blocks.popitem(last=False)
        if session:
            self._sessions.pop((model, session), None)
            self._sessions[(model, session)] = (node_id, now)
            while len(self._sessions) > self.capacity:
                self._sessions.popitem(last=False)

    def shares(self, model: str, chain: Chain, now: float) -> dict[str, float]:
        """Per worker, the share of this prompt it was sent recently (its longest matching
        prefix over the prompt's length, 0..1); workers with none are absent."""
        if not chain:
            return {}
        total, cutoff = chain[-1].covers, now - self.ttl_s
        out: dict[str, float] = {}
        alive: set[str] | None = None
        for block in chain:
            nodes = self._blocks.get((model, block.digest))
            seen = {n for n, at in nodes.items() if at >= cutoff} if nodes else set()
            alive = seen if alive is None else alive & seen
            if not alive:
                break
            for node in alive:
                out[node] = block.covers / total if total else 1.0
        return out

    def session_holder(self, model: str, session: str, now: float) -> str | None:
        """The worker that served this conversation (`user` or X-Agora-Session) last."""
        found = self._sessions.get((model, session))
        if found is None or found[1] < now - self.ttl_s:
            return None
        return found[0]
