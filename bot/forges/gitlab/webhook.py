"""GitLab webhooks without I/O: check the token or signature, turn a payload into a domain event.

The GitLab twin of `bot.forges.github.webhook`: pure functions over bytes, headers and dicts,
raising the same `InvalidSignature` and `MalformedPayload` so the HTTP layer answers
both forges alike.

Authentication. A GitLab webhook proves where it came from in one of two ways:

- `X-Gitlab-Token`: the hook's secret token, sent as is. `verify_token` compares it
  in constant time (over SHA-256 digests, so not even its length leaks).
- A signing token (GitLab's Standard-Webhooks signing, behind the
  `webhook_signing_token` feature): GitLab sends `webhook-id` (equal to the
  `Idempotency-Key`), `webhook-timestamp` (Unix seconds) and `webhook-signature`
  (space-separated `v1,<base64>` entries), where each signature is
  HMAC-SHA256(key, "{webhook-id}.{webhook-timestamp}.{raw body}") and the key is the
  base64 decoding of the configured token after its `whsec_` prefix. `verify_signing_token`
  accepts a delivery when any `v1` entry matches and the timestamp is within five
  minutes of `now` either way (the Standard Webhooks tolerance), which also bounds
  how long a captured delivery can be replayed.

Delivery ids. `Idempotency-Key` is the one header GitLab keeps across retries and
manual resends (GitLab 17.4+), so it is the de-duplication key. `X-Gitlab-Event-UUID`
is regenerated per webhook execution (and shared by hooks a webhook-triggered API call
causes), and `X-Gitlab-Webhook-UUID` is new on every request; they are fallbacks for
GitLab versions that send no `Idempotency-Key`.

Events, keyed by the `X-Gitlab-Event` header:

- `Merge Request Hook`: `open` → opened, `reopen` → reopened, `update` with
  `object_attributes.oldrev` (new commits) → updated, `close` → closed, `merge` →
  closed and merged, `approved`/`approval` → review submitted (approved),
  `unapproved`/`unapproval` → review dismissed. Other updates (title, labels, …) → None.
- `Note Hook` on a merge request, new notes only (`action` "create", or no `action`
  from GitLab before 16.11) → CommentEvent. Edits, system notes and notes on issues,
  commits or snippets → None.
- Everything else (`Push Hook`, `Pipeline Hook`, …) → None.

The merge request's author. GitLab's merge request payloads carry only
`object_attributes.author_id`, never the author's username. The parser uses the
username of whichever user object in the payload has that id (`user`, `assignees`,
`reviewers`); failing that, for `open` the actor (`user`) opened it and is taken as
the author; otherwise the author is "" (unknown). Handlers that care about the author
(self-approval, four eyes at apply) re-fetch the merge request from the API.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping
from typing import Any

from bot.forges.webhook import (
    MAX_URL,
    InvalidSignature,
    MalformedPayload,
    Parser,
    branch,
    integer,
    load_body,
    login,
    parse_with,
    positive,
    repo_path,
    sha,
    text,
)
from bot.models import CommentEvent, Event, PullRequest, PullRequestEvent, Repo, ReviewEvent

__all__ = [
    "FORGE",
    "MERGE_REQUEST_HOOK",
    "NOTE_HOOK",
    "PUSH_HOOK",
    "SIGNATURE_TOLERANCE",
    "InvalidSignature",
    "MalformedPayload",
    "delivery_id",
    "load_body",
    "parse_event",
    "sign",
    "verify_signing_token",
    "verify_token",
]

FORGE = "gitlab"

MERGE_REQUEST_HOOK = "Merge Request Hook"
NOTE_HOOK = "Note Hook"
PUSH_HOOK = "Push Hook"

SIGNATURE_TOLERANCE = 5 * 60  # seconds either side of now (Standard Webhooks' window)
SIGNING_TOKEN_PREFIX = "whsec_"

# Most stable first: Idempotency-Key survives retries and resends; the UUIDs do not.
DELIVERY_ID_HEADERS = ("idempotency-key", "webhook-id", "x-gitlab-event-uuid", "x-gitlab-webhook-uuid")


def verify_token(header_value: str | None, secret: bytes) -> None:
    """Raise InvalidSignature unless `X-Gitlab-Token` equals the configured secret.

    GitLab sends the token with its line breaks removed, so the secret is compared without them.
    """
    secret = secret.replace(b"\r", b"").replace(b"\n", b"")
    if not secret:
        raise InvalidSignature("no GitLab webhook secret is configured")
    if not header_value:
        raise InvalidSignature("missing X-Gitlab-Token")
    # Digests of equal length: the comparison takes the same time whatever was sent.
    given = hashlib.sha256(header_value.encode()).digest()
    expected = hashlib.sha256(secret).digest()
    if not hmac.compare_digest(given, expected):
        raise InvalidSignature("X-Gitlab-Token does not match")


def sign(body: bytes, webhook_id: str, timestamp: int, signing_token: str) -> str:
    """The `webhook-signature` value GitLab sends for this body (one `v1,<base64>` entry)."""
    message = f"{webhook_id}.{timestamp}.".encode() + body
    digest = hmac.new(_signing_key(signing_token), message, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def verify_signing_token(headers: Mapping[str, str], body: bytes, signing_token: str, now: float) -> None:
    """Raise InvalidSignature unless the Standard-Webhooks signature matches the raw body.

    A `signing_token` that is not `whsec_<base64>` is a configuration error: ValueError.
    """
    key = _signing_key(signing_token)
    lowered = {k.lower(): v for k, v in headers.items()}
    webhook_id = (lowered.get("webhook-id") or "").strip()
    timestamp_text = (lowered.get("webhook-timestamp") or "").strip()
    signatures = (lowered.get("webhook-signature") or "").strip()
    if not webhook_id or not timestamp_text or not signatures:
        raise InvalidSignature("missing webhook-id, webhook-timestamp or webhook-signature")
    if not timestamp_text.isdigit():
        raise InvalidSignature("webhook-timestamp is not Unix seconds")
    timestamp = int(timestamp_text)
    if abs(now - timestamp) > SIGNATURE_TOLERANCE:
        raise InvalidSignature("webhook-timestamp is more than five minutes from now")
    message = f"{webhook_id}.{timestamp_text}.".encode() + body
    expected = base64.b64encode(hmac.new(key, message, hashlib.sha256).digest())
    for entry in signatures.split():
        version, _, value = entry.partition(",")
        if version == "v1" and hmac.compare_digest(expected, value.encode()):
            return
    raise InvalidSignature("webhook-signature does not match the body")


def _signing_key(signing_token: str) -> bytes:
    encoded = signing_token.removeprefix(SIGNING_TOKEN_PREFIX)
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the GitLab signing token must be 'whsec_' followed by base64") from None
    if not key:
        raise ValueError("the GitLab signing token is empty")
    return key


def delivery_id(headers: Mapping[str, str]) -> str | None:
    """The id to de-duplicate a delivery on (see the module docstring), or None."""
    lowered = {k.lower(): v for k, v in headers.items()}
    for name in DELIVERY_ID_HEADERS:
        value = (lowered.get(name) or "").strip()
        if value:
            return value
    return None


def parse_event(event_name: str, payload: dict[str, Any]) -> Event | None:
    """The domain event a webhook stands for, or None if the bot ignores it."""
    return parse_with(_PARSERS, event_name, payload)


def _repo(payload: dict[str, Any]) -> Repo:
    project = payload["project"]
    # Pins the path to one project: a deleted project's path can be taken by another. Note Hooks
    # also carry it at the top level as `project_id`.
    project_id = project["id"] if "id" in project else payload.get("project_id")
    return Repo(
        forge=FORGE,
        full_name=repo_path(project["path_with_namespace"]),
        clone_url=text(project["git_http_url"], MAX_URL),
        default_branch=branch(project["default_branch"]),
        installation_id=None,
        id=positive(project_id) if project_id is not None else None,
    )


def _author(payload: dict[str, Any], attributes: dict[str, Any], action: str) -> str:
    """The merge request author's username, where the payload names it (see module docstring)."""
    author_id = attributes.get("author_id")
    users = [payload.get("user")] + list(payload.get("assignees") or []) + list(payload.get("reviewers") or [])
    for user in users:
        if isinstance(user, dict) and author_id is not None and user.get("id") == author_id:
            return login(user["username"])
    if action == "open":
        return login(payload["user"]["username"])
    return ""


def _pull(payload: dict[str, Any], action: str) -> PullRequest:
    attributes = payload["object_attributes"]
    last_commit = attributes.get("last_commit")  # null when the source branch has no commits left
    state = text(attributes["state"], 64)
    merged = state == "merged" or action == "merge"
    return PullRequest(
        repo=_repo(payload),
        number=positive(attributes["iid"]),
        head_sha=sha(last_commit["id"]) if last_commit is not None else "",
        head_ref=branch(attributes["source_branch"]),
        base_ref=branch(attributes["target_branch"]),
        author=_author(payload, attributes, action),
        is_fork=integer(attributes["source_project_id"]) != integer(attributes["target_project_id"]),
        state="closed" if merged or state == "closed" else "open",
        merged=merged,
        url=text(attributes.get("url") or "", MAX_URL),
    )




def _check_kind(payload: dict[str, Any], kind: str) -> None:
    found = payload.get("object_kind", kind)
    if found != kind:
        # Never the value itself: a payload's value may be nested too deep to print.
        got = repr(found[:64]) if isinstance(found, str) else f"a {type(found).__name__}"
        raise ValueError(f"object_kind {kind!r}, got {got}")


_PULL_ACTIONS = {"open": "opened", "reopen": "reopened", "close": "closed", "merge": "closed"}
_APPROVE_ACTIONS = frozenset({"approved", "approval"})
_UNAPPROVE_ACTIONS = frozenset({"unapproved", "unapproval"})


def _merge_request(payload: dict[str, Any]) -> PullRequestEvent | ReviewEvent | None:
    _check_kind(payload, "merge_request")
    action = text(payload["object_attributes"].get("action") or "", 64)
    sender = login(payload["user"]["username"])
    if action in _APPROVE_ACTIONS or action in _UNAPPROVE_ACTIONS:
        approved = action in _APPROVE_ACTIONS
        return ReviewEvent(
            action="submitted" if approved else "dismissed",
            pull=_pull(payload, action),
            reviewer=sender,
            state="approved" if approved else "dismissed",
        )
    if action == "update":
        # GitLab sends oldrev only when the update brought code: a push, an applied suggestion.
        if not payload["object_attributes"].get("oldrev"):
            return None
        event_action = "updated"
    elif action in _PULL_ACTIONS:
        event_action = _PULL_ACTIONS[action]
    else:
        return None
    return PullRequestEvent(
        action=event_action,  # type: ignore[arg-type]
        pull=_pull(payload, action),
        sender=sender,
    )


def _note(payload: dict[str, Any]) -> CommentEvent | None:
    _check_kind(payload, "note")
    attributes = payload["object_attributes"]
    if attributes.get("noteable_type") != "MergeRequest":
        return None  # issues, commits, snippets are not merge requests
    if attributes.get("action", "create") != "create" or attributes.get("system"):
        return None  # edits never run anything; system notes are GitLab's own words
    return CommentEvent(
        repo=_repo(payload),
        pull_number=positive(payload["merge_request"]["iid"]),
        comment_id=positive(attributes["id"]),
        author=login(payload["user"]["username"]),
        body=text(attributes.get("note") or ""),
    )


_PARSERS: dict[str, Parser] = {
    MERGE_REQUEST_HOOK: _merge_request,
    NOTE_HOOK: _note,
}
