"""The spot-check judgement, pure: is a claimed output the model's own? (Kept apart from
services.spot_check so benchmarks can use it without the gateway.)

The reference scores prompt + claimed output in one prefill and returns, per position, its
top-k logprobs and the claimed token's rank.

Greedy jobs: every claimed token must be the reference's most likely next token, up to float
noise (a fresh prefill and step-by-step decoding differ in the last bits, which can flip a
near-tie — gaps of 1e-4 nats were seen — never a clear choice).

Sampled jobs (0 < temperature <= 1, no penalties or biases): a token is drawn from the model's
distribution sharpened by the temperature, and sharpening only moves mass toward the most
likely tokens (so do top-p, top-k and min-p). Hence an honest token falls outside the
reference's top k with probability at most q = 1 - (top-k mass of the raw distribution), plus a
slack for float noise between machines. The number of outside tokens is then bounded by a sum
of Bernoulli(q_i); the Chernoff bound on its upper tail is the p-value, and only a p-value
below `alpha` (one in a million per check) is an accusation. A flat distribution makes q near 1
and the check accuses nobody: it cannot fail honest work, it can only lack power.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from protocol.completions import Output

# penalties and biases reshape the distribution in ways the bound above does not cover
_RESHAPING = {
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
    "min_tokens": 0,
}
_CONSTRAINING = ("tools", "response_format", "logit_bias", "guided_json", "guided_regex",
                 "guided_choice", "guided_grammar", "structured_outputs", "bad_words",
                 "allowed_token_ids")  # fmt: skip


@dataclass(frozen=True)
class CheckPolicy:
    rate: float = 0.1  # share of eligible jobs checked (10%: see BENCHMARKS.md, trust)
    probation_rate: float = 0.5  # for workers still on probation
    gap_nats: float = 0.05  # greedy: a claimed token this far below the reference's best is "off"
    max_off_share: float = 0.25  # greedy: more than this share of tokens off is not genuine
    min_tokens: int = 4  # shorter outputs say too little to judge
    top_k: int = 8  # reference logprobs asked per position
    slack: float = 0.02  # sampled: added to each position's outside-top-k bound
    alpha: float = 1e-6  # sampled: accuse only below this p-value
    # cache probe: a prompt this long, sent again at once, must find at least one full block
    # in the engine's prefix cache (vLLM's blocks are 16 tokens on GPUs, 128 on CPUs)
    cache_probe_min_tokens: int = 256
    cache_probe_max_kv_usage: float = 0.8  # fuller engines evict: an honest miss is likely
    # embeddings: each vector recomputed by the reference must point the same way as the
    # claimed one (the same model on other hardware or batch agrees to ~1e-4; a different
    # model, a perturbed or a made-up vector does not come near)
    min_cosine: float = 0.99


@dataclass(frozen=True)
class Judgement:
    genuine: bool
    off: int  # greedy: tokens not the reference's choice; sampled: tokens outside its top k
    judged: int
    detail: str


def sampling_temperature(body: Mapping[str, Any], delivered: Output, segments: int) -> float | None:
    """The temperature a checkable job ran at (0 = greedy), or None when it cannot be checked:
    continuations, several choices, constrained or reshaped sampling, temperature above 1."""
    if segments != 1 or int(body.get("n") or 1) != 1:
        return None
    if any(body.get(key) for key in _CONSTRAINING):
        return None
    if any(float(body.get(key) or neutral) != neutral for key, neutral in _RESHAPING.items()):
        return None
    raw = body.get("temperature")
    temperature = 1.0 if raw is None else float(raw)  # the OpenAI default samples at 1
    if not 0.0 <= temperature <= 1.0:
        return None
    choice = delivered.choices.get(0)
    return temperature if delivered.prompt_token_ids and choice and choice.token_ids else None


def eligible(body: Mapping[str, Any], delivered: Output, segments: int) -> bool:
    return sampling_temperature(body, delivered, segments) is not None


def sampled(rng: random.Random, on_probation: bool, policy: CheckPolicy) -> bool:
    return rng.random() < (policy.probation_rate if on_probation else policy.rate)


def check_body(
    prompt_ids: Sequence[int], output_ids: Sequence[int], top_k: int = CheckPolicy.top_k
) -> dict[str, Any]:
    """One prefill over prompt + claimed output, returning each position's top-k logprobs."""
    return {
        "prompt": [*prompt_ids, *output_ids],
        "max_tokens": 1,
        "temperature": 0,
        "prompt_logprobs": top_k,
        "stream": False,
    }


@dataclass(frozen=True)
class _Position:
    claimed: float  # the claimed token's logprob
    best: float
    rank: int  # 1 = the reference's most likely token
    top_mass: float  # probability of the reference's top k


def _positions(
    output_ids: Sequence[int], prompt_logprobs: Sequence[Any], top_k: int
) -> list[_Position]:
    tail = list(prompt_logprobs)[-len(output_ids) :] if output_ids else []
    out = []
    for token, entry in zip(output_ids, tail, strict=False):
        if not entry or str(token) not in {str(k) for k in entry}:
            continue
        logprobs = {int(k): float(v["logprob"]) for k, v in entry.items()}
        ranked = sorted(logprobs.values(), reverse=True)
        claimed = logprobs[token]
        rank_of = next((v.get("rank") for k, v in entry.items() if int(k) == token), None)
        rank = int(rank_of) if rank_of is not None else 1 + sum(lp > claimed for lp in ranked)
        top = [lp for k, lp in logprobs.items() if k != token or rank <= top_k]
        top_mass = sum(math.exp(lp) for lp in sorted(top, reverse=True)[:top_k])
        out.append(_Position(claimed, ranked[0], rank, min(1.0, top_mass)))
    return out


def tail_bound(mean: float, observed: int) -> float:
    """Chernoff bound on P(X >= observed) for X a sum of Bernoullis with this mean."""
    if observed <= mean:
        return 1.0
    if mean <= 0.0:
        return 0.0
    return math.exp(-mean + observed * (1.0 + math.log(mean) - math.log(observed)))


def judge(
    output_ids: Sequence[int],
    prompt_logprobs: Sequence[Any],
    policy: CheckPolicy,
    temperature: float = 0.0,
) -> Judgement:
    """`prompt_logprobs` is vLLM's list (one entry per prompt position: None or
    {token id: {"logprob": …, "rank": …}})."""
    positions = _positions(output_ids, prompt_logprobs, policy.top_k)
    judged = len(positions)
    if temperature == 0.0:
        off = sum(p.best - p.claimed > policy.gap_nats for p in positions)
        if judged < policy.min_tokens:
            return Judgement(True, off, judged, "too short to judge")
        detail = f"spot check: {off} of {judged} greedy tokens are not the model's choice"
        return Judgement(off <= policy.max_off_share * judged, off, judged, detail)
    off = sum(p.rank > policy.top_k for p in positions)
    if judged < policy.min_tokens:
        return Judgement(True, off, judged, "too short to judge")
    expected = sum(min(1.0, 1.0 - p.top_mass + policy.slack) for p in positions)
    p_value = tail_bound(expected, off)
    detail = (
        f"spot check: {off} of {judged} sampled tokens (t={temperature:g}) fall outside the "
        f"model's top {policy.top_k}, where at most {expected:.1f} were expected "
        f"(p <= {p_value:.1e})"
    )
    return Judgement(p_value >= policy.alpha, off, judged, detail)


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    """The cosine similarity of two vectors (0 when either is all zeros or sizes differ)."""
    if len(a) != len(b):
        return 0.0
    norm = math.sqrt(math.fsum(x * x for x in a) * math.fsum(y * y for y in b))
    return math.fsum(x * y for x, y in zip(a, b, strict=True)) / norm if norm else 0.0


def judge_vectors(
    claimed: Sequence[Sequence[float]], reference: Sequence[Sequence[float]], policy: CheckPolicy
) -> Judgement:
    """Embeddings are deterministic: every claimed vector must match the reference's for the
    same input (a missing or extra vector is off too)."""
    pairs = max(len(claimed), len(reference))
    similarities = [cosine(a, b) for a, b in zip(claimed, reference, strict=False)]
    off = pairs - sum(1 for c in similarities if c >= policy.min_cosine)
    lowest = min(similarities, default=0.0)
    detail = (f"spot check: {off} of {pairs} vectors below cosine {policy.min_cosine} of the "
              f"reference's (lowest {lowest:.4f})")  # fmt: skip
    return Judgement(off == 0 and pairs > 0, off, pairs, detail)
