"""What an OpenAI completion produced, read the same way by the worker that signs a receipt and
the coordinator that checks it: generated text, tool-call text and token ids per choice.

An embeddings response is read the same way: each input's vector is one "choice" whose text is
the vector as OpenAI's base64 encoding (little-endian float32, what vLLM computes), so the
output hash, the receipt and the relay need nothing of their own, and float and base64
answers to a client are the same bytes.

Streams arrive as typed token frames (protocol/proto/session.proto `Frames`); whole
(non-streamed) responses as the engine's JSON. Text is kept as a list of parts and joined once
when read, so a long stream costs no quadratic copying.
"""

from __future__ import annotations

import array
import base64
import sys
from dataclasses import dataclass, field
from typing import Any

import msgspec

from protocol.proto import session_pb2 as pb

CHAT = "chat"
COMPLETIONS = "completions"
EMBEDDINGS = "embeddings"


@dataclass
class ChoiceOutput:
    """One choice: content, then each tool call's name and arguments, in arrival order."""

    parts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)  # when the engine returned them
    finish_reason: str | None = None

    @classmethod
    def of(cls, text: str, token_ids: list[int] | None = None) -> ChoiceOutput:
        return cls([text] if text else [], list(token_ids or ()))

    @property
    def text(self) -> str:
        if len(self.parts) > 1:
            self.parts[:] = ["".join(self.parts)]
        return self.parts[0] if self.parts else ""

    def append(self, text: str) -> None:
        if text:
            self.parts.append(text)

    @property
    def produced(self) -> bool:
        return bool(self.parts or self.token_ids)


def _tool_call_text(calls: Any) -> str:
    parts = []
    for call in calls or ():
        function = (call or {}).get("function") or {}
        parts.append(str(function.get("name") or "") + str(function.get("arguments") or ""))
    return "".join(parts)


def choice_delta(endpoint: str, choice: dict[str, Any], *, streamed: bool) -> str:
    """The text one choice of a chunk (or of a whole response) adds."""
    if endpoint == COMPLETIONS:
        text = choice.get("text")
        return text if isinstance(text, str) else ""
    part = choice.get("delta" if streamed else "message") or {}
    content = part.get("content")
    return (content if isinstance(content, str) else "") + _tool_call_text(part.get("tool_calls"))


_json = msgspec.json.Decoder()


def frame_text(frame: pb.TokenFrame) -> str:
    """The text a frame adds to its choice's output: its text, then any tool-call text."""
    if not frame.delta_json:
        return frame.text
    delta = _json.decode(frame.delta_json)
    return frame.text + _tool_call_text(delta.get("tool_calls") if isinstance(delta, dict) else 0)


@dataclass
class Output:
    """Accumulated output of every choice of one job."""

    choices: dict[int, ChoiceOutput] = field(default_factory=dict)
    prompt_tokens: int | None = None  # from the engine's usage
    completion_tokens: int | None = None
    cached_prompt_tokens: int = 0  # prompt tokens its prefix cache held (engine's usage)
    prompt_token_ids: list[int] | None = None

    def _choice(self, index: int) -> ChoiceOutput:
        out = self.choices.get(index)
        if out is None:
            out = self.choices[index] = ChoiceOutput()
        return out

    def add(self, endpoint: str, chunk: dict[str, Any], *, streamed: bool) -> None:
        """Fold one stream chunk (or a whole non-streamed response) in, as the engine's JSON."""
        if endpoint == EMBEDDINGS:
            self._add_vectors(chunk)
            return
        if chunk.get("prompt_token_ids"):  # chat streams put it at the top level
            self.prompt_token_ids = list(chunk["prompt_token_ids"])
        for choice in chunk.get("choices") or ():
            out = self._choice(int(choice.get("index", 0)))
            out.append(choice_delta(endpoint, choice, streamed=streamed))
            if choice.get("token_ids"):
                out.token_ids.extend(int(t) for t in choice["token_ids"])
            if choice.get("prompt_token_ids"):
                self.prompt_token_ids = list(choice["prompt_token_ids"])
            if choice.get("finish_reason"):
                out.finish_reason = str(choice["finish_reason"])
        usage = chunk.get("usage")
        if usage:
            self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            self.completion_tokens = int(usage.get("completion_tokens") or 0)
            self.cached_prompt_tokens = cached_tokens_of(usage)

    def _add_vectors(self, response: dict[str, Any]) -> None:
        """Each well-formed vector (an int index; floats or a base64 string); anything else
        is left out, so a worker's malformed answer shows as missing vectors."""
        for item in response.get("data") or ():
            index = item.get("index") if isinstance(item, dict) else None
            embedding = item.get("embedding") if isinstance(item, dict) else None
            if type(index) is not int or index < 0:
                continue
            if not isinstance(embedding, str) and not (
                isinstance(embedding, list)
                and all(isinstance(x, int | float) and not isinstance(x, bool) for x in embedding)
            ):
                continue
            out = self._choice(index)
            out.parts[:] = [vector_text(embedding)]
            out.finish_reason = "stop"
        usage = response.get("usage")
        if isinstance(usage, dict):
            self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            self.completion_tokens = 0  # an embedding generates nothing

    def vectors(self) -> list[list[float]]:
        """An embeddings job's vectors, in input order."""
        return [vector_of(text) for text in self.texts()]

    def add_frames(self, frames: pb.Frames) -> None:
        """Fold one batch of typed token frames in."""
        if frames.prompt_token_ids:
            self.prompt_token_ids = list(frames.prompt_token_ids)
        for frame in frames.choices:
            out = self._choice(frame.index)
            out.append(frame_text(frame))
            out.token_ids.extend(frame.token_ids)
            if frame.finish_reason:
                out.finish_reason = frame.finish_reason
        if frames.HasField("usage"):
            self.prompt_tokens = frames.usage.prompt_tokens
            self.completion_tokens = frames.usage.completion_tokens
            self.cached_prompt_tokens = frames.usage.cached_tokens

    @property
    def produced(self) -> bool:
        return any(c.produced for c in self.choices.values())

    def texts(self) -> list[str]:
        return [self.choices[i].text for i in sorted(self.choices)]

    def tokens_delivered(self) -> int:
        """Completion tokens seen as token ids (exact when the engine returned them)."""
        return sum(len(c.token_ids) for c in self.choices.values())

    def token_counts(self) -> tuple[int, int]:
        """(prompt, completion) tokens of this job as seen on its stream: the engine's ids
        where it returned them, else its usage. The one rule for a segment's counts."""
        if self.prompt_token_ids is not None:
            prompt = len(self.prompt_token_ids)
        else:
            prompt = self.prompt_tokens or 0
        completion = self.tokens_delivered() or self.completion_tokens or 0
        return prompt, completion

    def finish_reason(self) -> str:
        first = self.choices.get(0)
        return (first.finish_reason if first else None) or "stop"


def cached_tokens_of(usage: dict[str, Any]) -> int:
    """The engine's count of prompt tokens found in its prefix cache (vLLM reports it with
    `--enable-prompt-tokens-details`, as OpenAI does: usage.prompt_tokens_details)."""
    details = usage.get("prompt_tokens_details")
    if not isinstance(details, dict):
        return 0
    cached, prompt = details.get("cached_tokens"), usage.get("prompt_tokens")
    if type(cached) is not int or cached <= 0 or type(prompt) is not int:
        return 0
    return min(cached, prompt)  # never more than the prompt (one rule for worker and coordinator)


def prompt_of(endpoint: str, body: dict[str, Any]) -> Any:
    """The part of a request that the prompt hash covers (the one definition of it)."""
    if endpoint == EMBEDDINGS:
        return body.get("input")
    return body.get("messages") if endpoint == CHAT else body.get("prompt")


def vector_text(embedding: Any) -> str:
    """An embedding (floats, or already base64) as OpenAI's base64: little-endian float32."""
    if isinstance(embedding, str):
        return embedding
    floats = array.array("f", (float(x) for x in embedding or ()))
    if sys.byteorder != "little":
        floats.byteswap()
    return base64.b64encode(floats.tobytes()).decode()


def vector_of(text: str) -> list[float]:
    """A base64 embedding's floats (a malformed one decodes to no vector)."""
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:
        return []
    floats = array.array("f")
    floats.frombytes(raw[: len(raw) - len(raw) % 4])
    if sys.byteorder != "little":
        floats.byteswap()
    return floats.tolist()
