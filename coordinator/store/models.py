"""Tables. Money columns are BIGINT micro-units."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import BigInteger, Column, LargeBinary
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


class Account(SQLModel, table=True):
    name: str = Field(primary_key=True, max_length=200)  # "<kind>:<id>", see billing.ledger
    kind: str = Field(index=True, max_length=20)
    balance: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)


class ApiKey(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    key_hash: str = Field(unique=True, index=True, max_length=64)  # sha256 hex of the secret
    prefix: str = Field(max_length=16)  # first characters, to recognise a key in listings
    client: str = Field(index=True, max_length=200)  # client name (account "client:<name>")
    created_at: datetime = Field(default_factory=utcnow)
    revoked: bool = False
    rpm_limit: int | None = None  # requests per minute; None = the coordinator's default
    tpm_limit: int | None = None  # tokens (prompt bound + max_tokens) per minute


class LedgerTransaction(SQLModel, table=True):
    txid: str = Field(primary_key=True, max_length=200)  # idempotency key
    kind: str = Field(max_length=40)
    memo: str = Field(default="", max_length=500)
    created_at: datetime = Field(default_factory=utcnow, index=True)


class LedgerPosting(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    txid: str = Field(foreign_key="ledgertransaction.txid", index=True, max_length=200)
    account: str = Field(foreign_key="account.name", index=True, max_length=200)
    amount: int = Field(sa_column=Column(BigInteger, nullable=False))


class StoredReceipt(SQLModel, table=True):
    request_id: str = Field(primary_key=True, max_length=80)  # the job's id (one per segment)
    parent_id: str = Field(default="", index=True, max_length=64)  # the client's request id
    segment: int = 0  # 0 = first worker; 1, 2… = continuations after a failure
    client: str = Field(index=True, max_length=200)
    worker_id: str = Field(index=True, max_length=100)
    model: str = Field(max_length=200)
    body: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    worker_signature: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    coordinator_id: str = Field(max_length=100)
    coordinator_signature: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    prompt_tokens: int
    completion_tokens: int
    amount_total: int = Field(sa_column=Column(BigInteger, nullable=False))  # provider's earning
    created_at: datetime = Field(default_factory=utcnow, index=True)
