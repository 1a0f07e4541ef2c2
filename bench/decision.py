"""Section 6: deciding what a pull request plans, in a monorepo of N projects (issue 15).

A repository of N projects that all call `modules/common`, every one in the policy; a pull
request changes that module, so every project is planned. Measured with the real bot: from
the webhook's 202 to the run queued with its N jobs (the decision: the changed files, each
project's module graph read from the commit, the locks), and the worst `/healthz` answer
meanwhile, polled every 10 ms from a thread (what a webhook arriving during the decision
waits). The bot is stopped once the run is queued: the N plans themselves are not measured.
"""

from __future__ import annotations

import copy
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.common import World
from bot.sandbox.trial import POLICY, REPO, wait_for
from bot.store import Store

COMMON = 'variable "size" {\n  default = "%s"\n}\n'
PROJECT = 'module "common" {\n  source = "../../modules/common"\n}\n'


@dataclass
class DecisionReport:
    sizes: list[int] = field(default_factory=list)
    decision_s: dict[int, float] = field(default_factory=dict)  # N -> 202 to run queued
    healthz_worst_s: dict[int, float] = field(default_factory=dict)  # N -> worst /healthz meanwhile


def monorepo(n: int) -> tuple[dict[str, str], dict]:
    """The files and the policy of a repository of `n` projects sharing one module."""
    files = {"modules/common/main.tf": COMMON % "small"}
    files.update({f"live/p{i}/main.tf": PROJECT for i in range(n)})
    policy = copy.deepcopy(POLICY)
    policy["repos"][REPO]["projects"] = [{"name": f"p{i}", "dir": f"live/p{i}"} for i in range(n)]
    return files, policy


class HealthWatch:
    """GET /healthz every 10 ms in a thread; the slowest answer since the last `take()`."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.worst = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                started = time.perf_counter()
                try:
                    client.get(f"{self.url}/healthz")
                except httpx.HTTPError:
                    pass
                self.worst = max(self.worst, time.perf_counter() - started)
                self._stop.wait(0.01)

    def take(self) -> float:
        worst, self.worst = self.worst, 0.0
        return worst

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run(root: Path, sizes: list[int], log_level: str = "info", say=print) -> DecisionReport:
    report = DecisionReport(sizes=list(sizes))
    for n in sizes:
        files, policy = monorepo(n)
        world = World(root / f"n{n}", files, policy, log_level=log_level)
        try:
            bot = world.start_bot()
            watch = HealthWatch(bot.url)
            try:
                time.sleep(0.5)
                watch.take()
                _, _, sent = world.open_pr("common", {"modules/common/main.tf": COMMON % "large"})
                queued = wait_for(lambda: _queued(world.database, sent.delivery_id), 300, f"the run of {n} projects")
                report.healthz_worst_s[n] = watch.take()
            finally:
                watch.stop()
            report.decision_s[n] = queued - sent.answered
            say(f"  decision for {n} projects: {report.decision_s[n]:.2f}s, /healthz worst "
                f"{1000 * report.healthz_worst_s[n]:.0f} ms")
        finally:
            world.close()
    return report


def _queued(database: Path | str, delivery_id: str) -> float | None:
    """When the delivery's plan run was queued with its jobs (time.time()), once it is."""
    store = Store(database)
    try:
        with store._db() as db:
            row = db.execute("SELECT MIN(jobs.created_at) FROM jobs JOIN runs ON runs.id = jobs.run_id"
                             " WHERE runs.key = ?", (f"{delivery_id}:plan",)).fetchone()
        return row[0]
    finally:
        store.close()
