"""Slack: verify signed interactions, parse Approve/Reject clicks, render and send run messages.

Pure core, thin I/O edge, as for the forges:

- `verify_slack_signature` checks Slack's v0 request signature: `X-Slack-Signature`
  is `v0=` + hex HMAC-SHA256(signing secret, "v0:{X-Slack-Request-Timestamp}:{raw body}"),
  compared in constant time, with the timestamp within five minutes of `now` either
  way (which bounds how long a captured request can be replayed). It raises the same
  `InvalidSignature` as the webhook verifiers, so the HTTP layer answers 401 alike.
- `parse_interaction` turns the form body Slack posts to the interactivity URL
  (`payload=<JSON>`) into a `SlackDecision` when it is a `block_actions` click on one
  of our buttons (`deploybot_approve` / `deploybot_reject`, whose `value` is the run
  id), None for every other interaction, and `MalformedPayload` for bodies that are
  not what Slack sends. Who clicked is only a Slack user id here: mapping it to an
  approver is the policy's job.
- `render_run_message` builds the Block Kit message for each moment of a run: plan
  ready (with the buttons), approved, applied, failed, rejected.
- `SlackNotifier` posts a message through an incoming webhook or `chat.postMessage`.
  A failed notification is logged and never raised: Slack being down must not fail
  a run. The webhook URL is itself a credential, so neither it nor the bot token
  appears in a log line or a repr.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import httpx

from bot.forges.webhook import InvalidSignature, MalformedPayload

__all__ = [
    "APPROVE_ACTION_ID",
    "MESSAGE_KINDS",
    "REJECT_ACTION_ID",
    "SIGNATURE_TOLERANCE",
    "InvalidSignature",
    "MalformedPayload",
    "SlackDecision",
    "SlackNotifier",
    "parse_interaction",
    "render_run_message",
    "slack_signature",
    "verify_slack_signature",
]

log = logging.getLogger(__name__)

SIGNATURE_TOLERANCE = 5 * 60  # seconds either side of now, as Slack recommends
SIGNATURE_VERSION = "v0"
APPROVE_ACTION_ID = "deploybot_approve"
REJECT_ACTION_ID = "deploybot_reject"

PLAN_READY = "plan_ready"
APPROVED = "approved"
APPLIED = "applied"
FAILED = "failed"
REJECTED = "rejected"
MESSAGE_KINDS = (PLAN_READY, APPROVED, APPLIED, FAILED, REJECTED)

SECTION_TEXT_LIMIT = 3000  # Block Kit: a section's text is at most 3000 characters
SUMMARY_LIMIT = 2800  # what is left of a section for the summary after its code fence
FALLBACK_TEXT_LIMIT = 2000  # the notification text (before escaping); Slack truncates long ones anyway

# Message templates (mrkdwn). Values are escaped before they are filled in.
TITLES = {
    PLAN_READY: ":memo: *Plan ready for approval* — {run_link}",
    APPROVED: ":white_check_mark: *Approved* by {by} — {run_link}",
    APPLIED: ":rocket: *Applied* — {run_link}",
    FAILED: ":x: *{command_title} failed* — {run_link}",
    REJECTED: ":no_entry: *Rejected* by {by} — {run_link}",
}
FALLBACK_TEXTS = {
    PLAN_READY: "deploybot: plan ready for approval: {repo} {project} at {short_sha} (run {run_id})",
    APPROVED: "deploybot: run {run_id} approved by {by}: {repo} {project} at {short_sha}",
    APPLIED: "deploybot: applied {repo} {project} at {short_sha} (run {run_id})",
    FAILED: "deploybot: {command} failed for {repo} {project} at {short_sha} (run {run_id})",
    REJECTED: "deploybot: run {run_id} rejected by {by}: {repo} {project} at {short_sha}",
}
APPROVE_CONFIRM_TEXT = "Approve the plan of {project} at {short_sha}? Only this saved plan, of this commit, can then be applied."


# -- signatures ------------------------------------------------------------------------------


def slack_signature(body: bytes, signing_secret: str, timestamp: str) -> str:
    """The `X-Slack-Signature` value Slack sends for this body and timestamp."""
    base = f"{SIGNATURE_VERSION}:{timestamp}:".encode() + body
    return f"{SIGNATURE_VERSION}=" + hmac.new(signing_secret.encode(), base, hashlib.sha256).hexdigest()


def verify_slack_signature(headers: Mapping[str, str], body: bytes, signing_secret: str, now: float) -> None:
    """Raise InvalidSignature unless the request carries Slack's v0 signature of this body.

    `headers` may be any mapping (a Starlette `Headers` or a plain dict); names are
    matched case-insensitively. An empty signing secret is a configuration error:
    ValueError, so a missing secret can never make every signature "match".
    """
    if not signing_secret:
        raise ValueError("no Slack signing secret is configured")
    lowered = {k.lower(): v for k, v in headers.items()}
    timestamp_text = (lowered.get("x-slack-request-timestamp") or "").strip()
    signature = (lowered.get("x-slack-signature") or "").strip()
    if not timestamp_text or not signature:
        raise InvalidSignature("missing X-Slack-Request-Timestamp or X-Slack-Signature")
    if not timestamp_text.isdigit():
        raise InvalidSignature("X-Slack-Request-Timestamp is not Unix seconds")
    if abs(now - int(timestamp_text)) > SIGNATURE_TOLERANCE:
        raise InvalidSignature("X-Slack-Request-Timestamp is more than five minutes from now")
    expected = slack_signature(body, signing_secret, timestamp_text)
    if not hmac.compare_digest(expected.encode(), signature.encode()):
        raise InvalidSignature("X-Slack-Signature does not match the body")


# -- interactions ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SlackDecision:
    """A click on one of our Approve/Reject buttons. The user is Slack's, not yet an approver."""

    run_id: int
    approve: bool
    slack_user_id: str
    slack_username: str
    response_url: str


def parse_interaction(body: bytes) -> SlackDecision | None:
    """The decision a Slack interaction body carries, or None if it is not one of ours.

    Raises MalformedPayload when the body is not `payload=<JSON object>`, or when it
    is a click on our buttons without a user or with a value that is not a run id.
    """
    try:
        form = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=True)
    except (UnicodeDecodeError, ValueError):
        raise MalformedPayload("the body is not a form") from None
    values = form.get("payload")
    if not values or len(values) != 1:
        raise MalformedPayload("the form has no single `payload` field")
    try:
        payload = json.loads(values[0])
    except ValueError:
        raise MalformedPayload("`payload` is not JSON") from None
    if not isinstance(payload, dict):
        raise MalformedPayload("`payload` is not a JSON object")
    if payload.get("type") != "block_actions":
        return None
    actions = payload.get("actions")
    if not isinstance(actions, list):
        raise MalformedPayload("block_actions payload without an `actions` list")
    ours = [
        a for a in actions
        if isinstance(a, dict) and a.get("action_id") in (APPROVE_ACTION_ID, REJECT_ACTION_ID)
    ]
    if not ours:
        return None
    if len(ours) > 1:
        raise MalformedPayload("more than one deploybot action in one interaction")
    action = ours[0]
    value = action.get("value")
    if not isinstance(value, str) or not value.isdigit() or not value.isascii():
        raise MalformedPayload("the button's value is not a run id")
    user = payload.get("user")
    if not isinstance(user, dict) or not isinstance(user.get("id"), str) or not user["id"]:
        raise MalformedPayload("block_actions payload without a user id")
    username = user.get("username") or user.get("name") or ""
    response_url = payload.get("response_url") or ""
    if not isinstance(username, str) or not isinstance(response_url, str):
        raise MalformedPayload("block_actions payload with a non-text username or response_url")
    return SlackDecision(
        run_id=int(value),
        approve=action["action_id"] == APPROVE_ACTION_ID,
        slack_user_id=user["id"],
        slack_username=username,
        response_url=response_url,
    )


# -- messages --------------------------------------------------------------------------------


def render_run_message(
    kind: str,
    *,
    run_id: int,
    run_url: str,
    repo: str,
    project: str,
    sha: str,
    command: str = "plan",
    summary: str = "",
    by: str = "",
) -> dict[str, Any]:
    """A Block Kit message (`text` fallback + `blocks`) for one moment of a run.

    `kind` is one of MESSAGE_KINDS. `plan_ready` carries the Approve/Reject buttons
    (value: the run id); `approved` and `rejected` name who decided (`by`); `failed`
    names the command that failed. The summary, if any, is shown as a code block.
    """
    if kind not in MESSAGE_KINDS:
        raise ValueError(f"unknown Slack message kind {kind!r}; expected one of {', '.join(MESSAGE_KINDS)}")
    short_sha = sha[:8]
    values = {
        "run_id": run_id,
        "repo": repo,
        "project": project,
        "short_sha": short_sha,
        "command": command,
        "by": by or "someone",
    }
    run_link = f"<{_escape_url(run_url)}|run {run_id}>" if run_url else f"run {run_id}"
    title = TITLES[kind].format(
        run_link=run_link,
        by=_escape(values["by"]),
        command_title=_escape(command.capitalize()),
    )
    details = f"*Repository* `{_escape(repo)}`  *Project* `{_escape(project)}`  *Commit* `{_escape(short_sha)}`"
    if kind not in (PLAN_READY, APPROVED, REJECTED):
        details += f"  *Command* `{_escape(command)}`"
    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": title}},
        {"type": "context", "elements": [{"type": "mrkdwn", "text": details}]},
    ]
    if summary:
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": _code_block(summary)}})
    if kind == PLAN_READY:
        blocks.append(_decision_buttons(run_id, project, short_sha))
    text = FALLBACK_TEXTS[kind].format(**values)
    first_line = next((line.strip() for line in summary.splitlines() if line.strip()), "")
    if first_line:
        text += f": {first_line}"
    return {"text": _escape(_truncate(text, FALLBACK_TEXT_LIMIT)), "blocks": blocks}


def _decision_buttons(run_id: int, project: str, short_sha: str) -> dict[str, Any]:
    return {
        "type": "actions",
        "block_id": f"deploybot_decision_{run_id}",
        "elements": [
            {
                "type": "button",
                "action_id": APPROVE_ACTION_ID,
                "text": {"type": "plain_text", "text": "Approve"},
                "style": "primary",
                "value": str(run_id),
                "confirm": {
                    "title": {"type": "plain_text", "text": "Approve this plan?"},
                    "text": {
                        "type": "plain_text",
                        "text": APPROVE_CONFIRM_TEXT.format(project=project, short_sha=short_sha)[:300],
                    },
                    "confirm": {"type": "plain_text", "text": "Approve"},
                    "deny": {"type": "plain_text", "text": "Cancel"},
                },
            },
            {
                "type": "button",
                "action_id": REJECT_ACTION_ID,
                "text": {"type": "plain_text", "text": "Reject"},
                "style": "danger",
                "value": str(run_id),
            },
        ],
    }


def _escape(text: str) -> str:
    """Slack's mrkdwn escaping: the three control characters, nothing else."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _escape_url(url: str) -> str:
    return _escape(url).replace("|", "%7C")


def _code_block(summary: str) -> str:
    body = _escape(_truncate(summary.strip("\n"), SUMMARY_LIMIT)).replace("```", "'''")
    text = f"```{body}```"
    return text[:SECTION_TEXT_LIMIT]


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- sending ---------------------------------------------------------------------------------


class _RedactSecrets(logging.Filter):
    """Replaces registered secrets (webhook and response URLs) in the `httpx` logger's lines.

    httpx logs every request's full URL at INFO; for an incoming webhook the URL is the
    credential.
    """

    def __init__(self) -> None:
        super().__init__()
        self._secrets: set[str] = set()
        self._lock = threading.Lock()

    def add(self, secret: str) -> None:
        if secret:
            with self._lock:
                self._secrets.add(secret)

    def filter(self, record: logging.LogRecord) -> bool:
        with self._lock:
            secrets = sorted(self._secrets, key=len, reverse=True)
        if not secrets:
            return True
        try:
            message = record.getMessage()
        except Exception:  # a broken record is not ours to fix
            return True
        redacted = message
        for secret in secrets:
            redacted = redacted.replace(secret, "***")
        if redacted != message:
            record.msg, record.args = redacted, ()
        return True


_httpx_redactor = _RedactSecrets()
logging.getLogger("httpx").addFilter(_httpx_redactor)


class SlackNotifier:
    """Posts run messages to Slack; see the module docstring.

    Exactly one mode: an incoming webhook (`webhook_url`), or the Web API's
    `chat.postMessage` with a bot token (`bot_token` + `channel`, at `api_url`).
    `respond` answers an interaction through its `response_url`, which must start
    with `response_url_prefix` (Slack's own host unless tests point it elsewhere),
    so a payload can never make the bot post to an arbitrary address.
    """

    def __init__(
        self,
        webhook_url: str | None = None,
        bot_token: str | None = None,
        channel: str | None = None,
        api_url: str = "https://slack.com/api",
        http: httpx.Client | None = None,
        *,
        timeout: float = 10.0,
        response_url_prefix: str = "https://hooks.slack.com/",
    ) -> None:
        if webhook_url and bot_token:
            raise ValueError("Slack: give either an incoming webhook URL or a bot token, not both")
        if not webhook_url and not bot_token:
            raise ValueError("Slack: an incoming webhook URL or a bot token is required")
        if bot_token and not channel:
            raise ValueError("Slack: chat.postMessage with a bot token needs a channel")
        if webhook_url and not webhook_url.startswith(("https://", "http://")):
            raise ValueError("Slack: the incoming webhook URL must be an http(s) URL")
        self._webhook_url = webhook_url or None
        self._bot_token = bot_token or None
        self.channel = channel if bot_token else None
        self.api_url = api_url.rstrip("/")
        self.response_url_prefix = response_url_prefix
        self._own_http = http is None
        self._http = http if http is not None else httpx.Client(timeout=timeout)
        if self._webhook_url:
            _httpx_redactor.add(self._webhook_url)

    @property
    def mode(self) -> str:
        """`webhook` or `chat.postMessage`."""
        return "webhook" if self._webhook_url else "chat.postMessage"

    def notify(self, message: dict[str, Any]) -> bool:
        """Post `message`; True if Slack took it. Failures are logged, never raised."""
        if self._webhook_url:
            return self._post_webhook(self._webhook_url, message, "incoming webhook")
        return self._post_message(message)

    def respond(self, response_url: str, message: dict[str, Any], *, replace_original: bool = True) -> bool:
        """Answer an interaction through its `response_url` (e.g. replace the buttons with the outcome)."""
        if not response_url.startswith(self.response_url_prefix):
            log.warning("Slack: ignoring a response_url outside %s", self.response_url_prefix)
            return False
        _httpx_redactor.add(response_url)
        return self._post_webhook(response_url, {**message, "replace_original": replace_original}, "response_url")

    def close(self) -> None:
        """Close the HTTP client if this notifier made it."""
        if self._own_http:
            self._http.close()

    def __repr__(self) -> str:
        if self._webhook_url:
            return "SlackNotifier(webhook_url='**********')"
        return f"SlackNotifier(bot_token='**********', channel={self.channel!r}, api_url={self.api_url!r})"

    # -- the two transports --

    def _post_webhook(self, url: str, message: dict[str, Any], what: str) -> bool:
        try:
            response = self._http.post(url, json=message)
        except httpx.HTTPError as exc:
            log.warning("Slack %s: request failed: %s", what, self._scrub(exc, url))
            return False
        if response.status_code != 200:
            log.warning("Slack %s: HTTP %d: %s", what, response.status_code, _short(response.text))
            return False
        return True

    def _post_message(self, message: dict[str, Any]) -> bool:
        url = f"{self.api_url}/chat.postMessage"
        try:
            response = self._http.post(
                url,
                json={**message, "channel": self.channel},
                headers={"Authorization": f"Bearer {self._bot_token}"},
            )
        except httpx.HTTPError as exc:
            log.warning("Slack chat.postMessage: request failed: %s", self._scrub(exc, url))
            return False
        if response.status_code != 200:
            log.warning("Slack chat.postMessage: HTTP %d: %s", response.status_code, _short(response.text))
            return False
        try:
            answer = response.json()
        except ValueError:
            log.warning("Slack chat.postMessage: the answer is not JSON: %s", _short(response.text))
            return False
        if not isinstance(answer, dict) or answer.get("ok") is not True:
            error = answer.get("error") if isinstance(answer, dict) else None
            log.warning("Slack chat.postMessage to %s failed: %s", self.channel, _short(str(error or answer)))
            return False
        return True

    def _scrub(self, exc: Exception, url: str) -> str:
        text = f"{type(exc).__name__}: {exc}"
        for secret in (url, self._webhook_url, self._bot_token):
            if secret:
                text = text.replace(secret, "***")
        return text


def _short(text: str, limit: int = 200) -> str:
    return _truncate(" ".join(text.split()), limit)
