"""What the local forge fakes (`bot.sandbox.github_fake`, `bot.sandbox.gitlab_fake`) share.

`LocalForge` is their base class. It serves the subclass's Starlette app (`self.app`)
over real HTTP on a free port of 127.0.0.1 (a `ServerThread`), logs every API request
it answers (`requests`, via the `RequestLog` middleware) and keeps the books on webhook
deliveries (`deliveries`, `redeliver`). A subclass says how to read a payload's action
(`_action`) and which headers a delivery carries (`_webhook_headers`).

Fault injection (`inject_faults`, served by the `FaultInjector` middleware): the next API
requests that match a method and a path pattern get the `Fault`s given, in order, instead of
the real answer: a 5xx, a rate limit with its headers, a late answer (`delay` beyond the
client's timeout is a timeout), or an error after the work was done (`handled`). A subclass
says which requests pass its authentication (`_fault_authorized`: others get the real 401
and use up no fault) and what an error body looks like by default (`_fault_body`). Injected
answers are logged in `requests` like any other.

The git helpers below read and write the real bare repositories the fakes stand on.
"""

from __future__ import annotations

import asyncio
import http
import json
import re
import socket
import subprocess
import threading
import time
import uuid
import zlib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, NamedTuple, Self

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class RequestRecord(NamedTuple):
    """One API request a fake answered (FakeGitLab logs the path as sent, percent-encoding and all)."""

    method: str
    path: str
    status: int


@dataclass(frozen=True)
class Fault:
    """An answer a fake gives instead of the real one (see `LocalForge.inject_faults`).

    - `status`, `headers`: the answer's; `body` a dict (JSON) or a str (text/plain); None:
      the fake's usual error body for that status (GitHub `{"message", "documentation_url"}`,
      GitLab `{"message": "500 Internal Server Error"}`).
    - `delay`: seconds before the answer starts; longer than the client's timeout, the
      client sees a timeout.
    - `handled`: the real handler runs first (a comment is made, a status set) and its
      answer is replaced by this one: a forge that did the work but answered an error.
    """

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: dict[str, Any] | str | None = None
    delay: float = 0.0
    handled: bool = False


@dataclass
class _FaultRule:
    method: str  # upper case, or "*"
    pattern: re.Pattern[str]
    answers: deque[Fault]


@dataclass(frozen=True)
class Delivery:
    """One webhook delivery; `status` is 0 when the receiver could not be reached.

    A redelivery repeats `delivery_id` (GitHub's `X-GitHub-Delivery`, GitLab's `Idempotency-Key`).
    """

    event: str
    action: str
    delivery_id: str
    status: int
    body: bytes = field(repr=False)
    redelivery: bool = False


class ServerThread:
    """An ASGI app served over HTTP on a free port of 127.0.0.1 by uvicorn, in a daemon thread."""

    def __init__(self, app: ASGIApp, thread_name: str, owner: str) -> None:
        self.app = app
        self.thread_name = thread_name
        self.owner = owner  # names the server in errors: "FakeGitHub's HTTP server did not start"
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    def start(self) -> str:
        """Serve in the background; return the base URL once the server has started."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # lets asyncio set TCP_NODELAY
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        config = uvicorn.Config(self.app, log_config=None, log_level="warning", access_log=False, lifespan="off")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=self.thread_name, daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                sock.close()
                raise RuntimeError(f"{self.owner}'s HTTP server did not start")
            time.sleep(0.01)
        self._server, self._thread, self._socket = server, thread, sock
        return f"http://127.0.0.1:{sock.getsockname()[1]}"

    def stop(self) -> None:
        """Stop the server, wait for its thread and close the socket."""
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = self._socket = None


class LocalForge:
    """A forge fake's HTTP server thread, request log and webhook bookkeeping; see the module docstring."""

    app: Starlette  # built by the subclass
    _thread_name: ClassVar[str] = "fake-forge"

    def __init__(self) -> None:
        self.url: str | None = None
        self._lock = threading.RLock()
        self._requests: list[RequestRecord] = []
        self._deliveries: list[Delivery] = []
        self._webhook: tuple[str, Any] | None = None  # receiver URL, and what the subclass signs with
        self._faults: list[_FaultRule] = []
        self._server: ServerThread | None = None
        self._http = httpx.Client(timeout=10.0)  # GitHub and GitLab both give a receiver ten seconds

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> str:
        """Serve on a free port of 127.0.0.1 in a background thread; return the base URL."""
        if self._server is not None:
            raise RuntimeError(f"{type(self).__name__} is already running")
        server = ServerThread(self.app, self._thread_name, owner=type(self).__name__)
        self.url = server.start()
        self._server = server
        return self.url

    def stop(self) -> None:
        """Stop the HTTP server and close connections."""
        if self._server is not None:
            self._server.stop()
        self._server = None
        self._http.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- webhooks ----------------------------------------------------------------------------

    @property
    def deliveries(self) -> list[Delivery]:
        """Every webhook sent so far, oldest first."""
        with self._lock:
            return list(self._deliveries)

    def redeliver(self, delivery_id: str) -> int:
        """Send a past delivery again, same body and delivery id (GitHub's "Redeliver", GitLab's "Resend request")."""
        with self._lock:
            original = next((d for d in self._deliveries if d.delivery_id == delivery_id), None)
        if original is None:
            raise KeyError(f"no delivery {delivery_id}")
        return self._send(original.event, original.action, original.body, delivery_id, redelivery=True)

    def replay(self, delivery_id: str) -> int:
        """Send a past delivery's body again under a new delivery id: what someone who captured it can do.

        The signature covers the body only (GitHub) or is a fixed token (GitLab), so it still holds.
        """
        with self._lock:
            original = next((d for d in self._deliveries if d.delivery_id == delivery_id), None)
        if original is None:
            raise KeyError(f"no delivery {delivery_id}")
        return self._send(original.event, original.action, original.body, str(uuid.uuid4()))

    def _action(self, payload: dict[str, Any]) -> str:
        """The action a payload reports (what `Delivery.action` records)."""
        raise NotImplementedError

    def _webhook_headers(self, key: Any, event: str, body: bytes, delivery_id: str) -> dict[str, str]:
        """The headers of one delivery; `key` is what the subclass's `set_webhook` stored next to the URL."""
        raise NotImplementedError

    def _deliver(self, event: str, payload: dict[str, Any]) -> int | None:
        # Called without the lock held: the receiver may call back into this fake before answering.
        if self._webhook is None:
            return None
        body = json.dumps(payload).encode()
        return self._send(event, self._action(payload), body, str(uuid.uuid4()))

    def _send(self, event: str, action: str, body: bytes, delivery_id: str, redelivery: bool = False) -> int:
        with self._lock:
            if self._webhook is None:
                raise RuntimeError("no webhook is set")
            url, key = self._webhook
        headers = self._webhook_headers(key, event, body, delivery_id)
        try:
            status = self._http.post(url, content=body, headers=headers).status_code
        except httpx.HTTPError:
            status = 0  # the forges record "couldn't deliver" the same way: no response code
        with self._lock:
            self._deliveries.append(Delivery(event, action, delivery_id, status, body, redelivery))
        return status

    # -- faults --------------------------------------------------------------------------------

    def inject_faults(self, method: str, path_regex: str, responses: list[Fault]) -> None:
        """The next `len(responses)` API requests that match get these answers, in order.

        A request matches when its method is `method` ("*": any) and `re.search(path_regex, path)`
        finds the path as `requests` logs it (no query string; FakeGitLab keeps the percent-
        encoding, `projects/acme%2Finfra/...`). A request the fake's authentication refuses gets
        its real 401/404 and uses up no fault. Rules apply in the order they were injected; each
        request uses up at most one fault.
        """
        if not responses:
            return
        rule = _FaultRule(method.upper(), re.compile(path_regex), deque(responses))
        with self._lock:
            self._faults.append(rule)

    def clear_faults(self) -> None:
        """Forget every fault not yet served."""
        with self._lock:
            self._faults.clear()

    @property
    def pending_faults(self) -> int:
        """How many injected answers are still to be served."""
        with self._lock:
            return sum(len(rule.answers) for rule in self._faults)

    def _take_fault(self, method: str, path: str, scope: Scope) -> Fault | None:
        """The fault this request gets, if any (used up here)."""
        with self._lock:
            for rule in self._faults:
                if rule.answers and rule.method in ("*", method.upper()) and rule.pattern.search(path):
                    if not self._fault_authorized(Request(scope)):
                        return None  # the real answer (401, 404) comes from the app
                    fault = rule.answers.popleft()
                    self._faults = [r for r in self._faults if r.answers]
                    return fault
        return None

    def _fault_authorized(self, request: Request) -> bool:
        """Whether the request passes the fake's authentication (faults come after that check)."""
        return True

    def _fault_body(self, status: int) -> dict[str, Any]:
        """The error body of a fault that names none."""
        return {"message": _phrase(status)}

    def _fault_response(self, fault: Fault) -> Response:
        body: dict[str, Any] | str = self._fault_body(fault.status) if fault.body is None else fault.body
        if isinstance(body, str):
            return PlainTextResponse(body, status_code=fault.status, headers=fault.headers)
        return JSONResponse(body, status_code=fault.status, headers=fault.headers)

    # -- records for assertions ---------------------------------------------------------------

    @property
    def requests(self) -> list[RequestRecord]:
        """Every API request answered so far: (method, path, status)."""
        with self._lock:
            return list(self._requests)

    def _record_request(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self._requests.append(RequestRecord(method, path, status))


# -- HTTP plumbing ---------------------------------------------------------------------------


class RequestLog:
    """ASGI middleware that records (method, path, status) of every request.

    With `raw_path` the path is recorded as sent (percent-encoding kept), else as decoded.
    """

    def __init__(self, app: ASGIApp, record: Any, raw_path: bool = False) -> None:
        self.app = app
        self.record = record
        self.raw_path = raw_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = raw_path(scope) if self.raw_path else scope["path"]
        recorded = False

        async def send_recording(message: Message) -> None:
            nonlocal recorded
            if message["type"] == "http.response.start":
                # Record before the client can see the answer, so a test reading the log right
                # after its call returns always finds the request there.
                self.record(scope["method"], path, message["status"])
                recorded = True
            await send(message)

        try:
            await self.app(scope, receive, send_recording)
        finally:
            if not recorded:
                self.record(scope["method"], path, 500)


class FaultInjector:
    """ASGI middleware that serves `forge`'s injected faults (place it inside `RequestLog`).

    `raw_path` as for RequestLog: which form of the path the fault patterns see.
    """

    def __init__(self, app: ASGIApp, forge: LocalForge, raw_path: bool = False) -> None:
        self.app = app
        self.forge = forge
        self.raw_path = raw_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = raw_path(scope) if self.raw_path else scope["path"]
        fault = self.forge._take_fault(scope["method"], path, scope)
        if fault is None:
            await self.app(scope, receive, send)
            return
        if fault.handled:
            async def discard(message: Message) -> None:
                pass

            await self.app(scope, receive, discard)
        else:
            await _drain(receive)
        if fault.delay > 0:
            await asyncio.sleep(fault.delay)
        await self.forge._fault_response(fault)(scope, receive, send)


async def _drain(receive: Receive) -> None:
    """Read the request body the fault answers without looking at."""
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def raw_path(scope: Scope) -> str:
    """The request path as sent, percent-encoding kept (`group%2Fproject` stays one segment), no query."""
    return scope.get("raw_path", scope["path"].encode()).decode("latin-1").split("?", 1)[0]


def stable_id(name: str) -> int:
    """A positive id that stays the same for a name across runs."""
    return zlib.crc32(name.encode()) % 10**8 + 1


# -- git -------------------------------------------------------------------------------------


def git_bytes(git_dir: Path, *args: str, check: bool = True) -> bytes:
    result = subprocess.run(["git", "--git-dir", str(git_dir), *args], capture_output=True, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {result.stderr.decode(errors='replace').strip()}")
    return result.stdout


def git(git_dir: Path, *args: str, check: bool = True) -> str:
    return git_bytes(git_dir, *args, check=check).decode()


def rev_parse(git_dir: Path, ref: str) -> str | None:
    """The commit a ref or SHA names, or None."""
    if not ref or ref.startswith("-"):
        return None
    out = git(git_dir, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}", check=False).strip()
    return out or None


def branch_heads(git_dir: Path, head_ref: str, base_ref: str, where: str) -> tuple[str, str]:
    """The commits a head and a base branch point at; ValueError "{where} has no branch 'x'" if one is missing."""
    head = rev_parse(git_dir, f"refs/heads/{head_ref}")
    base = rev_parse(git_dir, f"refs/heads/{base_ref}")
    if head is None or base is None:
        raise ValueError(f"{where} has no branch {head_ref if head is None else base_ref!r}")
    return head, base


def count_commits(git_dir: Path, base: str, head: str) -> int:
    """How many commits `head` has that `base` has not."""
    return int(git(git_dir, "rev-list", "--count", f"{base}..{head}").strip())


class RawChange(NamedTuple):
    """One file of `git diff --raw`; a rename or copy names both paths, anything else the same path twice."""

    old_mode: str
    new_mode: str
    old_sha: str
    new_sha: str
    letter: str  # git's status letter: A, D, M, R, C, T
    old_path: str
    new_path: str


def raw_changes(git_dir: Path, *revisions: str) -> list[RawChange]:
    """`git diff --raw` between revisions, renames detected, in git's order."""
    raw = git(git_dir, "diff", "--raw", "-z", "--no-abbrev", "-M", *revisions).split("\x00")
    changes: list[RawChange] = []
    i = 0
    while i < len(raw) and raw[i].startswith(":"):
        old_mode, new_mode, old_sha, new_sha, status = raw[i][1:].split()
        if status[0] in "RC":
            old_path, new_path, i = raw[i + 1], raw[i + 2], i + 3
        else:
            old_path = new_path = raw[i + 1]
            i += 2
        changes.append(RawChange(old_mode, new_mode, old_sha, new_sha, status[0], old_path, new_path))
    return changes


class CommitInfo(NamedTuple):
    sha: str
    tree: str
    parents: list[str]
    author_name: str
    author_email: str
    authored_date: str  # ISO 8601, as git prints it
    committer_name: str
    committer_email: str
    committed_date: str
    message: str  # stripped of surrounding white space

    @property
    def title(self) -> str:
        return self.message.split("\n", 1)[0]


def commit_info(git_dir: Path, sha: str) -> CommitInfo:
    fields = git(git_dir, "show", "-s", "--format=%H%x00%T%x00%P%x00%an%x00%ae%x00%aI%x00%cn%x00%ce%x00%cI%x00%B", sha)
    sha, tree, parents, an, ae, ad, cn, ce, cd, message = fields.split("\x00", 9)
    return CommitInfo(sha, tree, parents.split(), an, ae, ad, cn, ce, cd, message.strip())


def _merge_tree(git_dir: Path, base: str, head: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["git", "--git-dir", str(git_dir), "merge-tree", "--write-tree", base, head], capture_output=True, check=False
    )


def merge_conflicts(git_dir: Path, base_ref: str, head: str) -> bool:
    """Whether merging `head` into the branch `base_ref` conflicts."""
    base = rev_parse(git_dir, f"refs/heads/{base_ref}")
    if base is None:
        return False
    return _merge_tree(git_dir, base, head).returncode == 1


def merge_commit(git_dir: Path, base_ref: str, head: str, message: str, committer: tuple[str, str]) -> str | None:
    """Merge head into the branch `base_ref` like a forge's merge button, as `committer` (name, email).

    Returns the merge commit, or None if git cannot make one.
    """
    base = rev_parse(git_dir, f"refs/heads/{base_ref}")
    if base is None:
        return None
    merged = _merge_tree(git_dir, base, head)
    if merged.returncode != 0:
        return None
    tree = merged.stdout.split(b"\n", 1)[0].strip().decode()
    name, email = committer
    sha = git(
        git_dir, "-c", f"user.name={name}", "-c", f"user.email={email}",
        "commit-tree", tree, "-p", base, "-p", head, "-m", message,
    ).strip()
    git(git_dir, "update-ref", f"refs/heads/{base_ref}", sha, base)
    return sha
