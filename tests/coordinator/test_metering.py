"""Metering by the network: the coordinator recounts tokens with the model's own (operator-
pinned) tokenizer and bills min(claim, recount). An honest engine's counts recount exactly;
an engine that over-reports is billed the recount and the worker gets a mismatch on record."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from billing.ledger import client_account
from billing.pricing import Price, charge_for
from coordinator.services.metering import fingerprint
from tests.fleet import Fleet, Member

pytestmark = pytest.mark.engine
MODEL = "tiny-solo"
SOLO_PRICE_PAIR = (100_000, 200_000)
SOLO_PRICE = Price(*SOLO_PRICE_PAIR)
CHEAT_MODEL = "tiny-x"
FEE_BPS = 500
MESSAGES: list[Any] = [{"role": "user", "content": "Count the waves on the shore."}]
PROMPT = "The tide came in and"
GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 12, "extra_body": {"ignore_eos": True}}


@pytest.fixture
def solo(fleet: Fleet) -> Iterator[Member]:
    member = fleet.members["solo"]
    fleet.ready(MODEL, 1)
    try:
        yield member
    finally:
        member.proxy.reset()


def receipt_of(fleet: Fleet, key: str, request_id: str) -> dict[str, Any]:
    response = httpx.get(
        f"{fleet.coordinator.base_url}/receipts/{request_id}",
        headers={"Authorization": f"Bearer {key}"},
    )
    response.raise_for_status()
    return dict(response.json())


def mismatches(fleet: Fleet) -> list[dict[str, Any]]:
    with fleet.coordinator.admin() as admin:
        return list(admin.get("/metering/mismatches").json()["mismatches"])


def run(client: openai.OpenAI, kind: str, stream: bool, model: str = MODEL) -> tuple[str, Any]:
    """(request id, usage) of one greedy request."""
    if kind == "chat":
        api: Any = client.chat.completions.with_raw_response
        raw = api.create(model=model, messages=MESSAGES, stream=stream, **_stream_opts(stream),
                         **GREEDY)  # fmt: skip
    else:
        api = client.completions.with_raw_response
        raw = api.create(model=model, prompt=PROMPT, stream=stream, **_stream_opts(stream),
                         **GREEDY)  # fmt: skip
    request_id = raw.headers["x-agora-request-id"]
    parsed = raw.parse()
    if not stream:
        return request_id, parsed.usage
    usage = None
    for chunk in parsed:
        usage = chunk.usage or usage
    return request_id, usage


def _stream_opts(stream: bool) -> dict[str, Any]:
    return {"stream_options": {"include_usage": True}} if stream else {}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("kind", ["chat", "text"])
def test_honest_counts_recount_exactly_and_nothing_is_recorded(
    fleet: Fleet, solo: Member, kind: str, stream: bool
) -> None:
    _name, key = fleet.client()
    with openai.OpenAI(base_url=fleet.coordinator.base_url, api_key=key) as client:
        request_id, usage = run(client, kind, stream)
    document = receipt_of(fleet, key, request_id)
    claimed = document["receipt"]
    assert document["billed"] == {
        "prompt_tokens": claimed["prompt_tokens"],
        "completion_tokens": claimed["completion_tokens"],
    }  # the recount agreed with the engine: min(claim, recount) is the claim
    assert claimed["completion_tokens"] == 12
    assert usage.prompt_tokens == claimed["prompt_tokens"]
    assert request_id not in {m["request_id"] for m in mismatches(fleet)}


@pytest.mark.parametrize("kind", ["chat", "text"])
def test_an_inflating_engine_is_billed_the_recount_recorded_and_quarantined(
    fleet: Fleet, solo: Member, kind: str
) -> None:
    name, key = fleet.client()
    with openai.OpenAI(base_url=fleet.coordinator.base_url, api_key=key) as client:
        _honest_id, honest = run(client, kind, stream=False)
    inflater = fleet.add(f"inflater-{kind}", CHEAT_MODEL, *SOLO_PRICE_PAIR)
    inflater.proxy.inflate_usage = 7  # the engine (so the worker's signed receipt) over-reports
    fleet.wait(CHEAT_MODEL, 1)
    before = fleet.coordinator.balances()[client_account(name)]
    with openai.OpenAI(base_url=fleet.coordinator.base_url, api_key=key) as client:
        request_id, usage = run(client, kind, stream=True, model=CHEAT_MODEL)
    paid = before - fleet.coordinator.balances()[client_account(name)]
    document = receipt_of(fleet, key, request_id)
    claimed = document["receipt"]
    assert (claimed["prompt_tokens"], claimed["completion_tokens"]) == (
        honest.prompt_tokens + 7, honest.completion_tokens + 7,
    )  # fmt: skip
    true_counts = {"prompt_tokens": honest.prompt_tokens, "completion_tokens": 12}
    assert document["billed"] == true_counts
    assert (usage.prompt_tokens, usage.completion_tokens) == (honest.prompt_tokens, 12)
    assert paid == charge_for(SOLO_PRICE, honest.prompt_tokens, 12, FEE_BPS).total
    assert document["amount_total"] == paid
    recorded = [m for m in mismatches(fleet) if m["request_id"] == request_id]
    assert len(recorded) == 1
    assert recorded[0]["worker_id"] == inflater.node_id
    assert recorded[0]["claimed_completion_tokens"] == 19
    assert recorded[0]["recounted_completion_tokens"] == 12
    assert recorded[0]["recounted_prompt_tokens"] == honest.prompt_tokens
    deadline = time.monotonic() + 10  # an over-claim sinks its reputation at once
    while not (view := fleet.worker_view(inflater.node_id) or {}).get("quarantined"):
        assert time.monotonic() < deadline, view
        time.sleep(0.05)
    assert view["reputation"]["score"] < 0.2


def test_models_list_the_pinned_tokenizer_the_network_recounts_with(
    fleet: Fleet, tiny_model: Path
) -> None:
    _name, key = fleet.client()
    with openai.OpenAI(base_url=fleet.coordinator.base_url, api_key=key) as client:
        models = {m.id: m.model_extra or {} for m in client.models.list()}
    assert models[MODEL]["tokenizer_sha256"] == fingerprint(tiny_model)
    assert len(fingerprint(tiny_model)) == 64


# merge-prone text: digits, runs of '#' and spaces, emoji and other byte-fallback characters,
# punctuation runs; re-encoding such text is not the count of tokens the engine generated
VARIED_TOKENS = 8  # per output: enough for merges across tokens, cheap on a CPU engine
VARIED_PROMPTS = (
    "load 190",
    "#####",
    "     ",
    "🙂🙂🙂",
    "x=1,2,3;",
    "1234567890",
    "ääää ßß",
    "中文字符",
    "....!!!!",
    "\t\t\n\n",
    "a-b_c/d\\e",
    "$$ 3.14159 $$",
    "<<<>>>",
    "ok ok ok",
    "🎉 party",
    "== == ==",
)


def _choices(i: int) -> int:
    """Outputs per request: a sampled request asks for 4 (each its own draw), a greedy one
    for 1 (greedy outputs of one prompt are all the same)."""
    return 1 if i % 2 == 0 else 4


def _varied_request(client: openai.OpenAI, prompt: str, i: int) -> str:
    """One of four shapes, greedy or sampled; the request id."""
    sampling = {"temperature": (0.0, 1.0)[i % 2], "seed": i, "max_tokens": VARIED_TOKENS,
                "n": _choices(i), "extra_body": {"ignore_eos": True}}  # fmt: skip
    chat = i % 4 in (0, 1)
    stream = i % 8 >= 4
    options = {"stream": stream, **_stream_opts(stream), **sampling}
    if chat:
        messages: Any = [{"role": "user", "content": prompt}]
        raw: Any = client.chat.completions.with_raw_response.create(
            model="tiny", messages=messages, **options
        )
    else:
        raw = client.completions.with_raw_response.create(model="tiny", prompt=prompt, **options)
    parsed = raw.parse()
    if stream:
        for _chunk in parsed:
            pass
    return str(raw.headers["x-agora-request-id"])


def test_varied_honest_outputs_are_billed_as_generated_and_never_accused(fleet: Fleet) -> None:
    """1,040 greedy and sampled outputs of the real engine (416 requests), chat and text,
    streamed or not, from merge-prone prompts: every one billed exactly the tokens the engine
    generated (its signed claim), no mismatch recorded, no worker's reputation touched by
    over-claims."""
    from concurrent.futures import ThreadPoolExecutor

    fleet.ready("tiny", 3)
    _name, key = fleet.client()
    jobs = [(p, i) for i in range(26) for p in VARIED_PROMPTS]
    assert sum(_choices(i) for _p, i in jobs) >= 1_000
    with (
        openai.OpenAI(base_url=fleet.coordinator.base_url, api_key=key, max_retries=0) as client,
        ThreadPoolExecutor(8) as pool,
    ):
        request_ids = list(pool.map(lambda job: _varied_request(client, *job), jobs))
    recorded = {m["request_id"] for m in mismatches(fleet)}
    assert recorded.isdisjoint(request_ids)
    for (_prompt, i), request_id in zip(jobs, request_ids, strict=True):
        document = receipt_of(fleet, key, request_id)
        claimed = document["receipt"]
        assert claimed["completion_tokens"] == VARIED_TOKENS * _choices(i), request_id
        assert document["billed"] == {
            "prompt_tokens": claimed["prompt_tokens"],
            "completion_tokens": claimed["completion_tokens"],
        }, request_id
