"""What both forges' webhook intakes share: the errors, the body decoder, typed payload fields.

Pure functions over bytes and dicts; the HTTP layer turns the errors into 401 and 400.
"""

from __future__ import annotations

import re
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
    except KeyError as exc:
        raise MalformedPayload(f"{event_name} payload lacks {exc}") from None
    except (TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise MalformedPayload(f"{event_name} payload: {exc}") from None


MAX_ID = 2**63 - 1  # ids and numbers must fit the store's INTEGER


MAX_TEXT = 1_000_000  # characters: GitLab's longest note; GitHub's comments stop at 65,536
MAX_NAME = 255  # a branch, a URL path segment, a username
MAX_URL = 2048
# owner/name on GitHub; group/subgroup/.../project on GitLab (at most 20 levels of groups).
REPO_PATH = re.compile(r"[A-Za-z0-9_.-]{1,255}(?:/[A-Za-z0-9_.-]{1,255}){1,20}")
LOGIN = re.compile(r"[A-Za-z0-9_.-]{1,255}(?:\[bot\])?")  # GitHub logins, Apps' bots, GitLab usernames
SHA = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")  # SHA-1 or SHA-256 commit ids


def text(value: Any, limit: int = MAX_TEXT) -> str:
    """A payload string of at most `limit` characters; TypeError for anything else or for
    text that is not valid UTF-8."""
    if not isinstance(value, str):
        raise TypeError(f"a string, got {type(value).__name__}")
    if len(value) > limit:
        raise ValueError(f"a string of at most {limit} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise TypeError("a string with a lone surrogate") from None
    return value


def matching(value: Any, pattern: re.Pattern[str], what: str) -> str:
    """A payload string that is wholly `pattern` (say a repository path: it chooses API URLs)."""
    if not isinstance(value, str) or len(value) > MAX_URL or not pattern.fullmatch(value) \
            or ".." in value.split("/"):
        raise ValueError(f"not {what}")
    return value


def repo_path(value: Any) -> str:
    """A repository's full name: `owner/name`, or a GitLab path with its groups."""
    return matching(value, REPO_PATH, "a repository path")


def login(value: Any) -> str:
    """A user's login or username."""
    return matching(value, LOGIN, "a login")


def sha(value: Any) -> str:
    """A commit id: 40 or 64 lower-case hex digits."""
    return matching(value, SHA, "a commit SHA")


def branch(value: Any) -> str:
    """A branch name: short, and no control characters."""
    name = text(value, MAX_NAME)
    if not name or any(ord(c) < 0x20 or c == "\x7f" for c in name):
        raise ValueError("not a branch name")
    return name


def integer(value: Any) -> int:
    """A payload id or number; TypeError for anything but an int in 0..2**63-1."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"an integer, got {type(value).__name__}")
    if not 0 <= value <= MAX_ID:
        raise TypeError("an integer out of range")
    return value


def positive(value: Any) -> int:
    """A pull request number, a comment id: an integer in 1..2**63-1."""
    if integer(value) == 0:
        raise ValueError("a positive integer")
    return value
