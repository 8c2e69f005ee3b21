"""`agora bench …` commands."""

from __future__ import annotations

import typer

from agora.bench.adapters import adapters
from agora.bench.batch import batch
from agora.bench.gateway import gateway
from agora.bench.holds import holds
from agora.bench.policy import policy
from agora.bench.prefixes import prefixes
from agora.bench.resilience import resilience
from agora.bench.routing import routing
from agora.bench.serving import serving
from agora.bench.trust import trust

app = typer.Typer(help="Benchmarks; each writes its numbers to a file.", no_args_is_help=True)
app.command("adapters")(adapters)
app.command("batch")(batch)
app.command("gateway")(gateway)
app.command("holds")(holds)
app.command("policy")(policy)
app.command("prefixes")(prefixes)
app.command("resilience")(resilience)
app.command("routing")(routing)
app.command("serving")(serving)
app.command("trust")(trust)
