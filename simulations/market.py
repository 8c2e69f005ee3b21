"""The market as a SimPy discrete-event simulation: requests arrive, a policy ranks workers,
the first free one serves (prefill, then decode at its batch-dependent pace); failures fail
over to the next; a request finding nobody free waits and retries, up to a queue timeout.

Flaky workers fail some jobs at dispatch and stall some (decode 5x slower); cheaters serve
made-up output fast, which only a spot check (Agora's, at its real rates) can expose.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

import simpy

from coordinator.services.spot_judgement import CheckPolicy
from simulations.fleet import SimWorker
from simulations.policies import Policy
from simulations.workload import SimRequest

FLAKY_FAIL = 0.15  # a flaky worker's chance to fail a job at dispatch
FLAKY_STALL = 0.05  # … and to stall one (decode 5x slower)
QUEUE_TIMEOUT_S = 10.0  # a request finding no free worker waits this long, then fails (503)
RETRY_S = 0.05


@dataclass
class Outcome:
    arrival_s: float
    ttft_s: float | None = None  # None: failed
    e2e_s: float | None = None
    cost: int = 0  # what the client paid, micro-units
    tokens: int = 0
    bad: bool = False  # served made-up output
    attempts: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of them, found in the serving engine's prefix cache


@dataclass
class Run:
    policy: str
    workers: int
    duration_s: float
    outcomes: list[Outcome] = field(default_factory=list)
    fleet: list[SimWorker] = field(default_factory=list)


def _charge(worker: SimWorker, request: SimRequest) -> int:
    return (
        request.prompt_tokens * worker.price_prompt_per_mtok
        + request.output_tokens * worker.price_completion_per_mtok
    ) // 1_000_000


def simulate(
    fleet: list[SimWorker],
    policy: Policy,
    arrivals: list[SimRequest],
    duration_s: float,
    seed: int,
    on_progress: Callable[[float], None] | None = None,
) -> Run:
    env = simpy.Environment()
    rng = random.Random(seed)
    checks = CheckPolicy()
    run = Run(policy.name, len(fleet), duration_s, fleet=fleet)

    def serve(request: SimRequest) -> Generator[Any, Any, None]:
        outcome = Outcome(request.arrival_s)
        run.outcomes.append(outcome)
        tried: set[str] = set()
        while env.now - request.arrival_s < QUEUE_TIMEOUT_S:
            ranked = [w for w in policy.rank(request, env.now) if w.node_id not in tried]
            worker = next((w for w in ranked if w.free), None)
            if worker is None:
                yield env.timeout(RETRY_S)
                continue
            outcome.attempts += 1
            worker.in_flight += 1
            policy.started(worker)
            yield env.timeout(worker.rtt_s / 2)
            if worker.flaky and rng.random() < FLAKY_FAIL:
                yield env.timeout(worker.rtt_s / 2)  # the error travels back
                worker.in_flight -= 1
                policy.finished(worker, False, 0.0, 0.0, env.now)
                tried.add(worker.node_id)
                if outcome.attempts >= 3:
                    return
                continue
            started = env.now
            itl = worker.itl() * (5.0 if worker.flaky and rng.random() < FLAKY_STALL else 1.0)
            if worker.cheater:
                itl = worker.gpu.itl_s * 0.2  # made-up text costs nothing to produce
            cached = worker.cached_tokens(request.conversation, request.shared_tokens)
            fresh = request.prompt_tokens - cached
            prefill = 0.0 if worker.cheater else fresh / worker.gpu.prefill_tok_s
            policy.serving(request, worker, env.now)
            yield env.timeout(prefill)
            worker.hold(request.conversation, request.prompt_tokens + request.output_tokens)
            outcome.ttft_s = env.now + worker.rtt_s / 2 - request.arrival_s
            yield env.timeout(itl * max(0, request.output_tokens - 1))
            worker.in_flight -= 1
            worker.busy_s += env.now - started
            outcome.e2e_s = env.now + worker.rtt_s / 2 - request.arrival_s
            outcome.cost = _charge(worker, request)
            outcome.tokens = request.prompt_tokens + request.output_tokens
            outcome.prompt_tokens, outcome.cached_tokens = request.prompt_tokens, cached
            outcome.bad = worker.cheater
            worker.served += 1
            worker.earned += outcome.cost
            policy.finished(worker, True, outcome.ttft_s, itl, env.now)
            if policy.checks:
                on_probation = worker.served < 20
                if rng.random() < (checks.probation_rate if on_probation else checks.rate):
                    policy.verdict(worker, not worker.cheater, env.now)
            return

    def arrive() -> Generator[Any, Any, None]:
        for request in arrivals:
            yield env.timeout(max(0.0, request.arrival_s - env.now))
            env.process(serve(request))
            if on_progress is not None and request.index % 1000 == 0:
                on_progress(env.now)

    env.process(arrive())
    env.run(until=duration_s + QUEUE_TIMEOUT_S + 60)
    return run
