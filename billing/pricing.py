"""Prices and charges in integer micro-units (1e-6 of the account currency).

Prices are quoted per 1M tokens, as every LLM market does; a charge rounds up to the next
micro-unit once per request (never per token), so a request costs at most one micro-unit more
than its exact price and the network never pays out fractions it did not collect.
"""

from __future__ import annotations

from dataclasses import dataclass

MICRO_PER_UNIT = 1_000_000
TOKENS_PER_PRICE_UNIT = 1_000_000
BPS = 10_000


def _ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


@dataclass(frozen=True)
class Price:
    prompt_per_mtok: int  # micro-units per 1M prompt tokens
    completion_per_mtok: int  # micro-units per 1M completion tokens
    # per 1M prompt tokens the engine found in its prefix cache (None: the prompt price)
    cached_prompt_per_mtok: int | None = None

    @property
    def cached_per_mtok(self) -> int:
        cached = self.cached_prompt_per_mtok
        return self.prompt_per_mtok if cached is None else min(cached, self.prompt_per_mtok)

    def prompt_exact(self, prompt_tokens: int, cached_tokens: int = 0) -> int:
        """A prompt's cost in micro-units x 1M tokens (exact: rounding is once per request)."""
        if not 0 <= cached_tokens <= prompt_tokens:
            raise ValueError("cached tokens must be between 0 and the prompt tokens")
        fresh = prompt_tokens - cached_tokens
        return fresh * self.prompt_per_mtok + cached_tokens * self.cached_per_mtok

    def cost(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> int:
        if prompt_tokens < 0 or completion_tokens < 0:
            raise ValueError("token counts cannot be negative")
        exact = self.prompt_exact(prompt_tokens, cached_tokens)
        return _ceil_div(exact + completion_tokens * self.completion_per_mtok,
                         TOKENS_PER_PRICE_UNIT)  # fmt: skip

    def with_fee(self, fee_bps: int) -> Price:
        """The price a client sees: the provider's price plus the network fee."""
        cached = self.cached_prompt_per_mtok
        return Price(
            self.prompt_per_mtok + _ceil_div(self.prompt_per_mtok * fee_bps, BPS),
            self.completion_per_mtok + _ceil_div(self.completion_per_mtok * fee_bps, BPS),
            None if cached is None else cached + _ceil_div(cached * fee_bps, BPS),
        )


@dataclass(frozen=True)
class Charge:
    """What one request costs: the provider's share and the network's fee."""

    provider_amount: int
    fee: int

    @property
    def total(self) -> int:
        return self.provider_amount + self.fee


def charge_for(price: Price, prompt_tokens: int, completion_tokens: int, fee_bps: int) -> Charge:
    if not 0 <= fee_bps <= BPS:
        raise ValueError("fee_bps must be between 0 and 10000")
    provider_amount = price.cost(prompt_tokens, completion_tokens)
    return Charge(provider_amount, _ceil_div(provider_amount * fee_bps, BPS))


def format_micro(amount: int, currency: str = "USD") -> str:
    """Human form of a micro-unit amount, exact (no float)."""
    sign = "-" if amount < 0 else ""
    whole, frac = divmod(abs(amount), MICRO_PER_UNIT)
    return f"{sign}{whole}.{frac:06d} {currency}"


@dataclass(frozen=True)
class Segment:
    """The part of one request that one worker ran (a continuation adds segments)."""

    worker: str
    price: Price  # the worker's own price (before the network fee)
    prompt_tokens: int  # what this worker processed as prompt
    completion_tokens: int  # what it delivered to the client
    verified: bool  # its receipt checked out: only then is the provider paid
    cached_tokens: int = 0  # of its prompt tokens, those billed at the cached price


def segments_charge(segments: list[Segment], fee_bps: int) -> tuple[Charge, dict[str, int]]:
    """What the client pays for a request, and what each provider earns.

    The client pays the original prompt once (at the first worker's price, its cached tokens
    at the cached price) and every delivered
    completion token at the price of the worker that produced it; a provider earns the full
    cost of the work its verified receipt covers (a continuation's prompt included).
    """
    if not segments:
        raise ValueError("a request has at least one segment")
    if not 0 <= fee_bps <= BPS:
        raise ValueError("fee_bps must be between 0 and 10000")
    first = segments[0]
    exact = first.price.prompt_exact(first.prompt_tokens, first.cached_tokens) + sum(
        s.completion_tokens * s.price.completion_per_mtok for s in segments
    )
    client_part = _ceil_div(exact, TOKENS_PER_PRICE_UNIT)
    charge = Charge(client_part, _ceil_div(client_part * fee_bps, BPS))
    earned: dict[str, int] = {}
    for s in segments:
        if s.verified:
            earned[s.worker] = earned.get(s.worker, 0) + s.price.cost(
                s.prompt_tokens, s.completion_tokens, s.cached_tokens
            )
    return charge, earned
