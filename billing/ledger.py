"""Double-entry ledger core: pure functions over plain values.

Every transaction's postings sum to zero; a transaction id is its idempotency key (a request id
posts at most once). Storage lives elsewhere (the coordinator's store applies these values
inside one database transaction); this module decides what is valid.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from billing.errors import DuplicateTransaction, InsufficientFunds, UnbalancedTransaction
from billing.pricing import Charge


class AccountKind(StrEnum):
    CLIENT = "client"  # prepaid credit; never below zero
    PROVIDER = "provider"  # earnings of a worker node; never below zero
    BOND = "bond"  # what a worker node put at stake (slashed for proven fraud); never below zero
    NETWORK = "network"  # the network's own books (fees, failover costs); may go negative
    EXTERNAL = "external"  # money entering/leaving the system (deposits); may go negative


NETWORK_FEES = "network:fees"
NETWORK_FAILOVER = "network:failover"  # what re-running work after a worker failure cost
NETWORK_REFUNDS = "network:refunds"  # refunds to clients of a fraudulent worker, less clawbacks
NETWORK_SLASHED = "network:slashed"  # bonds taken from workers proven to cheat
NETWORK_CACHE = "network:cache"  # what clients paid for answers from the response cache
EXTERNAL_DEPOSITS = "external:deposits"
EXTERNAL_PAYOUTS = "external:payouts"  # earnings paid out to providers (closed epochs)
MAY_GO_NEGATIVE = frozenset({AccountKind.NETWORK, AccountKind.EXTERNAL})


def client_account(name: str) -> str:
    return f"{AccountKind.CLIENT}:{name}"


def provider_account(node_id: str) -> str:
    return f"{AccountKind.PROVIDER}:{node_id}"


def bond_account(node_id: str) -> str:
    return f"{AccountKind.BOND}:{node_id}"


def account_kind(account: str) -> AccountKind:
    return AccountKind(account.split(":", 1)[0])


@dataclass(frozen=True)
class Posting:
    account: str
    amount: int  # micro-units; negative = debit, positive = credit


@dataclass(frozen=True)
class Transaction:
    txid: str  # idempotency key, e.g. "req:<request id>"
    kind: str
    postings: tuple[Posting, ...]
    memo: str = ""

    def __post_init__(self) -> None:
        if not self.postings:
            raise UnbalancedTransaction(f"{self.txid}: a transaction needs postings")
        for p in self.postings:
            if type(p.amount) is not int:
                raise UnbalancedTransaction(f"{self.txid}: amounts are integers, got {p.amount!r}")
            account_kind(p.account)  # raises ValueError on an unknown kind
        total = sum(p.amount for p in self.postings)
        if total != 0:
            raise UnbalancedTransaction(f"{self.txid}: postings sum to {total}, not 0")


def request_charge(request_id: str, client: str, provider: str, charge: Charge) -> Transaction:
    """Client pays provider + network fee for one request served by one worker."""
    return request_settlement(request_id, client, charge, {provider: charge.provider_amount})


def request_settlement(
    request_id: str, client: str, charge: Charge, providers: Mapping[str, int]
) -> Transaction:
    """The client pays `charge`; each provider earns its amount; the network keeps the fee and
    books any difference (a continuation re-ran work the client pays once) as failover cost."""
    postings = [Posting(client_account(client), -charge.total)]
    earned: dict[str, int] = {}
    for node, amount in providers.items():
        if amount:
            earned[provider_account(node)] = earned.get(provider_account(node), 0) + amount
    postings += [Posting(account, amount) for account, amount in earned.items()]
    if charge.fee:
        postings.append(Posting(NETWORK_FEES, charge.fee))
    difference = charge.provider_amount - sum(earned.values())
    if difference:
        postings.append(Posting(NETWORK_FAILOVER, difference))
    return Transaction(f"req:{request_id}", "request", tuple(postings), memo=request_id)


def cache_hit_charge(request_id: str, client: str, amount: int) -> Transaction:
    """A client pays the network for an answer replayed from the response cache (no worker
    ran it, so no provider earns from it)."""
    if amount <= 0:
        raise ValueError("a cache hit's charge must be positive (a free one posts nothing)")
    postings = (Posting(client_account(client), -amount), Posting(NETWORK_CACHE, amount))
    return Transaction(f"hit:{request_id}", "cache_hit", postings, memo=request_id)


def deposit(txid: str, client: str, amount: int) -> Transaction:
    """Operator tops up a client's prepaid credit."""
    if amount <= 0:
        raise ValueError("a deposit must be positive")
    return Transaction(
        txid,
        "deposit",
        (Posting(EXTERNAL_DEPOSITS, -amount), Posting(client_account(client), amount)),
    )


def bond(txid: str, node_id: str, amount: int) -> Transaction:
    """A provider's stake, deposited through the operator."""
    if amount <= 0:
        raise ValueError("a bond must be positive")
    return Transaction(
        txid,
        "bond",
        (Posting(EXTERNAL_DEPOSITS, -amount), Posting(bond_account(node_id), amount)),
    )


def payout(epoch: int, node_id: str, amount: int) -> Transaction:
    """A closed epoch pays a provider's earnings out ("paid")."""
    if amount <= 0:
        raise ValueError("a payout must be positive")
    return Transaction(
        payout_txid(epoch, node_id),
        "payout",
        (Posting(provider_account(node_id), -amount), Posting(EXTERNAL_PAYOUTS, amount)),
        memo=f"epoch {epoch}",
    )


def payout_txid(epoch: int, node_id: str) -> str:
    return f"payout:{epoch}:{node_id}"


def transaction_to_json(tx: Transaction) -> dict[str, Any]:
    postings = [[p.account, p.amount] for p in tx.postings]
    return {"txid": tx.txid, "kind": tx.kind, "memo": tx.memo, "postings": postings}


def transaction_from_json(value: Mapping[str, Any]) -> Transaction:
    """Re-validated on the way in (a stored transaction must still balance)."""
    postings = tuple(Posting(str(a), int(n)) for a, n in value["postings"])
    return Transaction(str(value["txid"]), str(value["kind"]), postings, str(value["memo"]))


def apply(
    balances: Mapping[str, int], posted: frozenset[str] | set[str], tx: Transaction
) -> dict[str, int]:
    """The balances after `tx`, or an error if it was already posted or overdraws an account.

    Only the accounts the transaction touches are returned.
    """
    if tx.txid in posted:
        raise DuplicateTransaction(tx.txid)
    after: dict[str, int] = {}
    for p in tx.postings:
        after[p.account] = after.get(p.account, balances.get(p.account, 0)) + p.amount
    for account, balance in after.items():
        if balance < 0 and account_kind(account) not in MAY_GO_NEGATIVE:
            raise InsufficientFunds(f"{account} would go to {balance}")
    return after


def check_invariants(
    balances: Mapping[str, int], postings_by_tx: Mapping[str, Sequence[Posting]]
) -> list[str]:
    """Problems found when replaying stored postings against stored balances (empty = sound)."""
    problems: list[str] = []
    replayed: dict[str, int] = {}
    for txid, postings in postings_by_tx.items():
        if not postings:
            problems.append(f"transaction {txid} has no postings")
        if sum(p.amount for p in postings) != 0:
            problems.append(f"transaction {txid} does not balance")
        for p in postings:
            replayed[p.account] = replayed.get(p.account, 0) + p.amount
    for account in sorted(set(replayed) | set(balances)):
        stored, derived = balances.get(account, 0), replayed.get(account, 0)
        if stored != derived:
            problems.append(f"{account}: stored balance {stored} != sum of postings {derived}")
        if stored < 0 and account_kind(account) not in MAY_GO_NEGATIVE:
            problems.append(f"{account} is negative ({stored})")
    if sum(balances.values()) != 0:
        problems.append(f"balances sum to {sum(balances.values())}, not 0")
    return problems


@dataclass(frozen=True)
class PaidReceipt:
    """A stored, countersigned receipt and what its worker earned by it."""

    request_id: str  # the client's request (a continuation's receipt names its parent)
    worker_id: str
    amount: int


def check_receipts(
    postings_by_tx: Mapping[str, Sequence[Posting]], receipts: Sequence[PaidReceipt]
) -> list[str]:
    """Receipts and request postings, one to one: every provider credit of a request is backed
    by that worker's receipts for it, to the micro-unit, and every receipt was posted."""
    problems: list[str] = []
    earned: dict[tuple[str, str], int] = {}
    for r in receipts:
        key = (f"req:{r.request_id}", provider_account(r.worker_id))
        earned[key] = earned.get(key, 0) + r.amount
    credited: dict[tuple[str, str], int] = {}
    for txid, postings in postings_by_tx.items():
        if not txid.startswith("req:"):
            continue
        for p in postings:
            if account_kind(p.account) is AccountKind.PROVIDER:
                credited[(txid, p.account)] = credited.get((txid, p.account), 0) + p.amount
    for key in sorted(set(earned) | set(credited)):
        txid, account = key
        if key not in credited:
            if txid not in postings_by_tx:
                problems.append(f"receipt of {txid[4:]} was never posted")
            elif earned[key]:
                problems.append(f"{txid}: {account} has a receipt but no credit")
        elif key not in earned:
            problems.append(f"{txid}: {account} credited {credited[key]} without a receipt")
        elif credited[key] != earned[key]:
            problems.append(
                f"{txid}: {account} credited {credited[key]}, receipts say {earned[key]}"
            )
    return problems
