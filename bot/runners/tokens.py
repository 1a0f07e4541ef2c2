"""Runner tokens: shown once when made, stored only as their SHA-256, one pool each."""

from __future__ import annotations

import hashlib
import secrets

PREFIX = "dbr_"  # so a leaked token is recognisable (secret scanners, logs)


def new_token() -> str:
    """A fresh runner token (256 random bits)."""
    return PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    """What the store keeps of a token."""
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()
