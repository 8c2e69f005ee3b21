"""Spot checks: re-score a sampled greedy job's claimed output on another worker of the same
model, by one prefill with prompt logprobs (far cheaper than generating it again).

For greedy decoding every claimed token must be the reference model's most likely next token,
up to float noise: a fresh prefill and step-by-step decoding differ in the last bits, which can
flip a near-tie (gaps of 1e-4 nats were seen), never a clear choice. A worker whose tokens are
often far from the reference's choice did not run this model greedily: it served another
model, made text up, or replayed something else. Sampled (temperature > 0) output is not judged
here: that needs a likelihood test calibrated on a model whose distribution is not flat.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from coordinator.services.accounts import Principal
from coordinator.services.jobs import Attempt, CompletionRequest
from coordinator.services.registry import ModelSlot, Registry
from coordinator.services.relay import Completion
from coordinator.services.reputation import Outcome
from coordinator.services.trust import Trust, Verdict
from protocol.completions import COMPLETIONS, Output
from protocol.proto import session_pb2 as pb

log = logging.getLogger("agora.coordinator.spot_check")


@dataclass(frozen=True)
class CheckPolicy:
    rate: float = 0.05  # share of eligible jobs checked
    probation_rate: float = 0.5  # for workers still on probation
    gap_nats: float = 0.05  # a claimed token this far below the reference's best is "off"
    max_off_share: float = 0.25  # more than this share of tokens off: the output is not genuine
    min_tokens: int = 4  # shorter outputs say too little to judge


@dataclass(frozen=True)
class Judgement:
    genuine: bool
    off: int  # tokens clearly not the reference's greedy choice
    judged: int
    detail: str


def eligible(body: Mapping[str, Any], delivered: Output, segments: int) -> bool:
    """A single-segment greedy job with token ids, without tools or structured output."""
    if segments != 1 or float(body.get("temperature", 1.0) or 0.0) != 0.0:
        return False
    if int(body.get("n") or 1) != 1 or body.get("tools") or body.get("response_format"):
        return False
    choice = delivered.choices.get(0)
    return bool(delivered.prompt_token_ids and choice and choice.token_ids)


def sampled(rng: random.Random, on_probation: bool, policy: CheckPolicy) -> bool:
    return rng.random() < (policy.probation_rate if on_probation else policy.rate)


def check_body(prompt_ids: Sequence[int], output_ids: Sequence[int]) -> dict[str, Any]:
    """One prefill over prompt + claimed output, returning each position's logprobs."""
    return {
        "prompt": [*prompt_ids, *output_ids],
        "max_tokens": 1,
        "temperature": 0,
        "prompt_logprobs": 1,
        "stream": False,
    }


def judge(
    output_ids: Sequence[int], prompt_logprobs: Sequence[Any], policy: CheckPolicy
) -> Judgement:
    """Compare each claimed token with the reference's best at its position. `prompt_logprobs`
    is vLLM's list (one entry per prompt position: None or {token id: {"logprob": …}})."""
    tail = list(prompt_logprobs)[-len(output_ids) :] if output_ids else []
    off = judged = 0
    for token, entry in zip(output_ids, tail, strict=False):
        if not entry:
            continue
        logprobs = {int(k): float(v["logprob"]) for k, v in entry.items()}
        if token not in logprobs:
            continue
        judged += 1
        if max(logprobs.values()) - logprobs[token] > policy.gap_nats:
            off += 1
    if judged < policy.min_tokens:
        return Judgement(True, off, judged, "too short to judge")
    genuine = off <= policy.max_off_share * judged
    detail = f"spot check: {off} of {judged} greedy tokens are not the model's choice"
    return Judgement(genuine, off, judged, detail)


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
        if trust is None or not eligible(
            completion.request.body, first.observed, len(completion.attempts)
        ):
            return
        if sampled(self._rng, trust.on_probation(first.node_id), self._policy):
            task = asyncio.get_running_loop().create_task(self._check(completion, trust))
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

    async def _check(self, completion: Completion, trust: Trust) -> None:
        first = completion.attempts[0]
        reference = self._reference_for(trust, completion.request.model, first.node_id)
        if reference is None:
            return
        observed = first.observed
        output_ids = observed.choices[0].token_ids
        body = check_body(observed.prompt_token_ids or [], output_ids)
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
        verdict = judge(output_ids, choice.get("prompt_logprobs") or [], self._policy)
        log.info("spot check of %s on %s: %s", completion.request_id, reference.node_id,
                 verdict.detail)  # fmt: skip
        outcome = Outcome.VERIFIED if verdict.genuine else Outcome.FRAUD
        trust.observe([Verdict(first.node_id, outcome, completion.request_id, verdict.detail)])
