from __future__ import annotations

import pytest

from billing.errors import DuplicateTransaction, InsufficientFunds, UnbalancedTransaction
from billing.ledger import (
    EXTERNAL_DEPOSITS,
    NETWORK_FEES,
    PaidReceipt,
    Posting,
    Transaction,
    apply,
    check_invariants,
    check_receipts,
    client_account,
    deposit,
    provider_account,
    request_charge,
)
from billing.pricing import Charge


def test_unbalanced_transactions_cannot_exist() -> None:
    with pytest.raises(UnbalancedTransaction, match="sum to 1"):
        Transaction("t", "x", (Posting("client:a", -1), Posting("provider:b", 2)))
    with pytest.raises(UnbalancedTransaction):
        Transaction("t", "x", ())
    with pytest.raises(UnbalancedTransaction, match="integers"):
        Transaction("t", "x", (Posting("client:a", -0.5), Posting("provider:b", 0.5)))  # type: ignore[arg-type]


def test_unknown_account_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="bogus"):
        Transaction("t", "x", (Posting("bogus:a", -1), Posting("client:b", 1)))


def test_request_charge_moves_total_from_client_to_provider_and_fee() -> None:
    tx = request_charge("r1", "alice", "node1", Charge(provider_amount=90, fee=10))
    assert tx.txid == "req:r1"
    assert sorted((p.account, p.amount) for p in tx.postings) == [
        (client_account("alice"), -100),
        (NETWORK_FEES, 10),
        (provider_account("node1"), 90),
    ]


def test_apply_refuses_overdraft_and_duplicates() -> None:
    balances = {client_account("alice"): 50}
    tx = request_charge("r1", "alice", "node1", Charge(90, 10))
    with pytest.raises(InsufficientFunds):
        apply(balances, set(), tx)
    with pytest.raises(DuplicateTransaction):
        apply({client_account("alice"): 500}, {"req:r1"}, tx)
    after = apply({client_account("alice"): 500}, set(), tx)
    assert after[client_account("alice")] == 400


def test_external_account_may_go_negative() -> None:
    after = apply({}, set(), deposit("d1", "alice", 1_000))
    assert after == {EXTERNAL_DEPOSITS: -1_000, client_account("alice"): 1_000}


def test_invariant_check_finds_drift_and_negative_clients() -> None:
    postings = {"d1": [Posting(EXTERNAL_DEPOSITS, -5), Posting("client:a", 5)]}
    assert check_invariants({EXTERNAL_DEPOSITS: -5, "client:a": 5}, postings) == []
    problems = check_invariants({EXTERNAL_DEPOSITS: -5, "client:a": 6}, postings)
    assert any("stored balance 6 != sum of postings 5" in p for p in problems)
    assert any("sum to 1" in p for p in problems)
    negative = {"x": [Posting(EXTERNAL_DEPOSITS, 5), Posting("client:a", -5)]}
    assert any(
        "negative" in p for p in check_invariants({EXTERNAL_DEPOSITS: 5, "client:a": -5}, negative)
    )


def _request_books(provider_amount: int) -> dict[str, list[Posting]]:
    tx = request_charge("r1", "a", "node", Charge(provider_amount, 1))
    return {tx.txid: list(tx.postings)}


def test_receipts_and_request_postings_match_one_to_one() -> None:
    books = _request_books(10)
    assert check_receipts(books, [PaidReceipt("r1", "node", 10)]) == []
    # continuation: two receipts of one worker for one request add up
    assert check_receipts(books, [PaidReceipt("r1", "node", 4), PaidReceipt("r1", "node", 6)]) == []


def test_receipt_audit_finds_every_kind_of_mismatch() -> None:
    books = _request_books(10)
    assert check_receipts(books, []) == [
        f"req:r1: {provider_account('node')} credited 10 without a receipt"
    ]
    assert check_receipts(books, [PaidReceipt("r1", "node", 9)]) == [
        f"req:r1: {provider_account('node')} credited 10, receipts say 9"
    ]
    assert check_receipts(books, [PaidReceipt("r1", "node", 10), PaidReceipt("r2", "x", 3)]) == [
        "receipt of r2 was never posted"
    ]
    assert check_receipts(books, [PaidReceipt("r1", "node", 10), PaidReceipt("r1", "y", 2)]) == [
        f"req:r1: {provider_account('y')} has a receipt but no credit"
    ]
