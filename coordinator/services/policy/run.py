"""One request's use of a policy: its prompt rewritten before routing, its output passed
through one gate per choice (streamed frames or a whole response), its finished answer shown
to the after-steps, and what every step did (kinds and counts) for the audit log."""

from __future__ import annotations

from typing import Any

from coordinator.services.policy.compiled import Policy
from coordinator.services.policy.gate import OutputGate
from coordinator.services.policy.steps import (
    AFTER,
    INPUT,
    OUTPUT,
    Hit,
    PolicyViolation,
    Scope,
)
from protocol.completions import CHAT, EMBEDDINGS
from protocol.proto import session_pb2 as pb

CONTENT_FILTER = "content_filter"  # OpenAI's finish reason for withheld output


class PolicyRun:
    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.scope = Scope()
        self._input = policy.at(INPUT)
        self._output = policy.at(OUTPUT)
        self._after = policy.at(AFTER)
        self._gates: dict[int, OutputGate] = {}
        self._finished: set[int] = set()
        self.stopped = False  # a step withheld the rest of the answer
        self.recorded = False  # its hits went to the audit log

    # ---------------------------------------------------------------- input
    def redact(self, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        """The body the provider gets: every prompt text through the input steps in order."""
        if not self._input:
            return body
        if endpoint == CHAT:
            messages = body.get("messages")
            if isinstance(messages, list):
                return {**body, "messages": [self._message(m) for m in messages]}
            return body
        key = "input" if endpoint == EMBEDDINGS else "prompt"
        prompt = body.get(key)
        if isinstance(prompt, str):
            return {**body, key: self._text(prompt)}
        if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
            return {**body, key: [self._text(p) for p in prompt]}
        if prompt is not None:
            raise PolicyViolation("token-id prompts cannot be checked; send text", ("token_ids",))
        return body

    def _message(self, message: Any) -> Any:
        if not isinstance(message, dict):
            return message
        out = dict(message)
        content = message.get("content")
        if isinstance(content, str):
            out["content"] = self._text(content)
        elif isinstance(content, list):
            out["content"] = [
                {**p, "text": self._text(p["text"])}
                if isinstance(p, dict) and isinstance(p.get("text"), str) else p
                for p in content
            ]  # fmt: skip
        calls = message.get("tool_calls")
        if isinstance(calls, list):  # earlier turns' tool arguments are prompt text too
            out["tool_calls"] = [self._call(c) for c in calls]
        return out

    def _call(self, call: Any) -> Any:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
            return call
        return {**call, "function": {**function, "arguments": self._text(function["arguments"])}}

    def _text(self, text: str) -> str:
        for step in self._input:
            text = step.on_input(text, self.scope)
        return text

    # ---------------------------------------------------------------- output
    @property
    def gates_output(self) -> bool:
        return bool(self._output or self.scope.placeholders)

    def _gate(self, index: int) -> OutputGate:
        gate = self._gates.get(index)
        if gate is None:
            gate = self._gates[index] = OutputGate(self.scope.placeholders, self._output)
        return gate

    def frames(self, frames: pb.Frames) -> bool:
        """Rewrite a batch of stream frames in place: text held back, placeholders put back;
        at a block the choice ends with `content_filter`, the others too, and later frames
        are dropped. True when this batch is where the answer stopped."""
        if self.stopped:
            del frames.choices[:]
            return False
        gates = self._gates
        for position, frame in enumerate(frames.choices):
            index = frame.index
            gate = gates.get(index) or self._gate(index)
            final = bool(frame.finish_reason)
            frame.text = gate.feed(frame.text, final)
            if frame.delta_json:  # reasoning text is not filtered: it is not relayed either
                frame.delta_json = b""
            if final:
                self._finished.add(index)
            if gate.blocked is not None:
                frame.finish_reason = CONTENT_FILTER
                self._stop(frames, position)
                return True
        return False

    def _stop(self, frames: pb.Frames, position: int) -> None:
        """End the answer at the frame in `position`: the frames before it go out as fed,
        later ones never; every choice still open ends with `content_filter`."""
        self.stopped = True
        at = frames.choices[position].index
        del frames.choices[position + 1 :]
        self._finished.add(at)
        for index in sorted(set(self._gates) - self._finished):
            frames.choices.append(pb.TokenFrame(index=index, finish_reason=CONTENT_FILTER))
            self._finished.add(index)

    def whole(self, endpoint: str, result: dict[str, Any]) -> None:
        """Rewrite a whole (non-streamed) answer in place."""
        for choice in result.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            gate = self._gate(int(choice.get("index") or 0))
            if endpoint == CHAT:
                message = choice.get("message")
                if isinstance(message, dict):
                    for unfiltered in ("reasoning_content", "reasoning"):
                        message.pop(unfiltered, None)  # not filtered: not relayed
                if isinstance(message, dict) and isinstance(message.get("content"), str):
                    message["content"] = gate.feed(message["content"], final=True)
            elif isinstance(choice.get("text"), str):
                choice["text"] = gate.feed(choice["text"], final=True)
            if gate.blocked is not None:
                choice["finish_reason"] = CONTENT_FILTER
                self.stopped = True

    # ---------------------------------------------------------------- after
    def finish(self, texts: dict[int, str]) -> None:
        """The after-steps, over each choice's text as the client got it (`texts`: the
        engine's, used where no gate changed it)."""
        for index, text in sorted(texts.items()):
            gate = self._gates.get(index)
            shown = "".join(gate.shown) if gate is not None else text
            for step in self._after:
                step.after(shown, self.scope)

    def hits(self) -> list[Hit]:
        """What every step did to this request (kinds and counts, never values)."""
        out = list(self.scope.hits)
        restored = sum(g.restored for g in self._gates.values())
        if restored:
            out.append(Hit("pii", OUTPUT, "placeholder", restored, "restore"))
        for gate in self._gates.values():
            if gate.blocked is not None:
                out.append(Hit(gate.blocked.step, OUTPUT, gate.blocked.entity, 1, "block"))
        return out
