"""The Batch API's pure parts: reading an input file, the line formats, the capacity a batch
may take beside online traffic."""

from __future__ import annotations

import json

import pytest

from coordinator.api.batch_lines import line_request
from coordinator.errors import InvalidRequest
from coordinator.services.batches.lines import (
    InvalidInput,
    jsonl,
    output_line,
    parse_input,
    unrun_line,
)
from coordinator.services.batches.runner import room


def line(custom_id: str = "a", **over: object) -> str:
    value = {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": "m", "messages": []}, **over}  # fmt: skip
    return json.dumps(value)


def test_a_valid_file_gives_every_request_in_order_skipping_blank_lines() -> None:
    data = "\n".join([line("a"), "", line("b", url="/v1/embeddings"), ""]).encode()
    parsed = parse_input(data, max_lines=10)
    assert [(p.custom_id, p.url) for p in parsed] == [("a", "/v1/chat/completions"),
                                                      ("b", "/v1/embeddings")]  # fmt: skip


def test_every_bad_line_is_named_and_nothing_is_taken() -> None:
    data = "\n".join([
        line("a"), "{not json", line("a"), line("c", method="GET"), line("d", url="/v1/x"),
        line("e", body=[]), line("f", body={"messages": []}), json.dumps([1]), line(""),
    ]).encode()  # fmt: skip
    with pytest.raises(InvalidInput) as caught:
        parse_input(data, max_lines=100)
    assert caught.value.problems == [
        "line 2: not valid JSON",
        "line 3: `custom_id` 'a' is used twice",
        'line 4: `method` must be "POST"',
        "line 5: `url` must be one of /v1/chat/completions, /v1/completions, /v1/embeddings",
        "line 6: `body` must be a JSON object",
        "line 7: `body.model` must be a string of 1 to 200 characters",
        "line 8: not a JSON object",
        "line 9: `custom_id` must be a non-empty string",
    ]


@pytest.mark.parametrize(
    ("data", "problem"),
    [(b"", "no requests"), (b"\xff\xfe", "not UTF-8"),
     ("\n".join(line(str(i)) for i in range(4)).encode(), "at most 3")],
)  # fmt: skip
def test_empty_undecodable_or_too_long_files_are_refused(data: bytes, problem: str) -> None:
    with pytest.raises(InvalidInput, match=problem):
        parse_input(data, max_lines=3)


def test_output_and_error_lines_have_openais_shape() -> None:
    done = json.loads(output_line("q1", "r1", 200, {"id": "x"}))
    response = {"status_code": 200, "request_id": "r1", "body": {"id": "x"}}
    assert done == {"id": "batch_req_r1", "custom_id": "q1", "error": None, "response": response}
    unrun = json.loads(unrun_line("q2", "r2", "batch_expired", "late"))
    assert unrun["response"] is None
    assert unrun["error"] == {"code": "batch_expired", "message": "late"}
    assert jsonl([b"a", b"b"]) == b"a\nb\n"


@pytest.mark.parametrize(
    ("slots", "share", "launching", "expected"),
    [
        ([(8, 8)], 0.25, 0, 6),  # an idle node: all but a quarter
        ([(3, 8)], 0.25, 0, 1),  # online traffic holds 5: one more line leaves 2 free
        ([(2, 8)], 0.25, 0, 0),  # only the headroom is free: the batch waits
        ([(8, 8)], 0.25, 4, 2),  # 4 lines started, not yet holding their slots
        ([(4, 4), (4, 4)], 0.25, 0, 6),
        ([(1, 1)], 0.0, 0, 0),  # at least one slot always stays free
        ([], 0.25, 0, 0),
    ],
)
def test_a_batch_takes_only_what_online_traffic_leaves_beyond_the_headroom(
    slots: list[tuple[int, int]], share: float, launching: int, expected: int
) -> None:
    assert room(slots, share, launching) == expected


def test_a_line_runs_as_a_batch_request_on_the_cheapest_worker_unless_it_says_otherwise() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    request = line_request("/v1/chat/completions", body)
    assert (request.batch, request.prefs.sort, request.stream) == (True, "price", False)
    assert request.max_tokens == 4
    chosen = line_request("/v1/chat/completions", {**body, "provider": {"sort": "latency"}})
    assert chosen.prefs.sort == "latency"
    vectors = line_request("/v1/embeddings", {"model": "e", "input": ["a", "b"]})
    assert (vectors.batch, vectors.task) == (True, "embed")
    with pytest.raises(InvalidRequest, match="stream"):
        line_request("/v1/chat/completions", {**body, "stream": True})
    with pytest.raises(InvalidRequest):
        line_request("/v1/completions", {"model": "m"})  # no prompt: that line's 400
