"""The spot-check judgement as a pure function over vLLM-shaped prompt logprobs."""

from __future__ import annotations

import math
import random
from typing import Any

from coordinator.services.spot_judgement import (
    CheckPolicy,
    check_body,
    eligible,
    judge,
    sampling_temperature,
    tail_bound,
)
from protocol.completions import ChoiceOutput, Output

POLICY = CheckPolicy()


def position(claimed: int, claimed_lp: float, best: int, best_lp: float) -> dict[str, Any]:
    entry = {str(claimed): {"logprob": claimed_lp, "rank": 1 if claimed == best else 2}}
    entry[str(best)] = {"logprob": best_lp, "rank": 1}
    return entry


def logprobs_for(claimed: list[int], gaps: list[float], prompt_len: int = 3) -> list[Any]:
    """Prompt positions first (None for the first, as vLLM gives), then one per output token."""
    prompt: list[Any] = [None] + [position(1, -1.0, 1, -1.0) for _ in range(prompt_len - 1)]
    out = []
    for token, gap in zip(claimed, gaps, strict=True):
        out.append(position(token, -2.0 - gap, token if gap == 0 else token + 1, -2.0))
    return prompt + out


def test_the_models_own_greedy_choices_are_genuine() -> None:
    claimed = [10, 11, 12, 13, 14, 15]
    verdict = judge(claimed, logprobs_for(claimed, [0.0] * 6), POLICY)
    assert verdict.genuine
    assert (verdict.off, verdict.judged) == (0, 6)


def test_near_ties_flipped_by_float_noise_are_not_accused() -> None:
    claimed = [10, 11, 12, 13, 14, 15]
    verdict = judge(claimed, logprobs_for(claimed, [0.0, 1e-4, 0.0, 3e-4, 0.0, 0.0]), POLICY)
    assert verdict.genuine
    assert verdict.off == 0


def test_tokens_the_model_would_not_choose_are_caught() -> None:
    claimed = [10, 11, 12, 13, 14, 15, 16, 17]
    verdict = judge(
        claimed, logprobs_for(claimed, [0.4, 0.0, 0.9, 0.3, 0.0, 0.7, 0.2, 0.5]), POLICY
    )
    assert not verdict.genuine
    assert (verdict.off, verdict.judged) == (6, 8)
    assert "6 of 8" in verdict.detail


def test_a_short_output_is_not_judged() -> None:
    claimed = [10, 11]
    assert judge(claimed, logprobs_for(claimed, [0.9, 0.9]), POLICY).genuine


def test_only_single_segment_unreshaped_jobs_with_ids_are_eligible() -> None:
    out = Output(prompt_token_ids=[1, 2, 3])
    out.choices[0] = ChoiceOutput.of("abc", [4, 5])
    assert sampling_temperature({"temperature": 0}, out, 1) == 0.0
    assert sampling_temperature({"temperature": 0.7, "top_p": 0.9}, out, 1) == 0.7
    assert sampling_temperature({}, out, 1) == 1.0  # the OpenAI default samples at 1
    assert not eligible({"temperature": 1.3}, out, 1)  # flattened: the bound does not hold
    assert not eligible({"temperature": 0.8, "presence_penalty": 0.5}, out, 1)
    assert not eligible({"temperature": 0.8, "logit_bias": {"5": 10}}, out, 1)
    assert eligible({"temperature": 0.8, "presence_penalty": 0}, out, 1)
    assert not eligible({"temperature": 0}, out, 2)  # a continuation
    assert not eligible({"temperature": 0, "n": 2}, out, 1)
    assert not eligible({"temperature": 0, "tools": [{"type": "function"}]}, out, 1)
    assert check_body([1, 2, 3], [4, 5])["prompt"] == [1, 2, 3, 4, 5]


def sampled_position(claimed: int, rank: int, top: list[float]) -> dict[str, Any]:
    """vLLM's entry for one position: the reference's top-k (token ids 1000+) and the claimed
    token with its rank (a claimed token inside the top k is one of them)."""
    entry = {str(1000 + i): {"logprob": math.log(p), "rank": i + 1} for i, p in enumerate(top)}
    if rank <= len(top):
        entry[str(claimed)] = entry.pop(str(1000 + rank - 1))
    else:
        entry[str(claimed)] = {"logprob": math.log(1e-6), "rank": rank}
    return entry


def sampled_logprobs(claimed: list[int], ranks: list[int], top: list[float]) -> list[Any]:
    return [None, None] + [sampled_position(t, r, top) for t, r in zip(claimed, ranks, strict=True)]


PEAKED = [0.5, 0.2, 0.1, 0.06, 0.04, 0.03, 0.02, 0.01]  # top-8 mass 0.96
FLAT = [0.001] * 8  # top-8 mass 0.008: a random model


def test_sampled_tokens_among_the_likely_ones_are_genuine() -> None:
    claimed = list(range(20))
    ranks = [1, 3, 2, 1, 9, 1, 5, 2, 1, 1, 4, 1, 2, 8, 1, 1, 3, 1, 30, 1]  # two outside the top 8
    verdict = judge(claimed, sampled_logprobs(claimed, ranks, PEAKED), POLICY, temperature=0.9)
    assert verdict.genuine
    assert (verdict.off, verdict.judged) == (2, 20)


def test_sampled_tokens_the_model_finds_unlikely_are_caught() -> None:
    claimed = list(range(20))
    ranks = [40 + i for i in range(20)]
    verdict = judge(claimed, sampled_logprobs(claimed, ranks, PEAKED), POLICY, temperature=1.0)
    assert not verdict.genuine
    assert verdict.off == 20
    assert "outside the model's top 8" in verdict.detail


def test_a_flat_distribution_accuses_nobody() -> None:
    """Where every token is about as likely as any other, nothing is implausible."""
    claimed = list(range(20))
    ranks = [40 + i for i in range(20)]
    verdict = judge(claimed, sampled_logprobs(claimed, ranks, FLAT), POLICY, temperature=1.0)
    assert verdict.genuine


def test_the_tail_bound_is_never_below_the_exact_binomial_tail() -> None:
    rng = random.Random(3)
    for _ in range(300):
        n, q = rng.randint(1, 60), rng.uniform(0.001, 0.6)
        observed = rng.randint(0, n)
        exact = sum(math.comb(n, k) * q**k * (1 - q) ** (n - k) for k in range(observed, n + 1))
        assert tail_bound(n * q, observed) >= exact * (1 - 1e-9)


def test_honest_sampling_from_a_peaked_distribution_is_not_accused() -> None:
    """Simulated honest sampling at t=1 (the flattest allowed): 2,000 outputs, none accused."""
    rng = random.Random(11)
    for _ in range(2000):
        claimed = list(range(24))
        ranks = []
        for _token in claimed:
            draw, rank = rng.random(), 9 + rng.randrange(100)
            for i, p in enumerate(PEAKED):
                draw -= p
                if draw < 0:
                    rank = i + 1
                    break
            ranks.append(rank)
        logprobs = sampled_logprobs(claimed, ranks, PEAKED)
        assert judge(claimed, logprobs, POLICY, temperature=1.0).genuine
