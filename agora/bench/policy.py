"""`agora bench policy`: what the built-in policy steps add to a request, at 1 KB and 32 KB.

A request under the built-in steps pays for its input (every prompt text through `pii`
placeholder redaction: all seven kinds) and for its output (every streamed frame through the
gate: placeholders put back, a `block` step's phrases and patterns checked over the hold-back
window, then `flag` over the finished answer). Measured in-process on the code the request path
runs, per request, with the prompt's size of output streamed back as token-sized frames (about
four characters each, one frame per token, the worst case: on a GPU frames batch several
tokens). Text is plain prose with a personal value every ~250 bytes."""

from __future__ import annotations

import json
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from coordinator.services.policy.compiled import Policy
from coordinator.services.policy.run import PolicyRun
from protocol.completions import CHAT
from protocol.proto import session_pb2 as pb

console = Console()
WORDS = [
    "the", "market", "routes", "each", "request", "to", "a", "worker", "that", "holds", "its",
    "prefix", "and", "signs", "a", "receipt", "for", "every", "token", "it", "generated",
    "while", "the", "coordinator", "recounts", "what", "it", "relayed",
]  # fmt: skip
VALUES = ("jane.doe@example.com", "+44 20 7946 0958", "4111 1111 1111 1111",
          "DE89 3704 0044 0532 0130 00", "123-45-6789", "192.168.10.20",
          "sk-live-Zq3xXb7LmN0pQ2rS4tU6vW8y")  # fmt: skip
STEPS: list[dict[str, Any]] = [
    {"kind": "pii", "mode": "placeholder"},
    {"kind": "block", "phrases": ["project atlas", "internal use only", "do not distribute",
                                  "confidential draft", "board minutes"],
     "patterns": [r"(?i)password\s*[:=]", r"\bACME-\d{6}\b"]},
    {"kind": "flag", "phrases": ["lawsuit", "recall"]},
]  # fmt: skip


def _text(size: int, rng: random.Random) -> str:
    parts: list[str] = []
    length = since = 0
    while length < size:
        word = rng.choice(WORDS) if since < 250 else rng.choice(VALUES)
        since = 0 if word in VALUES else since + len(word) + 1
        parts.append(word)
        length += len(word) + 1
    return " ".join(parts)[:size]


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _one(policy: Policy, prompt: str, tokens_per_frame: int = 1) -> tuple[float, float, int]:
    """(input seconds, output seconds, frames) for one request."""
    run = PolicyRun(policy)
    body = {"model": "m", "messages": [{"role": "user", "content": prompt}]}
    started = time.perf_counter()
    redacted = run.redact(CHAT, body)
    input_s = time.perf_counter() - started
    answer = str(redacted["messages"][0]["content"])  # the model echoes what it was given
    step = 4 * tokens_per_frame  # ~4 characters a token
    chunks = [answer[i : i + step] for i in range(0, len(answer), step)]
    frames = [pb.Frames(choices=[pb.TokenFrame(index=0, text=c)]) for c in chunks]
    frames[-1].choices[0].finish_reason = "stop"
    started = time.perf_counter()
    for batch in frames:
        run.frames(batch)
    run.finish({0: answer})
    output_s = time.perf_counter() - started
    return input_s, output_s, len(frames)


def policy(
    sizes: str = typer.Option("1024,32768", help="Prompt sizes in bytes, comma-separated."),
    requests: int = typer.Option(2000, min=10, help="Requests per size (a tenth at 32 KB+)."),
    seed: int = typer.Option(0, help="Seed of the generated text."),
    tokens_per_frame: str = typer.Option(
        "1,4", help="Tokens a stream frame carries (1: the worst case; GPUs batch several)."
    ),
    out: Path = typer.Option(Path("bench/results/policy.json"), help="Where the numbers go."),
) -> None:
    """Added latency per request of the built-in input and output policy steps."""
    built = Policy.build("bench", 1, {"steps": STEPS})
    rng = random.Random(seed)
    results: list[dict[str, Any]] = []
    with Progress(console=console) as progress:
        shapes = [(int(s), int(t)) for s in sizes.split(",") for t in tokens_per_frame.split(",")]
        for size, per_frame in shapes:
            count = requests if size <= 4096 else max(10, requests // 10)
            task = progress.add_task(f"{size} B, {per_frame} token(s)/frame", total=count)
            prompts = [_text(size, rng) for _ in range(min(count, 50))]
            for prompt in prompts[:5]:  # warm up (regex caches, first allocations)
                _one(built, prompt, per_frame)
            inputs, outputs, totals = [], [], []
            frames = 0
            for i in range(count):
                input_s, output_s, frames = _one(built, prompts[i % len(prompts)], per_frame)
                inputs.append(input_s)
                outputs.append(output_s)
                totals.append(input_s + output_s)
                progress.advance(task)
            results.append({
                "prompt_bytes": size, "tokens_per_frame": per_frame, "requests": count,
                "frames_per_request": frames,
                "input_ms": {"p50": _pct(inputs, 0.5) * 1e3, "p99": _pct(inputs, 0.99) * 1e3},
                "output_ms": {"p50": _pct(outputs, 0.5) * 1e3, "p99": _pct(outputs, 0.99) * 1e3},
                "total_ms": {"p50": _pct(totals, 0.5) * 1e3, "p99": _pct(totals, 0.99) * 1e3,
                             "mean": statistics.fmean(totals) * 1e3},
                "output_us_per_frame": _pct(outputs, 0.5) / max(1, frames) * 1e6,
            })  # fmt: skip
    report = {"bench": "policy", "steps": STEPS, "python": platform.python_version(),
              "machine": platform.machine(), "results": results}  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    table = Table(
        "prompt",
        "tokens/frame",
        "frames",
        "input p50",
        "input p99",
        "output p50",
        "output p99",
        "total p50",
        "total p99",
        "per frame",
        title="Policy steps per request (ms)",
    )
    for r in results:
        table.add_row(f"{r['prompt_bytes']} B", str(r["tokens_per_frame"]),
                      str(r["frames_per_request"]),
                      *(f"{r[k][q]:.3f}" for k in ("input_ms", "output_ms", "total_ms")
                        for q in ("p50", "p99")),
                      f"{r['output_us_per_frame']:.1f} µs")  # fmt: skip
    console.print(table)
    console.print(f"written to {out}")
