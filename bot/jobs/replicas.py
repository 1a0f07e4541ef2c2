"""This process among the replicas: its heartbeat, and the take-over of what dead replicas held.

Every replica claims jobs and deliveries under its name in the store and says it is alive
every third of its lease. A replica silent for a whole lease (killed, its host gone) is dead:
any live replica then queues its plans again, reports its applies interrupted, handles its
deliveries again and posts the reports it did not finish. A replica that stops cleanly
leaves the store at once, so nothing waits for its lease.

On SQLite one process serves the store (its serve lock): it is the sole replica, whatever
else it holds is a dead process's, and everything is taken over when it starts.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from bot.jobs.worker import Worker
from bot.store import Store, StoreRetry
from bot.store.backends import UNAVAILABLE as STORE_UNAVAILABLE

log = logging.getLogger("deploybot.replicas")


class ReplicaKeeper:
    """Keeps this replica's lease and takes over after dead ones."""

    def __init__(self, store: Store, worker: Worker, wake_dispatcher: Callable[[], None], exclusive: bool) -> None:
        self.store = store
        self.worker = worker
        self.wake_dispatcher = wake_dispatcher
        self.exclusive = exclusive  # the only process on this store (SQLite)
        self._stopping = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stored = StoreRetry("the replica heartbeat", self._stopping.is_set)

    async def start(self) -> None:
        """Join the replicas and start the worker, which first takes over what the dead left.

        Both wait in tasks (the store may not take writes yet: a full disk) while the server
        answers; `registered` is done once this replica is on record, before which it claims
        nothing (a claim by a replica not on record is an orphan to the others).
        """
        self.store.sole_replica = self.exclusive
        self.registered = asyncio.create_task(self._register(), name="replica-register")
        joined = asyncio.create_task(self._join(), name="worker-recovery")
        await self.worker.start(joined)
        self._task = asyncio.create_task(self._loop(joined), name="replica-heartbeat")

    async def _register(self) -> None:
        if not self.exclusive:  # alone on the store, no one else needs to hear from it
            await self._stored("join the replicas", self.store.heartbeat)

    async def _join(self) -> None:
        await self.registered
        await self.worker.take_over(0 if self.exclusive else self.store.lease_seconds)

    async def stop(self) -> None:
        """Stop the heartbeat (after the worker has stopped) and leave: others take over at once."""
        self._stopping.set()
        if self._task:
            await self._task
        try:
            self.store.retire()
        except STORE_UNAVAILABLE as exc:
            log.warning("could not leave the store (%s): others take over after the lease", exc)

    async def _loop(self, joined: asyncio.Task) -> None:
        try:
            await joined
        except STORE_UNAVAILABLE:
            return  # stopped before the store could be written
        interval = self.store.lease_seconds / 3
        while not self._stopping.is_set():
            try:
                await asyncio.wait_for(self._stopping.wait(), interval)
                return
            except TimeoutError:
                pass
            try:
                await self.beat()
            except STORE_UNAVAILABLE:
                return  # stopping while the store is unreachable
            except Exception:  # noqa: BLE001 - the heartbeat must outlive one bad take-over
                log.exception("taking over after dead replicas failed; trying again at the next heartbeat")

    async def beat(self) -> None:
        """One heartbeat: say this replica is alive, then take over what dead replicas held."""
        if not self.exclusive and not await self._stored("renew the lease", self.store.heartbeat):
            log.error("this replica could not reach the store for a whole lease (%.0fs) and was given up as dead: "
                      "its running jobs were taken over by other replicas, and their outcomes here are dropped",
                      self.store.lease_seconds)
        if await self._stored("release orphaned deliveries", self.store.release_orphaned_deliveries):
            self.wake_dispatcher()
        await self.worker.take_over(self.store.lease_seconds)
        await self._stored("forget dead replicas", self.store.forget_dead_replicas)
