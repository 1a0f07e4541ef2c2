"""The runner API: runners of a pool claim leases, fetch checkouts, stream logs and send results.

Every call carries `Authorization: Bearer <runner token>`; the token names one pool. A
missing, unknown or revoked token is a 401; a lease of another pool, or one the bot gave
up (the runner went silent, the job was cancelled), is a 410 and the runner stops.
"""

from __future__ import annotations

import asyncio
import binascii
import json
from typing import Protocol

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from bot.config import Config
from bot.jobs.executor import Execution
from bot.runners.pools import RunnerPools
from bot.runners.tokens import new_token, token_hash
from bot.store import RunnerLease, Store
from bot.web.admin import is_admin
from bot.web.body import read_body

MAX_LOG_CHUNK = 1 << 20
MAX_RESULT = 64 << 20  # a plan file, base64-encoded, and the output


class RunnerHost(Protocol):
    """What the runner API needs of the bot."""

    config: Config
    store: Store
    runner_pools: RunnerPools


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _pool(request: Request) -> str | None:
    """The pool of the request's runner token, if it is a valid one."""
    bot: RunnerHost = request.app.state.bot
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        return None
    return bot.store.runner_token_pool(token_hash(token.strip()))


def _lease(request: Request) -> tuple[RunnerLease | None, Response | None]:
    bot: RunnerHost = request.app.state.bot
    pool = _pool(request)
    if pool is None:
        return None, _error(401, "a valid runner token is required")
    lease = bot.runner_pools.held(request.path_params["lease"], pool)
    if lease is None:
        return None, _error(410, "no such lease: stop this job")
    return lease, None


async def claim(request: Request) -> Response:
    """POST /api/v1/runners/claim {"pool", "runner"}: a lease of the token's pool, or 204 after the long poll."""
    bot: RunnerHost = request.app.state.bot
    pool = _pool(request)
    if pool is None:
        return _error(401, "a valid runner token is required")
    body = await read_body(request, 4096)
    try:
        asked = json.loads(body or b"{}")
        wanted, runner = asked.get("pool"), str(asked.get("runner", ""))[:100]
    except (ValueError, AttributeError):
        return _error(400, 'the body must be {"pool": NAME, "runner": NAME}')
    if wanted != pool:
        return _error(403, f"this token is for pool {pool!r}, not {wanted!r}")
    if pool not in bot.runner_pools.phases:
        return _error(404, f"pool {pool!r} is not in this server's config")
    lease = await bot.runner_pools.claim(pool, runner)
    if lease is None:
        return Response(status_code=204)
    tf = bot.config.terraform
    timeouts = {"init": tf.init_timeout, "plan": tf.plan_timeout, "apply": tf.apply_timeout}  # the bot's, not the runner's
    return JSONResponse({"lease": lease.id, "spec": lease.spec, "timeouts": timeouts})


async def checkout(request: Request) -> Response:
    """GET /api/v1/runners/leases/{lease}/checkout: the checkout at the job's exact SHA (tar.gz)."""
    bot: RunnerHost = request.app.state.bot
    lease, refused = _lease(request)
    if refused:
        return refused
    return Response(await asyncio.to_thread(bot.store.runner_lease_checkout, lease.id), media_type="application/gzip")


async def log(request: Request) -> Response:
    """POST /api/v1/runners/leases/{lease}/log: more of the job's output (an empty body is a heartbeat)."""
    bot: RunnerHost = request.app.state.bot
    lease, refused = _lease(request)
    if refused:
        return refused
    chunk = await read_body(request, MAX_LOG_CHUNK)
    if chunk is None:
        return _error(413, f"send the log in chunks of at most {MAX_LOG_CHUNK} bytes")
    if chunk:
        await asyncio.to_thread(bot.store.append_job_log, lease.job_id, chunk)  # up to 1 MiB: off the loop
    return Response(status_code=204)


async def result(request: Request) -> Response:
    """PUT /api/v1/runners/leases/{lease}/result: how the phase ended, with the plan file's bytes."""
    bot: RunnerHost = request.app.state.bot
    lease, refused = _lease(request)
    if refused:
        return refused
    body = await read_body(request, MAX_RESULT)
    if body is None:
        return _error(413, "result too large")
    try:
        execution = Execution.from_json(json.loads(body))
    except (ValueError, TypeError, AttributeError, binascii.Error):
        return _error(400, "the result must be JSON: output, terraform_seconds, failure, has_changes, plan (base64)")
    if not await asyncio.to_thread(bot.runner_pools.finish, lease, execution):
        return _error(410, "no such lease: stop this job")
    return Response(status_code=204)


async def tokens(request: Request) -> Response:
    """GET /api/v1/runner-tokens: every token (never the token itself); POST {"pool"}: a new one, shown once."""
    bot: RunnerHost = request.app.state.bot
    if not is_admin(request, bot.config.server.admin_token):
        return _error(401, "runner tokens need the admin token")
    if request.method == "GET":
        return JSONResponse({"tokens": [vars(token) for token in bot.store.runner_tokens()]})
    body = await read_body(request, 4096)
    try:
        pool = json.loads(body or b"{}").get("pool")
    except (ValueError, AttributeError):
        pool = None
    if pool not in bot.runner_pools.phases:
        return _error(400, f"pool must be one of runners.pools: {', '.join(sorted(bot.runner_pools.phases))}")
    token = new_token()
    token_id = bot.store.add_runner_token(pool, token_hash(token))
    bot.store.audit("admin", "runner-token create", "created", detail=f"token {token_id} of pool {pool}")
    return JSONResponse({"id": token_id, "pool": pool, "token": token}, status_code=201)


async def revoke_token(request: Request) -> Response:
    """DELETE /api/v1/runner-tokens/{id}: its runners get 401 from now on."""
    bot: RunnerHost = request.app.state.bot
    if not is_admin(request, bot.config.server.admin_token):
        return _error(401, "runner tokens need the admin token")
    token_id = request.path_params["token_id"]
    if not bot.store.revoke_runner_token(token_id):
        return _error(404, f"no token {token_id} that is not revoked already")
    bot.store.audit("admin", "runner-token revoke", "revoked", detail=f"token {token_id}")
    return Response(status_code=204)
