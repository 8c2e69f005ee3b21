"""Request bodies of the OpenAI endpoints: only what the coordinator itself relies on is checked;
every other field passes through to the engine (unknown fields are ignored the way vLLM does)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from coordinator.services.routing import Preferences

MICRO = 1_000_000


class MaxPrice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: float | None = Field(default=None, ge=0)  # USD (account currency) per 1M tokens
    completion: float | None = Field(default=None, ge=0)


class ProviderPreferences(BaseModel):
    """OpenRouter-style routing preferences (send with the SDK's `extra_body`). Unknown keys
    are an error here: a typo in a price limit must not be silently ignored."""

    model_config = ConfigDict(extra="forbid")
    sort: Literal["price", "latency", "throughput"] | None = None
    max_price: MaxPrice | None = None
    order: list[str] = Field(default_factory=list)  # worker node ids, tried first in this order
    ignore: list[str] = Field(default_factory=list)  # worker node ids never to use
    allow_fallbacks: bool = True

    def to_preferences(self) -> Preferences:
        price = self.max_price or MaxPrice()
        return Preferences(
            sort=self.sort,
            max_price_prompt=None if price.prompt is None else round(price.prompt * MICRO),
            max_price_completion=(
                None if price.completion is None else round(price.completion * MICRO)
            ),
            order=tuple(self.order),
            ignore=frozenset(self.ignore),
            allow_fallbacks=self.allow_fallbacks,
        )


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    n: int = Field(default=1, ge=1, le=16)
    provider: ProviderPreferences = Field(default_factory=ProviderPreferences)
    return_token_ids: bool = False

    @property
    def max_output_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionBody(_Common):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    @property
    def max_output_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionBody(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
