"""The bot's side of runner pools: jobs waiting for a runner, leases, and the runner's result.

A job whose phase names a pool is not run by the bot: `RunnerExecutor` packs the
checkout the bot checked, offers it as a lease to the pool, and waits. A runner of that
pool claims the lease (long poll), runs it, streams its log and sends the result. A
runner silent for `lease_seconds` has vanished: the executor raises `RunnerLost`, and
the worker queues a plan again or reports an apply interrupted.

Leases live in the store, so a runner may reach any replica of the bot behind a load
balancer: the replica that offered a lease waits for its result, whichever replica the
runner sent it to.
"""

from __future__ import annotations

import asyncio
import io
import os
import secrets
import tarfile
import time
from pathlib import Path
from typing import BinaryIO

from bot.config import ConfigError
from bot.jobs.executor import Execution, JobSpec
from bot.jobs.sandbox import JobFiles
from bot.store import RunnerLease, Store
from policies.policy import Policy

# Never packed for a runner: git's files, and what an earlier init left in the bot's working dir.
_NOT_SHIPPED = frozenset({".git", ".terraform"})

# How often a replica looks for leases offered or finished elsewhere, should it not hear of
# them (its own it hears of at once, others' through the store's wake-ups).
POLL_SECONDS = 1.0


class RunnerLost(RuntimeError):
    """The runner that held a lease went silent, or the lease was given up."""


class RunnerPools:
    """The pools this server knows, and the leases offered to them (in the store)."""

    def __init__(self, store: Store, pools: dict[str, str], lease_seconds: float, claim_wait_seconds: float,
                 queue_seconds: float = 3600) -> None:
        self.store = store
        self.phases = dict(pools)  # pool -> the one phase its runners run
        self.lease_seconds = lease_seconds
        self.claim_wait_seconds = claim_wait_seconds
        self.queue_seconds = queue_seconds  # a job no runner took by then fails, and frees its project
        self._offered: dict[str, asyncio.Event] = {pool: asyncio.Event() for pool in pools}
        self._finished: dict[str, asyncio.Event] = {}  # leases this replica waits on

    def executor(self, pool: str) -> "RunnerExecutor":
        """The executor that sends jobs to `pool`."""
        if pool not in self.phases:
            raise KeyError(pool)
        return RunnerExecutor(self, pool)

    def depth(self, pool: str) -> int:
        """Leases of a pool no runner has claimed yet."""
        return self.store.waiting_runner_leases(pool)

    async def claim(self, pool: str, runner: str) -> RunnerLease | None:
        """The oldest waiting lease of `pool`, now held by `runner`; None after the long poll."""
        deadline = time.monotonic() + self.claim_wait_seconds
        while True:
            self._offered[pool].clear()
            lease = await asyncio.to_thread(self.store.claim_runner_lease, pool, runner)
            left = deadline - time.monotonic()
            if lease is not None or left <= 0:
                return lease
            try:
                await asyncio.wait_for(self._offered[pool].wait(), min(left, POLL_SECONDS))
            except TimeoutError:
                pass

    def hear(self, topic: str) -> None:
        """Another replica offered a lease (`lease:<pool>`) or took a runner's result (`lease-done`)."""
        if topic == "lease-done":
            for finished in self._finished.values():
                finished.set()
        elif (offered := self._offered.get(topic.removeprefix("lease:"))) is not None:
            offered.set()

    def held(self, lease_id: str, pool: str) -> RunnerLease | None:
        """A lease a runner of `pool` holds and may still report on; seeing it counts as a heartbeat."""
        return self.store.touch_runner_lease(lease_id, pool)

    def finish(self, lease: RunnerLease, execution: Execution) -> bool:
        """The runner's result: the executor waiting for it goes on. False if it was given up."""
        if not self.store.finish_runner_lease(lease.id, execution.to_json()):
            return False
        if lease.id in self._finished:
            self._finished[lease.id].set()
        return True

    async def run(self, spec: JobSpec, pool: str, checkout: bytes) -> Execution:
        """Offer a lease and wait for its result, watching the runner that holds it."""
        lease = RunnerLease(secrets.token_urlsafe(24), spec.job_id, pool, spec.to_json())
        finished = self._finished[lease.id] = asyncio.Event()
        await asyncio.to_thread(self.store.offer_runner_lease, lease, checkout)
        self._offered[pool].set()
        try:
            while True:
                try:
                    await asyncio.wait_for(finished.wait(), POLL_SECONDS)
                except TimeoutError:
                    pass
                finished.clear()
                found = await asyncio.to_thread(self.store.runner_lease, lease.id)
                if found is None:
                    raise RunnerLost(f"the lease of pool {pool} was given up")
                now, (held, result) = time.time(), found
                if result is not None:
                    return Execution.from_json(result)
                if held.state == "waiting" and now - held.offered_at > self.queue_seconds:
                    return Execution("", failure=f"no runner of pool {pool} took the job within "
                                                 f"{self.queue_seconds:g}s")
                if held.last_seen is not None and now - held.last_seen > self.lease_seconds:
                    raise RunnerLost(f"runner {held.runner or '?'} of pool {pool} went silent "
                                     f"for {self.lease_seconds:g}s")
        finally:
            # Given up (lost, cancelled, done): a runner still at work hears 410 at its next report.
            self._finished.pop(lease.id, None)
            await asyncio.shield(asyncio.to_thread(self.store.drop_runner_leases, lease.id))


class RunnerExecutor:
    """An executor that hands the phase to a runner of one pool."""

    def __init__(self, pools: RunnerPools, pool: str) -> None:
        self.pools = pools
        self.pool = pool

    async def execute(self, spec: JobSpec, files: JobFiles, log: BinaryIO) -> Execution:
        if spec.phase == "apply" and self.pools.phases[self.pool] != "apply":
            # Never reached with a checked policy (check_pools); said here too, where it matters:
            # a plan pool's runners never see an approved plan or do the apply role's work.
            return Execution("", failure=f"pool {self.pool} runs plans only")
        checkout = await asyncio.to_thread(pack_checkout, files.checkout)
        log.write(f"deploybot: waiting for a runner of pool {self.pool}\n".encode())
        return await self.pools.run(spec, self.pool, checkout)


def check_pools(policy: Policy, pools: dict[str, str]) -> None:
    """Every pool the policy names is in the config, for the phase it is named for (ConfigError)."""
    for name, repo in policy.repos.items():
        for project in repo.projects:
            for phase, pool in (("plan", project.plan_pool), ("apply", project.apply_pool)):
                if pool and pool not in pools:
                    raise ConfigError(f"policy: {name} project {project.label} names pool {pool!r}, "
                                      "which runners.pools does not declare")
                if pool and pools[pool] != phase:
                    raise ConfigError(f"policy: {name} project {project.label} runs {phase} in pool {pool!r}, "
                                      f"a {pools[pool]} pool")


def pack_checkout(root: Path) -> bytes:
    """A tar.gz of a checkout, without `.git` and any `.terraform`; symlinks stay symlinks."""
    buffer = io.BytesIO()

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        parts = Path(info.name).parts
        if any(part in _NOT_SHIPPED for part in parts):
            return None
        if info.issym():  # the bot checked the project's links; others must at least stay inside
            pointed = os.path.normpath(os.path.join(os.path.dirname(info.name), info.linkname))
            if os.path.isabs(info.linkname) or pointed == ".." or pointed.startswith("../"):
                return None
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as archive:
        archive.add(str(root), arcname=".", filter=keep)
    return buffer.getvalue()
