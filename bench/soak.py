"""Soak: N concurrent streams through Agora (coordinator + worker) on the synthetic upstream for
a bounded time; counts errors and samples the RSS of Agora's process tree every 10 s.

    .venv/bin/python bench/soak.py --conc 1024 --duration 300   # -> bench/results/soak.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / "bench" / "peers"
TOOLS = PEERS / "venv-tools" / "bin" / "python"  # made by bench/peers/setup.sh


def _rss_mb(pid: int) -> float:
    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--conc", type=int, default=1024)
    parser.add_argument("--duration", type=float, default=300)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="agora-soak-"))
    upstream = subprocess.Popen([str(TOOLS), str(PEERS / "upstream.py"), "--port", "18001",
                                 "--tokens", "16", "--itl-ms", "0"])  # fmt: skip
    host = subprocess.Popen([sys.executable, "-m", "agora.bench.gateway_host", "--workdir",
                             str(work), "--max-concurrency", str(args.conc)])  # fmt: skip
    samples: list[tuple[float, float]] = []
    stop = threading.Event()
    try:
        while not (work / "host.json").exists():
            time.sleep(0.2)
        info = json.loads((work / "host.json").read_text())
        time.sleep(10)  # the worker registers
        started = time.monotonic()

        def sample() -> None:
            while not stop.wait(10):
                samples.append((round(time.monotonic() - started, 1), round(_rss_mb(host.pid), 1)))

        threading.Thread(target=sample, daemon=True).start()
        out = work / "load.jsonl"
        subprocess.run(
            [str(TOOLS), str(PEERS / "loadgen.py"), "--url", f"http://127.0.0.1:{info['port']}",
             "-c", str(args.conc), "-d", str(args.duration), "--warmup", "10", "--stream",
             "--api-key", info["key"], "--pids", f"proxy={host.pid}", "--label", "agora",
             "--out", str(out)],
            check=True, timeout=args.duration + 120,
        )  # fmt: skip
        stop.set()
        load = json.loads(out.read_text().splitlines()[-1])
    finally:
        stop.set()
        for proc in (host, upstream):
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
    first = next((rss for t, rss in samples if t >= 30), samples[0][1] if samples else 0.0)
    result = {
        "concurrency": args.conc, "duration_s": args.duration, "load": load,
        "rss_mb": samples, "rss_growth_after_30s_pct":
            round(100 * (samples[-1][1] - first) / first, 2) if samples and first else None,
    }  # fmt: skip
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rss_mb"}, indent=2))


if __name__ == "__main__":
    main()
