"""Payout epochs, signed statements, the admin audit log and migrations, on SQLite and on
PostgreSQL, through the real settlement path (real signed receipts, the ledger writer)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, text
from sqlmodel import Session, SQLModel
from typer.testing import CliRunner

from agora.cli import app as agora_app
from billing.ledger import EXTERNAL_PAYOUTS, deposit, provider_account
from billing.payouts import SignedStatement, verify_statement
from billing.pricing import Price
from coordinator.payouts_cli import write_statements
from coordinator.services.accounts import Accounts
from coordinator.services.audit import audit_ledger
from coordinator.services.settlement import JobFacts, SegmentRecord, Settlement
from coordinator.store import audit_store, ledger_store, outbox_store, payouts_store, receipts_store
from coordinator.store.db import alembic_config, make_engine, migrate
from coordinator.store.writer import LedgerWriter
from protocol.completions import ChoiceOutput, Output
from protocol.identity import Identity
from protocol.receipt import Receipt, output_digest, sign_receipt

COORDINATOR = Identity.from_seed(bytes(range(32)))
W1, W2 = Identity.from_seed(b"\x01" * 32), Identity.from_seed(b"\x02" * 32)
PRICE = Price(100_000, 300_000)


@pytest.fixture
def settlement(engine: Engine) -> Iterator[Settlement]:
    writer = LedgerWriter(engine)
    yield Settlement(engine, writer, COORDINATOR, fee_bps=500)
    writer.close()


def settle(settlement: Settlement, worker: Identity, request_id: str, model: str, out: int) -> None:
    """One request served by `worker` with a real signed receipt, settled as the gateway does."""
    facts = JobFacts(request_id, "ann", worker.node_id, model, "ab" * 16, "cd" * 32, PRICE)
    observed = Output(prompt_tokens=20, completion_tokens=out)
    observed.choices[0] = ChoiceOutput.of("x" * out, [7] * out)
    receipt = Receipt(
        request_id=request_id, model=model, worker_id=worker.node_id,
        coordinator_nonce=facts.nonce_hex, prompt_sha256=facts.prompt_sha256,
        output_sha256=output_digest(observed.texts()), prompt_tokens=20, completion_tokens=out,
        price_prompt_per_mtok=PRICE.prompt_per_mtok,
        price_completion_per_mtok=PRICE.completion_per_mtok,
        started_at_ms=1, ttft_ms=2, finished_at_ms=3, finish_reason="length",
    )  # fmt: skip
    record = SegmentRecord(facts, observed, sign_receipt(worker, receipt))
    asyncio.run(settlement.settle(request_id, "ann", [record]))


def balance(engine: Engine, account: str) -> int:
    with Session(engine) as session:
        return ledger_store.balance(session, account)


def test_closing_an_epoch_pays_every_provider_with_signed_statements(
    engine: Engine, settlement: Settlement, tmp_path: Path
) -> None:
    with Session(engine) as session:
        ledger_store.post(session, deposit("d1", "ann", 10**9))
    settle(settlement, W1, "r1", "llama", 1000)
    settle(settlement, W1, "r2", "qwen", 3000)
    settle(settlement, W2, "r3", "llama", 2000)
    owed = {w.node_id: balance(engine, provider_account(w.node_id)) for w in (W1, W2)}
    assert all(amount > 0 for amount in owed.values())

    signed = payouts_store.close_epoch(engine, COORDINATOR)
    statements = {s.node_id: s for s in (verify_statement(one) for one in signed)}
    assert {node: s.amount for node, s in statements.items()} == owed
    assert statements[W1.node_id].receipts == 2
    assert set(statements[W1.node_id].by_model) == {"llama", "qwen"}
    for s in statements.values():
        assert sum(s.by_model.values()) == s.amount  # every micro-unit backed by receipts
        assert s.epoch == 1
        assert s.coordinator_id == COORDINATOR.node_id
    assert balance(engine, provider_account(W1.node_id)) == 0
    assert balance(engine, EXTERNAL_PAYOUTS) == sum(owed.values())
    assert audit_ledger(engine) == []

    assert payouts_store.close_epoch(engine, COORDINATOR) == []  # nothing new: nobody is owed
    settle(settlement, W2, "r4", "llama", 500)
    (again,) = payouts_store.close_epoch(engine, COORDINATOR)
    assert again.statement.node_id == W2.node_id
    assert again.statement.receipts == 1
    assert again.statement.epoch == 3
    assert audit_ledger(engine) == []
    with engine.connect() as conn:
        epochs = payouts_store.epochs(conn)
        closes = [e for e in audit_store.events(conn) if e["action"] == "payouts.close"]
    assert [e["paid"] for e in epochs] == [sum(owed.values()), 0, again.statement.amount, 0]
    assert epochs[-1]["closed_at"] is None  # the next one is open
    assert len(closes) == 3

    as_json, as_csv = write_statements(tmp_path, 1, signed)
    runner = CliRunner()
    verified = runner.invoke(agora_app, ["payouts", "verify", str(as_json)])
    assert verified.exit_code == 0, verified.output
    assert "OK: 2 statement(s)" in verified.output
    rows = as_csv.read_text().splitlines()
    assert rows[0].startswith("epoch,node_id,")
    assert len(rows) == 1 + 3  # W1 has two models, W2 one
    document = json.loads(as_json.read_text())
    forged = SignedStatement.from_json(document["statements"][0])
    body = json.loads(forged.body)
    body["amount"] += 1
    document["statements"][0]["body_b64"] = SignedStatement(
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode(), forged.signature
    ).to_json()["body_b64"]
    as_json.write_text(json.dumps(document))
    refused = runner.invoke(agora_app, ["payouts", "verify", str(as_json)])
    assert refused.exit_code == 1
    assert "INVALID" in refused.output


def test_admin_actions_are_logged_and_an_edit_breaks_the_chain(engine: Engine) -> None:
    accounts = Accounts(engine, actor="ops@example")
    accounts.create_client("bob", credit=5_000)
    assert accounts.add_credit("bob", 1_000, txid="deposit:k1")
    assert not accounts.add_credit("bob", 1_000, txid="deposit:k1")  # a retry: not posted twice
    key_id = accounts.list_keys("bob")[0].id
    accounts.revoke_key(key_id)
    accounts.add_bond(W1.node_id, 7_000, txid="bond:1")
    with engine.connect() as conn:
        events = list(reversed(audit_store.events(conn)))
    assert [e["action"] for e in events] == [
        "key.create", "credit.add", "credit.add", "key.revoke", "bond.add",
    ]  # fmt: skip
    assert {e["actor"] for e in events} == {"ops@example"}
    assert events[2]["detail"] == {"amount": 1_000, "txid": "deposit:k1"}
    assert audit_ledger(engine) == []

    with engine.begin() as conn:  # someone rewrites history in the database
        conn.execute(text("UPDATE auditevent SET detail = :d WHERE id = 3"), {"d": '{"amount":1}'})
    assert any("audit event 3 was altered" in p for p in audit_ledger(engine))


def test_upgrading_from_the_previous_revision_keeps_and_backfills_data(database_url: str) -> None:
    engine = make_engine(database_url)
    config = alembic_config(database_url)
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0003")
    with engine.begin() as conn:  # a receipt stored by the previous release
        conn.execute(
            text(
                "INSERT INTO storedreceipt (request_id, parent_id, segment, client, worker_id, "
                "model, body, worker_signature, coordinator_id, coordinator_signature, "
                "prompt_tokens, completion_tokens, amount_total, created_at) VALUES ('old', "
                "'old', 0, 'ann', 'w', 'm', :b, :b, 'c', :b, 11, 22, 33, CURRENT_TIMESTAMP)"
            ),
            {"b": b"x"},
        )
    migrate(engine)
    with engine.connect() as conn:
        row = conn.execute(
            text("SELECT billed_prompt_tokens, billed_completion_tokens, epoch_id "
                 "FROM storedreceipt WHERE request_id = 'old'")
        ).one()  # fmt: skip
        diff = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
    assert tuple(row) == (11, 22, None)
    assert diff == []
    engine.dispose()


def test_closing_epochs_while_settlements_are_written_loses_nothing(
    engine: Engine, settlement: Settlement
) -> None:
    """The close and the ledger writer both read before they write: on SQLite a deferred
    transaction that read first fails at once ("database is locked") when the other committed
    in between, so both must take the write lock up front."""
    with Session(engine) as session:
        ledger_store.post(session, deposit("d1", "ann", 10**9))
    errors: list[BaseException] = []
    paid: list[int] = []
    done = threading.Event()

    def close_repeatedly() -> None:
        while not done.is_set():
            try:
                signed = payouts_store.close_epoch(engine, COORDINATOR)
            except BaseException as exc:  # the test reports it
                errors.append(exc)
                return
            paid.extend(verify_statement(one).amount for one in signed)
            time.sleep(0.002)  # SQLite's busy wait backs off: let settlements in between

    closer = threading.Thread(target=close_repeatedly)
    closer.start()
    try:
        for i in range(30):
            settle(settlement, (W1, W2)[i % 2], f"race-{i}", "llama", 100 + i)
    finally:
        done.set()
        closer.join()
    assert errors == []
    last = payouts_store.close_epoch(engine, COORDINATOR)
    paid.extend(verify_statement(one).amount for one in last)
    assert sum(paid) == balance(engine, EXTERNAL_PAYOUTS) > 0
    assert balance(engine, provider_account(W1.node_id)) == 0
    assert audit_ledger(engine) == []


def test_a_posting_that_would_overdraw_is_staged_and_its_receipt_kept(
    engine: Engine, settlement: Settlement
) -> None:
    """Receipts and posting are one commit; a posting that cannot go through (no credit held:
    ann never deposited) must not take the receipt with it, and is posted once by start-up
    reconciliation after the money is there."""
    settle(settlement, W1, "broke-1", "llama", 1000)
    with Session(engine) as session:
        assert receipts_store.get(session, "broke-1") is not None
    with engine.connect() as conn:
        (staged,) = outbox_store.pending(conn)
    assert staged.txid == "req:broke-1"
    assert balance(engine, provider_account(W1.node_id)) == 0
    with Session(engine) as session:
        ledger_store.post(session, deposit("d1", "ann", 10**9))
    assert outbox_store.reconcile(engine) == 1
    assert outbox_store.reconcile(engine) == 0
    assert balance(engine, provider_account(W1.node_id)) > 0
    assert audit_ledger(engine) == []
