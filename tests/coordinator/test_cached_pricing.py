"""Cached-prompt pricing through the request path (in-process workers that sign real
receipts; tests/test_cached_pricing.py runs it on a real engine): the engine's cached-token
count reaches the client's usage, the receipt and the bill at the worker's cached price, and a
worker that claims more cached tokens only lowers its own pay."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from agora.receipts import statement_total
from billing.ledger import provider_account
from coordinator.app import Coordinator
from coordinator.services.request_path.fulfilment import Fulfilment
from protocol.advert import ModelOffer
from protocol.errors import MalformedMessage
from protocol.proto import session_pb2 as pb
from protocol.receipt_document import verify_document
from tests.coordinator.test_request_path import (
    PRICE,
    PROMPT_IDS,
    PlayedWorker,
    Script,
    chat,
    client,
    join,
    relay,
)

CACHED_PRICE = 250_000  # a quarter of the prompt price
FEE_BPS = 500  # the coordinator's default network fee


def _ceil(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def expected_provider_pay(prompt: int, cached: int, completion: int) -> int:
    exact = (prompt - cached) * PRICE[0] + cached * CACHED_PRICE + completion * PRICE[1]
    return _ceil(exact, 1_000_000)


@pytest.mark.parametrize("stream", [True, False])
async def test_cached_tokens_reach_usage_receipt_and_bill_at_the_cached_price(
    coordinator: Coordinator, stream: bool
) -> None:
    worker = PlayedWorker("cache", Script(cached=2), cached_price=CACHED_PRICE)
    join(coordinator, worker)
    principal = await client(coordinator)
    fulfilment = await coordinator.request_path.begin(principal, chat(stream=stream))
    if stream:
        _text, usage, _raw = await relay(fulfilment)
    else:
        usage = (await fulfilment.whole())["usage"]
    assert usage is not None
    assert usage["prompt_tokens_details"] == {"cached_tokens": 2}
    assert usage["prompt_tokens"] == len(PROMPT_IDS)
    await coordinator.settlement.quiesce()
    await coordinator.request_path.drain()

    pay = expected_provider_pay(len(PROMPT_IDS), 2, 4)
    assert pay < expected_provider_pay(len(PROMPT_IDS), 0, 4)  # the cache hit is cheaper
    total = pay + _ceil(pay * FEE_BPS, 10_000)
    assert 10**9 - coordinator.accounts.balance("alice") == total
    assert coordinator.accounts.balances().get(provider_account(worker.node_id), 0) == pay

    document = coordinator.settlement.document(fulfilment.request_id, "alice")
    assert document is not None
    assert document["receipt"]["cached_prompt_tokens"] == 2
    assert document["receipt"]["price_cached_prompt_per_mtok"] == CACHED_PRICE
    [segment] = document["charge"]["segments"]
    assert segment["billed"]["cached_prompt_tokens"] == 2
    verified = verify_document(document)  # what `agora receipt verify` checks offline
    assert statement_total(verified.statement) == verified.amount_total == total


async def test_claiming_more_cached_tokens_only_lowers_the_workers_pay(
    coordinator: Coordinator,
) -> None:
    """The same job claimed with 0, 1, 2 and all 3 prompt tokens cached: each claim pays the
    worker less (the cached price is at most the prompt price), so over-reporting never pays."""
    pays = []
    for cached in range(len(PROMPT_IDS) + 1):
        worker = PlayedWorker(f"w{cached}", Script(cached=cached), cached_price=CACHED_PRICE)
        join(coordinator, worker)
        fulfilment = await serve_on(coordinator, worker)
        assert fulfilment.settled is not None
        pays.append(coordinator.accounts.balances().get(provider_account(worker.node_id), 0))
        conn = coordinator.registry.get(worker.node_id)
        assert conn is not None
        coordinator.registry.remove(conn)  # the next claim is routed to the next worker
    assert pays == [expected_provider_pay(len(PROMPT_IDS), c, 4) for c in range(4)]
    assert pays == sorted(pays, reverse=True)  # a bigger claim never pays more …
    assert pays[-1] < pays[0]  # … and claiming the whole prompt pays less


async def serve_on(coordinator: Coordinator, worker: PlayedWorker) -> Fulfilment:
    principal = await client(coordinator)
    request = chat(stream=True, first=worker.node_id)
    fulfilment = await coordinator.request_path.begin(principal, request)
    await relay(fulfilment)
    await coordinator.settlement.quiesce()
    await coordinator.request_path.drain()
    return fulfilment


async def test_a_receipt_claiming_other_cached_tokens_than_its_stream_is_rejected(
    coordinator: Coordinator,
) -> None:
    """The signed claim must match the usage the worker streamed: a receipt that claims cached
    tokens its stream did not show is not paid (the client pays what it was shown)."""

    class Inconsistent(PlayedWorker):
        async def _run(self, job: pb.Job) -> AsyncIterator[pb.JobEvent]:
            async for event in super()._run(job):
                if event.WhichOneof("kind") == "frames" and event.frames.HasField("usage"):
                    event.frames.usage.cached_tokens = 0  # the stream says no hits
                yield event

    worker = Inconsistent("two-faced", Script(cached=2), cached_price=CACHED_PRICE)
    join(coordinator, worker)
    await serve_on(coordinator, worker)
    assert coordinator.accounts.balances().get(provider_account(worker.node_id), 0) == 0
    full = expected_provider_pay(len(PROMPT_IDS), 0, 4)
    assert 10**9 - coordinator.accounts.balance("alice") == full + _ceil(full * FEE_BPS, 10_000)


def test_an_offer_cannot_sell_cached_tokens_above_its_prompt_price() -> None:
    with pytest.raises(MalformedMessage):
        ModelOffer("m", 1, 100, 200, price_cached_prompt_per_mtok=101)
    offer = ModelOffer("m", 1, 100, 200, price_cached_prompt_per_mtok=40,
                       adapter_price_prompt_per_mtok=30, max_loras=1)  # fmt: skip
    assert offer.cached_price() == 40
    assert offer.cached_price("ab" * 32) == 30  # never above the job's own prompt price
