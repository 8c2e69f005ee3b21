"""What the gateway costs, side by side in one run: a client calling a synthetic OpenAI upstream
directly, through Agora's full path (coordinator + worker, receipts and ledger included), and
through the peers (vllm-router, LiteLLM's proxy), with the tested instrument in bench/peers/.

A synthetic upstream (uvloop, no model) is the right tool for this: a CPU engine would be the
bottleneck and hide what the gateway adds. Results: JSON lines plus a Markdown report.

    agora bench gateway                       # direct, vllm-router, LiteLLM, Agora
    agora bench gateway --peers "" --duration 10   # direct and Agora only, shorter
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import typer

from agora.bench.gateway_host import MODEL

REPO = Path(__file__).resolve().parents[2]
PEERS = REPO / "bench" / "peers"
NOTE = (
    "Synthetic upstream (bench/peers/upstream.py, no model; tokens per reply as in the command): "
    "a CPU engine "
    "would be the bottleneck and hide the gateway's cost. 2-core machine: at c >= 32 the "
    "load generator, upstream and gateway share two cores, so CPU ms per request is the "
    "machine-independent figure."
)


def _setup_peers(peers: list[str]) -> None:
    needs_venv = any(p in ("vr", "vr_rr", "ll1", "ll2") for p in peers)
    if not (PEERS / "venv-tools").exists() or (needs_venv and not (PEERS / "venv").exists()):
        typer.echo("setting up the peers' venvs (bench/peers/setup.sh, about a minute)…")
        subprocess.run(["bash", str(PEERS / "setup.sh")], check=True)


def _machine() -> str:
    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} vCPU {cpu}, Python {platform.python_version()}"


def _wait_for_host(workdir: Path, host: subprocess.Popen[bytes]) -> dict[str, object]:
    info_file = workdir / "host.json"
    deadline = time.monotonic() + 120
    while not info_file.exists():
        if host.poll() is not None or time.monotonic() > deadline:
            typer.echo(f"the Agora stack did not start; see {workdir / 'host.log'}", err=True)
            raise typer.Exit(1)
        time.sleep(0.2)
    info: dict[str, object] = json.loads(info_file.read_text())
    return info


def gateway(
    peers: str = typer.Option("vr,ll1", help="Peers to run beside direct and Agora (vr, ll1…)."),
    duration: float = typer.Option(20.0, help="Seconds measured per point."),
    warmup: float = typer.Option(5.0, help="Seconds of warm-up per point (discarded)."),
    conc: str = typer.Option("1,32,128", help="Concurrencies."),
    tokens: int = typer.Option(16, help="Tokens per streamed reply (1024: relay capacity)."),
    itl_ms: float = typer.Option(
        0.0, help="Upstream's delay between tokens (7: one GPU stream's pace; 0: all at once)."
    ),
    out: Path = typer.Option(Path("bench/results/gateway.jsonl"), help="Results (JSON lines)."),
    processes: str = typer.Option(
        "1", help="Coordinator process counts to compare (1,2: `agora` and `agora-p2`)."
    ),
) -> None:
    """Gateway overhead vs direct upstream at several concurrencies (TTFT, total, RPS, CPU/req,
    RSS)."""
    chosen = [p for p in peers.split(",") if p]
    _setup_peers(chosen)
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    counts = [int(n) for n in processes.split(",") if n]
    names = {n: "agora" if n == 1 else f"agora-p{n}" for n in counts}
    hosts: dict[int, tuple[Path, subprocess.Popen[bytes]]] = {}
    try:
        for n in counts:
            workdir = Path(tempfile.mkdtemp(prefix=f"agora-bench-gateway-p{n}-"))
            command = [sys.executable, "-m", "agora.bench.gateway_host", "--workdir",
                       str(workdir), "--processes", str(n)]  # fmt: skip
            log = (workdir / "host.log").open("wb")
            hosts[n] = workdir, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        external: list[str] = []
        for n, (workdir, host) in hosts.items():
            info = _wait_for_host(workdir, host)
            name = names[n]
            external += ["--external", f"{name}={info['port']}:{host.pid}",
                         "--key", f"{name}={info['key']}",
                         "--ready-path", f"{name}=/v1/models/{MODEL}"]  # fmt: skip
        ours = list(names.values())
        targets = ["direct", *chosen, *ours]
        repeat = ["direct", *[p for p in chosen if p == "vr"], *ours]
        command = [
            str(PEERS / "venv-tools" / "bin" / "python"), str(PEERS / "bench.py"),
            "--targets", ",".join(targets), "--repeat-targets", ",".join(repeat),
            "--conc", conc, "--duration", str(duration), "--warmup", str(warmup),
            *external, "--out", str(out), "--tokens", str(tokens), "--itl-ms", str(itl_ms),
        ]  # fmt: skip
        subprocess.run(command, check=True)
    finally:
        for _workdir, host in hosts.values():
            host.send_signal(signal.SIGTERM)
        for _workdir, host in hosts.values():
            try:
                host.wait(timeout=30)
            except subprocess.TimeoutExpired:
                host.kill()
    report = subprocess.run(
        [str(PEERS / "venv-tools" / "bin" / "python"), str(PEERS / "report.py"), str(out)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    markdown = out.with_suffix(".md")
    markdown.write_text(
        f"# Gateway overhead ({time.strftime('%Y-%m-%d')})\n\n{NOTE}\n\nMachine: {_machine()}\n\n"
        f"Command: `agora bench gateway --peers '{peers}' --duration {duration:g} "
        f"--warmup {warmup:g} --conc {conc} --tokens {tokens} --itl-ms {itl_ms:g} "
        f"--processes {processes}`\n\n"
        f"{report.stdout}"
    )
    typer.echo(report.stdout)
    typer.echo(f"{NOTE}\nwrote {out} and {markdown}")
