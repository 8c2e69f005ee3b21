"""The exact response cache: what may be cached, under which key, the TTL and the byte bound
(pure), then through the request path with played workers (a hit reaches no worker, streams
the miss's chunks, is charged the operator's price with a signed receipt, never crosses API
keys). tests/test_response_cache.py runs it on a real engine."""

from __future__ import annotations

import re

import pytest

from billing.ledger import NETWORK_CACHE
from coordinator.app import Coordinator
from coordinator.errors import InsufficientCredit
from coordinator.services.request_path.cache_hit import CacheHit
from coordinator.services.request_path.fulfilment import Fulfilment
from coordinator.services.request_path.request import CompletionRequest
from coordinator.services.response_cache import (
    CachedAnswer,
    ResponseCache,
    cache_key,
    why_not_cacheable,
)
from coordinator.store import market_store
from protocol.cache_hit import verify_cache_hit
from protocol.completions import CHAT, COMPLETIONS
from protocol.errors import ProtocolError
from tests.coordinator.test_request_path import MODEL, PlayedWorker, Script, client, join, relay


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def answer(text: str = "Hello", source: str = "r1") -> CachedAnswer:
    return CachedAnswer(source, CHAT, ((text, "stop"),), 3, 1, 100)


def test_only_deterministic_replayable_requests_are_cacheable() -> None:
    base = {"model": "m", "messages": []}
    greedy = {**base, "temperature": 0}
    assert why_not_cacheable(base, 1, False) is not None  # default temperature samples
    assert why_not_cacheable(greedy, 1, False) is None
    assert why_not_cacheable({**base, "temperature": 0.7, "seed": 7}, 1, False) is None
    assert why_not_cacheable({**base, "temperature": 0.7, "seed": True}, 1, False) is not None
    assert why_not_cacheable(greedy, 2, False) is not None  # n=2, or a batch of two prompts
    assert why_not_cacheable({**greedy, "tools": [{}]}, 1, False) is not None
    assert why_not_cacheable({**greedy, "logprobs": True}, 1, False) is not None
    assert why_not_cacheable({**greedy, "logprobs": 0}, 1, False) is not None  # still asks
    assert why_not_cacheable({**greedy, "logprobs": False}, 1, False) is None
    assert why_not_cacheable(greedy, 1, True) is not None  # token ids


def test_a_completions_batch_is_not_cacheable() -> None:
    body = {"model": MODEL, "prompt": ["a", "b"], "temperature": 0}
    request = CompletionRequest(COMPLETIONS, MODEL, body, False, True, 4, cache=True)
    assert request.choices == 2
    assert why_not_cacheable(body, request.choices, False) == "more than one choice"


def test_the_key_ignores_delivery_and_separates_keys_versions_and_bodies() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
    key = cache_key("key-1", "m+", CHAT, body)
    streamed = {**body, "stream": True, "stream_options": {"include_usage": True}, "user": "u"}
    assert cache_key("key-1", "m+", CHAT, streamed) == key
    assert cache_key("key-1", "m+", CHAT, dict(reversed(list(body.items())))) == key
    assert cache_key("key-2", "m+", CHAT, body) != key  # another API key
    assert cache_key("key-1", "m-v2+", CHAT, body) != key  # another model version
    assert cache_key("key-1", "m+", CHAT, {**body, "max_tokens": 5}) != key


def test_entries_expire_after_the_ttl() -> None:
    clock = Clock()
    cache = ResponseCache(max_bytes=10**6, ttl_s=10, clock=clock)
    cache.put("k", answer())
    clock.now = 9.9
    assert cache.get("k") is not None
    clock.now = 10.1
    assert cache.get("k") is None
    assert len(cache) == 0
    assert cache.bytes == 0


def test_the_byte_bound_evicts_the_least_recently_used() -> None:
    size = answer().size
    cache = ResponseCache(max_bytes=2 * size, ttl_s=60)
    cache.put("a", answer())
    cache.put("b", answer())
    assert cache.get("a") is not None  # a is now the most recently used
    cache.put("c", answer())
    assert cache.get("b") is None
    assert cache.get("a") is not None
    assert cache.get("c") is not None
    assert cache.bytes == 2 * size
    cache.put("a", answer("World"))  # the same key again (same size): replaced, not added
    assert len(cache) == 2
    assert cache.bytes == 2 * size
    assert cache.get("a") == answer("World")
    cache.put("huge", answer("x" * 4 * size))  # larger than the whole bound: not kept
    assert cache.get("huge") is None
    assert cache.get("a") is not None


def test_expired_entries_leave_at_the_next_put_and_free_their_bytes() -> None:
    clock = Clock()
    cache = ResponseCache(max_bytes=10**6, ttl_s=10, clock=clock)
    cache.put("old", answer())
    clock.now = 5
    cache.put("newer", answer())
    clock.now = 12
    cache.put("newest", answer())  # "old" expired: gone without a lookup
    assert len(cache) == 2
    assert cache.bytes == 2 * answer().size


# ------------------------------------------------------------------ through the request path
def cached_chat(stream: bool, content: str = "hi") -> CompletionRequest:
    payload = {"model": MODEL, "messages": [{"role": "user", "content": content}],
               "stream": stream, "temperature": 0}  # fmt: skip
    return CompletionRequest(CHAT, MODEL, payload, stream, True, 16, cache=True)


async def served(coordinator: Coordinator, principal: object, request: CompletionRequest) -> (
    tuple[Fulfilment | CacheHit, bytes]
):  # fmt: skip
    answer = await coordinator.request_path.serve(principal, request)  # type: ignore[arg-type]
    if isinstance(answer, CacheHit):
        raw = b"".join([part async for part, _last in answer.stream()]) if request.stream else b""
    else:
        raw = (await relay(answer))[2] if request.stream else b""
        if not request.stream:
            await answer.whole()
    await coordinator.settlement.quiesce()
    await coordinator.request_path.drain()
    return answer, raw


def _without_ids(raw: bytes) -> bytes:
    raw = re.sub(rb'"id":"[^"]+"', b'"id":""', raw)
    return re.sub(rb'"created":\d+', b'"created":0', raw)


async def test_a_hit_replays_the_miss_without_a_worker(coordinator: Coordinator) -> None:
    worker = PlayedWorker("w")
    join(coordinator, worker)
    principal = await client(coordinator)
    miss, miss_raw = await served(coordinator, principal, cached_chat(stream=True))
    assert isinstance(miss, Fulfilment)
    assert miss.cache_status == "miss"
    hit, hit_raw = await served(coordinator, principal, cached_chat(stream=True))
    assert isinstance(hit, CacheHit)
    assert len(worker.link.jobs) == 1  # the hit reached no worker
    assert hit.source == miss.request_id
    # the same chunks as the miss (its text, finish and usage), but its own id; the usage
    # says the whole prompt was cached
    miss_body = _without_ids(miss_raw).replace(b'"cached_tokens":0', b'"cached_tokens":3')
    assert _without_ids(hit_raw) == miss_body
    whole, _raw = await served(coordinator, principal, cached_chat(stream=False))
    assert isinstance(whole, CacheHit)
    result = await whole.whole()
    assert result["choices"][0]["message"]["content"] == "Hello world"
    assert result["id"] == whole.response_id != miss.response_id
    assert len(worker.link.jobs) == 1


async def test_answers_never_cross_api_keys(coordinator: Coordinator) -> None:
    worker = PlayedWorker("w")
    join(coordinator, worker)
    alice = await client(coordinator)
    await served(coordinator, alice, cached_chat(stream=False))
    secret = coordinator.accounts.create_client("bob", credit=10**9)
    bob = await coordinator.accounts.authenticate(f"Bearer {secret}")
    other, _raw = await served(coordinator, bob, cached_chat(stream=False))
    assert isinstance(other, Fulfilment)  # a miss: bob's key never sees alice's answers
    assert len(worker.link.jobs) == 2
    again, _raw = await served(coordinator, bob, cached_chat(stream=False))
    assert isinstance(again, CacheHit)


async def test_a_request_that_did_not_opt_in_or_samples_always_runs(
    coordinator: Coordinator,
) -> None:
    worker = PlayedWorker("w")
    join(coordinator, worker)
    principal = await client(coordinator)
    await served(coordinator, principal, cached_chat(stream=False))
    plain = cached_chat(stream=False)
    for request in (
        CompletionRequest(CHAT, MODEL, plain.body, False, True, 16),  # no opt-in
        CompletionRequest(
            CHAT, MODEL, {**plain.body, "temperature": 0.8}, False, True, 16, cache=True
        ),
    ):
        answer, _raw = await served(coordinator, principal, request)
        assert isinstance(answer, Fulfilment)
    assert answer.cache_status == "bypass"  # asked for, but it samples
    assert len(worker.link.jobs) == 3


async def test_a_hit_is_charged_the_operators_price_with_a_signed_receipt(
    coordinator: Coordinator,
) -> None:
    assert coordinator.request_path.answers is not None
    coordinator.request_path.answers._price_bps = 2_500  # a quarter of the original cost
    worker = PlayedWorker("w")
    join(coordinator, worker)
    principal = await client(coordinator)
    miss, _raw = await served(coordinator, principal, cached_chat(stream=False))
    assert isinstance(miss, Fulfilment)
    assert miss.settled is not None
    original = miss.settled.charge.total
    before = coordinator.accounts.balance("alice")
    hit, _raw = await served(coordinator, principal, cached_chat(stream=False))
    assert isinstance(hit, CacheHit)
    assert hit.charged == -(-original // 4) > 0
    assert before - coordinator.accounts.balance("alice") == hit.charged
    assert coordinator.accounts.balances()[NETWORK_CACHE] == hit.charged  # no provider's
    with coordinator.db.connect() as conn:  # the dashboard's revenue counts what hits cost
        assert market_store.money(conn)["revenue"] == original + hit.charged
    document = coordinator.request_path.answers.document(hit.request_id, "alice")
    assert document is not None
    statement = verify_cache_hit(document)
    assert statement["amount_total"] == hit.charged
    assert statement["source_request_id"] == miss.request_id
    document["amount_total"] = 0
    with pytest.raises(ProtocolError):
        verify_cache_hit(document)  # a shown field that is not the signed one
    assert coordinator.request_path.answers.document(hit.request_id, "mallory") is None


async def test_a_hit_the_client_cannot_pay_beside_its_holds_is_refused(
    coordinator: Coordinator,
) -> None:
    answers = coordinator.request_path.answers
    assert answers is not None
    answers._price_bps = 10_000  # a hit costs what the answer first cost
    join(coordinator, PlayedWorker("w"))
    principal = await client(coordinator)
    await served(coordinator, principal, cached_chat(stream=False))
    balance = coordinator.accounts.balance("alice")
    held = await coordinator.request_path.reservations.hold("alice", balance - 1)  # in flight
    with pytest.raises(InsufficientCredit):
        await served(coordinator, principal, cached_chat(stream=False))
    assert coordinator.accounts.balance("alice") == balance  # nothing posted
    held.release()
    hit, _raw = await served(coordinator, principal, cached_chat(stream=False))
    assert isinstance(hit, CacheHit)
    assert coordinator.accounts.balance("alice") == balance - hit.charged


async def test_an_answer_without_a_checked_receipt_is_not_kept(coordinator: Coordinator) -> None:
    worker = PlayedWorker("unsigned", Script(no_receipt=True))
    join(coordinator, worker)
    principal = await client(coordinator)
    for _ in range(2):
        answer, _raw = await served(coordinator, principal, cached_chat(stream=False))
        assert isinstance(answer, Fulfilment)
    assert len(worker.link.jobs) == 2


async def test_shared_answers_do_not_show_another_clients_request_id(
    coordinator: Coordinator,
) -> None:
    answers = coordinator.request_path.answers
    assert answers is not None
    answers._shared = True
    join(coordinator, PlayedWorker("w"))
    alice = await client(coordinator)
    miss, _raw = await served(coordinator, alice, cached_chat(stream=False))
    bob_key = coordinator.accounts.create_client("bob", credit=10**9)
    bob = await coordinator.accounts.authenticate(f"Bearer {bob_key}")
    hit, _raw = await served(coordinator, bob, cached_chat(stream=False))
    assert isinstance(hit, CacheHit)  # shared: bob gets alice's answer …
    assert miss.request_id not in hit.source  # … but not her request id
    document = answers.document(hit.request_id, "bob")
    assert document is not None
    assert miss.request_id not in str(document)
