"""Spot checks: re-score a sampled job's claimed output on another worker of the same model, by
one prefill with prompt logprobs (far cheaper than generating it again).

A worker whose greedy tokens are often not the reference's choice, or whose sampled tokens
fall outside the reference's likely tokens far more often than sampling allows, did not run
this model: it served another model, made text up, or replayed something else (the judgement,
and why it does not accuse honest sampling, is in services.spot_judgement).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from typing import Any, Protocol

from coordinator.services.accounts import Principal
from coordinator.services.jobs import Attempt, CompletionRequest
from coordinator.services.registry import ModelSlot, Registry
from coordinator.services.relay import Completion
from coordinator.services.reputation import Outcome
from coordinator.services.spot_judgement import (
    CheckPolicy,
    check_body,
    judge,
    sampled,
    sampling_temperature,
)
from coordinator.services.trust import Trust, Verdict
from protocol.completions import COMPLETIONS
from protocol.proto import session_pb2 as pb

log = logging.getLogger("agora.coordinator.spot_check")


class Dispatch(Protocol):
    """What a spot check needs from the gateway: send one job, wait for its first event."""

    def _dispatch(
        self, slot: ModelSlot, request: CompletionRequest, endpoint: str, body: dict[str, Any],
        job_id: str, principal: Principal, segment: int,
    ) -> Attempt: ...  # fmt: skip

    async def _first_event(self, attempt: Attempt) -> pb.JobEvent: ...


class SpotChecker:
    def __init__(
        self, gateway: Dispatch, registry: Registry, trust: Trust | None, policy: CheckPolicy,
        rng: random.Random,
    ) -> None:  # fmt: skip
        self._gateway = gateway
        self._registry = registry
        self._trust = trust
        self._policy = policy
        self._rng = rng
        self._background: set[asyncio.Task[None]] = set()

    def consider(self, completion: Completion) -> None:
        """Check this settled request on another worker, if it is eligible and sampled."""
        trust, first = self._trust, completion.attempts[0]
        if trust is None:
            return
        body, segments = completion.request.body, len(completion.attempts)
        temperature = sampling_temperature(body, first.observed, segments)
        if temperature is None:
            return
        if sampled(self._rng, trust.on_probation(first.node_id), self._policy):
            check = self._check(completion, trust, temperature)
            task = asyncio.get_running_loop().create_task(check)
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def _reference_for(self, trust: Trust, model: str, checked: str) -> ModelSlot | None:
        """The most trusted other worker with a free slot, if it is more trusted than the
        checked one or past probation (an unproven reference could accuse an honest worker)."""
        mine = trust.score(checked)
        candidates = [
            s for s in self._registry.pool(model)
            if s.node_id != checked and s.available and s.free_slots > 0
            and (trust.score(s.node_id) > mine or not trust.on_probation(s.node_id))
        ]  # fmt: skip
        return max(candidates, key=lambda s: trust.score(s.node_id), default=None)

    async def _check(self, completion: Completion, trust: Trust, temperature: float) -> None:
        first = completion.attempts[0]
        reference = self._reference_for(trust, completion.request.model, first.node_id)
        if reference is None:
            return
        observed = first.observed
        output_ids = observed.choices[0].token_ids
        body = check_body(observed.prompt_token_ids or [], output_ids, self._policy.top_k)
        job_id = f"{completion.request_id}~check"
        attempt = self._gateway._dispatch(
            reference, completion.request, COMPLETIONS, body, job_id, completion.principal, 0
        )
        try:
            event = await self._gateway._first_event(attempt)
        finally:
            attempt.end()
        if event.WhichOneof("kind") != "response":
            log.info("spot check of %s could not run: %s", completion.request_id, event)
            return
        choice = (json.loads(event.response).get("choices") or [{}])[0]
        logprobs = choice.get("prompt_logprobs") or []
        verdict = judge(output_ids, logprobs, self._policy, temperature)
        log.info("spot check of %s on %s: %s", completion.request_id, reference.node_id,
                 verdict.detail)  # fmt: skip
        outcome = Outcome.VERIFIED if verdict.genuine else Outcome.FRAUD
        trust.observe([Verdict(first.node_id, outcome, completion.request_id, verdict.detail)])
