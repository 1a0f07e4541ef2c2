"""What the benchmarks share: servers in subprocesses, /proc readings, statistics, and a
local world (git repo + the local GitHub fake in this process + the real bot in its own
process) with timestamps on everything the fake sees."""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bot.config import load_config
from bot.sandbox.forges import REPO, SandboxGitHub
from bot.sandbox.trial import GitRepo, git, write_config
from bot.store import Store

REPO_ROOT = Path(__file__).resolve().parents[1]
_CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- numbers


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def median(values: list[float]) -> float:
    return percentile(values, 50)


# --------------------------------------------------------------------------- /proc


def proc_memory_mb(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak RSS) of a process, in MB."""
    out: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024  # kB -> MB
    return out


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (not its children)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime (fields 14 and 15)


def _busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / _CLK_TCK  # user..steal; guest time is already in user


class CpuWatch:
    """How much CPU this process tree used during a section, and how much everyone else did.

    Our tree's CPU comes from os.times() (this process and every child it reaped; the bot
    reaps its git and terraform, and each section stops its servers), so call `stop`
    only when the section's servers are gone.
    """

    def __init__(self) -> None:
        self._start = self._read()

    @staticmethod
    def _read() -> tuple[float, float, float]:
        t = os.times()
        return time.monotonic(), _busy_cpu_seconds(), t.user + t.system + t.children_user + t.children_system

    def stop(self) -> tuple[float, float]:
        """(cores used by us, cores used by other processes), averaged over the section."""
        (t0, busy0, own0), (t1, busy1, own1) = self._start, self._read()
        wall = max(t1 - t0, 1e-9)
        own = (own1 - own0) / wall
        return own, max(0.0, (busy1 - busy0) / wall - own)


# --------------------------------------------------------------------------- servers


class Server:
    """An HTTP server in a subprocess of its own, up once GET /healthz answers 200."""

    def __init__(self, name: str, argv: list[str], url: str, log_path: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = argv
        self.url = url
        self.log_path = log_path
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 60) -> "Server":
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.argv, cwd=REPO_ROOT, env=self.env,
                                            stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} did not answer /healthz within {timeout:.0f}s:\n{self.log_tail()}")

    def memory_mb(self) -> dict[str, float]:
        return proc_memory_mb(self.pid)

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.pid)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def bot_server(config_path: Path, log_path: Path, log_level: str = "info",
               env: dict[str, str] | None = None) -> Server:
    """`deploybot serve` (as `python -m bot.cli serve`) with this config, not started yet."""
    config = load_config(config_path)
    url = f"http://{config.server.host}:{config.server.port}"
    argv = [sys.executable, "-m", "bot.cli", "serve", "--config", str(config_path), "--log-level", log_level]
    return Server("deploybot", argv, url, log_path, env)


# --------------------------------------------------------------------------- the local forge, timed


@dataclass(frozen=True)
class SentWebhook:
    started: float  # time.time() just before the fake signs and POSTs it
    answered: float  # when the bot's answer came back
    event: str
    action: str
    delivery_id: str
    status: int


@dataclass(frozen=True)
class PostedComment:
    at: float  # when the fake stored it (inside the API request that posted it)
    number: int
    user: str
    body: str


class _TimedList(list):
    """A list that also remembers when each item was appended (the fake's request log)."""

    def __init__(self, items: list) -> None:
        super().__init__(items)
        self.times = [0.0] * len(items)

    def append(self, item: Any) -> None:  # called under the fake's lock
        self.times.append(time.time())
        super().append(item)


class ForgeRecorder:
    """Timestamps on the in-process GitHub fake: webhooks sent, API requests answered, comments posted.

    The fake's own methods are wrapped on this instance only; nothing in `bot/` changes.
    """

    def __init__(self, forge: SandboxGitHub) -> None:
        self.fake = forge.fake
        self.sent: list[SentWebhook] = []
        self.comments: list[PostedComment] = []
        self._cond = threading.Condition()
        fake = self.fake
        original_send, original_add_comment = fake._send, fake._add_comment

        def send(event: str, action: str, body: bytes, delivery_id: str, redelivery: bool = False) -> int:
            started = time.time()
            status = original_send(event, action, body, delivery_id, redelivery)
            with self._cond:
                self.sent.append(SentWebhook(started, time.time(), event, action, delivery_id, status))
            return status

        def add_comment(repo: Any, pull: Any, user: str, body: str) -> Any:
            comment = original_add_comment(repo, pull, user, body)
            with self._cond:
                self.comments.append(PostedComment(time.time(), pull.number, user, body))
                self._cond.notify_all()
            return comment

        fake._send = send
        fake._add_comment = add_comment
        with fake._lock:
            fake._requests = _TimedList(fake._requests)

    def requests_between(self, start: float, end: float) -> list[tuple[float, str, str, int]]:
        """(time answered, method, path, status) of the API requests answered in [start, end]."""
        with self.fake._lock:
            log: _TimedList = self.fake._requests  # type: ignore[assignment]
            return [(t, r.method, r.path, r.status) for t, r in zip(log.times, log) if start <= t <= end]

    def wait_comment(self, number: int, predicate: Any, timeout: float) -> PostedComment:
        """The first comment on PR `number` for which predicate(comment) holds, waiting for it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for comment in self.comments:
                    if comment.number == number and predicate(comment):
                        return comment
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no matching comment on #{number} within {timeout:.0f}s")
                self._cond.wait(left)


def plan_comment_predicate(bot_login: str, sha: str):
    """Matches the (last part of the) bot's plan comment for this head SHA."""
    title = f"**deploybot plan** for `{sha[:8]}`"

    def matches(comment: PostedComment) -> bool:
        if comment.user != bot_login or not comment.body.startswith(title):
            return False
        tail = comment.body.rstrip().rsplit("\n", 1)[-1]
        if tail.startswith("_part "):  # "_part 2 of 3_": wait for the last one
            words = tail.strip("_").split()
            return words[1] == words[3]
        return True

    return matches


# --------------------------------------------------------------------------- a world


@dataclass
class JobRecord:
    id: int
    project: str
    status: str
    created_at: float
    started_at: float
    finished_at: float
    result: dict


class World:
    """A repo on the local GitHub fake (in this process) and the real bot (its own process)."""

    def __init__(self, root: Path, files: dict[str, str], policy: dict, log_level: str = "info",
                 extra: dict | None = None, **terraform: Any) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.repo = GitRepo(root)
        self.repo.commit(files, "Initial projects", push="main")
        self.forge = SandboxGitHub()
        self.forge.start(self.repo.bare)
        self.recorder = ForgeRecorder(self.forge)
        self.config_path = write_config(root, self.forge, policy, extra, **terraform)
        self.log_level = log_level
        self.bot: Server | None = None

    @property
    def database(self) -> Path | str:
        """The bot's store: a SQLite file or a PostgreSQL URL."""
        return load_config(self.config_path).server.database

    @property
    def db_path(self) -> Path:
        return load_config(self.config_path).server.database_path

    def start_bot(self, env: dict[str, str] | None = None, log_name: str = "bot.log") -> Server:
        self.bot = bot_server(self.config_path, self.root / log_name, self.log_level, env).start()
        self.forge.set_webhook(self.bot.url)
        return self.bot

    def stop_bot(self) -> None:
        if self.bot is not None:
            self.bot.stop()
            self.bot = None

    def close(self) -> None:
        self.stop_bot()
        self.forge.stop()

    # Acting ----------------------------------------------------------------------

    def open_pr(self, branch: str, files: dict[str, str]) -> tuple[int, str, SentWebhook]:
        """Commit `files` on a new branch off main, open a PR; the PR, its head and the webhook sent."""
        self.repo.branch(branch, "main")
        sha = self.repo.commit(files, f"Change on {branch}", push=branch)
        mark = len(self.recorder.sent)
        number = self.forge.open(branch, author="alice")
        return number, sha, self.recorder.sent[mark]

    def push(self, number: int, branch: str, files: dict[str, str]) -> tuple[str, SentWebhook]:
        """Another commit on the PR's branch, and GitHub's `synchronize` webhook."""
        git("switch", "--quiet", branch, cwd=self.repo.work)
        sha = self.repo.commit(files, "Another change", push=branch)
        mark = len(self.recorder.sent)
        self.forge.synchronize(number)
        return sha, self.recorder.sent[mark]

    def wait_plan(self, number: int, sha: str, timeout: float = 300) -> PostedComment:
        try:
            return self.recorder.wait_comment(number, plan_comment_predicate(self.forge.bot_login, sha), timeout)
        except TimeoutError as exc:
            comments = [c.body[:200] for c in self.recorder.comments if c.number == number]
            sent = [(w.event, w.action, w.status) for w in self.recorder.sent[-3:]]
            tail = self.bot.log_tail(30) if self.bot else ""
            raise TimeoutError(f"{exc}; webhooks {sent}; comments on #{number}: {comments}; "
                               f"bot log ({self.bot.log_path if self.bot else '-'}):\n{tail}") from None

    def close_pr(self, number: int) -> None:
        """Close the PR (the bot frees its locks) and wait until the bot is idle."""
        self.forge.fake.close(REPO, number)
        self.wait_idle()

    def wait_idle(self, timeout: float = 120) -> None:
        store = Store(self.db_path)
        try:
            deadline = time.monotonic() + timeout
            while (store.pending_deliveries() or store.jobs_with_status("queued")
                   or store.jobs_with_status("running")):
                if time.monotonic() > deadline:
                    raise TimeoutError("the bot did not go idle")
                time.sleep(0.05)
        finally:
            store.close()

    # Reading the bot's store (read-only) -------------------------------------------

    def _query(self, sql: str, args: tuple) -> list[sqlite3.Row]:
        db = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True)
        db.row_factory = sqlite3.Row
        try:
            return db.execute(sql, args).fetchall()
        finally:
            db.close()

    def delivery_received_at(self, delivery_id: str) -> float | None:
        rows = self._query("SELECT received_at FROM deliveries WHERE id = ?", (delivery_id,))
        return rows[0]["received_at"] if rows else None

    def plan_jobs(self, number: int, sha: str) -> list[JobRecord]:
        rows = self._query(
            "SELECT jobs.id, jobs.project, jobs.status, jobs.result, jobs.created_at, jobs.started_at,"
            " jobs.finished_at FROM jobs JOIN runs ON runs.id = jobs.run_id WHERE runs.pull_number = ?"
            " AND runs.head_sha = ? AND runs.command = 'plan' ORDER BY jobs.id", (number, sha))
        return [JobRecord(r["id"], json.loads(r["project"]).get("name") or json.loads(r["project"])["dir"],
                          r["status"], r["created_at"], r["started_at"] or 0.0, r["finished_at"] or 0.0,
                          json.loads(r["result"])) for r in rows]
