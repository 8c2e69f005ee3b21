"""Simulated providers: heterogeneous GPUs, prices, network distances, some flaky, some cheating.

A `SimWorker` exposes the same read-only view routing needs from a live worker
(coordinator.services.routing.CandidateView), so the coordinator's own `route` ranks them.
Service times are a simple, standard model of an inference engine: a prefill at a fixed rate,
then decode steps whose time grows with the number of streams sharing the batch.
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Gpu:
    name: str
    prefill_tok_s: float  # prompt tokens per second
    itl_s: float  # seconds per output token for one stream alone
    slots: int  # concurrent streams the engine takes
    price_completion: int  # typical price, micro-units per 1M output tokens
    share: float  # share of the fleet


# an 8B-class model; prices and speeds in the range seen on public GPU markets
CATALOGUE = (
    Gpu("H100", 12_000.0, 0.010, 32, 200_000, 0.15),
    Gpu("A100", 7_000.0, 0.015, 24, 150_000, 0.25),
    Gpu("L40S", 4_000.0, 0.022, 16, 110_000, 0.20),
    Gpu("RTX 4090", 3_000.0, 0.025, 8, 80_000, 0.25),
    Gpu("RTX 3090", 1_800.0, 0.035, 6, 60_000, 0.15),
)
BATCH_SLOWDOWN = 0.6  # a full batch makes each token this much slower than a lone stream
CACHED_CONVERSATIONS = 256  # conversations whose prefix an engine's KV cache keeps (LRU)


@dataclass
class SimWorker:
    node_id: str
    gpu: Gpu
    price_prompt_per_mtok: int
    price_completion_per_mtok: int
    rtt_s: float  # round trip between coordinator and worker
    stake: float  # bonded stake (for the stake-weighted policy)
    flaky: bool = False  # fails some jobs at start and stalls some
    cheater: bool = False  # returns made-up output (cheap and fast on paper)
    in_flight: int = 0
    quarantined: bool = False
    served: int = 0
    earned: int = 0
    busy_s: float = 0.0  # slot-seconds used
    # the conversations whose prefix its engine holds (conversation -> tokens), LRU order
    cache: OrderedDict[int, int] = field(default_factory=OrderedDict)

    def cached_tokens(self, conversation: int, shared: int) -> int:
        """Prompt tokens of a turn its engine need not prefill again."""
        held = self.cache.get(conversation, 0) if conversation >= 0 else 0
        return min(held, shared)

    def hold(self, conversation: int, tokens: int) -> None:
        if conversation < 0:
            return
        self.cache.pop(conversation, None)
        self.cache[conversation] = tokens
        while len(self.cache) > CACHED_CONVERSATIONS:
            self.cache.popitem(last=False)

    # ---- CandidateView (what routing reads)
    @property
    def max_concurrency(self) -> int:
        return self.gpu.slots

    @property
    def engine_waiting(self) -> int:
        return 0

    @property
    def kv_cache_usage(self) -> float:
        return self.in_flight / self.gpu.slots

    @property
    def available(self) -> bool:
        return not self.quarantined

    # the simulated market serves base models only: no LoRA adapters
    adapters: frozenset[str] = frozenset()
    max_loras: int = 0

    @property
    def adapter_price_prompt_per_mtok(self) -> int:
        return self.price_prompt_per_mtok

    @property
    def adapter_price_completion_per_mtok(self) -> int:
        return self.price_completion_per_mtok

    @property
    def price_cached_prompt_per_mtok(self) -> int:  # no cached-prompt discount simulated
        return self.price_prompt_per_mtok

    @property
    def task(self) -> str:  # only generation is simulated
        return "generate"

    @property
    def takes_batches(self) -> bool:  # batches are not simulated
        return False

    @property
    def data_retention(self) -> str:  # declarations are not simulated
        return ""

    @property
    def region(self) -> str:
        return ""

    @property
    def free(self) -> bool:
        return self.available and self.in_flight < self.gpu.slots

    def itl(self) -> float:
        return self.gpu.itl_s * (1.0 + BATCH_SLOWDOWN * self.in_flight / self.gpu.slots)


def make_fleet(
    size: int, rng: random.Random, flaky_share: float = 0.1, cheater_share: float = 0.02
) -> list[SimWorker]:
    """`size` workers, sorted by completion price (cheapest first, as the registry keeps them)."""
    weights = [g.share for g in CATALOGUE]
    fleet = []
    for i in range(size):
        gpu = rng.choices(CATALOGUE, weights)[0]
        cheater = rng.random() < cheater_share
        markup = rng.uniform(0.8, 1.3) * (0.7 if cheater else 1.0)  # cheaters undercut
        completion = int(gpu.price_completion * markup)
        fleet.append(
            SimWorker(
                node_id=f"sim-{i:06d}",
                gpu=gpu,
                price_prompt_per_mtok=completion // 2,
                price_completion_per_mtok=completion,
                rtt_s=rng.uniform(0.005, 0.150),
                stake=math.exp(rng.gauss(0.0, 1.0)) * (0.5 if cheater else 1.0),
                flaky=rng.random() < flaky_share,
                cheater=cheater,
            )
        )
    fleet.sort(key=lambda w: (w.price_completion_per_mtok, w.price_prompt_per_mtok))
    return fleet
