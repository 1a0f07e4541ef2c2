"""The bot's side of runner pools: jobs waiting for a runner, leases, and the runner's result.

A job whose phase names a pool is not run by the bot: `RunnerExecutor` packs the
checkout the bot checked, offers it as a lease to the pool, and waits. A runner of that
pool claims the lease (long poll), runs it, streams its log and sends the result. A
runner silent for `lease_seconds` has vanished: the executor raises `RunnerLost`, and
the worker queues a plan again or reports an apply interrupted.
"""

from __future__ import annotations

import asyncio
import io
import os
import secrets
import tarfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from bot.config import ConfigError
from bot.jobs.executor import Execution, JobSpec
from bot.jobs.sandbox import JobFiles
from policies.policy import Policy

# Never packed for a runner: git's files, and what an earlier init left in the bot's working dir.
_NOT_SHIPPED = frozenset({".git", ".terraform"})


class RunnerLost(RuntimeError):
    """The runner that held a lease went silent, or the lease was given up."""


@dataclass
class Lease:
    """One phase of one job, offered to a pool and then held by one runner."""

    pool: str
    spec: JobSpec
    checkout: bytes  # tar.gz of the checkout, without `.git`
    log: BinaryIO
    id: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    runner: str = ""
    last_seen: float = 0.0  # monotonic; 0 until claimed
    result: asyncio.Future[Execution] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class RunnerPools:
    """Leases waiting per pool, and those held by runners."""

    def __init__(self, pools: dict[str, str], lease_seconds: float, claim_wait_seconds: float,
                 queue_seconds: float = 3600) -> None:
        self.phases = dict(pools)  # pool -> the one phase its runners run
        self.lease_seconds = lease_seconds
        self.claim_wait_seconds = claim_wait_seconds
        self.queue_seconds = queue_seconds  # a job no runner took by then fails, and frees its project
        self._waiting: dict[str, deque[Lease]] = {pool: deque() for pool in pools}
        self._offered: dict[str, asyncio.Event] = {pool: asyncio.Event() for pool in pools}
        self._held: dict[str, Lease] = {}

    def executor(self, pool: str) -> "RunnerExecutor":
        """The executor that sends jobs to `pool`."""
        if pool not in self.phases:
            raise KeyError(pool)
        return RunnerExecutor(self, pool)

    def depth(self, pool: str) -> int:
        """Leases of a pool no runner has claimed yet."""
        return len(self._waiting.get(pool, ()))

    async def claim(self, pool: str, runner: str) -> Lease | None:
        """The oldest waiting lease of `pool`, now held by `runner`; None after the long poll."""
        deadline = time.monotonic() + self.claim_wait_seconds
        while True:
            waiting = self._waiting[pool]
            while waiting:
                lease = waiting.popleft()
                if lease.result.done():  # cancelled while it waited
                    continue
                lease.runner, lease.last_seen = runner, time.monotonic()
                self._held[lease.id] = lease
                return lease
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self._offered[pool].clear()
            try:
                await asyncio.wait_for(self._offered[pool].wait(), left)
            except TimeoutError:
                return None

    def held(self, lease_id: str, pool: str) -> Lease | None:
        """A lease a runner of `pool` holds and may still report on; seeing it counts as a heartbeat."""
        lease = self._held.get(lease_id)
        if lease is None or lease.pool != pool or lease.result.done():
            return None
        lease.last_seen = time.monotonic()
        return lease

    def finish(self, lease: Lease, execution: Execution) -> None:
        """The runner's result: the executor waiting for it goes on."""
        self._held.pop(lease.id, None)
        if not lease.result.done():
            lease.result.set_result(execution)

    async def run(self, lease: Lease) -> Execution:
        """Offer a lease and wait for its result, watching the runner that holds it."""
        self._waiting[lease.pool].append(lease)
        self._offered[lease.pool].set()
        offered = time.monotonic()
        try:
            while True:
                try:
                    return await asyncio.wait_for(asyncio.shield(lease.result), self.lease_seconds / 4)
                except TimeoutError:
                    if not lease.last_seen and time.monotonic() - offered > self.queue_seconds:
                        return Execution("", failure=f"no runner of pool {lease.pool} took the job within "
                                                     f"{self.queue_seconds:g}s")
                    if lease.last_seen and time.monotonic() - lease.last_seen > self.lease_seconds:
                        raise RunnerLost(f"runner {lease.runner or '?'} of pool {lease.pool} went silent "
                                         f"for {self.lease_seconds:g}s") from None
        finally:
            # Given up (lost, cancelled, done): a runner still at work hears 410 at its next report.
            self._held.pop(lease.id, None)
            if not lease.result.done():
                lease.result.cancel()


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
        return await self.pools.run(Lease(self.pool, spec, checkout, log))


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
