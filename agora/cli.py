"""The one `agora` command: composes each package's commands."""

from __future__ import annotations

import typer

from agora import demo, keys, receipts, simulate
from agora.bench.cli import app as bench_app
from coordinator.batches_cli import batches
from coordinator.cli import app as coordinator_app
from coordinator.ledger_cli import app as ledger_app
from coordinator.market_cli import market
from coordinator.models_cli import app as models_app
from coordinator.payouts_cli import app as payouts_app
from coordinator.policies_cli import app as policies_app
from coordinator.status_cli import status
from worker_node.cli import app as worker_app

app = typer.Typer(
    help="Agora: a decentralized GPU marketplace for LLM inference.", no_args_is_help=True
)
app.add_typer(coordinator_app, name="coordinator")
app.add_typer(worker_app, name="worker")
app.add_typer(keys.app, name="keys")
app.add_typer(receipts.app, name="receipt")
app.add_typer(bench_app, name="bench")
app.add_typer(ledger_app, name="ledger")
app.add_typer(payouts_app, name="payouts")
app.add_typer(models_app, name="models")
app.add_typer(policies_app, name="policies")
app.command("demo")(demo.demo)
app.command("status")(status)
app.command("batches")(batches)
app.command("market")(market)
app.command("simulate")(simulate.simulate)


def main() -> None:
    app()
