"""What an OpenAI completion produced, read the same way by the worker that signs a receipt and
the coordinator that checks it: generated text, tool-call text and token ids per choice."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

CHAT = "chat"
COMPLETIONS = "completions"


@dataclass
class ChoiceOutput:
    text: str = ""  # content, then each tool call's name and arguments, in arrival order
    token_ids: list[int] = field(default_factory=list)  # when the engine returned them
    finish_reason: str | None = None


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


@dataclass
class Output:
    """Accumulated output of every choice of one job."""

    choices: dict[int, ChoiceOutput] = field(default_factory=dict)
    prompt_tokens: int | None = None  # from the engine's usage
    completion_tokens: int | None = None
    prompt_token_ids: list[int] | None = None

    def add(self, endpoint: str, chunk: dict[str, Any], *, streamed: bool) -> None:
        """Fold one stream chunk (or a whole non-streamed response) in."""
        if chunk.get("prompt_token_ids"):  # chat streams put it at the top level
            self.prompt_token_ids = list(chunk["prompt_token_ids"])
        for choice in chunk.get("choices") or ():
            out = self.choices.setdefault(int(choice.get("index", 0)), ChoiceOutput())
            out.text += choice_delta(endpoint, choice, streamed=streamed)
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

    def texts(self) -> list[str]:
        return [self.choices[i].text for i in sorted(self.choices)]

    def tokens_delivered(self) -> int:
        """Completion tokens seen as token ids (exact when the engine returned them)."""
        return sum(len(c.token_ids) for c in self.choices.values())

    def finish_reason(self) -> str:
        first = self.choices.get(0)
        return (first.finish_reason if first else None) or "stop"


def prompt_of(endpoint: str, body: dict[str, Any]) -> Any:
    """The part of a request that the prompt hash covers."""
    return body.get("messages") if endpoint == CHAT else body.get("prompt")
