"""Model releases through real workers and the real vLLM engine: a canary's share, sticky
A/B, an automatic rollback with zero client errors, shadow copies that reach neither the
client nor the ledger, model fallbacks, and the `agora models` CLI."""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from agora.cli import app as cli
from tests.coordinator.test_observability import scrape
from tests.fleet import Fleet, Member

pytestmark = pytest.mark.engine
HI = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def candidates(fleet: Fleet) -> Iterator[dict[str, Member]]:
    """A worker serving `tiny-v2` (a healthy new version) and one serving `tiny-bad`, whose
    engine fails every job while its health probes pass."""
    members = {
        "v2": fleet.add("rel-v2", "tiny-v2", 120_000, 240_000),
        "bad": fleet.add("rel-bad", "tiny-bad", 100_000, 200_000),
    }
    members["bad"].proxy.fail_jobs_status = 500
    fleet.wait("tiny-v2", 1)
    fleet.wait("tiny-bad", 1)
    yield members
    members["bad"].proxy.reset()


def admin(fleet: Fleet, method: str, path: str, **body: Any) -> dict[str, Any]:
    with fleet.coordinator.admin() as client:
        response = client.request(method, f"/models{path}", json=body or None)
    assert response.status_code < 300, response.text
    return dict(response.json())


def new_model(fleet: Fleet, **versions: str) -> str:
    name = f"chat-{uuid.uuid4().hex[:6]}"
    specs = [{"version": v, "serves": s} for v, s in versions.items()]
    admin(fleet, "POST", "", name=name, versions=specs)
    return name


def ask(fleet: Fleet, key: str, model: str, **body: Any) -> httpx.Response:
    payload = {"model": model, "messages": HI, "max_tokens": 2, "temperature": 0, **body}
    return httpx.post(
        f"{fleet.coordinator.base_url}/chat/completions", json=payload, timeout=60,
        headers={"Authorization": f"Bearer {key}"},
    )  # fmt: skip


def served(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    assert response.json()["model"] == response.headers["x-agora-model"]
    return str(response.headers["x-agora-model"])


def test_a_canary_gets_its_share_and_responses_name_the_version(
    fleet: Fleet, candidates: dict[str, Member]
) -> None:
    name = new_model(fleet, v1="tiny", v2="tiny-v2")
    admin(fleet, "POST", f"/{name}/release", weights={"v1": 80, "v2": 20})
    _client, key = fleet.client()
    n = 80
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: ask(fleet, key, name), range(n)))
    counts = Counter(served(r) for r in responses)
    assert set(counts) <= {f"{name}@v1", f"{name}@v2"}
    # binomial(80, 0.2): mean 16, sd 3.6; 3.5 sd either side
    assert 4 <= counts[f"{name}@v2"] <= 28, counts
    v2_node = candidates["v2"].node_id
    for r in responses:
        assert (r.headers["x-agora-worker"] == v2_node) == (served(r) == f"{name}@v2")
    shares = {v["version"]: v["share"] for v in admin(fleet, "GET", f"/{name}")["versions"]}
    assert shares == {"v1": 0.8, "v2": 0.2}


def test_sticky_ab_keeps_each_key_on_one_version(
    fleet: Fleet, candidates: dict[str, Member]
) -> None:
    name = new_model(fleet, a="tiny", b="tiny-v2")
    admin(fleet, "POST", f"/{name}/release", weights={"a": 50, "b": 50}, sticky=True)
    seen: dict[str, set[str]] = {}
    for _ in range(8):
        _client, key = fleet.client()
        seen[key] = {served(ask(fleet, key, name)) for _ in range(3)}
    assert all(len(versions) == 1 for versions in seen.values()), seen
    # 8 keys at 50/50 all on one side: 2 x 0.5^8 < 1 %
    assert set().union(*seen.values()) == {f"{name}@a", f"{name}@b"}


def test_a_failing_candidate_is_rolled_back_while_clients_see_no_error(
    fleet: Fleet, candidates: dict[str, Member]
) -> None:
    name = new_model(fleet, v1="tiny", v3="tiny-bad")
    rule = {"min_requests": 3, "window_s": 120, "error_rate": 0.01, "error_ratio": 2.0}
    admin(fleet, "POST", f"/{name}/release", weights={"v1": 50, "v3": 50}, rollback=rule)
    _client, key = fleet.client()
    bad_jobs = candidates["bad"].proxy.requests
    deadline = time.monotonic() + 90
    answered: list[str] = []
    while admin(fleet, "GET", f"/{name}")["versions"][1]["state"] != "rolled_back":
        assert time.monotonic() < deadline, "the failing version was never rolled back"
        answered.append(served(ask(fleet, key, name)))  # every one a 200
    assert candidates["bad"].proxy.requests - bad_jobs >= 3  # the candidate did get traffic
    assert set(answered) == {f"{name}@v1"}  # its failures were served by the stable version
    after = [served(ask(fleet, key, name)) for _ in range(10)]
    assert set(after) == {f"{name}@v1"}
    versions = {v["version"]: v for v in admin(fleet, "GET", f"/{name}")["versions"]}
    assert versions["v3"]["weight"] == 0
    assert versions["v3"]["window"]["failed"] >= 3
    metric = f'agora_release_rollbacks_total{{model="{name}",trigger="automatic",version="v3"}}'
    assert scrape(fleet).get(metric) == 1
    result = CliRunner().invoke(cli, ["models", "history", name, "--json", *_cli_args(fleet)])
    assert result.exit_code == 0, result.output
    events = json.loads(result.output)
    assert events[0]["kind"] == "rolled_back"
    assert events[0]["actor"] == "auto-rollback"
    assert "error rate 100.0%" in events[0]["detail"]["reason"]
    with fleet.coordinator.admin() as client:
        audit = client.get("/audit", params={"limit": 20}).json()["events"]
    assert any(e["action"] == "model.rolled_back" and e["subject"] == name for e in audit)


def test_shadow_copies_reach_neither_the_client_nor_the_ledger(
    fleet: Fleet, candidates: dict[str, Member]
) -> None:
    name = new_model(fleet, v1="tiny", v2="tiny-v2")
    admin(fleet, "POST", f"/{name}/release", shadow={"version": "v2", "share": 1.0})
    client, key = fleet.client()
    shadow_jobs = candidates["v2"].proxy.requests
    earned = _balance(fleet, f"provider:{candidates['v2'].node_id}")
    responses = [ask(fleet, key, name, max_tokens=6) for _ in range(3)]
    assert {served(r) for r in responses} == {f"{name}@v1"}
    deadline = time.monotonic() + 30
    while True:
        shadow = admin(fleet, "GET", f"/{name}")["versions"][1].get("shadow") or {}
        if shadow.get("compared") == 3 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert shadow["requests"] == 3, shadow
    assert shadow["failed"] == 0
    assert shadow["agreed"] == 3  # the same weights, greedy: the same text
    assert candidates["v2"].proxy.requests - shadow_jobs == 3  # the copies did run there
    assert _balance(fleet, f"provider:{candidates['v2'].node_id}") == earned  # unpaid, unbilled
    for r in responses:
        receipt = httpx.get(f"{fleet.coordinator.base_url}/receipts/{r.json()['id']}",
                            headers={"Authorization": f"Bearer {key}"}).json()  # fmt: skip
        assert receipt["receipt"]["worker_id"] == r.headers["x-agora-worker"]
        assert receipt["continuations"] == []
        assert receipt["unsigned_segments"] == []
    assert client


def test_fallback_models_are_tried_in_order_and_billed_at_their_price(
    fleet: Fleet, candidates: dict[str, Member]
) -> None:
    _client, key = fleet.client()
    response = ask(fleet, key, "nobody-serves-this", models=["tiny-bad", "tiny-v2"])
    assert served(response) == "tiny-v2"  # no worker, then failing before a token, then this
    assert response.headers["x-agora-worker"] == candidates["v2"].node_id
    receipt = httpx.get(f"{fleet.coordinator.base_url}/receipts/{response.json()['id']}",
                        headers={"Authorization": f"Bearer {key}"}).json()  # fmt: skip
    assert receipt["receipt"]["model"] == "tiny-v2"
    assert receipt["receipt"]["request_id"].endswith("~f2")  # the third model tried
    none = ask(fleet, key, "nobody-serves-this", models=["nor-this"])
    assert none.status_code == 404
    assert none.json()["error"]["code"] == "model_not_found"
    _client, limited = fleet.client(rpm_limit=2)  # a request tried as three models counts once
    assert served(ask(fleet, limited, "nobody-serves-this", models=["tiny-bad", "tiny-v2"]))
    assert served(ask(fleet, limited, "tiny-v2")) == "tiny-v2"
    assert ask(fleet, limited, "tiny-v2").status_code == 429
    bad = ask(fleet, key, "tiny", models="tiny-v2")
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "models"


def test_a_pinned_version_and_the_catalogue_in_the_model_list(
    fleet: Fleet, candidates: dict[str, Member]
) -> None:
    name = new_model(fleet, v1="tiny", v2="tiny-v2")
    _client, key = fleet.client()
    assert served(ask(fleet, key, f"{name}@v2")) == f"{name}@v2"  # weight 0, asked for by name
    missing = ask(fleet, key, f"{name}@v9")
    assert missing.status_code == 404
    assert "has no version `v9`" in missing.json()["error"]["message"]
    listed = httpx.get(f"{fleet.coordinator.base_url}/models",
                       headers={"Authorization": f"Bearer {key}"}).json()["data"]  # fmt: skip
    card = next(m for m in listed if m["id"] == name)
    assert [v["id"] for v in card["versions"]] == [f"{name}@v1", f"{name}@v2"]
    assert card["available"]
    result = CliRunner().invoke(cli, ["models", "rollback", name, "v2", *_cli_args(fleet)])
    assert result.exit_code == 0, result.output
    assert f"{name} (stable v1)" in result.output
    versions = {v["version"]: v for v in admin(fleet, "GET", f"/{name}")["versions"]}
    assert versions["v2"]["state"] == "rolled_back"
    assert served(ask(fleet, key, name)) == f"{name}@v1"


def _cli_args(fleet: Fleet) -> list[str]:
    return ["--url", fleet.coordinator.base_url.removesuffix("/v1"),
            "--admin-token", fleet.coordinator.admin_token]  # fmt: skip


def _balance(fleet: Fleet, account: str) -> int:
    with fleet.coordinator.admin() as client:
        accounts = client.get("/balances").json()["accounts"]
    return int(accounts.get(account, 0))
