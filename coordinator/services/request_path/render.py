"""The client's side of the relay: OpenAI stream chunks written straight from typed token
frames (no JSON parsed, one small string encoded per frame), and whole responses rewritten
once. Pure functions and a per-request renderer; no I/O."""

from __future__ import annotations

from typing import Any

import msgspec

from coordinator.errors import CoordinatorError, UpstreamFailed, error_body
from protocol.completions import CHAT, Output, vector_of
from protocol.proto import session_pb2 as pb

DONE = b"data: [DONE]\n\n"
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode
_TOKEN_ID_KEYS = ("token_ids", "prompt_token_ids")


class StreamRenderer:
    """SSE events for one request, in its client's endpoint shape (a chat continued on a
    completion worker still streams chat chunks: frames carry no endpoint)."""

    def __init__(
        self, endpoint: str, response_id: str, created: int, model: str, wants_token_ids: bool
    ) -> None:
        self._chat = endpoint == CHAT
        kind = "chat.completion.chunk" if self._chat else "text_completion"
        head = _encode({"id": response_id, "object": kind, "created": created, "model": model})
        self._head = b"data: " + head[:-1] + b',"choices":['
        self._usage_head = head[:-1] + b',"choices":[],"usage":'
        self._ids = wants_token_ids
        self._roled: set[int] = set()  # chat choices whose role was announced
        self._prompt_ids: list[int] | None = None  # to hand the client with its next chunk
        self._prompt_ids_sent = False  # a continuation's prompt (prompt + output) is not shown

    def frames(self, frames: pb.Frames) -> list[bytes]:
        """One SSE event per frame; nothing for frames without choices (usage, prompt ids)."""
        if self._ids and frames.prompt_token_ids and not self._prompt_ids_sent:
            self._prompt_ids = list(frames.prompt_token_ids)  # the first segment's, once
            self._prompt_ids_sent = True
        return [self._event(frame) for frame in frames.choices]

    def _event(self, frame: pb.TokenFrame) -> bytes:
        finish = _encode(frame.finish_reason) if frame.finish_reason else b"null"
        logprobs = frame.logprobs_json or b"null"
        if self._chat:
            if frame.delta_json:
                delta: dict[str, Any] = _decode(frame.delta_json)
                if frame.text:
                    delta["content"] = frame.text
                body = _encode(delta)[1:-1]
            else:
                body = b'"content":' + _encode(frame.text)
            if frame.index not in self._roled:
                self._roled.add(frame.index)
                body = b'"role":"assistant",' + body if body else b'"role":"assistant"'
            choice = b'{"index":%d,"delta":{%s},"logprobs":%s,"finish_reason":%s' % (
                frame.index, body, logprobs, finish,
            )  # fmt: skip
        else:
            choice = b'{"index":%d,"text":%s,"logprobs":%s,"finish_reason":%s' % (
                frame.index, _encode(frame.text), logprobs, finish,
            )  # fmt: skip
        tail = b"]}\n\n"
        if self._ids:
            choice += b',"token_ids":' + _encode(list(frame.token_ids))
            if self._prompt_ids is not None:
                ids = _encode(self._prompt_ids)
                self._prompt_ids = None
                if self._chat:
                    tail = b'],"prompt_token_ids":' + ids + b"}\n\n"
                else:
                    choice += b',"prompt_token_ids":' + ids
        return self._head + choice + b"}" + tail

    def usage(self, usage: dict[str, Any]) -> bytes:
        return b"data: " + self._usage_head + _encode(usage) + b"}\n\n"


def error_event(exc: CoordinatorError) -> bytes:
    """The SSE convention for an error after the stream began: `data: {"error": …}`."""
    return b"data: " + _encode(error_body(exc)) + b"\n\n"


def decode_json(raw: bytes) -> dict[str, Any]:
    value = _decode(raw)
    if not isinstance(value, dict):
        raise UpstreamFailed("the worker's response is not a JSON object")
    return value


def whole_response(
    result: dict[str, Any], response_id: str, model: str, wants_token_ids: bool
) -> dict[str, Any]:
    """A worker's non-streamed response (decoded) as the client gets it, rewritten in place."""
    result.update(id=response_id, model=model)
    if not wants_token_ids:
        result.pop("prompt_token_ids", None)
        for choice in result.get("choices") or ():
            for key in _TOKEN_ID_KEYS:
                choice.pop(key, None)
    return result


def embeddings_response(
    observed: Output, response_id: str, model: str, body: dict[str, Any]
) -> dict[str, Any]:
    """An embeddings answer as OpenAI shapes it, from the vectors the receipt's hash covers:
    base64 (little-endian float32) as the worker sent them, or their floats; the usage is
    filled in once billed."""
    as_text = body.get("encoding_format") == "base64"
    vectors = observed.choices
    data = [
        {"object": "embedding", "index": index,
         "embedding": vectors[index].text if as_text else vector_of(vectors[index].text)}
        for index in sorted(vectors)
    ]  # fmt: skip
    return {"object": "list", "id": response_id, "model": model, "data": data, "usage": {}}
