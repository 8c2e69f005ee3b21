"""The spot-check judgement as a pure function over vLLM-shaped prompt logprobs."""

from __future__ import annotations

from typing import Any

from coordinator.services.spot_judgement import CheckPolicy, check_body, eligible, judge
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


def test_only_single_segment_greedy_jobs_with_ids_are_eligible() -> None:
    out = Output(prompt_token_ids=[1, 2, 3])
    out.choices[0] = ChoiceOutput(text="abc", token_ids=[4, 5])
    assert eligible({"temperature": 0}, out, 1)
    assert not eligible({"temperature": 0.7}, out, 1)
    assert not eligible({}, out, 1)  # the default temperature samples
    assert not eligible({"temperature": 0}, out, 2)  # a continuation
    assert not eligible({"temperature": 0, "n": 2}, out, 1)
    assert not eligible({"temperature": 0, "tools": [{"type": "function"}]}, out, 1)
    assert check_body([1, 2, 3], [4, 5])["prompt"] == [1, 2, 3, 4, 5]
