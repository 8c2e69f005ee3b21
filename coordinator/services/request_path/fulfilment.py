"""The owner of one client request, from admission to release.

    begin:   admit (rate limits) → route → hold credit → attempt (first event) ─┐
    relay:   frames → SSE; on a worker's failure or stall: another attempt ─────┤ one loop,
             (failover before the first token, continuation after it)          │ one set of
    settle:  receipt checked → usage + [DONE] → ledger posting in background ───┘ rules
    release: every slot back, unused rate-limit tokens refunded, the hold freed once posted

Everything about the request's state lives here; collaborators (the dispatcher, the
settlement, the outcome book) are handed values and report results back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any

from billing.pricing import charge_for
from coordinator.errors import (
    CoordinatorError,
    InsufficientCredit,
    UpstreamFailed,
    UpstreamTimeout,
)
from coordinator.services.accounts import Principal
from coordinator.services.decisions import RouteRecord
from coordinator.services.prefixes import prefix_chain
from coordinator.services.releases.book import Target
from coordinator.services.request_path.attempt import Attempt, error_from_job
from coordinator.services.request_path.cache_hit import AnswerRecorder
from coordinator.services.request_path.continuation import (
    continuation_body,
    delivered_so_far,
    why_not_continuable,
)
from coordinator.services.request_path.dispatch import Quote
from coordinator.services.request_path.render import (
    DONE,
    StreamRenderer,
    decode_json,
    embeddings_response,
    error_event,
    whole_response,
)
from coordinator.services.request_path.request import CompletionRequest
from coordinator.services.reservations import Hold
from coordinator.services.routing import RouteRequest
from coordinator.services.settlement import Settled
from coordinator.services.spot_check import CheckCandidate
from protocol.advert import EMBED, GENERATE
from protocol.completions import COMPLETIONS
from protocol.proto import session_pb2 as pb

if TYPE_CHECKING:
    from coordinator.services.request_path.path import RequestPath

log = logging.getLogger("agora.coordinator.request")
MAX_ATTEMPTS = 3  # workers tried for one request (failovers + continuations)
STOP_GRACE_S = 5.0  # a node asked to stop and sign sends its receipt within this


class Fulfilment:
    def __init__(
        self,
        path: RequestPath,
        principal: Principal,
        request: CompletionRequest,
        request_id: str,
        max_tokens: int,
        admitted_tokens: int,
        target: Target | None = None,
        job_prefix: str = "",  # job ids start with this (a fallback's differ from the first)
        cache_key: str = "",  # its answer is kept in the response cache under this key
    ) -> None:
        self._path = path
        self.principal = principal
        self.request = request
        self.request_id = request_id
        self.max_tokens = max_tokens  # the bound every segment together runs within
        self._admitted_tokens = admitted_tokens  # held against the key's per-minute limit
        # every choice of every prompt may run to max_tokens: that is what holds must cover
        completion_bound = max_tokens * request.choices
        self._bound = RouteRequest(request.model, path.prompt_bound(request), completion_bound,
                                   request.adapter, request.task, request.batch)  # fmt: skip
        # the prompt's prefix blocks, for prefix-aware routing (services.prefixes)
        self._chain = (
            prefix_chain(request.endpoint, request.prompt)
            if path.router.prefix_aware and request.task == GENERATE
            else ()
        )
        self.response_id = f"{request.response_prefix}-{request_id}"
        self.created = int(time.time())
        self.attempts: list[Attempt] = []  # the segments that ran (failed dispatches aside)
        self.route: RouteRecord | None = None
        self._hold: Hold | None = None
        self._first: pb.JobEvent | None = None  # the current attempt's first event, unrelayed
        self._tried: set[str] = set()  # workers already sent a job of this request
        self._sent = 0  # jobs sent (each attempt's job id is unique)
        self._job_prefix = job_prefix or request_id
        self._settlement: asyncio.Task[Settled | None] | None = None
        self.settled: Settled | None = None
        self._released = False
        self.target = target  # the release version it serves, if the client asked for one
        self.failed_attempts = 0  # attempts that failed through a worker's fault
        self.queued_s = 0.0  # time it waited for a free slot
        self.began_at = time.monotonic()
        self.ended = asyncio.Event()  # set once released
        self.posted = asyncio.Event()  # set once its charge is in the ledger (or cannot be)
        self.cache_status = ""  # "miss" or "bypass" when the client asked for the cache
        # what the client got, for the response cache (when it may keep this answer)
        self.recorder = AnswerRecorder(cache_key) if cache_key else None

    # ---------------------------------------------------------------- attempts
    @property
    def current(self) -> Attempt:
        return self.attempts[-1]

    @property
    def worker_id(self) -> str:
        return self.attempts[0].node_id

    async def begin(self) -> None:
        """Dispatch until a worker answers; raise the client's error if none can."""
        try:
            await self._attempt(self.request.endpoint, self.request.body, continuation=False)
        except BaseException:
            self._release("refused")
            raise

    async def _attempt(self, endpoint: str, body: dict[str, Any], *, continuation: bool) -> None:
        """The one dispatch loop. Route, hold the worst-case cost at the chosen price, send,
        and wait for the first event; on a retryable failure try the next worker (a full
        worker is skipped without blame). When every worker is busy, wait a bounded time
        for a slot. Raises the error the client should see when no attempt can run."""
        path, request = self._path, self.request
        deadline = time.monotonic() + path.settings.queue_timeout_s
        last_error: CoordinatorError | None = None
        while True:
            freed = path.registry.freed_signal()
            decision = path.router.decide(
                self._bound, request.prefs, self._tried, self._chain, request.session
            )
            if self.route is None:
                record = RouteRecord(self.request_id, self.principal.client, request.model,
                                     decision)  # fmt: skip
                self.route = path.decisions.add(record)
            else:
                self.route.decision = decision
            if not decision.ranked:
                remaining = deadline - time.monotonic()
                waits = not request.batch  # a batch line goes back to its queue instead
                if (decision.excluded.get("at_capacity") and remaining > 0
                        and last_error is None and waits):  # fmt: skip
                    began = time.monotonic()
                    if path.demand is not None:
                        path.demand.waiting(request.model, +1)
                    try:
                        with contextlib.suppress(TimeoutError):  # a bounded wait, not a 503
                            async with asyncio.timeout(remaining):
                                await freed.wait()
                    finally:
                        self.queued_s += time.monotonic() - began
                        if path.demand is not None:
                            path.demand.waiting(request.model, -1)
                    continue
                path.count_route(request.model, decision, "none")
                raise last_error or path.no_route_error(request, decision)
            for scored in decision.ranked:
                slot = path.slot(scored.node_id, request.model)
                self._tried.add(scored.node_id)
                if slot is None:  # left or went down since routing looked
                    continue
                if path.router.priced_out(self._bound, slot, request.prefs):
                    continue  # it advertised again since routing ranked it
                quote = Quote.of(slot, request.adapter, request.batch)  # what the hold covers
                worst = charge_for(quote.price, self._bound.prompt_tokens,
                                   self._bound.max_tokens, path.settlement.fee_bps)  # fmt: skip
                try:  # a dearer worker may carry on only if the client can still afford it
                    hold = await path.reservations.hold(
                        self.principal.client, worst.total, self._hold
                    )
                except InsufficientCredit:
                    if self._hold is None:
                        raise
                    continue
                self._hold = hold
                segment = len(self.attempts)  # its place among the segments that ran
                prefix = self._job_prefix
                job_id = prefix if not self._sent else f"{prefix}~{self._sent}"
                self._sent += 1
                attempt = path.dispatcher.open(
                    slot, job_id=job_id, client=self.principal.client, model=request.model,
                    endpoint=endpoint, body=body, segment=segment, continuation=continuation,
                    completion_bound=self._remaining_bound(), adapter=request.adapter,
                    batch=request.batch, quote=quote,
                )  # fmt: skip
                if request.on_dispatch is not None:
                    request.on_dispatch()
                try:
                    first = await path.dispatcher.first_event(attempt)
                except BaseException:  # cancelled while waiting (the client left)
                    attempt.end(cancel=True)
                    raise
                entry: dict[str, Any] = {"worker": slot.node_id, "segment": segment}
                if continuation:
                    entry["continuation"] = True
                self.route.attempts.append(entry)
                if first.WhichOneof("kind") != "error":
                    entry["outcome"] = "ok"
                    if not continuation:  # its engine now holds the prompt's prefix
                        path.router.served(self._bound, self._chain, slot.node_id,
                                           request.session)  # fmt: skip
                    self.attempts.append(attempt)
                    self._first = first
                    path.count_route(request.model, decision, "dispatched")
                    return
                error = first.error
                entry["outcome"] = error.message[:200]
                log.warning(
                    "request %s: worker %s refused its job (%s %s): %s", self.request_id,
                    slot.node_id, error.http_status, error.type, error.message[:300],
                )  # fmt: skip
                attempt.end(cancel=error.type == "timeout")
                last_error = error_from_job(error, path.settings.retry_after_s)
                if not error.retryable:  # a 4xx is the request's fault, not the worker's
                    raise last_error
                if not error.overloaded:  # a full worker is back-pressure, not a failure
                    self._worker_failed(attempt)
                path.count_failover(request.model)
                if self._sent >= MAX_ATTEMPTS or not request.prefs.allow_fallbacks:
                    raise last_error

    def _remaining_bound(self) -> int:
        """What the next segment may generate: the request's bound less what was delivered."""
        delivered = sum(a.observed.token_counts()[1] for a in self.attempts)
        return max(1, self._bound.max_tokens - delivered)

    async def _carry_on(self) -> bool:
        """After the current worker failed mid-stream: go on with another one, if one can."""
        request, path = self.request, self._path
        if self._sent >= MAX_ATTEMPTS or not request.prefs.allow_fallbacks:
            return False
        delivered = delivered_so_far([a.observed for a in self.attempts])
        if not delivered.produced:  # nothing reached the client: start over elsewhere
            endpoint, body, continuation = request.endpoint, request.body, False
        else:
            reason = why_not_continuable(request.endpoint, request.body, delivered)
            if any(set(a.observed.choices) - {0} for a in self.attempts):
                reason = "more than one choice"
            if reason:
                log.info("request %s cannot continue: %s", self.request_id, reason)
                path.count_continuation(request.model, "impossible")
                return False
            endpoint, continuation = COMPLETIONS, True
            # the client's own bound, if any: without one the engine stops at its context
            # (the context length as a bound would overrun it once the prompt grew)
            asked = request.max_tokens or request.body.get("max_tokens")
            body = continuation_body(request.endpoint, request.body, delivered,
                                     asked if isinstance(asked, int) else None)  # fmt: skip
        try:
            await self._attempt(endpoint, body, continuation=continuation)
        except CoordinatorError as exc:
            log.info("request %s found no worker to carry on: %s", self.request_id, exc)
            path.count_continuation(request.model, "no_worker")
            return False
        if continuation:
            path.count_continuation(request.model, "continued")
        return True

    async def _next_event(self, stopping: bool = False) -> pb.JobEvent | None:
        """The current attempt's next event; None if it stalled (once asked to stop, a node
        has STOP_GRACE_S to send its receipt)."""
        if self._first is not None:
            event, self._first = self._first, None
            return event
        timeout = self._path.settings.idle_token_timeout_s
        return await self.current.events.next(min(timeout, STOP_GRACE_S) if stopping else timeout)

    def _failed(self, attempt: Attempt, event: pb.JobEvent | None) -> bool:
        """The attempt ended without a receipt; True if it was the worker's fault."""
        stalled = event is None
        attempt.end(cancel=stalled)
        if self.route is not None:
            outcome = "stalled" if stalled else (event.error.message[:200] if event else "")
            self.route.attempts[-1]["outcome"] = outcome or "failed"
        workers_fault = stalled or (event is not None and event.error.http_status >= 500)
        log.warning(
            "request %s: worker %s failed mid-stream: %s",
            self.request_id,
            attempt.node_id,
            "stalled" if event is None else event.error.message[:300],
        )
        if workers_fault:
            self._worker_failed(attempt)
        return workers_fault

    def _worker_failed(self, attempt: Attempt) -> None:
        self.failed_attempts += 1
        self._path.outcomes.finished(attempt, ok=False)

    # ---------------------------------------------------------------- relay
    async def stream(self) -> AsyncGenerator[tuple[bytes, bool]]:
        """SSE bytes in batches, each with `last`: whatever the worker sent together goes out
        in one write; the last batch carries the usage (once the receipt is checked) or an
        error event, then `[DONE]`."""
        request = self.request
        render = StreamRenderer(request.endpoint, self.response_id, self.created,
                                request.model_shown, request.wants_token_ids)  # fmt: skip
        out: list[bytes] = []
        status = "error"
        policy = request.policy
        gate = policy if policy is not None and policy.gates_output else None
        try:
            while True:
                attempt = self.current
                event = await self._next_event(stopping=gate is not None and gate.stopped)
                kind = event.WhichOneof("kind") if event is not None else "stalled"
                if kind == "frames":
                    assert event is not None
                    attempt.saw_frames(event.frames, time.monotonic())
                    if gate is not None and gate.frames(event.frames):
                        # held back, put back, or withheld: and now the rest is withheld, so
                        # the worker ends the job and signs for what it generated (frames it
                        # sent before it heard are billed, never shown)
                        attempt.events.stop()
                    out += render.frames(event.frames)
                    if self.recorder is not None:
                        self.recorder.frames(event.frames)
                    if out and not attempt.events.pending():
                        yield b"".join(out), False
                        out = []
                    continue
                if kind == "receipt":
                    assert event is not None
                    attempt.receipt = event.receipt
                    attempt.end()
                    self._path.outcomes.finished(attempt, ok=True)
                    status = "ok"
                    yield b"".join([*out, *await self._closing(render)]), True
                    return
                if kind in ("error", "stalled") and gate is not None and gate.stopped:
                    # asked to stop, it ended without a receipt (a node from before stops were
                    # signed): the client has its answer; not the node's fault
                    attempt.end(cancel=True)
                    status = "ok"
                    yield b"".join([*out, *await self._closing(render)]), True
                    return
                if kind in ("error", "stalled"):
                    workers_fault = self._failed(attempt, event)
                    if self._answered():
                        # every choice had finished when the worker died, before its receipt:
                        # nothing is left to generate (a continuation would overrun the bound),
                        # the client has its answer and pays for it; the worker signed nothing
                        status = "ok"
                        yield b"".join([*out, *await self._closing(render)]), True
                        return
                    if workers_fault and await self._carry_on():
                        continue
                    if event is None:
                        exc: CoordinatorError = UpstreamTimeout("the worker stopped sending tokens")
                    else:
                        exc = error_from_job(event.error)
                    await self._settle()
                    yield b"".join([*out, error_event(exc), DONE]), True
                    return
                raise UpstreamFailed(f"unexpected {kind} event in a stream")
        except CoordinatorError as exc:
            yield b"".join([*out, error_event(exc), DONE]), True
        finally:
            self._release(status)

    def _answered(self) -> bool:
        """True once the current attempt delivered a finish for every choice asked for."""
        choices = self.current.observed.choices
        return len(choices) >= self.request.choices and all(
            c.finish_reason for c in choices.values()
        )

    async def _closing(self, render: StreamRenderer) -> list[bytes]:
        """The end of a stream whose answer is complete: usage (once checked) and [DONE]."""
        await self._settle()
        if self.request.include_usage:
            return [render.usage(self.usage()), DONE]
        return [DONE]

    async def whole(self) -> dict[str, Any]:
        """The complete (non-streamed) response, once its receipt is checked."""
        status = "error"
        try:
            result: dict[str, Any] | None = None
            while True:
                attempt = self.current
                event = await self._next_event()
                kind = event.WhichOneof("kind") if event is not None else "stalled"
                if result is not None and kind in ("stalled", "error"):
                    # the answer came but no receipt: the client has it and pays what it
                    # got (as a stream would); the worker signed nothing and is not paid
                    self._failed(attempt, event)
                    status = "ok"
                    return await self._answer(result)
                if event is None:
                    attempt.end(cancel=True)
                    raise UpstreamTimeout("the worker stopped answering")
                if kind == "response":
                    request = self.request
                    value = decode_json(event.response)
                    attempt.observed.add(attempt.endpoint, value, streamed=False)
                    if request.task == EMBED:  # the vectors as checked, in the client's format
                        if sorted(attempt.observed.choices) != list(range(request.choices)):
                            # not one vector per input: nothing delivered, nothing billed
                            attempt.observed.choices.clear()
                            attempt.end(cancel=True)
                            self._worker_failed(attempt)
                            raise UpstreamFailed("the worker did not return one vector per input")
                        result = embeddings_response(attempt.observed, self.response_id,
                                                     request.model_shown, request.body)  # fmt: skip
                    else:
                        result = whole_response(value, self.response_id, request.model_shown,
                                                request.wants_token_ids)  # fmt: skip
                        if request.policy is not None and request.policy.gates_output:
                            request.policy.whole(request.endpoint, result)
                    attempt.first_token_at = attempt.last_token_at = time.monotonic()
                elif kind == "receipt" and result is not None:
                    attempt.receipt = event.receipt
                    attempt.end()
                    self._path.outcomes.finished(attempt, ok=True)
                    status = "ok"
                    return await self._answer(result)
                elif kind == "error":
                    attempt.end()
                    if event.error.retryable and not event.error.overloaded:
                        self._worker_failed(attempt)
                    raise error_from_job(event.error, self._path.settings.retry_after_s)
                else:
                    raise UpstreamFailed(f"unexpected {kind} event")
        finally:
            self._release(status)

    async def _answer(self, result: dict[str, Any]) -> dict[str, Any]:
        await self._settle()
        if self.request.task == EMBED:  # OpenAI's embedding usage: input tokens only
            prompt = self.usage()["prompt_tokens"]
            result["usage"] = {"prompt_tokens": prompt, "total_tokens": prompt}
        elif isinstance(result.get("usage"), dict):
            result["usage"].update(self.usage())  # what was billed
        if self.recorder is not None:
            self.recorder.whole(result)
        return result

    def ttft_s(self) -> float | None:
        """From admission to the first token the client got."""
        first = self.attempts[0].first_token_at if self.attempts else None
        return None if first is None else first - self.began_at

    def texts(self) -> dict[int, str]:
        """Each choice's text as the worker(s) generated it, every segment together."""
        out: dict[int, str] = {}
        for attempt in self.attempts:
            for index, choice in attempt.observed.choices.items():
                out[index] = out.get(index, "") + choice.text
        return out

    def text(self) -> str:
        """What the client got as its first choice's text, every segment together."""
        return "".join(
            c.text for a in self.attempts if (c := a.observed.choices.get(0)) is not None
        )

    # ---------------------------------------------------------------- usage and settlement
    def usage(self) -> dict[str, Any]:
        """The client's usage: once checked, the tokens billed; before, what the stream showed
        (the original prompt once, every segment's completion tokens). Cached prompt tokens
        (billed at the worker's cached price) in `prompt_tokens_details`, as OpenAI shows them."""
        if self.settled is not None:
            prompt = self.settled.usage.prompt_tokens
            completion = self.settled.usage.completion_tokens
            cached = self.settled.cached_tokens
        else:
            first = self.attempts[0].observed if self.attempts else None
            prompt = first.token_counts()[0] if first else 0
            completion = sum(a.observed.token_counts()[1] for a in self.attempts)
            cached = min(first.cached_prompt_tokens, prompt) if first else 0
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }

    async def _settle(self) -> None:
        """Check the receipts now (the client's usage depends on it); the ledger posting runs
        in the background. Started once, whoever asks first (the relay, or the release of a
        stream the client left)."""
        if self._settlement is None:
            self._settlement = asyncio.get_running_loop().create_task(self._check())
            self._path.in_background(self._settlement)  # it outlives a client that leaves
        self.settled = await asyncio.shield(self._settlement)

    async def _check(self) -> Settled | None:
        path = self._path
        records = [a.record() for a in self.attempts if a.observed.choices]
        if not records:
            self._free_hold()
            self.posted.set()
            return None
        try:
            policy = self.request.policy.policy.sha256 if self.request.policy else ""
            settled = await path.settlement.check(
                self.request_id, self.principal.client, records, policy
            )
        except Exception:  # the client already has its tokens; the operator must see this
            log.exception("could not check request %s", self.request_id)
            self._free_hold()
            self.posted.set()
            return None
        path.in_background(self._commit(settled))
        await path.settlement.room()  # the writer is behind: the answer waits for it
        return settled

    async def _commit(self, settled: Settled) -> None:
        path = self._path
        try:
            await path.settlement.commit(settled)
            # the charge is in: the hold may go
            path.reservations.posted(self.principal.client, settled.charge.total)
        except Exception:
            log.exception("could not post request %s", self.request_id)
            return
        finally:
            self._free_hold()
            self.posted.set()
        path.count_tokens(self.request.model, settled.usage)
        # reputation learns once the books show the request: a quarantine's refunds and
        # claw-backs then find its receipt and its charge
        path.judged(settled.verdicts, self._check_candidate())

    def _free_hold(self) -> None:
        if self._hold is not None:
            self._hold.release()

    def _check_candidate(self) -> CheckCandidate:
        first = self.attempts[0]
        return CheckCandidate(
            request_id=self.request_id, model=self.request.model, client=self.principal.client,
            body=self.request.body, node_id=first.node_id, observed=first.observed,
            segments=len(self.attempts), adapter=self.request.adapter,
            endpoint=self.request.endpoint, data_retention=self.request.prefs.data_retention,
            regions=self.request.prefs.regions,
        )  # fmt: skip

    # ---------------------------------------------------------------- release
    def close(self) -> None:
        """Release now if the relay never ran (its response was abandoned before it began);
        after a relay this does nothing."""
        self._release("error")

    def _release(self, status: str) -> None:
        """Free every slot; settle what was delivered if the stream ended unsettled (the
        client went away, or every worker failed); refund unused rate-limit tokens."""
        if self._released:
            return
        self._released = True
        for attempt in self.attempts:
            attempt.end(cancel=True)
        if self._settlement is None:
            if any(a.observed.choices for a in self.attempts):
                self._settlement = asyncio.get_running_loop().create_task(self._check())
                self._path.in_background(self._settlement)
            else:
                self._free_hold()
        unused = self._admitted_tokens - self.usage()["total_tokens"]
        self._path.request_finished(self, status, unused)
        self.ended.set()
