"""GitHub webhooks without I/O: check the signature, turn a payload into a domain event.

Everything here is a pure function over bytes and dicts, so the HTTP layer stays
thin and every rule is tested without a network.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from bot.models import CommentEvent, Event, PullRequest, PullRequestEvent, Repo, ReviewEvent

FORGE = "github"

Parser = Callable[[dict[str, Any]], Event | None]


class InvalidSignature(Exception):
    """The X-Hub-Signature-256 header is missing or does not match the body."""


class MalformedPayload(Exception):
    """The body is not a JSON object of the shape the event promises."""


def verify_signature(body: bytes, signature_header: str | None, secret: bytes) -> None:
    """Raise InvalidSignature unless the header is the HMAC-SHA256 of the raw body."""
    if not signature_header or not signature_header.startswith("sha256="):
        raise InvalidSignature("missing X-Hub-Signature-256")
    expected = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected.encode(), signature_header.encode()):
        raise InvalidSignature("X-Hub-Signature-256 does not match the body")


def sign(body: bytes, secret: bytes) -> str:
    """The X-Hub-Signature-256 header value GitHub would send for this body."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def load_body(body: bytes) -> dict[str, Any]:
    """Decode a webhook body; raise MalformedPayload unless it is a JSON object."""
    try:
        payload = orjson.loads(body)  # strict: UTF-8 only, no NaN, integers within 64 bits
    except (orjson.JSONDecodeError, RecursionError) as exc:
        raise MalformedPayload(f"body is not JSON: {type(exc).__name__}") from None
    if not isinstance(payload, dict):
        raise MalformedPayload("body is not a JSON object")
    return payload


def parse_event(event_name: str, payload: dict[str, Any]) -> Event | None:
    """The domain event a webhook stands for, or None if the bot ignores it."""
    return parse_with(_PARSERS, event_name, payload)


def parse_with(parsers: Mapping[str, Parser], event_name: str, payload: dict[str, Any]) -> Event | None:
    """Run the event's parser (None for an event not listed); a payload it cannot read is a MalformedPayload.

    The one dispatch both forges' `parse_event` use.
    """
    parser = parsers.get(event_name)
    if parser is None:
        return None
    try:
        return parser(payload)
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise MalformedPayload(f"{event_name} payload lacks {exc}") from None


def _repo(payload: dict[str, Any]) -> Repo:
    repo = payload["repository"]
    installation = payload.get("installation") or {}
    return Repo(
        forge=FORGE,
        full_name=text(repo["full_name"]),
        clone_url=text(repo["clone_url"]),
        default_branch=text(repo["default_branch"]),
        installation_id=integer(installation["id"]) if "id" in installation else None,
        # Pins the name to one repository: a deleted repository's name can be taken by another.
        id=integer(repo["id"]) if "id" in repo else None,
    )


def _pull(payload: dict[str, Any], pr: dict[str, Any]) -> PullRequest:
    repo = _repo(payload)
    head_repo = pr["head"].get("repo") or {}
    return PullRequest(
        repo=repo,
        number=integer(pr["number"]),
        head_sha=text(pr["head"]["sha"]),
        head_ref=text(pr["head"]["ref"]),
        base_ref=text(pr["base"]["ref"]),
        author=text(pr["user"]["login"]),
        # A deleted fork has no head repo: treat it as a fork, never as ours.
        is_fork=head_repo.get("full_name") != repo.full_name,
        state="closed" if pr["state"] == "closed" else "open",
        merged=bool(pr.get("merged")),
        url=text(pr.get("html_url") or ""),
    )


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


_PULL_ACTIONS = {"opened": "opened", "synchronize": "updated", "reopened": "reopened",
                 "closed": "closed"}


def _pull_request(payload: dict[str, Any]) -> PullRequestEvent | None:
    action = _PULL_ACTIONS.get(payload.get("action", ""))
    if action is None:
        return None
    return PullRequestEvent(
        action=action,  # type: ignore[arg-type]
        pull=_pull(payload, payload["pull_request"]),
        sender=text(payload["sender"]["login"]),
    )


def _issue_comment(payload: dict[str, Any]) -> CommentEvent | None:
    # Edited and deleted comments never run anything; comments on issues are not ours.
    if payload.get("action") != "created" or not payload["issue"].get("pull_request"):
        return None
    return CommentEvent(
        repo=_repo(payload),
        pull_number=integer(payload["issue"]["number"]),
        comment_id=integer(payload["comment"]["id"]),
        author=text(payload["comment"]["user"]["login"]),
        body=text(payload["comment"].get("body") or ""),
    )


def _pull_request_review(payload: dict[str, Any]) -> ReviewEvent | None:
    action = payload.get("action")
    if action not in ("submitted", "dismissed"):
        return None
    review = payload["review"]
    return ReviewEvent(
        action=action,
        pull=_pull(payload, payload["pull_request"]),
        reviewer=text(review["user"]["login"]),
        state=text(review["state"]).lower(),
    )


_PARSERS: dict[str, Parser] = {
    "pull_request": _pull_request,
    "issue_comment": _issue_comment,
    "pull_request_review": _pull_request_review,
}
