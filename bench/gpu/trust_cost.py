"""Device side: what a spot check costs on a GPU, against the job it checks (issue 6).

Against a vLLM OpenAI server on 127.0.0.1:8000 (../shared/gpu recipe, random 8B-shaped Llama):
greedy jobs of PROMPT prompt tokens and OUT output tokens at concurrency 1, each followed by the
spot check the coordinator sends (one prefill of prompt + output with prompt logprobs), judged
with the coordinator's own judgement; plus made-up token ids of the same length. Writes
$OUT/trust_gpu.json. Standard library only (urllib), besides our pure judgement module.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from coordinator.services.spot_judgement import CheckPolicy, check_body, judge

URL = "http://127.0.0.1:8000/v1"


def post(path: str, body: dict[str, object]) -> dict[str, Any]:
    request = urllib.request.Request(
        URL + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def main() -> None:
    with urllib.request.urlopen(URL + "/models", timeout=30) as response:
        model = json.loads(response.read())["data"][0]["id"]
    rng = random.Random(3)
    results = []
    for out_tokens in (128, 512):
        serve, check, honest, made_up = [], [], [], []
        for i in range(12):
            words = " ".join(
                rng.choice(["sea", "light", "keeper", "storm", "bread", "key"]) for _ in range(200)
            )
            body = {
                "model": model,
                "prompt": f"{i} {words}",
                "max_tokens": out_tokens,
                "temperature": 0,
                "ignore_eos": True,
                "return_token_ids": True,
            }
            t0 = time.perf_counter()
            choice = post("/completions", body)["choices"][0]
            serve.append(time.perf_counter() - t0)
            prompt_ids, ids = choice["prompt_token_ids"], choice["token_ids"]
            t0 = time.perf_counter()
            got = post("/completions", {**check_body(prompt_ids, ids), "model": model})
            check.append(time.perf_counter() - t0)
            verdict = judge(ids, got["choices"][0].get("prompt_logprobs") or [], CheckPolicy())
            honest.append(verdict.genuine)
            fake = [rng.randrange(100, 30000) for _ in ids]
            got = post("/completions", {**check_body(prompt_ids, fake), "model": model})
            made_up.append(
                judge(fake, got["choices"][0].get("prompt_logprobs") or [], CheckPolicy()).genuine
            )
        row = {
            "prompt_tokens": len(prompt_ids),
            "output_tokens": out_tokens,
            "jobs": len(serve),
            "serve_s_median": statistics.median(serve[1:]),
            "check_s_median": statistics.median(check[1:]),
            "check_cost_ratio": statistics.median(check[1:]) / statistics.median(serve[1:]),
            "honest_accused": honest.count(False),
            "made_up_caught": made_up.count(False),
        }
        print(row, flush=True)
        results.append(row)
    out = Path(os.environ.get("OUT", "/tmp/out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "trust_gpu.json").write_text(json.dumps({"model": model, "rows": results}, indent=2))


if __name__ == "__main__":
    main()
