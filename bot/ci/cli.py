"""`deploybot run plan|apply`: the command CI jobs call to plan or apply through a deploybot server.

    deploybot run plan  --repo acme/infrastructure-live --ref refs/heads/main --project staging
    deploybot run apply --repo acme/infrastructure-live --ref refs/heads/main --sha "$SHA" --project staging

It starts a run with `POST /api/v1/runs`, streams the run's log (`GET /api/v1/runs/{id}/log`)
to stdout as terraform writes it, reports progress on stderr, and exits like
`terraform plan -detailed-exitcode`:

- plan: 0 no changes, 2 changes present, 1 error (refused, failed, cancelled, …);
- apply: 0 applied, 1 anything else (refused, failed, rejected, no approval in time).

Usage errors exit 1 too, never 2, so a typo cannot pass for "changes present".

An apply waits for its plan to be approved (in Slack, through the API, or by the pull
request's rules): while the run is `awaiting_approval` the command polls its status,
says on stderr that it waits and where, and gives up with exit 1 after
`--approval-timeout` seconds (the run stays waiting on the server).

Credentials, first found wins (never printed):

1. HMAC: `DEPLOYBOT_HMAC_KEY_ID` and `DEPLOYBOT_HMAC_KEY` (or `DEPLOYBOT_HMAC_KEY_FILE`);
   every request is signed with `bot.ci.auth.hmac_signature` and a fresh nonce.
2. GitHub Actions OIDC: `ACTIONS_ID_TOKEN_REQUEST_URL` + `ACTIONS_ID_TOKEN_REQUEST_TOKEN`
   (the job needs `permissions: id-token: write`); a fresh token for `--audience` is
   requested for every call, since the server accepts each token's `jti` once.
3. GitLab CI OIDC: the variable a job's `id_tokens:` defines (`--id-token-var`,
   default `DEPLOYBOT_ID_TOKEN`).
4. `DEPLOYBOT_OIDC_TOKEN`: any other OIDC token (e.g. CircleCI's `$CIRCLE_OIDC_TOKEN_V2`).

Network errors are retried with backoff (a POST only when it cannot have reached the
server), then the command exits 1 saying what failed.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Protocol
from urllib.parse import quote, urlsplit

import httpx

from bot.ci.auth import hmac_signature

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CHANGES = 2

DEFAULT_AUDIENCE = "deploybot"
DEFAULT_ID_TOKEN_VAR = "DEPLOYBOT_ID_TOKEN"
DEFAULT_APPROVAL_TIMEOUT = 3600.0
DEFAULT_POLL_INTERVAL = 5.0
WAIT_NOTICE_INTERVAL = 60.0  # how often "still waiting for approval" is repeated
STREAM_DRAIN_TIMEOUT = 30.0  # how long the log may lag behind a finished run
RETRY_DELAYS: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)  # seconds between attempts; tests shorten them
RETRY_STATUSES = frozenset({429, 502, 503, 504})  # worth another GET
POST_RETRY_STATUSES = frozenset({429, 503})  # a POST answered thus was not acted on
MIN_HMAC_KEY_BYTES = 32  # the server disables shorter keys

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled", "interrupted", "refused",
            "awaiting_approval", "rejected")
ENDED = frozenset({"succeeded", "failed", "cancelled", "interrupted", "refused", "rejected"})
_SHA_CHARS = frozenset("0123456789abcdef")


class CliError(Exception):
    """A failure to report in one line on stderr (exit 1). The message never holds a secret."""


class ApprovalTimeout(CliError):
    """The run was still awaiting approval when --approval-timeout ran out."""


# -- credentials -----------------------------------------------------------------------------


class Auth(Protocol):
    """Adds the credentials to one request. `secrets` are redacted from everything printed."""

    description: str
    secrets: set[str]

    def headers(self, method: str, path: str, body: bytes) -> dict[str, str]: ...


@dataclass
class HmacAuth:
    """`X-Deploybot-*` headers: a signature over method, path, timestamp, a fresh nonce and the body."""

    key_id: str
    key: bytes = field(repr=False)
    clock: Callable[[], float] = time.time
    secrets: set[str] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        self.secrets.add(self.key.decode("utf-8", "replace"))

    @property
    def description(self) -> str:
        return f"HMAC key id {self.key_id}"

    def headers(self, method: str, path: str, body: bytes) -> dict[str, str]:
        timestamp = str(int(self.clock()))
        nonce = secrets.token_urlsafe(24)  # 32 characters of [A-Za-z0-9_-]
        return {
            "X-Deploybot-Key-Id": self.key_id,
            "X-Deploybot-Timestamp": timestamp,
            "X-Deploybot-Nonce": nonce,
            "X-Deploybot-Signature": hmac_signature(self.key, method, path, timestamp, nonce, body),
        }


@dataclass
class BearerAuth:
    """A fixed OIDC token from the environment (GitLab `id_tokens`, CircleCI, …)."""

    token: str = field(repr=False)
    source: str = "DEPLOYBOT_OIDC_TOKEN"
    secrets: set[str] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        self.secrets.add(self.token)

    @property
    def description(self) -> str:
        return f"the OIDC token in ${self.source}"

    def headers(self, method: str, path: str, body: bytes) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@dataclass
class GitHubActionsAuth:
    """A fresh GitHub Actions OIDC token for `audience` on every request."""

    request_url: str = field(repr=False)
    request_token: str = field(repr=False)
    audience: str
    http: httpx.Client = field(repr=False)
    say: Callable[[str], None] = field(default=lambda message: None, repr=False)
    secrets: set[str] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        self.secrets.add(self.request_token)

    @property
    def description(self) -> str:
        return f"a GitHub Actions OIDC token for audience {self.audience}"

    def headers(self, method: str, path: str, body: bytes) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token()}"}

    def token(self) -> str:
        """Ask the Actions runtime for a token (GET {url}&audience=…, `Authorization: bearer …`)."""
        separator = "&" if "?" in self.request_url else "?"
        url = f"{self.request_url}{separator}audience={quote(self.audience, safe='')}"
        headers = {"Authorization": f"bearer {self.request_token}", "Accept": "application/json"}
        for delay in (*RETRY_DELAYS, None):
            try:
                response = self.http.get(url, headers=headers)
            except httpx.TransportError as exc:
                if delay is None:
                    raise CliError(f"cannot reach GitHub Actions' OIDC token service: {_describe(exc)}") from None
                self.say(f"GitHub Actions' OIDC token service is unreachable ({_describe(exc)}); "
                         f"retrying in {delay:g}s")
                time.sleep(delay)
                continue
            if response.status_code in RETRY_STATUSES and delay is not None:
                self.say(f"GitHub Actions' OIDC token service answered HTTP {response.status_code}; "
                         f"retrying in {delay:g}s")
                time.sleep(delay)
                continue
            break
        if response.status_code != 200:
            raise CliError(
                f"GitHub Actions did not issue an OIDC token (HTTP {response.status_code}); "
                "does the job have `permissions: id-token: write`?"
            )
        try:
            value = response.json().get("value")
        except (ValueError, AttributeError):
            value = None
        if not isinstance(value, str) or not value:
            raise CliError("GitHub Actions' OIDC token service answered without a token")
        self.secrets.add(value)
        return value


def credentials_from_env(
    env: Mapping[str, str],
    *,
    audience: str = DEFAULT_AUDIENCE,
    id_token_var: str = DEFAULT_ID_TOKEN_VAR,
    http: httpx.Client,
    say: Callable[[str], None] = lambda message: None,
) -> Auth:
    """The credentials to call the server with, from the environment (see the module docstring)."""
    key_id = env.get("DEPLOYBOT_HMAC_KEY_ID", "").strip()
    key_text = env.get("DEPLOYBOT_HMAC_KEY", "")
    key_file = env.get("DEPLOYBOT_HMAC_KEY_FILE", "").strip()
    if key_id or key_text.strip() or key_file:
        if not key_id:
            raise CliError("DEPLOYBOT_HMAC_KEY or DEPLOYBOT_HMAC_KEY_FILE is set but DEPLOYBOT_HMAC_KEY_ID is not")
        if key_text.strip():
            key = key_text.strip().encode()
        elif key_file:
            try:
                with open(key_file, "rb") as f:
                    key = f.read().strip()
            except OSError as exc:
                raise CliError(f"cannot read DEPLOYBOT_HMAC_KEY_FILE {key_file}: {exc.strerror}") from None
        else:
            raise CliError("DEPLOYBOT_HMAC_KEY_ID is set but neither DEPLOYBOT_HMAC_KEY nor DEPLOYBOT_HMAC_KEY_FILE")
        if not key:
            raise CliError("the HMAC key is empty")
        if len(key) < MIN_HMAC_KEY_BYTES:
            say(f"warning: the HMAC key is shorter than {MIN_HMAC_KEY_BYTES} bytes; the server refuses such keys")
        return HmacAuth(key_id=key_id, key=key)

    request_url = env.get("ACTIONS_ID_TOKEN_REQUEST_URL", "").strip()
    request_token = env.get("ACTIONS_ID_TOKEN_REQUEST_TOKEN", "").strip()
    if request_url and request_token:
        return GitHubActionsAuth(request_url=request_url, request_token=request_token, audience=audience,
                                 http=http, say=say)
    token = env.get(id_token_var, "").strip()
    if token:
        return BearerAuth(token=token, source=id_token_var)
    token = env.get("DEPLOYBOT_OIDC_TOKEN", "").strip()
    if token:
        return BearerAuth(token=token, source="DEPLOYBOT_OIDC_TOKEN")
    if env.get("GITHUB_ACTIONS") == "true":
        raise CliError("no OIDC token: give the GitHub Actions job `permissions: id-token: write` "
                       "(or set DEPLOYBOT_HMAC_KEY_ID and DEPLOYBOT_HMAC_KEY)")
    raise CliError(
        "no credentials: set DEPLOYBOT_HMAC_KEY_ID and DEPLOYBOT_HMAC_KEY (or DEPLOYBOT_HMAC_KEY_FILE); "
        "or run in GitHub Actions with `permissions: id-token: write`; "
        f"or define the GitLab CI id_tokens variable {id_token_var}; or set DEPLOYBOT_OIDC_TOKEN"
    )


# -- talking to the server -------------------------------------------------------------------


class Client:
    """The trigger API over HTTP: retries, fresh credentials per attempt, errors as CliError."""

    def __init__(self, server: str, auth: Auth, http: httpx.Client, stream_http: httpx.Client,
                 say: Callable[[str], None]) -> None:
        self.server = server.rstrip("/")
        self.auth = auth
        self.http = http
        self.stream_http = stream_http
        self.say = say

    def _url(self, path: str) -> tuple[str, str]:
        url = self.server + path
        return url, urlsplit(url).path  # the path signed is the one the server sees

    def request(self, method: str, path: str, payload: dict[str, Any] | None = None) -> httpx.Response:
        url, signed_path = self._url(path)
        body = json.dumps(payload, separators=(",", ":")).encode() if payload is not None else b""
        is_get = method == "GET"
        statuses = RETRY_STATUSES if is_get else POST_RETRY_STATUSES
        for delay in (*RETRY_DELAYS, None):
            headers = {"Accept": "application/json", **self.auth.headers(method, signed_path, body)}
            if payload is not None:
                headers["Content-Type"] = "application/json"
            try:
                response = self.http.request(method, url, content=body if payload is not None else None,
                                             headers=headers)
            except httpx.TransportError as exc:
                # A POST is repeated only if it cannot have reached the server: no run twice.
                unsent = isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout))
                if delay is None or not (is_get or unsent):
                    what = "" if is_get or unsent else " (the run may have been started: check the server)"
                    raise CliError(f"cannot reach the deploybot server at {self.server}: {_describe(exc)}{what}") from None
                self.say(f"cannot reach the deploybot server ({_describe(exc)}); retrying in {delay:g}s")
                time.sleep(delay)
                continue
            if response.status_code in statuses and delay is not None:
                self.say(f"the deploybot server answered HTTP {response.status_code}; retrying in {delay:g}s")
                time.sleep(delay)
                continue
            return response
        raise AssertionError("unreachable")

    def create_run(self, payload: dict[str, Any]) -> dict[str, Any]:
        response = self.request("POST", "/api/v1/runs", payload)
        if response.status_code not in (200, 201):
            raise CliError(f"the server refused the {payload['command']} ({_status_and_error(response)})")
        run = _json_object(response)
        if not isinstance(run.get("id"), int):
            raise CliError("the server's answer names no run id")
        return run

    def get_run(self, run_id: int) -> dict[str, Any]:
        response = self.request("GET", f"/api/v1/runs/{run_id}")
        if response.status_code != 200:
            hint = ""
            if response.status_code == 401 and isinstance(self.auth, BearerAuth):
                hint = (" — this job's OIDC token cannot be renewed; if the server accepts each token once, "
                        "use HMAC credentials or a CI that can mint fresh tokens")
            raise CliError(f"cannot read run {run_id} ({_status_and_error(response)}){hint}")
        return _json_object(response)

    def stream_log(self, run_id: int, skip: int, write: Callable[[bytes], None]) -> tuple[int, str | None]:
        """Copy the run's log to `write`, leaving out its first `skip` bytes (already shown).

        Returns (bytes received in all, including the skipped ones; an error or None).
        """
        url, signed_path = self._url(f"/api/v1/runs/{run_id}/log")
        received = 0
        try:
            headers = {"Accept": "text/plain", **self.auth.headers("GET", signed_path, b"")}
            with self.stream_http.stream("GET", url, headers=headers) as response:
                if response.status_code != 200:
                    response.read()
                    return 0, _status_and_error(response)
                for chunk in response.iter_bytes():
                    start = max(0, min(len(chunk), skip - received))
                    received += len(chunk)
                    if chunk[start:]:
                        write(chunk[start:])
        except CliError as exc:
            return received, str(exc)
        except httpx.HTTPError as exc:
            return received, _describe(exc)
        return received, None


# -- following a run -------------------------------------------------------------------------


def exit_code(command: str, run: Mapping[str, Any]) -> int:
    """How a finished run maps to an exit code, like `terraform plan -detailed-exitcode`."""
    status = run.get("status")
    if command == "plan":
        if status == "succeeded" or status == "awaiting_approval":  # a plan that ended waiting for approval
            return EXIT_CHANGES if run.get("has_changes") is not False else EXIT_OK
        return EXIT_ERROR
    return EXIT_OK if status == "succeeded" else EXIT_ERROR


def _ended(command: str, status: Any) -> bool:
    return status in ENDED or (command == "plan" and status == "awaiting_approval")


class Follower:
    """Streams a run's log and watches its status until it ends; see `follow`."""

    def __init__(self, client: Client, out: IO[bytes], say: Callable[[str], None], *,
                 approval_timeout: float, poll_interval: float) -> None:
        self.client = client
        self.out = out
        self.say = say
        self.approval_timeout = approval_timeout
        self.poll_interval = poll_interval
        self.written = 0  # bytes of the log already on stdout
        self.stream_error: str | None = None
        self.stream_complete = False  # the last stream ended as the server ended it, without an error
        self._streamer: threading.Thread | None = None
        self._stream_started = 0.0
        self._write_lock = threading.Lock()

    def _write(self, chunk: bytes) -> None:
        with self._write_lock:
            self.out.write(chunk)
            self.out.flush()
            self.written += len(chunk)

    def _stream(self, run_id: int) -> None:
        _, self.stream_error = self.client.stream_log(run_id, self.written, self._write)
        self.stream_complete = self.stream_error is None

    def _start_stream(self, run_id: int) -> None:
        self._stream_started = time.monotonic()
        self.stream_complete = False
        self._streamer = threading.Thread(target=self._stream, args=(run_id,), name=f"deploybot-log-{run_id}",
                                          daemon=True)
        self._streamer.start()

    def follow(self, run_id: int, command: str, run_url: str) -> dict[str, Any]:
        """Poll the run; stream its log while it is queued or running; return it once it ended.

        Raises ApprovalTimeout if it awaits approval for longer than `approval_timeout`.
        """
        last_status: Any = None
        waiting_since: float | None = None
        last_notice = 0.0
        while True:
            run = self.client.get_run(run_id)
            status = run.get("status")
            if not isinstance(status, str) or not status:
                raise CliError(f"the server's answer for run {run_id} has no status")
            label = _label(run, command)
            if status != last_status:
                if last_status == "awaiting_approval" and status in ("queued", "running", "succeeded"):
                    approval = run.get("approval") or {}
                    by = f" by {approval['by']}" if isinstance(approval, dict) and approval.get("by") else ""
                    self.say(f"run {label}: approved{by}")
                if not _ended(command, status) and status != "awaiting_approval":
                    self.say(f"run {label}: {status}…")
                last_status = status
            if _ended(command, status):
                self._drain(run_id, run)
                return run
            now = time.monotonic()
            if status == "awaiting_approval":
                if waiting_since is None:
                    waiting_since = last_notice = now
                    self.say(f"run {label}: waiting for approval (up to {_duration(self.approval_timeout)}); "
                             f"its plan must be approved (e.g. in Slack): {run_url}")
                elif now - waiting_since >= self.approval_timeout:
                    raise ApprovalTimeout(
                        f"run {label}: no approval after {_duration(self.approval_timeout)}; giving up "
                        f"(the run stays waiting on the server: {run_url})")
                elif now - last_notice >= WAIT_NOTICE_INTERVAL:
                    last_notice = now
                    self.say(f"run {label}: still waiting for approval "
                             f"({_duration(now - waiting_since)} of {_duration(self.approval_timeout)}): {run_url}")
                time.sleep(max(0.0, min(self.poll_interval, waiting_since + self.approval_timeout - now)))
                continue
            waiting_since = None
            if self._streamer is None or not self._streamer.is_alive():
                since = now - self._stream_started
                if self._streamer is not None and since < self.poll_interval:
                    time.sleep(self.poll_interval - since)  # the stream ended early: not in a tight loop
                    continue
                self._start_stream(run_id)
            assert self._streamer is not None
            self._streamer.join(timeout=self.poll_interval)

    def _drain(self, run_id: int, run: Mapping[str, Any]) -> None:
        """Let the log catch up with a run that ended; show its output if no log could be read.

        The server ends a log stream when the job ends, so a stream that ended cleanly is
        complete; one that never ran or broke off is (re)read, skipping what was shown.
        """
        if self._streamer is None or (not self._streamer.is_alive() and not self.stream_complete):
            self._start_stream(run_id)
        assert self._streamer is not None
        self._streamer.join(timeout=STREAM_DRAIN_TIMEOUT)
        if self._streamer.is_alive():
            self.say(f"the log of run {run_id} did not end with the run; the output above may be incomplete")
        elif self.written == 0 and self.stream_error:
            output = run.get("output")
            if isinstance(output, str) and output:
                self._write(output.encode() if output.endswith("\n") else (output + "\n").encode())
            else:
                self.say(f"cannot read the log of run {run_id}: {self.stream_error}")


def _label(run: Mapping[str, Any], command: str) -> str:
    sha = run.get("sha") if isinstance(run.get("sha"), str) else ""
    project = run.get("project") if isinstance(run.get("project"), str) else "?"
    return f"{run.get('id')} {command} {project}@{sha[:8] or '?'}"


def _final_line(command: str, run: Mapping[str, Any], code: int) -> str:
    status = run.get("status")
    summary = " ".join(str(run.get("summary") or "").split())
    if len(summary) > 300:
        summary = summary[:299] + "…"
    if command == "plan" and code == EXIT_CHANGES:
        what = "plan succeeded, changes present"
    elif command == "plan" and code == EXIT_OK:
        what = "plan succeeded, no changes"
    elif command == "apply" and code == EXIT_OK:
        what = "applied"
    elif status == "rejected":
        approval = run.get("approval") or {}
        by = f" by {approval['by']}" if isinstance(approval, dict) and approval.get("by") else ""
        what = f"rejected{by}"
    else:
        what = str(status)
    return f"run {_label(run, command)}: {what}" + (f" — {summary}" if summary else "") + f" (exit {code})"


# -- the command -----------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """Usage errors exit 1: 2 means "changes present" to whoever runs this."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message}\n")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `deploybot run` (also what tests parse the CI examples with)."""
    parser.add_argument("command", choices=("plan", "apply"), help="what to run")
    parser.add_argument("--repo", required=True, help="the repository, e.g. acme/infrastructure-live")
    parser.add_argument("--ref", help="the git ref to run at, e.g. refs/heads/main (apply needs it; empty = not given)")
    parser.add_argument("--sha", help="the exact commit (40 hex digits); with --ref too, the ref must still point at it")
    parser.add_argument("--project", help="the project's name in the server policy")
    parser.add_argument("--dir", help="the project's directory, instead of --project")
    parser.add_argument("--workspace", help="the project's terraform workspace, with --dir")
    parser.add_argument("--forge", choices=("github", "gitlab"), help="where the repository lives (default: the server's)")
    parser.add_argument("--server", help="the deploybot server's URL (default: $DEPLOYBOT_SERVER)")
    parser.add_argument("--audience", default=DEFAULT_AUDIENCE,
                        help=f"the audience of a GitHub Actions OIDC token (default: {DEFAULT_AUDIENCE})")
    parser.add_argument("--id-token-var", default=DEFAULT_ID_TOKEN_VAR, metavar="NAME",
                        help=f"the variable a GitLab CI `id_tokens:` entry defines (default: {DEFAULT_ID_TOKEN_VAR})")
    parser.add_argument("--approval-timeout", type=_seconds, default=DEFAULT_APPROVAL_TIMEOUT, metavar="SECONDS",
                        help="how long an apply waits for approval (default: 3600)")
    parser.add_argument("--poll-interval", type=_seconds, default=DEFAULT_POLL_INTERVAL, metavar="SECONDS",
                        help="how often the run's status is asked for (default: 5)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="deploybot run",
        description="Plan or apply one project through a deploybot server, streaming the log. "
                    "Exit codes: plan 0 no changes, 2 changes present, 1 error; apply 0 applied, 1 otherwise.",
    )
    add_arguments(parser)
    return parser


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}")
    return value


def run_request(args: argparse.Namespace) -> dict[str, str]:
    """The POST /api/v1/runs body for the parsed arguments; CliError for bad values."""
    repo = (args.repo or "").strip()
    if not repo:
        raise CliError("--repo is empty")
    ref = (args.ref or "").strip()
    sha = (args.sha or "").strip().lower()
    if not ref and not sha:
        raise CliError("give --ref or --sha (an empty value counts as none: is the CI variable set?)")
    if sha and (len(sha) != 40 or not set(sha) <= _SHA_CHARS):
        raise CliError(f"--sha must be a full 40-character commit SHA, not {sha[:50]!r}")
    project, directory = (args.project or "").strip(), (args.dir or "").strip()
    if not project and not directory:
        raise CliError("give --project (or --dir)")
    body = {"repo": repo, "command": args.command}
    for name, value in (("ref", ref), ("sha", sha), ("project", project), ("dir", directory),
                        ("workspace", (args.workspace or "").strip()), ("forge", args.forge or "")):
        if value:
            body[name] = value
    return body


def run_command(
    args: argparse.Namespace,
    *,
    env: Mapping[str, str] | None = None,
    stdout: IO[bytes] | None = None,
    stderr: IO[str] | None = None,
) -> int:
    """Run `deploybot run` with parsed arguments; return the exit code."""
    env = os.environ if env is None else env
    out = stdout if stdout is not None else sys.stdout.buffer
    err = stderr if stderr is not None else sys.stderr
    known_secrets: list[set[str]] = []

    def say(message: str) -> None:
        for group in known_secrets:
            for secret in sorted(group, key=len, reverse=True):
                if secret:
                    message = message.replace(secret, "***")
        print(f"deploybot: {message}", file=err, flush=True)

    http = httpx.Client(timeout=httpx.Timeout(30.0, connect=10.0), follow_redirects=False)
    stream_http = httpx.Client(timeout=httpx.Timeout(30.0, connect=10.0, read=None), follow_redirects=False)
    try:
        payload = run_request(args)
        server = (args.server or env.get("DEPLOYBOT_SERVER", "")).strip().rstrip("/")
        if not server:
            raise CliError("give --server or set DEPLOYBOT_SERVER")
        parts = urlsplit(server)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise CliError(f"--server must be an http(s) URL, not {server!r}")
        auth = credentials_from_env(env, audience=args.audience, id_token_var=args.id_token_var, http=http, say=say)
        known_secrets.append(auth.secrets)
        if parts.scheme == "http" and parts.hostname not in ("localhost", "127.0.0.1", "::1") \
                and not isinstance(auth, HmacAuth):
            say("warning: sending an OIDC token over plain http")
        client = Client(server, auth, http, stream_http, say)
        where = payload.get("ref") or payload.get("sha", "")[:8]
        target = payload.get("project") or payload.get("dir")
        started = client.create_run(payload)
        run_id = started["id"]
        run_url = started.get("url") if isinstance(started.get("url"), str) else f"{server}/api/v1/runs/{run_id}"
        say(f"started run {run_id}: {args.command} of {payload['repo']} {target} at {where} "
            f"(as {auth.description}): {run_url}")
        follower = Follower(client, out, say, approval_timeout=args.approval_timeout,
                            poll_interval=args.poll_interval)
        run = follower.follow(run_id, args.command, run_url)
        code = exit_code(args.command, run)
        say(_final_line(args.command, run, code))
        return code
    except CliError as exc:
        say(str(exc))
        return EXIT_ERROR
    finally:
        stream_http.close()
        http.close()


def main(
    argv: Sequence[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    stdout: IO[bytes] | None = None,
    stderr: IO[str] | None = None,
) -> int:
    """`deploybot run …` (argv without `deploybot run`); returns the exit code."""
    try:
        args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # --help, or a usage error (exit 1)
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    return run_command(args, env=env, stdout=stdout, stderr=stderr)


# -- small helpers ---------------------------------------------------------------------------


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _json_object(response: httpx.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise CliError(f"the server's answer is not a JSON object (HTTP {response.status_code})")
    return data


def _status_and_error(response: httpx.Response) -> str:
    try:
        data = response.json()
        message = data.get("error") if isinstance(data, dict) else None
    except ValueError:
        message = None
    if not isinstance(message, str) or not message:
        message = " ".join(response.text.split())[:200] or response.reason_phrase
    return f"HTTP {response.status_code}: {message}"


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{round(seconds, 1):g}s"
    minutes = int(seconds // 60)
    return f"{minutes}m" if minutes < 120 else f"{minutes // 60}h{minutes % 60:02d}m"


if __name__ == "__main__":
    sys.exit(main())
