"""A local stand-in for Slack, and helpers to sign interaction payloads the way Slack does.

`FakeSlack` serves, over real HTTP on 127.0.0.1, the parts of Slack deploybot talks to:

- incoming webhooks: `POST /services/T.../B.../<secret>` with a JSON message; `200 ok`,
  or Slack's plain-text errors (`400 invalid_payload`, `400 no_text`, `404 no_service`);
- the Web API's `POST /api/chat.postMessage` with `Authorization: Bearer <bot token>` and
  a JSON body; always HTTP 200, with `{"ok": true, ...}` or `{"ok": false, "error": ...}`
  (`not_authed`, `invalid_auth`, `channel_not_found`, `no_text`), as Slack answers;
- interaction response URLs: `POST /actions/<id>/<secret>`, recorded like webhooks.

Everything accepted is recorded (`webhook_posts`, `chat_messages`, `responses`).
`sign_slack_request` and `interaction_body` build what Slack would post to the bot's
interactivity URL when someone clicks a button, computed here independently of
`bot.ci.slack`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import threading
import time
from types import TracebackType
from typing import Any
from urllib.parse import urlencode

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from bot.sandbox.local_forge import ServerThread


def sign_slack_request(body: bytes, secret: str, timestamp: int | float | str) -> dict[str, str]:
    """The headers Slack sends with `body` to an interactivity URL: v0 signature, timestamp."""
    ts = str(int(float(timestamp)))
    base = b"v0:" + ts.encode() + b":" + body
    signature = "v0=" + hmac.new(secret.encode(), base, hashlib.sha256).hexdigest()
    return {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Slack-Request-Timestamp": ts,
        "X-Slack-Signature": signature,
    }


def interaction_payload(
    run_id: int | str,
    approve: bool,
    *,
    user_id: str = "U024BE7LH",
    username: str = "alice",
    response_url: str = "https://hooks.slack.com/actions/T024BE7LD/1234567890/abcdefABCDEF",
    action_id: str | None = None,
) -> dict[str, Any]:
    """A `block_actions` payload as Slack sends it for a click on our Approve or Reject button."""
    action_id = action_id or ("deploybot_approve" if approve else "deploybot_reject")
    return {
        "type": "block_actions",
        "user": {"id": user_id, "username": username, "name": username, "team_id": "T024BE7LD"},
        "api_app_id": "A02",
        "token": "verification-token-is-deprecated",
        "container": {"type": "message", "message_ts": "1548261231.000200", "channel_id": "C0123",
                      "is_ephemeral": False},
        "trigger_id": "12466734323.1395872398.abc",
        "team": {"id": "T024BE7LD", "domain": "acme"},
        "enterprise": None,
        "is_enterprise_install": False,
        "channel": {"id": "C0123", "name": "deploys"},
        "message": {"type": "message", "text": "deploybot: plan ready", "ts": "1548261231.000200"},
        "state": {"values": {}},
        "response_url": response_url,
        "actions": [
            {
                "action_id": action_id,
                "block_id": f"deploybot_decision_{run_id}",
                "text": {"type": "plain_text", "text": "Approve" if approve else "Reject", "emoji": True},
                "value": str(run_id),
                "style": "primary" if approve else "danger",
                "type": "button",
                "action_ts": "1548426417.840180",
            }
        ],
    }


def interaction_body(run_id: int | str, approve: bool, **kwargs: Any) -> bytes:
    """The form body (`payload=<JSON>`) Slack posts for a click; kwargs as `interaction_payload`."""
    return form_body(interaction_payload(run_id, approve, **kwargs))


def form_body(payload: dict[str, Any]) -> bytes:
    """Any payload dict encoded the way Slack posts interactions."""
    return urlencode({"payload": json.dumps(payload)}).encode()


class FakeSlack:
    """In-memory Slack with a real HTTP API; see the module docstring."""

    def __init__(self, bot_token: str = "xoxb-test-token", channels: tuple[str, ...] = ("C0123",)) -> None:
        self.bot_token = bot_token
        self.channels = set(channels)
        self.webhook_path = f"/services/T024BE7LD/B0123/{secrets.token_hex(12)}"
        self.response_path = f"/actions/T024BE7LD/1234567890/{secrets.token_hex(12)}"
        self.url: str | None = None
        self.webhook_posts: list[dict[str, Any]] = []
        self.chat_messages: list[dict[str, Any]] = []
        self.responses: list[dict[str, Any]] = []
        self.auth_headers: list[str | None] = []  # Authorization of every chat.postMessage call
        self._lock = threading.Lock()
        self.app = Starlette(routes=[
            Route("/services/{rest:path}", self._webhook, methods=["POST"]),
            Route("/actions/{rest:path}", self._response_url, methods=["POST"]),
            Route("/api/chat.postMessage", self._chat_post_message, methods=["POST"]),
        ])
        self._http = ServerThread(self.app, "fake-slack", "FakeSlack")

    @property
    def webhook_url(self) -> str:
        return f"{self._base()}{self.webhook_path}"

    @property
    def response_url(self) -> str:
        return f"{self._base()}{self.response_path}"

    @property
    def api_url(self) -> str:
        return f"{self._base()}/api"

    def _base(self) -> str:
        if self.url is None:
            raise RuntimeError("FakeSlack is not running")
        return self.url

    # -- lifecycle --

    def start(self) -> str:
        """Serve on a free port of 127.0.0.1 in a background thread; return the base URL."""
        self.url = self._http.start()
        return self.url

    def stop(self) -> None:
        self._http.stop()

    def __enter__(self) -> FakeSlack:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- endpoints --

    async def _webhook(self, request: Request) -> Response:
        if request.url.path != self.webhook_path:
            return PlainTextResponse("no_service", status_code=404)
        message, error = await _json_message(request)
        if error:
            return PlainTextResponse(error, status_code=400)
        with self._lock:
            self.webhook_posts.append(message)
        return PlainTextResponse("ok")

    async def _response_url(self, request: Request) -> Response:
        if request.url.path != self.response_path:
            return PlainTextResponse("no_service", status_code=404)
        message, error = await _json_message(request)
        if error:
            return PlainTextResponse(error, status_code=400)
        with self._lock:
            self.responses.append(message)
        return PlainTextResponse("ok")

    async def _chat_post_message(self, request: Request) -> Response:
        authorization = request.headers.get("authorization")
        with self._lock:
            self.auth_headers.append(authorization)
        if not authorization:
            return JSONResponse({"ok": False, "error": "not_authed"})
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), self.bot_token.encode()):
            return JSONResponse({"ok": False, "error": "invalid_auth"})
        message, error = await _json_message(request)
        if error:
            return JSONResponse({"ok": False, "error": error})
        channel = message.get("channel")
        if channel not in self.channels:
            return JSONResponse({"ok": False, "error": "channel_not_found"})
        ts = f"{time.time():.6f}"
        with self._lock:
            self.chat_messages.append(message)
        return JSONResponse({"ok": True, "channel": channel, "ts": ts,
                             "message": {"type": "message", "text": message.get("text", ""), "ts": ts}})


async def _json_message(request: Request) -> tuple[dict[str, Any], str | None]:
    """The JSON message of a request, or Slack's error code for it."""
    if not request.headers.get("content-type", "").startswith("application/json"):
        return {}, "invalid_payload"
    try:
        message = json.loads(await request.body())
    except ValueError:
        return {}, "invalid_payload"
    if not isinstance(message, dict):
        return {}, "invalid_payload"
    if not message.get("text") and not message.get("blocks"):
        return {}, "no_text"
    return message, None
