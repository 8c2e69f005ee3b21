"""How much of each model's traffic workers on probation have taken lately.

New keys are free, so without a cap a cheater could take most of a market by running many
fresh nodes. All probation workers of a model together get at most `share` of its recent
requests while established workers have room: once they are over budget, routing ranks them
after established ones (services.routing, the `probation` term). They are never shut out: when
no established worker can serve, they do.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ProbationShare:
    share: float = 0.1  # the most that probation workers may take together
    window: int = 200  # requests the moving average spans (its 1/alpha)
    rest_after_miss: int = 100  # requests not capped after routing found nobody established
    _recent: dict[str, float] = field(default_factory=dict)  # model -> moving share
    _resting: dict[str, int] = field(default_factory=dict)  # model -> requests left uncapped

    def over_budget(self, model: str) -> bool:
        return self._recent.get(model, 0.0) >= self.share and not self._resting.get(model)

    def record(self, model: str, to_probation: bool, capped: bool = False) -> None:
        """One routed request; `capped` when it was routed over budget (so a probation worker
        winning then means no established worker could serve: stop looking for a while, or a
        market of new nodes would pay for a futile search on every request)."""
        previous = self._recent.get(model, 0.0)
        self._recent[model] = previous + ((1.0 if to_probation else 0.0) - previous) / self.window
        resting = self._resting.get(model, 0)
        if capped and to_probation:
            self._resting[model] = self.rest_after_miss
        elif resting:
            self._resting[model] = resting - 1

    def current(self, model: str) -> float:
        return self._recent.get(model, 0.0)
