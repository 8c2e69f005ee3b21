"""Token frames on the worker: a job's engine chunks merged per choice while they wait for the
gRPC stream (`FrameBuffer` over a `FrameBuilder`), and frames that meet in one outgoing batch
merged again (`merge_frames`), so the coordinator gets as few, as full, typed messages as the
timing allows and no message is built per token."""

from __future__ import annotations

from typing import Any

import msgspec

from protocol.completions import CHAT, cached_tokens_of
from protocol.proto import session_pb2 as pb

_encode = msgspec.json.Encoder().encode


class FrameBuilder:
    """Merges engine chunks into one `Frames` message, until it is taken."""

    def __init__(self, endpoint: str) -> None:
        self._chat = endpoint == CHAT
        self._open: dict[int, tuple[list[str], list[int], pb.TokenFrame]] = {}
        self.frames = pb.Frames()

    def add(self, chunk: dict[str, Any]) -> None:
        ids = chunk.get("prompt_token_ids")
        if ids and not self.frames.prompt_token_ids:  # chat with n > 1 repeats it per choice
            self.frames.prompt_token_ids.extend(ids)
        for choice in chunk.get("choices") or ():
            self._choice(choice)
        usage = chunk.get("usage")
        if usage:
            self.frames.usage.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            self.frames.usage.completion_tokens = int(usage.get("completion_tokens") or 0)
            self.frames.usage.cached_tokens = cached_tokens_of(usage)

    def _choice(self, choice: dict[str, Any]) -> None:
        index = int(choice.get("index") or 0)
        if choice.get("prompt_token_ids") and not self.frames.prompt_token_ids:
            self.frames.prompt_token_ids.extend(choice["prompt_token_ids"])
        if self._chat:
            delta = dict(choice.get("delta") or {})
            text = delta.pop("content", None) or ""
            delta.pop("role", None)  # the coordinator writes the role itself
            extra = {k: v for k, v in delta.items() if v is not None}
        else:
            text, extra = choice.get("text") or "", {}
        logprobs = choice.get("logprobs")
        token_ids = choice.get("token_ids") or ()
        finish = choice.get("finish_reason") or ""
        if extra or logprobs is not None:  # kept apart, exactly as the engine sent it
            self._close(index)
            frame = self.frames.choices.add(index=index, text=text, finish_reason=finish)
            frame.token_ids.extend(token_ids)
            if extra:
                frame.delta_json = _encode(extra)
            if logprobs is not None:
                frame.logprobs_json = _encode(logprobs)
            return
        merged = self._open.get(index)
        if merged is None:
            frame = self.frames.choices.add(index=index)
            merged = self._open[index] = ([], [], frame)
        if text:
            merged[0].append(text)
        merged[1].extend(token_ids)
        if finish:
            merged[2].finish_reason = finish

    def _close(self, index: int) -> None:
        """Write the merged frame of a choice; what comes next for it starts a new one."""
        merged = self._open.pop(index, None)
        if merged is not None:
            parts, ids, frame = merged
            frame.text = "".join(parts)
            frame.token_ids.extend(ids)

    def take(self) -> pb.Frames | None:
        """The frames built so far (None if nothing was added to relay)."""
        for index in list(self._open):
            self._close(index)
        frames, self.frames, self._open = self.frames, pb.Frames(), {}
        if not frames.choices and not frames.prompt_token_ids and not frames.HasField("usage"):
            return None
        return frames


class FrameBuffer:
    """One job's frames waiting for the gRPC stream. The relay adds engine chunks as it reads
    them and announces the buffer to the session's sender only when it was empty; the sender
    takes everything added by the time it is ready to send. So what the engine wrote in one
    burst, or what piled up while the stream was busy, leaves as one message."""

    def __init__(self, request_id: str, endpoint: str) -> None:
        self.request_id = request_id
        self._builder = FrameBuilder(endpoint)
        self._announced = False

    def add(self, chunk: dict[str, Any]) -> bool:
        """Fold an engine chunk in; True if the sender must now be told (it was not)."""
        self._builder.add(chunk)
        if self._announced:
            return False
        self._announced = True
        return True

    def take(self) -> pb.Frames | None:
        """Everything added since the last take (None if nothing)."""
        self._announced = False
        return self._builder.take()


def merge_frames(into: pb.Frames, more: pb.Frames) -> None:
    """Append `more` to `into`, as if the engine had produced both in one read: a plain frame
    extends the same choice's last plain frame; anything else keeps its own frame."""
    if more.prompt_token_ids and not into.prompt_token_ids:
        into.prompt_token_ids.extend(more.prompt_token_ids)
    last: dict[int, pb.TokenFrame] = {}
    for frame in into.choices:
        last[frame.index] = frame
    for frame in more.choices:
        tail = last.get(frame.index)
        plain = not (frame.delta_json or frame.logprobs_json)
        if (
            tail is not None and plain and not tail.finish_reason
            and not (tail.delta_json or tail.logprobs_json)
        ):  # fmt: skip
            tail.text += frame.text
            tail.token_ids.extend(frame.token_ids)
            tail.finish_reason = frame.finish_reason
        else:
            last[frame.index] = into.choices.add()
            last[frame.index].CopyFrom(frame)
    if more.HasField("usage"):
        into.usage.CopyFrom(more.usage)
