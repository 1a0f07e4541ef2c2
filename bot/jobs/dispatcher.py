"""Hands persisted deliveries to the handlers, one at a time, after they were acknowledged."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Callable

from bot.forges.github import webhook as github_webhook
from bot.forges.gitlab import webhook as gitlab_webhook
from bot.forges.vcs import ForgeError
from bot.forges.webhook import load_body
from bot.logs import log_context
from bot.metrics import Metrics
from bot.models import CommentEvent, Event, Repo, ReviewEvent
from bot.store import Delivery, Store, StoreRetry, repo_key
from bot.store.backends import UNAVAILABLE as STORE_UNAVAILABLE
from handlers.context import HandlerContext
from handlers.router import Router
from policies.policy import Policy
from policies.repo_identity import check_repo_id

log = logging.getLogger("deploybot.dispatcher")

# Each forge's pure parser: (event name, payload) -> domain event or None.
PARSERS: dict[str, Callable[[str, dict], Event | None]] = {
    github_webhook.FORGE: github_webhook.parse_event,
    gitlab_webhook.FORGE: gitlab_webhook.parse_event,
}


MAX_ATTEMPTS = 8  # with the backoff below: retried for about an hour of forge outage
RETRY_BASE_SECONDS = 15.0
RETRY_CAP_SECONDS = 900.0


def _transient(exc: ForgeError) -> bool:
    """Unreachable, rate limited or a server error: worth trying the delivery again later."""
    return exc.status is None or exc.status == 429 or exc.status >= 500


def parse_delivery(delivery: Delivery) -> Event | None:
    """The domain event a stored delivery stands for."""
    payload = load_body(delivery.body)
    return PARSERS[delivery.forge](delivery.event, payload)


def repo_id_refusal(store: Store, policy: Policy, repo: Repo) -> str | None:
    """Why nothing may run for `repo` because of its forge id (policies.repo_identity); None if it may.

    Webhooks (here, before any handler) and the trigger API (bot.app) both ask. Only
    allow-listed repositories are held to an id: others run nothing anyway. Without a
    pinned id the id seen is recorded before it is compared, so the first one seen wins.
    """
    repo_policy = policy.repo(repo.full_name)
    if repo_policy is None:
        return None
    key = repo_key(repo)
    if repo_policy.id is not None:
        recorded = None  # the policy is the authority: the record is neither read nor written
    elif repo.id is not None:
        recorded = store.record_repo_id(key, repo.id)
    else:
        recorded = store.repo_id(key)  # an event without an id is never recorded
    reason = check_repo_id(repo_policy.id, recorded, repo.id)
    return f"{repo.forge} repository {repo.full_name}: {reason}" if reason else None


def event_pull(event: Event) -> tuple[Repo, int]:
    """The repository and pull request an event is about."""
    if isinstance(event, CommentEvent):
        return event.repo, event.pull_number
    return event.pull.repo, event.pull.number


def delivery_subject(event: Event) -> str:
    """What orders deliveries: one pull request's are handled one at a time, oldest first."""
    repo, pull = event_pull(event)
    return f"{repo_key(repo)}#{pull}"


def _sender(event: Event) -> str:
    """Who caused the event, as its payload names them."""
    if isinstance(event, CommentEvent):
        return event.author
    if isinstance(event, ReviewEvent):
        return event.reviewer
    return event.sender


class Dispatcher:
    """Runs handlers for stored deliveries, claimed one at a time from the store.

    Replicas share the deliveries: each claims the oldest it may handle (bot.store's
    `claim_delivery` keeps one pull request's in order). What a crash cut off is handled
    again once the replica's lease runs out (bot.jobs.replicas).
    """

    def __init__(
        self,
        store: Store,
        router: Router,
        context_for: Callable[[Delivery, Event], HandlerContext],
        metrics: Metrics,
        policy: Policy = Policy(repos={}),  # whose allow-listed repositories are held to their ids
    ) -> None:
        self.store = store
        self.router = router
        self.context_for = context_for
        self.metrics = metrics
        self.policy = policy
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task | None = None
        self._stored = StoreRetry("the dispatcher", lambda: self._stopping)

    async def start(self, ready: asyncio.Task | None = None) -> None:
        """Start handling deliveries (once `ready` is done: this replica is on record)."""
        self._task = asyncio.create_task(self._loop(ready), name="dispatcher")

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task:
            await self._task

    def wake(self) -> None:
        """Tell the dispatcher a delivery was stored."""
        self._wake.set()

    async def _loop(self, ready: asyncio.Task | None) -> None:
        try:
            if ready is not None:
                await ready
        except STORE_UNAVAILABLE:
            return  # stopped before the store could be written
        while not self._stopping:
            self._wake.clear()
            try:
                delivery = await self._stored("claim a delivery", lambda: self.store.claim_delivery(time.time()))
                if delivery is not None:
                    await self._handle(delivery)
                    continue  # more may be waiting
            except STORE_UNAVAILABLE:
                return  # stopping while the store cannot be written: it is handled again after the lease
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=1.0)
            except asyncio.TimeoutError:
                pass

    async def _handle(self, delivery: Delivery) -> None:
        with log_context(delivery=delivery.id, forge=delivery.forge, event=delivery.event):
            await self._dispatch(delivery)

    async def _dispatch(self, delivery: Delivery) -> None:
        error = ""
        try:
            event = parse_delivery(delivery)
            if event is not None:
                repo, pull = event_pull(event)
                with log_context(repo=repo.full_name, pr=pull):
                    # Before the handlers and before the context (which starts fetching the head
                    # commit): a repository that took an allow-listed name gets nothing done.
                    refusal = repo_id_refusal(self.store, self.policy, repo)
                    if refusal is None:
                        ctx = self.context_for(delivery, event)
                        await asyncio.to_thread(self.router.dispatch, event, ctx)
                    else:
                        self.store.audit(_sender(event), "webhook", "refused", repo.full_name,
                                         detail=f"{delivery.event} delivery {delivery.id}: {refusal}")
                        # Finished as failed: it keeps its body to look into, and the log says why.
                        error = f"refused: {refusal}"
        except ForgeError as exc:
            self.metrics.forge_errors.labels(delivery.forge).inc()
            error = f"forge API error: {exc}"
            if _transient(exc) and delivery.attempts < MAX_ATTEMPTS:
                delay = min(RETRY_CAP_SECONDS, RETRY_BASE_SECONDS * 2 ** delivery.attempts)
                delay *= random.uniform(0.5, 1.0)  # jitter: deliveries of one outage spread out
                log.warning("delivery %s: %s; trying again in %.0fs", delivery.id, error, delay)
                await self._stored(f"put delivery {delivery.id} off",
                                   lambda: self.store.retry_delivery(delivery.id, error, delay))
                return
        except STORE_UNAVAILABLE as exc:
            # The store could not be written (a full disk) halfway through the handlers: not the
            # delivery's fault. It is handled again from the start once the store takes this note;
            # its run key keeps a second handling from queueing anything twice.
            error = f"store error: {exc}"
            if delivery.attempts < MAX_ATTEMPTS:
                log.warning("delivery %s: %s; handling it again once the store can be written", delivery.id, error)
                await self._stored(f"put delivery {delivery.id} off",
                                   lambda: self.store.retry_delivery(delivery.id, error, 0))
                return
        except Exception as exc:  # one bad delivery must not stop the others
            log.exception("delivery %s (%s) failed", delivery.id, delivery.event)
            error = f"{type(exc).__name__}: {exc}"
        if error:
            log.error("delivery %s (%s): %s", delivery.id, delivery.event, error)
        await self._stored(f"finish delivery {delivery.id}", lambda: self.store.finish_delivery(delivery.id, error))
