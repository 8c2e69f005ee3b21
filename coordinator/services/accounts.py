"""Client accounts and API keys (the operator creates and funds them)."""

from __future__ import annotations

import asyncio
import re
import time

from sqlalchemy import Engine
from sqlmodel import Session

from billing.ledger import NETWORK_FEES, client_account, deposit
from coordinator.errors import AuthenticationFailed, InvalidRequest
from coordinator.store import keys_store, ledger_store

_CLIENT_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,100}$")
_CACHE_TTL_S = 30.0


class Accounts:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._key_cache: dict[str, tuple[str, float]] = {}  # secret hash -> (client, expiry)

    async def authenticate(self, authorization: str | None) -> str:
        """The client name for a `Bearer <key>` header, or AuthenticationFailed."""
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
        client = await asyncio.to_thread(self._lookup, secret)
        if client is None:
            raise AuthenticationFailed("Incorrect API key provided.")
        self._key_cache[digest] = (client, time.monotonic() + _CACHE_TTL_S)
        return client

    def _lookup(self, secret: str) -> str | None:
        with Session(self._engine) as session:
            return keys_store.client_for_key(session, secret)

    def create_client(self, name: str, credit: int = 0) -> str:
        """Create (or add a key to) client `name`, fund it with `credit`; return a new API key."""
        if not _CLIENT_NAME.match(name):
            raise InvalidRequest(
                "client names use letters, digits and _ . @ - (max 100)", param="name"
            )
        with Session(self._engine) as session:
            secret = keys_store.create_key(session, name)
        if credit:
            self.add_credit(name, credit, txid=f"deposit:init:{keys_store.hash_key(secret)[:16]}")
        return secret

    def add_credit(self, name: str, amount: int, txid: str) -> bool:
        """Post a deposit; False if this txid was already posted (safe to retry)."""
        if amount <= 0:
            raise InvalidRequest("credit must be a positive number of micro-units", param="amount")
        with Session(self._engine) as session:
            return ledger_store.post(session, deposit(txid, name, amount))

    def balance(self, name: str) -> int:
        with Session(self._engine) as session:
            return ledger_store.balance(session, client_account(name))

    def balances(self) -> dict[str, int]:
        with Session(self._engine) as session:
            return ledger_store.balances(session)

    def network_fees(self) -> int:
        with Session(self._engine) as session:
            return ledger_store.balance(session, NETWORK_FEES)
