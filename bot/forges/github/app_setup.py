"""`deploybot github-app create`: register deploybot's GitHub App with GitHub's manifest flow.

1. A small page on 127.0.0.1 holds a form that POSTs `app-manifest.yml` (as JSON, its
   `redirect_url` pointing back at this server's `/callback`) to GitHub's new-App page,
   with a random `state` in the form's URL.
2. The person reviews the App on GitHub and creates it; GitHub sends the browser to
   `/callback?code=...&state=...`.
3. A callback whose `state` is not ours is refused (CSRF) and exchanges nothing. Otherwise
   the one-time code is exchanged, without authentication, at
   `POST {api_url}/app-manifests/{code}/conversions` for the App's id, private key and
   webhook secret.
4. The key and the secret are written to files of mode 0600 and never printed; a config
   snippet (`github:` with `private_key_file`/`webhook_secret_file`) names them. The OAuth
   client secret, which the bot does not use, is not kept anywhere.

The server answers only requests addressed to its own loopback address (a page of another
site cannot reach it through DNS rebinding) and stops after one successful exchange.
"""

from __future__ import annotations

import argparse
import copy
import hmac
import html
import json
import os
import re
import secrets
import sys
import threading
import urllib.parse
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx
import yaml

DEFAULT_GITHUB_URL = "https://github.com"
DEFAULT_API_URL = "https://api.github.com"
DEFAULT_MANIFEST = Path(__file__).resolve().parent.parent / "app-manifest.yml"
PRIVATE_KEY_FILE = "github-app-private-key.pem"
WEBHOOK_SECRET_FILE = "github-webhook-secret"
CONFIG_FILE = "deploybot-github.yaml"
PLACEHOLDER_HOST = "deploybot.example.com"
API_VERSION = "2022-11-28"
USER_AGENT = "deploybot"
# The fields GitHub reads from a manifest; anything else is a typo that would silently do nothing.
MANIFEST_FIELDS = frozenset({
    "name", "url", "description", "hook_attributes", "redirect_url", "callback_urls", "setup_url",
    "public", "default_events", "default_permissions", "request_oauth_on_install", "setup_on_update",
})
_CODE = re.compile(r"[A-Za-z0-9_.-]{1,256}")


class SetupError(Exception):
    """The manifest flow cannot start or go on; the message says why, with no secret in it."""


@dataclass(frozen=True)
class CreatedApp:
    """The App GitHub created, and the files its credentials were written to."""

    app_id: int
    slug: str
    name: str
    html_url: str
    private_key_file: Path
    webhook_secret_file: Path
    config_file: Path


def load_manifest(path: str | Path) -> dict[str, Any]:
    """Read and check a manifest file: a mapping of GitHub's manifest fields."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SetupError(f"cannot read the manifest {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise SetupError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise SetupError(f"{path}: the manifest must be a mapping")
    unknown = sorted(set(data) - MANIFEST_FIELDS)
    if unknown:
        raise SetupError(f"{path}: unknown manifest field(s): {', '.join(unknown)}")
    if not isinstance(data.get("url"), str) or not data["url"]:
        raise SetupError(f"{path}: `url` (the App's homepage) is required")
    hook = data.get("hook_attributes")
    if not isinstance(hook, dict) or not isinstance(hook.get("url"), str):
        raise SetupError(f"{path}: `hook_attributes.url` (the webhook URL) is required")
    if not isinstance(data.get("default_permissions"), dict):
        raise SetupError(f"{path}: `default_permissions` must be a mapping")
    events = data.get("default_events")
    if not isinstance(events, list) or not all(isinstance(e, str) for e in events):
        raise SetupError(f"{path}: `default_events` must be a list of event names")
    return data


def build_manifest(
    manifest: dict[str, Any], redirect_url: str, *, webhook_url: str | None = None, name: str | None = None
) -> dict[str, Any]:
    """The manifest to post: a copy, redirected to our callback, with the optional overrides."""
    result = copy.deepcopy(manifest)
    result["redirect_url"] = redirect_url
    if webhook_url:
        result["hook_attributes"] = {**result.get("hook_attributes", {}), "url": webhook_url}
    if name:
        result["name"] = name
    return result


class GitHubAppSetup:
    """The local half of the manifest flow: page, callback, code exchange, files."""

    def __init__(
        self,
        manifest: dict[str, Any],
        out_dir: str | Path,
        *,
        github_url: str = DEFAULT_GITHUB_URL,
        api_url: str = DEFAULT_API_URL,
        org: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        webhook_url: str | None = None,
        name: str | None = None,
        http_timeout: float = 30.0,
    ) -> None:
        for label, value in (("--github-url", github_url), ("--api-url", api_url)):
            if urllib.parse.urlsplit(value).scheme not in ("http", "https"):
                raise SetupError(f"{label} must be an http(s) URL, got {value!r}")
        if webhook_url is not None and urllib.parse.urlsplit(webhook_url).scheme != "https":
            raise SetupError(f"--webhook-url must be an https URL, got {webhook_url!r}")
        if org is not None and not re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?", org):
            raise SetupError(f"--org must be an organization login, got {org!r}")
        self.github_url = github_url.rstrip("/")
        self.api_url = api_url.rstrip("/")
        self.org = org
        self.out_dir = Path(out_dir).expanduser().resolve()
        self.private_key_file = self.out_dir / PRIVATE_KEY_FILE
        self.webhook_secret_file = self.out_dir / WEBHOOK_SECRET_FILE
        self.config_file = self.out_dir / CONFIG_FILE
        self._manifest = manifest
        self._webhook_url = webhook_url
        self._name = name
        self._host = host
        self._port = port
        self._http_timeout = http_timeout
        self._state = secrets.token_urlsafe(32)
        self._lock = threading.Lock()  # one exchange at a time
        self._done = threading.Event()
        self._result: CreatedApp | None = None
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._allowed_hosts: set[str] = set()  # Host headers of requests addressed to us
        self.url = ""

    def __repr__(self) -> str:
        return f"GitHubAppSetup(url={self.url!r}, github_url={self.github_url!r}, out_dir={str(self.out_dir)!r})"

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> str:
        """Check the output files, serve the page; return the URL to open."""
        for path in (self.private_key_file, self.webhook_secret_file, self.config_file):
            if path.exists() or path.is_symlink():
                raise SetupError(f"{path} exists already; move it away or choose another --out-dir")
        try:
            self.out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise SetupError(f"cannot create {self.out_dir}: {exc.strerror}") from None
        try:
            server = ThreadingHTTPServer((self._host, self._port), _handler_for(self))
        except OSError as exc:
            raise SetupError(f"cannot listen on {self._host}:{self._port}: {exc.strerror}") from None
        server.daemon_threads = True
        port = server.server_address[1]
        self.url = f"http://{self._host}:{port}"
        self._allowed_hosts = {f"{self._host}:{port}", f"localhost:{port}"}
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="github-app-setup", daemon=True)
        self._thread.start()
        return self.url

    def wait(self, timeout: float | None = None) -> CreatedApp | None:
        """The created App once the exchange succeeded; None if `timeout` seconds pass first."""
        self._done.wait(timeout)
        return self._result

    def stop(self) -> None:
        """Stop serving."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = self._thread = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- what the page says ------------------------------------------------------------------

    @property
    def state(self) -> str:
        """The CSRF token the form carries and the callback must bring back."""
        return self._state

    @property
    def form_action(self) -> str:
        """GitHub's new-App page, for the person's account or for `org`, with our state."""
        path = f"/organizations/{self.org}/settings/apps/new" if self.org else "/settings/apps/new"
        return f"{self.github_url}{path}?{urllib.parse.urlencode({'state': self._state})}"

    def manifest(self) -> dict[str, Any]:
        """The manifest the form posts."""
        return build_manifest(self._manifest, f"{self.url}/callback", webhook_url=self._webhook_url, name=self._name)

    def page(self) -> str:
        manifest = self.manifest()
        account = f"the organization {self.org}" if self.org else "your personal account"
        return _PAGE.format(
            action=html.escape(self.form_action),
            manifest=html.escape(json.dumps(manifest, separators=(",", ":"))),
            pretty=html.escape(json.dumps(manifest, indent=2)),
            github=html.escape(self.github_url),
            account=html.escape(account),
        )

    # -- the callback ------------------------------------------------------------------------

    def callback(self, query: str) -> tuple[int, str]:
        """Check the state, exchange the code, write the files: (HTTP status, page text)."""
        params = urllib.parse.parse_qs(query, keep_blank_values=True)
        state = params.get("state", [""])[0]
        code = params.get("code", [""])[0]
        if not hmac.compare_digest(state.encode(), self._state.encode()):
            return 400, ("This callback does not carry the state of this setup, so it did not come from "
                         "the form this server showed. Nothing was exchanged.")
        if not _CODE.fullmatch(code):
            return 400, "The callback carries no valid code. Nothing was exchanged."
        with self._lock:
            if self._result is not None:
                return 409, f"The App {self._result.name} was created already; this server is done."
            try:
                conversion = self._exchange(code)
                created = self._write(conversion)
            except SetupError as exc:
                return 502, str(exc)
            self._result = created
        return 200, (f"Created the GitHub App {created.name} (id {created.app_id}). Its private key and "
                     f"webhook secret are in {self.out_dir}. Next, install it on your repositories: "
                     f"{created.html_url}/installations/new")

    def finish(self) -> None:
        """Called once the success page is sent: `wait` returns."""
        if self._result is not None:
            self._done.set()

    def _exchange(self, code: str) -> dict[str, Any]:
        url = f"{self.api_url}/app-manifests/{urllib.parse.quote(code, safe='')}/conversions"
        headers = {"Accept": "application/vnd.github+json", "X-GitHub-Api-Version": API_VERSION,
                   "User-Agent": USER_AGENT}
        try:
            response = httpx.post(url, headers=headers, timeout=self._http_timeout)
        except httpx.HTTPError as exc:
            raise SetupError(f"could not reach GitHub at {self.api_url}: {type(exc).__name__}") from None
        if response.status_code != 201:
            hint = (" The code was used already or has expired (a code converts once, within an hour). "
                    "If GitHub created the App, generate a private key and a webhook secret in its "
                    "settings, or delete it and run this again.") if response.status_code == 404 else ""
            raise SetupError(f"GitHub refused the code: {response.status_code} {_message(response)}.{hint}")
        try:
            data = response.json()
            conversion = {
                "id": int(data["id"]),
                "slug": str(data["slug"]),
                "name": str(data["name"]),
                "html_url": str(data["html_url"]),
                "pem": str(data["pem"]),
                "webhook_secret": str(data["webhook_secret"] or ""),
            }
        except (ValueError, KeyError, TypeError):
            raise SetupError("GitHub answered the code exchange with an unexpected body") from None
        if "PRIVATE KEY" not in conversion["pem"] or not conversion["webhook_secret"]:
            raise SetupError("GitHub's answer lacks the App's private key or webhook secret")
        return conversion

    def _write(self, conversion: dict[str, Any]) -> CreatedApp:
        try:
            _write_private(self.private_key_file, conversion["pem"].rstrip("\n") + "\n")
            _write_private(self.webhook_secret_file, conversion["webhook_secret"] + "\n")
            snippet = {"github": {
                "api_url": self.api_url,
                "app_id": conversion["id"],
                "private_key_file": str(self.private_key_file),
                "webhook_secret_file": str(self.webhook_secret_file),
                "bot_login": f"{conversion['slug']}[bot]",  # comments by the App itself are never commands
            }}
            header = (f"# Written by `deploybot github-app create` for the GitHub App {json.dumps(conversion['name'])}"
                      f" (id {conversion['id']}).\n"
                      "# Merge the github: section into deploybot's config. The key and the webhook secret\n"
                      "# stay in their own files (mode 0600); on AWS, put their contents in Secrets Manager.\n")
            _write_private(self.config_file, header + yaml.safe_dump(snippet, sort_keys=False), mode=0o644)
        except OSError as exc:
            raise SetupError(f"cannot write the App's credentials to {self.out_dir}: {exc.strerror}") from None
        return CreatedApp(conversion["id"], conversion["slug"], conversion["name"], conversion["html_url"],
                          self.private_key_file, self.webhook_secret_file, self.config_file)


def _write_private(path: Path, text: str, mode: int = 0o600) -> None:
    """Create a new file with exactly `mode` from the first byte; never follow or replace anything."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        os.fchmod(fd, mode)  # the umask may only have narrowed it; make it exact
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _message(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return response.reason_phrase
    return str(data.get("message", "")) if isinstance(data, dict) else response.reason_phrase


_PAGE = """<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>Create deploybot's GitHub App</title></head>
<body>
<h1>Create deploybot's GitHub App</h1>
<p>The button sends deploybot's App manifest to {github}, where you review the App, may change
its name, and create it on {account}. GitHub then sends your browser back here, and deploybot
saves the App's private key and webhook secret on this machine.</p>
<form action="{action}" method="post">
<input type="hidden" name="manifest" value="{manifest}">
<button type="submit">Create the App on GitHub</button>
</form>
<details><summary>The manifest</summary><pre>{pretty}</pre></details>
</body>
</html>
"""

_RESULT_PAGE = """<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>deploybot GitHub App setup</title></head>
<body><p>{message}</p></body>
</html>
"""


def _handler_for(setup: GitHubAppSetup) -> type[BaseHTTPRequestHandler]:
    form_origin = "{0.scheme}://{0.netloc}".format(urllib.parse.urlsplit(setup.github_url))

    class Handler(BaseHTTPRequestHandler):
        server_version = "deploybot-github-app-setup"
        sys_version = ""

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.headers.get("Host", "") not in setup._allowed_hosts:
                self._send(400, _RESULT_PAGE.format(message="Unexpected Host header."))
                return
            path, _, query = self.path.partition("?")
            if path == "/":
                self._send(200, setup.page(), csp_form_action=form_origin)
            elif path == "/callback":
                status, message = setup.callback(query)
                self._send(status, _RESULT_PAGE.format(message=html.escape(message)))
                if status == 200:
                    setup.finish()
            else:
                self._send(404, _RESULT_PAGE.format(message="Not found."))

        def do_POST(self) -> None:  # noqa: N802
            self._send(405, _RESULT_PAGE.format(message="Method not allowed."))

        do_PUT = do_DELETE = do_PATCH = do_POST  # noqa: N815

        def _send(self, status: int, body: str, csp_form_action: str = "'none'") -> None:
            data = body.encode()
            self.send_response(status, HTTPStatus(status).phrase)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("Referrer-Policy", "no-referrer")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Content-Security-Policy",
                             f"default-src 'none'; form-action {csp_form_action}; frame-ancestors 'none'")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass  # the request line carries the one-time code: keep it out of the terminal

    return Handler


# -- the command -----------------------------------------------------------------------------


def add_create_parser(commands: Any) -> None:
    """`deploybot github-app create`, under the top-level subcommands of bot.cli."""
    github_app = commands.add_parser("github-app", help="set up deploybot's GitHub App")
    actions = github_app.add_subparsers(dest="github_app_command", required=True)
    create = actions.add_parser(
        "create", help="register the App from app-manifest.yml with GitHub's manifest flow",
        description="Serve a local page that registers deploybot's GitHub App from its manifest, then "
                    "write the App's id, private key and webhook secret where deploybot's config expects them.")
    create.add_argument("--manifest", default=str(DEFAULT_MANIFEST),
                        help="the App manifest (default: app-manifest.yml of this deploybot)")
    create.add_argument("--out-dir", default=".",
                        help=f"where to write {PRIVATE_KEY_FILE}, {WEBHOOK_SECRET_FILE} and {CONFIG_FILE}")
    create.add_argument("--org", help="create the App on this organization (default: your personal account)")
    create.add_argument("--name", help="the App's name (must be unique on GitHub; default: the manifest's)")
    create.add_argument("--webhook-url", help="https://<your host>/webhooks/github (default: the manifest's)")
    create.add_argument("--github-url", default=DEFAULT_GITHUB_URL,
                        help="GitHub's web URL; GitHub Enterprise Server: https://HOST")
    create.add_argument("--api-url", default=DEFAULT_API_URL,
                        help="GitHub's API URL; GitHub Enterprise Server: https://HOST/api/v3")
    create.add_argument("--port", type=int, default=0, help="local port to serve on (default: a free one)")
    create.add_argument("--timeout", type=float, default=900.0,
                        help="give up after this many seconds (default: 900)")


def run_create(args: argparse.Namespace) -> int:
    """Run the flow for `deploybot github-app create`: 0 created, 1 timed out, 2 cannot start."""
    try:
        setup = GitHubAppSetup(
            load_manifest(args.manifest), args.out_dir, github_url=args.github_url, api_url=args.api_url,
            org=args.org, port=args.port, webhook_url=args.webhook_url, name=args.name,
        )
        with setup:
            url = setup.start()
            webhook = setup.manifest()["hook_attributes"]["url"]
            if PLACEHOLDER_HOST in webhook:
                print(f"note: the webhook URL is the placeholder {webhook}; pass --webhook-url, or set it "
                      "in the App's settings once deploybot runs", file=sys.stderr)
            print(f"Open {url}/ in a browser on this machine and press the button to create the App.", flush=True)
            created = setup.wait(args.timeout)
    except SetupError as exc:
        print(f"deploybot: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("deploybot: interrupted; no App credentials were written", file=sys.stderr)
        return 130
    if created is None:
        print(f"deploybot: no App was created within {args.timeout:g} seconds", file=sys.stderr)
        return 1
    print(f"Created the GitHub App {created.name} (id {created.app_id}): {created.html_url}")
    print(f"  private key:    {created.private_key_file} (mode 0600)")
    print(f"  webhook secret: {created.webhook_secret_file} (mode 0600)")
    print(f"  config snippet: {created.config_file}")
    print(f"Next: install the App on your repositories: {created.html_url}/installations/new")
    return 0
