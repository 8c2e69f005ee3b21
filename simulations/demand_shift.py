"""Demand that moves between models, and a market that follows it or not (issue 21's
benchmark): fixed configs, price discovery (worker_node.pricing), nodes that change model
(worker_node.scaling) at their fixed prices, and both, on one seeded workload.

The schedule: three models; for the first third of the run 60/30/10 % of requests ask for
A/B/C, then 10/60/30, then 30/10/60. Offered load is `utilization` of the fleet's slots. Each
provider has a cost (0.5-1.5x a reference price); a fixed config asks cost x 1.1-2.5 and
serves the model it was set up with (a third each). Each client pays at most 1.5-4x the
reference (`max_price`). Routing is Agora's price order: the cheapest free worker within the
client's max_price; with none free the request waits up to 10 s for one, then is turned away
(unmet: capacity); with no worker within its max_price at all it is turned away at once
(unmet: price). The coordinator's board (every 10 s) counts both, per model, with the queue.
A node prices itself every 30 s from that board (floor = cost, ceiling 4x, 10 rungs, starting
on the rung nearest its fixed ask); a scaling node also looks every 60 s for a model whose
slots earn more, serves its current one at least 300 s, and takes 60 s to load another.
One slot per node (a slot stands for a GPU's worth of concurrent work): jobs take 0.2 s of
prefill plus 200 tokens on average at 30 ms a token.
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import simpy

from worker_node.pricing import Interval, PriceLadder, PriceState, decide, would_pay
from worker_node.scaling import ModelDemand, choose_model

MODELS = ("A", "B", "C")
SCHEDULE = ((0.6, 0.3, 0.1), (0.1, 0.6, 0.3), (0.3, 0.1, 0.6))  # shares per third of the run
# fixed configs; price discovery; nodes that change model at their fixed prices; both
MODES = ("fixed", "price", "scaling-fixed-price", "scaling")
REFERENCE = 200_000  # a typical provider's cost, per 1M completion tokens
PREFILL_S, ITL_S, MEAN_OUTPUT = 0.2, 0.03, 200
JOB_S = PREFILL_S + ITL_S * MEAN_OUTPUT
QUEUE_TIMEOUT_S = 10.0
BOARD_S, PRICE_S, SCALE_S = 10.0, 30.0, 60.0
MIN_SERVE_S, LOAD_S = 300.0, 60.0
UNMET_WINDOW_S, DEMAND_WINDOW_S = 60.0, 120.0
STEPS = 10
CLIENT_MAX = (1.5, 4.0)  # what clients pay at most, in references
# lower bounds of the max_price bands waiting requests are kept in
BANDS = tuple(int(REFERENCE * (CLIENT_MAX[0] + i * 0.1)) for i in range(26))


def _band(max_price: int) -> int:
    return max(0, min(len(BANDS) - 1, (max_price - BANDS[0]) * 10 // REFERENCE))


@dataclass
class Node:
    index: int
    model: str
    cost: int
    ask: int
    ladder: PriceLadder
    state: PriceState
    busy: bool = False
    loading: bool = False
    switch_to: str = ""  # a model to load once the running job ends
    served_since: float = 0.0
    jobs: int = 0  # in the current pricing interval
    busy_in_interval: float = 0.0  # seconds of the pricing interval the slot was busy
    job_started: float = 0.0
    interval_began: float = 0.0
    busy_s: float = 0.0
    earned: int = 0
    jobs_by_phase: list[int] = field(default_factory=lambda: [0, 0, 0])


@dataclass
class Ask:
    arrival_s: float
    model: str
    max_price: int
    output: int


@dataclass
class Tally:
    """What the coordinator counts per model (its demand board is read from this)."""

    served: deque[tuple[float, int]] = field(default_factory=deque)  # (when, price)
    unmet_capacity: deque[float] = field(default_factory=deque)
    unmet_price: deque[float] = field(default_factory=deque)


class Market:
    def __init__(self, nodes: list[Node], mode: str, duration_s: float, seed: int) -> None:
        self.env = simpy.Environment()
        self.nodes, self.mode, self.duration_s = nodes, mode, duration_s
        self.rng = random.Random(seed)
        self.free: dict[str, list[tuple[int, int]]] = {m: [] for m in MODELS}  # (ask, node)
        # per model, waiting requests by band of max_price (a freed slot takes the oldest
        # request of any band it fits: the coordinator's queue, where each request routes)
        self.queues: dict[str, list[deque[Ask]]] = {m: [deque() for _ in BANDS] for m in MODELS}
        self.tallies = {m: Tally() for m in MODELS}
        self.min_ask = dict.fromkeys(MODELS, 0)
        self.outcomes: list[tuple[float, float | None, int]] = []  # (arrival, ttft, price)
        self.unmet = {"capacity": 0, "price": 0}
        self.switches = 0
        # requests turned away for capacity, with what they would have paid at most; and, as
        # of the last board, how many in the last minute and their median limit
        self.willing: dict[str, deque[tuple[float, int]]] = {m: deque() for m in MODELS}
        self.turned_away: dict[str, tuple[int, int]] = dict.fromkeys(MODELS, (0, 0))
        # per model, as of the last board: requests asked in the window, clearing price; and
        # the nodes serving it or on their way to it
        self.demand: dict[str, tuple[int, int]] = dict.fromkeys(MODELS, (0, REFERENCE))
        self.heading: dict[str, int] = dict.fromkeys(MODELS, 0)
        for node in nodes:
            self.heading[node.model] += 1
        for node in nodes:
            self._release(node)
        self._refresh_min_asks()

    # ---------------------------------------------------------------- requests
    def arrive(self, ask: Ask) -> None:
        now = self.env.now
        if self.min_ask[ask.model] > ask.max_price or self.min_ask[ask.model] == 0:
            self.tallies[ask.model].unmet_price.append(now)
            self.unmet["price"] += 1
            self.outcomes.append((ask.arrival_s, None, 0))
            return
        node = self._cheapest_free(ask.model, ask.max_price)
        if node is None:
            self.queues[ask.model][_band(ask.max_price)].append(ask)
        else:
            self._start(node, ask)

    def _cheapest_free(self, model: str, max_price: int) -> Node | None:
        heap = self.free[model]
        while heap:
            ask, index = heap[0]
            node = self.nodes[index]
            if node.busy or node.loading or node.model != model or node.ask != ask:
                heapq.heappop(heap)  # stale: it took a job, moved, or repriced since
                continue
            if ask > max_price:
                return None
            heapq.heappop(heap)
            return node
        return None

    def _start(self, node: Node, ask: Ask) -> None:
        now = self.env.now
        node.busy, node.job_started = True, now
        node.jobs += 1
        duration = PREFILL_S + ITL_S * ask.output
        price = node.ask
        self.outcomes.append((ask.arrival_s, now - ask.arrival_s + PREFILL_S, price))
        self.tallies[ask.model].served.append((now, price))
        node.earned += ask.output * price // 1_000_000
        node.jobs_by_phase[min(2, int(3 * now / self.duration_s))] += 1
        done = self.env.timeout(duration)
        done.callbacks.append(lambda _e: self._finish(node, duration))

    def _finish(self, node: Node, duration: float) -> None:
        node.busy = False
        node.busy_s += duration
        node.busy_in_interval += self.env.now - max(node.job_started, node.interval_began)
        if node.switch_to:
            self._load(node)
            return
        self._take_work(node)

    def _take_work(self, node: Node) -> None:
        """A free node takes the oldest waiting request it fits, or waits for one."""
        now, best = self.env.now, None
        for band, queue in zip(BANDS, self.queues[node.model], strict=True):
            while queue and queue[0].arrival_s + QUEUE_TIMEOUT_S < now:
                self._turned_away(queue.popleft())
            if queue and band >= node.ask and (best is None or queue[0].arrival_s <
                                                best[0].arrival_s):  # fmt: skip
                best = queue
        if best is not None:
            self._start(node, best.popleft())
            return
        self._release(node)

    def _turned_away(self, ask: Ask) -> None:
        self.tallies[ask.model].unmet_capacity.append(self.env.now)
        self.willing[ask.model].append((self.env.now, ask.max_price))
        self.unmet["capacity"] += 1
        self.outcomes.append((ask.arrival_s, None, 0))

    def _release(self, node: Node) -> None:
        if not node.busy and not node.loading:
            heapq.heappush(self.free[node.model], (node.ask, node.index))

    # ---------------------------------------------------------------- the board
    def _refresh_min_asks(self) -> None:
        asks: dict[str, int] = {}
        for node in self.nodes:
            if not node.loading:
                asks[node.model] = min(asks.get(node.model, node.ask), node.ask)
        self.min_ask = {m: asks.get(m, 0) for m in MODELS}

    def board_tick(self) -> Any:
        while True:
            yield self.env.timeout(BOARD_S)
            now = self.env.now
            for model, queues in self.queues.items():
                for queue in queues:
                    while queue and queue[0].arrival_s + QUEUE_TIMEOUT_S < now:
                        self._turned_away(queue.popleft())
                tally = self.tallies[model]
                for series in (tally.unmet_capacity, tally.unmet_price):
                    while series and series[0] < now - DEMAND_WINDOW_S:
                        series.popleft()
                while tally.served and tally.served[0][0] < now - DEMAND_WINDOW_S:
                    tally.served.popleft()
            for model, willing in self.willing.items():  # turned away in the last minute
                while willing and willing[0][0] < now - UNMET_WINDOW_S:
                    willing.popleft()
                limits = sorted(p for _t, p in willing)
                self.turned_away[model] = (len(limits), limits[len(limits) // 2] if limits else 0)
            self._refresh_min_asks()
            for model, tally in self.tallies.items():
                asked = len(tally.served) + len(tally.unmet_capacity) + len(tally.unmet_price)
                prices = sorted(p for _t, p in tally.served)
                price = prices[len(prices) // 2] if prices else self.min_ask[model] or REFERENCE
                self.demand[model] = (asked, price)

    def markets(self) -> dict[str, ModelDemand]:
        """The boards as a node reads them (demand and prices as of the last board); slots on
        their way to a model (loading it, or to load it after their job) count as its."""
        return {
            model: ModelDemand(model, asked / DEMAND_WINDOW_S, JOB_S, price, self.heading[model])
            for model, (asked, price) in self.demand.items()
        }

    # ---------------------------------------------------------------- the nodes
    def pricing(self, node: Node) -> Any:
        yield self.env.timeout(self.rng.uniform(0, PRICE_S))  # nodes are not in step
        while True:
            now = self.env.now
            turned_away, median = self.turned_away[node.model]  # as the last board said
            medians = [median] if turned_away else []
            ladder, rung = node.ladder, node.state.rung
            asks = ladder.ask(rung)[1], ladder.ask(min(ladder.steps, rung + 1))[1]
            busy_s = node.busy_in_interval
            if node.busy:  # the running job's time in this interval (time-weighted, as a node)
                busy_s += now - max(node.job_started, node.interval_began)
            node.interval_began = now
            seen = Interval(busy_share=min(1.0, busy_s / PRICE_S), unmet=turned_away,
                            queued=sum(map(len, self.queues[node.model])),
                            would_pay_more=would_pay(asks[1], turned_away, 0, medians),
                            would_pay_now=would_pay(asks[0], turned_away, 0, medians))  # fmt: skip
            node.jobs, node.busy_in_interval = 0, 0.0
            node.state = decide(node.ladder, node.state, seen).state
            ask = node.ladder.ask(node.state.rung)[1]
            if ask != node.ask:
                node.ask = ask
                if not node.busy and not node.loading:
                    self._take_work(node)  # a lower ask may fit a waiting request now
            yield self.env.timeout(PRICE_S)

    def scaling(self, node: Node) -> Any:
        yield self.env.timeout(self.rng.uniform(0, SCALE_S))
        while True:
            if not node.loading and not node.switch_to:
                choice = choose_model(node.model, 1, self.markets(),
                                      self.env.now - node.served_since,
                                      min_serve_s=MIN_SERVE_S)  # fmt: skip
                if choice.model != node.model and self.rng.random() < choice.probability:
                    node.switch_to = choice.model
                    self.switches += 1
                    self.heading[node.model] -= 1  # the next reader counts it where it goes
                    self.heading[choice.model] += 1
                    if not node.busy:
                        self._load(node)
            yield self.env.timeout(SCALE_S)

    def _load(self, node: Node) -> None:
        node.loading = True
        done = self.env.timeout(LOAD_S)
        done.callbacks.append(lambda _e: self._loaded(node))

    def _loaded(self, node: Node) -> None:
        node.model, node.switch_to, node.loading = node.switch_to, "", False
        node.served_since = self.env.now
        self._take_work(node)


def make_nodes(count: int, rng: random.Random) -> list[Node]:
    nodes = []
    for i in range(count):
        cost = int(REFERENCE * rng.uniform(0.5, 1.5))
        fixed = int(cost * rng.uniform(1.1, 2.5))
        ladder = PriceLadder((cost, cost), (4 * cost, 4 * cost), STEPS)
        rung = round((fixed - cost) * STEPS / (3 * cost))
        nodes.append(Node(i, MODELS[i % len(MODELS)], cost, fixed, ladder, PriceState(rung)))
    return nodes


def workload(count: int, utilization: float, duration_s: float, rng: random.Random) -> list[Ask]:
    rate = utilization * count / JOB_S
    asks: list[Ask] = []
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= duration_s:
            return asks
        shares = SCHEDULE[min(2, int(3 * t / duration_s))]
        model = rng.choices(MODELS, shares)[0]
        output = max(1, min(int(rng.expovariate(1 / MEAN_OUTPUT)), 2_048))
        asks.append(Ask(t, model, int(REFERENCE * rng.uniform(*CLIENT_MAX)), output))


def simulate_demand(
    count: int, mode: str, duration_s: float, utilization: float, seed: int,
    on_progress: Callable[[float], None] | None = None,
) -> dict[str, Any]:  # fmt: skip
    nodes = make_nodes(count, random.Random(seed))
    if mode in ("fixed", "scaling-fixed-price"):
        for node in nodes:  # its configured ask, as the ladder's rung would not give it exactly
            node.ladder = PriceLadder((node.ask, node.ask), (node.ask, node.ask), STEPS)
    else:
        for node in nodes:
            node.ask = node.ladder.ask(node.state.rung)[1]
    market = Market(nodes, mode, duration_s, seed)
    env = market.env
    asks = workload(count, utilization, duration_s, random.Random(seed + 1))

    def arrivals() -> Any:
        for i, ask in enumerate(asks):
            yield env.timeout(max(0.0, ask.arrival_s - env.now))
            market.arrive(ask)
            if on_progress is not None and i % 20_000 == 0:
                on_progress(env.now / duration_s)

    env.process(arrivals())
    env.process(market.board_tick())
    if mode in ("price", "scaling"):
        for node in nodes:
            env.process(market.pricing(node))
    if mode.startswith("scaling"):
        for node in nodes:
            env.process(market.scaling(node))
    env.run(until=duration_s + QUEUE_TIMEOUT_S + 1)
    for queues in market.queues.values():  # still waiting at the end: turned away
        for queue in queues:
            while queue:
                market._turned_away(queue.popleft())
    return report(market, mode, count, duration_s, utilization)


def report(
    market: Market, mode: str, count: int, duration_s: float, utilization: float
) -> dict[str, Any]:
    outcomes = market.outcomes
    served = [(ttft, price) for _a, ttft, price in outcomes if ttft is not None]
    ttfts = sorted(t for t, _p in served)
    phases = [sum(n.jobs_by_phase[p] == 0 for n in market.nodes) / count for p in range(3)]
    return {
        "mode": mode, "workers": count, "duration_s": duration_s, "utilization": utilization,
        "requests": len(outcomes),
        "unmet": len(outcomes) - len(served),
        "unmet_share": (len(outcomes) - len(served)) / len(outcomes) if outcomes else 0.0,
        "ttft_p50_s": ttfts[len(ttfts) // 2] if ttfts else None,
        "ttft_p99_s": ttfts[int(0.99 * (len(ttfts) - 1))] if ttfts else None,
        "provider_utilization": sum(n.busy_s for n in market.nodes) / (count * duration_s),
        "idle_provider_share": sum(phases) / 3,  # nodes with no job in a phase, averaged
        "idle_by_phase": phases,
        "client_price_mean": sum(p for _t, p in served) / len(served) if served else None,
        "unmet_by_reason": dict(market.unmet),
        "model_switches": market.switches,
    }  # fmt: skip
