"""Spot checks: re-score a sampled job's claimed output on another worker of the same model, by
one prefill with prompt logprobs (far cheaper than generating it again); an embeddings job is
embedded again and its vectors compared (cosine similarity, services.spot_judgement).

A worker whose greedy tokens are often not the reference's choice, or whose sampled tokens
fall outside the reference's likely tokens far more often than sampling allows, did not run
this model: it served another model, made text up, or replayed something else (the judgement,
and why it does not accuse honest sampling, is in services.spot_judgement).
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from coordinator.services.registry import ModelSlot, Registry
from coordinator.services.reputation import Outcome
from coordinator.services.spot_judgement import (
    CheckPolicy,
    check_body,
    judge,
    judge_vectors,
    sampled,
    sampling_temperature,
)
from coordinator.services.trust import Trust, Verdict
from protocol.advert import EMBED, GENERATE
from protocol.completions import COMPLETIONS, EMBEDDINGS, Output, cached_tokens_of

if TYPE_CHECKING:  # the request path uses spot checks, and spot checks its dispatcher
    from coordinator.services.releases.book import ReleaseBook
    from coordinator.services.request_path.dispatch import Dispatcher

log = logging.getLogger("agora.coordinator.spot_check")


@dataclass(frozen=True)
class CheckCandidate:
    """A settled request, as a spot check needs it."""

    request_id: str
    model: str
    client: str
    body: dict[str, Any]  # what the client asked
    node_id: str  # the worker that produced the first segment
    observed: Output  # what it produced
    segments: int
    adapter: str = ""  # the LoRA adapter it ran with: the check runs with the same one
    endpoint: str = COMPLETIONS  # what the client called (a cache probe calls it again)
    # the client's policy on who may see its prompt: a reference must meet it too
    data_retention: frozenset[str] = frozenset()
    regions: frozenset[str] = frozenset()


class SpotChecker:
    def __init__(
        self, dispatcher: Dispatcher, registry: Registry, trust: Trust | None,
        policy: CheckPolicy, rng: random.Random, releases: ReleaseBook | None = None,
    ) -> None:  # fmt: skip
        self._dispatcher = dispatcher
        self._releases = releases  # a failed check counts against the versions it serves
        self._registry = registry
        self._trust = trust
        self._policy = policy
        self._rng = rng
        self._background: set[asyncio.Task[None]] = set()

    def consider(self, candidate: CheckCandidate) -> None:
        """Check this settled request on another worker, and its worker's cache claims on
        itself, if it is eligible and sampled."""
        trust = self._trust
        if trust is None:
            return
        if candidate.endpoint == EMBEDDINGS:
            if sampled(self._rng, trust.on_probation(candidate.node_id), self._policy):
                self._start(self._check_vectors(candidate, trust))
            return
        temperature = sampling_temperature(candidate.body, candidate.observed, candidate.segments)
        probe = self._cache_probe_target(candidate)
        if temperature is None and probe is None:
            return
        if sampled(self._rng, trust.on_probation(candidate.node_id), self._policy):
            checks = [] if temperature is None else [self._check(candidate, trust, temperature)]
            if probe is not None:
                checks.append(self._probe_cache(candidate, trust, probe))
            for check in checks:
                self._start(check)

    def _start(self, check: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(check)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _cache_probe_target(self, candidate: CheckCandidate) -> ModelSlot | None:
        """The checked worker itself, when it sells cached prompt tokens cheaper (hiding hits
        would then pay), the prompt is long enough that sending it again must hit, and its
        engine's cache is not so full that an honest one may have evicted it already."""
        prompt = candidate.observed.token_counts()[0]
        if prompt < self._policy.cache_probe_min_tokens or candidate.segments != 1:
            return None
        conn = self._registry.get(candidate.node_id)
        slot = conn.slots.get(candidate.model) if conn is not None else None
        if slot is None or not slot.available or slot.free_slots < 1:
            return None
        if slot.kv_cache_usage > self._policy.cache_probe_max_kv_usage:
            return None
        price = slot.worker_price(candidate.adapter)
        return slot if price.cached_per_mtok < price.prompt_per_mtok else None

    async def _probe_cache(self, candidate: CheckCandidate, trust: Trust, slot: ModelSlot) -> None:
        """Send the checked request to the same worker again at once, as an ordinary job (its
        own opaque id, the client's body, one output token): a vLLM engine with prefix caching
        finds the prompt's full blocks and must say so in its usage. None found means it bills
        hits at the full price (or sells a discount it never gives)."""
        body = {k: v for k, v in candidate.body.items()
                if k not in ("stream", "stream_options", "max_completion_tokens")}  # fmt: skip
        body["max_tokens"] = 1
        prompt = candidate.observed.token_counts()[0]
        answer = await self._ask(slot, uuid.uuid4().hex, candidate, candidate.endpoint, body)
        if answer is None:
            return
        hits = cached_tokens_of(answer.get("usage") or {})
        log.info("cache probe of %s on %s: %d of %d prompt tokens cached", candidate.request_id,
                 slot.node_id, hits, prompt)  # fmt: skip
        if hits == 0:
            detail = f"the same {prompt}-token prompt sent again found no cached tokens"
            trust.observe([Verdict(candidate.node_id, Outcome.CACHE_HIDDEN,
                                   candidate.request_id, detail)])  # fmt: skip

    async def _ask(
        self, slot: ModelSlot, job_id: str, candidate: CheckCandidate, endpoint: str,
        body: dict[str, Any],
    ) -> dict[str, Any] | None:  # fmt: skip
        """One non-streamed job on `slot`, for a check of `candidate`: its decoded response,
        or None (logged) when it could not run."""
        attempt = self._dispatcher.open(
            slot, job_id=job_id, client=candidate.client, model=candidate.model,
            endpoint=endpoint, body=body, adapter=candidate.adapter,
        )  # fmt: skip
        try:
            event = await self._dispatcher.first_event(attempt)
        finally:
            attempt.end()
        if event.WhichOneof("kind") != "response":
            log.info("a check of %s could not run: %s", candidate.request_id, event)
            return None
        answer: dict[str, Any] = msgspec.json.decode(event.response)
        return answer

    def _reference_for(
        self, trust: Trust, model: str, checked: str, adapter: str, task: str = GENERATE,
        candidate: CheckCandidate | None = None,
    ) -> ModelSlot | None:  # fmt: skip
        """The most trusted other worker with a free slot, if it is more trusted than the
        checked one or past probation (an unproven reference could accuse an honest worker).
        With an adapter: one that holds it loaded, else one that can load it."""
        mine = trust.score(checked)
        candidates = [
            s for s in self._registry.pool(model)
            if s.node_id != checked and s.available and s.free_slots > 0 and s.task == task
            and (trust.score(s.node_id) > mine or not trust.on_probation(s.node_id))
            and (not adapter or adapter in s.adapters or s.max_loras > 0)
            and (candidate is None or _may_see(candidate, s))
        ]  # fmt: skip
        return max(
            candidates,
            key=lambda s: (not adapter or adapter in s.adapters, trust.score(s.node_id)),
            default=None,
        )

    async def _check(self, candidate: CheckCandidate, trust: Trust, temperature: float) -> None:
        reference = self._reference_for(
            trust, candidate.model, candidate.node_id, candidate.adapter, GENERATE, candidate
        )
        if reference is None:
            return
        observed = candidate.observed
        output_ids = observed.choices[0].token_ids
        body = check_body(observed.prompt_token_ids or [], output_ids, self._policy.top_k)
        job_id = f"{candidate.request_id}~check"
        answer = await self._ask(reference, job_id, candidate, COMPLETIONS, body)
        if answer is None:
            return
        choice = (answer.get("choices") or [{}])[0]
        logprobs = choice.get("prompt_logprobs") or []
        verdict = judge(output_ids, logprobs, self._policy, temperature)
        log.info("spot check of %s on %s: %s", candidate.request_id, reference.node_id,
                 verdict.detail)  # fmt: skip
        outcome = Outcome.VERIFIED if verdict.genuine else Outcome.FRAUD
        trust.observe([Verdict(candidate.node_id, outcome, candidate.request_id, verdict.detail)])
        if self._releases is not None:
            self._releases.observe_check(candidate.model, genuine=verdict.genuine)

    async def _check_vectors(self, candidate: CheckCandidate, trust: Trust) -> None:
        """Embed the same inputs on the most trusted other worker and compare the vectors."""
        reference = self._reference_for(
            trust, candidate.model, candidate.node_id, "", EMBED, candidate
        )
        if reference is None:
            return
        body = {k: v for k, v in candidate.body.items() if k not in ("provider", "models")}
        job_id = f"{candidate.request_id}~check"
        answer = await self._ask(reference, job_id, candidate, EMBEDDINGS, body)
        if answer is None:
            return
        recomputed = Output()
        recomputed.add(EMBEDDINGS, answer, streamed=False)
        verdict = judge_vectors(candidate.observed.vectors(), recomputed.vectors(), self._policy)
        log.info("spot check of %s on %s: %s", candidate.request_id, reference.node_id,
                 verdict.detail)  # fmt: skip
        outcome = Outcome.VERIFIED if verdict.genuine else Outcome.FRAUD
        trust.observe([Verdict(candidate.node_id, outcome, candidate.request_id, verdict.detail)])


def _may_see(candidate: CheckCandidate, slot: ModelSlot) -> bool:
    """Whether the client's policy lets this worker see its prompt (as a reference)."""
    return (not candidate.data_retention or slot.data_retention in candidate.data_retention) and (
        not candidate.regions or slot.region in candidate.regions
    )
