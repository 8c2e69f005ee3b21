"""A model release in the simulated market: a candidate version at a canary share, served by
its own share of the fleet, and the coordinator's real release rules (`Release.pick`, the
sliding `Window`, `rollback_reason`) deciding when to roll it back. The same seeded traffic
runs with and without rollback, so the difference is what the rule saves.

Each request picks a version; a request whose candidate job fails is retried on the stable
version (as the coordinator does for a canary that fails before its first token), so a
failure reaches the client only when the stable version fails it too."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

import simpy

from coordinator.services.releases.health import Window, rollback_reason
from coordinator.services.releases.policy import Release, RollbackPolicy, Version
from simulations.fleet import SimWorker
from simulations.market import FLAKY_FAIL
from simulations.workload import SimRequest


@dataclass(frozen=True)
class ReleaseScenario:
    canary_share: float = 0.05  # of requests sent to the candidate
    candidate_fleet_share: float = 0.05  # of workers that deployed the candidate
    candidate_fail_rate: float = 0.2  # a bad build: this share of its jobs fail
    candidate_ttft_factor: float = 1.0  # … or a slow one
    rollback: RollbackPolicy = field(default_factory=RollbackPolicy)


@dataclass
class ReleaseRun:
    rollback: bool
    requests: int = 0
    candidate_requests: int = 0
    candidate_failures: int = 0  # candidate jobs that failed (each retried on stable)
    client_errors: int = 0  # requests that failed on every version tried
    rolled_back_at_s: float | None = None
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def simulate_release(
    fleet: list[SimWorker], arrivals: list[SimRequest], duration_s: float,
    scenario: ReleaseScenario, *, rollback: bool, seed: int,
) -> ReleaseRun:  # fmt: skip
    env = simpy.Environment()
    rng = random.Random(seed)
    split = max(1, round(len(fleet) * scenario.candidate_fleet_share))
    deployed = set(rng.sample(range(len(fleet)), split))  # a random sample of providers
    pools = {"v2": [w for i, w in enumerate(fleet) if i in deployed],
             "v1": [w for i, w in enumerate(fleet) if i not in deployed]}  # fmt: skip
    weight = round(scenario.canary_share * 1000)
    release = Release("chat", "v1", (Version("chat", "v1", "m-v1", 1000 - weight),
                                     Version("chat", "v2", "m-v2", weight)))  # fmt: skip
    windows = {v: Window(scenario.rollback.window_s) for v in ("v1", "v2")}
    run = ReleaseRun(rollback)

    def job(version: str, request: SimRequest) -> Generator[Any, Any, float | None]:
        """One job on a free worker of the version: its TTFT, or None if it failed."""
        pool = pools[version]
        while True:
            worker = pool[rng.randrange(len(pool))]
            if worker.free:
                break
            yield env.timeout(0.01)
        worker.in_flight += 1
        try:
            yield env.timeout(worker.rtt_s)
            bad = version == "v2" and rng.random() < scenario.candidate_fail_rate
            if bad or (worker.flaky and rng.random() < FLAKY_FAIL):
                return None
            ttft = worker.rtt_s + request.prompt_tokens / worker.gpu.prefill_tok_s
            if version == "v2":
                ttft *= scenario.candidate_ttft_factor
            yield env.timeout(ttft - worker.rtt_s + worker.itl() * request.output_tokens)
            return ttft
        finally:
            worker.in_flight -= 1

    def observe(version: str, ttft: float | None) -> None:
        nonlocal release
        windows[version].add(env.now, ttft is None, ttft)
        candidate = release.version("v2")
        if not rollback or version != "v2" or candidate is None or not candidate.weight:
            return
        reason = rollback_reason(windows["v2"].stats(env.now), windows["v1"].stats(env.now),
                                 scenario.rollback)  # fmt: skip
        if reason is not None:
            release = dataclasses.replace(release, versions=(
                release.stable_version, dataclasses.replace(candidate, weight=0)))  # fmt: skip
            run.rolled_back_at_s, run.reason = env.now, reason

    def serve(request: SimRequest) -> Generator[Any, Any, None]:
        run.requests += 1
        version = release.pick(rng.random()).version
        if version == "v2":
            run.candidate_requests += 1
            ttft = yield from job("v2", request)
            observe("v2", ttft)
            if ttft is not None:
                return
            run.candidate_failures += 1
        for _attempt in range(3):  # the stable version, with its own failover
            ttft = yield from job("v1", request)
            observe("v1", ttft)
            if ttft is not None:
                return
        run.client_errors += 1

    def arrive() -> Generator[Any, Any, None]:
        for request in arrivals:
            yield env.timeout(max(0.0, request.arrival_s - env.now))
            env.process(serve(request))

    env.process(arrive())
    env.run(until=duration_s + 120)
    return run
