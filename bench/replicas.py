"""Section 1d: how long a job queued by one replica waits for another to claim it.

A real `deploybot serve` on PostgreSQL (replica B) with idle workers; the bench acts as
replica A: it queues one job at a time through a store of its own and reads, from the
store, when B claimed it (`started_at - created_at`, one clock: both processes run on
this machine). Replica B hears of the job through LISTEN/NOTIFY (its loops also look every
second). The baseline is what the claim itself costs: one `claim_next_job` of a job
already queued, from the bench's own store.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import World
from bot.models import Project, Repo
from bot.sandbox.trial import POLICY, REPO, wait_for
from bot.store import Store

# The jobs fail at once (no such directory): what is measured ends when they are claimed.
ABSENT = Project("absent-dir")


@dataclass
class ClaimReport:
    across: list[float] = field(default_factory=list)  # ms from queued (by A) to claimed (by B)
    direct: list[float] = field(default_factory=list)  # ms of one claim by the store that queued it


def run(root: Path, database_url: str, rounds: int, log_level: str = "info", say=print) -> ClaimReport:
    report = ClaimReport()
    world = World(root / "world", {"README.md": "claims\n"}, POLICY, log_level=log_level,
                  extra={"server": {"database_url": database_url}})
    repo = Repo("github", REPO, "file:///absent", "main", 1)
    try:
        world.start_bot()
        queuer = Store(database_url)
        try:
            sha = "0" * 40
            for i in range(rounds):
                run = queuer.add_run(f"bench-claim-{i}", repo, 0, sha, "plan", "api", "bench", [ABSENT])
                job = wait_for(lambda: _claimed(queuer, run.id), 30, "the replica to claim the job")
                report.across.append(1000 * job)
                time.sleep(0.05)  # the replica's workers are idle again
            say(f"  claimed across replicas: {len(report.across)} jobs")
        finally:
            queuer.close()
        world.stop_bot()
        # The claim alone, by the store that queued the job (no replica running).
        alone = Store(database_url)
        try:
            for i in range(rounds):
                alone.add_run(f"bench-direct-{i}", repo, 0, sha, "plan", "api", "bench", [ABSENT])
                started = time.perf_counter()
                job = alone.claim_next_job()
                report.direct.append(1000 * (time.perf_counter() - started))
                alone.finish_job(job.id, "failed", {}, attempt=job.attempt)
        finally:
            alone.close()
    finally:
        world.close()
    return report


def _claimed(store: Store, run_id: int) -> float | None:
    """Seconds from the job being queued to its claim, once claimed."""
    with store._db() as db:
        row = db.execute("SELECT created_at, started_at FROM jobs WHERE run_id = ?", (run_id,)).fetchone()
    return max(row["started_at"] - row["created_at"], 1e-9) if row["started_at"] is not None else None
