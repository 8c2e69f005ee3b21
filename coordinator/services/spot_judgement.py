"""The spot-check judgement, pure: is a claimed greedy output the model's own? (Kept apart
from services.spot_check so benchmarks can use it without the gateway.)

For greedy decoding every claimed token must be the reference model's most likely next token,
up to float noise: a fresh prefill and step-by-step decoding differ in the last bits, which can
flip a near-tie (gaps of 1e-4 nats were seen), never a clear choice.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from protocol.completions import Output


@dataclass(frozen=True)
class CheckPolicy:
    rate: float = 0.05  # share of eligible jobs checked
    probation_rate: float = 0.5  # for workers still on probation
    gap_nats: float = 0.05  # a claimed token this far below the reference's best is "off"
    max_off_share: float = 0.25  # more than this share of tokens off: the output is not genuine
    min_tokens: int = 4  # shorter outputs say too little to judge


@dataclass(frozen=True)
class Judgement:
    genuine: bool
    off: int  # tokens clearly not the reference's greedy choice
    judged: int
    detail: str


def eligible(body: Mapping[str, Any], delivered: Output, segments: int) -> bool:
    """A single-segment greedy job with token ids, without tools or structured output."""
    if segments != 1 or float(body.get("temperature", 1.0) or 0.0) != 0.0:
        return False
    if int(body.get("n") or 1) != 1 or body.get("tools") or body.get("response_format"):
        return False
    choice = delivered.choices.get(0)
    return bool(delivered.prompt_token_ids and choice and choice.token_ids)


def sampled(rng: random.Random, on_probation: bool, policy: CheckPolicy) -> bool:
    return rng.random() < (policy.probation_rate if on_probation else policy.rate)


def check_body(prompt_ids: Sequence[int], output_ids: Sequence[int]) -> dict[str, Any]:
    """One prefill over prompt + claimed output, returning each position's logprobs."""
    return {
        "prompt": [*prompt_ids, *output_ids],
        "max_tokens": 1,
        "temperature": 0,
        "prompt_logprobs": 1,
        "stream": False,
    }


def judge(
    output_ids: Sequence[int], prompt_logprobs: Sequence[Any], policy: CheckPolicy
) -> Judgement:
    """Compare each claimed token with the reference's best at its position. `prompt_logprobs`
    is vLLM's list (one entry per prompt position: None or {token id: {"logprob": …}})."""
    tail = list(prompt_logprobs)[-len(output_ids) :] if output_ids else []
    off = judged = 0
    for token, entry in zip(output_ids, tail, strict=False):
        if not entry:
            continue
        logprobs = {int(k): float(v["logprob"]) for k, v in entry.items()}
        if token not in logprobs:
            continue
        judged += 1
        if max(logprobs.values()) - logprobs[token] > policy.gap_nats:
            off += 1
    if judged < policy.min_tokens:
        return Judgement(True, off, judged, "too short to judge")
    genuine = off <= policy.max_off_share * judged
    detail = f"spot check: {off} of {judged} greedy tokens are not the model's choice"
    return Judgement(genuine, off, judged, detail)
