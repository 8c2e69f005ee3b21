"""The SQLAlchemy Core handle of every table, declared once: the store's statements are written
against these (the ORM classes in `models` define the tables; code that moves money or reads
aggregates uses Core on a Connection)."""

from __future__ import annotations

from sqlalchemy import Table

from coordinator.store.models import (
    Account,
    ApiKey,
    AuditEvent,
    BatchJob,
    BatchLine,
    CacheHitRecord,
    CreditHold,
    LedgerPosting,
    LedgerTransaction,
    LoraAdapter,
    MeteringMismatch,
    ModelRelease,
    ModelVersion,
    PayoutEpoch,
    PayoutStatement,
    PendingPosting,
    PolicyAttachment,
    PolicyVersion,
    Quarantine,
    ReleaseEvent,
    StoredFile,
    StoredReceipt,
    TrustEvent,
    UnsignedSegment,
)

ACCOUNTS: Table = Account.__table__  # type: ignore[attr-defined]
API_KEYS: Table = ApiKey.__table__  # type: ignore[attr-defined]
TRANSACTIONS: Table = LedgerTransaction.__table__  # type: ignore[attr-defined]
POSTINGS: Table = LedgerPosting.__table__  # type: ignore[attr-defined]
RECEIPTS: Table = StoredReceipt.__table__  # type: ignore[attr-defined]
PENDING: Table = PendingPosting.__table__  # type: ignore[attr-defined]
MISMATCHES: Table = MeteringMismatch.__table__  # type: ignore[attr-defined]
EPOCHS: Table = PayoutEpoch.__table__  # type: ignore[attr-defined]
STATEMENTS: Table = PayoutStatement.__table__  # type: ignore[attr-defined]
AUDIT: Table = AuditEvent.__table__  # type: ignore[attr-defined]
EVENTS: Table = TrustEvent.__table__  # type: ignore[attr-defined]
QUARANTINE: Table = Quarantine.__table__  # type: ignore[attr-defined]
HOLDS: Table = CreditHold.__table__  # type: ignore[attr-defined]
UNSIGNED: Table = UnsignedSegment.__table__  # type: ignore[attr-defined]
RELEASES: Table = ModelRelease.__table__  # type: ignore[attr-defined]
VERSIONS: Table = ModelVersion.__table__  # type: ignore[attr-defined]
RELEASE_EVENTS: Table = ReleaseEvent.__table__  # type: ignore[attr-defined]
ADAPTERS: Table = LoraAdapter.__table__  # type: ignore[attr-defined]
CACHE_HITS: Table = CacheHitRecord.__table__  # type: ignore[attr-defined]
FILES: Table = StoredFile.__table__  # type: ignore[attr-defined]
BATCHES: Table = BatchJob.__table__  # type: ignore[attr-defined]
BATCH_LINES: Table = BatchLine.__table__  # type: ignore[attr-defined]
POLICY_VERSIONS: Table = PolicyVersion.__table__  # type: ignore[attr-defined]
POLICY_ATTACHMENTS: Table = PolicyAttachment.__table__  # type: ignore[attr-defined]
