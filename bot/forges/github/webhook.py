"""GitHub webhooks without I/O: check the signature, turn a payload into a domain event.

Everything here is a pure function over bytes and dicts, so the HTTP layer stays
thin and every rule is tested without a network.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from bot.forges.webhook import (
    MAX_URL,
    InvalidSignature,
    Parser,
    branch,
    login,
    parse_with,
    positive,
    repo_path,
    sha,
    text,
)
from bot.models import CommentEvent, Event, PullRequest, PullRequestEvent, Repo, ReviewEvent

FORGE = "github"

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


def parse_event(event_name: str, payload: dict[str, Any]) -> Event | None:
    """The domain event a webhook stands for, or None if the bot ignores it."""
    return parse_with(_PARSERS, event_name, payload)


def _repo(payload: dict[str, Any]) -> Repo:
    repo = payload["repository"]
    installation = payload.get("installation") or {}
    return Repo(
        forge=FORGE,
        full_name=repo_path(repo["full_name"]),
        clone_url=text(repo["clone_url"], MAX_URL),
        default_branch=branch(repo["default_branch"]),
        installation_id=positive(installation["id"]) if "id" in installation else None,
        # Pins the name to one repository: a deleted repository's name can be taken by another.
        id=positive(repo["id"]) if "id" in repo else None,
    )


def _pull(payload: dict[str, Any], pr: dict[str, Any]) -> PullRequest:
    repo = _repo(payload)
    head_repo = pr["head"].get("repo") or {}
    return PullRequest(
        repo=repo,
        number=positive(pr["number"]),
        head_sha=sha(pr["head"]["sha"]),
        head_ref=branch(pr["head"]["ref"]),
        base_ref=branch(pr["base"]["ref"]),
        author=login(pr["user"]["login"]),
        # A deleted fork has no head repo: treat it as a fork, never as ours.
        is_fork=head_repo.get("full_name") != repo.full_name,
        state="closed" if pr["state"] == "closed" else "open",
        merged=bool(pr.get("merged")),
        url=text(pr.get("html_url") or "", MAX_URL),
    )


_PULL_ACTIONS = {"opened": "opened", "synchronize": "updated", "reopened": "reopened",
                 "closed": "closed"}


def _pull_request(payload: dict[str, Any]) -> PullRequestEvent | None:
    action = _PULL_ACTIONS.get(payload.get("action", ""))
    if action is None:
        return None
    return PullRequestEvent(
        action=action,  # type: ignore[arg-type]
        pull=_pull(payload, payload["pull_request"]),
        sender=login(payload["sender"]["login"]),
    )


def _issue_comment(payload: dict[str, Any]) -> CommentEvent | None:
    # Edited and deleted comments never run anything; comments on issues are not ours.
    if payload.get("action") != "created" or not payload["issue"].get("pull_request"):
        return None
    return CommentEvent(
        repo=_repo(payload),
        pull_number=positive(payload["issue"]["number"]),
        comment_id=positive(payload["comment"]["id"]),
        author=login(payload["comment"]["user"]["login"]),
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
        reviewer=login(review["user"]["login"]),
        state=text(review["state"], 64).lower(),
    )


_PARSERS: dict[str, Parser] = {
    "pull_request": _pull_request,
    "issue_comment": _issue_comment,
    "pull_request_review": _pull_request_review,
}
