"""The request path's shared parts and its one entry point, `RequestPath.begin`.

Built once, in the composition root (coordinator.app), from explicit collaborators; each
request gets its own `Fulfilment`, which owns it and calls back here only for what is shared
(routing, holds, counters, background work).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

from coordinator.config import CoordinatorSettings
from coordinator.errors import (
    CoordinatorError,
    InvalidRequest,
    ModelNotFound,
    NoCapacity,
    UpstreamFailed,
    UpstreamTimeout,
)
from coordinator.observability import Metrics, request_id_var
from coordinator.services.accounts import Principal
from coordinator.services.admission import RateLimiter
from coordinator.services.catalogue import model_cards
from coordinator.services.decisions import DecisionLog, RouteRecord
from coordinator.services.demand import DemandBook
from coordinator.services.metering import Count
from coordinator.services.policy.book import PolicyBook
from coordinator.services.policy.run import PolicyRun
from coordinator.services.policy.steps import PolicyViolation
from coordinator.services.registry import ModelSlot, Registry
from coordinator.services.releases.book import ReleaseBook, Target
from coordinator.services.request_path.cache_hit import CachedAnswers, CacheHit
from coordinator.services.request_path.dispatch import Dispatcher
from coordinator.services.request_path.fulfilment import Fulfilment
from coordinator.services.request_path.outcomes import AttemptOutcomes
from coordinator.services.request_path.request import CompletionRequest, prompt_token_bound
from coordinator.services.request_path.shadow import shadow_copy
from coordinator.services.reservations import HoldBook
from coordinator.services.router import Router
from coordinator.services.routing import Decision
from coordinator.services.settlement import Settlement
from coordinator.services.spot_check import CheckCandidate, SpotChecker
from coordinator.services.trust import Trust, Verdict
from protocol.advert import EMBED

log = logging.getLogger("agora.coordinator.request")


class RequestPath:
    def __init__(
        self,
        *,
        settings: CoordinatorSettings,
        registry: Registry,
        router: Router,
        reservations: HoldBook,
        limiter: RateLimiter,
        settlement: Settlement,
        dispatcher: Dispatcher,
        outcomes: AttemptOutcomes,
        decisions: DecisionLog,
        answers: CachedAnswers | None = None,  # the response cache (None: off)
        spot_checker: SpotChecker | None = None,
        trust: Trust | None = None,
        metrics: Metrics | None = None,
        releases: ReleaseBook | None = None,
        policies: PolicyBook | None = None,  # the clients' policies (None: none run)
        demand: DemandBook | None = None,  # the demand board, told what happened
        # other coordinators' API URLs for a model (the p2p market's view), for 404 hints
        elsewhere: Callable[[str], list[str]] = lambda _model: [],
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.router = router
        self.reservations = reservations
        self.limiter = limiter
        self.settlement = settlement
        self.dispatcher = dispatcher
        self.outcomes = outcomes
        self.decisions = decisions
        self.answers = answers
        self._spot_checker = spot_checker
        self._trust = trust
        self._metrics = metrics
        self.releases = releases
        self.policies = policies
        self.demand = demand
        self._elsewhere = elsewhere
        self._background: set[asyncio.Future[Any]] = set()

    # ---------------------------------------------------------------- the entry point
    async def begin(self, principal: Principal, request: CompletionRequest) -> Fulfilment:
        """`serve`, for a request that does not ask for the response cache: always run."""
        answer = await self.serve(principal, dataclasses.replace(request, cache=False))
        assert isinstance(answer, Fulfilment)
        return answer

    async def serve(
        self, principal: Principal, request: CompletionRequest
    ) -> Fulfilment | CacheHit:
        """Admit a request and, unless the response cache holds its answer (the client opted
        in), dispatch it until a worker answers (raises the client's error if none can); the
        returned Fulfilment then relays and settles it.

        The client's `model` may be a release (`name` or `name@version`): its policy picks
        the version, and a canary that fails before its first token hands the request to
        the stable version. Then each of the client's fallback `models`, in order."""
        request = await self._under_policy(principal, request)
        last: CoordinatorError | None = None
        tries = 0
        admitted = False  # an earlier try took the request from the key's per-minute limit
        for model in (request.model, *request.fallbacks):
            try:
                targets = self._targets(model, principal)
            except ModelNotFound as exc:
                last = exc
                continue
            for target in targets:
                tries += 1
                if admitted:  # the last try was admitted: this one counts the request instead
                    self.limiter.refund_request(str(principal.key_id), principal.limits)
                    admitted = False
                one = _as_target(request, target)
                try:
                    fulfilment = await self._begin(principal, one, target, tries)
                except InvalidRequest as exc:
                    if exc.code == "max_price_unmet":  # a served model no worker's price met
                        self._unmet(one, "price")
                    raise
                except (ModelNotFound, NoCapacity, UpstreamFailed, UpstreamTimeout) as exc:
                    if isinstance(exc, NoCapacity):  # a served model with no worker free
                        self._unmet(one, "price" if exc.code == "below_reserve" else "capacity")
                    if self.releases is not None and isinstance(
                        exc, UpstreamFailed | UpstreamTimeout
                    ):
                        self.releases.observe(target, failed=True, ttft_s=None)
                    admitted = not isinstance(exc, ModelNotFound)
                    last = exc
                    continue
                shadow = self.releases.shadow_for(target) if self.releases else None
                if (shadow is not None and self.releases is not None
                        and isinstance(fulfilment, Fulfilment)):  # fmt: skip
                    self.in_background(shadow_copy(self, fulfilment, shadow, self.releases))
                return fulfilment
        assert last is not None
        if request.policy is not None:  # what it did to a request that found no worker
            self._record_policy(principal, request_id_var.get() or "", request.policy)
        raise last

    async def _under_policy(
        self, principal: Principal, request: CompletionRequest
    ) -> CompletionRequest:
        """The request as its policy lets it go: the prompt redacted, the workers it may go to
        narrowed, the response cache off (answers differ by what a policy put back)."""
        run = self.policies.for_principal(principal) if self.policies is not None else None
        if run is None:
            return request
        policy = run.policy
        if policy.changes_output:
            body = request.body
            asked = [k for k in _RAW_OUTPUT if body.get(k) is not None and body.get(k) is not False]
            if asked or request.wants_token_ids:
                raise InvalidRequest(
                    f"Your key's policy `{policy.label}` filters output, so "
                    f"{', '.join(asked) or 'return_token_ids'} cannot be returned (it would "
                    "show what the policy holds back).", param=(asked or ["return_token_ids"])[0],
                    code="policy_conflict",
                )  # fmt: skip
            if body.get("tools") or body.get("functions"):
                raise InvalidRequest(
                    f"Your key's policy `{policy.label}` filters output; tool calls are not "
                    "filtered, so requests with tools cannot run under it.", param="tools",
                    code="policy_conflict",
                )  # fmt: skip
        try:  # large prompts are redacted off the event loop (linear, but ~1 ms per 2 KB)
            if self.prompt_bound(request) > _REDACT_INLINE_BYTES:
                body = await asyncio.to_thread(run.redact, request.endpoint, request.body)
            else:
                body = run.redact(request.endpoint, request.body)
        except PolicyViolation as exc:
            self._record_policy(principal, request_id_var.get() or uuid.uuid4().hex, run)
            raise InvalidRequest(
                f"Your key's policy `{policy.label}` refuses this request: {exc}.",
                code="policy_rejected",
            ) from exc
        prefs = request.prefs
        constraints = policy.constraints()
        if constraints is not None:
            floor = constraints.min_reputation
            if prefs.min_reputation is not None and floor is not None:
                floor = max(floor, prefs.min_reputation)
            prefs = dataclasses.replace(
                prefs, data_retention=constraints.data_retention, regions=constraints.regions,
                min_reputation=floor if floor is not None else prefs.min_reputation,
            )  # fmt: skip
        return dataclasses.replace(request, body=body, prefs=prefs, cache=False, policy=run)

    def _unmet(self, request: CompletionRequest, reason: str) -> None:
        """Demand the market left unmet, on the board under the served model (one that has
        workers: a name no worker serves is a 404, never on the board), with what it would
        have paid a worker at most. Batch lines requeue."""
        if self.demand is not None and not request.batch:
            limit = request.prefs.max_price_completion  # what the client pays, fee included
            fee = self.settlement.fee_bps
            worker_limit = None if limit is None else limit * 10_000 // (10_000 + fee)
            self.demand.unmet(request.model, reason, worker_limit)

    def _record_policy(self, principal: Principal, request_id: str, run: PolicyRun) -> None:
        """What the policy did, into the audit log and metrics: once per request, however
        many targets and fallbacks it was tried on."""
        if self.policies is not None and not run.recorded and run.hits():
            run.recorded = True
            self.in_background(asyncio.to_thread(self.policies.record, principal, request_id, run))

    def _targets(self, model: str, principal: Principal) -> list[Target]:
        targets = self.releases.targets(model, str(principal.key_id)) if self.releases else None
        return targets or [Target(model, model)]

    async def _begin(
        self, principal: Principal, request: CompletionRequest, target: Target, tries: int
    ) -> Fulfilment | CacheHit:
        pool = self.registry.pool(request.model)
        if not pool:
            others = self._elsewhere(request.model)
            raise ModelNotFound(
                f"The model `{request.model}` does not exist or no worker serves it right now."
                + (f" Other coordinators of this market serve it: {', '.join(others)}."
                   if others else ""),
                param="model",
            )  # fmt: skip
        if not any(s.offer.task == request.task for s in pool):
            raise InvalidRequest(_wrong_task(request), param="model", code="wrong_model_task")
        body, max_tokens = self._bounded(request, pool)
        request = dataclasses.replace(request, body=body)
        admitted = self.prompt_bound(request) + max_tokens * request.choices
        try:
            self.limiter.admit(str(principal.key_id), principal.limits, admitted)
        except CoordinatorError:
            if self._metrics:
                self._metrics.rate_limited.inc()
            raise
        request_id = request_id_var.get() or uuid.uuid4().hex
        key, bypass = self.answers.key_for(principal, request) if self.answers else ("", "")
        if key and self.answers is not None:
            try:
                hit = await self.answers.answer(key, principal, request, request_id)
            except CoordinatorError:
                self.limiter.refund(str(principal.key_id), principal.limits, admitted)
                raise
            except Exception:  # the hit could not be recorded: a worker answers it instead
                log.exception("request %s: the response cache failed; dispatching", request_id)
                hit = None
            if self._metrics:
                result = "hit" if hit is not None else "miss"
                self._metrics.response_cache.labels(request.model, result).inc()
            if hit is not None:  # it ran on no GPU: its tokens do not count against the key's
                self.limiter.refund(str(principal.key_id), principal.limits, admitted)
                return hit  # per-minute limit (the request itself still counts)
        elif bypass and self._metrics:
            self._metrics.response_cache.labels(request.model, "bypass").inc()
        prefix = request_id if tries == 1 else f"{request_id}~f{tries - 1}"
        fulfilment = Fulfilment(self, principal, request, request_id, max_tokens, admitted,
                                target, prefix, cache_key=key)  # fmt: skip
        fulfilment.cache_status = "miss" if key else ("bypass" if bypass else "")
        await fulfilment.begin()
        return fulfilment

    def _bounded(
        self, request: CompletionRequest, pool: list[ModelSlot]
    ) -> tuple[dict[str, Any], int]:
        """The body a worker runs and the completion tokens it may generate (per choice):
        every request's cost has a bound before it is held. Embeddings generate nothing."""
        body = {k: v for k, v in request.body.items() if k != "provider"}
        if request.task == EMBED:
            return body, 0
        context = max(s.offer.context_length for s in pool)
        if context and request.max_tokens and request.max_tokens >= context:
            # no prompt fits beside it on any worker: the request's fault, not the wallet's
            raise InvalidRequest(
                f"This model's maximum context length is {context} tokens; you asked for "
                f"{request.max_tokens} completion tokens, which leaves no room for the prompt. "
                "Lower max_tokens.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        max_tokens = request.max_tokens or context or None
        if max_tokens is None:  # keep the cost bound a real bound
            max_tokens = body["max_tokens"] = self.settings.default_max_tokens
        body["return_token_ids"] = True  # exact metering, and continuation if a worker fails
        return body, max_tokens

    # ---------------------------------------------------------------- what requests share
    @staticmethod
    def prompt_bound(request: CompletionRequest) -> int:
        return prompt_token_bound(request)

    def slot(self, node_id: str, model: str) -> ModelSlot | None:
        conn = self.registry.get(node_id)
        slot = conn.slots.get(model) if conn else None
        return slot if slot is not None and slot.available else None

    def no_route_error(self, request: CompletionRequest, decision: Decision) -> CoordinatorError:
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
        policy = request.policy.policy.label if request.policy is not None else ""
        if reasons and policy and all(r.startswith("policy_") for r in reasons):
            why = ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items()))
            return NoCapacity(
                f"No worker serving `{request.model}` meets your key's policy `{policy}` ({why}); "
                "a worker that declares what it requires may join later.",
                retry_after_s=self.settings.retry_after_s, code="policy_unroutable",
            )  # fmt: skip
        if request.prefs.order and not request.prefs.allow_fallbacks:
            return NoCapacity(
                "None of the workers in provider.order can take the request and "
                "allow_fallbacks is false.",
                retry_after_s=self.settings.retry_after_s,
            )
        if reasons and set(reasons) <= {"below_reserve", "over_max_price"}:
            return NoCapacity(
                f"No worker serving `{request.model}` asks at least the market's reserve price "
                "(and within your max_price); one may raise its ask or join later.",
                retry_after_s=self.settings.retry_after_s, code="below_reserve",
            )  # fmt: skip
        why = ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items())) or "none offered"
        return NoCapacity(
            f"No worker serving `{request.model}` can take the request now ({why}); retry shortly.",
            retry_after_s=self.settings.retry_after_s,
        )

    def in_background(self, work: Coroutine[Any, Any, Any] | asyncio.Future[Any]) -> None:
        """Run work the client does not wait for (postings); awaited at shutdown."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def judged(self, verdicts: list[Verdict], candidate: CheckCandidate) -> None:
        """A request's receipts were checked: reputation learns, a spot check may follow."""
        if self._trust is not None:
            self._trust.observe(verdicts)
        if self._spot_checker is not None:
            self._spot_checker.consider(candidate)

    def request_finished(self, fulfilment: Fulfilment, status: str, unused_tokens: int) -> None:
        principal, request = fulfilment.principal, fulfilment.request
        self.limiter.refund(str(principal.key_id), principal.limits, unused_tokens)
        if request.policy is not None:
            if status == "ok":
                request.policy.finish(fulfilment.texts())
            self._record_policy(principal, fulfilment.request_id, request.policy)
        recorder = fulfilment.recorder
        if status == "ok" and recorder is not None and self.answers is not None:
            answer = recorder.answer(
                fulfilment.request_id,
                request.endpoint,
                fulfilment.settled,
                fulfilment.text(),
                fulfilment.current.observed.finish_reason(),
            )
            if answer is not None:
                self.answers.keep(recorder.key, answer)
        if status == "refused":  # never dispatched: the client got an error status
            return
        if self.releases is not None and fulfilment.target is not None:
            failed = status != "ok" or fulfilment.failed_attempts > 0
            self.releases.observe(fulfilment.target, failed=failed, ttft_s=fulfilment.ttft_s())
        if self._metrics:
            self._metrics.requests.labels(request.model, request.endpoint, status).inc()
        if status == "ok" and self.demand is not None and fulfilment.attempts:
            usage, price = fulfilment.usage(), fulfilment.attempts[0].facts.price
            self.demand.served(
                request.model, fulfilment.worker_id, usage["prompt_tokens"],
                usage["completion_tokens"], (price.prompt_per_mtok, price.completion_per_mtok),
                fulfilment.queued_s,
            )  # fmt: skip
        if status == "ok":
            settled = fulfilment.settled
            log.info(
                "request done",
                extra={
                    "model": request.model,
                    "worker": fulfilment.worker_id,
                    "segments": len(fulfilment.attempts),
                    "usage": fulfilment.usage(),
                    "charged": settled.charge.total if settled else None,
                },
            )

    # ---------------------------------------------------------------- counters
    def count_route(self, model: str, decision: Decision, outcome: str) -> None:
        if self._metrics:
            self._metrics.routing.labels(model, decision.sort, outcome).inc()

    def count_failover(self, model: str) -> None:
        if self._metrics:
            self._metrics.failovers.labels(model).inc()

    def count_continuation(self, model: str, outcome: str) -> None:
        if self._metrics:
            self._metrics.continuations.labels(model, outcome).inc()

    def count_tokens(self, model: str, usage: Count) -> None:
        if self._metrics:
            self._metrics.tokens.labels(model, "prompt").inc(usage.prompt_tokens)
            self._metrics.tokens.labels(model, "completion").inc(usage.completion_tokens)

    # ---------------------------------------------------------------- views
    def list_models(self) -> list[dict[str, Any]]:
        releases = self.releases.describe() if self.releases else []
        return model_cards(self.registry, self.settlement.tokenizer_fingerprint, releases)

    def routing_record(self, request_id: str) -> RouteRecord | None:
        return self.decisions.get(request_id)

    async def drain(self) -> None:
        """Wait for background work (at shutdown)."""
        while self._background:  # work started by work (a check that then posts) too
            await asyncio.gather(*self._background, return_exceptions=True)


_REDACT_INLINE_BYTES = 16 * 1024
# what shows the engine's own output beside the text (under a policy that filters output)
_RAW_OUTPUT = ("logprobs", "top_logprobs", "echo", "return_token_ids", "prompt_logprobs")


def _wrong_task(request: CompletionRequest) -> str:
    if request.task == EMBED:
        return (f"The model `{request.model}` does not make embeddings; /v1/models shows each "
                "model's task.")  # fmt: skip
    return f"The model `{request.model}` is an embedding model: call /v1/embeddings."


def _as_target(request: CompletionRequest, target: Target) -> CompletionRequest:
    """The request as one target serves it: its served model, the name the client sees, and
    the version's price caps over the client's own."""
    prefs, version = request.prefs, target.version
    if version is not None and (version.max_price_prompt or version.max_price_completion):
        prefs = dataclasses.replace(
            prefs,
            max_price_prompt=_lower(prefs.max_price_prompt, version.max_price_prompt),
            max_price_completion=_lower(prefs.max_price_completion, version.max_price_completion),
        )
    return dataclasses.replace(
        request,
        model=target.serves,
        shown_model=target.shown,
        prefs=prefs,
        fallbacks=(),
        adapter=(version.adapter_sha256 or "") if version is not None else "",
    )


def _lower(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)
