"""Continuing a stream on another worker after the first one died or stalled mid-generation.

The continuation is a text completion whose prompt is the token ids of the original prompt
followed by the token ids already delivered, so the new worker picks up exactly where the old
one stopped (with greedy decoding on the same model the client gets the same text as an
uninterrupted run: no token lost or duplicated). Token frames carry no endpoint, so a chat's
client keeps getting chat chunks. Pure functions over plain values.
"""

from __future__ import annotations

from typing import Any

from protocol.completions import CHAT, ChoiceOutput, Output

# sampling and stopping parameters that mean the same on /v1/completions
_CARRIED = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "stop_token_ids",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "ignore_eos",
    "min_tokens",
    "skip_special_tokens",
)


def why_not_continuable(endpoint: str, body: dict[str, Any], delivered: Output) -> str | None:
    """None if a continuation can reproduce the rest of this request, else the reason."""
    if int(body.get("n") or 1) != 1:
        return "n > 1"
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) > 1 and not isinstance(prompt[0], int):
        return "a batch of prompts"

    if body.get("tools") or body.get("response_format"):
        return "tool calls and structured output keep parser state a worker cannot hand over"
    if body.get("logprobs") or body.get("top_logprobs") or body.get("echo"):
        return "logprobs are not carried across workers"
    if delivered.prompt_token_ids is None:
        return "the engine did not report prompt token ids"
    choice = delivered.choices.get(0)
    if choice is None or not choice.token_ids:
        return "no token ids were delivered"
    return None


def continuation_body(
    endpoint: str, body: dict[str, Any], delivered: Output, max_tokens: int | None
) -> dict[str, Any]:
    """The /v1/completions body that generates the rest. `max_tokens` is the original bound."""
    assert delivered.prompt_token_ids is not None
    generated = delivered.choices[0].token_ids
    out: dict[str, Any] = {key: body[key] for key in _CARRIED if key in body}
    out["prompt"] = list(delivered.prompt_token_ids) + list(generated)
    if max_tokens is not None:
        out["max_tokens"] = max(1, max_tokens - len(generated))
    out["stream"] = True
    out["stream_options"] = {"include_usage": True}
    out["return_token_ids"] = True
    if endpoint == CHAT:
        out.setdefault("skip_special_tokens", True)
    return out


def delivered_so_far(segments: list[Output]) -> Output:
    """What the client got across segments, as one output: the first job's prompt ids, then
    the generated ids of every segment in order (each continuation built on the previous)."""
    merged = Output(prompt_token_ids=segments[0].prompt_token_ids)
    choice = ChoiceOutput()
    for segment in segments:
        part = segment.choices.get(0)
        if part is not None:
            choice.append(part.text)
            choice.token_ids.extend(part.token_ids)
    merged.choices[0] = choice
    return merged
