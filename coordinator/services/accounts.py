"""Client accounts and API keys (the operator creates, funds, limits and revokes them)."""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from billing.ledger import (
    NETWORK_FEES,
    Transaction,
    bond,
    bond_account,
    client_account,
    deposit,
)
from coordinator.errors import AuthenticationFailed, InvalidRequest, NotFound
from coordinator.services.admission import Limits
from coordinator.store import accounts_store, keys_store
from coordinator.store.db import Engine
from coordinator.store.models import ApiKey

_CLIENT_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,100}$")
_CACHE_TTL_S = 5.0  # how long a revocation may take to reach other coordinator replicas


@dataclass(frozen=True)
class Principal:
    """Who is calling: the client (the account that pays) and the key it used."""

    client: str
    key_id: int
    limits: Limits


@dataclass(frozen=True)
class KeyInfo:
    id: int
    prefix: str
    client: str
    created_at: datetime
    revoked: bool
    rpm_limit: int | None
    tpm_limit: int | None

    @classmethod
    def of(cls, row: ApiKey) -> KeyInfo:
        assert row.id is not None
        return cls(
            row.id, row.prefix, row.client, row.created_at, row.revoked, row.rpm_limit,
            row.tpm_limit,
        )  # fmt: skip


class Accounts:
    def __init__(
        self, engine: Engine, default_limits: Limits | None = None, actor: str = "admin-api"
    ) -> None:
        self._engine = engine
        self._actor = actor  # who the audit log names for actions taken through this object
        self._defaults = default_limits or Limits()
        self._key_cache: dict[str, tuple[Principal, float]] = {}  # secret hash -> (who, expiry)

    async def authenticate(self, authorization: str | None) -> Principal:
        """The principal for a `Bearer <key>` header, or AuthenticationFailed."""
        if not authorization:
            raise AuthenticationFailed(
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'."
            )
        scheme, _, secret = authorization.partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret:
            raise AuthenticationFailed("Malformed Authorization header; expected 'Bearer <key>'.")
        digest = keys_store.hash_key(secret)
        cached = self._key_cache.get(digest)
        if cached and cached[1] > time.monotonic():
            return cached[0]
        principal = await asyncio.to_thread(self._lookup, secret)
        if principal is None:
            raise AuthenticationFailed("Incorrect API key provided.")
        self._key_cache[digest] = (principal, time.monotonic() + _CACHE_TTL_S)
        return principal

    def _lookup(self, secret: str) -> Principal | None:
        row = accounts_store.find_active_key(self._engine, secret)
        if row is None or row.id is None:
            return None
        limits = Limits(
            rpm=row.rpm_limit if row.rpm_limit is not None else self._defaults.rpm,
            tpm=row.tpm_limit if row.tpm_limit is not None else self._defaults.tpm,
        )
        return Principal(row.client, row.id, limits)

    def create_client(
        self, name: str, credit: int = 0, rpm: int | None = None, tpm: int | None = None
    ) -> str:
        """Create (or add a key to) client `name`, fund it with `credit`; return a new API key."""
        if not _CLIENT_NAME.match(name):
            raise InvalidRequest(
                "client names use letters, digits and _ . @ - (max 100)", param="name"
            )
        secret, row = accounts_store.create_key(self._engine, name, rpm, tpm)
        self._audit("key.create", client_account(name), key_id=row.id, prefix=row.prefix,
                    rpm=rpm, tpm=tpm)  # fmt: skip
        if credit:
            self.add_credit(name, credit, txid=f"deposit:init:{keys_store.hash_key(secret)[:16]}")
        return secret

    def list_keys(self, client: str | None = None) -> list[KeyInfo]:
        return [KeyInfo.of(row) for row in accounts_store.list_keys(self._engine, client)]

    def revoke_key(self, key_id: int) -> KeyInfo:
        row = accounts_store.revoke_key(self._engine, key_id)
        if row is None:
            raise NotFound(f"No API key with id {key_id}.", param="key_id")
        self._audit("key.revoke", client_account(row.client), key_id=key_id)
        self._key_cache = {d: v for d, v in self._key_cache.items() if v[0].key_id != key_id}
        return KeyInfo.of(row)

    def add_credit(self, name: str, amount: int, txid: str) -> bool:
        """Post a deposit; False if this txid was already posted (safe to retry)."""
        if amount <= 0:
            raise InvalidRequest("credit must be a positive number of micro-units", param="amount")
        return self._post_audited(deposit(txid, name, amount), "credit.add", client_account(name))

    def add_bond(self, node_id: str, amount: int, txid: str) -> bool:
        """A provider's stake, deposited by the operator; False if already posted."""
        if amount <= 0:
            raise InvalidRequest("a bond must be a positive number of micro-units", param="amount")
        return self._post_audited(bond(txid, node_id, amount), "bond.add", bond_account(node_id))

    def _post_audited(self, tx: Transaction, action: str, subject: str) -> bool:
        """Post `tx` and its audit event in one database transaction."""
        amount = max(p.amount for p in tx.postings)
        return accounts_store.post_audited(
            self._engine, tx, self._actor, action, subject, amount=amount, txid=tx.txid
        )

    def _audit(self, action: str, subject: str, **detail: Any) -> None:
        accounts_store.audit(self._engine, self._actor, action, subject, **detail)

    def balance(self, name: str) -> int:
        return accounts_store.balance(self._engine, client_account(name))

    def balances(self) -> dict[str, int]:
        return accounts_store.balances(self._engine)

    def network_fees(self) -> int:
        return accounts_store.balance(self._engine, NETWORK_FEES)
