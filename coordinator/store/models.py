"""Tables. Money columns are BIGINT micro-units."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import BigInteger, Column, LargeBinary, Text
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
    # what was billed: min(worker's claim, the coordinator's recount), countersigned
    billed_prompt_tokens: int = 0
    billed_completion_tokens: int = 0
    epoch_id: int | None = Field(default=None, index=True)  # the payout epoch that paid it
    policy_sha256: str = Field(default="", max_length=64)  # the client's policy version that ran


class UnsignedSegment(SQLModel, table=True):
    """Tokens a worker delivered to the client before it died without signing a receipt: the
    client paid for them (they are in its charge), the worker is paid nothing. Kept so that a
    continued request's receipt document lists every segment it was charged for."""

    request_id: str = Field(primary_key=True, max_length=80)  # the job's id
    parent_id: str = Field(index=True, max_length=64)  # the client's request id
    segment: int = 0
    client: str = Field(max_length=200)
    worker_id: str = Field(max_length=100)
    model: str = Field(max_length=200)
    billed_prompt_tokens: int = 0
    billed_completion_tokens: int = 0
    price_prompt_per_mtok: int = Field(sa_column=Column(BigInteger, nullable=False))
    price_completion_per_mtok: int = Field(sa_column=Column(BigInteger, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)
    policy_sha256: str = Field(default="", max_length=64)


class PendingPosting(SQLModel, table=True):
    """Outbox: a settlement's ledger transaction, committed with its receipts before it is
    posted, so a coordinator that dies in between posts it at start-up (exactly once)."""

    txid: str = Field(primary_key=True, max_length=200)
    body: str = Field(sa_column=Column(Text, nullable=False))  # the transaction as JSON
    created_at: datetime = Field(default_factory=utcnow)


class MeteringMismatch(SQLModel, table=True):
    """A worker claimed more tokens than the coordinator's recount (input to reputation)."""

    id: int | None = Field(default=None, primary_key=True)
    request_id: str = Field(index=True, max_length=80)
    worker_id: str = Field(index=True, max_length=100)
    model: str = Field(max_length=200)
    claimed_prompt_tokens: int
    claimed_completion_tokens: int
    recounted_prompt_tokens: int
    recounted_completion_tokens: int
    created_at: datetime = Field(default_factory=utcnow, index=True)


class PayoutEpoch(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    opened_at: datetime = Field(default_factory=utcnow)
    closed_at: datetime | None = None


class PayoutStatement(SQLModel, table=True):
    """One provider's signed statement for one closed epoch, as signed."""

    id: int | None = Field(default=None, primary_key=True)
    epoch_id: int = Field(foreign_key="payoutepoch.id", index=True)
    node_id: str = Field(index=True, max_length=100)
    amount: int = Field(sa_column=Column(BigInteger, nullable=False))
    body: bytes = Field(sa_column=Column(LargeBinary, nullable=False))  # canonical JSON
    coordinator_id: str = Field(max_length=100)
    signature: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class AuditEvent(SQLModel, table=True):
    """Append-only log of admin actions; each row's hash covers the previous row's hash, so
    an edited or deleted row breaks the chain (`agora ledger check` walks it)."""

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = Field(default_factory=utcnow)
    actor: str = Field(max_length=200)
    action: str = Field(index=True, max_length=60)
    subject: str = Field(default="", max_length=200)
    detail: str = Field(default="{}", sa_column=Column(Text, nullable=False))  # JSON
    prev_sha256: str = Field(max_length=64)
    sha256: str = Field(unique=True, max_length=64)


class TrustEvent(SQLModel, table=True):
    """One outcome that moves a worker's reputation (see services.reputation)."""

    id: int | None = Field(default=None, primary_key=True)
    node_id: str = Field(index=True, max_length=100)
    outcome: str = Field(max_length=40)
    request_id: str = Field(default="", max_length=80)
    detail: str = Field(default="", max_length=500)
    at: datetime = Field(default_factory=utcnow, index=True)


class Quarantine(SQLModel, table=True):
    """A worker the market no longer routes to, and why (proven fraud or a collapsed score)."""

    node_id: str = Field(primary_key=True, max_length=100)
    reason: str = Field(max_length=500)
    request_id: str = Field(default="", max_length=80)
    at: datetime = Field(default_factory=utcnow)


class CreditHold(SQLModel, table=True):
    """Credit a request in flight holds (coordinator replicas sharing one database see each
    other's holds). Deleted after the request's charge is committed; a replica that died
    mid-request leaves rows that stop counting at `expires_at`."""

    id: str = Field(primary_key=True, max_length=64)
    client: str = Field(index=True, max_length=200)
    amount: int = Field(sa_column=Column(BigInteger, nullable=False))
    expires_at: datetime = Field(index=True)
    created_at: datetime = Field(default_factory=utcnow)


class ModelRelease(SQLModel, table=True):
    """A public model name clients ask for, and the policy that picks which of its versions
    serves a request (weights are on the versions)."""

    name: str = Field(primary_key=True, max_length=200)
    stable: str = Field(max_length=100)  # the version rollbacks fall back to
    sticky: bool = False  # A/B: the same API key always sees the same version
    shadow_version: str | None = Field(default=None, max_length=100)
    shadow_share: float = 0.0  # of requests copied to the shadow version (never billed)
    rollback: str = Field(default="{}", sa_column=Column(Text, nullable=False))  # JSON policy
    updated_at: datetime = Field(default_factory=utcnow)


class ModelVersion(SQLModel, table=True):
    """One version of a public model: what workers serve for it, and its share of traffic."""

    model: str = Field(primary_key=True, max_length=200)
    version: str = Field(primary_key=True, max_length=100)
    serves: str = Field(max_length=200)  # the served-model name workers advertise
    adapter_sha256: str | None = Field(default=None, max_length=64)
    tokenizer_sha256: str | None = Field(default=None, max_length=64)  # pinned, if set
    max_price_prompt_per_mtok: int | None = Field(default=None, sa_column=Column(BigInteger))
    max_price_completion_per_mtok: int | None = Field(default=None, sa_column=Column(BigInteger))
    weight: int = 0  # relative share of the model's traffic
    state: str = Field(default="active", max_length=20)  # active | rolled_back
    created_at: datetime = Field(default_factory=utcnow)


class ReleaseEvent(SQLModel, table=True):
    """What happened to a model's release: created, released, promoted, rolled back (by an
    operator or automatically, and why)."""

    id: int | None = Field(default=None, primary_key=True)
    model: str = Field(index=True, max_length=200)
    version: str = Field(default="", max_length=100)
    kind: str = Field(max_length=40)
    actor: str = Field(max_length=200)
    detail: str = Field(default="{}", sa_column=Column(Text, nullable=False))  # JSON
    at: datetime = Field(default_factory=utcnow, index=True)


class LoraAdapter(SQLModel, table=True):
    """A LoRA adapter registered for workers to fetch: its canonical archive
    (protocol.adapter), addressed by the archive's SHA-256."""

    sha256: str = Field(primary_key=True, max_length=64)
    name: str = Field(max_length=200)  # what operators call it (not unique: versions differ)
    base_model: str = Field(max_length=200)  # the served model it applies to
    size_bytes: int = Field(sa_column=Column(BigInteger, nullable=False))
    archive: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)


class CacheHitRecord(SQLModel, table=True):
    """A request answered from the response cache: its signed statement (what was replayed,
    from which request, what it cost), the client's receipt for it."""

    request_id: str = Field(primary_key=True, max_length=64)
    client: str = Field(index=True, max_length=200)
    source_request_id: str = Field(max_length=64)
    amount: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    document: str = Field(sa_column=Column(Text, nullable=False))  # JSON, signed statement
    created_at: datetime = Field(default_factory=utcnow)


class StoredFile(SQLModel, table=True):
    """A file of the Files API (a client's batch input, or a batch's output): who owns it and
    what it is; its bytes live on disk under their SHA-256 (services.batches.files)."""

    id: str = Field(primary_key=True, max_length=64)  # "file-<hex>"
    client: str = Field(index=True, max_length=200)
    purpose: str = Field(max_length=32)  # "batch" or "batch_output"
    filename: str = Field(max_length=255)
    size_bytes: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    sha256: str = Field(max_length=64)
    lines: int = 0
    created_at: datetime = Field(default_factory=utcnow)
    deleted: bool = False


class BatchJob(SQLModel, table=True):
    """A batch of the Batch API: its input, its state and when each state began."""

    id: str = Field(primary_key=True, max_length=64)  # "batch_<hex>"
    client: str = Field(index=True, max_length=200)
    key_id: int = 0  # the API key that created it (its lines run as that key)
    endpoint: str = Field(max_length=64)
    model: str = Field(max_length=200)  # every line's model (one per batch, as OpenAI)
    input_file_id: str = Field(max_length=64)
    completion_window: str = Field(max_length=16)
    status: str = Field(index=True, max_length=16)
    metadata_json: str = Field(default="{}", sa_column=Column(Text, nullable=False))
    total: int = 0
    output_file_id: str | None = Field(default=None, max_length=64)
    error_file_id: str | None = Field(default=None, max_length=64)
    stop_reason: str | None = Field(default=None, max_length=64)  # why lines were left unrun
    created_at: datetime = Field(default_factory=utcnow)
    expires_at: datetime = Field(default_factory=utcnow)
    in_progress_at: datetime | None = None
    finalizing_at: datetime | None = None
    completed_at: datetime | None = None
    expired_at: datetime | None = None
    cancelling_at: datetime | None = None
    cancelled_at: datetime | None = None


class BatchLine(SQLModel, table=True):
    """One request of a batch: what to run, who runs it now, and how it ended."""

    batch_id: str = Field(primary_key=True, max_length=64)
    line: int = Field(primary_key=True)  # 0-based place in the input file
    custom_id: str = Field(max_length=512)
    body: str = Field(sa_column=Column(Text, nullable=False))  # the request's JSON
    request_id: str = Field(max_length=64)  # fixed: a line is billed under it at most once
    state: str = Field(default="pending", index=True, max_length=16)  # pending/running/done/failed
    owner: str | None = Field(default=None, max_length=200)  # the process running it
    lease_until: datetime | None = None  # a running line whose owner died is taken after this
    status_code: int | None = None
    response: str | None = Field(default=None, sa_column=Column(Text, nullable=True))  # JSON
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finished_at: datetime | None = None


class PolicyVersion(SQLModel, table=True):
    """One version of a named policy (its JSON); the newest version of a name is the one
    that runs. Old versions stay: receipts and the audit log name them by SHA-256."""

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True, max_length=100)
    version: int
    sha256: str = Field(index=True, max_length=64)
    spec: str = Field(sa_column=Column(Text, nullable=False))  # canonical JSON
    created_at: datetime = Field(default_factory=utcnow)


class PolicyAttachment(SQLModel, table=True):
    """Which policy a key or a client runs ("key:<id>" or "client:<name>"; a key's own
    policy wins over its client's)."""

    subject: str = Field(primary_key=True, max_length=220)
    policy: str = Field(max_length=100)
    created_at: datetime = Field(default_factory=utcnow)
