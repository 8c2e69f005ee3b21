"""Mid-stream continuation: the worker serving a stream is killed (or stalls) at a random point
and the client's stream goes on from another worker with exactly the text an uninterrupted
greedy run gives, billed once for the tokens delivered."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest

from agora.receipts import statement_total
from billing.ledger import client_account
from billing.pricing import Price, charge_for
from protocol.receipt_document import verify_document
from tests.coordinator.conftest import C_PRICE, C_WORKERS
from tests.coordinator.test_observability import scrape
from tests.fleet import Fleet

pytestmark = pytest.mark.engine
MODEL = "tiny-c"
MAX_TOKENS = 40
KILLS = 20
# prompts whose greedy path has no near-tie on the tiny model (see `clear_margins`): a fresh
# prefill and a step of decoding differ in the last float bits, which can flip a near-tie
CHAT: list[Any] = [{"role": "user", "content": "Tell me a story."}]
PROMPT = "The lighthouse keeper opened the door and"
MIN_MARGIN = 1e-3  # logprob gap between the greedy token and the runner-up, at every step
GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": MAX_TOKENS}
EXTRA = {"ignore_eos": True}  # the random tiny model would otherwise stop at any point


@dataclass
class Streamed:
    request_id: str
    worker: str
    text: str
    usage: Any
    killed: str | None = None


@pytest.fixture
def paced(fleet: Fleet) -> Iterator[Fleet]:
    """The tiny-c engines send one token per 20 ms, so a kill lands mid-generation."""
    for name in C_WORKERS:
        fleet.members[name].proxy.event_delay_s = 0.02
    try:
        yield fleet
    finally:
        for name in C_WORKERS:
            fleet.members[name].proxy.reset()


def stream(
    client: openai.OpenAI,
    kind: str,
    fleet: Fleet | None = None,
    kill_at: int | None = None,
    provider: dict[str, Any] | None = None,
) -> Streamed:
    """Stream one greedy request; with `kill_at`, SIGKILL the serving worker after that many
    tokens reached the client (counted by their ids: a chunk may carry several tokens)."""
    extra: dict[str, Any] = {**EXTRA, "return_token_ids": True}
    if provider:
        extra["provider"] = provider
    options: dict[str, Any] = {
        **GREEDY, "stream": True, "stream_options": {"include_usage": True}, "extra_body": extra,
    }  # fmt: skip
    if kind == "chat":
        api: Any = client.chat.completions.with_streaming_response
        manager = api.create(model=MODEL, messages=CHAT, **options)
    else:
        api = client.completions.with_streaming_response
        manager = api.create(model=MODEL, prompt=PROMPT, **options)
    with manager as response:
        worker = response.headers["x-agora-worker"]
        request_id = response.headers["x-agora-request-id"]
        text, usage, tokens, killed = "", None, 0, None
        for chunk in response.parse():
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                piece = choice.delta.content if kind == "chat" else choice.text
                text += piece or ""
                tokens += len(getattr(choice, "token_ids", None) or ())
            if fleet is not None and killed is None and kill_at is not None and tokens >= kill_at:
                killed = fleet.name_of(worker)
                fleet.kill(killed)
    return Streamed(request_id, worker, text, usage, killed)


def balance(fleet: Fleet, client: str) -> int:
    return fleet.coordinator.balances().get(client_account(client), 0)


def get(fleet: Fleet, key: str, path: str) -> dict[str, Any]:
    response = httpx.get(
        f"{fleet.coordinator.base_url}/{path}", headers={"Authorization": f"Bearer {key}"}
    )
    response.raise_for_status()
    return dict(response.json())


def clear_margins(client: openai.OpenAI) -> dict[str, float]:
    """The smallest gap between the greedy token and the runner-up along each reference path."""
    chat = client.chat.completions.create(
        model=MODEL, messages=CHAT, logprobs=True, top_logprobs=2, extra_body=EXTRA, **GREEDY
    )
    content = chat.choices[0].logprobs.content if chat.choices[0].logprobs else None
    assert content
    text = client.completions.create(
        model=MODEL, prompt=PROMPT, logprobs=2, extra_body=EXTRA, **GREEDY
    )
    tops = text.choices[0].logprobs.top_logprobs if text.choices[0].logprobs else None
    assert tops

    def gap(values: list[float]) -> float:
        first, second = sorted(values, reverse=True)[:2]
        return first - second

    return {
        "chat": min(gap([t.logprob for t in step.top_logprobs]) for step in content),
        "text": min(gap(list(step.values())) for step in tops),
    }


@pytest.fixture(scope="module")
def reference(fleet: Fleet) -> dict[str, Streamed]:
    """The uninterrupted greedy answers, chat and text, through the same market."""
    _name, key = fleet.client()
    with openai.OpenAI(base_url=fleet.coordinator.base_url, api_key=key) as client:
        margins = clear_margins(client)
        # otherwise a continuation's text could differ from the reference for numeric reasons
        # alone, and this module would test the engine's float rounding, not the gateway
        assert min(margins.values()) >= MIN_MARGIN, f"pick other prompts: {margins}"
        return {kind: stream(client, kind) for kind in ("chat", "text")}


def test_reference_runs_are_full_length_and_repeatable(
    fleet: Fleet, reference: dict[str, Streamed]
) -> None:
    _name, key = fleet.client()
    with openai.OpenAI(base_url=fleet.coordinator.base_url, api_key=key) as client:
        for kind, ref in reference.items():
            assert ref.usage.completion_tokens == MAX_TOKENS
            assert ref.text
            again = stream(client, kind)
            assert again.text == ref.text, kind  # greedy is deterministic on this engine


def test_killed_worker_mid_stream_the_client_gets_the_uninterrupted_text_billed_once(
    paced: Fleet, reference: dict[str, Streamed]
) -> None:
    """A kill lands mid-generation as a rule; on a loaded machine the client can read so far
    behind the worker that the generation had ended (receipt unsent) when the kill came: then
    nothing is continued (one more token would overrun max_tokens), the answer stands and the
    client pays for it once. Most kills must land mid-generation and be continued."""
    fleet = paced
    rng = random.Random(20261123)
    price = Price(*C_PRICE)
    continued = 'agora_continuations_total{model="tiny-c",outcome="continued"}'
    counted = scrape(fleet).get(continued, 0)
    continuations = 0
    for i in range(KILLS):
        kind = ("chat", "text")[i % 2]
        kill_at = rng.randint(1, MAX_TOKENS - 8)
        fleet.ready(MODEL, 2)  # one to serve, one to carry on
        name, key = fleet.client()
        before = balance(fleet, name)
        with openai.OpenAI(base_url=fleet.coordinator.base_url, api_key=key) as client:
            got = stream(client, kind, fleet, kill_at)
        assert got.killed is not None
        fleet.restart(got.killed)  # back in the pool while the next requests run
        ref = reference[kind]
        where = f"kill {i} ({kind}) after {kill_at} tokens"
        assert got.text == ref.text, where  # no token lost or duplicated
        assert got.usage.completion_tokens == MAX_TOKENS, where
        assert got.usage.prompt_tokens == ref.usage.prompt_tokens, where
        route = get(fleet, key, f"routing/{got.request_id}")
        workers = [a["worker"] for a in route["attempts"]]
        assert workers[0] == got.worker, where
        paid = before - balance(fleet, name)
        expected = charge_for(price, ref.usage.prompt_tokens, MAX_TOKENS, 500).total
        assert paid == expected, where  # once, for exactly the delivered tokens
        if len(workers) == 1:  # the generation had ended before the kill: nothing to carry on
            continue
        continuations += 1
        assert len(set(workers)) >= 2, where
        assert route["attempts"][-1]["outcome"] == "ok"
        assert route["attempts"][0]["outcome"] != "ok", where  # the killed one failed
        assert route["attempts"][-1]["continuation"]
        receipt = get(fleet, key, f"receipts/{got.request_id}")
        assert receipt["amount_total"] == paid
        signed = [receipt["receipt"], *(c["receipt"] for c in receipt["continuations"])]
        assert {r["worker_id"] for r in signed} == {route["attempts"][-1]["worker"]}, where
        segment = route["attempts"][-1]["segment"]  # 1, or more if a candidate failed first
        assert segment >= 1, where
        assert signed[0]["request_id"] == f"{got.request_id}~{segment}"  # the finishing job
        # each receipt covers only its own worker's tokens: the killed worker's were delivered
        # (and billed to the client above) but it signed nothing and is paid nothing
        assert 1 <= signed[0]["completion_tokens"] <= MAX_TOKENS - kill_at, where
        # the document lists the killed segment too (unsigned, charged): it adds up to the pay
        verified = verify_document(receipt)
        assert statement_total(verified.statement) == paid, where
        [killed] = receipt["unsigned_segments"]
        assert killed["worker_id"] == workers[0], where
        delivered = killed["billed"]["completion_tokens"]
        assert kill_at <= delivered < MAX_TOKENS, where
        assert delivered + sum(r["completion_tokens"] for r in signed) == MAX_TOKENS, where
    assert continuations >= KILLS * 3 // 4
    assert scrape(fleet)[continued] >= counted + continuations
    fleet.ready(MODEL, len(C_WORKERS))


def test_stalled_worker_mid_stream_is_replaced(
    paced: Fleet, reference: dict[str, Streamed]
) -> None:
    fleet = paced
    fleet.ready(MODEL, 3)
    name, key = fleet.client()
    staller = fleet.members["c1"]
    staller.proxy.stall_after_events = 6  # then silent, with the connection open
    before = balance(fleet, name)
    with openai.OpenAI(base_url=fleet.coordinator.base_url, api_key=key) as client:
        got = stream(client, "chat", provider={"order": [staller.node_id]})
    ref = reference["chat"]
    assert got.worker == staller.node_id
    assert got.text == ref.text
    route = get(fleet, key, f"routing/{got.request_id}")
    assert next(a["worker"] for a in route["attempts"]) == staller.node_id
    assert len(route["attempts"]) == 2
    assert route["attempts"][1]["continuation"]
    paid = before - balance(fleet, name)
    assert paid == charge_for(Price(*C_PRICE), ref.usage.prompt_tokens, MAX_TOKENS, 500).total


def test_a_stream_that_cannot_be_continued_ends_with_an_sse_error_and_bills_what_was_sent(
    paced: Fleet,
) -> None:
    fleet = paced
    fleet.ready(MODEL, 3)
    name, key = fleet.client()
    cutter = fleet.members["c2"]
    cutter.proxy.cut_after_events = 5  # the engine connection drops after 5 events
    before = balance(fleet, name)
    body = {
        "model": MODEL, "prompt": PROMPT, "stream": True, **GREEDY, **EXTRA,
        "logprobs": 1,  # per-token logprobs cannot be carried over to another worker
        "return_token_ids": True,
        "provider": {"order": [cutter.node_id]},
    }  # fmt: skip
    events: list[str] = []
    with httpx.stream(
        "POST", f"{fleet.coordinator.base_url}/completions", json=body,
        headers={"Authorization": f"Bearer {key}"}, timeout=60,
    ) as response:  # fmt: skip
        assert response.status_code == 200
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["message"]
    assert error["type"]
    delivered = [json.loads(e) for e in events[:-2]]
    tokens = sum(len(c["choices"][0]["logprobs"]["tokens"]) for c in delivered if c["choices"])
    assert 1 <= tokens < MAX_TOKENS
    request_id = response.headers["x-agora-request-id"]
    assert len(get(fleet, key, f"routing/{request_id}")["attempts"]) == 1
    prompt_tokens = len(
        next(c for c in delivered if c["choices"])["choices"][0]["prompt_token_ids"]
    )
    expected = charge_for(Price(*C_PRICE), prompt_tokens, tokens, 500).total
    paid = before - balance(fleet, name)
    deadline = time.monotonic() + 10
    while paid == 0 and time.monotonic() < deadline:  # billed after the stream, off its path
        time.sleep(0.05)
        paid = before - balance(fleet, name)
    assert paid == expected  # the prompt and the delivered tokens, no more
