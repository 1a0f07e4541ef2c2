"""The admin token: who may read the audit log and manage runner tokens."""

from __future__ import annotations

import hmac

from starlette.requests import Request

from bot.config import Secret


def is_admin(request: Request, admin_token: Secret) -> bool:
    """Whether the request carries the admin token (never, when none is configured)."""
    expected = admin_token.reveal()
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return bool(expected) and scheme.lower() == "bearer" and hmac.compare_digest(token.encode(), expected.encode())
