"""The ASGI app: webhook intake, health, metrics; and the parts it wires together."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Callable, Iterable

import psycopg
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import handlers
from bot.ci import api as trigger_api
from bot.ci.auth import HmacVerifier, OidcVerifier
from bot.ci.runs import ApiError, ApiRuns
from bot.ci.slack import MESSAGE_KINDS, SlackNotifier, render_run_message
from bot.config import Config
from bot.forges.github import webhook as github_webhook
from bot.forges.github.client import GitHubApp, github_login_of
from bot.forges.gitlab import webhook as gitlab_webhook
from bot.forges.gitlab.client import GitLabClient, check_gitlab_token, gitlab_login_of, lookup_gitlab_repo
from bot.forges.vcs import ForgeError, VCSClient
from bot.forges.webhook import InvalidSignature, MalformedPayload, load_body
from bot.jobs.dispatcher import Dispatcher, delivery_subject, repo_id_refusal
from bot.jobs.git import GitError, RepoCache
from bot.jobs.replicas import ReplicaKeeper
from bot.jobs.sandbox import Sandbox
from bot.jobs.terraform import Terraform, TerraformSettings, find_terraform
from bot.jobs.worker import FORGET_PULL, Worker, disk_is_full
from bot.metrics import Metrics
from bot.models import CommentEvent, Event, PullRequestEvent, Repo
from bot.runners import api as runner_api
from bot.runners.pools import RunnerPools, check_pools
from bot.store import Delivery, Job, Run, ServeLock, Store, repo_key
from bot.store.backends import UNAVAILABLE as STORE_UNAVAILABLE
from bot.web.body import read_body
from handlers.context import HandlerContext
from policies.policy import Policy, load_policy_file

log = logging.getLogger("deploybot.app")


@dataclass(frozen=True)
class Forge:
    """One configured forge: how to reach a repository's API, and the bot's own name there."""

    client_for: Callable[[Repo], VCSClient]
    lookup_repo: Callable[[str], Repo]  # a repository by full name, for runs no webhook announced
    login_of: Callable[[str], str]  # whose own token this is: approvers prove who they are with it
    check: Callable[[], None]  # raises ForgeError unless the forge accepts our credentials
    bot_login: str


def _slack_notifier(config: Config) -> SlackNotifier | None:
    slack = config.slack
    if not (slack.webhook_url or slack.bot_token):
        return None
    return SlackNotifier(webhook_url=slack.webhook_url.reveal() or None, bot_token=slack.bot_token.reveal() or None,
                         channel=slack.channel or None, api_url=slack.api_url)


def configured_forges(config: Config) -> dict[str, Forge]:
    """The forges the config has credentials for."""
    forges: dict[str, Forge] = {}
    if config.github.enabled:
        app = GitHubApp(config.github.api_url, config.github.app_id, config.github.private_key.reveal())
        api_url = config.github.api_url
        forges[github_webhook.FORGE] = Forge(app.client, app.lookup_repo,
                                             lambda token: github_login_of(api_url, token),
                                             app.check, config.github.bot_login)
    if config.gitlab.enabled:
        url, token = config.gitlab.url, config.gitlab.token.reveal()
        forges[gitlab_webhook.FORGE] = Forge(
            lambda repo: GitLabClient(url, token, repo),
            lambda full_name: lookup_gitlab_repo(url, token, full_name),
            lambda user_token: gitlab_login_of(url, user_token),
            lambda: check_gitlab_token(url, token),
            config.gitlab.bot_username)
    return forges


def runs_jobs_itself(policy: Policy) -> bool:
    """Whether the bot may run terraform itself: unless every phase of every project has a pool."""
    projects = [project for repo in policy.repos.values() for project in repo.projects]
    return not projects or not all(project.plan_pool and project.apply_pool for project in projects)


class Deploybot:
    """The server's parts: store, forge clients, git cache, terraform, dispatcher, worker."""

    def __init__(self, config: Config, policy: Policy | None = None) -> None:
        self.config = config
        self.policy = policy if policy is not None else load_policy_file(config.policy_file)
        data_dir = config.server.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        database = config.server.database
        # SQLite is one process's: a second serve on it is refused (StoreInUse). Replicas share PostgreSQL.
        self.serve_lock = ServeLock(database) if isinstance(database, Path) else None
        try:
            self._build(config, data_dir)
        except BaseException:
            self.release_serve_lock()
            raise

    def _build(self, config: Config, data_dir: Path) -> None:
        self.store = Store(config.server.database, lease_seconds=config.server.replica_lease_seconds)
        self.metrics = Metrics(self.store)
        self.forges = configured_forges(config)
        self.repo_cache = RepoCache(data_dir / "git")
        tf = config.terraform
        self.sandbox = Sandbox(tf.sandbox, tuple(tf.sandbox_read_only), tuple(tf.sandbox_read_write))
        # Checked only where the bot runs terraform itself (with runners for every phase it runs
        # none, as on Fargate, where no sandbox can be made).
        if runs_jobs_itself(self.policy):
            self.sandbox.check()  # raises SandboxError with the fix: never unconfined by accident
            self.sandbox.share()
        if not self.sandbox.confines:
            log.warning("terraform.sandbox is none: terraform runs as the bot and can read its secrets, "
                        "store and other jobs (docs/security.md)")
        self.terraform = Terraform(TerraformSettings(
            binary=tf.binary or find_terraform(),
            plugin_cache_dir=tf.plugin_cache_dir or data_dir / "plugin-cache",
            cli_config_file=tf.cli_config_file,
            home_dir=data_dir / "terraform-home",
            init_timeout=tf.init_timeout,
            plan_timeout=tf.plan_timeout,
            apply_timeout=tf.apply_timeout,
            sandbox=self.sandbox,
        ))
        self.oidc = OidcVerifier(self.policy.callers, replay=self.store.first_use)
        self.hmac = HmacVerifier(self.policy.callers, replay=self.store.first_use)
        runners = config.runners
        check_pools(self.policy, runners.pools)
        self.runner_pools = RunnerPools(self.store, runners.pools, runners.lease_seconds, runners.claim_wait_seconds,
                                        runners.queue_seconds)
        self.worker = Worker(config, self.store, self.policy, self.client_for, self.repo_cache,
                             self.terraform, self.metrics, notify_api_run=self.notify_api_run,
                             extra_secrets=self.hmac.secrets(), runner_pools=self.runner_pools)
        self.slack = _slack_notifier(config)
        self.api_runs = ApiRuns(
            store=self.store, policy=self.policy,
            lookup_repo=lambda forge, name: self.checked_repo(self.forge(forge).lookup_repo(name)),
            client_for=self.client_for,
            default_forge=next(iter(self.forges), github_webhook.FORGE),
            forges=frozenset(self.forges),
            wake_workers=lambda: self._call_in_loop(self.worker.wake),
            cancel_run=lambda run_id: self._call_in_loop(self.worker.report_run, run_id),
        )
        self.dispatcher = Dispatcher(self.store, handlers.router, self.context_for, self.metrics, self.policy)
        self.wakeups = self.store.wakeups(self._hear)
        self.replica = ReplicaKeeper(self.store, self.worker, self.dispatcher.wake, exclusive=self.serve_lock is not None)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._prefetches: set[asyncio.Task] = set()  # kept referenced until done

    def client_for(self, repo: Repo) -> VCSClient:
        """The forge client for a repository."""
        return self.forge(repo.forge).client_for(repo)

    def checked_repo(self, repo: Repo) -> Repo:
        """A repository the forge API described, if its id is the one the policy means.

        Else ApiError 403: the trigger API refuses the call and audits the reason, as the
        dispatcher does for webhooks (bot.jobs.dispatcher.repo_id_refusal).
        """
        refusal = repo_id_refusal(self.store, self.policy, repo)
        if refusal is not None:
            raise ApiError(403, refusal)
        return repo

    def forge(self, name: str) -> Forge:
        if name not in self.forges:
            raise ForgeError(f"{name} is not configured on this server")
        return self.forges[name]

    def job_log(self, job_id: int) -> str:
        """A running job's output so far, as users may see it."""
        data, _ = self.store.job_log(job_id)
        return self.worker.clean(data.decode("utf-8", "replace"))

    def _run_url(self, run_id: int) -> str:
        return f"{self.config.server.public_url.rstrip('/')}/api/v1/runs/{run_id}"

    def notify_api_run(self, run: Run, jobs: list[Job]) -> None:
        """Tell Slack how a run from the trigger API ended (plans with changes get buttons)."""
        if self.slack is None:
            return
        job = jobs[0]
        outcome = job.result.get("outcome")
        if job.status == "succeeded":
            kind = "plan_ready" if run.command == "plan" and job.result.get("has_changes") else (
                "applied" if run.command == "apply" else "no_changes")
        elif outcome == "rejected":
            return  # the rejection was announced when it was made
        else:
            kind = "failed"
        if kind not in MESSAGE_KINDS:
            return
        self.slack.notify(render_run_message(
            kind, run_id=run.id, run_url=self._run_url(run.id), repo=run.repo.full_name,
            project=job.project.label, sha=run.head_sha, command=run.command,
            summary=job.result.get("summary", "")))

    def notify_decision(self, run_id: int, outcome: str, login: str) -> None:
        """Tell Slack who approved or rejected a plan."""
        if self.slack is None:
            return
        job = self.store.run_jobs(run_id)[0]
        self.slack.notify(render_run_message(
            outcome, run_id=run_id, run_url=self._run_url(run_id), repo=job.run.repo.full_name,
            project=job.project.label, sha=job.run.head_sha, by=login))

    def context_for(self, delivery: Delivery, event: Event) -> HandlerContext:
        """What the handlers of one delivery may use."""
        repo = event.repo if isinstance(event, CommentEvent) else event.pull.repo
        client = self.client_for(repo)
        if isinstance(event, PullRequestEvent) and event.action != "closed":
            policy = self.policy.repo(repo.full_name)
            if policy is not None and (policy.allow_forks or not event.pull.is_fork):
                # Autoplan reads the head commit's modules through git: fetch it now, while the
                # handler asks the forge API what changed, instead of after.
                prefetch = asyncio.create_task(self._prefetch(repo, client, event.pull.head_sha))
                self._prefetches.add(prefetch)
                prefetch.add_done_callback(self._prefetches.discard)
        return HandlerContext(
            delivery_id=delivery.id,
            store=self.store,
            policy=self.policy,
            client=client,
            bot_login=self.forges[repo.forge].bot_login,
            wake_workers=lambda: self._call_in_loop(self.worker.wake),
            cancel_jobs=lambda jobs: self._call_in_loop(self.worker.cancel, jobs),
            forget_pull=lambda repo, number: self._call_in_loop(self.worker.forget_pull_soon, repo, number),
            module_dirs=lambda sha, dirs, depth: self._module_dirs(repo, client, sha, dirs, depth),
        )

    def _call_in_loop(self, fn, *args) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(fn, *args)

    async def _fetch(self, repo: Repo, client: VCSClient, sha: str) -> None:
        header = await asyncio.to_thread(client.git_auth_header)
        await self.repo_cache.fetch(repo_key(repo), repo.clone_url, sha, header)

    async def _prefetch(self, repo: Repo, client: VCSClient, sha: str) -> None:
        try:
            await self._fetch(repo, client, sha)
        except (GitError, ForgeError) as exc:  # the handler's own fetch tries again and tells the PR
            log.info("prefetch of %s@%s failed: %s", repo.full_name, sha[:8], exc)

    def _module_dirs(self, repo: Repo, client: VCSClient, sha: str, dirs: Iterable[str],
                     depth: int) -> dict[str, set[str]]:
        """The local modules of project dirs at a SHA, fetched into the git cache (called from handler threads)."""

        async def read() -> dict[str, set[str]]:
            await self._fetch(repo, client, sha)
            return await self.repo_cache.module_dirs(repo_key(repo), sha, dirs, depth)

        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(read(), self._loop).result(timeout=600)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.wakeups is not None:
            self.wakeups.start()
        await self.replica.start()  # and the worker
        await self.dispatcher.start(self.replica.registered)

    def _hear(self, topic: str) -> None:
        """A wake-up from another replica (called from the listener's thread)."""
        if topic == "jobs":
            self._call_in_loop(self.worker.wake)
        elif topic == "deliveries":
            self._call_in_loop(self.dispatcher.wake)
        elif topic.startswith("lease"):
            self._call_in_loop(self.runner_pools.hear, topic)
        elif topic.startswith(FORGET_PULL):
            closed = json.loads(topic.removeprefix(FORGET_PULL))
            if closed["by"] != self.store.replica:  # it hears its own announcements too
                self._call_in_loop(self.worker.forget_pull_soon, Repo(**closed["repo"]), closed["pull"], False)

    async def stop(self) -> None:
        await self.dispatcher.stop()
        await self.worker.stop(self.config.server.shutdown_grace)
        await self.replica.stop()
        if self.wakeups is not None:
            self.wakeups.stop()
        self.store.close()
        self.release_serve_lock()

    def release_serve_lock(self) -> None:
        if self.serve_lock is not None:
            self.serve_lock.release()


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


STORE_RETRY_AFTER_SECONDS = 60  # what a 503 asks the sender to wait when the store cannot be written


def _store_unavailable(exc: Exception) -> JSONResponse:
    response = _error(503, f"deploybot cannot store this request right now ({exc}); send it again later")
    response.headers["Retry-After"] = str(STORE_RETRY_AFTER_SECONDS)
    return response


async def store_unavailable(request: Request, exc: Exception) -> Response:
    """Any other endpoint whose store write failed (a full disk): a 503 to try again, not a 500."""
    assert isinstance(exc, STORE_UNAVAILABLE)
    log.error("%s %s: the store cannot be written: %s", request.method, request.url.path, exc)
    return _store_unavailable(exc)


@dataclass(frozen=True)
class WebhookIntake:
    """How one forge's webhooks are checked and read; the steps around them are shared."""

    forge: str
    verify: Callable[[Headers, bytes, Config], None]  # raises InvalidSignature
    event_name: Callable[[Headers], str]
    delivery_id: Callable[[Headers], str | None]
    parse: Callable[[str, dict], Event | None]


def _verify_github(headers: Headers, body: bytes, config: Config) -> None:
    github_webhook.verify_signature(body, headers.get("x-hub-signature-256"),
                                    config.github.webhook_secret.reveal().encode())


def _verify_gitlab(headers: Headers, body: bytes, config: Config) -> None:
    signing_token = config.gitlab.signing_token.reveal()
    if signing_token and "webhook-signature" in headers:
        gitlab_webhook.verify_signing_token(headers, body, signing_token, time.time())
        return
    secret = config.gitlab.webhook_secret.reveal()
    if not secret:
        raise InvalidSignature("this server accepts only signed GitLab webhooks")
    gitlab_webhook.verify_token(headers.get("x-gitlab-token"), secret.encode())


INTAKES = {
    github_webhook.FORGE: WebhookIntake(
        github_webhook.FORGE, _verify_github,
        event_name=lambda headers: headers.get("x-github-event", ""),
        delivery_id=lambda headers: headers.get("x-github-delivery"),
        parse=github_webhook.parse_event,
    ),
    gitlab_webhook.FORGE: WebhookIntake(
        gitlab_webhook.FORGE, _verify_gitlab,
        event_name=lambda headers: headers.get("x-gitlab-event", ""),
        delivery_id=gitlab_webhook.delivery_id,
        parse=gitlab_webhook.parse_event,
    ),
}


async def webhook_endpoint(request: Request) -> Response:
    """Verify, parse, persist, acknowledge; the work happens after the answer."""
    bot: Deploybot = request.app.state.bot
    intake = INTAKES.get(request.path_params["forge"])
    if intake is None or intake.forge not in bot.forges:
        return _error(404, "no such forge is configured on this server")
    # Unverified requests are counted under one label: header values must not grow the metrics.
    count = functools.partial(_count, bot, intake.forge, "unverified")
    try:
        body = await read_body(request, bot.config.server.max_body_bytes)
    except ClientDisconnect:
        return _error(400, "the client went away")
    if body is None:
        count("too_large")
        return _error(413, "body too large")
    try:
        intake.verify(request.headers, body, bot.config)
    except InvalidSignature as exc:
        count("unauthorized")
        return _error(401, str(exc))
    event_name = intake.event_name(request.headers)
    count = functools.partial(_count, bot, intake.forge, event_name or "unknown")
    delivery_id = intake.delivery_id(request.headers)
    if not event_name or not delivery_id:
        count("malformed")
        return _error(400, "missing the event name or delivery id header")
    if intake.forge == github_webhook.FORGE and event_name == "ping":
        count("ping")
        return JSONResponse({"status": "pong"})
    try:
        event = intake.parse(event_name, load_body(body))
    except MalformedPayload as exc:
        count("malformed")
        return _error(400, str(exc))
    except Exception:  # noqa: BLE001 - our bug, not the sender's: never a 500, and the forge may send it again
        log.exception("could not read %s %s delivery %s", intake.forge, event_name, delivery_id)
        count("unavailable")
        return JSONResponse({"error": "deploybot could not read this delivery and did not store it; send it again"},
                            status_code=503, headers={"Retry-After": "60"})
    if event is None:
        log.info("ignored %s %s delivery %s", intake.forge, event_name, delivery_id)
        count("ignored")
        return JSONResponse({"status": "ignored"})
    try:
        added = bot.store.add_delivery(Delivery(delivery_id, intake.forge, event_name, body,
                                                subject=delivery_subject(event)))
    except STORE_UNAVAILABLE as exc:
        # Not stored, so not acknowledged: a 503 with Retry-After says to send it again, where a
        # 500 would read as our bug. SQLite says why ("database or disk is full"), never a secret.
        log.error("could not store %s %s delivery %s: %s", intake.forge, event_name, delivery_id, exc)
        count("unavailable")
        return _store_unavailable(exc)
    if not added:
        count("duplicate")
        return JSONResponse({"status": "duplicate"})
    count("accepted")
    bot.dispatcher.wake()
    return JSONResponse({"status": "queued", "delivery": delivery_id}, status_code=202)


def _count(bot: Deploybot, forge: str, event: str, outcome: str) -> None:
    bot.metrics.deliveries.labels(forge, event[:64], outcome).inc()


async def healthz(request: Request) -> Response:
    """The process is up."""
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Ready to work: the store answers, its disk has room, terraform is there, every forge takes our credentials."""
    bot: Deploybot = request.app.state.bot
    checks: dict[str, str] = {}
    replicas: list[str] = []
    try:
        replicas = bot.store.replicas()  # also proves the store answers
        checks["store"] = "ok"
    except (sqlite3.Error, psycopg.Error) as exc:
        checks["store"] = f"failed: {type(exc).__name__}"
    # Ready means able to take webhooks: on a full disk each would get a 503 (they fail to store).
    checks["disk"] = "failed: the data dir's disk is full" if disk_is_full(bot.config.server.data_dir) else "ok"
    binary = bot.terraform.binary
    checks["terraform"] = "ok" if os.access(binary, os.X_OK) else f"failed: {binary} is not executable"
    # Not a failure (`none` is set on purpose), but never silent.
    sandbox = {"sandbox": bot.sandbox.kind} | ({} if bot.sandbox.confines else {
        "warning": "terraform.sandbox is none: jobs are not confined"})
    for name, forge in bot.forges.items():
        try:
            await asyncio.to_thread(forge.check)
            checks[name] = "ok"
        except ForgeError as exc:
            checks[name] = f"failed: {exc}"
    ready = all(value == "ok" for value in checks.values())
    # The replicas alive on this store (PostgreSQL), this one included once it joined.
    alive = {"replica": bot.store.replica, "replicas": replicas} if bot.serve_lock is None else {}
    return JSONResponse({"status": "ready" if ready else "not ready", "checks": checks, **sandbox, **alive},
                        status_code=200 if ready else 503)


async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    bot: Deploybot = request.app.state.bot
    return Response(bot.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def create_app(config: Config, policy: Policy | None = None) -> Starlette:
    """The ASGI app; its lifespan starts and stops the dispatcher and workers."""
    bot = Deploybot(config, policy)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await bot.start()
        try:
            yield
        finally:
            await bot.stop()

    app = Starlette(
        routes=[
            Route("/webhooks/{forge:str}", webhook_endpoint, methods=["POST"]),
            Route("/api/v1/runs", trigger_api.create_run, methods=["POST"]),
            Route("/api/v1/runs/{run_id:int}", trigger_api.get_run),
            Route("/api/v1/runs/{run_id:int}/log", trigger_api.run_log),
            Route("/api/v1/runs/{run_id:int}/approve", trigger_api.approve_run, methods=["POST"]),
            Route("/api/v1/runs/{run_id:int}/reject", trigger_api.reject_run, methods=["POST"]),
            Route("/api/v1/openapi.json", trigger_api.openapi),
            Route("/api/v1/audit", trigger_api.audit_log),
            Route("/slack/interactions", trigger_api.slack_interaction, methods=["POST"]),
            Route("/api/v1/runners/claim", runner_api.claim, methods=["POST"]),
            Route("/api/v1/runners/leases/{lease:str}/checkout", runner_api.checkout),
            Route("/api/v1/runners/leases/{lease:str}/log", runner_api.log, methods=["POST"]),
            Route("/api/v1/runners/leases/{lease:str}/result", runner_api.result, methods=["PUT"]),
            Route("/api/v1/runner-tokens", runner_api.tokens, methods=["GET", "POST"]),
            Route("/api/v1/runner-tokens/{token_id:int}", runner_api.revoke_token, methods=["DELETE"]),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics),
        ],
        lifespan=lifespan,
        exception_handlers={error: store_unavailable for error in STORE_UNAVAILABLE},
    )
    app.state.bot = bot
    return app
