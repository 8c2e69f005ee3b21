"""One Batch API line run through the request path exactly as its endpoint's route runs a
request (the same body checks, the same request path), as a batch request: the workers'
batch prices, the cheapest eligible worker first, no wait in the online queue."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from coordinator.api.deps import validated
from coordinator.api.schemas import ChatCompletionBody, CompletionBody, EmbeddingBody
from coordinator.errors import (
    CoordinatorError,
    InsufficientCredit,
    InvalidRequest,
    NoCapacity,
    error_body,
)
from coordinator.observability import request_id_var
from coordinator.services.accounts import Principal
from coordinator.services.batches.runner import LineResult, RunLine
from coordinator.services.request_path.path import RequestPath
from coordinator.services.request_path.request import CompletionRequest
from protocol.completions import CHAT, COMPLETIONS, EMBEDDINGS

_SCHEMAS: dict[str, tuple[str, type[ChatCompletionBody | CompletionBody | EmbeddingBody]]] = {
    "/v1/chat/completions": (CHAT, ChatCompletionBody),
    "/v1/completions": (COMPLETIONS, CompletionBody),
    "/v1/embeddings": (EMBEDDINGS, EmbeddingBody),
}


def line_request(url: str, body: dict[str, Any]) -> CompletionRequest:
    """A line's body as the request path's request (a 400 when its endpoint would refuse it)."""
    endpoint, schema = _SCHEMAS[url]
    parsed = validated(schema, body)
    prefs = parsed.provider.to_preferences()
    if prefs.sort is None:  # the cheapest eligible worker first, unless the line says otherwise
        prefs = dataclasses.replace(prefs, sort="price")
    if isinstance(parsed, EmbeddingBody):
        return CompletionRequest(endpoint=endpoint, model=parsed.model, body=body, stream=False,
                                 include_usage=False, max_tokens=None, prefs=prefs,
                                 fallbacks=tuple(parsed.models), batch=True)  # fmt: skip
    if parsed.stream:
        raise InvalidRequest("A batch request cannot stream; drop `stream`.", param="stream")
    return CompletionRequest(
        endpoint=endpoint, model=parsed.model, body=body, stream=False, include_usage=False,
        max_tokens=parsed.max_output_tokens, prefs=prefs, fallbacks=tuple(parsed.models),
        wants_token_ids=bool(parsed.return_token_ids), batch=True,
    )  # fmt: skip


def line_runner(path: RequestPath) -> RunLine:
    """The BatchRunner's way to run a line (wired in the composition root)."""

    async def run_line(
        principal: Principal, url: str, body: dict[str, Any], request_id: str,
        dispatched: Callable[[], None],
    ) -> LineResult:  # fmt: skip
        token = request_id_var.set(request_id)
        try:
            try:
                request = dataclasses.replace(line_request(url, body), on_dispatch=dispatched)
                fulfilment = await path.begin(principal, request)
            finally:
                dispatched()  # (already, unless it never reached a worker)
            answer = await fulfilment.whole()
            # the line counts as done once its charge is posted: a crash before that runs it
            # again (its request id was not billed), never leaves it answered and unbilled
            await fulfilment.posted.wait()
            usage = answer.get("usage") or {}
            prompt = int(usage.get("prompt_tokens") or 0)
            completion = int(usage.get("completion_tokens") or 0)
            return LineResult(200, answer, prompt_tokens=prompt, completion_tokens=completion)
        except NoCapacity as exc:
            return LineResult(exc.status, error_body(exc), retry=True)
        except InsufficientCredit as exc:
            return LineResult(exc.status, error_body(exc), out_of_credit=True)
        except CoordinatorError as exc:
            return LineResult(exc.status, error_body(exc))
        finally:
            request_id_var.reset(token)

    return run_line
