"""Forge-neutral domain model: what handlers, policies and the runner see.

Payloads from GitHub (and later GitLab) are turned into these plain dataclasses
at the edge; nothing past the edge knows which forge an event came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class Repo:
    """A repository on a forge, as named in a signed payload."""

    forge: str  # "github" or "gitlab": picks the VCS client, never read by handlers
    full_name: str  # "acme/infrastructure-live"; GitLab paths may be nested
    clone_url: str
    default_branch: str
    installation_id: int | None = None  # GitHub App installation that sent the event
    # The forge's numeric repository (GitLab: project) id. A name can be deleted and taken by
    # someone else, an id cannot (policies.repo_identity). None: the payload named none, or a
    # run stored before ids were kept. Last, with a default: stored runs load as they are.
    id: int | None = None


@dataclass(frozen=True)
class PullRequest:
    """The state of a pull (or merge) request when an event was sent or fetched."""

    repo: Repo
    number: int
    head_sha: str
    head_ref: str
    base_ref: str
    author: str
    is_fork: bool
    state: Literal["open", "closed"] = "open"
    merged: bool = False
    url: str = ""


@dataclass(frozen=True)
class PullRequestEvent:
    """A pull request was opened, got new commits, was reopened or closed."""

    action: Literal["opened", "updated", "reopened", "closed"]
    pull: PullRequest
    sender: str


@dataclass(frozen=True)
class CommentEvent:
    """A new comment on a pull request (edits and deletions never become events)."""

    repo: Repo
    pull_number: int
    comment_id: int
    author: str
    body: str


@dataclass(frozen=True)
class ReviewEvent:
    """A review was submitted on, or dismissed from, a pull request."""

    action: Literal["submitted", "dismissed"]
    pull: PullRequest
    reviewer: str
    state: str  # "approved", "changes_requested", "commented", "dismissed"


Event = PullRequestEvent | CommentEvent | ReviewEvent


@dataclass(frozen=True)
class Review:
    """One review as the forge API reports it."""

    user: str
    state: str  # "APPROVED", "CHANGES_REQUESTED", "COMMENTED", "DISMISSED", "PENDING"
    commit_sha: str
    submitted_at: str = ""


@dataclass(frozen=True)
class ForgeComment:
    """A comment as the forge API reports it (never as a webhook body claims it)."""

    id: int
    author: str
    body: str
    created_at: str  # ISO 8601 in the forge's clock; "" if the forge did not say


PLAN_ID_LENGTH = 12


def plan_id(sha256: str) -> str:
    """The short id of a saved plan that people approve: the start of its SHA-256."""
    return sha256[:PLAN_ID_LENGTH]


@dataclass(frozen=True)
class Mergeability:
    """Whether the forge would let the PR merge, and why not."""

    mergeable: bool
    reason: str = ""


@dataclass(frozen=True)
class Project:
    """A Terraform root module the bot may run: a directory and a workspace in a repo."""

    dir: str
    workspace: str = "default"
    name: str = ""
    autoplan: tuple[str, ...] = field(default_factory=tuple)
    # The runner pool (bot.runners) each phase runs in; "" runs it in the bot itself.
    plan_pool: str = ""
    apply_pool: str = ""

    def pool(self, command: str) -> str:
        """The pool a job of this command runs in (an apply's plan-and-apply from CI: the apply pool)."""
        return self.plan_pool if command == "plan" else self.apply_pool

    @property
    def label(self) -> str:
        """What comments and status contexts call this project."""
        if self.name:
            return self.name
        return self.dir if self.workspace == "default" else f"{self.dir}:{self.workspace}"
