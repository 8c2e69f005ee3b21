"""The policy layer's pure parts: PII detection, redaction modes, the output gate (hold-back,
placeholders put back, blocks split over chunks), policies as versions, steps found through
entry points, and routing's provider constraints."""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from coordinator.services.policy import pii
from coordinator.services.policy.builtin import BlockStep, PiiStep
from coordinator.services.policy.compiled import Policy
from coordinator.services.policy.gate import OutputGate
from coordinator.services.policy.run import CONTENT_FILTER, PolicyRun
from coordinator.services.policy.steps import PolicyError, PolicyViolation, Scope, installed
from coordinator.services.routing import Preferences, RouteRequest, route
from protocol.completions import CHAT, COMPLETIONS
from protocol.proto import session_pb2 as pb
from tests.coordinator.test_routing import Offer
from tests.policy_plugin import install

# one value of each kind, and look-alikes that are not personal data
VALUES = {
    pii.EMAIL: "jane.doe@example.com",
    pii.PHONE: "+44 20 7946 0958",
    pii.CARD: "4111 1111 1111 1111",
    pii.IBAN: "DE89 3704 0044 0532 0130 00",
    pii.NATIONAL_ID: "123-45-6789",
    pii.IP: "192.168.10.20",
    pii.SECRET: "sk-agora-Zq3xXb7LmN0pQ2rS4tU6vW8y",
}
NOT_PII = [
    "4111 1111 1111 1112",  # fails Luhn
    "DE89 3704 0044 0532 0130 01",  # fails mod 97
    "999.168.10.20",  # not an address
    "2026-12-07",  # a date
    "order 1234567",  # too few digits for a phone
    "000-12-3456",  # no SSN has area 000
]


@pytest.mark.parametrize("kind", sorted(VALUES))
def test_each_kind_is_found_alone(kind: str) -> None:
    text = f"Please use {VALUES[kind]} for this."
    [span] = pii.find(text)
    assert (span.kind, text[span.start : span.end]) == (kind, VALUES[kind])


@pytest.mark.parametrize("text", NOT_PII)
def test_look_alikes_are_not_found(text: str) -> None:
    assert pii.find(f"see {text} here") == []


def test_placeholders_number_each_value_once_and_never_reuse_the_clients_own() -> None:
    step, scope = PiiStep("placeholder"), Scope()
    text = "a@example.com, b@example.com, a@example.com and my literal [EMAIL_1]"
    out = step.on_input(text, scope)
    assert out == "[EMAIL_2], [EMAIL_3], [EMAIL_2] and my literal [EMAIL_1]"
    assert scope.placeholders == {"[EMAIL_2]": "a@example.com", "[EMAIL_3]": "b@example.com"}
    assert [(h.entity, h.count, h.action) for h in scope.hits] == [("email", 3, "placeholder")]


def test_mask_and_reject_modes() -> None:
    text = f"card {VALUES[pii.CARD]} ip {VALUES[pii.IP]}"
    assert PiiStep("mask").on_input(text, Scope()) == "card [CARD] ip [IP]"
    scope = Scope()
    with pytest.raises(PolicyViolation) as refused:
        PiiStep("reject", entities=["card"]).on_input(text, scope)
    assert refused.value.entities == ("card",)
    assert VALUES[pii.CARD] not in str(refused.value)
    assert PiiStep("reject", entities=["email"]).on_input(text, Scope()) == text


def feed(gate: OutputGate, chunks: list[str]) -> list[str]:
    out = [gate.feed(c) for c in chunks]
    out.append(gate.feed("", final=True))
    return out


def test_a_blocked_phrase_split_over_chunks_never_leaves_the_gate() -> None:
    gate = OutputGate({}, [BlockStep(phrases=["secret project"])])
    chunks = ["The ", "sec", "ret  pro", "ject", " is Atlas"]
    released = feed(gate, chunks)
    shown = "".join(released)
    assert shown == "The "
    assert gate.blocked is not None
    assert gate.blocked.entity == "phrase"
    assert all("sec" not in part for part in released)


def test_without_a_match_everything_is_released_and_only_the_window_waits() -> None:
    gate = OutputGate({}, [BlockStep(phrases=["secret project"])])
    released = [gate.feed(c) for c in ["Hello ", "there, ", "general ", "Kenobi"]]
    assert all(len("".join(released[: i + 1])) >= len("Hello there, general Kenobi"[: 6 * i]) - 13
               for i in range(4))  # fmt: skip
    assert "".join(released) + gate.feed("", final=True) == "Hello there, general Kenobi"
    assert gate.blocked is None


def test_placeholders_split_over_chunks_are_put_back_whole() -> None:
    gate = OutputGate({"[EMAIL_1]": "jane@example.com"}, [])
    shown = "".join(feed(gate, ["Write to [EM", "AIL_", "1] today; [not one]"]))
    assert shown == "Write to jane@example.com today; [not one]"
    assert gate.restored == 1


def test_a_put_back_value_is_checked_by_the_block_rules_too() -> None:
    gate = OutputGate({"[EMAIL_1]": "boss@secret.example"}, [BlockStep(patterns=[r"secret\."])])
    assert "".join(feed(gate, ["mail [EMAIL_1] now"])) == "mail boss@"


def run_of(steps: list[dict[str, object]]) -> PolicyRun:
    return PolicyRun(Policy.build("p", 1, {"steps": steps}))


def test_a_run_redacts_every_text_of_a_chat_and_refuses_token_ids() -> None:
    run = run_of([{"kind": "pii", "mode": "placeholder"}])
    body: dict[str, Any] = {"messages": [
        {"role": "system", "content": "admin is root@example.com"},
        {"role": "user", "content": [{"type": "text", "text": "call +1 415 555 0132"}]},
    ]}  # fmt: skip
    redacted = run.redact(CHAT, body)
    assert redacted["messages"][0]["content"] == "admin is [EMAIL_1]"
    assert redacted["messages"][1]["content"][0]["text"] == "call [PHONE_1]"
    assert body["messages"][0]["content"] == "admin is root@example.com"  # the client's own
    with pytest.raises(PolicyViolation):
        run.redact(COMPLETIONS, {"prompt": [1, 2, 3]})


def test_a_stream_block_ends_every_choice_with_content_filter() -> None:
    run = run_of([{"kind": "block", "phrases": ["forbidden"]}])
    first = pb.Frames(choices=[pb.TokenFrame(index=0, text="all fine "),
                               pb.TokenFrame(index=1, text="also fine")])  # fmt: skip
    assert not run.frames(first)
    second = pb.Frames(choices=[pb.TokenFrame(index=0, text="but forbid"),
                                pb.TokenFrame(index=1, text=" more")])  # fmt: skip
    assert not run.frames(second)
    third = pb.Frames(choices=[pb.TokenFrame(index=0, text="den words")])
    assert run.frames(third)
    shown = {f.index: f.finish_reason for f in third.choices}
    assert shown == {0: CONTENT_FILTER, 1: CONTENT_FILTER}
    text0 = "".join(f.text for fs in (first, second, third) for f in fs.choices if f.index == 0)
    assert "forbid" not in text0
    assert text0.startswith("all fine")
    later = pb.Frames(choices=[pb.TokenFrame(index=1, text="x", finish_reason="stop")])
    assert not run.frames(later)
    assert not later.choices
    assert [(h.step, h.action) for h in run.hits()] == [("block", "block")]


def test_a_whole_answer_is_cut_before_a_block() -> None:
    run = run_of([{"kind": "block", "patterns": [r"\bpassword\b"]}])
    result = {"choices": [{"index": 0, "message": {"content": "Your password is 1234"},
                           "finish_reason": "stop"}]}  # fmt: skip
    run.whole(CHAT, result)
    assert result["choices"][0] == {"index": 0, "message": {"content": "Your "},
                                    "finish_reason": CONTENT_FILTER}  # fmt: skip


def test_a_policy_is_versioned_by_its_canonical_json() -> None:
    a = Policy.build("p", 1, {"steps": [{"kind": "pii", "mode": "mask"}]})
    b = Policy.build("p", 2, {"steps": [{"mode": "mask", "kind": "pii"}]})
    c = Policy.build("p", 3, {"steps": [{"kind": "pii", "mode": "reject"}]})
    assert a.sha256 == b.sha256 != c.sha256
    bad: dict[str, Any]
    for bad in ({"steps": []}, {"steps": [{"kind": "nope"}]}, {"steps": [{"kind": "pii",
                "mode": "shred"}]}, {"steps": [{"kind": "block"}]}, {"rules": []}):  # fmt: skip
        with pytest.raises(PolicyError):
            Policy.build("p", 1, bad)


def test_provider_constraints_of_several_steps_all_hold() -> None:
    policy = Policy.build("p", 1, {"steps": [
        {"kind": "providers", "data_retention": ["none", "7d"], "min_reputation": 0.4},
        {"kind": "providers", "data_retention": ["none"], "regions": ["eu"],
         "min_reputation": 0.6},
    ]})  # fmt: skip
    found = policy.constraints()
    assert found is not None
    assert (found.data_retention, found.regions, found.min_reputation) == (
        frozenset({"none"}), frozenset({"eu"}), 0.6)  # fmt: skip


def test_routing_excludes_workers_that_do_not_declare_what_the_policy_requires() -> None:
    pool = [
        Offer("undeclared", 10, 20),
        Offer("keeps-30d", 10, 20, data_retention="30d", region="eu"),
        Offer("us-zero", 10, 20, data_retention="none", region="us"),
        Offer("eu-zero", 10, 20, data_retention="none", region="eu"),
        Offer("eu-zero-new", 10, 20, data_retention="none", region="eu"),
    ]
    prefs = Preferences(data_retention=frozenset({"none"}), regions=frozenset({"eu"}),
                        min_reputation=0.5)  # fmt: skip
    reputation = {"eu-zero": 0.9, "eu-zero-new": 0.2}
    decision = route(RouteRequest("m", 10, 10), pool, {}, prefs, random.Random(1), 0.0,
                     reputation=reputation)  # fmt: skip
    assert [s.node_id for s in decision.ranked] == ["eu-zero"]
    assert decision.excluded == {"policy_retention": 2, "policy_region": 1,
                                 "policy_reputation": 1}  # fmt: skip
    assert "policy_region=1" in decision.explain()
    open_decision = route(RouteRequest("m", 10, 10), pool, {}, Preferences(), random.Random(1),
                          0.0)  # fmt: skip
    assert len(open_decision.ranked) == 3  # without a policy, anyone (ranked_size 3)


def test_an_operators_step_loads_through_its_entry_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert "shouting" not in installed()
    monkeypatch.syspath_prepend(str(install(tmp_path / "site")))
    installed.cache_clear()
    try:
        kinds = installed()
        assert {"pii", "block", "flag", "providers", "shouting"} <= set(kinds)
        run = run_of([{"kind": "shouting", "min_letters": 5}])
        assert run.policy.steps[0].points() == ("output",)
        result = {"choices": [{"index": 0, "text": "calm words then LOUDER ones"}]}
        run.whole(COMPLETIONS, result)
        assert result["choices"][0]["text"] == "calm words then "
    finally:
        installed.cache_clear()
        sys.modules.pop("agora_policy_example", None)


def test_finding_is_linear_on_long_unbroken_text() -> None:
    """A prompt is attacker-controlled: no pattern may backtrack quadratically (an earlier
    email pattern took 2.4 s on 40 KB and ~16x that on 160 KB)."""
    for text in ("a" * 160_000, "a1" * 80_000, "1 " * 80_000, "a@" * 80_000, "ab:" * 53_000):
        started = time.perf_counter()
        pii.find(text)
        assert time.perf_counter() - started < 5.0


def test_phrase_words_may_be_a_few_spaces_apart_and_are_still_held_back() -> None:
    gate = OutputGate({}, [BlockStep(phrases=["secret plan"])])
    released = feed(gate, ["the secret", " \n\t", "plan is", " here"])
    assert "".join(released) == "the "
    with pytest.raises(PolicyError):
        BlockStep(phrases=["  "])


def test_providers_steps_that_no_worker_could_meet_together_are_refused() -> None:
    with pytest.raises(PolicyError):
        Policy.build("p", 1, {"steps": [{"kind": "providers", "regions": ["eu"]},
                                        {"kind": "providers", "regions": ["us"]}]})  # fmt: skip


def test_a_block_keeps_what_other_choices_had_before_it_in_the_same_batch() -> None:
    run = run_of([{"kind": "block", "phrases": ["stop"]}])
    batch = pb.Frames(choices=[pb.TokenFrame(index=1, text="fine words, all of them"),
                               pb.TokenFrame(index=0, text="please stop now"),
                               pb.TokenFrame(index=1, text=" never sent")])  # fmt: skip
    assert run.frames(batch)
    assert [(f.index, f.finish_reason) for f in batch.choices] == [
        (1, ""), (0, CONTENT_FILTER), (1, CONTENT_FILTER)]  # fmt: skip
    assert batch.choices[1].text == "please "
