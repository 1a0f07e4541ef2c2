"""What the store keeps, as plain records: deliveries, runs, jobs, plans, approvals, locks.

Backend-neutral: the store (bot.store.store) reads and writes these, on either database.
"""

from __future__ import annotations

from dataclasses import dataclass

from bot.models import Project, Repo

FINISHED = ("succeeded", "failed", "cancelled", "interrupted")


def project_key(repo: Repo, project: Project) -> str:
    """The lock and queue key of a project: forge, repo, dir and workspace."""
    return f"{repo.forge}:{repo.full_name.lower()}:{project.dir}:{project.workspace}"


def repo_key(repo: Repo) -> str:
    """The key of a repository in the store."""
    return f"{repo.forge}:{repo.full_name.lower()}"


@dataclass(frozen=True)
class Delivery:
    id: str
    forge: str
    event: str
    body: bytes
    attempts: int = 0
    subject: str | None = None  # the pull request it is about: one of its deliveries is handled at a time


@dataclass(frozen=True)
class Run:
    id: int
    repo: Repo
    pull_number: int
    head_sha: str
    command: str
    trigger: str
    requested_by: str


@dataclass(frozen=True)
class Job:
    id: int
    run: Run
    project: Project
    project_key: str
    status: str
    result: dict
    attempt: int = 0  # how many times it was claimed: only the latest claim may record its outcome


@dataclass(frozen=True)
class SavedPlan:
    project_key: str
    pull_number: int
    head_sha: str
    planfile: str
    sha256: str
    has_changes: bool
    shown_at: str | None = None  # when the forge shows the comment with this plan; None: not shown


@dataclass(frozen=True)
class PlanApproval:
    """A `deploybot approve` comment's approval of one saved plan."""

    user: str
    comment_id: int
    approved_at: str  # the forge's time of the comment


@dataclass(frozen=True)
class Lock:
    project_key: str
    repo: str
    pull_number: int
    holder: str


@dataclass(frozen=True)
class LockAttempt:
    """The outcome of trying to lock a project: acquired, or who holds it."""

    acquired: bool
    holder: Lock | None = None


@dataclass(frozen=True)
class RunnerToken:
    """A runner token as the store knows it: never the token itself."""

    id: int
    pool: str
    created_at: float
    revoked_at: float | None


@dataclass(frozen=True)
class RunnerLease:
    """One phase of one job offered to a runner pool, as the store keeps it (any replica serves it)."""

    id: str  # secret: a runner proves it holds the lease by naming it
    job_id: int
    pool: str
    spec: dict  # JobSpec as JSON
    state: str = "waiting"  # waiting | held | done
    runner: str = ""
    offered_at: float = 0.0
    last_seen: float | None = None  # the holder's last call (time.time())
