"""API keys: only a hash of each secret is stored."""

from __future__ import annotations

import hashlib
import secrets

from sqlmodel import Session, col, select

from coordinator.store.models import ApiKey

KEY_PREFIX = "sk-agora-"


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(
    session: Session, client: str, rpm: int | None = None, tpm: int | None = None
) -> tuple[str, ApiKey]:
    """Create a key for `client`; return the secret (shown once, never stored) and its row."""
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(
        key_hash=hash_key(secret), prefix=secret[:16], client=client, rpm_limit=rpm, tpm_limit=tpm
    )
    session.add(row)
    session.commit()
    session.refresh(row)
    return secret, row


def find_active(session: Session, secret: str) -> ApiKey | None:
    query = select(ApiKey).where(
        ApiKey.key_hash == hash_key(secret), col(ApiKey.revoked).is_(False)
    )
    return session.exec(query).first()


def list_keys(session: Session, client: str | None = None) -> list[ApiKey]:
    query = select(ApiKey).order_by(col(ApiKey.id))
    if client is not None:
        query = query.where(ApiKey.client == client)
    return list(session.exec(query))


def revoke(session: Session, key_id: int) -> ApiKey | None:
    row = session.get(ApiKey, key_id)
    if row is not None:
        row.revoked = True
        session.add(row)
        session.commit()
        session.refresh(row)
    return row
