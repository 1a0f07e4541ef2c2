"""What both forges' webhook intakes share: the errors, the body decoder, typed payload fields.

Pure functions over bytes and dicts; the HTTP layer turns the errors into 401 and 400.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import orjson

from bot.models import Event

Parser = Callable[[dict[str, Any]], Event | None]


class InvalidSignature(Exception):
    """The delivery's signature or secret token is missing or does not match."""


class MalformedPayload(Exception):
    """The body is not a JSON object of the shape the event promises."""


def load_body(body: bytes) -> dict[str, Any]:
    """Decode a webhook body; raise MalformedPayload unless it is a JSON object."""
    try:
        payload = orjson.loads(body)  # strict: UTF-8 only, no NaN, integers within 64 bits
    except (orjson.JSONDecodeError, RecursionError) as exc:
        raise MalformedPayload(f"body is not JSON: {type(exc).__name__}") from None
    if not isinstance(payload, dict):
        raise MalformedPayload("body is not a JSON object")
    return payload


def parse_with(parsers: Mapping[str, Parser], event_name: str, payload: dict[str, Any]) -> Event | None:
    """Run the event's parser (None for an event not listed); a payload it cannot read is a MalformedPayload.    """
    parser = parsers.get(event_name)
    if parser is None:
        return None
    try:
        return parser(payload)
    except RecursionError:
        raise MalformedPayload(f"{event_name} payload is nested too deeply") from None
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise MalformedPayload(f"{event_name} payload lacks {exc}") from None


MAX_ID = 2**63 - 1  # ids and numbers must fit the store's INTEGER


def text(value: Any) -> str:
    """A payload string; TypeError for anything else or for text that is not valid UTF-8."""
    if not isinstance(value, str):
        raise TypeError(f"a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise TypeError("a string with a lone surrogate") from None
    return value


def integer(value: Any) -> int:
    """A payload id or number; TypeError for anything but an int in 0..2**63-1."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"an integer, got {type(value).__name__}")
    if not 0 <= value <= MAX_ID:
        raise TypeError("an integer out of range")
    return value
