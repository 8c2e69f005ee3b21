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

    @property
    def pid(self) -> int | None:
        """The engine's process id when this node spawned it."""
        ...

    async def start(self) -> None:
        """Start (or reach) the engine; raise EngineError with a reason a person can act on."""
        ...

    async def stop(self) -> None: ...

    async def healthy(self) -> bool:
        """Cheap liveness check, called about once a second by the supervisor."""
        ...

    async def restart(self) -> None:
        """Bring a dead engine back (respawn, or wait for the attached server to return)."""
        ...


async def is_serving(base_url: str, timeout_s: float = 2.0) -> bool:
    """True when GET {base_url}/models answers 200."""
    try:
        async with httpx.AsyncClient(timeout=timeout_s) as client:
            response = await client.get(f"{base_url}/models")
    except httpx.HTTPError:
        return False
    return response.status_code == 200
