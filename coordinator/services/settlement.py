"""Turning what happened to a request into signed records and one ledger posting.

The coordinator never takes a worker's word: it checks each receipt's signature, that it is for
this job (request id, nonce, model, prices from the advert), that the prompt and output hashes
match what the coordinator itself sent and relayed, and that the token counts match what the
engine reported on the stream. A request may have several segments (a continuation after a
worker failed); the client pays once for what it was delivered, each provider is paid for the
work its verified receipt covers. Receipts and the posting are written in one transaction.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from billing.ledger import Transaction, request_settlement
from billing.pricing import Charge, Price, Segment, segments_charge
from coordinator.services.metering import Count, Tokenizers, billed, recount, within_bound
from coordinator.services.reputation import Outcome
from coordinator.services.trust import Verdict
from coordinator.store import receipts_store
from coordinator.store.db import Engine
from coordinator.store.writer import LedgerWriter
from protocol.completions import COMPLETIONS, Output
from protocol.errors import ProtocolError
from protocol.identity import Identity
from protocol.receipt import (
    Receipt,
    SignedReceipt,
    billed_cached_tokens,
    countersign,
    output_digest,
    verify_worker_signature,
)
from protocol.receipt_document import UnsignedPart, receipt_document

log = logging.getLogger("agora.coordinator.settlement")


class ReceiptRejected(Exception):
    """A receipt that does not match the job: its worker is not paid for it."""

    def __init__(self, message: str, field: str = "signature", proof: bool = False) -> None:
        super().__init__(message)
        self.field = field
        # the worker's own valid signature is on a claim that contradicts what happened
        self.proof = proof


# a validly signed receipt wrong in one of these is proof of cheating, not a fault: a receipt
# replayed from another job, or billing for output the client never received
_PROOF_FIELDS = frozenset({"request_id", "coordinator_nonce", "output_sha256"})


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
    endpoint: str = COMPLETIONS  # what the worker ran (for the recount)
    prompt: Any = None  # what it was given: messages, a prompt, or token ids
    tools: Any = None
    max_completion_tokens: int | None = None  # what the job may generate, every choice together
    adapter_sha256: str = ""  # the LoRA adapter the job ran with ("" = the base model)


@dataclass
class SegmentRecord:
    """One job of a request, as it ended."""

    facts: JobFacts
    observed: Output  # what the coordinator relayed from this worker
    receipt: SignedReceipt | None = None  # as the worker sent it (None if it died first)


@dataclass(frozen=True)
class _Plan:
    """Everything a settlement writes, worked out before any of it is written."""

    tx: Transaction
    charge: Charge
    receipts: list[dict[str, Any]]
    unsigned: list[dict[str, Any]]  # segments delivered without a receipt (billed, unpaid)
    mismatches: list[dict[str, Any]]
    countersigned: list[SignedReceipt]
    usage: Count
    verdicts: list[Verdict]
    cached_tokens: int = 0  # of the first segment's prompt tokens billed, those cached


@dataclass(frozen=True)
class Settled:
    """A request's settlement as checked: what the client is charged, before it is written
    (`Settlement.commit` writes it)."""

    request_id: str
    client: str
    charge: Charge  # what the client pays
    receipts: list[SignedReceipt]  # countersigned, in segment order (verified ones only)
    usage: Count  # the tokens billed: the first segment's prompt, every segment's completion
    verdicts: list[Verdict]  # what each segment said about its worker (input to reputation)
    plan: _Plan = field(repr=False)

    @property
    def clean(self) -> bool:
        """Every segment signed, every receipt checked out, no count disputed."""
        return not self.plan.unsigned and all(v.outcome is Outcome.SERVED for v in self.verdicts)

    @property
    def cached_tokens(self) -> int:
        """Of the prompt tokens billed, those billed at the cached price."""
        return self.plan.cached_tokens


@dataclass(frozen=True)
class ReceiptRecord:
    client: str
    receipt: SignedReceipt
    amount_total: int  # what the client paid for the whole request
    segments: list[SignedReceipt]  # continuation receipts, if the request had any
    signed_at: list[int]  # each receipt's place among the segments (0 = the first worker)
    unsigned: list[UnsignedPart]  # segments a dead worker delivered without a receipt
    policy: str = ""  # SHA-256 of the client's policy version it ran under ("" = none)


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
        "adapter_sha256": facts.adapter_sha256,
    }
    if observed.prompt_tokens is not None:
        expected["prompt_tokens"] = observed.prompt_tokens
    if observed.completion_tokens is not None:
        expected["completion_tokens"] = observed.completion_tokens
    if observed.prompt_tokens is not None:  # the engine's usage came with the output
        expected["cached_prompt_tokens"] = observed.cached_prompt_tokens
    if receipt.cached_prompt_tokens:
        expected["price_cached_prompt_per_mtok"] = facts.price.cached_per_mtok
    for name, value in expected.items():
        if getattr(receipt, name) != value:
            raise ReceiptRejected(
                f"{name} is {getattr(receipt, name)!r}, expected {value!r}",
                field=name,
                proof=name in _PROOF_FIELDS,
            )
    return receipt


class Settlement:
    def __init__(
        self,
        engine: Engine,
        writer: LedgerWriter,
        identity: Identity,
        fee_bps: int,
        tokenizers: Tokenizers | None = None,
        exit_before_posting: bool = False,
        max_unwritten: int = 256,
    ) -> None:
        self._engine = engine
        self._writer = writer
        self._identity = identity
        self._fee_bps = fee_bps
        self._tokenizers = tokenizers
        self._exit_before_posting = exit_before_posting  # fault injection (crash-safety test)
        self._in_flight: dict[str, asyncio.Future[None]] = {}  # request id -> written
        self._max_unwritten = max_unwritten  # commits in flight before `room` makes callers wait
        self._written = asyncio.Event()  # set (and replaced) whenever a commit ends

    @property
    def fee_bps(self) -> int:
        return self._fee_bps

    def tokenizer_fingerprint(self, model: str) -> str | None:
        """SHA-256 of the tokenizer the network recounts `model` with, if one is pinned."""
        return self._tokenizers.fingerprints.get(model) if self._tokenizers else None

    async def check(
        self, request_id: str, client: str, records: list[SegmentRecord], policy: str = ""
    ) -> Settled:
        """Check and recount every segment and work out the charge; nothing is written.
        `policy`: the SHA-256 of the client's policy version that ran (kept with receipts)."""
        model = records[0].facts.model
        if self._tokenizers is not None and self._tokenizers.covers(model):
            plan = await asyncio.to_thread(self._plan, request_id, client, records, policy)
        else:
            plan = self._plan(request_id, client, records, policy)
        return Settled(request_id, client, plan.charge, plan.countersigned, plan.usage,
                       plan.verdicts, plan)  # fmt: skip

    async def commit(self, settled: Settled) -> None:
        """Commit the receipts and the ledger posting together. Runs off the response path:
        the writer thread commits whatever settlements are waiting in one transaction. (The
        crash-safety fault stages the posting and dies before posting it: start-up
        reconciliation must then post it, see store.outbox_store.)"""
        done = asyncio.get_running_loop().create_future()
        self._in_flight[settled.request_id] = done
        try:
            plan = settled.plan
            if not self._exit_before_posting:
                await self._writer.submit(lambda conn: receipts_store.record_settlement(
                    conn, plan.receipts, plan.unsigned, plan.mismatches, plan.tx))  # fmt: skip
                return
            await self._writer.submit(lambda conn: receipts_store.stage_settlement(
                conn, plan.receipts, plan.unsigned, plan.mismatches, plan.tx))  # fmt: skip
            log.critical("fault injection: exiting between receipts and posting")
            await asyncio.sleep(0.5)  # the answer handed out before this has left
            os._exit(70)
        finally:
            del self._in_flight[settled.request_id]
            done.set_result(None)
            written, self._written = self._written, asyncio.Event()
            written.set()

    async def room(self) -> None:
        """Return once fewer than `max_unwritten` commits are in flight. Answers wait here
        when requests end faster than the writer commits them: without it the backlog (each
        request's whole state) grew without bound under sustained overload (1,024 streams on
        two cores: +770 MB in 5 minutes), and all of it was unbilled if the process died."""
        while len(self._in_flight) >= self._max_unwritten:
            await self._written.wait()

    async def settle(self, request_id: str, client: str, records: list[SegmentRecord]) -> Settled:
        """Check, then commit (for callers that have nothing to send in between)."""
        settled = await self.check(request_id, client, records)
        await self.commit(settled)
        return settled

    async def quiesce(self) -> None:
        """Wait for the settlements being written now (a read of receipts or balances right
        after a response then sees its charge)."""
        if self._in_flight:
            await asyncio.gather(*self._in_flight.values())

    def _plan(
        self, request_id: str, client: str, records: list[SegmentRecord], policy: str = ""
    ) -> _Plan:
        tokenizer = self._tokenizers.for_model(records[0].facts.model) if self._tokenizers else None
        segments: list[Segment] = []
        verified: list[tuple[int, Receipt, SignedReceipt, Count]] = []
        mismatches: list[dict[str, Any]] = []
        unsigned: list[dict[str, Any]] = []
        verdicts: list[Verdict] = []
        for index, record in enumerate(records):
            facts = record.facts
            receipt = None
            if record.receipt is not None:
                try:
                    receipt = check_receipt(facts, record.receipt, record.observed)
                except ReceiptRejected as exc:
                    log.warning(
                        "receipt %s from %s rejected: %s", facts.request_id, facts.worker_id, exc
                    )
                    outcome = Outcome.FRAUD if exc.proof else Outcome.RECEIPT_REJECTED
                    verdicts.append(Verdict(facts.worker_id, outcome, facts.request_id,
                                            f"receipt {exc}"))  # fmt: skip
            if receipt is not None:
                claim = Count(receipt.prompt_tokens, receipt.completion_tokens)
            else:  # bill what the coordinator itself relayed; the worker is not paid
                claim = Count(*record.observed.token_counts())
            counted = within_bound(
                recount(tokenizer, facts.endpoint, facts.prompt, facts.tools, record.observed),
                claim, facts.max_completion_tokens,
            )  # fmt: skip
            bill, over = billed(claim, counted)
            if over and counted is not None:
                log.warning("%s claimed %s, recount %s", facts.worker_id, claim, counted)
                mismatches.append({
                    "request_id": facts.request_id, "worker_id": facts.worker_id,
                    "model": facts.model, "claimed_prompt_tokens": claim.prompt_tokens,
                    "claimed_completion_tokens": claim.completion_tokens,
                    "recounted_prompt_tokens": counted.prompt_tokens,
                    "recounted_completion_tokens": counted.completion_tokens,
                })  # fmt: skip
                verdicts.append(Verdict(facts.worker_id, Outcome.OVERCLAIMED, facts.request_id,
                                        f"claimed {claim}, recount {counted}"))  # fmt: skip
            elif receipt is not None:
                verdicts.append(Verdict(facts.worker_id, Outcome.SERVED, facts.request_id))
            if receipt is not None and record.receipt is not None:
                billed_pair = (bill.prompt_tokens, bill.completion_tokens)
                signed = countersign(self._identity, record.receipt, billed_pair)
                verified.append((index, receipt, signed, bill))
            cached = billed_cached_tokens(receipt, bill.prompt_tokens) if receipt else 0
            segments.append(
                Segment(facts.worker_id, facts.price, bill.prompt_tokens, bill.completion_tokens,
                        verified=receipt is not None, cached_tokens=cached)
            )  # fmt: skip
            if receipt is None:
                unsigned.append({
                    "request_id": facts.request_id, "parent_id": request_id, "segment": index,
                    "client": client, "worker_id": facts.worker_id, "model": facts.model,
                    "billed_prompt_tokens": bill.prompt_tokens,
                    "billed_completion_tokens": bill.completion_tokens,
                    "price_prompt_per_mtok": facts.price.prompt_per_mtok,
                    "price_completion_per_mtok": facts.price.completion_per_mtok,
                    "policy_sha256": policy,
                })  # fmt: skip
        charge, earned = segments_charge(segments, self._fee_bps)
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
                "billed_prompt_tokens": bill.prompt_tokens,
                "billed_completion_tokens": bill.completion_tokens,
                "amount_total": earned.get(receipt.worker_id, 0),
                "policy_sha256": policy,
            }
            for index, receipt, signed, bill in verified
        ]
        tx = request_settlement(request_id, client, charge, earned)
        usage = Count(segments[0].prompt_tokens, sum(s.completion_tokens for s in segments))
        signed_ones = [signed for _i, _r, signed, _b in verified]
        return _Plan(tx, charge, rows, unsigned, mismatches, signed_ones, usage, verdicts,
                     segments[0].cached_tokens)  # fmt: skip

    def document(self, request_id: str, client: str) -> dict[str, Any] | None:
        """The client's receipt document for a request (or one of its segments): every
        segment, signed or not, and the charge statement signed with this coordinator's key."""
        record = self.load(request_id)
        if record is None or record.client != client:
            return None
        parent = record.receipt.receipt.request_id.split("~", 1)[0]
        signed = list(zip(record.signed_at, [record.receipt, *record.segments], strict=True))
        return receipt_document(
            self._identity,
            parent,
            record.amount_total,
            self._fee_bps,
            signed,
            record.unsigned,
            record.policy,
        )

    def load(self, request_id: str) -> ReceiptRecord | None:
        """The receipts of a client request (its id, or the id of one of its segments)."""
        found = receipts_store.request_receipts(self._engine, request_id)
        if found is None:
            return None
        rows, unsigned_rows, paid = found
        signed = [
            SignedReceipt(
                r.body, r.worker_signature, r.coordinator_id, r.coordinator_signature,
                (r.billed_prompt_tokens, r.billed_completion_tokens),
            )
            for r in rows
        ]  # fmt: skip
        unsigned = [
            UnsignedPart(
                u.request_id, u.segment, u.worker_id, u.billed_prompt_tokens,
                u.billed_completion_tokens, u.price_prompt_per_mtok, u.price_completion_per_mtok,
            )
            for u in unsigned_rows
        ]  # fmt: skip
        return ReceiptRecord(
            rows[0].client,
            signed[0],
            paid,
            signed[1:],
            [r.segment for r in rows],
            unsigned,
            rows[0].policy_sha256,
        )
