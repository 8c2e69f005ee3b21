"""The owner of a request answered from the response cache: it charges the operator's price
(a share of what the original answer cost; none of it a provider's), signs the receipt, and
replays the answer in the client's shape, streamed with the same chunks as the miss or whole."""

from __future__ import annotations

import copy
import hashlib
import time
from collections.abc import AsyncGenerator
from typing import Any

from billing.errors import InsufficientFunds
from billing.ledger import cache_hit_charge
from billing.pricing import BPS
from coordinator.errors import InsufficientCredit
from coordinator.services.accounts import Principal
from coordinator.services.request_path.render import DONE, StreamRenderer
from coordinator.services.request_path.request import CompletionRequest
from coordinator.services.reservations import HoldBook
from coordinator.services.response_cache import (
    CachedAnswer,
    ResponseCache,
    cache_key,
    why_not_cacheable,
)
from coordinator.services.settlement import Settled
from coordinator.store import cache_hits_store
from coordinator.store.db import Engine
from coordinator.store.writer import LedgerWriter
from protocol.cache_hit import cache_hit_document
from protocol.completions import CHAT
from protocol.identity import Identity
from protocol.proto import session_pb2 as pb


class CacheHit:
    route = None  # no routing decision: no worker ran it
    worker_id = ""
    cache_status = "hit"

    def __init__(
        self, principal: Principal, request: CompletionRequest, request_id: str,
        answer: CachedAnswer,
    ) -> None:  # fmt: skip
        self.principal = principal
        self.request = request
        self.request_id = request_id
        self.answer = answer
        self.response_id = f"{request.response_prefix}-{request_id}"
        self.created = int(time.time())
        self.charged = 0
        self.source = answer.source_request_id  # the request it replays (as shown to the client)

    async def settle(
        self, writer: LedgerWriter, identity: Identity, holds: HoldBook, price_bps: int,
        source: str,
    ) -> None:  # fmt: skip
        """Post the hit's charge and store its signed receipt, together, under a credit hold
        like any request's (402 when the client cannot pay it beside what its requests in
        flight hold: then nothing is written and nothing is answered). `source`: the request
        whose answer it replays, as this client may see it."""
        answer = self.answer
        self.charged = -(-answer.charged * price_bps // BPS)
        self.source = source
        document = cache_hit_document(
            identity, request_id=self.request_id, source_request_id=source,
            model=self.request.model_shown, prompt_tokens=answer.prompt_tokens,
            completion_tokens=answer.completion_tokens, amount_total=self.charged,
        )  # fmt: skip
        client = self.principal.client
        tx = cache_hit_charge(self.request_id, client, self.charged) if self.charged else None
        hold = await holds.hold(client, self.charged) if self.charged else None
        try:
            await writer.submit(lambda conn: cache_hits_store.record(conn, document, client, tx))
            if hold is not None:
                holds.posted(client, self.charged)
        except InsufficientFunds as exc:
            raise InsufficientCredit(
                f"This answer from the response cache costs {self.charged} micro-units; your "
                "balance is lower. Add credit."
            ) from exc
        finally:
            if hold is not None:
                hold.release()

    def usage(self) -> dict[str, Any]:
        """The original answer's tokens; its whole prompt was, in effect, cached."""
        answer = self.answer
        return {
            "prompt_tokens": answer.prompt_tokens,
            "completion_tokens": answer.completion_tokens,
            "total_tokens": answer.prompt_tokens + answer.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": answer.prompt_tokens},
        }

    async def stream(self) -> AsyncGenerator[tuple[bytes, bool]]:
        request = self.request
        render = StreamRenderer(request.endpoint, self.response_id, self.created,
                                request.model_shown, False)  # fmt: skip
        out: list[bytes] = []
        for text, finish in self.answer.pieces:
            out += render.frames(pb.Frames(choices=[
                pb.TokenFrame(index=0, text=text, finish_reason=finish)]))  # fmt: skip
        if request.include_usage:
            out.append(render.usage(self.usage()))
        yield b"".join([*out, DONE]), True

    async def whole(self) -> dict[str, Any]:
        answer, request = self.answer, self.request
        if answer.whole is not None:
            result = copy.deepcopy(answer.whole)
        elif request.endpoint == CHAT:
            message = {"role": "assistant", "content": answer.text}
            result = {"object": "chat.completion", "choices": [
                {"index": 0, "message": message, "logprobs": None,
                 "finish_reason": answer.finish_reason}]}  # fmt: skip
        else:
            result = {"object": "text_completion", "choices": [
                {"index": 0, "text": answer.text, "logprobs": None,
                 "finish_reason": answer.finish_reason}]}  # fmt: skip
        result.update(id=self.response_id, created=self.created, model=request.model_shown,
                      usage=self.usage())  # fmt: skip
        return result

    def close(self) -> None:
        """Nothing to release: no slot, no hold."""


class CachedAnswers:
    """The request path's side of the response cache: which requests may use it and under
    which key, answers found and kept, hits charged and their receipts."""

    def __init__(
        self, cache: ResponseCache, engine: Engine, writer: LedgerWriter, identity: Identity,
        holds: HoldBook, price_bps: int, shared: bool,
    ) -> None:  # fmt: skip
        self.cache = cache
        self._engine = engine
        self._writer = writer
        self._identity = identity
        self._holds = holds
        self._price_bps = price_bps
        self._shared = shared  # keys shared across API keys (operator's choice)

    def key_for(self, principal: Principal, request: CompletionRequest) -> tuple[str, str]:
        """(key, "") for a request that opted in and can be answered from the cache, else
        ("", why not: "" when it did not opt in)."""
        if not request.cache:
            return "", ""
        why = why_not_cacheable(request.body, request.choices, request.wants_token_ids)
        if why is not None:
            return "", why
        scope = "*" if self._shared else str(principal.key_id)
        served = f"{request.model}+{request.adapter}"
        return cache_key(scope, served, request.endpoint, request.body), ""

    async def answer(
        self, key: str, principal: Principal, request: CompletionRequest, request_id: str
    ) -> CacheHit | None:
        """The cached answer as a settled hit, or None on a miss."""
        found = self.cache.get(key)
        if found is None:
            return None
        hit = CacheHit(principal, request, request_id, found)
        source = found.source_request_id
        if self._shared:  # another client's request id is not this client's to see
            source = "shared-" + hashlib.sha256(source.encode()).hexdigest()[:24]
        await hit.settle(self._writer, self._identity, self._holds, self._price_bps, source)
        return hit

    def keep(self, key: str, answer: CachedAnswer) -> None:
        self.cache.put(key, answer)

    def document(self, request_id: str, client: str) -> dict[str, Any] | None:
        """A hit's receipt for its client (None: not a hit of this client's)."""
        return cache_hits_store.document(self._engine, request_id, client)


class AnswerRecorder:
    """What the client of a cacheable request got, reported by the request's owner as it
    relays, and what the response cache may keep of it."""

    def __init__(self, key: str) -> None:
        self.key = key
        self._pieces: list[tuple[str, str]] | None = []  # (text, finish) per streamed frame
        self._whole: dict[str, Any] | None = None  # the non-streamed answer

    def frames(self, frames: pb.Frames) -> None:
        """Plain text only: a frame with more (reasoning, logprobs, another choice) makes the
        answer one that cannot be replayed."""
        pieces = self._pieces
        if pieces is None:
            return
        for f in frames.choices:
            if f.delta_json or f.logprobs_json or f.index != 0:
                self._pieces = None
                return
            pieces.append((f.text, f.finish_reason))

    def whole(self, result: dict[str, Any]) -> None:
        self._whole = result

    def answer(self, request_id: str, endpoint: str, settled: Settled | None, text: str,
               finish: str) -> CachedAnswer | None:  # fmt: skip
        """What the cache keeps: None unless the settlement was clean (every segment signed
        and checked) and the answer is plain text."""
        if settled is None or not settled.clean:
            return None
        if self._whole is not None:
            choices = self._whole.get("choices") or [{}]
            message = choices[0].get("message") or {}
            if len(choices) != 1 or any(v for k, v in message.items()
                                        if k not in ("role", "content")):  # fmt: skip
                return None  # tool calls, reasoning …: not replayable as a stream
            pieces: tuple[tuple[str, str], ...] = ((text, finish),)
            whole: dict[str, Any] | None = copy.deepcopy(self._whole)
        elif self._pieces is None:
            return None
        else:
            pieces, whole = tuple(self._pieces), None
        usage = settled.usage
        return CachedAnswer(request_id, endpoint, pieces, usage.prompt_tokens,
                            usage.completion_tokens, settled.charge.total, whole)  # fmt: skip
