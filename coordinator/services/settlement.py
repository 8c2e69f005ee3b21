"""Turning what happened to a request into signed records and one ledger posting.

The coordinator never takes a worker's word: it checks each receipt's signature, that it is for
this job (request id, nonce, model, prices from the advert), that the prompt and output hashes
match what the coordinator itself sent and relayed, and that the token counts match what the
engine reported on the stream. A request may have several segments (a continuation after a
worker failed); the client pays once for what it was delivered, each provider is paid for the
work its verified receipt covers. Receipts and the posting are written in one transaction.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, insert, select
from sqlmodel import Session

from billing.ledger import client_account, request_settlement
from billing.pricing import Charge, Price, Segment, segments_charge
from coordinator.store import ledger_store, receipts_store
from coordinator.store.ledger_store import POSTINGS
from coordinator.store.models import StoredReceipt, utcnow
from coordinator.store.writer import LedgerWriter
from protocol.completions import Output
from protocol.errors import ProtocolError
from protocol.identity import Identity
from protocol.receipt import (
    Receipt,
    SignedReceipt,
    countersign,
    output_digest,
    verify_worker_signature,
)

log = logging.getLogger("agora.coordinator.settlement")
RECEIPTS = StoredReceipt.__table__  # type: ignore[attr-defined]


class ReceiptRejected(Exception):
    """A receipt that does not match the job: its worker is not paid for it."""


@dataclass(frozen=True)
class JobFacts:
    """What the coordinator itself knows about one job (one segment), independent of the
    worker."""

    request_id: str  # this job's id ("<request>" or "<request>~<segment>")
    client: str
    worker_id: str
    model: str
    nonce_hex: str
    prompt_sha256: str
    price: Price  # the worker's advertised price (before the network fee)


@dataclass
class SegmentRecord:
    """One job of a request, as it ended."""

    facts: JobFacts
    observed: Output  # what the coordinator relayed from this worker
    receipt: SignedReceipt | None = None  # as the worker sent it (None if it died first)

    def delivered_tokens(self) -> int:
        counted = self.observed.tokens_delivered()
        if counted:
            return counted
        return self.observed.completion_tokens or 0

    def prompt_tokens(self) -> int:
        if self.observed.prompt_token_ids is not None:
            return len(self.observed.prompt_token_ids)
        return self.observed.prompt_tokens or 0


@dataclass(frozen=True)
class Settled:
    charge: Charge  # what the client paid
    receipts: list[SignedReceipt]  # countersigned, in segment order (verified ones only)


@dataclass(frozen=True)
class ReceiptRecord:
    client: str
    receipt: SignedReceipt
    amount_total: int  # what the client paid for the whole request
    segments: list[SignedReceipt]  # continuation receipts, if the request had any


def check_receipt(facts: JobFacts, signed: SignedReceipt, observed: Output) -> Receipt:
    try:
        receipt = verify_worker_signature(signed)
    except ProtocolError as exc:
        raise ReceiptRejected(f"signature: {exc}") from exc
    expected: dict[str, object] = {
        "request_id": facts.request_id,
        "worker_id": facts.worker_id,
        "model": facts.model,
        "coordinator_nonce": facts.nonce_hex,
        "prompt_sha256": facts.prompt_sha256,
        "output_sha256": output_digest(observed.texts()),
        "price_prompt_per_mtok": facts.price.prompt_per_mtok,
        "price_completion_per_mtok": facts.price.completion_per_mtok,
    }
    if observed.prompt_tokens is not None:
        expected["prompt_tokens"] = observed.prompt_tokens
    if observed.completion_tokens is not None:
        expected["completion_tokens"] = observed.completion_tokens
    for name, value in expected.items():
        if getattr(receipt, name) != value:
            raise ReceiptRejected(f"{name} is {getattr(receipt, name)!r}, expected {value!r}")
    return receipt


class Settlement:
    def __init__(
        self, engine: Engine, writer: LedgerWriter, identity: Identity, fee_bps: int
    ) -> None:
        self._engine = engine
        self._writer = writer
        self._identity = identity
        self._fee_bps = fee_bps

    @property
    def fee_bps(self) -> int:
        return self._fee_bps

    async def settle(self, request_id: str, client: str, records: list[SegmentRecord]) -> Settled:
        """Check every receipt, then post the charge and store the receipts together."""
        segments: list[Segment] = []
        verified: list[tuple[int, Receipt, SignedReceipt]] = []
        for index, record in enumerate(records):
            receipt = None
            if record.receipt is not None:
                try:
                    receipt = check_receipt(record.facts, record.receipt, record.observed)
                except ReceiptRejected as exc:
                    log.warning(
                        "receipt %s from %s rejected: %s",
                        record.facts.request_id,
                        record.facts.worker_id,
                        exc,
                    )
            if receipt is not None and record.receipt is not None:
                signed = countersign(self._identity, record.receipt)
                verified.append((index, receipt, signed))
                prompt, completion = receipt.prompt_tokens, receipt.completion_tokens
            else:  # bill what the coordinator itself relayed; the worker is not paid
                prompt, completion = record.prompt_tokens(), record.delivered_tokens()
            segments.append(
                Segment(record.facts.worker_id, record.facts.price, prompt, completion,
                        verified=receipt is not None)
            )  # fmt: skip
        charge, earned = segments_charge(segments, self._fee_bps)
        tx = request_settlement(request_id, client, charge, earned)
        rows = [
            {
                "request_id": receipt.request_id,
                "parent_id": request_id,
                "segment": index,
                "client": client,
                "worker_id": receipt.worker_id,
                "model": receipt.model,
                "body": signed.body,
                "worker_signature": signed.worker_signature,
                "coordinator_id": signed.coordinator_id,
                "coordinator_signature": signed.coordinator_signature,
                "prompt_tokens": receipt.prompt_tokens,
                "completion_tokens": receipt.completion_tokens,
                "amount_total": earned.get(receipt.worker_id, 0),
                "created_at": None,
            }
            for index, receipt, signed in verified
        ]

        def write(conn: Connection) -> None:
            ledger_store.post_in(conn, tx)
            if rows:
                now = utcnow()
                conn.execute(insert(RECEIPTS), [{**row, "created_at": now} for row in rows])

        await self._writer.submit(write)
        return Settled(charge, [signed for _i, _r, signed in verified])

    def load(self, request_id: str) -> ReceiptRecord | None:
        """The receipts of a client request (its id, or the id of one of its segments)."""
        with Session(self._engine) as session:
            first = receipts_store.get(session, request_id)
            parent = first.parent_id if first is not None and first.parent_id else request_id
            rows = receipts_store.segments(session, parent)
            if not rows:
                return None
            paid = self._client_charge(session.connection(), parent, rows[0].client)
            signed = [
                SignedReceipt(r.body, r.worker_signature, r.coordinator_id, r.coordinator_signature)
                for r in rows
            ]
            return ReceiptRecord(rows[0].client, signed[0], paid, signed[1:])

    @staticmethod
    def _client_charge(conn: Connection, request_id: str, client: str) -> int:
        amount = conn.execute(
            select(POSTINGS.c.amount).where(
                POSTINGS.c.txid == f"req:{request_id}",
                POSTINGS.c.account == client_account(client),
            )
        ).scalar()
        return -int(amount or 0)
