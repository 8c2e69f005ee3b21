"""Shadow traffic: a copy of a client's request runs on a release's shadow version, so an
operator can compare a candidate on real traffic before it serves anyone. The copy is never
returned to the client and never billed (its receipt is not settled); how it did (errors,
TTFT, whether its text matched what the client got) goes to the release book."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

import msgspec

from coordinator.services.releases.book import ReleaseBook
from coordinator.services.releases.policy import Version
from coordinator.services.request_path.fulfilment import Fulfilment
from coordinator.services.routing import Preferences, RouteRequest
from protocol.completions import CHAT

if TYPE_CHECKING:
    from coordinator.services.request_path.path import RequestPath

log = logging.getLogger("agora.coordinator.shadow")
PRIMARY_WAIT_S = 300.0  # how long a shadow copy waits for the client's answer to compare


async def shadow_copy(
    path: RequestPath, primary: Fulfilment, version: Version, releases: ReleaseBook
) -> None:
    request = primary.request
    body = {k: v for k, v in request.body.items() if k not in ("stream", "stream_options")}
    body["model"] = version.serves
    adapter = version.adapter_sha256 or ""
    bound = RouteRequest(version.serves, path.prompt_bound(request),
                         primary.max_tokens * request.choices, adapter)  # fmt: skip
    prefs = request.prefs  # only where the client's policy lets its prompt go
    allowed = Preferences(data_retention=prefs.data_retention, regions=prefs.regions,
                          min_reputation=prefs.min_reputation)  # fmt: skip
    decision = path.router.decide(bound, allowed, set())
    slot = next(
        (s for scored in decision.ranked if (s := path.slot(scored.node_id, version.serves))),
        None,
    )
    if slot is None:  # no room for a copy: the candidate is not to blame
        log.info("no worker free for a shadow copy of %s on %s", primary.request_id, version.ref)
        return
    attempt = path.dispatcher.open(
        slot, job_id=f"{primary.request_id}~shadow", client=primary.principal.client,
        model=version.serves, endpoint=request.endpoint, body=body, adapter=adapter,
    )  # fmt: skip
    started = time.monotonic()
    try:
        event = await path.dispatcher.first_event(attempt)
    finally:
        attempt.end()
    if event.WhichOneof("kind") != "response":
        releases.observe_shadow(version, failed=True, ttft_s=None, agreed=None)
        return
    ttft = time.monotonic() - started
    text = _first_text(request.endpoint, event.response)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(PRIMARY_WAIT_S):
            await primary.ended.wait()
    agreed = text == primary.text() if primary.ended.is_set() and primary.settled else None
    releases.observe_shadow(version, failed=False, ttft_s=ttft, agreed=agreed)


def _first_text(endpoint: str, response: bytes) -> str:
    choices = msgspec.json.decode(response).get("choices") or [{}]
    first = choices[0]
    if endpoint == CHAT:
        return str((first.get("message") or {}).get("content") or "")
    return str(first.get("text") or "")
