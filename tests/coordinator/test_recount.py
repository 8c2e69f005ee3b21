"""The recount itself, with the tiny model's real tokenizer (no engine)."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.services.metering import Count, Tokenizer, Tokenizers, billed, recount
from protocol.completions import CHAT, COMPLETIONS, ChoiceOutput, Output


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Tokenizer:
    found = Tokenizers({"tiny": tiny_model}).for_model("tiny")
    assert found is not None
    return found


def output(text: str, ids: list[int]) -> Output:
    out = Output()
    out.choices[0] = ChoiceOutput.of(text, ids)
    return out


def test_ids_that_decode_to_the_delivered_text_are_counted_exactly(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("the keeper lit the lamp at dusk", add_special_tokens=False)
    text = tokenizer.decode(ids, skip_special_tokens=True)
    counted = recount(tokenizer, COMPLETIONS, "Once", None, output(text, ids))
    assert counted is not None
    assert counted.completion_tokens == len(ids)
    assert counted.prompt_tokens == len(tokenizer.encode("Once"))


def test_padded_ids_that_do_not_match_the_text_are_not_believed(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("the keeper lit the lamp", add_special_tokens=False)
    text = tokenizer.decode(ids, skip_special_tokens=True)
    padded = ids + ids[:5]  # a worker streaming extra ids it never delivered as text
    counted = recount(tokenizer, COMPLETIONS, "Once", None, output(text, padded))
    assert counted is not None
    assert counted.completion_tokens == len(tokenizer.encode(text, add_special_tokens=False))


def test_chat_prompts_are_counted_through_the_chat_template(tokenizer: Tokenizer) -> None:
    messages = [{"role": "user", "content": "Hello there"}]
    counted = recount(tokenizer, CHAT, messages, None, output("", []))
    assert counted is not None
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = rendered if isinstance(rendered, list) else rendered["input_ids"]
    assert counted.prompt_tokens == len(ids) > len(tokenizer.encode("Hello there"))
    assert recount(tokenizer, COMPLETIONS, [1, 2, 3], None, output("", [])) == Count(3, 0)


def test_billing_takes_the_smaller_count_and_flags_only_beyond_noise() -> None:
    assert billed(Count(10, 100), Count(10, 100)) == (Count(10, 100), False)
    assert billed(Count(10, 103), Count(10, 100)) == (Count(10, 100), False)  # within noise
    assert billed(Count(10, 110), Count(10, 100)) == (Count(10, 100), True)
    assert billed(Count(30, 100), Count(10, 100)) == (Count(10, 100), True)
    assert billed(Count(8, 90), Count(10, 100)) == (Count(8, 90), False)  # under-claims stand
    assert billed(Count(8, 90), None) == (Count(8, 90), False)  # no tokenizer pinned


def test_a_character_cut_off_at_the_end_still_counts_its_byte_tokens(
    tokenizer: Tokenizer,
) -> None:
    """An engine holds back the bytes of an unfinished character: the text lacks them, the ids
    do not (seen with sampled output: 11 counted instead of 12 before this was handled)."""
    byte_token = next(i for i in range(4096) if tokenizer.decode([i]) == "\ufffd")
    ids = [*tokenizer.encode("the keeper", add_special_tokens=False), byte_token]
    text = tokenizer.decode(ids[:-1], skip_special_tokens=True)
    counted = recount(tokenizer, COMPLETIONS, "Once", None, output(text, ids))
    assert counted is not None
    assert counted.completion_tokens == len(ids)
    four = [
        *ids,
        byte_token,
        byte_token,
        byte_token,
    ]  # more held-back bytes than any character has: not believed
    counted = recount(tokenizer, COMPLETIONS, "Once", None, output(text, four))
    assert counted is not None
    assert counted.completion_tokens == len(tokenizer.encode(text, add_special_tokens=False))


def test_without_token_ids_nobody_is_accused_and_no_claim_inflates(tokenizer: Tokenizer) -> None:
    """An engine that streams no ids leaves only the text, whose re-encoding can come out
    shorter than what was generated (merges across token boundaries): that count is marked
    inexact, an honest claim near it is billed in full and nobody is accused, while a worker
    that drops the ids it was asked for cannot bill much beyond the text it delivered."""
    text = "#" * 40 + " 1234567890" * 4
    counted = recount(tokenizer, COMPLETIONS, "Once", None, output(text, []))
    assert counted is not None
    assert not counted.exact_completion
    honest = Count(counted.prompt_tokens, counted.completion_tokens + 20)  # merges undercounted
    assert billed(honest, counted) == (honest, False)
    inflated = Count(counted.prompt_tokens, 10 * counted.completion_tokens)
    bill, accused = billed(inflated, counted)
    assert bill.completion_tokens == 2 * counted.completion_tokens + 4
    assert not accused
    ids = tokenizer.encode(text, add_special_tokens=False)
    forged = recount(tokenizer, COMPLETIONS, "Once", None, output(text, [i + 1 for i in ids]))
    assert forged is not None
    assert forged.exact_completion  # ids that do not decode to the text are evidence
    assert billed(Count(forged.prompt_tokens, len(ids) + 20), forged)[1]
