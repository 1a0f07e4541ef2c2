"""`deploybot run` against a local stand-in of the trigger API, over real HTTP.

`FakeTriggerApi` serves `POST /api/v1/runs`, `GET /api/v1/runs/{id}` and the streamed
`GET /api/v1/runs/{id}/log` with the server's JSON shapes, and checks credentials the
way the server does: HMAC headers verified with `bot.ci.auth.hmac_signature` (5-minute
window, each nonce once), or a bearer token it knows, each accepted once (the server
takes a token's `jti` once). Each run follows a script played in a thread, so tests can
hold a run between two chunks of output, or keep it awaiting approval.
`FakeActionsTokenService` stands in for GitHub Actions' OIDC token endpoint.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from bot.ci import cli as run_cli
from bot.ci.auth import hmac_signature

KEY_ID = "jenkins"
KEY = "k3y-" + "0123456789abcdef" * 3  # 52 bytes: the server wants at least 32
REPO = "acme/infrastructure-live"
SHA = "4d2c9a1e0f7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d"
NONCE = re.compile(r"[A-Za-z0-9._~+/=-]{16,128}")


# -- local HTTP servers ----------------------------------------------------------------------


class _Served:
    """A Starlette app under uvicorn on 127.0.0.1, in a thread."""

    def __init__(self, app: Starlette) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        config = uvicorn.Config(app, log_config=None, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        self.socket = sock
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.socket.close()


@dataclass
class FakeRun:
    id: int
    body: dict[str, Any]
    status: str
    sha: str = SHA
    summary: str = ""
    has_changes: bool = False
    log: bytearray = field(default_factory=bytearray)
    approval: dict[str, Any] | None = None
    decided: threading.Event = field(default_factory=threading.Event)

    def view(self) -> dict[str, Any]:
        return {
            "id": self.id, "repo": self.body["repo"], "sha": self.sha,
            "project": self.body.get("project") or self.body.get("dir"), "command": self.body["command"],
            "requested_by": KEY_ID, "status": self.status, "summary": self.summary,
            "has_changes": self.has_changes, "output": self.log.decode(), "approval": self.approval,
        }


ENDED = {"succeeded", "failed", "cancelled", "interrupted", "refused", "rejected"}
Script = Callable[["FakeTriggerApi", FakeRun], None]


class FakeTriggerApi:
    """The trigger API's HTTP contract; see the module docstring."""

    def __init__(self, *, hmac_keys: dict[str, bytes] | None = None, reusable_tokens: bool = False) -> None:
        self.hmac_keys = hmac_keys if hmac_keys is not None else {KEY_ID: KEY.encode()}
        self.tokens: set[str] = set()  # bearer tokens it accepts
        self.reusable_tokens = reusable_tokens
        self.used: set[str] = set()  # nonces and tokens already accepted
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.refusals: list[str] = []
        self.runs: dict[int, FakeRun] = {}
        self.script: Script | None = None
        self.apply_waits = True  # an apply starts awaiting approval
        self.create_error: tuple[int, str] | None = None
        self.unavailable_gets = 0  # answer this many GETs of a run with 503 first
        self.cut_logs = 0  # end this many log streams early, after what is written so far
        self.log_requests = 0
        self.lock = threading.Lock()
        self.app = Starlette(routes=[
            Route("/api/v1/runs", self.create, methods=["POST"]),
            Route("/api/v1/runs/{run_id:int}", self.get, methods=["GET"]),
            Route("/api/v1/runs/{run_id:int}/log", self.log, methods=["GET"]),
        ])
        self._served = _Served(self.app)
        self.url = self._served.url

    def stop(self) -> None:
        for run in self.runs.values():
            run.decided.set()
        self._served.stop()

    # -- what tests do to a run --

    def set(self, run: FakeRun, **changes: Any) -> None:
        with self.lock:
            for name, value in changes.items():
                setattr(run, name, value)

    def write(self, run: FakeRun, chunk: bytes) -> None:
        with self.lock:
            run.log += chunk

    def decide(self, run_id: int, approve: bool, by: str) -> None:
        run = self.runs[run_id]
        self.set(run, status="queued" if approve else "rejected",
                 approval={"state": "approved" if approve else "rejected", "by": by, "at": time.time()})
        run.decided.set()

    # -- auth, as the server checks it --

    def _authenticate(self, request: Request, body: bytes) -> str | None:
        headers = request.headers
        self.requests.append((request.method, request.url.path, dict(headers)))
        authorization = headers.get("authorization")
        if authorization is not None:
            scheme, _, token = authorization.partition(" ")
            if scheme != "Bearer" or token not in self.tokens:
                return "token is not accepted"
            with self.lock:
                if token in self.used and not self.reusable_tokens:
                    return "token was already used"
                self.used.add(token)
            return None
        key_id, ts, nonce, signature = (headers.get(f"x-deploybot-{h}") for h in
                                        ("key-id", "timestamp", "nonce", "signature"))
        if None in (key_id, ts, nonce, signature):
            return "no credentials"
        key = self.hmac_keys.get(key_id)
        if key is None:
            return "unknown key id"
        if not ts.isdigit() or abs(time.time() - int(ts)) > 300:
            return "request timestamp is outside the 5-minute window"
        if not NONCE.fullmatch(nonce):
            return "bad nonce"
        expected = hmac_signature(key, request.method, request.url.path, ts, nonce, body)
        if not hmac.compare_digest(expected, signature):
            return "request signature is invalid"
        with self.lock:
            if nonce in self.used:
                return "nonce was already used"
            self.used.add(nonce)
        return None

    async def _refused(self, request: Request, body: bytes = b"") -> Response | None:
        problem = self._authenticate(request, body)
        if problem:
            self.refusals.append(problem)
            return JSONResponse({"error": problem}, status_code=401)
        return None

    # -- endpoints --

    async def create(self, request: Request) -> Response:
        body = await request.body()
        if refused := await self._refused(request, body):
            return refused
        data = json.loads(body)
        assert set(data) <= {"repo", "ref", "sha", "project", "dir", "workspace", "command", "forge"}, data
        if self.create_error:
            status, message = self.create_error
            return JSONResponse({"error": message}, status_code=status)
        with self.lock:
            run_id = len(self.runs) + 1
            waits = data["command"] == "apply" and self.apply_waits
            run = FakeRun(run_id, data, "awaiting_approval" if waits else "queued")
            if waits:
                run.approval = {"state": "pending"}
            self.runs[run_id] = run
        if self.script:
            threading.Thread(target=self.script, args=(self, run), daemon=True).start()
        url = f"{self.url}/api/v1/runs/{run_id}"
        return JSONResponse({"id": run_id, "status": run.status, "url": url, "log_url": f"{url}/log"},
                            status_code=201)

    async def get(self, request: Request) -> Response:
        if refused := await self._refused(request):
            return refused
        with self.lock:
            if self.unavailable_gets:
                self.unavailable_gets -= 1
                return JSONResponse({"error": "try again"}, status_code=503)
        run = self.runs.get(request.path_params["run_id"])
        if run is None:
            return JSONResponse({"error": "no such run"}, status_code=404)
        with self.lock:
            return JSONResponse(run.view())

    async def log(self, request: Request) -> Response:
        if refused := await self._refused(request):
            return refused
        run = self.runs.get(request.path_params["run_id"])
        if run is None:
            return JSONResponse({"error": "no such run"}, status_code=404)
        with self.lock:
            self.log_requests += 1
            if self.cut_logs:
                self.cut_logs -= 1
                return Response(bytes(run.log), media_type="text/plain; charset=utf-8")

        async def stream() -> Iterator[bytes]:
            offset = 0
            while True:
                with self.lock:
                    data, ended = bytes(run.log[offset:]), run.status in ENDED
                offset += len(data)
                if data:
                    yield data
                elif ended:
                    return
                await asyncio.sleep(0.01)

        return StreamingResponse(stream(), media_type="text/plain; charset=utf-8")


class FakeActionsTokenService:
    """GitHub Actions' OIDC token endpoint: `GET …/idtoken?api-version=2.0&audience=…`."""

    def __init__(self, api: FakeTriggerApi, request_token: str, audience: str = "deploybot") -> None:
        self.api = api
        self.request_token = request_token
        self.audience = audience
        self.issued: list[str] = []
        self.calls: list[dict[str, str]] = []
        self._served = _Served(Starlette(routes=[Route("/_apis/idtoken", self.token, methods=["GET"])]))
        self.request_url = f"{self._served.url}/_apis/idtoken?api-version=2.0"

    async def token(self, request: Request) -> Response:
        self.calls.append(dict(request.query_params))
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or token != self.request_token:
            return JSONResponse({"message": "Unauthorized"}, status_code=401)
        if request.query_params.get("api-version") != "2.0":
            return JSONResponse({"message": "api-version"}, status_code=400)
        audience = request.query_params.get("audience")
        value = f"eyJhbGciOiJSUzI1NiJ9.{audience}.{len(self.issued)}-{time.monotonic_ns()}"
        self.issued.append(value)
        if audience == self.audience:  # the server trusts only tokens for its audience
            self.api.tokens.add(value)
        return JSONResponse({"count": 1, "value": value})

    def stop(self) -> None:
        self._served.stop()


# -- scripts ---------------------------------------------------------------------------------


def plan_script(chunks: list[bytes], *, status: str = "succeeded", has_changes: bool = False,
                summary: str = "", gate: threading.Event | None = None) -> Script:
    """Queued → running, writes the chunks (waiting for `gate` before the last one), then ends."""

    def script(api: FakeTriggerApi, run: FakeRun) -> None:
        time.sleep(0.05)
        api.set(run, status="running")
        for i, chunk in enumerate(chunks):
            if gate is not None and i == len(chunks) - 1:
                gate.wait(10)
            api.write(run, chunk)
            time.sleep(0.02)
        api.set(run, status=status, has_changes=has_changes, summary=summary)

    return script


def apply_script(chunks: list[bytes], *, status: str = "succeeded", summary: str = "") -> Script:
    """Waits while the run awaits approval (as the server's worker does), then runs like a plan."""

    def script(api: FakeTriggerApi, run: FakeRun) -> None:
        if run.status == "awaiting_approval":
            run.decided.wait(30)
            if run.status != "queued":
                return
        plan_script(chunks, status=status, summary=summary)(api, run)

    return script


# -- running the CLI -------------------------------------------------------------------------


@dataclass
class Result:
    code: int
    out: bytes
    err: str


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(run_cli, "RETRY_DELAYS", (0.01, 0.02, 0.04))


@pytest.fixture
def api() -> Iterator[FakeTriggerApi]:
    fake = FakeTriggerApi()
    yield fake
    fake.stop()


def hmac_env(**extra: str) -> dict[str, str]:
    return {"DEPLOYBOT_HMAC_KEY_ID": KEY_ID, "DEPLOYBOT_HMAC_KEY": KEY, **extra}


def invoke(api: FakeTriggerApi, command: str, *extra: str, env: dict[str, str] | None = None,
           secrets: tuple[str, ...] = (), stdout: io.BytesIO | None = None) -> Result:
    argv = [command, "--repo", REPO, "--ref", "refs/heads/main", "--project", "staging",
            "--server", api.url, "--poll-interval", "0.05", *extra]
    out, err = stdout or io.BytesIO(), io.StringIO()
    code = run_cli.main(argv, env=hmac_env() if env is None else env, stdout=out, stderr=err)
    result = Result(code, out.getvalue(), err.getvalue())
    for secret in (KEY, *secrets):
        assert secret not in result.err and secret.encode() not in result.out, "a secret was printed"
    return result


# -- plan ------------------------------------------------------------------------------------


def test_plan_without_changes_exits_0(api: FakeTriggerApi):
    api.script = plan_script([b"Initializing...\n", b"No changes. Infrastructure is up-to-date.\n"],
                             summary="No changes.")
    result = invoke(api, "plan")
    assert result.code == 0, result.err
    assert result.out == b"Initializing...\nNo changes. Infrastructure is up-to-date.\n"
    assert re.search(rf"run 1 plan staging@{SHA[:8]}: (queued|running)…", result.err)  # progress, as seen
    assert "plan succeeded, no changes — No changes. (exit 0)" in result.err
    assert f"{api.url}/api/v1/runs/1" in result.err
    assert api.runs[1].body == {"repo": REPO, "command": "plan", "ref": "refs/heads/main", "project": "staging"}


def test_plan_with_changes_exits_2(api: FakeTriggerApi):
    api.script = plan_script([b"Plan: 1 to add, 0 to change, 0 to destroy.\n"], has_changes=True,
                             summary="Plan: 1 to add, 0 to change, 0 to destroy.")
    result = invoke(api, "plan", "--sha", SHA.upper())
    assert result.code == 2, result.err
    assert b"Plan: 1 to add" in result.out
    assert "changes present" in result.err
    assert api.runs[1].body["sha"] == SHA  # sent as the server wants it: lower case


@pytest.mark.parametrize("status", ["failed", "cancelled", "interrupted", "refused"])
def test_plan_that_does_not_succeed_exits_1(api: FakeTriggerApi, status: str):
    api.script = plan_script([b"Error: Invalid resource type\n"], status=status, summary="terraform plan failed")
    result = invoke(api, "plan")
    assert result.code == 1
    assert b"Error: Invalid resource type" in result.out
    assert f": {status} — terraform plan failed (exit 1)" in result.err


def test_a_refused_run_exits_1_with_the_servers_reason(api: FakeTriggerApi):
    api.create_error = (403, "caller jenkins may not apply acme/infrastructure-live staging")
    result = invoke(api, "apply")
    assert result.code == 1
    assert "the server refused the apply (HTTP 403: caller jenkins may not apply" in result.err


def test_streaming_output_reaches_stdout_in_order_while_the_run_goes_on(api: FakeTriggerApi):
    gate = threading.Event()
    chunks = [f"line {i}\n".encode() for i in range(1, 6)]
    api.script = plan_script(chunks, has_changes=True, gate=gate)
    out = io.BytesIO()
    results: list[Result] = []
    cli = threading.Thread(target=lambda: results.append(invoke(api, "plan", stdout=out)))
    cli.start()
    deadline = time.monotonic() + 10
    while b"line 4\n" not in out.getvalue():  # shown before the run has even finished
        assert time.monotonic() < deadline, "the log did not stream"
        time.sleep(0.01)
    assert api.runs[1].status == "running"
    assert out.getvalue() == b"".join(chunks[:4])
    gate.set()
    cli.join(10)
    assert results[0].code == 2
    assert results[0].out == b"".join(chunks)  # every chunk once, in order


def test_a_log_cut_off_midway_is_resumed_without_repeating(api: FakeTriggerApi):
    """The server may end a log stream early (e.g. a proxy's timeout): the CLI reads on from where it was."""
    api.cut_logs = 2
    gate = threading.Event()
    api.script = plan_script([b"one\n", b"two\n", b"three\n"], has_changes=False, gate=gate)
    threading.Timer(0.5, gate.set).start()
    result = invoke(api, "plan")
    assert result.code == 0, result.err
    assert result.out == b"one\ntwo\nthree\n"
    assert api.log_requests >= 3


# -- apply -----------------------------------------------------------------------------------


def test_apply_waits_for_approval_then_streams_and_exits_0(api: FakeTriggerApi):
    api.script = apply_script([b"null_resource.a: Creating...\n", b"Apply complete! Resources: 1 added.\n"],
                              summary="Apply complete! Resources: 1 added, 0 changed, 0 destroyed.")
    err = io.StringIO()
    results: list[int] = []
    out = io.BytesIO()
    argv = ["apply", "--repo", REPO, "--ref", "refs/heads/main", "--sha", SHA, "--project", "staging",
            "--server", api.url, "--poll-interval", "0.05"]
    cli = threading.Thread(target=lambda: results.append(run_cli.main(argv, env=hmac_env(), stdout=out, stderr=err)))
    cli.start()
    deadline = time.monotonic() + 10
    while "waiting for approval" not in err.getvalue():
        assert time.monotonic() < deadline, err.getvalue()
        time.sleep(0.01)
    time.sleep(0.3)  # it keeps waiting, and nothing is printed to stdout meanwhile
    assert cli.is_alive() and out.getvalue() == b""
    api.decide(1, approve=True, by="alice")
    cli.join(10)
    assert results == [0], err.getvalue()
    assert out.getvalue() == b"null_resource.a: Creating...\nApply complete! Resources: 1 added.\n"
    text = err.getvalue()
    assert f"waiting for approval (up to 60m); its plan must be approved (e.g. in Slack): " \
           f"{api.url}/api/v1/runs/1" in text
    assert "approved by alice" in text
    assert "applied — Apply complete!" in text
    assert text.index("waiting for approval") < text.index("approved by alice") < text.index("applied — ")


def test_apply_already_approved_starts_at_once(api: FakeTriggerApi):
    api.apply_waits = False
    api.script = apply_script([b"Apply complete!\n"])
    result = invoke(api, "apply")
    assert result.code == 0
    assert "waiting for approval" not in result.err


def test_approval_timeout_exits_1_and_says_so(api: FakeTriggerApi):
    api.script = apply_script([b"never\n"])
    started = time.monotonic()
    result = invoke(api, "apply", "--approval-timeout", "0.4")
    assert result.code == 1
    assert time.monotonic() - started < 10
    assert "no approval after 0.4s; giving up (the run stays waiting on the server: " \
           f"{api.url}/api/v1/runs/1)" in result.err
    assert result.out == b""
    assert api.runs[1].status == "awaiting_approval"


def test_rejected_apply_exits_1(api: FakeTriggerApi):
    api.script = apply_script([b"never\n"])
    threading.Timer(0.3, api.decide, args=(1, False, "bob")).start()
    result = invoke(api, "apply")
    assert result.code == 1
    assert "rejected by bob" in result.err and "(exit 1)" in result.err
    assert result.out == b""


def test_failed_apply_exits_1(api: FakeTriggerApi):
    api.apply_waits = False
    api.script = apply_script([b"Error: creating null_resource\n"], status="failed", summary="apply failed")
    result = invoke(api, "apply")
    assert result.code == 1
    assert b"Error: creating" in result.out


# -- credentials -----------------------------------------------------------------------------


def test_every_request_is_signed_with_a_fresh_nonce(api: FakeTriggerApi):
    api.script = plan_script([b"ok\n"])
    assert invoke(api, "plan").code == 0
    nonces = [headers["x-deploybot-nonce"] for _, _, headers in api.requests]
    assert len(api.requests) >= 3 and len(set(nonces)) == len(nonces)
    assert {path for _, path, _ in api.requests} >= {"/api/v1/runs", "/api/v1/runs/1", "/api/v1/runs/1/log"}
    assert all(h["x-deploybot-key-id"] == KEY_ID and "authorization" not in h for _, _, h in api.requests)
    assert api.refusals == []


def test_hmac_key_from_a_file(api: FakeTriggerApi, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    api.script = plan_script([b"ok\n"])
    env = {"DEPLOYBOT_HMAC_KEY_ID": KEY_ID, "DEPLOYBOT_HMAC_KEY_FILE": str(key_file)}
    assert invoke(api, "plan", env=env).code == 0


def test_wrong_hmac_key_is_refused_without_printing_it(api: FakeTriggerApi):
    wrong = "wrong-" + "x" * 40
    result = invoke(api, "plan", env=hmac_env(DEPLOYBOT_HMAC_KEY=wrong), secrets=(wrong,))
    assert result.code == 1
    assert "HTTP 401: request signature is invalid" in result.err


def test_github_actions_oidc_token_is_requested_for_the_audience(api: FakeTriggerApi):
    request_token = "ghs_request-token-secret"
    actions = FakeActionsTokenService(api, request_token, audience="deploybot")
    try:
        api.script = plan_script([b"ok\n"], has_changes=True)
        env = {"ACTIONS_ID_TOKEN_REQUEST_URL": actions.request_url, "ACTIONS_ID_TOKEN_REQUEST_TOKEN": request_token,
               "GITHUB_ACTIONS": "true"}
        result = invoke(api, "plan", env=env, secrets=(request_token,))
        assert result.code == 2, result.err
        assert actions.calls and all(c == {"api-version": "2.0", "audience": "deploybot"} for c in actions.calls)
        # A fresh token for every call: the server accepts each token once.
        bearer = [h["authorization"] for _, _, h in api.requests]
        assert len(set(bearer)) == len(bearer) == len(actions.issued)
        for token in actions.issued:
            assert token not in result.err and token.encode() not in result.out

        other = invoke(api, "plan", "--audience", "something-else", env=env, secrets=(request_token,))
        assert other.code == 1
        assert "HTTP 401: token is not accepted" in other.err
        assert actions.calls[-1]["audience"] == "something-else"

        wrong = invoke(api, "plan", env={**env, "ACTIONS_ID_TOKEN_REQUEST_TOKEN": "not-it"})
        assert wrong.code == 1
        assert "GitHub Actions did not issue an OIDC token (HTTP 401)" in wrong.err
        assert "id-token: write" in wrong.err
    finally:
        actions.stop()


def test_github_actions_without_id_token_permission_says_what_to_add(api: FakeTriggerApi):
    result = invoke(api, "plan", env={"GITHUB_ACTIONS": "true"})
    assert result.code == 1
    assert "permissions: id-token: write" in result.err


def test_gitlab_id_token_variable_and_a_direct_token():
    api = FakeTriggerApi(reusable_tokens=True)
    try:
        api.tokens |= {"gitlab.jwt.value", "circleci.jwt.value"}
        api.script = plan_script([b"ok\n"])
        gitlab = invoke(api, "plan", "--id-token-var", "MY_ID_TOKEN", env={"MY_ID_TOKEN": "gitlab.jwt.value"},
                        secrets=("gitlab.jwt.value",))
        assert gitlab.code == 0, gitlab.err
        assert "$MY_ID_TOKEN" in gitlab.err
        direct = invoke(api, "plan", env={"DEPLOYBOT_OIDC_TOKEN": "circleci.jwt.value"},
                        secrets=("circleci.jwt.value",))
        assert direct.code == 0, direct.err
        used = {h["authorization"] for _, _, h in api.requests}
        assert used == {"Bearer gitlab.jwt.value", "Bearer circleci.jwt.value"}
    finally:
        api.stop()


def test_a_static_token_the_server_takes_once_fails_clearly(api: FakeTriggerApi):
    api.tokens.add("gitlab.jwt.once")
    api.script = plan_script([b"ok\n"])
    result = invoke(api, "plan", env={"DEPLOYBOT_ID_TOKEN": "gitlab.jwt.once"}, secrets=("gitlab.jwt.once",))
    assert result.code == 1
    assert "cannot read run 1 (HTTP 401: token was already used)" in result.err
    assert "use HMAC credentials" in result.err


def test_hmac_wins_over_oidc_and_half_an_hmac_setup_is_an_error(api: FakeTriggerApi):
    api.script = plan_script([b"ok\n"])
    assert invoke(api, "plan", env=hmac_env(DEPLOYBOT_OIDC_TOKEN="unused")).code == 0
    assert all("authorization" not in h for _, _, h in api.requests)
    half = invoke(api, "plan", env={"DEPLOYBOT_HMAC_KEY": KEY})
    assert half.code == 1 and "DEPLOYBOT_HMAC_KEY_ID is not" in half.err


def test_no_credentials_is_an_error():
    result = io.StringIO()
    code = run_cli.main(["plan", "--repo", REPO, "--ref", "main", "--project", "p", "--server", "http://127.0.0.1:9"],
                        env={}, stdout=io.BytesIO(), stderr=result)
    assert code == 1
    assert "no credentials" in result.getvalue()


# -- network and usage -----------------------------------------------------------------------


def test_transient_server_errors_are_retried(api: FakeTriggerApi):
    api.unavailable_gets = 2
    api.script = plan_script([b"ok\n"])
    result = invoke(api, "plan")
    assert result.code == 0, result.err
    assert result.err.count("answered HTTP 503; retrying") == 2


def test_unreachable_server_exits_1_after_retries():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    err = io.StringIO()
    code = run_cli.main(["plan", "--repo", REPO, "--ref", "main", "--project", "staging",
                         "--server", f"http://127.0.0.1:{port}"], env=hmac_env(), stdout=io.BytesIO(), stderr=err)
    assert code == 1
    text = err.getvalue()
    assert text.count("retrying in") == len(run_cli.RETRY_DELAYS)
    assert f"cannot reach the deploybot server at http://127.0.0.1:{port}: ConnectError" in text
    assert KEY not in text


def test_server_from_the_environment(api: FakeTriggerApi):
    api.script = plan_script([b"ok\n"])
    out, err = io.BytesIO(), io.StringIO()
    code = run_cli.main(["plan", "--repo", REPO, "--ref", "main", "--project", "staging", "--poll-interval", "0.05"],
                        env=hmac_env(DEPLOYBOT_SERVER=api.url + "/"), stdout=out, stderr=err)
    assert code == 0, err.getvalue()


@pytest.mark.parametrize("argv,message", [
    (["plan", "--ref", "main", "--project", "p"], "the following arguments are required: --repo"),
    (["destroy", "--repo", REPO, "--ref", "main", "--project", "p"], "invalid choice"),
    (["plan", "--repo", REPO, "--project", "p"], "give --ref or --sha"),
    (["plan", "--repo", REPO, "--ref", "", "--project", "p"], "give --ref or --sha"),
    (["plan", "--repo", REPO, "--sha", "abc123", "--project", "p"], "full 40-character commit SHA"),
    (["plan", "--repo", REPO, "--ref", "main"], "give --project"),
    (["plan", "--repo", REPO, "--ref", "main", "--project", "p"], "give --server or set DEPLOYBOT_SERVER"),
    (["plan", "--repo", REPO, "--ref", "main", "--project", "p", "--server", "ftp://x"], "http(s) URL"),
    (["plan", "--repo", REPO, "--ref", "main", "--project", "p", "--approval-timeout", "soon"], "seconds"),
    (["plan", "--repo", REPO, "--ref", "main", "--project", "p", "--terraform-args", "-target=x"], "unrecognized"),
])
def test_usage_errors_exit_1_never_2(argv, message, capsys):
    err = io.StringIO()
    code = run_cli.main(argv, env=hmac_env(), stdout=io.BytesIO(), stderr=err)
    assert code == 1
    assert message in err.getvalue() + capsys.readouterr().err


def test_deploybot_run_is_wired_into_the_deploybot_command(capsys):
    from bot.cli import main as deploybot

    assert deploybot(["run", "--help"]) == 0
    assert "--approval-timeout" in capsys.readouterr().out
    assert deploybot(["run", "plan", "--repo", REPO, "--bogus"]) == 1


@pytest.mark.parametrize("command,run,code", [
    ("plan", {"status": "succeeded", "has_changes": False}, 0),
    ("plan", {"status": "succeeded", "has_changes": True}, 2),
    ("plan", {"status": "succeeded"}, 2),  # unknown: never claim "no changes"
    ("plan", {"status": "failed"}, 1),
    ("plan", {"status": "refused"}, 1),
    ("apply", {"status": "succeeded", "has_changes": True}, 0),
    ("apply", {"status": "rejected"}, 1),
    ("apply", {"status": "cancelled"}, 1),
    ("apply", {"status": "interrupted"}, 1),
])
def test_exit_codes(command, run, code):
    assert run_cli.exit_code(command, run) == code
