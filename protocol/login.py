"""What a node signs to sign in to the provider dashboard: a domain tag, then the coordinator's
one-time challenge (the tag keeps this signature from being replayed as any other message)."""

from __future__ import annotations

LOGIN_DOMAIN = b"agora-provider-login-v1\n"


def login_message(challenge: str) -> bytes:
    return LOGIN_DOMAIN + challenge.encode()
