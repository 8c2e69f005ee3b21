from __future__ import annotations

import pytest

from billing.pricing import Charge, Price, charge_for, format_micro


def test_cost_rounds_up_once_per_request() -> None:
    price = Price(prompt_per_mtok=100_000, completion_per_mtok=200_000)
    # 20 * 0.1 + 32 * 0.2 = 8.4 micro-units -> 9
    assert price.cost(20, 32) == 9
    assert price.cost(0, 0) == 0
    assert price.cost(1_000_000, 0) == 100_000  # exact: no rounding


def test_fee_is_a_share_of_the_provider_amount_rounded_up() -> None:
    charge = charge_for(Price(100_000, 200_000), 20, 32, fee_bps=500)
    assert charge == Charge(provider_amount=9, fee=1)
    assert charge.total == 10
    assert charge_for(Price(1_000_000, 0), 1_000_000, 0, fee_bps=250) == Charge(1_000_000, 25_000)
    assert charge_for(Price(1_000_000, 0), 1_000_000, 0, fee_bps=0).fee == 0


def test_client_price_includes_fee() -> None:
    assert Price(100_000, 200_000).with_fee(500) == Price(105_000, 210_000)


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        Price(1, 1).cost(-1, 0)
    with pytest.raises(ValueError, match="fee_bps"):
        charge_for(Price(1, 1), 1, 1, fee_bps=10_001)


def test_format_micro_is_exact() -> None:
    assert format_micro(10) == "0.000010 USD"
    assert format_micro(-12_345_678) == "-12.345678 USD"
