"""Request bodies of the OpenAI endpoints, checked as strictly as OpenAI and vLLM check them
(types without coercion: `"stream": "yes"` or `"max_tokens": true` is a 400, not a guess; roles;
ranges), so a malformed request is refused before it is routed, held or billed. The body
itself passes through to the engine unchanged; fields not named here pass through unchecked
(vLLM's own extensions), the way vLLM ignores what it does not know."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from coordinator.services.routing import Preferences

MICRO = 1_000_000


class MaxPrice(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # Infinity is no price
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


Flag = Annotated[bool | None, Field(strict=True)]  # null means "the default", as in OpenAI
Count = Annotated[int, Field(strict=True)]
Number = Annotated[float, Field(strict=True)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: Flag = False


class _Common(BaseModel):
    """What both endpoints share: the coordinator's own fields and the sampling parameters."""

    model_config = ConfigDict(extra="allow")

    model: Annotated[str, Field(strict=True, min_length=1)]
    stream: Flag = False
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[int | None, Field(strict=True, ge=1)] = None
    n: Annotated[int, Field(strict=True, ge=1, le=16)] = 1
    provider: ProviderPreferences = Field(default_factory=ProviderPreferences)
    # OpenRouter's model fallbacks: tried in order when `model` has no capacity or fails
    # before its first token
    models: list[Annotated[str, Field(strict=True, min_length=1)]] = Field(
        default_factory=list, max_length=8
    )
    return_token_ids: Flag = False
    temperature: Annotated[float | None, Field(strict=True, ge=0, le=2)] = None
    top_p: Annotated[float | None, Field(strict=True, gt=0, le=1)] = None
    top_k: Count | None = None
    min_p: Annotated[float | None, Field(strict=True, ge=0, le=1)] = None
    presence_penalty: Annotated[float | None, Field(strict=True, ge=-2, le=2)] = None
    frequency_penalty: Annotated[float | None, Field(strict=True, ge=-2, le=2)] = None
    repetition_penalty: Annotated[float | None, Field(strict=True, gt=0)] = None
    seed: Count | None = None
    stop: Annotated[str, Field(strict=True)] | list[Annotated[str, Field(strict=True)]] | None = (
        None
    )
    stop_token_ids: list[Count] | None = None
    logit_bias: dict[str, Number] | None = None
    ignore_eos: Flag = False
    min_tokens: Annotated[int | None, Field(strict=True, ge=0)] = None
    skip_special_tokens: Flag = True
    user: Annotated[str | None, Field(strict=True)] = None

    @property
    def max_output_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class Message(BaseModel):
    """One chat message: a known role, and content that is text or a list of parts."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Annotated[str, Field(strict=True)] | list[dict[str, Any]] | None = None
    name: Annotated[str | None, Field(strict=True)] = None


class ChatCompletionBody(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Annotated[int | None, Field(strict=True, ge=1)] = None
    logprobs: Flag = False
    top_logprobs: Annotated[int | None, Field(strict=True, ge=0, le=20)] = None
    tools: list[dict[str, Any]] | None = None

    @property
    def max_output_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionBody(_Common):
    prompt: (
        Annotated[str, Field(strict=True)]
        | list[Annotated[str, Field(strict=True)]]
        | list[Count]
        | list[list[Count]]
    )
    logprobs: Annotated[int | None, Field(strict=True, ge=0, le=20)] = None
    echo: Flag = False
    suffix: Annotated[str | None, Field(strict=True)] = None


Text = Annotated[str, Field(strict=True)]


class EmbeddingBody(BaseModel):
    """POST /v1/embeddings: OpenAI's fields (a string, strings, token ids or lists of them;
    at most 2,048 inputs, as OpenAI), the coordinator's own; vLLM's extensions pass through."""

    model_config = ConfigDict(extra="allow")
    model: Annotated[str, Field(strict=True, min_length=1)]
    input: (
        Annotated[str, Field(strict=True, min_length=1)]
        | Annotated[list[Annotated[str, Field(strict=True, min_length=1)]],
                    Field(min_length=1, max_length=2048)]
        | Annotated[list[Count], Field(min_length=1)]
        | Annotated[list[Annotated[list[Count], Field(min_length=1)]],
                    Field(min_length=1, max_length=2048)]
    )  # fmt: skip
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int | None, Field(strict=True, ge=1)] = None
    user: Text | None = None
    provider: ProviderPreferences = Field(default_factory=ProviderPreferences)
    models: list[Annotated[str, Field(strict=True, min_length=1)]] = Field(
        default_factory=list, max_length=8
    )
