"""Authentication of CI callers of the trigger API: OIDC tokens and HMAC-signed requests."""

from __future__ import annotations

import hashlib
import hmac

HMAC_SCHEME = "v1"


def hmac_signature(key: bytes, method: str, path: str, timestamp: str, nonce: str, body: bytes) -> str:
    """The `X-Deploybot-Signature` value: HMAC-SHA256 over method, path, timestamp, nonce and body."""
    message = "\n".join(
        [method.upper(), path, timestamp, nonce, hashlib.sha256(body).hexdigest()]
    ).encode()
    return f"{HMAC_SCHEME}=" + hmac.new(key, message, hashlib.sha256).hexdigest()
