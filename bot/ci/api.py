"""HTTP endpoints of the trigger API and of Slack's Approve/Reject buttons."""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator, Callable, Protocol

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from bot.ci.auth import CallerAuthError, HmacVerifier, OidcVerifier, authenticate
from bot.ci.runs import ApiError, ApiRuns, parse_run_request, run_view
from bot.ci.slack import parse_interaction, verify_slack_signature
from bot.config import Config
from bot.forges.vcs import ForgeError
from bot.forges.webhook import InvalidSignature, MalformedPayload
from bot.jobs.worker import Worker
from bot.store import FINISHED, Store
from bot.web.admin import is_admin
from bot.web.body import read_body
from policies.callers import authorize_read


class ForgeLogins(Protocol):
    """A forge as the API sees it: whose own token a token is."""

    login_of: Callable[[str], str]


class TriggerHost(Protocol):
    """What these endpoints need of the running bot (`bot.app.Deploybot`, in `app.state.bot`)."""

    config: Config
    store: Store
    api_runs: ApiRuns
    worker: Worker
    oidc: OidcVerifier
    hmac: HmacVerifier

    def forge(self, name: str) -> ForgeLogins: ...
    def job_log(self, job_id: int) -> str: ...
    def notify_decision(self, run_id: int, outcome: str, login: str) -> None: ...

MAX_API_BODY = 64 * 1024
LOG_POLL_SECONDS = 0.2
LOG_STREAM_LIMIT_SECONDS = 4 * 3600


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _caller(bot: TriggerHost, request: Request, body: bytes):
    """The authenticated caller and its token's claims; audited and raised as CallerAuthError."""
    try:
        return await asyncio.to_thread(authenticate, request.headers, request.method,
                                       request.url.path, body, bot.oidc, bot.hmac)
    except CallerAuthError as exc:
        bot.store.audit(actor="unauthenticated", action=f"{request.method} {request.url.path}",
                        outcome="refused", detail=str(exc))
        raise


async def create_run(request: Request) -> Response:
    """POST /api/v1/runs: a plan or apply of one project of an allow-listed repo at a ref."""
    bot: TriggerHost = request.app.state.bot
    body = await read_body(request, MAX_API_BODY)
    if body is None:
        return _error(413, "body too large")
    try:
        caller, claims = await _caller(bot, request, body)
        run_request = parse_run_request(body)
        started = await asyncio.to_thread(bot.api_runs.start, caller, claims, run_request)
    except (CallerAuthError, ApiError) as exc:
        return _error(exc.status, str(exc))
    url = f"{bot.config.server.public_url.rstrip('/')}/api/v1/runs/{started['id']}"
    return JSONResponse({**started, "url": url, "log_url": f"{url}/log"}, status_code=201)


async def _authorized_job(request: Request):
    """The run's (first) job, if the caller could start runs of its repo and every project of it.

    A run the caller may not read is answered exactly like one that does not exist (404), so
    run ids tell a caller nothing of what others deploy; the audit log keeps the reason.
    """
    bot: TriggerHost = request.app.state.bot
    caller, _ = await _caller(bot, request, b"")
    jobs = bot.store.run_jobs(int(request.path_params["run_id"]))
    reason = authorize_read(caller, jobs[0].run.repo.full_name, [job.project for job in jobs]) if jobs else "no such run"
    if reason:
        where = dict(repo=jobs[0].run.repo.full_name, sha=jobs[0].run.head_sha,
                     project=", ".join(job.project.label for job in jobs)) if jobs else {}
        bot.store.audit(actor=f"caller:{caller.name}", action=f"{request.method} {request.url.path}",
                        outcome="refused", detail=reason, **where)
        raise ApiError(404, "no such run")
    return jobs[0]


async def get_run(request: Request) -> Response:
    """GET /api/v1/runs/{id}: status, summary and output."""
    bot: TriggerHost = request.app.state.bot
    try:
        job = await _authorized_job(request)
    except (CallerAuthError, ApiError) as exc:
        return _error(exc.status, str(exc))
    output = job.result.get("output", "") if job.status in FINISHED else bot.job_log(job.id)
    return JSONResponse(run_view(bot.store, job, output))


async def run_log(request: Request) -> Response:
    """GET /api/v1/runs/{id}/log: the output as terraform writes it, until the job ends."""
    bot: TriggerHost = request.app.state.bot
    try:
        job = await _authorized_job(request)
    except (CallerAuthError, ApiError) as exc:
        return _error(exc.status, str(exc))

    async def stream() -> AsyncIterator[bytes]:
        cursor, pending = 0, b""
        deadline = time.monotonic() + LOG_STREAM_LIMIT_SECONDS
        while time.monotonic() < deadline:
            finished = bot.store.run_jobs(job.run.id)[0].status in FINISHED
            data, cursor = bot.store.job_log(job.id, cursor)
            pending += data
            # Whole lines only, so a secret is never split across two chunks unredacted.
            complete, _, pending = pending.rpartition(b"\n")
            if complete:
                yield bot.worker.clean(complete.decode("utf-8", "replace") + "\n").encode()
            if finished and not data:
                if pending:
                    yield bot.worker.clean(pending.decode("utf-8", "replace")).encode()
                return
            await asyncio.sleep(LOG_POLL_SECONDS)

    return StreamingResponse(stream(), media_type="text/plain; charset=utf-8")


async def _decide_with_forge_token(request: Request, approve: bool) -> Response:
    """An approver decides on a plan run, proving who they are with their own forge token."""
    bot: TriggerHost = request.app.state.bot
    action = "approve" if approve else "reject"
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() not in ("token", "bearer") or not token.strip():
        bot.store.audit(actor="unauthenticated", action=action, outcome="refused", detail="no forge token")
        return _error(401, "send your own GitHub or GitLab token as `Authorization: token <token>`")
    jobs = bot.store.run_jobs(int(request.path_params["run_id"]))
    if not jobs:  # which forge to ask about the token is the run's: no run, no one to ask
        bot.store.audit(actor="unauthenticated", action=action, outcome="refused",
                        detail=f"no such run {request.path_params['run_id']}")
        return _error(404, "no such run")
    job = jobs[0]
    try:
        login = await asyncio.to_thread(bot.forge(job.run.repo.forge).login_of, token.strip())
    except ForgeError:
        bot.store.audit(actor="unauthenticated", action=action, outcome="refused",
                        detail="the forge did not accept the token")
        return _error(401, "the forge did not accept the token")
    try:
        outcome = await asyncio.to_thread(bot.api_runs.decide, job.run.id, approve, login, "api")
    except ApiError as exc:
        return _error(exc.status, str(exc))
    await asyncio.to_thread(bot.notify_decision, job.run.id, outcome, login)
    return JSONResponse({"status": outcome, "run": job.run.id, "by": login})


async def approve_run(request: Request) -> Response:
    """POST /api/v1/runs/{id}/approve."""
    return await _decide_with_forge_token(request, approve=True)


async def reject_run(request: Request) -> Response:
    """POST /api/v1/runs/{id}/reject."""
    return await _decide_with_forge_token(request, approve=False)


async def audit_log(request: Request) -> Response:
    """GET /api/v1/audit?limit=N: the newest audit entries, for admins (the admin token)."""
    bot: TriggerHost = request.app.state.bot
    if not is_admin(request, bot.config.server.admin_token):
        return _error(401, "the audit log needs the admin token")
    try:
        limit = min(max(int(request.query_params.get("limit", "100")), 1), 10_000)
    except ValueError:
        return _error(400, "limit must be a number")
    return JSONResponse({"entries": bot.store.audit_entries(limit)})


async def slack_interaction(request: Request) -> Response:
    """POST /slack/interactions: an Approve or Reject click on a plan message."""
    bot: TriggerHost = request.app.state.bot
    secret = bot.config.slack.signing_secret.reveal()
    if not secret:
        return _error(404, "Slack is not configured on this server")
    body = await read_body(request, MAX_API_BODY)
    if body is None:
        return _error(413, "body too large")
    try:
        verify_slack_signature(request.headers, body, secret, time.time())
        decision = parse_interaction(body)
    except InvalidSignature as exc:
        bot.store.audit(actor="slack", action="interaction", outcome="refused", detail=str(exc))
        return _error(401, str(exc))
    except MalformedPayload as exc:
        return _error(400, str(exc))
    if decision is None:
        return JSONResponse({"status": "ignored"})
    login = bot.config.slack.users.get(decision.slack_user_id)
    if login is None:
        bot.store.audit(actor=f"slack:{decision.slack_user_id}", action="approve" if decision.approve else "reject",
                        outcome="refused", detail="Slack user is not mapped to an approver")
        return _error(403, "your Slack user is not an approver in deploybot's config")
    try:
        outcome = await asyncio.to_thread(bot.api_runs.decide, decision.run_id, decision.approve, login, "slack")
    except ApiError as exc:
        return _error(exc.status, str(exc))
    await asyncio.to_thread(bot.notify_decision, decision.run_id, outcome, login)
    return JSONResponse({"status": outcome, "run": decision.run_id})


READ_RULE = ("Only a caller whose grant covers the run's repository and every project of the run may read "
             "it; for any other caller the run does not exist (404).")
OPENAPI = {
    "openapi": "3.1.0",
    "info": {"title": "deploybot trigger API", "version": "1"},
    "components": {
        "securitySchemes": {
            "oidc": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                     "description": "An OIDC token from GitHub Actions or GitLab CI, pinned by the policy's callers."},
            "hmac": {"type": "apiKey", "in": "header", "name": "X-Deploybot-Signature",
                     "description": "v1=HMAC-SHA256(key, METHOD\\nPATH\\nX-Deploybot-Timestamp\\nX-Deploybot-Nonce\\n"
                                    "sha256hex(body)), with X-Deploybot-Key-Id naming the caller."},
        },
        "schemas": {
            "RunRequest": {
                "type": "object", "additionalProperties": False, "required": ["repo", "command"],
                "properties": {
                    "repo": {"type": "string", "example": "acme/infrastructure-live"},
                    "forge": {"type": "string", "enum": ["github", "gitlab"]},
                    "ref": {"type": "string", "example": "refs/heads/main"},
                    "sha": {"type": "string", "pattern": "^[0-9a-f]{40}$"},
                    "project": {"type": "string"}, "dir": {"type": "string"}, "workspace": {"type": "string"},
                    "command": {"type": "string", "enum": ["plan", "apply"]},
                },
            },
            "Run": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer"}, "repo": {"type": "string"}, "sha": {"type": "string"},
                    "project": {"type": "string"}, "command": {"type": "string"},
                    "requested_by": {"type": "string"},
                    "status": {"type": "string", "enum": ["queued", "running", "succeeded", "failed", "cancelled",
                                                          "interrupted", "refused", "awaiting_approval", "rejected"]},
                    "summary": {"type": "string"}, "has_changes": {"type": "boolean"},
                    "plan_id": {"type": ["string", "null"], "pattern": "^[0-9a-f]{12}$",
                                "description": "The plan the run saved (plan) or applied (apply): the start of "
                                               "its SHA-256, as plan comments and Slack show it; null until then"},
                    "output": {"type": "string"},
                    "approval": {"type": ["object", "null"]},
                },
            },
            "Error": {"type": "object", "properties": {"error": {"type": "string"}}},
        },
    },
    "security": [{"oidc": []}, {"hmac": []}],
    "paths": {
        "/api/v1/runs": {"post": {
            "summary": "Plan or apply one allow-listed project at a ref or commit",
            "requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/RunRequest"}}}},
            "responses": {str(code): {"description": text, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}
                          for code, text, schema in [(201, "queued, or awaiting approval", "Run"),
                                                     (400, "bad request", "Error"), (401, "not authenticated", "Error"),
                                                     (403, "not allowed by the policy", "Error"),
                                                     (404, "no such ref", "Error"),
                                                     (409, "no approved plan, or a pull request holds the project's "
                                                           "lock (the error names it)", "Error")]},
        }},
        "/api/v1/runs/{id}": {"get": {
            "summary": "A run's status, summary, plan id and output",
            "description": READ_RULE,
            "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "integer"}}],
            "responses": {"200": {"description": "the run", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Run"}}}},
                          "404": {"description": "no such run, or one the caller may not read"}},
        }},
        "/api/v1/runs/{id}/log": {"get": {
            "summary": "The run's output, streamed as it is written",
            "description": READ_RULE,
            "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "integer"}}],
            "responses": {"200": {"description": "text/plain, until the run ends", "content": {"text/plain": {}}},
                          "404": {"description": "no such run, or one the caller may not read"}},
        }},
    },
}


async def openapi(request: Request) -> Response:
    """GET /api/v1/openapi.json."""
    return JSONResponse(OPENAPI)
