"""A client's request as the request path sees it (validated, plain values): a completion, or
embeddings (which generate nothing: no completion tokens, never streamed)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from coordinator.services.policy.run import PolicyRun
from coordinator.services.routing import Preferences
from protocol.advert import EMBED, GENERATE
from protocol.completions import CHAT, EMBEDDINGS, prompt_of

_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True)
class CompletionRequest:
    endpoint: str  # CHAT, COMPLETIONS or EMBEDDINGS
    model: str
    body: dict[str, Any]  # the client's JSON, validated; unknown fields pass through
    stream: bool
    include_usage: bool
    max_tokens: int | None
    prefs: Preferences = field(default_factory=Preferences)
    wants_token_ids: bool = False  # the client itself asked for return_token_ids
    fallbacks: tuple[str, ...] = ()  # models to try in order if `model` cannot serve it
    shown_model: str = ""  # the name responses carry (a release's `name@version`)
    adapter: str = ""  # sha256 of the LoRA adapter its version runs ("" = the base model)
    session: str = ""  # a conversation's key (`user`, or X-Agora-Session): kept on one worker
    cache: bool = False  # the client opted in to the response cache (X-Agora-Cache: on)
    batch: bool = False  # a Batch API line: the workers' batch prices, never queued
    # told once its first job is sent to a worker (holding a slot): a batch counts its lines
    on_dispatch: Callable[[], None] | None = field(default=None, compare=False, repr=False)
    # the client's policy at work on this request (its body is already the redacted one)
    policy: PolicyRun | None = field(default=None, compare=False, repr=False)

    @property
    def model_shown(self) -> str:
        return self.shown_model or self.model

    @property
    def prompt(self) -> Any:
        return prompt_of(self.endpoint, self.body)

    @property
    def choices(self) -> int:
        """How many completions it asks for: `n` per prompt, and a completion request may
        carry a batch of prompts (strings or token-id lists). Cost bounds scale with it."""
        n = self.body.get("n")
        per_prompt = n if isinstance(n, int) and n > 0 else 1
        prompt = self.prompt
        batch = (
            len(prompt)
            if self.endpoint != CHAT and isinstance(prompt, list) and prompt
            and all(isinstance(p, str | list) for p in prompt)
            else 1
        )  # fmt: skip
        return per_prompt * batch

    @property
    def response_prefix(self) -> str:
        return {CHAT: "chatcmpl", EMBEDDINGS: "embd"}.get(self.endpoint, "cmpl")

    @property
    def task(self) -> str:
        """What it needs of a model (protocol.advert): vectors, or generated tokens."""
        return EMBED if self.endpoint == EMBEDDINGS else GENERATE


def prompt_token_bound(request: CompletionRequest) -> int:
    """An upper bound of prompt tokens without a tokenizer: byte-level BPE never produces more
    tokens than bytes, and the JSON framing over-covers chat-template tokens."""
    return len(_encode(request.prompt)) + 16
