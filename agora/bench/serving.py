"""Streaming load against any OpenAI endpoint (an engine directly, or Agora): output tokens/s
and TTFT, so the two can be compared side by side in one run.

    agora bench serving --url http://127.0.0.1:8000/v1 --model m --conc 64 --n 256
    agora bench serving --url http://127.0.0.1:8080/v1 --key sk-agora-… --model m --conc 64
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import typer

WORDS = [
    "def",
    "return",
    "self",
    "import",
    "class",
    "lambda",
    "yield",
    "async",
    "await",
    "for",
    "while",
    "if",
    "else",
    "try",
    "except",
    "finally",
    "with",
    "as",
    "print",
    "range",
    "len",
    "list",
    "dict",
    "tuple",
    "set",
    "None",
    "True",
    "False",
]


@dataclass(frozen=True)
class Result:
    ttft_s: float
    total_s: float
    completion_tokens: int


class Refused(Exception):
    pass


async def one(
    client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int
) -> Result:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    ttft: float | None = None
    tokens = 0
    async with client.stream("POST", f"{url}/completions", json=body) as response:
        if response.status_code != 200:  # counted as an error, with what the server said
            raise Refused(f"{response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
            choices = chunk.get("choices") or ()
            if ttft is None and choices and choices[0].get("text"):
                ttft = time.perf_counter() - started
    total = time.perf_counter() - started
    return Result(ttft if ttft is not None else total, total, tokens)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_load(
    url: str,
    key: str,
    model: str,
    conc: int,
    n: int,
    max_tokens: int,
    prompt_words: int,
    seed: int = 0,
) -> dict[str, Any]:
    rng = random.Random(seed)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(prompt_words)) for _ in range(n)]
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    limits = httpx.Limits(max_connections=conc + 4, max_keepalive_connections=conc + 4)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=600) as client:
        await one(client, url, model, prompts[0], 8)  # warm-up, not timed
        queue = list(prompts)
        results: list[Result] = []
        errors: list[str] = []

        async def user() -> None:
            while queue:
                prompt = queue.pop()
                try:
                    results.append(await one(client, url, model, prompt, max_tokens))
                except (Refused, httpx.HTTPError, ValueError) as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")

        started = time.perf_counter()
        await asyncio.gather(*(user() for _ in range(conc)))
        wall = time.perf_counter() - started
    ttfts = [r.ttft_s * 1000 for r in results] or [0.0]
    tokens = sum(r.completion_tokens for r in results)
    return {
        "url": url,
        "concurrency": conc,
        "requests": n,
        "max_tokens": max_tokens,
        "output_tokens": tokens,
        "output_tok_per_s": round(tokens / wall, 1),
        "requests_per_s": round(n / wall, 2),
        "ttft_ms_p50": round(statistics.median(ttfts), 1),
        "ttft_ms_p99": round(_pct(ttfts, 0.99), 1),
        "total_s_p50": round(statistics.median([r.total_s for r in results] or [0.0]), 3),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
    }


def serving(
    url: str = typer.Option(..., help="OpenAI base URL ending in /v1."),
    model: str = typer.Option(..., help="Model name."),
    key: str = typer.Option("", help="API key (Agora needs one; an engine usually not)."),
    conc: int = typer.Option(1, help="Concurrent streams."),
    n: int = typer.Option(8, help="Requests."),
    max_tokens: int = typer.Option(128, help="Output tokens per request (ignore_eos)."),
    prompt_words: int = typer.Option(64, help="Prompt length in words."),
    label: str = typer.Option("", help="Name of this target in the output."),
    out: Path | None = typer.Option(None, help="Append the JSON line to this file."),
) -> None:
    """One JSON line: output tokens/s, requests/s, TTFT p50/p99. The prompts are drawn from a
    seed of the label (and the concurrency), so two targets measured one after the other on the
    same engine do not share a warm prefix cache."""
    seed = zlib.crc32(f"{label or url}:{conc}".encode())
    result = asyncio.run(run_load(url, key, model, conc, n, max_tokens, prompt_words, seed))
    result["label"] = label or url
    line = json.dumps(result)
    print(line, flush=True)
    if out:
        with out.open("a") as fh:
            fh.write(line + "\n")
