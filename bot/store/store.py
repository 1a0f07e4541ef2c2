"""The store: deliveries, runs and their jobs, saved plans, locks, approvals; on SQLite or PostgreSQL.

Every call is a short transaction, made from the event loop or from handler threads alike;
what must be decided once (the next job of a project, a lock, a run's report) is decided in
an exclusive write transaction (bot.store.backends). Everything the bot must not lose or do
twice goes through here.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import logging
import os
import secrets
import socket
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, TypeVar

from bot.models import Project, Repo
from bot.store.backends import CONFLICT, UNAVAILABLE, PostgresBackend, open_backend
from bot.store.migrations import migrate
from bot.store.records import (
    FINISHED,
    Delivery,
    Job,
    Lock,
    LockAttempt,
    PlanApproval,
    Run,
    RunnerLease,
    RunnerToken,
    SavedPlan,
    project_key,
    repo_key,
)
from bot.store.wakeups import Wakeups

log = logging.getLogger("deploybot.store")

T = TypeVar("T")


class StoreInUse(RuntimeError):
    """Another `deploybot serve` works on this SQLite store."""


class ServeLock:
    """One serving process per SQLite store, held while the process serves and let go when it ends.

    An exclusive `flock` on `<database>.lock` (the kernel drops it with the process). SQLite
    is one process's embedded database; replicas share a PostgreSQL store instead, where
    leases (see `Store.heartbeat`) let any number of processes serve.
    """

    def __init__(self, database: Path) -> None:
        database.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(database.with_name(database.name + ".lock"),
                                       os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "?"
            self.release()
            raise StoreInUse(f"another deploybot serve (pid {holder}) already uses {database}: one deploybot serve "
                             "per SQLite store (stop it first; for several replicas use PostgreSQL, "
                             "server.database_url)") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None


def new_replica_id() -> str:
    """A name for this process among the replicas: new at every start, so a restart is a new replica."""
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(3)}"


_ALIVE = "SELECT id FROM replicas WHERE heartbeat_at >= ?"
_UNFINISHED = "('succeeded', 'failed', 'cancelled', 'interrupted')"


# What a SavedPlan holds: never the plan's bytes, which only `plan_content` reads.
_PLAN_COLUMNS = "project_key, pull_number, head_sha, planfile, sha256, has_changes, shown_at"


def _saved_plan(row: Any) -> SavedPlan:
    return SavedPlan(row["project_key"], row["pull_number"], row["head_sha"], row["planfile"],
                     row["sha256"], bool(row["has_changes"]), row["shown_at"])


def _key_prefix(repo: Repo) -> tuple[int, str]:
    """(length, prefix) the project keys of a repository start with; compared exactly, since
    LIKE would read `_` and `%` in a repository's name as wildcards."""
    prefix = repo_key(repo) + ":"
    return len(prefix), prefix


def _runner_lease(row: Any) -> RunnerLease:
    return RunnerLease(row["id"], row["job_id"], row["pool"], json.loads(row["spec"]), row["state"], row["runner"],
                       row["offered_at"], row["last_seen"])


def _repo_from_json(text: str) -> Repo:
    return Repo(**json.loads(text))


def _project_from_json(text: str) -> Project:
    data = json.loads(text)
    data["autoplan"] = tuple(data.get("autoplan", ()))
    return Project(**data)


class Store:
    """All durable state, in one database; what this process holds is marked with `replica`."""

    def __init__(self, database: Path | str, replica: str | None = None, lease_seconds: float = 30.0) -> None:
        """A store on a SQLite file (a Path) or a PostgreSQL database (a `postgresql://` URL).

        A replica silent for `lease_seconds` (no `heartbeat`) is dead: what it held is taken over.
        """
        self.replica = replica or new_replica_id()
        self.lease_seconds = lease_seconds
        # Set by the serving process on SQLite (its serve lock): no other replica is alive.
        self.sole_replica = False
        self._backend = open_backend(database)
        migrate(self._backend, str(database).partition("@")[2] or str(database))  # no password in errors

    def close(self) -> None:
        self._backend.close()

    def wakeups(self, on_topic: Callable[[str], None]) -> Wakeups | None:
        """A listener for the topics other replicas notify (bot.store.wakeups); None on SQLite,
        where no other process works."""
        backend = self._backend
        if not isinstance(backend, PostgresBackend):
            return None
        return Wakeups(backend.url, backend.channel, on_topic)

    def announce(self, topic: str) -> None:
        """Tell every other replica `topic` (bot.store.wakeups); on SQLite there is no one else."""
        with self._db() as db:
            self._backend.notify(db, topic)

    def _dead(self, column: str) -> tuple[str, tuple]:
        """SQL (and its arguments) true when `column` names no replica alive now: any other owner
        of a job, delivery or report is dead or gone."""
        if self.sole_replica:
            return f"({column} IS NULL OR {column} <> ?)", (self.replica,)
        return f"({column} IS NULL OR {column} NOT IN ({_ALIVE}))", (time.time() - self.lease_seconds,)

    def _db(self) -> Any:
        """A connection for one or more statements, each its own transaction."""
        return self._backend.connection()

    def _tx(self) -> Any:
        """One exclusive write transaction (see bot.store.backends)."""
        return self._backend.transaction()

    # Deliveries -------------------------------------------------------------

    def add_delivery(self, delivery: Delivery) -> bool:
        """Persist a delivery; False if this delivery id was seen before."""
        with self._db() as db:
            cursor = db.execute(
                "INSERT INTO deliveries (id, forge, event, body, status, received_at, subject)"
                " VALUES (?, ?, ?, ?, 'received', ?, ?) ON CONFLICT DO NOTHING",
                (delivery.id, delivery.forge, delivery.event, delivery.body, time.time(), delivery.subject),
            )
            return cursor.rowcount == 1

    def pending_deliveries(self) -> list[Delivery]:
        """Deliveries persisted but not yet handled (or being handled), oldest first."""
        with self._db() as db:
            rows = db.execute(
                "SELECT id, forge, event, body, attempts, subject FROM deliveries"
                " WHERE status IN ('received', 'handling') ORDER BY received_at").fetchall()
        return [Delivery(r["id"], r["forge"], r["event"], bytes(r["body"]), r["attempts"], r["subject"]) for r in rows]

    def claim_delivery(self, now: float) -> Delivery | None:
        """The oldest due delivery this replica may handle now, marked as handled by it; or None.

        One delivery of a pull request at a time, oldest first, across replicas: a delivery
        waits while another of its pull request is handled or an older one is due. One put
        off after a forge error does not hold the others up.
        """
        # One statement: the row is chosen, locked and marked at once.
        try:
            with self._db() as db:
                claimed = db.execute(
                    "UPDATE deliveries SET status = 'handling', owner = ? WHERE id = ("
                    " SELECT id FROM deliveries AS d WHERE status = 'received' AND next_attempt_at <= ?"
                    " AND (subject IS NULL OR NOT EXISTS (SELECT 1 FROM deliveries AS o WHERE o.subject = d.subject"
                    " AND o.status IN ('handling', 'received') AND (o.status = 'handling'"
                    " OR (o.next_attempt_at <= ? AND o.received_at < d.received_at))))"
                    " ORDER BY received_at LIMIT 1" + self._backend.row_lock("d") + ") AND status = 'received'"
                    " RETURNING id, forge, event, body, attempts, subject", (self.replica, now, now)).fetchone()
        except CONFLICT:
            return None  # another replica took one of its pull request just now: its turn first
        if claimed is None:
            return None
        return Delivery(claimed["id"], claimed["forge"], claimed["event"], bytes(claimed["body"]),
                        claimed["attempts"], claimed["subject"])

    def retry_delivery(self, delivery_id: str, error: str, delay: float) -> None:
        """Handle the delivery again after `delay` seconds (the forge was unavailable)."""
        with self._db() as db:
            db.execute(
                "UPDATE deliveries SET status = 'received', owner = NULL, attempts = attempts + 1,"
                " next_attempt_at = ?, error = ? WHERE id = ?",
                (time.time() + delay, error, delivery_id),
            )

    def finish_delivery(self, delivery_id: str, error: str = "") -> None:
        """Mark a delivery handled. A handled one keeps its id (redeliveries stay no-ops) but
        not its body, which nothing reads again: the store does not grow by every webhook's
        25 KB, and the update need not rewrite them. A failed one keeps its body to look into."""
        with self._db() as db:
            db.execute(
                "UPDATE deliveries SET status = ?, owner = NULL, error = ?,"
                " body = CASE WHEN ? THEN body ELSE ? END WHERE id = ?",
                ("failed" if error else "done", error, bool(error), b"", delivery_id),
            )

    def delivery_status(self, delivery_id: str) -> str | None:
        with self._db() as db:
            row = db.execute(
                "SELECT status FROM deliveries WHERE id = ?", (delivery_id,)
            ).fetchone()
        return row["status"] if row else None

    # Runs and jobs ------------------------------------------------------------

    def add_run(
        self,
        key: str,
        repo: Repo,
        pull_number: int,
        head_sha: str,
        command: str,
        trigger: str,
        requested_by: str,
        projects: list[Project],
        job_status: str = "queued",
    ) -> Run | None:
        """Queue one job per project as one run; None if a run with this key exists.

        `job_status` "waiting" keeps the jobs out of the queue until released.
        """
        assert job_status in ("queued", "waiting")
        now = time.time()
        with self._tx() as db:
            added = db.execute(
                "INSERT INTO runs (key, repo, repo_key, pull_number, head_sha, command,"
                " trigger, requested_by, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT DO NOTHING RETURNING id",
                (key, json.dumps(asdict(repo)), repo_key(repo), pull_number, head_sha, command, trigger,
                 requested_by, now),
            ).fetchone()
            if added is None:
                return None
            run_id = added[0]
            for project in projects:
                db.execute(
                    "INSERT INTO jobs (run_id, project, project_key, status, created_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (run_id, json.dumps(asdict(project)), project_key(repo, project), job_status, now),
                )
            if job_status == "queued":
                self._backend.notify(db, "jobs")
        return Run(run_id, repo, pull_number, head_sha, command, trigger, requested_by)

    def has_run(self, key: str) -> bool:
        """Whether a run with this key was added."""
        with self._db() as db:
            return db.execute("SELECT 1 FROM runs WHERE key = ?", (key,)).fetchone() is not None

    def _jobs(self, where: str, args: tuple) -> list[Job]:
        with self._db() as db:
            rows = db.execute(
                "SELECT jobs.id, jobs.project, jobs.project_key, jobs.status, jobs.result, jobs.attempt,"
                " runs.id AS run_id, runs.repo, runs.pull_number, runs.head_sha, runs.command,"
                " runs.trigger, runs.requested_by FROM jobs JOIN runs ON runs.id = jobs.run_id"
                f" WHERE {where} ORDER BY jobs.id",
                args,
            ).fetchall()
        return [
            Job(
                id=r["id"],
                run=Run(r["run_id"], _repo_from_json(r["repo"]), r["pull_number"], r["head_sha"],
                        r["command"], r["trigger"], r["requested_by"]),
                project=_project_from_json(r["project"]),
                project_key=r["project_key"],
                status=r["status"],
                result=json.loads(r["result"]),
                attempt=r["attempt"],
            )
            for r in rows
        ]

    def claim_next_job(self) -> Job | None:
        """Mark the oldest runnable queued job running, held by this replica, and return it.

        A job is runnable when no job of its project is running and none queued before it,
        so two jobs of one project never overlap and run in the order they were queued,
        whichever replicas claim them.
        """
        try:
            with self._db() as db:
                row = db.execute(
                    "UPDATE jobs SET status = 'running', started_at = ?, owner = ?, attempt = attempt + 1"
                    " WHERE id = (SELECT id FROM jobs AS j WHERE status = 'queued' AND NOT EXISTS ("
                    " SELECT 1 FROM jobs AS r WHERE r.project_key = j.project_key AND (r.status = 'running'"
                    " OR (r.status = 'queued' AND r.id < j.id))) ORDER BY id LIMIT 1" + self._backend.row_lock("j")
                    + ") AND status = 'queued' RETURNING id", (time.time(), self.replica)).fetchone()
        except CONFLICT:
            return None  # another replica started a job of this project just now
        if row is None:
            return None
        return self._jobs("jobs.id = ?", (row["id"],))[0]

    def finish_job(self, job_id: int, status: str, result: dict, attempt: int | None = None) -> bool:
        """Record how a job ended; with `attempt`, only if that claim still holds the job (False if
        it was taken over meanwhile)."""
        assert status in FINISHED
        with self._db() as db:
            cursor = db.execute(
                "UPDATE jobs SET status = ?, result = ?, finished_at = ? WHERE id = ?"
                + (" AND status = 'running' AND attempt = ?" if attempt is not None else ""),
                (status, json.dumps(result), time.time(), job_id, *([attempt] if attempt is not None else [])),
            )
            return cursor.rowcount == 1

    def run_jobs(self, run_id: int) -> list[Job]:
        return self._jobs("jobs.run_id = ?", (run_id,))

    def run_size(self, run_id: int) -> int:
        """How many projects (jobs) a run has."""
        with self._db() as db:
            return db.execute("SELECT COUNT(*) FROM jobs WHERE run_id = ?", (run_id,)).fetchone()[0]

    def claim_run_report(self, run_id: int) -> bool:
        """True once, for the caller that should post the run's comment."""
        with self._tx() as db:
            pending = db.execute(
                f"SELECT COUNT(*) FROM jobs WHERE run_id = ? AND status NOT IN {_UNFINISHED}", (run_id,),
            ).fetchone()[0]
            if pending:
                return False
            cursor = db.execute(
                "UPDATE runs SET reported = 1, report_owner = ? WHERE id = ? AND reported = 0", (self.replica, run_id)
            )
            return cursor.rowcount == 1

    def finish_run_report(self, run_id: int) -> None:
        """The run's comment (or notice) was posted."""
        with self._db() as db:
            db.execute("UPDATE runs SET reported = 2, report_owner = NULL WHERE id = ?", (run_id,))

    def unreported_runs(self, grace: float = 0.0) -> list[Run]:
        """Runs over for `grace` seconds that nobody alive reports: a crash cut their report off.

        Claims of dead replicas are released. A run whose last job ended less than `grace`
        ago is left to whoever ended it (it claims the report right after).
        """
        now = time.time()
        with self._tx() as db:
            dead, args = self._dead("report_owner")
            db.execute(f"UPDATE runs SET reported = 0, report_owner = NULL WHERE reported = 1 AND {dead}", args)
            ids = [r[0] for r in db.execute(
                "SELECT id FROM runs WHERE reported = 0 AND NOT EXISTS (SELECT 1 FROM jobs WHERE"
                f" jobs.run_id = runs.id AND (jobs.status NOT IN {_UNFINISHED} OR jobs.finished_at > ?))",
                (now - grace,)).fetchall()]
        return [self.run_jobs(run_id)[0].run for run_id in ids if self.run_jobs(run_id)]

    # Replicas ------------------------------------------------------------------

    def heartbeat(self) -> bool:
        """Say this replica is alive; False if it had been given up as dead (it is alive again now,
        but what it held was taken over by others)."""
        now = time.time()
        with self._db() as db:
            if db.execute("UPDATE replicas SET heartbeat_at = ? WHERE id = ? AND heartbeat_at >= ?",
                          (now, self.replica, now - self.lease_seconds)).rowcount:
                return True
            db.execute("INSERT INTO replicas (id, started_at, heartbeat_at) VALUES (?, ?, ?)"
                       " ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
                       (self.replica, now, now))
            return False

    def retire(self) -> None:
        """This replica stops: what it still holds is taken over at once, without waiting for its lease."""
        with self._db() as db:
            db.execute("DELETE FROM replicas WHERE id = ?", (self.replica,))

    def replicas(self) -> list[str]:
        """The replicas alive now."""
        with self._db() as db:
            return [r[0] for r in db.execute(_ALIVE + " ORDER BY started_at", (time.time() - self.lease_seconds,))]

    def orphaned_jobs(self) -> list[Job]:
        """Running jobs held by no replica alive: their replica died (or stopped without finishing them)."""
        dead, args = self._dead("jobs.owner")
        return self._jobs(f"jobs.status = 'running' AND {dead}", args)

    def release_orphaned_deliveries(self) -> int:
        """Deliveries a dead replica was handling go back to be handled again (their run keys
        keep a second handling from queueing anything twice); how many."""
        with self._db() as db:
            dead, args = self._dead("owner")
            released = db.execute(f"UPDATE deliveries SET status = 'received', owner = NULL WHERE status = 'handling'"
                                  f" AND {dead}", args).rowcount
            if released:
                self._backend.notify(db, "deliveries")
            return released

    def forget_dead_replicas(self) -> None:
        """Drop the records of replicas dead for ten leases (what they held was taken over long since)."""
        with self._db() as db:
            db.execute("DELETE FROM replicas WHERE heartbeat_at < ?", (time.time() - 10 * self.lease_seconds,))

    def unfinished_jobs(self, repo: Repo, pull_number: int) -> list[Job]:
        return self._jobs(
            "runs.repo_key = ? AND runs.pull_number = ? AND jobs.status IN ('queued', 'running')",
            (repo_key(repo), pull_number),
        )

    def jobs_with_status(self, status: str) -> list[Job]:
        return self._jobs("jobs.status = ?", (status,))

    def cancel_queued(self, job_ids: list[int]) -> list[int]:
        """Cancel those of the jobs still queued; return which were cancelled."""
        cancelled = []
        with self._tx() as db:
            for job_id in job_ids:
                cursor = db.execute(
                    "UPDATE jobs SET status = 'cancelled', finished_at = ?,"
                    " result = '{\"error\": \"cancelled\"}' WHERE id = ? AND status = 'queued'",
                    (time.time(), job_id),
                )
                if cursor.rowcount:
                    cancelled.append(job_id)
        return cancelled

    def requeue_job(self, job: Job) -> bool:
        """Queue a running job of this claim again (a plan the bot stopped); False if it was taken over."""
        with self._db() as db:
            if db.execute("UPDATE jobs SET status = 'queued', started_at = NULL, owner = NULL WHERE id = ?"
                          " AND status = 'running' AND attempt = ?", (job.id, job.attempt)).rowcount == 0:
                return False
            self._backend.notify(db, "jobs")
            return True

    def latest_plan_jobs(self, repo: Repo, pull_number: int, head_sha: str) -> list[Job]:
        """The newest finished plan job per project for this PR head."""
        jobs = self._jobs(
            "runs.repo_key = ? AND runs.pull_number = ? AND runs.head_sha = ?"
            " AND runs.command = 'plan' AND jobs.status IN ('succeeded', 'failed')",
            (repo_key(repo), pull_number, head_sha),
        )
        latest: dict[str, Job] = {}
        for job in jobs:
            latest[job.project_key] = job
        return list(latest.values())

    def queue_depth(self) -> int:
        with self._db() as db:
            return db.execute(
                "SELECT COUNT(*) FROM jobs WHERE status = 'queued'"
            ).fetchone()[0]

    # Job logs ---------------------------------------------------------------

    def append_job_log(self, job_id: int, data: bytes) -> None:
        """More of a job's raw output, as terraform wrote it (redacted only when shown)."""
        with self._db() as db:
            db.execute("INSERT INTO job_logs (job_id, data) VALUES (?, ?)", (job_id, data))

    def job_log(self, job_id: int, after: int = 0) -> tuple[bytes, int]:
        """A job's output after the cursor `after` (0: from the start), and the cursor to read on from."""
        with self._db() as db:
            rows = db.execute("SELECT id, data FROM job_logs WHERE job_id = ? AND id > ? ORDER BY id",
                              (job_id, after)).fetchall()
        return b"".join(bytes(r["data"]) for r in rows), (rows[-1]["id"] if rows else after)

    # Plans ------------------------------------------------------------------

    def save_plan(self, plan: SavedPlan, content: bytes) -> SavedPlan | None:
        """Save a project's new plan and its bytes; return the plan it replaces, whose approvals are void."""
        with self._tx() as db:
            row = db.execute(f"SELECT {_PLAN_COLUMNS} FROM plans WHERE project_key = ? AND pull_number = ?",
                             (plan.project_key, plan.pull_number)).fetchone()
            db.execute(
                "INSERT INTO plans (project_key, pull_number, head_sha, planfile,"
                " sha256, has_changes, created_at, shown_at, content) VALUES (?, ?, ?, ?, ?, ?, ?, NULL, ?)"
                " ON CONFLICT (project_key, pull_number) DO UPDATE SET head_sha = excluded.head_sha,"
                " planfile = excluded.planfile, sha256 = excluded.sha256, has_changes = excluded.has_changes,"
                " created_at = excluded.created_at, shown_at = NULL, content = excluded.content",
                (plan.project_key, plan.pull_number, plan.head_sha, plan.planfile, plan.sha256,
                 int(plan.has_changes), time.time(), content),
            )
            # Even a byte-identical plan: an approval is of the plan the approver was shown.
            db.execute("DELETE FROM plan_approvals WHERE project_key = ? AND pull_number = ?",
                       (plan.project_key, plan.pull_number))
        return _saved_plan(row) if row is not None else None

    def plan_content(self, plan: SavedPlan) -> bytes | None:
        """The saved plan's bytes, if they are still exactly the ones hashed when it was saved.

        Read back and hashed on every read: what is applied is what was approved, whichever
        process saved it. A plan saved by an earlier release lives in its file.
        """
        with self._db() as db:
            row = db.execute("SELECT content, planfile FROM plans WHERE project_key = ? AND pull_number = ?"
                             " AND sha256 = ?", (plan.project_key, plan.pull_number, plan.sha256)).fetchone()
        if row is None:
            return None
        content = row["content"]
        if content is None and row["planfile"]:
            try:
                content = Path(row["planfile"]).read_bytes()
            except OSError:
                return None
        content = bytes(content) if content is not None else None
        return content if content is not None and hashlib.sha256(content).hexdigest() == plan.sha256 else None

    def mark_plan_shown(self, key: str, pull_number: int, sha256: str, shown_at: str) -> bool:
        """Record when the forge showed this plan on the pull request; False if it was replaced."""
        with self._db() as db:
            cursor = db.execute(
                "UPDATE plans SET shown_at = ? WHERE project_key = ? AND pull_number = ?"
                " AND sha256 = ? AND shown_at IS NULL",
                (shown_at, key, pull_number, sha256),
            )
            return cursor.rowcount == 1

    def get_plan(self, key: str, pull_number: int) -> SavedPlan | None:
        with self._db() as db:
            row = db.execute(
                f"SELECT {_PLAN_COLUMNS} FROM plans WHERE project_key = ? AND pull_number = ?", (key, pull_number)
            ).fetchone()
        return _saved_plan(row) if row is not None else None

    def plans_for_pull(self, repo: Repo, pull_number: int) -> list[SavedPlan]:
        with self._db() as db:
            rows = db.execute(
                f"SELECT {_PLAN_COLUMNS} FROM plans WHERE substr(project_key, 1, ?) = ? AND pull_number = ?",
                (*_key_prefix(repo), pull_number),
            ).fetchall()
        return [_saved_plan(r) for r in rows]

    def delete_plan(self, key: str, pull_number: int) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM plans WHERE project_key = ? AND pull_number = ?", (key, pull_number))
            db.execute("DELETE FROM plan_approvals WHERE project_key = ? AND pull_number = ?",
                       (key, pull_number))

    # Locks ------------------------------------------------------------------

    def lock_count(self) -> int:
        with self._db() as db:
            return db.execute("SELECT COUNT(*) FROM locks").fetchone()[0]

    def try_locks(self, keys: list[str], repo: Repo, pull_number: int, holder: str) -> list[LockAttempt]:
        """Lock projects for a PR, in one transaction; a PR that already holds one keeps it."""
        attempts = []
        with self._tx() as db:
            for key in keys:
                row = db.execute("SELECT * FROM locks WHERE project_key = ?", (key,)).fetchone()
                if row is None:
                    db.execute(
                        "INSERT INTO locks (project_key, repo, pull_number, holder, created_at)"
                        " VALUES (?, ?, ?, ?, ?)",
                        (key, repo_key(repo), pull_number, holder, time.time()),
                    )
                    attempts.append(LockAttempt(True))
                    continue
                lock = Lock(row["project_key"], row["repo"], row["pull_number"], row["holder"])
                attempts.append(LockAttempt(lock.pull_number == pull_number, lock))
        return attempts

    def locks_for_pull(self, repo: Repo, pull_number: int) -> list[Lock]:
        with self._db() as db:
            rows = db.execute(
                "SELECT * FROM locks WHERE repo = ? AND pull_number = ?",
                (repo_key(repo), pull_number),
            ).fetchall()
        return [Lock(r["project_key"], r["repo"], r["pull_number"], r["holder"]) for r in rows]

    def unlock(self, key: str, pull_number: int) -> bool:
        with self._db() as db:
            cursor = db.execute(
                "DELETE FROM locks WHERE project_key = ? AND pull_number = ?", (key, pull_number)
            )
            return cursor.rowcount == 1

    # Runs started from the trigger API ---------------------------------------------

    def api_plan_job(self, key: str, sha: str) -> Job | None:
        """The newest successful plan of a project at a SHA started from the trigger API."""
        jobs = self._jobs(
            "runs.trigger = 'api' AND runs.command = 'plan' AND jobs.project_key = ?"
            " AND runs.head_sha = ? AND jobs.status = 'succeeded'",
            (key, sha),
        )
        return jobs[-1] if jobs else None

    def release_job(self, job_id: int) -> bool:
        with self._db() as db:
            if db.execute("UPDATE jobs SET status = 'queued' WHERE id = ? AND status = 'waiting'", (job_id,)).rowcount:
                self._backend.notify(db, "jobs")
                return True
            return False

    def waiting_jobs(self, key: str, sha: str) -> list[Job]:
        """Applies of a project at a SHA held until its plan is approved."""
        return self._jobs("jobs.status = 'waiting' AND jobs.project_key = ? AND runs.head_sha = ?",
                          (key, sha))

    def decide(self, run_id: int, approved: bool, decided_by: str, via: str) -> bool:
        """Record the approval or rejection of a plan run; False if it was decided already."""
        with self._db() as db:
            cursor = db.execute(
                "INSERT INTO decisions (run_id, approved, decided_by, via, decided_at)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (run_id, int(approved), decided_by, via, time.time()),
            )
            return cursor.rowcount == 1

    def decision(self, run_id: int) -> dict | None:
        with self._db() as db:
            row = db.execute("SELECT * FROM decisions WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            return None
        return {"state": "approved" if row["approved"] else "rejected", "by": row["decided_by"],
                "via": row["via"], "at": row["decided_at"]}

    # Audit log ------------------------------------------------------------------

    def audit(self, actor: str, action: str, outcome: str, repo: str = "", project: str = "",
              sha: str = "", detail: str = "") -> None:
        """Record who did (or tried) what, and how it ended."""
        with self._db() as db:
            db.execute(
                "INSERT INTO audit (at, actor, action, repo, project, sha, outcome, detail)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (time.time(), actor, action, repo, project, sha, outcome, detail[:2000]),
            )

    def audit_entries(self, limit: int = 100) -> list[dict]:
        with self._db() as db:
            rows = db.execute("SELECT * FROM audit ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [dict(r) for r in rows]

    # Replay protection --------------------------------------------------------

    def first_use(self, scope: str, value: str, expires_at: float) -> bool:
        """Record a one-time value (a JWT id, a nonce); False if it was used before."""
        now = time.time()
        with self._tx() as db:
            db.execute("DELETE FROM used_once WHERE expires_at < ?", (now,))
            cursor = db.execute(
                "INSERT INTO used_once (scope, value, expires_at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                (scope, value, expires_at),
            )
            return cursor.rowcount == 1

    # Approval comments --------------------------------------------------------

    def claim_comment(self, comment_key: str, delivery_id: str) -> bool:
        """Whether this delivery may act on the comment: the first to bring it (or its retry) may."""
        with self._tx() as db:
            db.execute("INSERT INTO acted_comments (comment_key, delivery_id) VALUES (?, ?) ON CONFLICT DO NOTHING",
                       (comment_key, delivery_id))
            row = db.execute("SELECT delivery_id FROM acted_comments WHERE comment_key = ?",
                             (comment_key,)).fetchone()
            return row["delivery_id"] == delivery_id

    def approve_plan(self, plan: SavedPlan, user: str, comment_id: int, approved_at: str) -> bool:
        """Record a comment's approval of exactly this plan; False if the plan was replaced."""
        with self._tx() as db:
            current = db.execute(
                "SELECT 1 FROM plans WHERE project_key = ? AND pull_number = ? AND sha256 = ?",
                (plan.project_key, plan.pull_number, plan.sha256)).fetchone()
            if current is None:
                return False
            db.execute(
                'INSERT INTO plan_approvals (project_key, pull_number, plan_sha256, "user",'
                " comment_id, approved_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (project_key, pull_number,"
                ' plan_sha256, "user") DO UPDATE SET comment_id = excluded.comment_id, approved_at = excluded.approved_at',
                (plan.project_key, plan.pull_number, plan.sha256, user, comment_id, approved_at),
            )
            return True

    def plan_approvals(self, plan: SavedPlan) -> list[PlanApproval]:
        """The comment approvals of exactly this plan (its SHA-256), oldest first."""
        with self._db() as db:
            rows = db.execute(
                'SELECT "user", comment_id, approved_at FROM plan_approvals WHERE project_key = ?'
                " AND pull_number = ? AND plan_sha256 = ? ORDER BY comment_id",
                (plan.project_key, plan.pull_number, plan.sha256),
            ).fetchall()
        return [PlanApproval(r["user"], r["comment_id"], r["approved_at"]) for r in rows]

    def add_pusher(self, repo: Repo, pull_number: int, login: str) -> None:
        """Remember who pushed commits to a pull request (a commit's e-mail can name anyone)."""
        with self._db() as db:
            db.execute("INSERT INTO pushers (repo_key, pull_number, login) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                             (repo_key(repo), pull_number, login.lower()))

    def pushers(self, repo: Repo, pull_number: int) -> set[str]:
        """Lower-cased logins of everyone who opened or pushed to the pull request."""
        with self._db() as db:
            rows = db.execute("SELECT login FROM pushers WHERE repo_key = ? AND pull_number = ?",
                                    (repo_key(repo), pull_number)).fetchall()
        return {r["login"] for r in rows}

    def lock_holder(self, key: str) -> Lock | None:
        """Who holds a project's lock, without taking it (`try_lock` takes a free lock); None if free."""
        with self._db() as db:
            row = db.execute("SELECT * FROM locks WHERE project_key = ?", (key,)).fetchone()
        return Lock(row["project_key"], row["repo"], row["pull_number"], row["holder"]) if row else None

    # Repository ids -------------------------------------------------------------

    def repo_id(self, key: str) -> int | None:
        """The forge id on record for a repository (`repo_key`), or None."""
        with self._db() as db:
            row = db.execute("SELECT repo_id FROM repo_ids WHERE repo_key = ?", (key,)).fetchone()
        return row["repo_id"] if row else None

    def record_repo_id(self, key: str, repo_id: int) -> int:
        """Record the id seen for a repository unless one is on record; return the id on record now.

        One transaction: of two deliveries naming different ids at once, one is first and the
        other sees its id.
        """
        with self._tx() as db:
            db.execute("INSERT INTO repo_ids (repo_key, repo_id, first_seen) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                       (key, repo_id, time.time()))
            return db.execute("SELECT repo_id FROM repo_ids WHERE repo_key = ?", (key,)).fetchone()["repo_id"]

    def forget_repo_id(self, key: str) -> int | None:
        """Delete a repository's recorded id (it was re-created on purpose); return the id it had, or None."""
        with self._tx() as db:
            row = db.execute("SELECT repo_id FROM repo_ids WHERE repo_key = ?", (key,)).fetchone()
            db.execute("DELETE FROM repo_ids WHERE repo_key = ?", (key,))
        return row["repo_id"] if row else None


    # Runner leases ------------------------------------------------------------------

    def offer_runner_lease(self, lease: RunnerLease, checkout: bytes) -> None:
        """Offer one phase of a job to a pool's runners."""
        with self._db() as db:
            db.execute("INSERT INTO runner_leases (id, job_id, pool, spec, checkout, state, offered_at)"
                       " VALUES (?, ?, ?, ?, ?, 'waiting', ?)",
                       (lease.id, lease.job_id, lease.pool, json.dumps(lease.spec), checkout, time.time()))
            self._backend.notify(db, f"lease:{lease.pool}")

    def claim_runner_lease(self, pool: str, runner: str) -> RunnerLease | None:
        """The oldest waiting lease of a pool, now held by `runner`; None if none waits."""
        with self._db() as db:
            claimed = db.execute(
                "UPDATE runner_leases SET state = 'held', runner = ?, last_seen = ? WHERE id = ("
                " SELECT id FROM runner_leases AS l WHERE pool = ? AND state = 'waiting' ORDER BY offered_at LIMIT 1"
                + self._backend.row_lock("l") + ") AND state = 'waiting'"
                " RETURNING id, job_id, pool, spec, state, runner, offered_at, last_seen",
                (runner, time.time(), pool)).fetchone()
        return _runner_lease(claimed) if claimed else None

    def touch_runner_lease(self, lease_id: str, pool: str) -> RunnerLease | None:
        """A lease a runner of `pool` holds and may still report on, its runner seen now; or None."""
        with self._db() as db:
            row = db.execute("UPDATE runner_leases SET last_seen = ? WHERE id = ? AND pool = ? AND state = 'held'"
                             " RETURNING id, job_id, pool, spec, state, runner, offered_at, last_seen",
                             (time.time(), lease_id, pool)).fetchone()
        return _runner_lease(row) if row else None

    def runner_lease_checkout(self, lease_id: str) -> bytes:
        with self._db() as db:
            row = db.execute("SELECT checkout FROM runner_leases WHERE id = ?", (lease_id,)).fetchone()
        return bytes(row["checkout"]) if row else b""

    def finish_runner_lease(self, lease_id: str, result: dict) -> bool:
        """The runner's result; False if the lease was given up meanwhile."""
        with self._db() as db:
            if not db.execute("UPDATE runner_leases SET state = 'done', result = ? WHERE id = ? AND state = 'held'",
                              (json.dumps(result).encode(), lease_id)).rowcount:
                return False
            self._backend.notify(db, "lease-done")
            return True

    def runner_lease(self, lease_id: str) -> tuple[RunnerLease, dict | None] | None:
        """A lease as it stands, with the runner's result once done; None if it was given up."""
        with self._db() as db:
            row = db.execute("SELECT id, job_id, pool, spec, state, runner, offered_at, last_seen, result"
                             " FROM runner_leases WHERE id = ?", (lease_id,)).fetchone()
        if row is None:
            return None
        return _runner_lease(row), json.loads(bytes(row["result"])) if row["result"] is not None else None

    def drop_runner_leases(self, lease_id: str | None = None, job_id: int | None = None) -> None:
        """Give a lease up, or every lease of a job: a runner still at it hears 410 next time."""
        with self._db() as db:
            db.execute("DELETE FROM runner_leases WHERE id = ? OR job_id = ?", (lease_id, job_id))

    def waiting_runner_leases(self, pool: str) -> int:
        with self._db() as db:
            return db.execute("SELECT COUNT(*) FROM runner_leases WHERE pool = ? AND state = 'waiting'",
                              (pool,)).fetchone()[0]

    # Runner tokens ------------------------------------------------------------------

    def add_runner_token(self, pool: str, sha256: str) -> int:
        """Record a new token of a pool (by its hash); its id."""
        with self._tx() as db:
            return db.execute("INSERT INTO runner_tokens (pool, sha256, created_at) VALUES (?, ?, ?) RETURNING id",
                              (pool, sha256, time.time())).fetchone()[0]

    def runner_token_pool(self, sha256: str) -> str | None:
        """The pool of a token that is not revoked, or None."""
        with self._db() as db:
            row = db.execute("SELECT pool FROM runner_tokens WHERE sha256 = ? AND revoked_at IS NULL",
                                   (sha256,)).fetchone()
        return row["pool"] if row else None

    def revoke_runner_token(self, token_id: int) -> bool:
        """Revoke a token; False if there is no such token not yet revoked."""
        with self._tx() as db:
            return db.execute("UPDATE runner_tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                              (time.time(), token_id)).rowcount == 1

    def runner_tokens(self) -> list[RunnerToken]:
        """Every token, revoked ones too, oldest first."""
        with self._db() as db:
            rows = db.execute("SELECT id, pool, created_at, revoked_at FROM runner_tokens ORDER BY id").fetchall()
        return [RunnerToken(row["id"], row["pool"], row["created_at"], row["revoked_at"]) for row in rows]


class StoreRetry:
    """Writes tried again while the store cannot be written: a full disk, failing I/O.

    SQLite says so with `sqlite3.OperationalError` ("database or disk is full"), PostgreSQL with
    `psycopg.OperationalError` (a lost connection, a failover). What the
    worker and the dispatcher record then (a job's outcome, a handled delivery) must not
    be lost, and they have nothing better to do until it is recorded; so they wait. An
    outage is logged once when the first write fails and once when the last one waiting
    gets through. When `stopping()` turns true the last error is raised instead: the write
    is left undone, as after a crash, and the next start's recovery picks it up.
    """

    FIRST_DELAY = 0.5  # seconds; doubled after every failure
    MAX_DELAY = 10.0

    def __init__(self, owner: str, stopping: Callable[[], bool]) -> None:
        self.owner = owner
        self.stopping = stopping
        self._waiting = 0  # writes of this owner waiting for the store now
        self._since = 0.0

    async def __call__(self, what: str, write: Callable[[], T]) -> T:
        delay = self.FIRST_DELAY
        waiting = False
        try:
            while True:
                try:
                    result = write()
                except UNAVAILABLE as exc:
                    if not waiting:
                        waiting = True
                        self._waiting += 1
                        if self._waiting == 1:
                            self._since = time.monotonic()
                            log.error("%s could not %s: the store cannot be written (%s); trying again until it can",
                                      self.owner, what, exc)
                    if self.stopping():
                        raise
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.MAX_DELAY)
                    continue
                if waiting and self._waiting == 1:
                    log.warning("%s: the store can be written again, after %.0fs", self.owner,
                                time.monotonic() - self._since)
                return result
        finally:
            if waiting:
                self._waiting -= 1
