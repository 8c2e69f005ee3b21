"""The ledger core under any sequence of deposits, held-then-settled requests and payouts:
every invariant holds after every step, and a refused step changes nothing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from billing.errors import DuplicateTransaction, InsufficientFunds
from billing.ledger import (
    AccountKind,
    Posting,
    Transaction,
    account_kind,
    apply,
    check_invariants,
    client_account,
    deposit,
    payout,
    provider_account,
    request_settlement,
)
from billing.payouts import Statement, check_statements
from billing.pricing import Price, Segment, charge_for, segments_charge

CLIENTS = ("ann", "bob")
NODES = ("n1", "n2", "n3")
FEE_BPS = 500


@dataclass
class Books:
    balances: dict[str, int] = field(default_factory=dict)
    posted: set[str] = field(default_factory=set)
    postings: dict[str, list[Posting]] = field(default_factory=dict)
    held: dict[str, int] = field(default_factory=dict)  # client -> reserved, not yet settled
    statements: list[Statement] = field(default_factory=list)

    def post(self, tx: Transaction) -> bool:
        try:
            after = apply(self.balances, self.posted, tx)
        except (InsufficientFunds, DuplicateTransaction):
            return False
        self.balances.update(after)
        self.posted.add(tx.txid)
        self.postings[tx.txid] = list(tx.postings)
        return True

    def available(self, client: str) -> int:
        return self.balances.get(client_account(client), 0) - self.held.get(client, 0)


deposits = st.tuples(st.just("deposit"), st.sampled_from(CLIENTS), st.integers(1, 50_000))
requests = st.tuples(
    st.just("request"),
    st.sampled_from(CLIENTS),
    st.lists(  # segments: (node, price in, price out, prompt, delivered, verified)
        st.tuples(st.sampled_from(NODES), st.integers(0, 10**6), st.integers(0, 10**6),
                  st.integers(0, 4000), st.integers(0, 4000), st.booleans()),
        min_size=1, max_size=3,
    ),
    st.integers(0, 4000),  # max_tokens the hold was made for
)  # fmt: skip
payouts = st.tuples(st.just("payout"), st.sampled_from(NODES), st.integers(0, 10))
replays = st.tuples(st.just("replay"), st.integers(0, 1000), st.just(0))
operations = st.lists(st.one_of(deposits, requests, payouts, replays), max_size=60)


@settings(max_examples=300, deadline=None)
@given(operations)
def test_every_sequence_keeps_the_books_sound(ops: list[tuple[Any, ...]]) -> None:
    books = Books()
    epoch = 0
    for step, op in enumerate(ops):
        before = dict(books.balances)
        kind = op[0]
        if kind == "deposit":
            _, client, amount = op
            assert books.post(deposit(f"d{step}", str(client), int(str(amount))))
        elif kind == "request":
            _, client_obj, raw_segments, max_tokens_obj = op
            client, max_tokens = str(client_obj), int(str(max_tokens_obj))
            segments = [
                Segment(n, Price(pi, po), p, min(d, max_tokens), v)
                for n, pi, po, p, d, v in raw_segments
            ]
            # the hold: prompt + max tokens at the dearest segment's price, plus the fee
            dearest = Price(
                max(s.price.prompt_per_mtok for s in segments),
                max(s.price.completion_per_mtok for s in segments),
            )
            worst = charge_for(
                dearest,
                segments[0].prompt_tokens, max_tokens * len(segments), FEE_BPS,
            ).total  # fmt: skip
            if worst > books.available(client):
                continue  # 402 before any work: nothing posted, nothing held
            books.held[client] = books.held.get(client, 0) + worst
            charge, earned = segments_charge(segments, FEE_BPS)
            assert charge.total <= worst  # what is settled never exceeds what was held
            assert books.post(request_settlement(f"r{step}", client, charge, earned))
            books.held[client] -= worst
        elif kind == "payout":
            _, node, _ = op
            owed = books.balances.get(provider_account(str(node)), 0)
            if owed > 0:
                epoch += 1
                assert books.post(payout(epoch, str(node), owed))
                books.statements.append(Statement(epoch, str(node), "", "", owed, 0))
                assert books.balances[provider_account(str(node))] == 0
        else:  # replaying any earlier transaction id posts nothing
            if books.posted:
                txid = sorted(books.posted)[int(str(op[1])) % len(books.posted)]
                replay = Transaction(txid, "replay", tuple(books.postings[txid]))
                assert not books.post(replay)
                assert books.balances == before
        assert check_invariants(books.balances, books.postings) == []
        assert check_statements(books.postings, books.statements) == []
        for account, balance in books.balances.items():
            if account_kind(account) in (AccountKind.CLIENT, AccountKind.PROVIDER):
                assert balance >= 0, account
        assert all(held == 0 for held in books.held.values())


@given(st.integers(1, 10**9), st.integers(1, 10**9))
def test_an_overdraft_changes_nothing(credit: int, extra: int) -> None:
    books = Books()
    assert books.post(deposit("d", "ann", credit))
    before = dict(books.balances)
    charge = charge_for(Price(10**6, 0), credit + extra, 0, 0)
    assert not books.post(request_settlement("r", "ann", charge, {"n1": charge.provider_amount}))
    assert books.balances == before
    assert "req:r" not in books.posted
