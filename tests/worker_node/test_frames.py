"""The worker's token frames: engine chunks of one read merged per choice, rare fields kept
apart and in order, and the text the coordinator folds from them equal to the engine's."""

from __future__ import annotations

import asyncio
from typing import Any

from protocol.completions import CHAT, COMPLETIONS, Output
from protocol.proto import session_pb2 as pb
from worker_node.frames import FrameBuffer, FrameBuilder
from worker_node.session import Outbox, outgoing


def chat_chunk(content: str | None, ids: list[int], **delta: Any) -> dict[str, Any]:
    choice = {"index": 0, "delta": {"content": content, **delta}, "token_ids": ids,
              "logprobs": None, "finish_reason": None}  # fmt: skip
    return {"choices": [choice]}


def test_plain_chunks_of_one_read_become_one_frame() -> None:
    builder = FrameBuilder(CHAT)
    builder.add({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
                 "prompt_token_ids": [1, 2]})  # fmt: skip
    for piece, tid in (("Hel", 10), ("lo", 11), (" world", 12)):
        builder.add(chat_chunk(piece, [tid]))
    frames = builder.take()
    assert frames is not None
    [frame] = frames.choices
    assert (frame.text, list(frame.token_ids)) == ("Hello world", [10, 11, 12])
    assert list(frames.prompt_token_ids) == [1, 2]
    assert builder.take() is None  # nothing left over for the next read


def test_a_chunk_with_tool_calls_or_logprobs_keeps_its_place() -> None:
    builder = FrameBuilder(CHAT)
    builder.add(chat_chunk("a", [1]))
    builder.add(chat_chunk("b", [2]))
    call = [{"index": 0, "function": {"name": "f", "arguments": "{}"}}]
    builder.add(chat_chunk(None, [3], tool_calls=call))
    builder.add(chat_chunk("c", [4]))
    frames = builder.take()
    assert frames is not None
    assert [f.text for f in frames.choices] == ["ab", "", "c"]
    assert [list(f.token_ids) for f in frames.choices] == [[1, 2], [3], [4]]
    assert frames.choices[1].delta_json  # the tool call travels as the engine's JSON
    out = Output()
    out.add_frames(frames)
    assert out.texts() == ["abf{}c"]  # content, then the call's name and arguments, in order
    assert out.choices[0].token_ids == [1, 2, 3, 4]


def test_completion_chunks_carry_logprobs_apart_and_the_usage_once() -> None:
    builder = FrameBuilder(COMPLETIONS)
    logprobs = {"tokens": ["x"], "token_logprobs": [-0.1]}
    builder.add({"choices": [{"index": 0, "text": "x", "token_ids": [7], "logprobs": logprobs,
                              "prompt_token_ids": [5, 6]}]})  # fmt: skip
    builder.add({"choices": [{"index": 0, "text": "y", "token_ids": [8],
                              "finish_reason": "length"}]})  # fmt: skip
    builder.add({"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 2}})
    frames = builder.take()
    assert frames is not None
    assert [f.text for f in frames.choices] == ["x", "y"]
    assert frames.choices[0].logprobs_json
    assert not frames.choices[1].logprobs_json
    assert frames.choices[1].finish_reason == "length"
    assert (frames.usage.prompt_tokens, frames.usage.completion_tokens) == (2, 2)
    assert list(frames.prompt_token_ids) == [5, 6]


async def test_a_jobs_frames_queued_together_leave_in_one_event() -> None:
    outbox: Outbox = asyncio.Queue()

    def frames(rid: str, text: str, ids: list[int], finish: str = "") -> pb.WorkerMessage:
        frame = pb.TokenFrame(index=0, text=text, token_ids=ids, finish_reason=finish)
        return pb.WorkerMessage(job_event=pb.JobEvent(request_id=rid, frames=pb.Frames(
            choices=[frame])))  # fmt: skip

    receipt = pb.WorkerMessage(job_event=pb.JobEvent(request_id="a", receipt=pb.SignedReceipt()))
    for message in (frames("a", "He", [1]), frames("b", "x", [9]), frames("a", "llo", [2]),
                    frames("a", "!", [3], "stop"), receipt, None):  # fmt: skip
        outbox.put_nowait(message)
    sent = [m async for m in outgoing(outbox)]
    [batch] = sent
    events = batch.job_events.events
    assert [(e.request_id, e.WhichOneof("kind")) for e in events] == [
        ("a", "frames"), ("b", "frames"), ("a", "receipt")]  # fmt: skip
    [merged] = events[0].frames.choices
    assert (merged.text, list(merged.token_ids), merged.finish_reason) == ("Hello!", [1, 2, 3],
                                                                          "stop")  # fmt: skip


async def test_a_jobs_buffer_is_announced_once_and_taken_whole_when_the_stream_is_ready() -> None:
    """Chunks the relay adds while the sender is busy wait in the job's buffer: the sender is
    told once, and everything added by the time it sends leaves as one frames event, before
    the receipt queued after it; a chunk added after the take announces the buffer again."""
    outbox: Outbox = asyncio.Queue()
    buffer = FrameBuffer("a", CHAT)
    announced = [buffer.add(chat_chunk(piece, [i])) for i, piece in enumerate(("He", "l", "lo"))]
    assert announced == [True, False, False]
    outbox.put_nowait(buffer)
    assert not buffer.add(chat_chunk("!", [3]))  # still waiting: no second announcement
    receipt = pb.WorkerMessage(job_event=pb.JobEvent(request_id="a", receipt=pb.SignedReceipt()))
    outbox.put_nowait(receipt)
    outbox.put_nowait(None)
    [batch] = [m async for m in outgoing(outbox)]
    events = batch.job_events.events
    assert [e.WhichOneof("kind") for e in events] == ["frames", "receipt"]
    [frame] = events[0].frames.choices
    assert (frame.text, list(frame.token_ids)) == ("Hello!", [0, 1, 2, 3])
    assert buffer.take() is None  # nothing was left behind
    assert buffer.add(chat_chunk(" more", [4]))  # after a take, the next chunk is news
