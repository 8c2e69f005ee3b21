"""Metering by the network: the coordinator recounts each job's tokens with the model's own
tokenizer and bills min(worker's claim, recount).

Tokenizers are pinned by the operator (a local directory per model, fingerprinted by the SHA-256
of its files and shown in /v1/models), never taken from the worker being metered. The recount of
completion tokens is exact for an honest worker: the token ids it streamed must decode to the
text the client got, and then their number is the count; ids that do not match the text are
replaced by a re-encoding of the text (and a claim above it is evidence). An engine that gives
no ids leaves only the text, whose re-encoding is not the count the engine generated (BPE
merges across token boundaries, usually fewer): then nobody is accused, and the claim is
billed up to a generous bound of that re-encoding (twice it, plus a few), so an honest engine
without ids is not cut and a worker that drops the ids it was asked for cannot inflate.
Prompts are re-rendered with the chat template and encoded; a continuation's prompt is token
ids the coordinator built itself.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from protocol.completions import CHAT, EMBEDDINGS, Output

log = logging.getLogger("agora.coordinator.metering")
_REPLACEMENT = "\ufffd"
_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
          "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt")  # fmt: skip


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer the recount uses."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class Count:
    prompt_tokens: int
    completion_tokens: int
    # False when the engine streamed no token ids for some output: its text was re-encoded,
    # which can come out shorter than what the engine generated (BPE merges across token
    # boundaries), so that count may neither be billed nor held against the worker
    exact_completion: bool = True


def noise_allowance(count: int) -> int:
    """How far a claim may exceed the recount before it is recorded against the worker:
    re-encoding text (tool calls, ids that did not match) may merge a few tokens."""
    return 2 + count // 50


def fingerprint(directory: Path) -> str:
    digest = hashlib.sha256()
    for name in _FILES:
        path = directory / name
        if path.exists():
            digest.update(name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


class Tokenizers:
    """The operator's pinned tokenizers, loaded on first use (transformers is a heavy import)."""

    def __init__(self, paths: Mapping[str, Path]) -> None:
        self._paths = dict(paths)
        self._loaded: dict[str, Tokenizer] = {}
        self._lock = threading.Lock()
        self.fingerprints = {model: fingerprint(path) for model, path in self._paths.items()}

    def covers(self, model: str) -> bool:
        return model in self._paths

    def for_model(self, model: str) -> Tokenizer | None:
        path = self._paths.get(model)
        if path is None:
            return None
        with self._lock:
            if model not in self._loaded:
                from transformers import AutoTokenizer

                loaded: Tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
                self._loaded[model] = loaded
            return self._loaded[model]


def recount_inputs(tokenizer: Tokenizer, inputs: Any) -> int:
    """An embeddings request's input tokens: each input encoded as the engine does (special
    tokens included), token-id inputs counted as given."""
    if isinstance(inputs, str) or (isinstance(inputs, list) and inputs
                                   and all(isinstance(t, int) for t in inputs)):  # fmt: skip
        inputs = [inputs]
    return sum(len(one) if isinstance(one, list) else len(tokenizer.encode(str(one)))
               for one in inputs or ())  # fmt: skip


def recount_prompt(tokenizer: Tokenizer, endpoint: str, prompt: Any, tools: Any = None) -> int:
    if endpoint == EMBEDDINGS:
        return recount_inputs(tokenizer, prompt)
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return len(prompt)  # token ids (a continuation the coordinator built)
    if endpoint == CHAT:
        options: dict[str, Any] = {"add_generation_prompt": True, "tokenize": True}
        if tools:
            options["tools"] = tools
        rendered = tokenizer.apply_chat_template(prompt, **options)
        ids = rendered["input_ids"] if isinstance(rendered, Mapping) else rendered
        return len(ids)
    if isinstance(prompt, str):
        return len(tokenizer.encode(prompt))
    return len(tokenizer.encode(str(prompt)))


def ids_match_text(tokenizer: Tokenizer, ids: list[int], text: str) -> bool:
    """The ids decode to the text. An engine holds back the bytes of an unfinished character,
    so a sequence cut mid-character decodes to up to 3 replacement characters more."""
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    if decoded == text:
        return True
    tail = len(decoded) - len(decoded.rstrip(_REPLACEMENT))
    return 0 < tail <= 3 and decoded[:-tail] == text.rstrip(_REPLACEMENT)


def recount_completion(tokenizer: Tokenizer, observed: Output) -> tuple[int, bool]:
    """(completion tokens, exact). Ids that decode to the delivered text are the count; ids
    that do not are not believed (the text is re-encoded, and a claim above that is evidence:
    the worker streamed ids for text it never sent); no ids at all gives an inexact count."""
    total, exact = 0, True
    for choice in observed.choices.values():
        ids = choice.token_ids
        if ids and ids_match_text(tokenizer, ids, choice.text):
            total += len(ids)
        elif choice.text:
            total += len(tokenizer.encode(choice.text, add_special_tokens=False))
            exact = exact and bool(ids)
    return total, exact


def recount(
    tokenizer: Tokenizer | None, endpoint: str, prompt: Any, tools: Any, observed: Output
) -> Count | None:
    """The network's own count of a job's tokens (None without a pinned tokenizer)."""
    if tokenizer is None:
        return None
    try:
        prompt_tokens = recount_prompt(tokenizer, endpoint, prompt, tools)
        if endpoint == EMBEDDINGS:  # vectors, no generated tokens
            return Count(prompt_tokens, 0)
        return Count(prompt_tokens, *recount_completion(tokenizer, observed))
    except Exception:  # a template that cannot render this request: keep the stream's count
        log.exception("could not recount a %s job", endpoint)
        return None


def within_bound(counted: Count | None, claim: Count, bound: int | None) -> Count | None:
    """The count to bill against, never above the job's completion bound (max_tokens for every
    choice it ran): no client pays for more than it asked for, whatever was claimed or sent."""
    over_bound = claim.completion_tokens > (bound or 0) or (
        counted is not None and counted.completion_tokens > (bound or 0)
    )
    if bound is None or not over_bound:
        return counted
    if counted is None or not counted.exact_completion:
        return Count(counted.prompt_tokens if counted else claim.prompt_tokens, bound)
    return Count(counted.prompt_tokens, min(counted.completion_tokens, bound))


def inexact_allowance(count: int) -> int:
    """How far above a re-encoding of the text (no ids from the engine) a claim is billed:
    merges make the re-encoding shorter than what was generated, rarely by half."""
    return count + 4


def billed(claim: Count, counted: Count | None) -> tuple[Count, bool]:
    """What is billed, and whether the claim exceeds the recount beyond tokenizer noise. An
    inexact completion recount (no ids from the engine) accuses nobody and caps the claim
    only at a generous bound of the re-encoding."""
    if counted is None:
        return claim, False
    if counted.exact_completion:
        completion = counted.completion_tokens
    else:
        reencoded = counted.completion_tokens
        completion = min(claim.completion_tokens, reencoded + inexact_allowance(reencoded))
    bill = Count(
        min(claim.prompt_tokens, counted.prompt_tokens),
        min(claim.completion_tokens, completion),
    )
    over = claim.prompt_tokens - counted.prompt_tokens > noise_allowance(counted.prompt_tokens)
    if counted.exact_completion:
        over |= claim.completion_tokens - completion > noise_allowance(completion)
    return bill, over
