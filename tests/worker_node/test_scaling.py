"""Which model a node serves (worker_node.scaling): it moves to a model whose slots earn
clearly more, only after its minimum serve time, and only with the probability that fills
the shortfall, so that a fleet reading the same board does not move at once."""

from __future__ import annotations

from worker_node.scaling import ModelDemand, choose_model

# 60 requests a second of 6 s jobs want 360 slots; A has 100, B has 400 and is asked little
SHORT = ModelDemand("A", asked_per_s=60.0, job_s=6.0, price=200, slots=100)
IDLE = ModelDemand("B", asked_per_s=10.0, job_s=6.0, price=200, slots=400)


def test_a_node_on_an_idle_model_moves_toward_the_short_one_with_the_shortfall_share() -> None:
    choice = choose_model("B", 1, {"A": SHORT, "B": IDLE}, served_for_s=600)
    assert choice.model == "A"
    # 260 slots short, 340 idle where it is: about three in four idle nodes should move
    assert choice.probability == 260 / 340
    assert "short" in choice.reason


def test_it_stays_before_its_minimum_serve_time_or_below_the_margin() -> None:
    early = choose_model("B", 1, {"A": SHORT, "B": IDLE}, served_for_s=60, min_serve_s=300)
    assert early.model == "B"
    assert "served only" in early.reason
    busy_b = ModelDemand("B", asked_per_s=50.0, job_s=6.0, price=200, slots=400)  # 75 % busy
    close = choose_model("B", 1, {"A": SHORT, "B": busy_b}, served_for_s=600, margin=1.5)
    assert close.model == "B"  # A's slots earn 200, B's 150: not 1.5 times more
    assert "margin" in close.reason


def test_the_model_that_earns_most_keeps_its_nodes() -> None:
    stay = choose_model("A", 1, {"A": SHORT, "B": IDLE}, served_for_s=600)
    assert stay.model == "A"
    assert stay.probability == 1.0
