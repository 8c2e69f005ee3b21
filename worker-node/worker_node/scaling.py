"""Which model a node should serve (issue 21, item 3's rule; the simulation plays it at 1k-10k
nodes): a pure function of what the demand boards say of each candidate model.

A model is worth what a slot earns serving it: its clearing price times the share of a slot
that demand would keep busy (demand in slots, by Little's law: requests a second, served or
turned away, times the seconds a job takes, over the slots serving it, counting this node's
own where it would join). The node moves only for a clear gain (`margin`), after serving its
current model at least `min_serve_s`, and, so that a whole fleet reading the same board does
not move at once, only with the probability that fills the shortfall: the slots the better
model lacks over the slots its current model has idle."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelDemand:
    """One model on the boards (every coordinator's summed)."""

    model: str
    asked_per_s: float  # requests a second it was asked for: served, or turned away
    job_s: float  # seconds a job takes (mean)
    price: int  # the clearing price a provider earns (per 1M completion tokens)
    slots: int  # slots serving it now

    @property
    def wanted_slots(self) -> float:
        return self.asked_per_s * self.job_s

    def slot_value(self, joining: int = 0) -> float:
        """What one slot earns here (price x expected busy share), with `joining` more."""
        slots = self.slots + joining
        return self.price * min(1.0, self.wanted_slots / slots) if slots else 0.0


@dataclass(frozen=True)
class ModelChoice:
    model: str  # serve this (the current model when staying)
    probability: float  # of acting on it now (1.0 when staying)
    reason: str


def choose_model(
    current: str, my_slots: int, markets: dict[str, ModelDemand], served_for_s: float,
    *, min_serve_s: float = 300.0, margin: float = 1.5,
) -> ModelChoice:  # fmt: skip
    """Stay, or move to the candidate whose slots earn most (see the module's docstring)."""
    here = markets.get(current)
    if here is None:
        return ModelChoice(current, 1.0, "no demand known for the current model: staying")
    value_here = here.slot_value()
    best, value = current, value_here
    for name, market in markets.items():
        if name != current and (joined := market.slot_value(my_slots)) > value:
            best, value = name, joined
    if best == current:
        return ModelChoice(current, 1.0, f"{current} earns most: staying")
    if served_for_s < min_serve_s:
        why = f"{best} would earn more, but {current} has served only {served_for_s:.0f} s"
        return ModelChoice(current, 1.0, f"{why} of {min_serve_s:.0f}")
    if value < margin * value_here:
        return ModelChoice(current, 1.0, f"{best} earns {value:.0f} a slot vs {value_here:.0f}: "
                                         f"below the {margin}x margin")  # fmt: skip
    target = markets[best]
    shortfall = max(0.0, target.wanted_slots - target.slots)
    idle_here = max(float(my_slots), here.slots - here.wanted_slots)
    probability = min(1.0, shortfall / idle_here) if idle_here else 1.0
    return ModelChoice(best, probability, f"{best} earns {value:.0f} a slot vs {value_here:.0f} "
                                          f"here, {shortfall:.0f} slots short")  # fmt: skip
