"""The ASGI app: webhook intake, health, metrics; and the parts it wires together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from typing import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

import handlers
from bot import github_webhook
from bot.config import Config
from bot.dispatcher import Dispatcher
from bot.git import RepoCache
from bot.github_client import GitHubApp
from bot.models import CommentEvent, Event, Repo
from bot.store import Delivery, Store, repo_key
from bot.terraform import Terraform, TerraformSettings, find_terraform
from bot.vcs import VCSClient
from bot.worker import Worker
from handlers.context import HandlerContext
from policies.policy import Policy, load_policy_file

log = logging.getLogger("deploybot.app")


class Deploybot:
    """The server's parts: store, forge clients, git cache, terraform, dispatcher, worker."""

    def __init__(self, config: Config, policy: Policy | None = None) -> None:
        self.config = config
        self.policy = policy if policy is not None else load_policy_file(config.policy_file)
        data_dir = config.server.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(config.server.database_path)
        self.github = GitHubApp(config.github.api_url, config.github.app_id,
                                config.github.private_key.reveal())
        self.repo_cache = RepoCache(data_dir / "git")
        tf = config.terraform
        self.terraform = Terraform(TerraformSettings(
            binary=tf.binary or find_terraform(),
            plugin_cache_dir=tf.plugin_cache_dir or data_dir / "plugin-cache",
            cli_config_file=tf.cli_config_file,
            home_dir=data_dir / "terraform-home",
            init_timeout=tf.init_timeout,
            plan_timeout=tf.plan_timeout,
            apply_timeout=tf.apply_timeout,
        ))
        self.worker = Worker(config, self.store, self.policy, self.client_for, self.repo_cache,
                             self.terraform)
        self.dispatcher = Dispatcher(self.store, handlers.router, self.context_for)
        self.deliveries: Counter[tuple[str, str]] = Counter()
        self._loop: asyncio.AbstractEventLoop | None = None

    def client_for(self, repo: Repo) -> VCSClient:
        """The forge client for a repository."""
        return self.github.client(repo)

    def context_for(self, delivery: Delivery, event: Event) -> HandlerContext:
        """What the handlers of one delivery may use."""
        repo = event.repo if isinstance(event, CommentEvent) else event.pull.repo
        client = self.client_for(repo)
        return HandlerContext(
            delivery_id=delivery.id,
            store=self.store,
            policy=self.policy,
            client=client,
            bot_login=self.config.github.bot_login,
            wake_workers=lambda: self._call_in_loop(self.worker.wake),
            cancel_jobs=lambda jobs: self._call_in_loop(self.worker.cancel, jobs),
            read_tree=lambda sha, path: self._read_tree(repo, client, sha, path),
        )

    def _call_in_loop(self, fn, *args) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(fn, *args)

    def _read_tree(self, repo: Repo, client: VCSClient, sha: str, path: str) -> dict[str, str]:
        """Files under a directory at a SHA, fetched into the git cache (called from handler threads)."""

        async def read() -> dict[str, str]:
            header = await asyncio.to_thread(client.git_auth_header)
            await self.repo_cache.fetch(repo_key(repo), repo.clone_url, sha, header)
            return await self.repo_cache.read_files(repo_key(repo), sha, path)

        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(read(), self._loop).result(timeout=600)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self.worker.start()
        await self.dispatcher.start()

    async def stop(self) -> None:
        await self.dispatcher.stop()
        await self.worker.stop()
        self.store.close()


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The raw body, or None once it passes the limit (without reading the rest into memory)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def github_webhook_endpoint(request: Request) -> Response:
    """Verify, parse, persist, acknowledge; the work happens after the answer."""
    bot: Deploybot = request.app.state.bot
    event_name = request.headers.get("x-github-event", "")
    try:
        body = await _read_body(request, bot.config.server.max_body_bytes)
    except ClientDisconnect:
        return _error(400, "the client went away")
    if body is None:
        return _error(413, "body too large")
    try:
        github_webhook.verify_signature(
            body, request.headers.get("x-hub-signature-256"),
            bot.config.github.webhook_secret.reveal().encode(),
        )
    except github_webhook.InvalidSignature as exc:
        bot.deliveries[(event_name or "unknown", "unauthorized")] += 1
        return _error(401, str(exc))
    delivery_id = request.headers.get("x-github-delivery", "")
    if not event_name or not delivery_id:
        return _error(400, "missing X-GitHub-Event or X-GitHub-Delivery")
    if event_name == "ping":
        return JSONResponse({"status": "pong"})
    try:
        event = github_webhook.parse_event(event_name, github_webhook.load_body(body))
    except github_webhook.MalformedPayload as exc:
        bot.deliveries[(event_name, "malformed")] += 1
        return _error(400, str(exc))
    if event is None:
        log.info("ignored %s delivery %s", event_name, delivery_id)
        bot.deliveries[(event_name, "ignored")] += 1
        return JSONResponse({"status": "ignored"})
    if not bot.store.add_delivery(Delivery(delivery_id, github_webhook.FORGE, event_name, body)):
        bot.deliveries[(event_name, "duplicate")] += 1
        return JSONResponse({"status": "duplicate"})
    bot.deliveries[(event_name, "accepted")] += 1
    bot.dispatcher.wake()
    return JSONResponse({"status": "queued", "delivery": delivery_id}, status_code=202)


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    bot: Deploybot = request.app.state.bot
    lines = ["# TYPE deploybot_deliveries_total counter"]
    for (event, outcome), count in sorted(bot.deliveries.items()):
        lines.append(f'deploybot_deliveries_total{{event="{event}",outcome="{outcome}"}} {count}')
    lines += ["# TYPE deploybot_queue_depth gauge", f"deploybot_queue_depth {bot.store.queue_depth()}"]
    return PlainTextResponse("\n".join(lines) + "\n")


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
            Route("/webhooks/github", github_webhook_endpoint, methods=["POST"]),
            Route("/healthz", healthz),
            Route("/metrics", metrics),
        ],
        lifespan=lifespan,
    )
    app.state.bot = bot
    return app
