"""The engine interface: something that serves an OpenAI-compatible API for one model."""

from __future__ import annotations

from typing import Protocol

import httpx


class Engine(Protocol):
    @property
    def served_model(self) -> str:
        """The model name the engine answers to."""
        ...

    @property
    def base_url(self) -> str:
        """Its OpenAI base URL, ending in /v1."""
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


async def is_serving(base_url: str, timeout_s: float = 2.0) -> bool:
    """True when GET {base_url}/models answers 200."""
    try:
        async with httpx.AsyncClient(timeout=timeout_s) as client:
            response = await client.get(f"{base_url}/models")
    except httpx.HTTPError:
        return False
    return response.status_code == 200
