"""The dashboards in a real browser (headless Chromium through Playwright) against a live
coordinator with two real workers on the real engine and real traffic: the pages show what the
JSON API says, update without a reload, the provider view shows one node only, and nobody gets
in without credentials; the coordinator is in a p2p market with one peer coordinator, whose
dashboard shows it and its workers as heard on gossip. Screenshots land in test-artifacts/
(AGORA_TEST_ARTIFACTS)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from agora.stack import (
    CoordinatorHandle,
    Process,
    WorkerSpec,
    start_coordinator,
    start_worker,
    wait_for_workers,
)
from billing.pricing import format_micro
from protocol.identity import Identity
from tests.conftest import MODEL, books_problems
from worker_node.engines.vllm import VllmEngine

pytestmark = pytest.mark.engine
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
ARTIFACTS = Path(os.environ.get("AGORA_TEST_ARTIFACTS", "test-artifacts"))
LOOPBACK = "/ip4/127.0.0.1/tcp/0"
P2P_ENV = {"AGORA_COORDINATOR_P2P_SAME_HOST": "true", "AGORA_COORDINATOR_P2P_ANNOUNCE_S": "1"}


@dataclass
class Dash:
    coordinator: CoordinatorHandle
    workers: dict[str, Process]
    nodes: dict[str, str]  # worker name -> node id
    keys: dict[str, Path]  # worker name -> key file
    clients: dict[str, str]  # client name -> api key
    peer: CoordinatorHandle  # another coordinator of the same p2p market, with no workers

    @property
    def root(self) -> str:
        return self.coordinator.base_url.removesuffix("/v1")

    def overview(self) -> dict[str, Any]:
        with self.coordinator.admin() as admin:
            response = admin.get("/overview")
            response.raise_for_status()
            result: dict[str, Any] = response.json()
            return result

    def ask(self, client: str, node: str, max_tokens: int = 8) -> None:
        body = {"model": MODEL, "prompt": "The market opened and", "max_tokens": max_tokens,
                "provider": {"order": [self.nodes[node]], "allow_fallbacks": False}}  # fmt: skip
        headers = {"Authorization": f"Bearer {self.clients[client]}"}
        with httpx.Client(base_url=self.coordinator.base_url, timeout=120) as http:
            assert http.post("/completions", json=body, headers=headers).status_code == 200


def credits(micro: int) -> str:
    return format_micro(micro).removesuffix(" USD")


@pytest.fixture(scope="module")
def dash(
    vllm_engine: VllmEngine, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Dash]:
    workdir = tmp_path_factory.mktemp("dashboard")
    env = {"AGORA_COORDINATOR_TRAFFIC_SAMPLE_S": "1",
           "AGORA_COORDINATOR_TOKENIZERS": f'{{"{MODEL}": "{tiny_model}"}}', **P2P_ENV}  # fmt: skip
    coordinator = start_coordinator(workdir, extra_args=["--p2p-listen", LOOPBACK], env=env)
    bootstrap = str(coordinator.info["p2p_addrs"][0])
    workers: dict[str, Process] = {}
    peer: CoordinatorHandle | None = None
    try:
        joining = ["--p2p-listen", LOOPBACK, "--bootstrap", bootstrap]
        peer = start_coordinator(workdir / "peer", extra_args=joining, env=P2P_ENV)
        for name in ("alpha", "beta"):
            spec = WorkerSpec(name, MODEL, engine_url=vllm_engine.base_url)
            workers[name] = start_worker(workdir, coordinator, spec)
        probe = coordinator.create_client("probe", 1)
        wait_for_workers(coordinator, probe, MODEL, 2, list(workers.values()), timeout_s=120)
        keys = {name: workdir / f"{name}.key" for name in workers}
        nodes = {name: Identity.load(path).node_id for name, path in keys.items()}
        clients = {c: coordinator.create_client(c, 50_000_000) for c in ("acme", "globex")}
        market = Dash(coordinator, workers, nodes, keys, clients, peer)
        for client, node in [("acme", "alpha")] * 4 + [("globex", "beta")] * 2:
            market.ask(client, node)
        with coordinator.admin() as admin:  # one closed epoch, then more work in the open one
            admin.post("/payouts/close").raise_for_status()
        market.ask("acme", "beta")
        market.ask("globex", "alpha")
        yield market
    finally:
        for process in workers.values():
            process.stop()
        if peer is not None:
            peer.process.stop()
        coordinator.process.stop()
    assert books_problems(workdir) == []


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    yield context.new_page()
    context.close()


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def sign_in_operator(page: Page, dash: Dash, coordinator: CoordinatorHandle | None = None) -> None:
    coordinator = coordinator or dash.coordinator
    page.goto(coordinator.base_url.removesuffix("/v1") + "/dashboard")
    page.fill("#token", coordinator.admin_token)
    page.click("button[type=submit]")
    page.wait_for_selector("body[data-loaded='1']")


def text(page: Page, testid: str) -> str:
    return page.get_by_test_id(testid).inner_text().strip()


def test_nobody_gets_in_without_credentials(dash: Dash, page: Page) -> None:
    with httpx.Client(base_url=dash.root, timeout=30) as http:
        redirect = http.get("/dashboard")
        assert redirect.status_code == 303
        assert redirect.headers["location"] == "/dashboard/login"
        assert http.get("/admin/v1/overview").status_code == 401  # no credentials at all
        me = http.get("/provider/v1/me")
        assert me.status_code == 401
        assert me.json()["error"]["type"]  # the OpenAI error envelope
        assert http.post("/dashboard/login", data={"token": "guess"}).status_code == 401
        assert http.get("/provider/login", params={"link": "made-up"}).status_code == 401
        forged = {"node_id": dash.nodes["alpha"], "challenge": "0" * 64, "signature": "AAAA"}
        assert http.post("/provider/v1/login", json=forged).status_code == 401  # not our challenge
    page.goto(dash.root + "/dashboard")
    assert page.url.endswith("/dashboard/login")
    page.fill("#token", "not-the-token")
    page.click("button[type=submit]")
    expect(page.get_by_role("alert")).to_contain_text("not the admin token")
    assert dash.nodes["alpha"] not in page.content()
    shot(page, "dashboard-login-refused")


def test_operator_dashboard_shows_what_the_api_shows_and_updates_live(
    dash: Dash, page: Page
) -> None:
    sign_in_operator(page, dash)
    api = dash.overview()
    assert api["settled_requests"] == 8
    for row in api["capacity"]["by_model"]:
        for key in ("total", "in_use", "free"):
            assert text(page, f"cap-model-{row['model']}-{key}") == str(row[key])
    gpu_rows = api["capacity"]["by_gpu"]
    assert gpu_rows
    for r in gpu_rows:
        assert text(page, f"cap-gpu-{r['gpu']}-total") == str(r["total"])
    assert text(page, "kpi-workers") == "2"
    assert text(page, "kpi-revenue") == credits(api["money"]["revenue"])
    assert text(page, "kpi-paid") == credits(api["money"]["paid_out"])
    assert api["money"]["paid_out"] > 0  # the closed epoch
    for client in api["top_clients"]:
        assert text(page, f"client-{client['client']}-spent") == credits(client["spent"])
        assert text(page, f"client-{client['client']}-balance") == credits(client["balance"])
    balances = dash.coordinator.balances()
    assert text(page, "client-acme-balance") == credits(balances["client:acme"])
    for node in dash.nodes.values():
        expect(page.get_by_test_id(f"worker-{node}")).to_be_visible()
    page.wait_for_function("document.querySelectorAll('.uplot').length >= 3")
    shot(page, "dashboard-operator")

    dash.ask("acme", "alpha")  # live: the page catches up without a reload
    expect(page.get_by_test_id("kpi-requests")).to_have_text("9", timeout=15_000)
    assert dash.overview()["settled_requests"] == 9


def provider_link(dash: Dash, worker: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "agora", "worker", "login", "--coordinator-url", dash.root,
         "--key", str(dash.keys[worker])],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return result.stdout.strip().splitlines()[-1]


def test_provider_view_shows_only_its_own_node(dash: Dash, page: Page) -> None:
    link = provider_link(dash, "alpha")
    page.goto(link)
    page.wait_for_selector("body[data-loaded='1']")
    alpha, beta = dash.nodes["alpha"], dash.nodes["beta"]
    expect(page.locator("#node")).to_have_text(alpha)
    me = page.request.get(dash.root + "/provider/v1/me").json()  # the page's own session
    assert me["node_id"] == alpha
    assert text(page, "me-jobs") == str(me["jobs_served"])
    assert me["jobs_served"] >= 5  # what the fixture sent it
    for model, row in me["open_epoch"].items():
        assert text(page, f"open-{model}-earned") == credits(row["earned"])
    assert text(page, "me-paid") == credits(sum(e["amount"] for e in me["epochs"]))
    assert [e["epoch"] for e in me["epochs"]] == [1]
    expect(page.get_by_test_id(f"advert-{MODEL}")).to_be_visible()
    assert text(page, f"ask-note-{MODEL}") == "fixed"  # no auto price: nothing decided
    assert beta not in page.content()
    asked_for_beta = page.request.get(dash.root + f"/provider/v1/me?node_id={beta}").json()
    assert asked_for_beta["node_id"] == alpha  # no parameter reaches another node's data
    assert page.request.get(dash.root + "/admin/v1/overview").status == 403  # not the operator
    page.wait_for_function("document.querySelectorAll('.uplot').length >= 1")
    shot(page, "dashboard-provider")
    with httpx.Client(base_url=dash.root, timeout=30) as http:
        assert http.get(link.removeprefix(dash.root)).status_code == 401  # a link works once


def test_agora_status_prints_the_same_numbers(dash: Dash) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "agora", "status", "--url", dash.root,
         "--admin-token", dash.coordinator.admin_token],
        capture_output=True, text=True, timeout=60, check=True,
        env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    api = dash.overview()
    assert f"{api['settled_requests']} requests settled" in result.stdout
    assert format_micro(api["money"]["revenue"]) in result.stdout
    for node in dash.nodes.values():
        assert node[-12:] in result.stdout


def network(coordinator: CoordinatorHandle) -> dict[str, Any]:
    with coordinator.admin() as admin:
        response = admin.get("/network")
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result


def test_operator_dashboard_shows_the_p2p_market(dash: Dash, page: Page) -> None:
    """The peer's operator sees the first coordinator, its client API and, from the signed
    registrations relayed on gossip, its two workers; and the other way round."""
    first_id = dash.coordinator.info["coordinator_id"]
    peer_id = dash.peer.info["coordinator_id"]
    sign_in_operator(page, dash, dash.peer)
    expect(page.get_by_test_id(f"coord-{first_id}-api")).to_have_text(dash.coordinator.base_url,
                                                                       timeout=30_000)  # fmt: skip
    expect(page.get_by_test_id(f"coord-{first_id}-workers")).to_have_text("2", timeout=30_000)
    heard = next(c for c in network(dash.peer)["coordinators"] if c["coordinator_id"] == first_id)
    assert sorted(heard["workers"]) == sorted(dash.nodes.values())
    assert int(text(page, "network-peers")) >= 1
    assert int(text(page, "network-accepted")) > 0
    shot(page, "dashboard-network")

    sign_in_operator(page, dash)
    expect(page.get_by_test_id(f"coord-{peer_id}-api")).to_have_text(dash.peer.base_url,
                                                                      timeout=30_000)  # fmt: skip
    assert text(page, f"coord-{peer_id}-workers") == "0"


def test_the_operator_sees_each_release_and_its_rollback(dash: Dash, page: Page) -> None:
    with dash.coordinator.admin() as admin:
        versions = [{"version": "v1", "serves": MODEL}, {"version": "v2", "serves": MODEL}]
        admin.post("/models", json={"name": "assistant", "versions": versions}).raise_for_status()
        release = {"weights": {"v1": 90, "v2": 10}}
        admin.post("/models/assistant/release", json=release).raise_for_status()
    sign_in_operator(page, dash)
    expect(page.get_by_test_id("release-state-assistant-v2")).to_have_text("active")
    expect(page.get_by_test_id("release-share-assistant-v2")).to_have_text("10 %")
    with dash.coordinator.admin() as admin:
        body = {"version": "v2", "reason": "answers in the wrong language"}
        admin.post("/models/assistant/rollback", json=body).raise_for_status()
    # live: the page shows the rollback and why without a reload
    state = page.get_by_test_id("release-state-assistant-v2")
    expect(state).to_have_text("rolled_back", timeout=15_000)
    expect(page.get_by_test_id("release-share-assistant-v1")).to_have_text("100 %")
    expect(page.get_by_test_id("release-note-assistant-v2")).to_contain_text("wrong language")
    shot(page, "dashboard-releases")


def test_the_operator_sees_batches_on_the_dashboard_and_in_agora_batches(
    dash: Dash, page: Page
) -> None:
    key = dash.clients["acme"]
    line = {"method": "POST", "url": "/v1/completions",
            "body": {"model": MODEL, "prompt": "The night shift", "max_tokens": 4}}  # fmt: skip
    data = "".join(json.dumps({"custom_id": f"n{i}", **line}) + "\n" for i in range(5))
    with openai.OpenAI(base_url=dash.coordinator.base_url, api_key=key, max_retries=0) as sdk:
        upload = sdk.files.create(file=("night.jsonl", data.encode()), purpose="batch")
        batch = sdk.batches.create(input_file_id=upload.id, endpoint="/v1/completions",
                                   completion_window="24h")  # fmt: skip
    sign_in_operator(page, dash)
    expect(page.get_by_test_id(f"batch-{batch.id}-status")).to_have_text("completed",
                                                                        timeout=60_000)  # fmt: skip
    expect(page.get_by_test_id(f"batch-{batch.id}-done")).to_have_text("5")
    expect(page.get_by_test_id("batches-by-status")).to_contain_text("completed 1")
    shot(page, "dashboard-batches")
    result = subprocess.run(
        [sys.executable, "-m", "agora", "batches", "--url", dash.root,
         "--admin-token", dash.coordinator.admin_token],
        capture_output=True, text=True, timeout=60, check=True,
        env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert batch.id in result.stdout
    assert "completed" in result.stdout


def test_the_operator_sees_policy_hits_on_the_dashboard_without_the_values(
    dash: Dash, page: Page
) -> None:
    secret = "sk-live-Zq3xXb7LmN0pQ2rS4tU6vW8y"
    key = dash.coordinator.create_client("initech", 50_000_000)
    with dash.coordinator.admin() as admin:
        steps = [{"kind": "pii", "mode": "mask", "entities": ["email", "secret"]}]
        admin.put("/policies/no-secrets", json={"steps": steps}).raise_for_status()
        attach = {"policy": "no-secrets", "client": "initech"}
        admin.post("/policies/attach", json=attach).raise_for_status()
    with openai.OpenAI(base_url=dash.coordinator.base_url, api_key=key, max_retries=0) as sdk:
        for _ in range(2):
            sdk.completions.create(
                model=MODEL, prompt=f"ops@initech.example key {secret}", max_tokens=2
            )
    sign_in_operator(page, dash)
    expect(page.get_by_test_id("policy-no-secrets-attached")).to_have_text("client:initech")
    expect(page.get_by_test_id("policy-no-secrets-requests")).to_have_text("2", timeout=20_000)
    expect(page.get_by_test_id("policy-hit-no-secrets-secret-mask-count")).to_have_text("2")
    expect(page.get_by_test_id("policy-hit-no-secrets-email-mask-count")).to_have_text("2")
    assert secret not in page.content()
    assert "ops@initech.example" not in page.content()
    shot(page, "dashboard-policies")


def test_the_demand_board_shows_served_and_unmet_demand_and_agora_market_reads_it(
    dash: Dash, page: Page
) -> None:
    for _ in range(2):
        dash.ask("globex", "alpha", max_tokens=2)
    body = {"model": MODEL, "prompt": "too cheap", "max_tokens": 2,
            "provider": {"max_price": {"prompt": 0.000001, "completion": 0.000001}}}  # fmt: skip
    headers = {"Authorization": f"Bearer {dash.clients['globex']}"}
    with httpx.Client(base_url=dash.coordinator.base_url, timeout=60) as http:
        assert http.post("/completions", json=body, headers=headers).status_code == 400
        deadline = time.monotonic() + 20  # a board is rebuilt at most every 5 s
        while True:
            board = http.get("/market").json()  # public: no key
            row = board["body"]["board"]["models"][MODEL]
            window = row["windows"]["300s"]
            if window["requests"] >= 2 and window["unmet"]["price"] >= 1:
                break
            assert time.monotonic() < deadline, row
            time.sleep(0.5)
    assert row["capacity"]["workers"] == 2
    sign_in_operator(page, dash)
    expect(page.get_by_test_id(f"demand-{MODEL}")).to_have_text(MODEL)
    expect(page.get_by_test_id(f"demand-{MODEL}-unmet")).to_contain_text(" / ")
    served = page.get_by_test_id(f"demand-{MODEL}-served").inner_text()
    assert int(served.replace(",", "")) >= 2
    shot(page, "dashboard-demand")
    result = subprocess.run(
        [sys.executable, "-m", "agora", "market", "--url", dash.root],
        capture_output=True, text=True, timeout=60, check=True,
        env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert MODEL in result.stdout
    assert "Demand over 300s" in result.stdout
