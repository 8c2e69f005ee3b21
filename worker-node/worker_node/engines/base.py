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

    @property
    def reaped_pid(self) -> int | None:
        """An engine left running by a node that died, killed before this one started."""
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


def probe_client() -> httpx.AsyncClient:
    """A client for health probes, made once per engine: building one costs tens of ms of CPU
    (TLS context), far too much to pay twice a second on the event loop."""
    return httpx.AsyncClient(timeout=2.0, limits=httpx.Limits(max_connections=2))


async def is_serving(client: httpx.AsyncClient, base_url: str, timeout_s: float = 2.0) -> bool:
    """True when GET {base_url}/models answers 200."""
    try:
        response = await client.get(f"{base_url}/models", timeout=timeout_s)
    except httpx.HTTPError:
        return False
    return response.status_code == 200
