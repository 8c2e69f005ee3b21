"""Misbehaving modes, for testing that cheating does not pay. Never on by default: a mode is
named in AGORA_WORKER_FAULT and refused unless AGORA_WORKER_FAULTS_ALLOWED says this is a test.

- inflate-tokens: reports (and signs) more prompt and completion tokens than the engine did
- garbage-text: replaces the engine's text with random words (an embedding model's vectors
  with random ones), signed as if computed
- bad-signature: signs receipts with a key that is not the node's
- drop-midstream-but-bill: stops relaying half-way, then bills the whole output
- replay-receipt: sends its first receipt again for every later job
- slow: holds each streamed token 200 ms (and a whole response 200 ms)
- hide-cache-hits: reports (and signs) no cached prompt tokens, so hits bill at the full price
- overstate-cache-hits: reports (and signs) every prompt token as found in the cache
(wrong-model needs no code: a node attaches an engine serving another model under the
advertised name.)
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from enum import StrEnum
from typing import Any

from protocol.completions import vector_of, vector_text
from protocol.identity import Identity
from protocol.receipt import Receipt, SignedReceipt, sign_receipt
from worker_node.errors import ConfigError

FAULT_ENV = "AGORA_WORKER_FAULT"
ALLOW_ENV = "AGORA_WORKER_FAULTS_ALLOWED"
ALLOW_VALUE = "yes-this-is-a-test"
INFLATION = 9
_WORDS = ("lorem", "ipsum", "dolor", "sit", "amet", "quux", "zork", "blarg", "fnord", "wibble")


class FaultMode(StrEnum):
    INFLATE_TOKENS = "inflate-tokens"
    GARBAGE_TEXT = "garbage-text"
    BAD_SIGNATURE = "bad-signature"
    DROP_MIDSTREAM_BUT_BILL = "drop-midstream-but-bill"
    REPLAY_RECEIPT = "replay-receipt"
    SLOW = "slow"
    HIDE_CACHE_HITS = "hide-cache-hits"
    OVERSTATE_CACHE_HITS = "overstate-cache-hits"


def fault_from_env(environ: dict[str, str] | None = None) -> Fault | None:
    env = dict(os.environ if environ is None else environ)
    name = env.get(FAULT_ENV)
    if not name:
        return None
    if env.get(ALLOW_ENV) != ALLOW_VALUE:
        raise ConfigError(
            f"{FAULT_ENV}={name} makes this node cheat; it is refused unless "
            f"{ALLOW_ENV}={ALLOW_VALUE} (tests only)"
        )
    try:
        return Fault(FaultMode(name))
    except ValueError:
        known = ", ".join(m.value for m in FaultMode)
        raise ConfigError(f"unknown {FAULT_ENV} {name!r}; known: {known}") from None


class Fault:
    def __init__(self, mode: FaultMode, seed: int | None = None) -> None:
        self.mode = mode
        self._rng = random.Random(seed)
        self._first_receipt: SignedReceipt | None = None
        self._impostor = Identity.generate()  # not the node's key

    # ------------------------------------------------------------------ the stream
    @property
    def paces_each_chunk(self) -> bool:
        """The slow mode sends every engine chunk on its own, after a delay per token in it
        (so the coordinator sees the pace per token even when a busy engine put several
        tokens in one chunk: a delay per chunk would then look fast)."""
        return self.mode is FaultMode.SLOW

    async def before_batch(self, tokens: int = 1) -> None:
        if self.mode is FaultMode.SLOW:
            await asyncio.sleep(0.2 * max(1, tokens))

    def rewrite(self, chunk: dict[str, Any]) -> dict[str, Any]:
        """A chunk (or a whole response) as this node reports it."""
        if self.mode is FaultMode.GARBAGE_TEXT:
            for item in chunk.get("data") or ():  # embeddings
                size = len(vector_of(vector_text(item.get("embedding"))))
                item["embedding"] = vector_text([self._rng.gauss(0, 1) for _ in range(size)])
            for choice in chunk.get("choices") or ():
                for holder in (choice, choice.get("delta") or {}, choice.get("message") or {}):
                    for key in ("text", "content"):
                        if isinstance(holder.get(key), str) and holder[key]:
                            holder[key] = " " + self._rng.choice(_WORDS)
                if choice.get("token_ids"):
                    choice["token_ids"] = [
                        self._rng.randrange(50, 4000) for _ in choice["token_ids"]
                    ]
        if self.mode is FaultMode.INFLATE_TOKENS and chunk.get("usage"):
            usage = chunk["usage"]
            usage["prompt_tokens"] += INFLATION
            usage["completion_tokens"] += INFLATION
            usage["total_tokens"] += 2 * INFLATION
        if self.mode in _CACHE_CLAIMS and chunk.get("usage"):
            usage = chunk["usage"]
            hits = usage["prompt_tokens"] if self.mode is FaultMode.OVERSTATE_CACHE_HITS else 0
            usage["prompt_tokens_details"] = {"cached_tokens": hits}
        return chunk

    def withholds(self, relayed: int) -> bool:
        """True once a drop-midstream node stops relaying (it keeps metering the engine)."""
        return self.mode is FaultMode.DROP_MIDSTREAM_BUT_BILL and relayed >= 3

    # ------------------------------------------------------------------ the receipt
    def sign(self, identity: Identity, receipt: Receipt) -> SignedReceipt:
        if self.mode is FaultMode.BAD_SIGNATURE:
            honest = sign_receipt(identity, receipt)
            forged = sign_receipt(self._impostor, _renamed(receipt, self._impostor.node_id))
            return SignedReceipt(honest.body, forged.worker_signature)
        signed = sign_receipt(identity, receipt)
        if self.mode is FaultMode.REPLAY_RECEIPT:
            if self._first_receipt is None:
                self._first_receipt = signed
            return self._first_receipt
        return signed


_CACHE_CLAIMS = (FaultMode.HIDE_CACHE_HITS, FaultMode.OVERSTATE_CACHE_HITS)


def _renamed(receipt: Receipt, worker_id: str) -> Receipt:
    value = json.loads(receipt.to_bytes())
    value["worker_id"] = worker_id
    return Receipt(**value)
