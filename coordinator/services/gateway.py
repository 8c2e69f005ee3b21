"""The request path: admit, route, dispatch (failing over before the first token), and hand
the stream to the relay; continue on another worker when one fails mid-stream."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import random
import time
import uuid
from collections.abc import Callable
from typing import Any

from billing.pricing import Price, charge_for
from coordinator.config import CoordinatorSettings
from coordinator.errors import (
    CoordinatorError,
    InsufficientCredit,
    InvalidRequest,
    ModelNotFound,
    NoCapacity,
    RateLimited,
)
from coordinator.observability import Metrics, request_id_var
from coordinator.services.accounts import Accounts, Principal
from coordinator.services.admission import RateLimiter
from coordinator.services.catalogue import model_cards
from coordinator.services.continuation import (
    continuation_body,
    delivered_so_far,
    why_not_continuable,
)
from coordinator.services.decisions import DecisionLog, RouteRecord
from coordinator.services.jobs import (
    ENDPOINT_PB,
    Attempt,
    CompletionRequest,
    error_from_job,
    prompt_token_bound,
)
from coordinator.services.outcomes import AttemptOutcomes
from coordinator.services.registry import ModelSlot, Registry
from coordinator.services.relay import Completion
from coordinator.services.reservations import Hold, HoldBook, Reservations
from coordinator.services.router import Router
from coordinator.services.routing import Decision, Preferences, RouteRequest, RoutingPolicy
from coordinator.services.settlement import JobFacts, Settled, Settlement
from coordinator.services.spot_check import SpotChecker
from coordinator.services.spot_judgement import CheckPolicy
from coordinator.services.stats import StatsBook
from coordinator.services.trust import Trust
from protocol.completions import CHAT, COMPLETIONS
from protocol.proto import session_pb2 as pb
from protocol.receipt import prompt_digest

log = logging.getLogger("agora.coordinator.gateway")
MAX_ATTEMPTS = 3  # workers tried for one request before giving up (failovers + continuations)


class Gateway:
    def __init__(
        self,
        registry: Registry,
        accounts: Accounts,
        settlement: Settlement,
        settings: CoordinatorSettings,
        *,
        stats: StatsBook | None = None,
        limiter: RateLimiter | None = None,
        decisions: DecisionLog | None = None,
        metrics: Metrics | None = None,
        policy: RoutingPolicy | None = None,
        rng: random.Random | None = None,
        trust: Trust | None = None,
        holds: HoldBook | None = None,
    ) -> None:
        self.trust = trust  # reputation for routing; verdicts from settlement feed it
        checks = CheckPolicy(
            rate=settings.spot_check_rate, probation_rate=settings.spot_check_probation_rate
        )
        self.spot_checker = SpotChecker(self, registry, trust, checks, rng or random.Random())
        self.registry = registry
        self.accounts = accounts
        self.reservations = holds or Reservations(accounts.balance)
        self.settlement = settlement
        self.settings = settings
        self.stats = stats or StatsBook()
        self.limiter = limiter or RateLimiter()
        self.decisions = decisions or DecisionLog()
        self.metrics = metrics
        self.policy = policy or RoutingPolicy()
        self._rng = rng or random.Random()
        self.router = Router(registry, self.stats, trust, self.policy, self._rng)
        self.outcomes = AttemptOutcomes(
            self.stats, trust, metrics, settings.slo_ttft_s, settings.slo_itl_s
        )
        self._background: set[asyncio.Task[Any]] = set()
        # other coordinators' API URLs for a model (the p2p market's view), for 404 hints
        self.elsewhere: Callable[[str], list[str]] | None = None

    @property
    def idle_timeout_s(self) -> float:
        return self.settings.idle_token_timeout_s

    # ---------------------------------------------------------------- catalogue
    def list_models(self) -> list[dict[str, Any]]:
        return model_cards(self.registry, self.settlement.tokenizer_fingerprint)

    # ---------------------------------------------------------------- admission + routing
    async def start(self, principal: Principal, request: CompletionRequest) -> Completion:
        pool = self.registry.pool(request.model)
        if not pool:
            others = self.elsewhere(request.model) if self.elsewhere else []
            raise ModelNotFound(
                f"The model `{request.model}` does not exist or no worker serves it right now."
                + (f" Other coordinators of this market serve it: {', '.join(others)}."
                   if others else ""),
                param="model",
            )  # fmt: skip
        context = max(s.offer.context_length for s in pool)
        max_tokens = request.max_tokens or context or None
        body = {k: v for k, v in request.body.items() if k != "provider"}
        if max_tokens is None:  # keep the cost bound a real bound
            max_tokens = body["max_tokens"] = self.settings.default_max_tokens
        body["return_token_ids"] = True  # exact metering, and continuation if a worker fails
        bound = RouteRequest(request.model, prompt_token_bound(request), max_tokens)
        admitted = bound.prompt_tokens + bound.max_tokens
        try:
            self.limiter.admit(str(principal.key_id), principal.limits, admitted)
        except RateLimited:
            if self.metrics:
                self.metrics.rate_limited.inc()
            raise
        request = dataclasses.replace(request, body=body)
        holds: list[Hold] = []  # the credit reserved for it, once a worker is chosen
        try:
            completion = await self._dispatch_first(principal, request, bound, max_tokens, holds)
        except BaseException:  # nothing ran: the tokens and credit held for it go back
            self.limiter.refund(str(principal.key_id), principal.limits, admitted)
            for hold in holds:
                hold.release()
            raise
        completion.admitted_tokens = admitted
        completion.hold = holds[0] if holds else None
        return completion

    async def _dispatch_first(
        self,
        principal: Principal,
        request: CompletionRequest,
        bound: RouteRequest,
        max_tokens: int,
        holds: list[Hold],
    ) -> Completion:
        """Route and dispatch until a worker sends its first event, waiting a bounded time for
        a free slot and failing over to the next ranked worker before the first token."""
        body = request.body
        request_id = request_id_var.get() or uuid.uuid4().hex
        record: RouteRecord | None = None
        excluded: set[str] = set()
        last_error: CoordinatorError | None = None
        deadline = time.monotonic() + self.settings.queue_timeout_s
        attempts = 0
        while True:
            freed = self.registry.freed_signal()
            decision = self._route(bound, request.prefs, excluded)
            if record is None:
                record = self.decisions.add(
                    RouteRecord(request_id, principal.client, request.model, decision)
                )
            else:
                record.decision = decision
            if not decision.ranked:
                remaining = deadline - time.monotonic()
                if decision.excluded.get("at_capacity") and remaining > 0 and last_error is None:
                    with contextlib.suppress(TimeoutError):  # a bounded wait, not an instant 503
                        await asyncio.wait_for(freed.wait(), timeout=remaining)
                    continue
                self._count(request.model, decision, "none")
                raise last_error or self._no_route_error(request, decision)
            for scored in decision.ranked:
                slot = self._slot(scored.node_id, request.model)
                if slot is None:  # left or went down since routing looked
                    excluded.add(scored.node_id)
                    continue
                price = Price(
                    slot.offer.price_prompt_per_mtok, slot.offer.price_completion_per_mtok
                )
                worst = charge_for(price, bound.prompt_tokens, max_tokens, self.settlement.fee_bps)
                current = holds[0] if holds else None
                hold = await self.reservations.hold(principal.client, worst.total, current)
                if current is None:
                    holds.append(hold)
                attempts += 1
                job_id = request_id if attempts == 1 else f"{request_id}~{attempts - 1}"
                attempt = self._dispatch(slot, request, request.endpoint, body, job_id, principal,
                                         attempts - 1)  # fmt: skip
                first = await self._first_event(attempt)
                if first.WhichOneof("kind") != "error":
                    record.attempts.append({"worker": slot.node_id, "segment": 0, "outcome": "ok"})
                    self._count(request.model, decision, "dispatched")
                    return Completion(self, principal, request, attempt, first, record, max_tokens)
                attempt.end(cancel=first.error.type == "timeout")
                if first.error.retryable:  # a 4xx is the request's fault, not the worker's
                    self.attempt_finished(attempt, ok=False)
                record.attempts.append(
                    {"worker": slot.node_id, "segment": 0, "outcome": first.error.message[:200]}
                )
                last_error = error_from_job(first.error, self.settings.retry_after_s)
                if not first.error.retryable:
                    raise last_error
                excluded.add(slot.node_id)
                if self.metrics:
                    self.metrics.failovers.labels(request.model).inc()
                if attempts >= MAX_ATTEMPTS or not request.prefs.allow_fallbacks:
                    raise last_error

    def _route(self, bound: RouteRequest, prefs: Preferences, excluded: set[str]) -> Decision:
        return self.router.decide(bound, prefs, excluded)

    def _count(self, model: str, decision: Decision, outcome: str) -> None:
        if self.metrics:
            self.metrics.routing.labels(model, decision.sort, outcome).inc()

    def _no_route_error(self, request: CompletionRequest, decision: Decision) -> CoordinatorError:
        reasons = decision.excluded
        if reasons and set(reasons) == {"over_max_price"}:
            prefs = request.prefs
            return InvalidRequest(
                f"No worker serves `{request.model}` at or below your max_price "
                f"(prompt {prefs.max_price_prompt}, completion {prefs.max_price_completion} "
                "micro-units per 1M tokens); raise provider.max_price.",
                param="provider.max_price",
                code="max_price_unmet",
            )
        if request.prefs.order and not request.prefs.allow_fallbacks:
            return NoCapacity(
                "None of the workers in provider.order can take the request and "
                "allow_fallbacks is false.",
                retry_after_s=self.settings.retry_after_s,
            )
        why = ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items())) or "none offered"
        return NoCapacity(
            f"No worker serving `{request.model}` can take the request now ({why}); retry shortly.",
            retry_after_s=self.settings.retry_after_s,
        )

    def _slot(self, node_id: str, model: str) -> ModelSlot | None:
        conn = self.registry.get(node_id)
        slot = conn.slots.get(model) if conn else None
        return slot if slot is not None and slot.available else None

    def _dispatch(
        self,
        slot: ModelSlot,
        request: CompletionRequest,
        endpoint: str,
        body: dict[str, Any],
        job_id: str,
        principal: Principal,
        segment: int,
    ) -> Attempt:
        prompt = body.get("messages") if endpoint == CHAT else body.get("prompt")
        facts = JobFacts(
            request_id=job_id,
            client=principal.client,
            worker_id=slot.node_id,
            model=request.model,
            nonce_hex=os.urandom(16).hex(),
            prompt_sha256=prompt_digest(prompt),
            price=Price(slot.offer.price_prompt_per_mtok, slot.offer.price_completion_per_mtok),
            endpoint=endpoint,
            prompt=prompt,
            tools=body.get("tools"),
        )
        job = pb.Job(
            request_id=job_id,
            model=request.model,
            endpoint=ENDPOINT_PB[endpoint],
            body=json.dumps(body).encode(),
            nonce=bytes.fromhex(facts.nonce_hex),
            deadline_ms=int((time.time() + self.settings.first_token_timeout_s) * 1000),
        )
        events = slot.conn.open_job(job)
        return Attempt(slot.conn, slot, facts, events, endpoint, segment)

    async def _first_event(self, attempt: Attempt) -> pb.JobEvent:
        try:
            return await asyncio.wait_for(
                attempt.events.get(), timeout=self.settings.first_token_timeout_s
            )
        except TimeoutError:
            error = pb.JobError(
                http_status=504, message=f"worker {attempt.node_id} sent nothing in time",
                type="timeout", retryable=True,
            )  # fmt: skip
            return pb.JobEvent(request_id=attempt.facts.request_id, error=error)

    # ---------------------------------------------------------------- the relay's calls
    async def continue_elsewhere(self, completion: Completion) -> Attempt | None:
        """Another worker for the rest of a stream whose worker failed or stalled."""
        request = completion.request
        nothing_yet = not any(c.text or c.token_ids for c in completion.delivered.choices.values())
        if len(completion.attempts) >= MAX_ATTEMPTS or not request.prefs.allow_fallbacks:
            return None
        if nothing_yet:
            endpoint, body = request.endpoint, dict(request.body)
        else:
            delivered = delivered_so_far([a.observed for a in completion.attempts])
            reason = why_not_continuable(request.endpoint, request.body, delivered)
            if reason:
                log.info("request %s cannot continue: %s", completion.request_id, reason)
                if self.metrics:
                    self.metrics.continuations.labels(request.model, "impossible").inc()
                return None
            endpoint = COMPLETIONS
            body = continuation_body(request.endpoint, request.body, delivered,
                                     completion.max_tokens)  # fmt: skip
        excluded = {a.node_id for a in completion.attempts}
        bound = RouteRequest(request.model, prompt_token_bound(request), completion.max_tokens or 1)
        for _ in range(MAX_ATTEMPTS):
            decision = self._route(bound, request.prefs, excluded)
            if not decision.ranked:
                break
            slot = self._slot(decision.ranked[0].node_id, request.model)
            if slot is None:
                excluded.add(decision.ranked[0].node_id)
                continue
            price = Price(slot.offer.price_prompt_per_mtok, slot.offer.price_completion_per_mtok)
            worst = charge_for(
                price, bound.prompt_tokens, bound.max_tokens, self.settlement.fee_bps
            )
            if completion.hold is not None:
                try:  # a dearer worker may carry on only if the client can still afford it
                    await self.reservations.hold(
                        completion.principal.client, worst.total, completion.hold
                    )
                except InsufficientCredit:
                    excluded.add(slot.node_id)
                    continue
            segment = len(completion.attempts)
            job_id = f"{completion.request_id}~{segment}"
            attempt = self._dispatch(slot, request, endpoint, body, job_id, completion.principal,
                                     segment)  # fmt: skip
            first = await self._first_event(attempt)
            outcome = "ok" if first.WhichOneof("kind") != "error" else first.error.message[:200]
            completion.route.attempts.append(
                {"worker": slot.node_id, "segment": segment, "outcome": outcome,
                 "continuation": not nothing_yet}
            )  # fmt: skip
            if first.WhichOneof("kind") != "error":
                attempt.first_event = first  # the relay reads it before the queue (no reordering)
                if self.metrics:
                    self.metrics.continuations.labels(request.model, "continued").inc()
                return attempt
            attempt.end()
            self.attempt_finished(attempt, ok=False)
            excluded.add(slot.node_id)
        if self.metrics:
            self.metrics.continuations.labels(request.model, "no_worker").inc()
        return None

    def attempt_finished(self, attempt: Attempt, *, ok: bool) -> None:
        self.outcomes.finished(attempt, ok=ok)

    async def settle(self, completion: Completion) -> Settled | None:
        records = [a.record() for a in completion.attempts if a.observed.choices]
        client = completion.principal.client
        try:
            if not records:
                return None
            settled = await self.settlement.settle(completion.request_id, client, records)
            self.reservations.posted(client)  # the charge is in: now the hold may go
            if self.trust is not None:
                self.trust.observe(settled.verdicts)
                self.spot_checker.consider(completion)
        except Exception:  # the client already has its tokens; the operator must see this
            log.exception("could not settle request %s", completion.request_id)
            return None
        finally:
            if completion.hold is not None:
                completion.hold.release()
        if self.metrics:
            usage = completion.usage()
            model = completion.request.model
            self.metrics.tokens.labels(model, "prompt").inc(usage["prompt_tokens"])
            self.metrics.tokens.labels(model, "completion").inc(usage["completion_tokens"])
        return settled

    def settle_later(self, completion: Completion) -> None:
        task = asyncio.get_running_loop().create_task(self.settle(completion))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def request_finished(self, completion: Completion, status: str) -> None:
        request = completion.request
        nothing_to_settle = completion.settled is None and not completion.delivered.choices
        if completion.hold is not None and nothing_to_settle:
            completion.hold.release()
        unused = completion.admitted_tokens - completion.usage()["total_tokens"]
        self.limiter.refund(str(completion.principal.key_id), completion.principal.limits, unused)
        if self.metrics:
            self.metrics.requests.labels(request.model, request.endpoint, status).inc()
        if status == "ok":
            charge = completion.settled.charge.total if completion.settled else None
            log.info(
                "request done",
                extra={
                    "model": request.model,
                    "worker": completion.worker_id,
                    "segments": len(completion.attempts),
                    "usage": completion.usage(),
                    "charged": charge,
                },
            )

    async def drain(self) -> None:
        """Wait for detached settlements (at shutdown)."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
