"""API keys: only a hash of each secret is stored."""

from __future__ import annotations

import hashlib
import secrets

from sqlmodel import Session, col, select

from coordinator.store.models import ApiKey

KEY_PREFIX = "sk-agora-"


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(session: Session, client: str) -> str:
    """Create a key for `client` and return the secret (shown once, never stored)."""
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(key_hash=hash_key(secret), prefix=secret[:16], client=client))
    session.commit()
    return secret


def client_for_key(session: Session, secret: str) -> str | None:
    query = select(ApiKey).where(
        ApiKey.key_hash == hash_key(secret), col(ApiKey.revoked).is_(False)
    )
    row = session.exec(query).first()
    return row.client if row else None
