"""Live load comes from the real engine's Prometheus metrics."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from worker_node.engines.vllm import VllmEngine
from worker_node.metrics import EngineLoad, parse_vllm_metrics, read_engine_load

pytestmark = pytest.mark.engine


async def test_reads_running_requests_from_the_engine(vllm_engine: VllmEngine) -> None:
    """While a long job runs, a reading says so. A 480-token job on the tiny model can end
    between two readings on a loaded machine, so up to three jobs are tried in turn."""
    seen: list[EngineLoad] = []
    async with httpx.AsyncClient(timeout=60) as client:
        idle = await read_engine_load(client, vllm_engine.base_url, "tiny")
        assert idle.known
        body = {"model": "tiny", "prompt": "count", "max_tokens": 480, "ignore_eos": True}
        for _attempt in range(3):
            long_job = asyncio.create_task(
                client.post(f"{vllm_engine.base_url}/completions", json=body)
            )
            while not long_job.done():  # look for as long as the job runs, however fast it is
                await asyncio.sleep(0.01)
                seen.append(await read_engine_load(client, vllm_engine.base_url, "tiny"))
                if seen[-1].running:
                    break
            response = await long_job
            assert response.status_code == 200
            if seen and seen[-1].running:
                break
    assert any(load.running >= 1 for load in seen)
    assert all(0.0 <= load.kv_cache_usage <= 1.0 for load in seen)


async def test_a_server_without_metrics_gives_an_unknown_load() -> None:
    async with httpx.AsyncClient() as client:
        load = await read_engine_load(client, "http://127.0.0.1:9/v1", "tiny")
    assert load == EngineLoad()


def test_only_the_named_model_counts() -> None:
    text = (
        "# TYPE vllm:num_requests_running gauge\n"
        'vllm:num_requests_running{model_name="a"} 3.0\n'
        'vllm:num_requests_running{model_name="b"} 7.0\n'
        "# TYPE vllm:kv_cache_usage_perc gauge\n"
        'vllm:kv_cache_usage_perc{model_name="a"} 0.25\n'
    )
    assert parse_vllm_metrics(text, "a") == EngineLoad(3, 0, 0.25, known=True)
    assert parse_vllm_metrics(text, "b").running == 7


def test_only_the_wanted_metrics_count_whatever_else_the_page_holds() -> None:
    text = (
        "# HELP vllm:num_requests_waiting Number of requests waiting.\n"
        "# TYPE vllm:num_requests_waiting gauge\n"
        'vllm:num_requests_waiting{engine="0",model_name="a"} 4.0\n'
        'vllm:num_requests_waiting{engine="1",model_name="a"} 1.0\n'
        'vllm:num_requests_waiting_by_reason{model_name="a",reason="capacity"} 99.0\n'
        'vllm:num_requests_running_total{model_name="a"} 50.0\n'
        "vllm:num_requests_running 2.0\n"  # no labels: counted for the model asked about
        'vllm:gpu_cache_usage_perc{model_name="a"} 0.5\n'
        'vllm:time_to_first_token_seconds_bucket{le="0.1",model_name="a"} 12.0\n'
    )
    assert parse_vllm_metrics(text, "a") == EngineLoad(2, 5, 0.5, known=True)
    assert parse_vllm_metrics("# nothing here\n", "a") == EngineLoad()


def test_the_prefix_cache_counters_are_read_and_nothing_that_only_starts_like_them() -> None:
    text = (
        "# TYPE vllm:prefix_cache_queries counter\n"
        'vllm:prefix_cache_queries_total{engine="0",model_name="a"} 1536.0\n'
        'vllm:prefix_cache_queries_created{engine="0",model_name="a"} 1.7e9\n'
        'vllm:prefix_cache_hits_total{engine="0",model_name="a"} 1024.0\n'
        'vllm:prefix_cache_hits_total{engine="0",model_name="b"} 7.0\n'
        'vllm:external_prefix_cache_hits_total{engine="0",model_name="a"} 5.0\n'
    )
    load = parse_vllm_metrics(text, "a")
    assert (load.prefix_cache_queries, load.prefix_cache_hits) == (1536, 1024)


async def test_the_engines_prefix_cache_hits_are_seen(vllm_engine: VllmEngine) -> None:
    """The same 300-token prompt twice: the second finds most of it in the prefix cache."""
    body = {"model": "tiny", "prompt": list(range(100, 400)), "max_tokens": 1}
    async with httpx.AsyncClient(timeout=60) as client:
        before = await read_engine_load(client, vllm_engine.base_url, "tiny")
        for _ in range(2):
            response = await client.post(f"{vllm_engine.base_url}/completions", json=body)
            assert response.status_code == 200, response.text
        after = await read_engine_load(client, vllm_engine.base_url, "tiny")
    assert after.prefix_cache_queries - before.prefix_cache_queries >= 600
    assert after.prefix_cache_hits - before.prefix_cache_hits >= 128
