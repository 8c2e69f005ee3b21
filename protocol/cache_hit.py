"""The receipt of a request answered from the coordinator's response cache: no worker ran it,
so there is no worker signature; the coordinator signs what it replayed (which earlier
request's answer, its token counts) and what it charged. `agora receipt verify` checks it."""

from __future__ import annotations

import base64
from typing import Any

from protocol.canonical import canonical_json
from protocol.errors import MalformedMessage
from protocol.identity import Identity, public_key_from_node_id, verify_signature

_CACHE_HIT_DOMAIN = b"agora-cache-hit-v1\0"


def cache_hit_document(
    identity: Identity,
    *,
    request_id: str,
    source_request_id: str,
    model: str,
    prompt_tokens: int,
    completion_tokens: int,
    amount_total: int,
) -> dict[str, Any]:
    statement = {
        "request_id": request_id,
        "cache_hit": True,
        "source_request_id": source_request_id,
        "model": model,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "amount_total": amount_total,  # micro-units; no provider earned any of it
        "coordinator_id": identity.node_id,
    }
    signature = identity.sign(_CACHE_HIT_DOMAIN + canonical_json(statement))
    return {
        "object": "receipt",
        **statement,
        "statement": statement,
        "signature": base64.b64encode(signature).decode(),
    }


def verify_cache_hit(document: dict[str, Any]) -> dict[str, Any]:
    """Check the coordinator's signature and that every shown field is the signed one; return
    the signed statement. Raises a ProtocolError on any difference."""
    try:
        statement = document["statement"]
        signature = base64.b64decode(document["signature"], validate=True)
        key = public_key_from_node_id(str(statement["coordinator_id"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise MalformedMessage(f"not a cache-hit receipt: {exc}") from exc
    verify_signature(key, signature, _CACHE_HIT_DOMAIN + canonical_json(statement))
    shown = {k: document.get(k) for k in statement}
    if shown != statement or statement.get("cache_hit") is not True:
        differing = sorted(k for k in statement if shown.get(k) != statement[k])
        raise MalformedMessage(f"shown fields differ from the signed ones: {differing}")
    return dict(statement)
