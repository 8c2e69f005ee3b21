"""An OpenAI-compatible server someone else runs (vLLM, SGLang, llama.cpp…), attached by URL."""

from __future__ import annotations

from worker_node.engines.base import is_serving, probe_client
from worker_node.errors import EngineError


class AttachedEngine:
    def __init__(self, base_url: str, served_model: str) -> None:
        self._base_url = base_url.rstrip("/")
        if not self._base_url.endswith("/v1"):
            self._base_url += "/v1"
        self._served_model = served_model
        self._probe = probe_client()

    @property
    def served_model(self) -> str:
        return self._served_model

    @property
    def base_url(self) -> str:
        return self._base_url

    async def start(self) -> None:
        if not await is_serving(self._probe, self._base_url, timeout_s=10.0):
            raise EngineError(f"no OpenAI-compatible server answers at {self._base_url}/models")

    @property
    def pid(self) -> int | None:
        return None

    @property
    def reaped_pid(self) -> int | None:
        return None  # not ours to start, nor to reap

    async def stop(self) -> None:
        """Nothing to stop (we did not start it); only our probe connection closes."""
        await self._probe.aclose()
        self._probe = probe_client()

    async def healthy(self) -> bool:
        return await is_serving(self._probe, self._base_url, timeout_s=5.0)

    async def restart(self) -> None:
        await self.start()  # someone else runs it: all we can do is check it is back
