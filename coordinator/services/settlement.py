"""Turning a worker's signed receipt into a countersigned record and a ledger posting.

The coordinator never takes the worker's word: it checks the signature, that the receipt is for
this job (request id, nonce, model, prices from the advert), that the prompt and output hashes
match what the coordinator itself sent and relayed, and that the token counts match the usage
the engine reported on the stream. Only then does money move, in one database transaction
together with the stored receipt.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlmodel import Session

from billing.errors import BillingError
from billing.ledger import request_charge
from billing.pricing import Charge, Price, charge_for
from coordinator.store import ledger_store, receipts_store
from coordinator.store.models import StoredReceipt
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


class ReceiptRejected(Exception):
    """A receipt that does not match the job; the worker is not paid and the client not billed."""


@dataclass(frozen=True)
class JobFacts:
    """What the coordinator itself knows about a job, independent of the worker."""

    request_id: str
    client: str
    worker_id: str
    model: str
    nonce_hex: str
    prompt_sha256: str
    price: Price


@dataclass
class Observed:
    """What the coordinator relayed to the client."""

    texts: dict[int, str]
    prompt_tokens: int | None = None
    completion_tokens: int | None = None

    def output_sha256(self) -> str:
        return output_digest([self.texts[i] for i in sorted(self.texts)])


@dataclass(frozen=True)
class Settled:
    receipt: SignedReceipt
    charge: Charge


@dataclass(frozen=True)
class ReceiptRecord:
    client: str
    receipt: SignedReceipt
    amount_total: int


def check_receipt(facts: JobFacts, signed: SignedReceipt, observed: Observed) -> Receipt:
    try:
        receipt = verify_worker_signature(signed)
    except ProtocolError as exc:
        raise ReceiptRejected(f"signature: {exc}") from exc
    expected = {
        "request_id": facts.request_id,
        "worker_id": facts.worker_id,
        "model": facts.model,
        "coordinator_nonce": facts.nonce_hex,
        "prompt_sha256": facts.prompt_sha256,
        "output_sha256": observed.output_sha256(),
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
    def __init__(self, engine: Engine, identity: Identity, fee_bps: int) -> None:
        self._engine = engine
        self._identity = identity
        self._fee_bps = fee_bps

    @property
    def fee_bps(self) -> int:
        return self._fee_bps

    async def settle(self, facts: JobFacts, signed: SignedReceipt, observed: Observed) -> Settled:
        receipt = check_receipt(facts, signed, observed)
        price = Price(receipt.price_prompt_per_mtok, receipt.price_completion_per_mtok)
        charge = charge_for(price, receipt.prompt_tokens, receipt.completion_tokens, self._fee_bps)
        countersigned = countersign(self._identity, signed)
        await asyncio.to_thread(self._record, facts, receipt, countersigned, charge)
        return Settled(countersigned, charge)

    def _record(
        self, facts: JobFacts, receipt: Receipt, signed: SignedReceipt, charge: Charge
    ) -> None:
        tx = request_charge(facts.request_id, facts.client, facts.worker_id, charge)
        with Session(self._engine) as session:
            try:
                ledger_store.add_postings(session, tx)
                session.add(
                    StoredReceipt(
                        request_id=facts.request_id,
                        client=facts.client,
                        worker_id=receipt.worker_id,
                        model=receipt.model,
                        body=signed.body,
                        worker_signature=signed.worker_signature,
                        coordinator_id=signed.coordinator_id,
                        coordinator_signature=signed.coordinator_signature,
                        prompt_tokens=receipt.prompt_tokens,
                        completion_tokens=receipt.completion_tokens,
                        amount_total=charge.total,
                    )
                )
                session.commit()
            except BillingError:
                session.rollback()
                log.exception("could not post charge for %s", facts.request_id)
                raise

    def load(self, request_id: str) -> ReceiptRecord | None:
        with Session(self._engine) as session:
            row = receipts_store.get(session, request_id)
            if row is None:
                return None
            signed = SignedReceipt(
                body=row.body,
                worker_signature=row.worker_signature,
                coordinator_id=row.coordinator_id,
                coordinator_signature=row.coordinator_signature,
            )
            return ReceiptRecord(row.client, signed, row.amount_total)
