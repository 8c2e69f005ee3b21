"""What a node's heartbeat pays to read its engine's load: prometheus_client's full parser vs the
scan for three gauges in worker_node/metrics.py, on a page shaped like vLLM 0.24's /metrics
(14 histograms of 30 buckets, 20 counters, the 3 gauges; ~34 KiB).

    .venv/bin/python bench/metrics_parse.py
"""

from __future__ import annotations

import time

from prometheus_client.parser import text_string_to_metric_families

from worker_node.metrics import parse_vllm_metrics

GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")


def vllm_like_page() -> str:
    lines = []
    for h in range(14):
        name = f"vllm:histogram_{h}_seconds"
        lines += [f"# HELP {name} a latency", f"# TYPE {name} histogram"]
        lines += [
            f'{name}_bucket{{engine="0",le="{0.001 * 2**b}",model_name="m"}} {b * 7.0}'
            for b in range(30)
        ]
        lines += [f'{name}_count{{engine="0",model_name="m"}} 210.0']
        lines += [f'{name}_sum{{engine="0",model_name="m"}} 12.5']
    for gauge in GAUGES:
        lines += [f"# TYPE {gauge} gauge", f'{gauge}{{engine="0",model_name="m"}} 0.5']
    for c in range(20):
        lines += [f"# TYPE vllm:counter_{c} counter", f'vllm:counter_{c}_total{{model_name="m"}} 5']
    return "\n".join(lines) + "\n"


def full_parse(text: str) -> dict[str, float]:
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name in GAUGES
    }


def main() -> None:
    page = vllm_like_page()
    readers = {
        "prometheus_client parser": full_parse,
        "scan (worker_node.metrics)": lambda text: parse_vllm_metrics(text, "m"),
    }
    for label, read in readers.items():
        n = 100
        start = time.perf_counter()
        for _ in range(n):
            read(page)
        per_page_ms = (time.perf_counter() - start) / n * 1000
        print(f"{label}: {per_page_ms:.2f} ms per page ({len(page) // 1024} KiB)")


if __name__ == "__main__":
    main()
