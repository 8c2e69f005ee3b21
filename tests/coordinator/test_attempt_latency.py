"""The pace the coordinator reads off a worker's stream: the evidence a slow worker is judged
on, so a worker that sends its tokens in few, late frames must not read as fast."""

from __future__ import annotations

from typing import Any, cast

import pytest

from billing.pricing import Price
from coordinator.services.request_path.attempt import Attempt
from coordinator.services.settlement import JobFacts
from protocol.proto import session_pb2 as pb


def attempt() -> Attempt:
    facts = JobFacts("r", "client", "node", "m", "00", "sha", Price(1, 1))
    return Attempt(slot=cast(Any, None), facts=facts, events=cast(Any, None),
                   endpoint="completions", segment=0, dispatched_at=0.0)  # fmt: skip


def frames(tokens: int) -> pb.Frames:
    return pb.Frames(choices=[pb.TokenFrame(index=0, text="x" * tokens, token_ids=[7] * tokens)])


def test_one_token_per_frame_reads_the_gap_between_frames() -> None:
    job = attempt()
    for i in range(10):
        job.saw_frames(frames(1), now=0.5 + 0.2 * i)
    ttft, itl = job.latencies()
    assert ttft == pytest.approx(0.5)
    assert itl == pytest.approx(0.2)


def test_tokens_held_back_in_the_first_frame_do_not_dilute_the_pace() -> None:
    """Nine tokens sent at once after 1.8 s, the tenth 0.2 s later: 0.2 s a token, not 0.02."""
    job = attempt()
    job.saw_frames(frames(9), now=1.8)
    job.saw_frames(frames(1), now=2.0)
    ttft, itl = job.latencies()
    assert ttft == pytest.approx(1.8)
    assert itl == pytest.approx(0.2)


def test_batched_frames_read_the_pace_per_token() -> None:
    job = attempt()
    for i in range(4):  # four tokens a frame, a frame every 0.4 s: 0.1 s a token
        job.saw_frames(frames(4), now=1.0 + 0.4 * i)
    assert job.latencies()[1] == pytest.approx(0.1)


def test_a_whole_response_says_nothing_about_pace() -> None:
    job = attempt()
    job.saw_frames(frames(10), now=3.0)
    ttft, itl = job.latencies()
    assert ttft == pytest.approx(3.0)
    assert itl is None
