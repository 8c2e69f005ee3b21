"""The request path in-process, through the worker-link seam: the coordinator's real parts
(composition root, routing, holds, settlement on SQLite, the ledger), with workers played by
handlers (`HandlerLink`) that sign real receipts. Failover, continuation, stalls, overload and
settlement, in milliseconds; the fleet tests run the same path over gRPC with real vLLM."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
from sqlmodel import Session, select

from agora.receipts import statement_total
from coordinator.app import Coordinator
from coordinator.config import CoordinatorSettings
from coordinator.errors import InsufficientCredit, InvalidRequest, NoCapacity
from coordinator.services.accounts import Principal
from coordinator.services.registry import WorkerConnection
from coordinator.services.request_path.fulfilment import Fulfilment
from coordinator.services.request_path.link import HandlerLink
from coordinator.services.request_path.request import CompletionRequest
from coordinator.services.routing import Preferences
from coordinator.store.models import StoredReceipt
from protocol.advert import Advert, ModelOffer
from protocol.completions import CHAT, COMPLETIONS, prompt_of
from protocol.identity import Identity
from protocol.proto import session_pb2 as pb
from protocol.receipt import Receipt, output_digest, prompt_digest, sign_receipt
from protocol.receipt_document import verify_document

MODEL = "m"
PRICE = (1_000_000, 2_000_000)
PROMPT_IDS = [1, 2, 3]


@dataclass
class Script:
    """How a played worker answers its next jobs (one entry per job; the last repeats)."""

    tokens: list[str] = field(default_factory=lambda: ["Hel", "lo", " wor", "ld"])
    fail_before: pb.JobError | None = None  # answer with this error before any token
    fail_after: int | None = None  # send this many tokens, then a retryable 502
    stall_after: int | None = None  # send this many tokens, then nothing
    per_frame: int = 1  # engine tokens merged into one frame
    no_receipt: bool = False  # the whole answer, then a failure instead of the receipt
    overrun: bool = False  # ignore the job's max_tokens (and claim every token sent)
    cached: int = 0  # prompt tokens it says its engine found cached (usage and receipt)
    silent_stop: bool = False  # asked to stop and sign, it goes quiet (a node from before)


class PlayedWorker:
    def __init__(
        self, name: str, script: Script | None = None, cached_price: int | None = None
    ) -> None:
        self.identity = Identity.generate()
        self.name = name
        self.script = script or Script()
        self.cached_price = cached_price  # what it sells a cached prompt token for
        self.link = HandlerLink(self._run)

    @property
    def node_id(self) -> str:
        return self.identity.node_id

    def advert(self) -> Advert:
        offer = ModelOffer(MODEL, 4, *PRICE, context_length=512,
                           price_cached_prompt_per_mtok=self.cached_price)  # fmt: skip
        return Advert(self.node_id, 0, (offer,))

    async def _run(self, job: pb.Job) -> AsyncIterator[pb.JobEvent]:
        script, rid = self.script, job.request_id
        if script.fail_before is not None:
            yield pb.JobEvent(request_id=rid, error=script.fail_before)
            return
        body = msgspec.json.decode(job.body)
        endpoint = CHAT if job.endpoint == pb.ENDPOINT_CHAT_COMPLETIONS else COMPLETIONS
        continued = isinstance(body.get("prompt"), list)
        start = len(body["prompt"]) - len(PROMPT_IDS) if continued else 0
        bound = 1 << 30 if script.overrun else int(body.get("max_tokens") or 1 << 30)
        tokens = script.tokens[start : start + bound]
        prompt_ids = body["prompt"] if continued else PROMPT_IDS
        sent: list[str] = []
        if not body.get("stream"):
            sent = list(tokens)
            message = {"role": "assistant", "content": "".join(sent)}
            usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": len(sent),
                     "prompt_tokens_details": {"cached_tokens": script.cached}}  # fmt: skip
            whole = {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                     "usage": usage, "prompt_token_ids": prompt_ids}  # fmt: skip
            yield pb.JobEvent(request_id=rid, response=msgspec.json.encode(whole))
            if script.no_receipt:
                error = pb.JobError(http_status=502, message="died", type="worker_lost")
                yield pb.JobEvent(request_id=rid, error=error)
                return
            tokens = []
        for i in range(0, len(tokens), script.per_frame):
            if script.stall_after is not None and len(sent) >= script.stall_after:
                await asyncio.sleep(3600)
            if script.silent_stop and rid in self.link.stopped:
                await asyncio.sleep(3600)
            if script.fail_after is not None and len(sent) >= script.fail_after:
                error = pb.JobError(http_status=502, message="engine died", type="engine_error")
                yield pb.JobEvent(request_id=rid, error=error)
                return
            part = tokens[i : i + script.per_frame]
            ids = [100 + start + len(sent) + k for k in range(len(part))]
            sent += part
            last = start + len(sent) == len(script.tokens)
            frame = pb.TokenFrame(index=0, text="".join(part), token_ids=ids,
                                  finish_reason="stop" if last else "")  # fmt: skip
            frames = pb.Frames(choices=[frame])
            if i == 0:
                frames.prompt_token_ids.extend(prompt_ids)
            yield pb.JobEvent(request_id=rid, frames=frames)
            await asyncio.sleep(0)
        if body.get("stream"):
            counts = pb.Usage(prompt_tokens=len(prompt_ids), completion_tokens=len(sent),
                              cached_tokens=script.cached)  # fmt: skip
            yield pb.JobEvent(request_id=rid, frames=pb.Frames(usage=counts))
            if script.no_receipt:
                error = pb.JobError(http_status=502, message="died", type="worker_lost")
                yield pb.JobEvent(request_id=rid, error=error)
                return
        receipt = Receipt(
            request_id=rid, model=MODEL, worker_id=self.node_id,
            coordinator_nonce=job.nonce.hex(),
            prompt_sha256=prompt_digest(prompt_of(endpoint, body)),
            output_sha256=output_digest(["".join(sent)]),
            prompt_tokens=len(prompt_ids), completion_tokens=len(sent),
            price_prompt_per_mtok=PRICE[0], price_completion_per_mtok=PRICE[1],
            started_at_ms=0, ttft_ms=0, finished_at_ms=0, finish_reason="stop",
            cached_prompt_tokens=script.cached,
            price_cached_prompt_per_mtok=script.cached and (self.cached_price or PRICE[0]),
        )  # fmt: skip
        signed = sign_receipt(self.identity, receipt)
        event = pb.SignedReceipt(body=signed.body, signature=signed.worker_signature)
        yield pb.JobEvent(request_id=rid, receipt=event)


def join(coordinator: Coordinator, *workers: PlayedWorker) -> None:
    for worker in workers:
        coordinator.registry.add(WorkerConnection(worker.node_id, worker.advert(), worker.link))


async def client(coordinator: Coordinator, credit: int = 10**9) -> Principal:
    secret = coordinator.accounts.create_client("alice", credit=credit)
    return await coordinator.accounts.authenticate(f"Bearer {secret}")


def chat(
    stream: bool = True, first: str | None = None, n: int = 1, max_tokens: int | None = 16
) -> CompletionRequest:
    """A chat request; `first`: the worker the client asks to be tried first."""
    payload: dict[str, object] = {
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": stream, "n": n,
    }  # fmt: skip
    prefs = Preferences(order=(first,) if first else ())
    return CompletionRequest(CHAT, MODEL, payload, stream, True, max_tokens, prefs)


async def relay(fulfilment: Fulfilment) -> tuple[str, dict[str, Any] | None, bytes]:
    """The text and usage the client saw, and the raw SSE."""
    raw = b"".join([batch async for batch, _last in fulfilment.stream()])
    text, usage = "", None
    for line in raw.split(b"\n\n"):
        if not line.startswith(b"data: {"):
            continue
        chunk = msgspec.json.decode(line[6:])
        for choice in chunk.get("choices") or ():
            text += choice["delta"].get("content") or ""
        usage = chunk.get("usage") or usage
    return text, usage, raw


def receipts(coordinator: Coordinator) -> list[StoredReceipt]:
    with Session(coordinator.db) as session:
        return list(session.exec(select(StoredReceipt)))


async def test_a_stream_is_relayed_settled_and_its_slot_freed(coordinator: Coordinator) -> None:
    worker = PlayedWorker("a", Script(per_frame=2))
    join(coordinator, worker)
    principal = await client(coordinator)
    fulfilment = await coordinator.request_path.begin(principal, chat())
    text, usage, raw = await relay(fulfilment)
    assert text == "Hello world"
    assert raw.endswith(b"data: [DONE]\n\n")
    assert b'"role":"assistant"' in raw
    assert b"token_ids" not in raw
    assert usage == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
                     "prompt_tokens_details": {"cached_tokens": 0}}  # fmt: skip
    assert coordinator.registry.pool(MODEL)[0].free_slots == 4
    await coordinator.settlement.quiesce()
    await coordinator.request_path.drain()
    [stored] = receipts(coordinator)
    assert stored.billed_completion_tokens == 4
    charged = 10**9 - coordinator.accounts.balance("alice")
    assert charged == fulfilment.settled.charge.total > 0 if fulfilment.settled else False


async def test_a_failing_worker_is_failed_over_before_the_first_token(
    coordinator: Coordinator,
) -> None:
    broken = pb.JobError(http_status=502, message="down", type="engine_error", retryable=True)
    bad, good = PlayedWorker("bad", Script(fail_before=broken)), PlayedWorker("good")
    join(coordinator, bad, good)
    principal = await client(coordinator)
    for _ in range(2):  # the client asks for the bad one first; both requests are served
        fulfilment = await coordinator.request_path.begin(principal, chat(first=bad.node_id))
        text, _usage, _raw = await relay(fulfilment)
        assert text == "Hello world"
    assert len(bad.link.jobs) == 1  # its breaker opened: the second request avoided it
    assert coordinator.stats.get(bad.node_id, MODEL).consecutive_failures == 1


async def test_a_worker_dying_midstream_is_continued_with_the_exact_rest(
    coordinator: Coordinator,
) -> None:
    dying = PlayedWorker("dying", Script(fail_after=2))
    join(coordinator, dying)
    principal = await client(coordinator)
    fulfilment = await coordinator.request_path.begin(principal, chat())
    rescuer = PlayedWorker("rescuer")
    join(coordinator, rescuer)  # the only other worker joins once the first one has begun
    text, usage, _raw = await relay(fulfilment)
    assert text == "Hello world"
    [continuation] = rescuer.link.jobs
    body = msgspec.json.decode(continuation.body)
    assert body["prompt"] == [*PROMPT_IDS, 100, 101]  # prompt ids + the ids delivered
    assert usage is not None
    assert usage["completion_tokens"] == 4
    await coordinator.settlement.quiesce()
    assert [r.segment for r in receipts(coordinator)] == [1]  # the dead segment has none


async def test_a_stalled_stream_is_continued_elsewhere(coordinator: Coordinator) -> None:
    stalled = PlayedWorker("stalled", Script(stall_after=1))
    join(coordinator, stalled)
    principal = await client(coordinator)
    fulfilment = await coordinator.request_path.begin(principal, chat())
    join(coordinator, PlayedWorker("rescuer"))
    text, _usage, _raw = await relay(fulfilment)
    assert text == "Hello world"
    assert stalled.link.cancelled  # the stalled job was told to stop


async def test_an_overloaded_worker_is_back_pressure_not_a_failure(
    coordinator: Coordinator,
) -> None:
    full = pb.JobError(http_status=503, message="queue full", type="engine_overloaded",
                       retryable=True, overloaded=True)  # fmt: skip
    busy = PlayedWorker("busy", Script(fail_before=full))
    join(coordinator, busy)
    principal = await client(coordinator)
    with pytest.raises(NoCapacity) as refused:
        await coordinator.request_path.begin(principal, chat())
    assert refused.value.retry_after_s == coordinator.settings.retry_after_s
    stats = coordinator.stats.get(busy.node_id, MODEL)
    assert stats.failures == 0
    assert stats.cooldown_until == 0.0
    join(coordinator, PlayedWorker("free"))
    text, _usage, _raw = await relay(await coordinator.request_path.begin(principal, chat()))
    assert text == "Hello world"


async def test_the_last_worker_of_a_model_is_not_turned_off_by_its_breaker(
    coordinator: Coordinator,
) -> None:
    worker = PlayedWorker("only", Script(fail_after=1))
    join(coordinator, worker)
    principal = await client(coordinator)
    _text, _usage, raw = await relay(await coordinator.request_path.begin(principal, chat()))
    assert b'"error"' in raw  # it failed mid-stream, nobody could carry on
    assert coordinator.stats.get(worker.node_id, MODEL).cooldown_until > 0
    worker.script = Script()  # it recovers; its breaker is still open
    text, _usage, _raw = await relay(await coordinator.request_path.begin(principal, chat()))
    assert text == "Hello world"


async def test_a_client_leaving_midstream_is_settled_once(coordinator: Coordinator) -> None:
    join(coordinator, PlayedWorker("a"))
    principal = await client(coordinator)
    fulfilment = await coordinator.request_path.begin(principal, chat())
    stream = fulfilment.stream()
    await anext(stream)
    await stream.aclose()  # the client went away after its first chunk
    await coordinator.request_path.drain()
    await coordinator.settlement.quiesce()
    assert len(receipts(coordinator)) <= 1
    assert 10**9 - coordinator.accounts.balance("alice") > 0  # what it got is billed
    assert coordinator.registry.pool(MODEL)[0].free_slots == 4


async def test_a_settlement_written_twice_posts_once(coordinator: Coordinator) -> None:
    join(coordinator, PlayedWorker("a"))
    principal = await client(coordinator)
    fulfilment = await coordinator.request_path.begin(principal, chat(stream=False))
    await fulfilment.whole()
    await coordinator.request_path.drain()
    settled = fulfilment.settled
    assert settled is not None
    before = coordinator.accounts.balance("alice")
    await coordinator.settlement.commit(settled)  # a retried write of the same request
    assert len(receipts(coordinator)) == 1
    assert coordinator.accounts.balance("alice") == before


async def test_a_failover_then_a_continuation_serve_one_request(coordinator: Coordinator) -> None:
    broken = pb.JobError(http_status=502, message="down", type="engine_error", retryable=True)
    refusing = PlayedWorker("refusing", Script(fail_before=broken))
    dying = PlayedWorker("dying", Script(fail_after=3))
    join(coordinator, refusing, dying)
    principal = await client(coordinator)
    fulfilment = await coordinator.request_path.begin(principal, chat(first=refusing.node_id))
    assert fulfilment.worker_id == dying.node_id  # the worker that served, not the one tried
    rescuer = PlayedWorker("rescuer")
    join(coordinator, rescuer)
    text, _usage, _raw = await relay(fulfilment)
    assert text == "Hello world"
    [continuation] = rescuer.link.jobs
    assert msgspec.json.decode(continuation.body)["prompt"] == [*PROMPT_IDS, 100, 101, 102]
    assert len({job.request_id for w in (refusing, dying, rescuer) for job in w.link.jobs}) == 3


async def test_the_credit_held_covers_every_choice_asked_for(coordinator: Coordinator) -> None:
    join(coordinator, PlayedWorker("a"))
    principal = await client(coordinator, credit=150)  # one choice's worst case, not four
    with pytest.raises(InsufficientCredit):
        await coordinator.request_path.begin(principal, chat(n=4))
    text, _usage, _raw = await relay(await coordinator.request_path.begin(principal, chat(n=1)))
    assert text == "Hello world"


async def test_a_whole_answer_whose_receipt_never_comes_is_delivered_and_billed(
    coordinator: Coordinator,
) -> None:
    join(coordinator, PlayedWorker("a", Script(no_receipt=True)))
    principal = await client(coordinator)
    fulfilment = await coordinator.request_path.begin(principal, chat(stream=False))
    answer = await fulfilment.whole()
    assert answer["choices"][0]["message"]["content"] == "Hello world"
    await coordinator.request_path.drain()
    assert receipts(coordinator) == []  # the worker signed nothing and is paid nothing
    assert 10**9 - coordinator.accounts.balance("alice") > 0  # the client pays what it got


async def test_a_continuation_keeps_the_clients_own_bound(coordinator: Coordinator) -> None:
    join(coordinator, PlayedWorker("dying", Script(fail_after=2)))
    principal = await client(coordinator)
    fulfilment = await coordinator.request_path.begin(principal, chat(max_tokens=None))
    rescuer = PlayedWorker("rescuer")
    join(coordinator, rescuer)
    text, _usage, _raw = await relay(fulfilment)
    assert text == "Hello world"
    [continuation] = rescuer.link.jobs
    # no bound of its own: the context length minus what was delivered would overrun the
    # context once the prompt holds the delivered tokens too
    assert "max_tokens" not in msgspec.json.decode(continuation.body)


async def test_a_stream_whose_worker_dies_after_its_last_token_is_not_continued(
    coordinator: Coordinator,
) -> None:
    """Every token and the finish were delivered, then the worker died before signing: the
    answer is complete, so nothing may be generated past it (a continuation would add a token
    beyond the client's bound); the stream ends cleanly and the client pays for what it got."""
    join(coordinator, PlayedWorker("a", Script(no_receipt=True)))
    principal = await client(coordinator)
    fulfilment = await coordinator.request_path.begin(principal, chat())
    rescuer = PlayedWorker("rescuer")
    join(coordinator, rescuer)  # one could carry on, but there is nothing left to do
    text, usage, raw = await relay(fulfilment)
    assert text == "Hello world"
    assert b'"error"' not in raw
    assert raw.endswith(b"data: [DONE]\n\n")
    assert usage is not None
    assert usage["completion_tokens"] == 4
    assert rescuer.link.jobs == []
    await coordinator.request_path.drain()
    assert receipts(coordinator) == []  # the worker signed nothing and is paid nothing
    assert 10**9 - coordinator.accounts.balance("alice") > 0  # the client pays what it got


async def test_max_tokens_beyond_the_context_is_a_400_not_a_credit_refusal(
    coordinator: Coordinator,
) -> None:
    """A completion bound no worker's context can hold is the request's fault: a 400 naming
    max_tokens, before any credit is checked or held (a poor client must not be told to pay)."""
    worker = PlayedWorker("a")
    join(coordinator, worker)
    principal = await client(coordinator, credit=1)  # far too little for any hold
    with pytest.raises(InvalidRequest) as info:
        await coordinator.request_path.begin(principal, chat(max_tokens=10**9))
    assert info.value.param == "max_tokens"
    assert info.value.code == "context_length_exceeded"
    assert worker.link.jobs == []
    with pytest.raises(InsufficientCredit):  # a bound that fits is judged on credit as before
        await coordinator.request_path.begin(principal, chat(max_tokens=16))


async def test_a_continued_requests_receipt_lists_every_segment_and_adds_up_to_its_charge(
    coordinator: Coordinator,
) -> None:
    """The first worker died after 2 tokens without signing: the client paid for them, so the
    receipt document lists that segment (unsigned, its tokens and price) beside the signed
    continuation, and its segments come to exactly what the client was charged."""
    join(coordinator, PlayedWorker("dying", Script(fail_after=2)))
    principal = await client(coordinator)
    fulfilment = await coordinator.request_path.begin(principal, chat())
    join(coordinator, PlayedWorker("rescuer"))
    text, _usage, _raw = await relay(fulfilment)
    assert text == "Hello world"
    await coordinator.request_path.drain()
    document = coordinator.settlement.document(fulfilment.request_id, principal.client)
    assert document is not None
    verified = verify_document(msgspec.json.decode(msgspec.json.encode(document)))
    [killed] = document["unsigned_segments"]
    assert (killed["segment"], killed["billed"]["completion_tokens"]) == (0, 2)
    assert [e["signed"] for e in verified.statement["segments"]] == [False, True]
    paid = 10**9 - coordinator.accounts.balance("alice")
    assert verified.amount_total == paid
    assert statement_total(verified.statement) == paid


async def test_no_client_pays_for_more_tokens_than_it_asked_for(coordinator: Coordinator) -> None:
    """A worker that generates (and signs for) more than max_tokens is billed the bound, and
    an excess beyond tokenizer noise is held against it."""
    overrunner = PlayedWorker("overrunner", Script(overrun=True))
    join(coordinator, overrunner)
    principal = await client(coordinator)
    fulfilment = await coordinator.request_path.begin(principal, chat(max_tokens=1))
    _text, usage, _raw = await relay(fulfilment)
    assert usage is not None
    assert usage["completion_tokens"] == 1
    await coordinator.request_path.drain()
    [stored] = receipts(coordinator)
    assert stored.completion_tokens == 4  # what it signed
    assert stored.billed_completion_tokens == 1  # what the client paid for
    events = coordinator.trust.local_standing(overrunner.node_id)
    assert events.bad > 0  # the over-claim is on its record


async def test_a_continuation_is_billed_within_what_remained_of_the_bound(
    coordinator: Coordinator,
) -> None:
    """max_tokens bounds the request, not each segment: after 2 tokens from a worker that
    died, a continuing worker that over-runs is billed only the 2 that remained of 4."""
    join(coordinator, PlayedWorker("dying", Script(fail_after=2)))
    principal = await client(coordinator)
    fulfilment = await coordinator.request_path.begin(principal, chat(max_tokens=4))
    join(coordinator, PlayedWorker("overrunner", Script(overrun=True, tokens=["a"] * 12)))
    _text, usage, _raw = await relay(fulfilment)
    assert usage is not None
    assert usage["completion_tokens"] == 4  # 2 delivered before the death + 2 of the rest
    await coordinator.request_path.drain()
    [stored] = receipts(coordinator)
    assert stored.billed_completion_tokens == 2


async def test_answers_wait_for_the_ledger_writer_once_its_backlog_is_full(
    tmp_path: Path,
) -> None:
    """With the writer stuck, at most `max_unwritten_settlements` answered requests wait for
    their charge to be committed; the next answer waits for the writer (back-pressure) instead
    of piling up unwritten and unbilled, and ends, billed, once the writer moves again."""
    settings = CoordinatorSettings(
        data_dir=tmp_path, spot_check_rate=0.0, spot_check_probation_rate=0.0,
        max_unwritten_settlements=2,
    )  # fmt: skip
    coordinator = Coordinator(settings)
    worker = PlayedWorker("a")
    join(coordinator, worker)
    principal = await client(coordinator)
    gate = threading.Event()
    stuck = asyncio.ensure_future(coordinator.writer.submit(lambda _conn: gate.wait(30)))
    try:
        for _ in range(2):  # their charges wait behind the stuck unit
            text, _usage, _raw = await relay(
                await coordinator.request_path.begin(principal, chat())
            )
            assert text == "Hello world"
            await asyncio.sleep(0.01)  # its commit starts
        third = asyncio.ensure_future(
            relay(await coordinator.request_path.begin(principal, chat()))
        )
        await asyncio.sleep(0.3)
        assert not third.done()  # the backlog is full: its [DONE] waits for the writer
        gate.set()
        text, _usage, raw = await asyncio.wait_for(third, 10)
        assert text == "Hello world"
        assert raw.endswith(b"data: [DONE]\n\n")
        await stuck
        await coordinator.request_path.drain()
        assert len(receipts(coordinator)) == 3
    finally:
        gate.set()
        await coordinator.request_path.drain()
        coordinator.writer.close()
        coordinator.db.dispose()
