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
    out.choices[0] = ChoiceOutput(text=text, token_ids=ids)
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
