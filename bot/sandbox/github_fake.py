"""A local stand-in for GitHub: the REST endpoints deploybot calls, plus webhooks.

`FakeGitHub` serves, over real HTTP on 127.0.0.1, the subset of the GitHub REST
API that `bot.forges.github.client` uses, with GitHub's paths, status codes, JSON shapes
and authentication (App JWT checked against the app's public key; installation
tokens on every other call). Tests and `deploybot sandbox` drive it the way a
person drives GitHub (open a pull request, comment, review, merge) and it sends
the matching signed webhooks, built from GitHub's published example payloads.

Repositories are real bare git repositories on disk: SHAs, changed files,
comparisons and file contents come from git itself. A commit names the account whose
email (`set_user_email`) its author or committer has, as GitHub does; others none.

Faults: `inject_faults` (from `bot.sandbox.local_forge`) makes the next matching API requests
fail; `server_error`, `too_many_requests`, `secondary_rate_limit` and `primary_rate_limit`
below build the answers GitHub gives, headers and all.

Merging: `mergeable_state` is computed from git (conflicts), the draft flag, the base
branch's classic protection (`set_required_contexts`, `set_required_reviews`,
`set_protection_setting`; none at all: GET .../protection answers 404 "Branch not
protected") and its rulesets (`set_branch_rules`), unless `set_mergeable_state` overrides
it. GraphQL (`POST /graphql`) answers one query: a pull request's `reviewDecision`.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
import re
import secrets
import string
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bot.sandbox.local_forge import (  # noqa: F401  (re-exported: records tests read)
    Delivery,
    Fault,
    FaultInjector,
    LocalForge,
    RequestLog,
    RequestRecord,
    branch_heads,
    commit_info,
    count_commits,
    git,
    git_bytes,
    merge_commit,
    merge_conflicts,
    raw_changes,
    rev_parse,
    stable_id,
)

DOCS_URL = "https://docs.github.com/rest"
PERMISSION_LEVELS = ("none", "read", "triage", "write", "maintain", "admin")
LEGACY_PERMISSION = {"maintain": "write", "triage": "read"}  # what the old `permission` field reports
STATUS_STATES = ("error", "failure", "pending", "success")
REVIEW_STATES = ("APPROVED", "CHANGES_REQUESTED", "COMMENTED")
# Classic branch protection's on/off settings: GET .../protection reports each as {"enabled": ...}.
PROTECTION_SETTINGS = (
    "enforce_admins", "required_signatures", "required_linear_history", "allow_force_pushes", "allow_deletions",
    "block_creations", "required_conversation_resolution", "lock_branch", "allow_fork_syncing",
)
# The settings a pull request here never meets: the fake's commits are unsigned and a locked branch takes
# no merge. (It has no review threads, so every conversation counts as resolved.)
UNMET_SETTINGS = frozenset({"required_signatures", "lock_branch"})
# Ruleset rules that never keep a pull request from merging here; `pull_request` and
# `required_status_checks` are judged by its reviews and checks, and any other rule blocks it.
NON_BLOCKING_RULES = frozenset({"creation", "deletion", "non_fast_forward", "required_linear_history"})
JWT_MAX_LIFETIME = 600
COMMENT_MAX_LENGTH = 65536
STATUS_DESCRIPTION_MAX_LENGTH = 140
# What an installation of deploybot's App is granted (reported with each token, not enforced).
TOKEN_PERMISSIONS = {
    "administration": "read",  # classic branch protection: required checks, reviews, settings
    "checks": "read",
    "contents": "read",
    "issues": "write",
    "members": "read",
    "metadata": "read",
    "pull_requests": "read",
    "statuses": "write",
}
PULL_COMMITS_LIMIT = 250  # GitHub lists no more commits of a pull request
WEB_FLOW = "web-flow"  # the account of GitHub's own commits (merge button, web edits): noreply@github.com
PAYLOAD_TEMPLATE_REPO = "Codertocat/Hello-World"
PAYLOAD_TEMPLATE_HEAD_SHA = "ec26c3e57ca3a959ca5aad62de7213c562f8c821"


@dataclass
class _File:
    filename: str
    status: str  # GitHub's words: added, removed, modified, renamed, copied, changed
    sha: str
    additions: int = 0
    deletions: int = 0
    previous_filename: str | None = None


@dataclass
class _Pull:
    number: int
    id: int
    title: str
    body: str
    author: str
    head_ref: str
    base_ref: str
    head_sha: str
    base_sha: str
    fork: bool
    draft: bool
    files: list[_File]
    commits: int
    created_at: str
    updated_at: str
    state: str = "open"
    merged: bool = False
    merged_at: str | None = None
    merged_by: str | None = None
    merge_commit_sha: str | None = None
    closed_at: str | None = None
    mergeable_override: tuple[bool | None, str] | None = None


@dataclass
class _Protection:
    """A branch's classic protection, as GET .../branches/{branch}/protection reports it."""

    contexts: list[str] = field(default_factory=list)  # required status checks
    required_reviews: int = 0  # required approving reviews; 0: reviews not required
    settings: set[str] = field(default_factory=set)  # the PROTECTION_SETTINGS that are on

    def requires_anything(self) -> bool:
        return bool(self.contexts or self.required_reviews or self.settings)


@dataclass
class _Repo:
    full_name: str
    git_dir: Path
    default_branch: str
    id: int
    permissions: dict[str, str] = field(default_factory=dict)
    protection: dict[str, _Protection] = field(default_factory=dict)  # branch -> its classic protection
    rules: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # branch -> active ruleset rules
    pulls: dict[int, _Pull] = field(default_factory=dict)
    statuses: list[dict[str, Any]] = field(default_factory=list)  # oldest first
    check_runs: list[dict[str, Any]] = field(default_factory=list)
    next_number: int = 1


@dataclass
class _Comment:
    id: int
    repo: str
    number: int
    user: str
    body: str
    created_at: str
    updated_at: str


@dataclass
class _Review:
    id: int
    repo: str
    number: int
    user: str
    state: str  # upper case, as the REST API reports it
    commit_id: str
    body: str
    submitted_at: str


class _ApiError(Exception):
    """An error answer in GitHub's shape."""

    def __init__(self, status: int, message: str, errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.errors = errors


class FakeGitHub(LocalForge):
    """In-memory GitHub with a real HTTP API; see the module docstring."""

    _thread_name = "fake-github"

    def __init__(
        self,
        app_id: int = 1,
        private_key_pem: str | None = None,
        *,
        app_slug: str = "deploybot",
        token_lifetime: float = 3600.0,
    ) -> None:
        super().__init__()
        if private_key_pem is None:
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            private_key_pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ).decode()
        else:
            key = serialization.load_pem_private_key(private_key_pem.encode(), password=None)
        self.app_id = app_id
        self.app_slug = app_slug
        self.bot_login = f"{app_slug}[bot]"
        self.private_key_pem = private_key_pem
        self.public_key_pem = (
            key.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode()
        )
        self.token_lifetime = token_lifetime  # seconds; tests shorten it to exercise refresh

        self._repos: dict[str, _Repo] = {}
        self._installations: dict[int, set[str]] = {}
        self._tokens: dict[str, tuple[int, float]] = {}  # token -> (installation id, expiry)
        self._user_tokens: dict[str, str] = {}  # a user's own token -> login
        self._manifest_codes: dict[str, tuple[dict[str, Any], float]] = {}  # code -> (conversion, expiry)
        self._teams: dict[str, dict[str, tuple[str, str]]] = {}  # "org/slug" -> user -> (role, state)
        self._comments: dict[int, _Comment] = {}
        # Verified emails (lower case) -> login: all GitHub goes by to tie a commit to an account.
        self._emails: dict[str, str] = {"noreply@github.com": WEB_FLOW}
        self._reviews: dict[int, _Review] = {}
        self._ids = iter(range(1000, 10**9))
        self._templates = {
            name: json.loads(resources.files("bot.sandbox").joinpath("payloads", f"{name}.json").read_text())
            for name in ("pull_request", "issue_comment", "pull_request_review")
        }

        self.app = Starlette(
            routes=self._routes(),
            middleware=[Middleware(RequestLog, record=self._record_request), Middleware(FaultInjector, forge=self)],
            exception_handlers={_ApiError: _api_error, HTTPException: _http_error},
        )

    def __repr__(self) -> str:
        return f"FakeGitHub(app_id={self.app_id}, url={self.url!r})"

    # -- set-up ------------------------------------------------------------------------------

    def add_installation(self, installation_id: int, repos: list[str]) -> None:
        """Install the app on some repositories (add them with `add_repo` too)."""
        with self._lock:
            self._installations.setdefault(installation_id, set()).update(repos)

    def add_repo(self, full_name: str, git_dir: str | Path, default_branch: str = "main") -> None:
        """Register a repository backed by a real bare git repository."""
        git_dir = Path(git_dir).resolve()
        git(git_dir, "rev-parse", "--git-dir")  # fails early on a path that is not a repository
        with self._lock:
            self._repos[full_name] = _Repo(full_name, git_dir, default_branch, id=stable_id(full_name))

    def set_permission(self, repo: str, user: str, level: str) -> None:
        """Give a user a role on a repository (none/read/triage/write/maintain/admin)."""
        if level not in PERMISSION_LEVELS:
            raise ValueError(f"unknown permission {level!r}")
        with self._lock:
            self._repo(repo).permissions[user] = level

    def set_user_email(self, login: str, email: str) -> None:
        """Give a user a verified email: commits whose author or committer has it name that user."""
        with self._lock:
            self._emails[email.lower()] = login

    def add_team_member(self, team: str, user: str, role: str = "member", state: str = "active") -> None:
        """Put a user in `org/team-slug`; state "pending" models an unaccepted invitation."""
        with self._lock:
            self._teams.setdefault(team, {})[user] = (role, state)

    def set_default_branch(self, repo: str, branch: str) -> None:
        """Make another branch the repository's default, as its settings page does."""
        with self._lock:
            self._repo(repo).default_branch = branch

    def set_required_contexts(self, repo: str, branch: str, contexts: list[str]) -> None:
        """Require status checks in a branch's classic protection (an empty list stops requiring them)."""
        with self._lock:
            self._protect(repo, branch, contexts=list(contexts))

    def set_required_reviews(self, repo: str, branch: str, count: int) -> None:
        """Require `count` approving reviews in a branch's classic protection (0 stops requiring reviews)."""
        with self._lock:
            self._protect(repo, branch, required_reviews=count)

    def set_protection_setting(self, repo: str, branch: str, setting: str, enabled: bool) -> None:
        """Turn one of the classic protection's on/off `PROTECTION_SETTINGS` on or off."""
        if setting not in PROTECTION_SETTINGS:
            raise ValueError(f"classic branch protection has no setting {setting!r}")
        with self._lock:
            settings = set(self._repo(repo).protection.get(branch, _Protection()).settings)
            if enabled:
                settings.add(setting)
            else:
                settings.discard(setting)
            self._protect(repo, branch, settings=settings)

    def set_branch_rules(self, repo: str, branch: str, rules: list[dict[str, Any]]) -> None:
        """The rulesets' active rules for a branch, each `{"type": ..., "parameters": ...}` as GitHub lists them."""
        with self._lock:
            self._repo(repo).rules[branch] = [copy.deepcopy(rule) for rule in rules]

    def set_mergeable_state(self, repo: str, number: int, state: str | None, mergeable: bool | None = True) -> None:
        """Override what GitHub reports as mergeable/mergeable_state; state None computes it again."""
        with self._lock:
            self._pull(repo, number).mergeable_override = None if state is None else (mergeable, state)

    def set_status(self, repo: str, sha: str, context: str, state: str, description: str = "") -> None:
        """Report a commit status as some other integration (a CI server) would."""
        with self._lock:
            self._add_status(self._repo(repo), sha, context, state, description, "", creator="ci-bot")

    def set_check_run(self, repo: str, sha: str, name: str, conclusion: str | None, status: str = "completed") -> None:
        """Report a check run as GitHub Actions would (conclusion None while it runs)."""
        with self._lock:
            run = {"id": next(self._ids), "sha": sha, "name": name, "status": status, "conclusion": conclusion}
            self._repo(repo).check_runs.append(run | {"started_at": _now()})

    # -- forge behaviour: what people do on GitHub, each sending its webhook -------------------

    def open_pull(
        self,
        repo: str,
        head_ref: str,
        base_ref: str = "main",
        author: str = "alice",
        fork: bool = False,
        title: str = "Update infrastructure",
        body: str = "",
        draft: bool = False,
    ) -> int:
        """Open a pull request from a branch of the bare repository; return its number."""
        with self._lock:
            git_dir = self._repo(repo).git_dir
        head_sha, base_sha = branch_heads(git_dir, head_ref, base_ref, repo)
        files, commits = _diff(git_dir, base_sha, head_sha), count_commits(git_dir, base_sha, head_sha)
        with self._lock:
            state = self._repo(repo)
            number = state.next_number
            state.next_number += 1
            now = _now()
            pull = _Pull(
                number,
                next(self._ids),
                title,
                body,
                author,
                head_ref,
                base_ref,
                head_sha,
                base_sha,
                fork,
                draft,
                files,
                commits,
                created_at=now,
                updated_at=now,
            )
            state.pulls[number] = pull
            git(git_dir, "update-ref", f"refs/pull/{number}/head", head_sha)
            payload = self._pull_request_event("opened", state, pull, sender=author)
        self._deliver("pull_request", payload)
        return number

    def synchronize(self, repo: str, number: int, sender: str | None = None) -> int | None:
        """Pick up commits pushed to the head branch (GitHub's "synchronize"; `sender`: who pushed)."""
        with self._lock:
            state, pull = self._repo(repo), self._pull(repo, number)
            git_dir, head_ref, base_ref = state.git_dir, pull.head_ref, pull.base_ref
        try:
            head_sha, base_sha = branch_heads(git_dir, head_ref, base_ref, repo)
        except ValueError:
            raise ValueError(f"{repo} lost a branch of pull request #{number}") from None
        files, commits = _diff(git_dir, base_sha, head_sha), count_commits(git_dir, base_sha, head_sha)
        with self._lock:
            before = pull.head_sha
            pull.head_sha, pull.base_sha, pull.files, pull.commits = head_sha, base_sha, files, commits
            pull.updated_at = _now()
            git(git_dir, "update-ref", f"refs/pull/{number}/head", head_sha)
            payload = self._pull_request_event("synchronize", state, pull, sender=sender or pull.author)
            payload["before"], payload["after"] = before, head_sha
        return self._deliver("pull_request", payload)

    def comment(self, repo: str, number: int, user: str, body: str) -> int:
        """Comment on a pull request's conversation; return the comment id."""
        with self._lock:
            comment = self._add_comment(self._repo(repo), self._pull(repo, number), user, body)
            payload = self._issue_comment_event("created", repo, comment, sender=user)
        self._deliver("issue_comment", payload)
        return comment.id

    def edit_comment(self, repo: str, comment_id: int, body: str, user: str | None = None) -> int | None:
        """Edit a comment (by its author unless `user` says otherwise)."""
        with self._lock:
            comment = self._comment(repo, comment_id)
            old_body, comment.body, comment.updated_at = comment.body, body, _now()
            payload = self._issue_comment_event("edited", repo, comment, sender=user or comment.user)
            payload["changes"] = {"body": {"from": old_body}}
        return self._deliver("issue_comment", payload)

    def delete_comment(self, repo: str, comment_id: int, user: str | None = None) -> int | None:
        """Delete a comment."""
        with self._lock:
            comment = self._comment(repo, comment_id)
            del self._comments[comment_id]
            payload = self._issue_comment_event("deleted", repo, comment, sender=user or comment.user)
        return self._deliver("issue_comment", payload)

    def review(
        self, repo: str, number: int, user: str, state: str, commit_id: str | None = None, body: str = ""
    ) -> int:
        """Submit a review (APPROVED, CHANGES_REQUESTED or COMMENTED); return its id."""
        if state not in REVIEW_STATES:
            raise ValueError(f"review state must be one of {REVIEW_STATES}")
        with self._lock:
            pull = self._pull(repo, number)
            review = _Review(next(self._ids), repo, number, user, state, commit_id or pull.head_sha, body, _now())
            self._reviews[review.id] = review
            payload = self._review_event("submitted", self._repo(repo), pull, review, sender=user)
        self._deliver("pull_request_review", payload)
        return review.id

    def dismiss_review(self, repo: str, number: int, review_id: int, user: str = "admin") -> int | None:
        """Dismiss a review, as a maintainer would."""
        with self._lock:
            review = self._reviews.get(review_id)
            if review is None or (review.repo, review.number) != (repo, number):
                raise KeyError(f"no review {review_id} on {repo}#{number}")
            review.state = "DISMISSED"
            payload = self._review_event("dismissed", self._repo(repo), self._pull(repo, number), review, sender=user)
        return self._deliver("pull_request_review", payload)

    def close(self, repo: str, number: int, user: str | None = None) -> int | None:
        """Close a pull request without merging."""
        with self._lock:
            pull = self._pull(repo, number)
            pull.state, pull.closed_at = "closed", _now()
            payload = self._pull_request_event("closed", self._repo(repo), pull, sender=user or pull.author)
        return self._deliver("pull_request", payload)

    def reopen(self, repo: str, number: int, user: str | None = None) -> int | None:
        """Reopen a closed (unmerged) pull request."""
        with self._lock:
            pull = self._pull(repo, number)
            if pull.merged:
                raise ValueError("a merged pull request cannot be reopened")
            pull.state, pull.closed_at = "open", None
            payload = self._pull_request_event("reopened", self._repo(repo), pull, sender=user or pull.author)
        return self._deliver("pull_request", payload)

    def merge(self, repo: str, number: int, user: str = "admin") -> int | None:
        """Merge: a real merge commit on the base branch when git can make one, then "closed" with merged=true."""
        with self._lock:
            state, pull = self._repo(repo), self._pull(repo, number)
            git_dir, base_ref, head_sha, author = state.git_dir, pull.base_ref, pull.head_sha, pull.author
        merge_sha = merge_commit(
            git_dir,
            base_ref,
            head_sha,
            f"Merge pull request #{number} from {author}/{pull.head_ref}",
            committer=("GitHub", "noreply@github.com"),
        )
        with self._lock:
            now = _now()
            pull.state, pull.merged, pull.merged_at, pull.closed_at = "closed", True, now, now
            pull.merged_by, pull.merge_commit_sha = user, merge_sha
            payload = self._pull_request_event("closed", state, pull, sender=user)
        return self._deliver("pull_request", payload)

    # -- webhooks ----------------------------------------------------------------------------

    def set_webhook(self, url: str, secret: str) -> None:
        """Send every event from now on to `url`, signed with `secret`."""
        with self._lock:
            self._webhook = (url, secret.encode())

    def _action(self, payload: dict[str, Any]) -> str:
        return str(payload.get("action", ""))

    def _webhook_headers(self, secret: bytes, event: str, body: bytes, delivery_id: str) -> dict[str, str]:
        return {
            "Content-Type": "application/json",
            "User-Agent": "GitHub-Hookshot/fake",
            "X-GitHub-Event": event,
            "X-GitHub-Delivery": delivery_id,
            "X-GitHub-Hook-ID": "1",
            "X-GitHub-Hook-Installation-Target-Type": "integration",
            "X-GitHub-Hook-Installation-Target-ID": str(self.app_id),
            "X-Hub-Signature": "sha1=" + hmac.new(secret, body, hashlib.sha1).hexdigest(),
            "X-Hub-Signature-256": "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest(),
        }

    # -- records for assertions ---------------------------------------------------------------

    def comments(self, repo: str, number: int) -> list[dict[str, Any]]:
        """The live comments on a pull request, oldest first: id, user, body."""
        with self._lock:
            return [
                {"id": c.id, "user": c.user, "body": c.body}
                for c in sorted(self._comments.values(), key=lambda c: c.id)
                if c.repo == repo and c.number == number
            ]

    def statuses(self, repo: str, sha: str) -> dict[str, tuple[str, str]]:
        """The latest status per context on a commit: context -> (state, description)."""
        with self._lock:
            return {s["context"]: (s["state"], s["description"]) for s in self._repo(repo).statuses if s["sha"] == sha}

    def status_history(self, repo: str, sha: str | None = None) -> list[dict[str, Any]]:
        """Every status ever set on the repository (or one commit), oldest first."""
        with self._lock:
            return [dict(s) for s in self._repo(repo).statuses if sha is None or s["sha"] == sha]

    def pull(self, repo: str, number: int) -> dict[str, Any]:
        """The pull request as GET /repos/{owner}/{repo}/pulls/{number} would return it."""
        with self._lock:
            return self._pull_json(self._repo(repo), self._pull(repo, number))

    # -- state helpers (call with the lock held) ------------------------------------------------

    def _repo(self, full_name: str) -> _Repo:
        try:
            return self._repos[full_name]
        except KeyError:
            raise KeyError(f"unknown repository {full_name!r}; call add_repo first") from None

    def _pull(self, repo: str, number: int) -> _Pull:
        try:
            return self._repo(repo).pulls[number]
        except KeyError:
            raise KeyError(f"no pull request #{number} in {repo}") from None

    def _comment(self, repo: str, comment_id: int) -> _Comment:
        comment = self._comments.get(comment_id)
        if comment is None or comment.repo != repo:
            raise KeyError(f"no comment {comment_id} in {repo}")
        return comment

    def _add_comment(self, repo: _Repo, pull: _Pull, user: str, body: str) -> _Comment:
        now = _now()
        comment = _Comment(next(self._ids), repo.full_name, pull.number, user, body, now, now)
        self._comments[comment.id] = comment
        return comment

    def _add_status(
        self, repo: _Repo, sha: str, context: str, state: str, description: str, target_url: str, creator: str
    ) -> dict[str, Any]:
        now = _now()
        status = {
            "id": next(self._ids),
            "sha": sha,
            "context": context,
            "state": state,
            "description": description,
            "target_url": target_url,
            "creator": creator,
            "created_at": now,
            "updated_at": now,
        }
        repo.statuses.append(status)
        return status

    def _protect(self, repo: str, branch: str, **changes: Any) -> None:
        """Change a branch's classic protection; one left requiring nothing is removed (GitHub: not protected)."""
        protections = self._repo(repo).protection
        protection = replace(protections.get(branch, _Protection()), **changes)
        if protection.requires_anything():
            protections[branch] = protection
        else:
            protections.pop(branch, None)

    def _installation_of(self, full_name: str) -> int | None:
        return next((i for i, repos in sorted(self._installations.items()) if full_name in repos), None)

    def _latest_statuses(self, repo: _Repo, sha: str) -> dict[str, dict[str, Any]]:
        return {s["context"]: s for s in repo.statuses if s["sha"] == sha}

    def _mergeable(self, repo: _Repo, pull: _Pull) -> tuple[bool | None, str]:
        """What GitHub would compute for `mergeable` and `mergeable_state`, unless overridden."""
        if pull.mergeable_override is not None:
            return pull.mergeable_override
        if pull.merged:
            return None, "unknown"
        if merge_conflicts(repo.git_dir, pull.base_ref, pull.head_sha):
            return False, "dirty"
        if pull.draft:
            return True, "draft"
        if self._protection_blocks(repo, pull):
            return True, "blocked"
        if any(state in ("failure", "error") for state in self._check_results(repo, pull.head_sha).values()):
            return True, "unstable"
        return True, "clean"

    def _check_results(self, repo: _Repo, sha: str) -> dict[str, str]:
        """Each status context and check run of a commit: its state, check runs counted as branch protection does."""
        results = {ctx: s["state"] for ctx, s in self._latest_statuses(repo, sha).items()}
        for run in repo.check_runs:
            if run["sha"] == sha:
                ok = run["status"] == "completed" and run["conclusion"] in ("success", "neutral", "skipped")
                results[run["name"]] = "success" if ok else "failure"
        return results

    def _protection_blocks(self, repo: _Repo, pull: _Pull) -> bool:
        """Whether the base branch's classic protection or its rulesets keep the pull request from merging."""
        protection = repo.protection.get(pull.base_ref, _Protection())
        rules = repo.rules.get(pull.base_ref, [])
        if protection.settings & UNMET_SETTINGS:
            return True
        if any(r["type"] not in NON_BLOCKING_RULES | {"pull_request", "required_status_checks"} for r in rules):
            return True
        required = set(protection.contexts)
        for rule in rules:
            if rule["type"] == "required_status_checks":
                required.update(c["context"] for c in rule["parameters"]["required_status_checks"])
        results = self._check_results(repo, pull.head_sha)
        if any(results.get(context) != "success" for context in required):
            return True
        return self._review_decision(repo, pull) in ("REVIEW_REQUIRED", "CHANGES_REQUESTED")

    def _review_decision(self, repo: _Repo, pull: _Pull) -> str | None:
        """GraphQL's `reviewDecision`: None unless the base branch requires reviews (classic or ruleset).

        Each reviewer's latest approval or change request counts, and only from people with
        write access, as on GitHub.
        """
        protection = repo.protection.get(pull.base_ref, _Protection())
        counts = [protection.required_reviews] if protection.required_reviews else []
        counts += [rule["parameters"]["required_approving_review_count"]
                   for rule in repo.rules.get(pull.base_ref, []) if rule["type"] == "pull_request"]
        if not counts:
            return None
        latest: dict[str, str] = {}
        for review in sorted(self._reviews.values(), key=lambda r: r.id):
            if (review.repo, review.number) == (repo.full_name, pull.number) and review.state != "COMMENTED":
                latest[review.user] = review.state  # DISMISSED undoes that reviewer's earlier verdict
        writers = PERMISSION_LEVELS[PERMISSION_LEVELS.index("write"):]
        verdicts = [state for user, state in latest.items() if repo.permissions.get(user, "none") in writers]
        if "CHANGES_REQUESTED" in verdicts:
            return "CHANGES_REQUESTED"
        return "APPROVED" if verdicts.count("APPROVED") >= max(counts) else "REVIEW_REQUIRED"

    # -- JSON shapes ---------------------------------------------------------------------------

    @property
    def _api_url(self) -> str:
        return self.url or "http://fake-github.invalid"

    def _rewrite(self, obj: Any, full_name: str, extra: tuple[tuple[str, str], ...] = ()) -> Any:
        """A template object with GitHub's example URLs and names pointed at this fake's."""
        host = urlsplit(self._api_url).netloc
        pairs = (
            ("https://api.github.com", self._api_url),
            ("https://github.com", self._api_url),
            ("git://github.com/", f"git://{host}/"),
            ("git@github.com:", f"git@{host}:"),
            (PAYLOAD_TEMPLATE_REPO, full_name),
            *extra,
        )

        def walk(value: Any) -> Any:
            if isinstance(value, dict):
                return {k: walk(v) for k, v in value.items()}
            if isinstance(value, list):
                return [walk(v) for v in value]
            if isinstance(value, str):
                for old, new in pairs:
                    value = value.replace(old, new)
            return value

        return walk(copy.deepcopy(obj))

    def _user_json(self, login: str, kind: str | None = None) -> dict[str, Any]:
        user = self._rewrite(self._templates["pull_request"]["sender"], "", (("Codertocat", login),))
        user.update(
            login=login,
            id=stable_id(login),
            node_id=_node_id("U", login),
            type=kind or ("Bot" if login.endswith("[bot]") else "User"),
        )
        return user

    def _org_json(self, login: str) -> dict[str, Any]:
        org = self._rewrite(self._templates["pull_request"]["organization"], "", (("Octocoders", login),))
        org.update(login=login, id=stable_id(login), node_id=_node_id("O", login))
        return org

    def _repo_json(self, repo: _Repo, full_name: str | None = None) -> dict[str, Any]:
        """The repository object; `full_name` names a fork of it instead."""
        full_name = full_name or repo.full_name
        owner, _, name = full_name.partition("/")
        data = self._rewrite(self._templates["pull_request"]["repository"], full_name)
        fork = full_name != repo.full_name
        data.update(
            id=stable_id(full_name) if fork else repo.id,  # a re-created repository has a new id
            node_id=_node_id("R", full_name),
            name=name,
            full_name=full_name,
            owner=self._user_json(owner, "User" if fork else "Organization"),
            fork=fork,
            private=True,
            visibility="private",
            default_branch=repo.default_branch,
            # A fork's clone URL leads nowhere here: its commits are reachable only as refs/pull/N/head.
            clone_url=f"{self._api_url}/{full_name}.git" if fork else f"file://{repo.git_dir}",
        )
        return data

    def _pull_json(self, repo: _Repo, pull: _Pull) -> dict[str, Any]:
        """The full pull request object (REST and the pull_request webhook share it)."""
        template = self._templates["pull_request"]["pull_request"]
        n = str(pull.number)
        data = self._rewrite(
            template,
            repo.full_name,
            (
                ("/pulls/2", f"/pulls/{n}"),
                ("/issues/2", f"/issues/{n}"),
                ("/pull/2", f"/pull/{n}"),
                (PAYLOAD_TEMPLATE_HEAD_SHA, pull.head_sha),
            ),
        )
        owner = repo.full_name.split("/")[0]
        head_full_name = f"{pull.author}/{repo.full_name.split('/')[1]}" if pull.fork else repo.full_name
        mergeable, mergeable_state = self._mergeable(repo, pull)
        data.update(
            id=pull.id,
            node_id=_node_id("PR", f"{repo.full_name}#{n}"),
            number=pull.number,
            state=pull.state,
            title=pull.title,
            body=pull.body,
            user=self._user_json(pull.author),
            created_at=pull.created_at,
            updated_at=pull.updated_at,
            closed_at=pull.closed_at,
            merged_at=pull.merged_at,
            merge_commit_sha=pull.merge_commit_sha,
            assignee=None,
            assignees=[],
            requested_reviewers=[],
            requested_teams=[],
            labels=[],
            milestone=None,
            head={
                "label": f"{head_full_name.split('/')[0]}:{pull.head_ref}",
                "ref": pull.head_ref,
                "sha": pull.head_sha,
                "user": self._user_json(head_full_name.split("/")[0]),
                "repo": self._repo_json(repo, head_full_name),
            },
            base={
                "label": f"{owner}:{pull.base_ref}",
                "ref": pull.base_ref,
                "sha": pull.base_sha,
                "user": self._user_json(owner, "Organization"),
                "repo": self._repo_json(repo),
            },
            author_association="CONTRIBUTOR" if pull.fork else "MEMBER",
            draft=pull.draft,
            merged=pull.merged,
            mergeable=mergeable,
            rebaseable=mergeable,
            mergeable_state=mergeable_state,
            merged_by=self._user_json(pull.merged_by) if pull.merged_by else None,
            comments=sum(1 for c in self._comments.values() if (c.repo, c.number) == (repo.full_name, pull.number)),
            review_comments=0,
            maintainer_can_modify=False,
            commits=pull.commits,
            additions=sum(f.additions for f in pull.files),
            deletions=sum(f.deletions for f in pull.files),
            changed_files=len(pull.files),
        )
        return data

    def _issue_json(self, repo: _Repo, pull: _Pull) -> dict[str, Any]:
        """A pull request seen as an issue, with the `pull_request` key GitHub adds for PRs."""
        template = self._templates["issue_comment"]["issue"]
        n = str(pull.number)
        data = self._rewrite(template, repo.full_name, (("/issues/1", f"/issues/{n}"),))
        pr_api = f"{self._api_url}/repos/{repo.full_name}/pulls/{n}"
        pr_html = f"{self._api_url}/{repo.full_name}/pull/{n}"
        data.update(
            html_url=pr_html,
            id=stable_id(f"issue:{repo.full_name}#{n}"),
            node_id=_node_id("I", f"{repo.full_name}#{n}"),
            number=pull.number,
            title=pull.title,
            user=self._user_json(pull.author),
            labels=[],
            state=pull.state,
            assignee=None,
            assignees=[],
            milestone=None,
            created_at=pull.created_at,
            updated_at=pull.updated_at,
            closed_at=pull.closed_at,
            author_association="MEMBER",
            body=pull.body,
            draft=pull.draft,
            comments=sum(1 for c in self._comments.values() if (c.repo, c.number) == (repo.full_name, pull.number)),
            pull_request={
                "url": pr_api,
                "html_url": pr_html,
                "diff_url": f"{pr_html}.diff",
                "patch_url": f"{pr_html}.patch",
                "merged_at": pull.merged_at,
            },
        )
        return data

    def _comment_json(self, comment: _Comment) -> dict[str, Any]:
        data = self._rewrite(self._templates["issue_comment"]["comment"], comment.repo)
        api = f"{self._api_url}/repos/{comment.repo}"
        data.update(
            url=f"{api}/issues/comments/{comment.id}",
            html_url=f"{self._api_url}/{comment.repo}/pull/{comment.number}#issuecomment-{comment.id}",
            issue_url=f"{api}/issues/{comment.number}",
            id=comment.id,
            node_id=_node_id("IC", str(comment.id)),
            user=self._user_json(comment.user),
            created_at=comment.created_at,
            updated_at=comment.updated_at,
            author_association="NONE" if comment.user == self.bot_login else "MEMBER",
            body=comment.body,
        )
        data["reactions"]["url"] = f"{api}/issues/comments/{comment.id}/reactions"
        return data

    def _review_json(self, review: _Review, webhook: bool) -> dict[str, Any]:
        data = self._rewrite(self._templates["pull_request_review"]["review"], review.repo)
        html = f"{self._api_url}/{review.repo}/pull/{review.number}#pullrequestreview-{review.id}"
        pr_api = f"{self._api_url}/repos/{review.repo}/pulls/{review.number}"
        data.update(
            id=review.id,
            node_id=_node_id("PRR", str(review.id)),
            user=self._user_json(review.user),
            body=review.body or None,
            commit_id=review.commit_id,
            submitted_at=review.submitted_at,
            state=review.state.lower() if webhook else review.state,  # webhooks say "approved"
            html_url=html,
            pull_request_url=pr_api,
            author_association="MEMBER",
            _links={"html": {"href": html}, "pull_request": {"href": pr_api}},
        )
        return data

    def _status_json(self, repo: _Repo, status: dict[str, Any]) -> dict[str, Any]:
        return {
            "url": f"{self._api_url}/repos/{repo.full_name}/statuses/{status['sha']}",
            "avatar_url": None,
            "id": status["id"],
            "node_id": _node_id("SC", str(status["id"])),
            "state": status["state"],
            "description": status["description"] or None,
            "target_url": status["target_url"] or None,
            "context": status["context"],
            "created_at": status["created_at"],
            "updated_at": status["updated_at"],
            "creator": self._user_json(status["creator"]),
        }

    def _event(self, name: str, repo: _Repo, action: str, sender: str, **fields: Any) -> dict[str, Any]:
        """A webhook payload: the template's top-level keys, in its order, filled from our state."""
        values = {
            "action": action,
            "repository": self._repo_json(repo),
            "organization": self._org_json(repo.full_name.split("/")[0]),
            "sender": self._user_json(sender),
            **fields,
        }
        installation = self._installation_of(repo.full_name)
        if installation is not None:
            values["installation"] = {"id": installation, "node_id": _node_id("IN", str(installation))}
        return {key: values[key] for key in self._templates[name] if key in values}

    def _pull_request_event(self, action: str, repo: _Repo, pull: _Pull, sender: str) -> dict[str, Any]:
        return self._event(
            "pull_request", repo, action, sender, number=pull.number, pull_request=self._pull_json(repo, pull)
        )

    def _issue_comment_event(self, action: str, repo_name: str, comment: _Comment, sender: str) -> dict[str, Any]:
        repo = self._repo(repo_name)
        return self._event(
            "issue_comment",
            repo,
            action,
            sender,
            issue=self._issue_json(repo, repo.pulls[comment.number]),
            comment=self._comment_json(comment),
        )

    def _review_event(self, action: str, repo: _Repo, pull: _Pull, review: _Review, sender: str) -> dict[str, Any]:
        # The review webhook carries the shorter pull request object: keep the template's keys only.
        full = self._pull_json(repo, pull)
        short = {k: full[k] for k in self._templates["pull_request_review"]["pull_request"] if k in full}
        return self._event(
            "pull_request_review",
            repo,
            action,
            sender,
            review=self._review_json(review, webhook=True),
            pull_request=short,
        )

    # -- HTTP API ------------------------------------------------------------------------------

    def _routes(self) -> list[Route]:
        repo = "/repos/{owner}/{name}"
        return [
            Route("/app", self._get_app, methods=["GET"]),
            Route("/app/installations/{installation_id:int}/access_tokens", self._create_token, methods=["POST"]),
            Route(f"{repo}/pulls/{{number:int}}", self._get_pull, methods=["GET"]),
            Route(f"{repo}/pulls/{{number:int}}/files", self._list_files, methods=["GET"]),
            Route(f"{repo}/pulls/{{number:int}}/reviews", self._list_reviews, methods=["GET"]),
            Route(f"{repo}/pulls/{{number:int}}/commits", self._list_pull_commits, methods=["GET"]),
            Route(f"{repo}/issues/{{number:int}}/comments", _with_json(self._create_comment), methods=["POST"]),
            Route(f"{repo}/issues/{{number:int}}/comments", self._list_comments, methods=["GET"]),
            Route(f"{repo}/issues/comments/{{comment_id:int}}", _with_json(self._update_comment), methods=["PATCH"]),
            Route(f"{repo}/issues/comments/{{comment_id:int}}", self._get_comment, methods=["GET"]),
            Route(f"{repo}/statuses/{{sha}}", _with_json(self._create_status), methods=["POST"]),
            Route(f"{repo}/commits/{{ref:path}}/status", self._combined_status, methods=["GET"]),
            Route(f"{repo}/commits/{{ref:path}}/check-runs", self._list_check_runs, methods=["GET"]),
            Route(f"{repo}/collaborators/{{user}}/permission", self._get_permission, methods=["GET"]),
            Route(f"{repo}/branches/{{branch:path}}/protection", self._branch_protection, methods=["GET"]),
            Route(f"{repo}/rules/branches/{{branch:path}}", self._branch_rules, methods=["GET"]),
            Route(f"{repo}/commits/{{ref:path}}", self._get_commit, methods=["GET"]),
            Route(f"{repo}/compare/{{basehead:path}}", self._compare, methods=["GET"]),
            Route(f"{repo}/installation", self._repo_installation, methods=["GET"]),
            Route(repo, self._get_repo, methods=["GET"]),
            Route(f"{repo}/contents/{{path:path}}", self._get_contents, methods=["GET"]),
            Route("/orgs/{org}/teams/{slug}/memberships/{user}", self._team_membership, methods=["GET"]),
            Route("/user", self._get_user, methods=["GET"]),
            Route("/graphql", _with_json(self._graphql), methods=["POST"]),
            Route("/app-manifests/{code}/conversions", self._manifest_conversion, methods=["POST"]),
        ]

    def user_token(self, login: str) -> str:
        """A user's own OAuth token (it may only ask who it is: GET /user)."""
        token = "gho_" + "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(36))
        with self._lock:
            self._user_tokens[token] = login
        return token

    def _get_user(self, request: Request) -> Response:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        with self._lock:
            login = self._user_tokens.get(token) if scheme.lower() in ("token", "bearer") else None
        if login is None:
            raise _ApiError(401, "Requires authentication")
        return JSONResponse({"login": login, "id": stable_id(login), "type": "User"})

    def add_manifest_code(self, code: str, manifest: dict[str, Any] | None = None) -> dict[str, Any]:
        """A one-time code of GitHub's App manifest flow, as GitHub hands it to the redirect URL.

        Returns what `POST /app-manifests/{code}/conversions` will answer for it, once: the new
        App's id, slug, name, owner, client id and secret, webhook secret and private key (`pem`).
        """
        manifest = manifest or {}
        name = str(manifest.get("name") or "deploybot")
        slug = "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split()) or "app"
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(  # GitHub hands out PKCS#1 ("BEGIN RSA PRIVATE KEY") keys
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        ).decode()
        now = _now()
        with self._lock:
            app_id = next(self._ids)
            permissions = {"metadata": "read", **{str(k): str(v) for k, v in
                                                  (manifest.get("default_permissions") or {}).items()}}
            conversion = {
                "id": app_id,
                "slug": slug,
                "node_id": _node_id("A", str(app_id)),
                "owner": self._user_json("octocat"),
                "name": name,
                "description": str(manifest.get("description") or ""),
                "external_url": str(manifest.get("url") or ""),
                "html_url": f"{self._api_url}/apps/{slug}",
                "created_at": now,
                "updated_at": now,
                "permissions": permissions,
                "events": [str(e) for e in manifest.get("default_events") or []],
                "client_id": "Iv1." + secrets.token_hex(8),
                "client_secret": secrets.token_hex(20),
                "webhook_secret": secrets.token_hex(20),
                "pem": pem,
            }
            self._manifest_codes[code] = (conversion, time.time() + 3600)  # GitHub's codes last an hour
        return copy.deepcopy(conversion)

    def _manifest_conversion(self, request: Request) -> Response:
        """POST /app-manifests/{code}/conversions: no authentication; each code converts once."""
        with self._lock:
            entry = self._manifest_codes.pop(request.path_params["code"], None)
        if entry is None or entry[1] <= time.time():
            raise _ApiError(404, "Not Found")
        return JSONResponse(entry[0], status_code=201)

    def _check_jwt(self, request: Request) -> None:
        """Accept only an RS256 App JWT signed by this app's key, as GitHub does."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise _ApiError(401, "A JSON web token could not be decoded")
        try:
            claims = jwt.decode(
                token, self.public_key_pem, algorithms=["RS256"], options={"require": ["iat", "exp", "iss"]}
            )
        except jwt.ExpiredSignatureError:
            raise _ApiError(
                401,
                "'Expiration time' claim ('exp') must be a numeric value representing the "
                "future time at which the assertion expires",
            ) from None
        except jwt.PyJWTError:
            raise _ApiError(401, "A JSON web token could not be decoded") from None
        if str(claims["iss"]) != str(self.app_id):
            raise _ApiError(401, "'Issuer' claim ('iss') must be the App ID")
        if claims["exp"] - claims["iat"] > JWT_MAX_LIFETIME:
            raise _ApiError(401, "'Expiration time' claim ('exp') is too far in the future")

    def _fault_authorized(self, request: Request) -> bool:
        """Faults come after authentication: the JWT on /app, a user's token on /user, else an
        installation token that can see the repository in the path."""
        path = request.url.path
        try:
            if path == "/app" or path.startswith("/app/"):
                self._check_jwt(request)
            elif path == "/user":
                scheme, _, token = request.headers.get("authorization", "").partition(" ")
                with self._lock:
                    return scheme.lower() in ("token", "bearer") and token in self._user_tokens
            elif not path.startswith("/app-manifests/"):
                installation = self._installation(request)
                match = re.match(r"/repos/([^/]+)/([^/]+)", path)
                if match is not None:
                    with self._lock:
                        return f"{match[1]}/{match[2]}" in self._installations.get(installation, set())
        except _ApiError:
            return False
        return True

    def _fault_body(self, status: int) -> dict[str, Any]:
        return {"message": SERVER_ERROR_MESSAGES.get(status, "Server Error" if status >= 500 else "Error"),
                "documentation_url": DOCS_URL}

    def _installation(self, request: Request) -> int:
        """The installation whose live token authorises this request."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() not in ("token", "bearer") or not token:
            raise _ApiError(401, "Requires authentication")
        with self._lock:
            entry = self._tokens.get(token)
        if entry is None or entry[1] <= time.time():
            raise _ApiError(401, "Bad credentials")
        return entry[0]

    def _authorized_repo(self, request: Request) -> _Repo:
        """The repository in the path, if the token's installation can see it (else 404, like GitHub)."""
        installation = self._installation(request)
        full_name = f"{request.path_params['owner']}/{request.path_params['name']}"
        with self._lock:
            if full_name not in self._installations.get(installation, set()) or full_name not in self._repos:
                raise _ApiError(404, "Not Found")
            return self._repos[full_name]

    def _create_token(self, request: Request) -> Response:
        self._check_jwt(request)
        installation_id = request.path_params["installation_id"]
        with self._lock:
            if installation_id not in self._installations:
                raise _ApiError(404, "Not Found")
            token = "ghs_" + "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(36))
            expires = time.time() + self.token_lifetime
            self._tokens[token] = (installation_id, expires)
        return JSONResponse(
            {
                "token": token,
                "expires_at": datetime.fromtimestamp(expires, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "permissions": TOKEN_PERMISSIONS,
                "repository_selection": "selected",
            },
            status_code=201,
        )

    def _request_pull(self, request: Request) -> tuple[_Repo, _Pull]:
        repo = self._authorized_repo(request)
        with self._lock:
            pull = repo.pulls.get(request.path_params["number"])
        if pull is None:
            raise _ApiError(404, "Not Found")
        return repo, pull

    def _get_pull(self, request: Request) -> Response:
        repo, pull = self._request_pull(request)
        with self._lock:
            return JSONResponse(self._pull_json(repo, pull))

    def _list_files(self, request: Request) -> Response:
        repo, pull = self._request_pull(request)
        base = f"{self._api_url}/repos/{repo.full_name}"
        with self._lock:
            items = [
                _file_json(
                    f,
                    blob_url=f"{self._api_url}/{repo.full_name}/blob/{pull.head_sha}/{f.filename}",
                    raw_url=f"{self._api_url}/{repo.full_name}/raw/{pull.head_sha}/{f.filename}",
                    contents_url=f"{base}/contents/{f.filename}?ref={pull.head_sha}",
                )
                for f in pull.files[:3000]  # GitHub lists at most 3000 files of a pull request
            ]
        return _paginated(request, items)

    def _list_pull_commits(self, request: Request) -> Response:
        """GET .../pulls/{number}/commits: the pull request's commits, oldest first, no more than 250."""
        repo, pull = self._request_pull(request)
        shas = git(repo.git_dir, "rev-list", "--reverse", f"{pull.base_sha}..{pull.head_sha}").split()
        page, headers = _page(request, shas[:PULL_COMMITS_LIMIT])
        return JSONResponse([self._commit_json(repo, sha) for sha in page], headers=headers)

    def _list_reviews(self, request: Request) -> Response:
        repo, pull = self._request_pull(request)
        with self._lock:
            reviews = [
                self._review_json(r, webhook=False)
                for r in sorted(self._reviews.values(), key=lambda r: r.id)
                if (r.repo, r.number) == (repo.full_name, pull.number)
            ]
        return _paginated(request, reviews)

    def _list_comments(self, request: Request) -> Response:
        """GET .../issues/{number}/comments: oldest first; `since` keeps those updated at or after it."""
        repo, pull = self._request_pull(request)
        since = request.query_params.get("since")
        threshold = _parse_time(since) if since else None
        if since and threshold is None:
            raise _invalid("IssueComment", "since", f"since is not a valid ISO 8601 timestamp: {since}")
        with self._lock:
            items = [
                self._comment_json(c)
                for c in sorted(self._comments.values(), key=lambda c: c.id)
                if (c.repo, c.number) == (repo.full_name, pull.number)
                and (threshold is None or (_parse_time(c.updated_at) or threshold) >= threshold)
            ]
        return _paginated(request, items)

    def _create_comment(self, request: Request, data: dict[str, Any]) -> Response:
        repo, pull = self._request_pull(request)
        body = _comment_body(data)
        with self._lock:
            comment = self._add_comment(repo, pull, self.bot_login, body)
            return JSONResponse(
                self._comment_json(comment),
                status_code=201,
                headers={"Location": f"{self._api_url}/repos/{repo.full_name}/issues/comments/{comment.id}"},
            )

    def _get_comment(self, request: Request) -> Response:
        """GET .../issues/comments/{comment_id}: a comment on any issue or pull request of the repository."""
        repo = self._authorized_repo(request)
        with self._lock:
            comment = self._comments.get(request.path_params["comment_id"])
            if comment is None or comment.repo != repo.full_name:
                raise _ApiError(404, "Not Found")
            return JSONResponse(self._comment_json(comment))

    def _update_comment(self, request: Request, data: dict[str, Any]) -> Response:
        repo = self._authorized_repo(request)
        body = _comment_body(data)
        with self._lock:
            comment = self._comments.get(request.path_params["comment_id"])
            if comment is None or comment.repo != repo.full_name:
                raise _ApiError(404, "Not Found")
            comment.body, comment.updated_at = body, _now()
            return JSONResponse(self._comment_json(comment))

    def _create_status(self, request: Request, data: dict[str, Any]) -> Response:
        repo = self._authorized_repo(request)
        sha, state = request.path_params["sha"], data.get("state")
        description, context = data.get("description") or "", data.get("context") or "default"
        if state not in STATUS_STATES:
            raise _invalid("Status", "state", "state is not included in the list")
        if len(description) > STATUS_DESCRIPTION_MAX_LENGTH:
            raise _invalid("Status", "description", "description is too long (maximum is 140 characters)")
        full_sha = rev_parse(repo.git_dir, sha)
        if full_sha is None or full_sha != sha.lower():
            raise _ApiError(422, f"No commit found for SHA: {sha}")
        with self._lock:
            status = self._add_status(
                repo, full_sha, context, state, description, data.get("target_url") or "", creator=self.bot_login
            )
            return JSONResponse(self._status_json(repo, status), status_code=201)

    def _resolve(self, repo: _Repo, ref: str) -> str:
        sha = rev_parse(repo.git_dir, ref)
        if sha is None:
            raise _ApiError(422, f"No commit found for SHA: {ref}")
        return sha

    def _combined_status(self, request: Request) -> Response:
        repo = self._authorized_repo(request)
        sha = self._resolve(repo, request.path_params["ref"])
        with self._lock:
            latest = [self._status_json(repo, s) for s in self._latest_statuses(repo, sha).values()]
            repository = self._repo_json(repo)
        states = {s["state"] for s in latest}
        if states & {"failure", "error"}:
            combined = "failure"
        elif not latest or "pending" in states:
            combined = "pending"
        else:
            combined = "success"
        api = f"{self._api_url}/repos/{repo.full_name}"
        return JSONResponse(
            {
                "state": combined,
                "statuses": latest,
                "sha": sha,
                "total_count": len(latest),
                "repository": repository,
                "commit_url": f"{api}/commits/{sha}",
                "url": f"{api}/commits/{sha}/status",
            }
        )

    def _list_check_runs(self, request: Request) -> Response:
        repo = self._authorized_repo(request)
        sha = self._resolve(repo, request.path_params["ref"])
        api = f"{self._api_url}/repos/{repo.full_name}"
        with self._lock:
            latest = {run["name"]: run for run in repo.check_runs if run["sha"] == sha}
        runs = [
            {
                "id": run["id"],
                "head_sha": sha,
                "node_id": _node_id("CR", str(run["id"])),
                "external_id": "",
                "url": f"{api}/check-runs/{run['id']}",
                "html_url": f"{self._api_url}/{repo.full_name}/runs/{run['id']}",
                "details_url": None,
                "status": run["status"],
                "conclusion": run["conclusion"],
                "started_at": run["started_at"],
                "completed_at": run["started_at"] if run["status"] == "completed" else None,
                "output": {
                    "title": None,
                    "summary": None,
                    "text": None,
                    "annotations_count": 0,
                    "annotations_url": f"{api}/check-runs/{run['id']}/annotations",
                },
                "name": run["name"],
                "check_suite": {"id": run["id"]},
                "pull_requests": [],
            }
            for run in latest.values()
        ]
        page, headers = _page(request, runs)
        # The list sits under "check_runs" in an object, unlike most list endpoints.
        return JSONResponse({"total_count": len(runs), "check_runs": page}, headers=headers)

    def _get_permission(self, request: Request) -> Response:
        repo = self._authorized_repo(request)
        user = request.path_params["user"]
        with self._lock:
            level = repo.permissions.get(user)
        if level is None:
            raise _ApiError(404, "Not Found")  # GitHub's answer for users it cannot find
        with self._lock:
            return JSONResponse(
                {"permission": LEGACY_PERMISSION.get(level, level), "role_name": level, "user": self._user_json(user)}
            )

    def _branch_protection(self, request: Request) -> Response:
        """GET .../branches/{branch}/protection: the classic protection; 404 "Branch not protected" without one."""
        repo = self._authorized_repo(request)
        branch = request.path_params["branch"]
        if rev_parse(repo.git_dir, f"refs/heads/{branch}") is None:
            raise _ApiError(404, "Branch not found")
        with self._lock:
            protection = repo.protection.get(branch)
            if protection is None:
                raise _ApiError(404, "Branch not protected")
            protection = copy.deepcopy(protection)
        url = f"{self._api_url}/repos/{repo.full_name}/branches/{branch}/protection"
        data: dict[str, Any] = {"url": url}
        if protection.contexts:
            data["required_status_checks"] = {
                "url": f"{url}/required_status_checks",
                "strict": False,
                "contexts": protection.contexts,
                "contexts_url": f"{url}/required_status_checks/contexts",
                "checks": [{"context": c, "app_id": None} for c in protection.contexts],
            }
        if protection.required_reviews:
            data["required_pull_request_reviews"] = {
                "url": f"{url}/required_pull_request_reviews",
                "dismiss_stale_reviews": False,
                "require_code_owner_reviews": False,
                "require_last_push_approval": False,
                "required_approving_review_count": protection.required_reviews,
            }
        for setting in PROTECTION_SETTINGS:
            data[setting] = {"enabled": setting in protection.settings}
        for setting in ("enforce_admins", "required_signatures"):  # the two GitHub gives their own URL
            data[setting] = {"url": f"{url}/{setting}", **data[setting]}
        return JSONResponse(data)

    def _branch_rules(self, request: Request) -> Response:
        """GET .../rules/branches/{branch}: the active ruleset rules for a branch (which need not exist)."""
        repo = self._authorized_repo(request)
        with self._lock:
            rules = [
                {**rule, "ruleset_source_type": "Repository", "ruleset_source": repo.full_name,
                 "ruleset_id": stable_id(f"{repo.full_name} ruleset")}
                for rule in copy.deepcopy(repo.rules.get(request.path_params["branch"], []))
            ]
        return _paginated(request, rules)

    def _graphql(self, request: Request, data: dict[str, Any]) -> Response:
        """POST /graphql: the one query deploybot sends, a pull request's `reviewDecision`.

        Variables `owner`, `name` and `number`. As GitHub does, what cannot be resolved is
        null in `data` and named in `errors`, with status 200.
        """
        installation = self._installation(request)
        query, variables = data.get("query"), data.get("variables")
        if not isinstance(query, str) or "reviewDecision" not in query or not isinstance(variables, dict):
            unknown = "the fake GitHub answers only deploybot's reviewDecision query"
            return JSONResponse({"errors": [{"message": unknown}]})
        full_name, number = f"{variables.get('owner')}/{variables.get('name')}", variables.get("number")
        with self._lock:
            repo = self._repos.get(full_name) if full_name in self._installations.get(installation, set()) else None
            if repo is None:
                message = f"Could not resolve to a Repository with the name '{full_name}'."
                return JSONResponse({"data": {"repository": None}, "errors": [_not_resolved(["repository"], message)]})
            pull = repo.pulls.get(number) if isinstance(number, int) else None
            if pull is None:
                message = f"Could not resolve to a PullRequest with the number of {number}."
                return JSONResponse({"data": {"repository": {"pullRequest": None}},
                                     "errors": [_not_resolved(["repository", "pullRequest"], message)]})
            decision = self._review_decision(repo, pull)
        return JSONResponse({"data": {"repository": {"pullRequest": {"reviewDecision": decision}}}})

    def _get_app(self, request: Request) -> Response:
        """GET /app, as the App (JWT)."""
        self._check_jwt(request)
        return JSONResponse({"id": self.app_id, "slug": self.app_slug, "name": self.app_slug,
                             "owner": {"login": "acme"}, "events": ["pull_request", "issue_comment"]})

    def _repo_installation(self, request: Request) -> Response:
        """GET /repos/{owner}/{repo}/installation, as the App (JWT)."""
        self._check_jwt(request)
        full_name = f"{request.path_params['owner']}/{request.path_params['name']}"
        with self._lock:
            for installation_id, repos in self._installations.items():
                if full_name in repos and full_name in self._repos:
                    return JSONResponse({"id": installation_id, "app_id": self.app_id,
                                         "target_type": "Organization", "repository_selection": "selected",
                                         "account": {"login": full_name.split("/")[0]}})
        raise _ApiError(404, "Not Found")

    def _get_repo(self, request: Request) -> Response:
        repo = self._authorized_repo(request)
        with self._lock:
            return JSONResponse(self._repo_json(repo))

    def _get_commit(self, request: Request) -> Response:
        """GET /repos/{owner}/{repo}/commits/{ref}: a branch, tag or SHA (422 for none)."""
        repo = self._authorized_repo(request)
        ref = request.path_params["ref"]
        sha = rev_parse(repo.git_dir, ref) if not ref.startswith("-") else None
        if sha is None:
            raise _ApiError(422, f"No commit found for SHA: {ref}")
        return JSONResponse(self._commit_json(repo, sha))

    def _compare(self, request: Request) -> Response:
        repo = self._authorized_repo(request)
        base_ref, dots, head_ref = request.path_params["basehead"].partition("...")
        if not dots:
            raise _ApiError(404, "Not Found")
        base, head = rev_parse(repo.git_dir, base_ref), rev_parse(repo.git_dir, head_ref)
        if base is None or head is None:
            raise _ApiError(404, "Not Found")
        merge_base = git(repo.git_dir, "merge-base", base, head, check=False).strip()
        if not merge_base:
            raise _ApiError(404, f"No common ancestor between {base_ref} and {head_ref}.")
        behind, ahead = (
            int(x) for x in git(repo.git_dir, "rev-list", "--left-right", "--count", f"{base}...{head}").split()
        )
        status = (
            "identical" if ahead == behind == 0 else "ahead" if behind == 0 else "behind" if ahead == 0 else "diverged"
        )
        commits = git(repo.git_dir, "rev-list", "--reverse", "--max-count=250", f"{base}..{head}").split()
        api, web = f"{self._api_url}/repos/{repo.full_name}", f"{self._api_url}/{repo.full_name}"
        return JSONResponse(
            {
                "url": f"{api}/compare/{base_ref}...{head_ref}",
                "html_url": f"{web}/compare/{base_ref}...{head_ref}",
                "permalink_url": f"{web}/compare/{base}...{head}",
                "diff_url": f"{web}/compare/{base_ref}...{head_ref}.diff",
                "patch_url": f"{web}/compare/{base_ref}...{head_ref}.patch",
                "base_commit": self._commit_json(repo, base),
                "merge_base_commit": self._commit_json(repo, merge_base),
                "status": status,
                "ahead_by": ahead,
                "behind_by": behind,
                "total_commits": ahead,
                "commits": [self._commit_json(repo, sha) for sha in commits],
                "files": [_file_json(f) for f in _diff(repo.git_dir, base, head)],
            }
        )

    def _commit_json(self, repo: _Repo, sha: str) -> dict[str, Any]:
        info = commit_info(repo.git_dir, sha)
        with self._lock:
            author = self._emails.get(info.author_email.lower())
            committer = self._emails.get(info.committer_email.lower())
        sha, tree = info.sha, info.tree
        api, web = f"{self._api_url}/repos/{repo.full_name}", f"{self._api_url}/{repo.full_name}"
        return {
            "sha": sha,
            "node_id": _node_id("C", sha),
            "url": f"{api}/commits/{sha}",
            "html_url": f"{web}/commit/{sha}",
            "comments_url": f"{api}/commits/{sha}/comments",
            "commit": {
                "author": {"name": info.author_name, "email": info.author_email, "date": info.authored_date},
                "committer": {"name": info.committer_name, "email": info.committer_email, "date": info.committed_date},
                "message": info.message,
                "tree": {"sha": tree, "url": f"{api}/git/trees/{tree}"},
                "url": f"{api}/git/commits/{sha}",
                "comment_count": 0,
                "verification": {"verified": False, "reason": "unsigned", "signature": None, "payload": None},
            },
            # The accounts of the commit's emails; null where no account has the email.
            "author": self._user_json(author) if author else None,
            "committer": self._user_json(committer) if committer else None,
            "parents": [
                {"sha": p, "url": f"{api}/commits/{p}", "html_url": f"{web}/commit/{p}"} for p in info.parents
            ],
        }

    def _get_contents(self, request: Request) -> Response:
        repo = self._authorized_repo(request)
        path = request.path_params["path"].strip("/")
        ref = request.query_params.get("ref") or repo.default_branch
        commit = rev_parse(repo.git_dir, ref)
        if commit is None:
            raise _ApiError(404, f"No commit found for the ref {ref}")
        kind = git(repo.git_dir, "cat-file", "-t", f"{commit}:{path}", check=False).strip()
        if kind == "blob":
            blob = git_bytes(repo.git_dir, "cat-file", "blob", f"{commit}:{path}")
            sha = git(repo.git_dir, "rev-parse", f"{commit}:{path}").strip()
            data = self._content_entry(repo, ref, path, "file", sha, len(blob))
            encoded = base64.b64encode(blob).decode()
            # GitHub wraps the base64 text at 60 characters a line.
            data.update(
                content="".join(encoded[i : i + 60] + "\n" for i in range(0, len(encoded), 60)), encoding="base64"
            )
            return JSONResponse(data)
        if kind == "tree":
            listing = git(repo.git_dir, "ls-tree", "-z", "--long", f"{commit}:{path}" if path else commit)
            entries = []
            for line in filter(None, listing.split("\x00")):
                meta, name = line.split("\t", 1)
                _mode, obj_type, sha, size = meta.split()
                entry_type = {"blob": "file", "tree": "dir", "commit": "submodule"}[obj_type]
                entries.append(
                    self._content_entry(
                        repo, ref, f"{path}/{name}".lstrip("/"), entry_type, sha, int(size) if size != "-" else 0
                    )
                )
            return JSONResponse(entries)
        raise _ApiError(404, "Not Found")

    def _content_entry(self, repo: _Repo, ref: str, path: str, kind: str, sha: str, size: int) -> dict[str, Any]:
        api, web = f"{self._api_url}/repos/{repo.full_name}", f"{self._api_url}/{repo.full_name}"
        url = f"{api}/contents/{path}?ref={ref}"
        git_url = f"{api}/git/{'blobs' if kind == 'file' else 'trees'}/{sha}"
        html_url = f"{web}/{'blob' if kind == 'file' else 'tree'}/{ref}/{path}"
        return {
            "type": kind,
            "size": size,
            "name": path.rsplit("/", 1)[-1],
            "path": path,
            "sha": sha,
            "url": url,
            "git_url": git_url,
            "html_url": html_url,
            "download_url": f"{self._api_url}/{repo.full_name}/raw/{ref}/{path}" if kind == "file" else None,
            "_links": {"self": url, "git": git_url, "html": html_url},
        }

    def _team_membership(self, request: Request) -> Response:
        installation = self._installation(request)
        org, slug, user = (request.path_params[k] for k in ("org", "slug", "user"))
        with self._lock:
            # An installation sees the teams of the organisation it is installed on.
            owners = {name.split("/")[0] for name in self._installations.get(installation, set())}
            membership = self._teams.get(f"{org}/{slug}", {}).get(user)
        if org not in owners or membership is None:
            raise _ApiError(404, "Not Found")
        role, state = membership
        return JSONResponse(
            {
                "url": f"{self._api_url}/organizations/{stable_id(org)}/team/"
                f"{stable_id(org + '/' + slug)}/memberships/{user}",
                "role": role,
                "state": state,
            }
        )

    def recreate_repo(self, full_name: str) -> int:
        """Delete a repository and create another by the same name, as someone who took the name would.

        The new one has a new id and no pull requests, comments, reviews or statuses; it keeps
        the git data, the people's permissions and the installation (an App installed on all of
        the organisation's repositories covers it), so only its id tells it apart. Returns the id.
        """
        with self._lock:
            old = self._repo(full_name)
            new = _Repo(full_name, old.git_dir, old.default_branch, id=next(self._ids),
                        permissions=dict(old.permissions))
            self._repos[full_name] = new
            self._comments = {i: c for i, c in self._comments.items() if c.repo != full_name}
            self._reviews = {i: r for i, r in self._reviews.items() if r.repo != full_name}
            return new.id


# -- faults as GitHub answers them -------------------------------------------------------------

SERVER_ERROR_MESSAGES = {500: "Server Error", 502: "Server Error", 503: "Service Unavailable",
                         504: "We couldn't respond to your request in time. Sorry about that. "
                              "Please try resubmitting your request and contact us if the problem persists."}
SECONDARY_RATE_LIMIT_MESSAGE = (
    "You have exceeded a secondary rate limit. Please wait a few minutes before you try again. If you reach "
    "out to GitHub Support for help, please include the request ID 0000:0000:0000000:0000000:00000000."
)
RATE_LIMITS_DOCS = "https://docs.github.com/rest/overview/rate-limits-for-the-rest-api"
SECONDARY_RATE_LIMIT = {"message": SECONDARY_RATE_LIMIT_MESSAGE,
                        "documentation_url": f"{RATE_LIMITS_DOCS}#about-secondary-rate-limits"}


def server_error(status: int = 500, **fault: Any) -> Fault:
    """A 5xx as GitHub's API answers it (JSON `message` and `documentation_url`)."""
    body = {"message": SERVER_ERROR_MESSAGES.get(status, "Server Error"), "documentation_url": DOCS_URL}
    return Fault(status, {"X-GitHub-Media-Type": "github.v3"}, body, **fault)


def _rate_headers(remaining: int, reset_in: float, limit: int = 5000) -> dict[str, str]:
    return {"x-ratelimit-limit": str(limit), "x-ratelimit-remaining": str(remaining),
            "x-ratelimit-used": str(limit - remaining), "x-ratelimit-reset": str(int(time.time() + reset_in)),
            "x-ratelimit-resource": "core"}


def too_many_requests(retry_after: int | str, **fault: Any) -> Fault:
    """429 with `retry-after` (seconds, or an HTTP date as a string)."""
    headers = {"retry-after": str(retry_after), **_rate_headers(4000, 3600)}
    return Fault(429, headers, dict(SECONDARY_RATE_LIMIT), **fault)


def secondary_rate_limit(retry_after: int | str | None = 60, **fault: Any) -> Fault:
    """403 "You have exceeded a secondary rate limit", with `retry-after` unless it is None."""
    headers = {**_rate_headers(4000, 3600)}
    if retry_after is not None:
        headers["retry-after"] = str(retry_after)
    return Fault(403, headers, dict(SECONDARY_RATE_LIMIT), **fault)


def primary_rate_limit(reset_in: float, installation_id: int = 1, **fault: Any) -> Fault:
    """403 "API rate limit exceeded": `x-ratelimit-remaining: 0`, the reset `reset_in` seconds from now (epoch)."""
    body = {"message": f"API rate limit exceeded for installation ID {installation_id}.",
            "documentation_url": f"{RATE_LIMITS_DOCS}#about-the-primary-rate-limit"}
    return Fault(403, _rate_headers(0, reset_in), body, **fault)


# -- HTTP plumbing ---------------------------------------------------------------------------


def _error(status: int, message: str, errors: list[dict[str, Any]] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"message": message, "documentation_url": DOCS_URL}
    if errors:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, headers={"X-GitHub-Media-Type": "github.v3"})


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, _ApiError)
    return _error(exc.status, exc.message, exc.errors)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code in (404, 405):  # GitHub answers 404 to unknown paths and wrong methods alike
        return _error(404, "Not Found")
    return _error(exc.status_code, str(exc.detail))


def _not_resolved(path: list[str], message: str) -> dict[str, Any]:
    """A GraphQL error for a field that resolved to nothing, as GitHub words it."""
    return {"type": "NOT_FOUND", "path": path, "locations": [{"line": 1, "column": 1}], "message": message}


def _invalid(resource: str, field: str, message: str | None = None) -> _ApiError:
    """GitHub's 422 for one bad field: "missing_field" without a message, "custom" with one."""
    error = {"resource": resource, "field": field, "code": "custom" if message else "missing_field"}
    if message:
        error["message"] = message
    return _ApiError(422, "Validation Failed", [error])


def _file_json(f: _File, **links: str) -> dict[str, Any]:
    """A changed file as GitHub lists it; the pull request's file list adds its `links` (blob_url, …)."""
    item: dict[str, Any] = {
        "sha": f.sha,
        "filename": f.filename,
        "status": f.status,
        "additions": f.additions,
        "deletions": f.deletions,
        "changes": f.additions + f.deletions,
        **links,
    }
    if f.previous_filename:
        item["previous_filename"] = f.previous_filename
    return item


def _comment_body(data: dict[str, Any]) -> str:
    body = data.get("body")
    if not isinstance(body, str) or not body:
        raise _invalid("IssueComment", "body")
    if len(body) > COMMENT_MAX_LENGTH:
        raise _invalid("IssueComment", "body", f"body is too long (maximum is {COMMENT_MAX_LENGTH} characters)")
    return body


JsonHandler = Callable[[Request, dict[str, Any]], Response]


def _with_json(handler: JsonHandler) -> Callable[[Request], Awaitable[Response]]:
    """Read the JSON body on the event loop, then run the blocking handler in a worker thread."""

    async def endpoint(request: Request) -> Response:
        try:
            data = json.loads(await request.body() or b"{}")
        except ValueError:
            raise _ApiError(400, "Problems parsing JSON") from None
        if not isinstance(data, dict):
            raise _ApiError(400, "Problems parsing JSON")
        return await run_in_threadpool(handler, request, data)

    return endpoint


def _paginated(request: Request, items: list[Any]) -> JSONResponse:
    """One page of a list, with GitHub's Link header (per_page defaults to 30, at most 100)."""
    page, headers = _page(request, items)
    return JSONResponse(page, headers=headers)


def _page(request: Request, items: list[Any]) -> tuple[list[Any], dict[str, str]]:
    """The items on the requested page and the Link header pointing at the others."""
    try:
        per_page = min(max(int(request.query_params.get("per_page", 30)), 1), 100)
        page = max(int(request.query_params.get("page", 1)), 1)
    except ValueError:
        per_page, page = 30, 1
    last = max((len(items) + per_page - 1) // per_page, 1)
    links = []
    for rel, target in (("prev", page - 1), ("next", page + 1), ("last", last), ("first", 1)):
        if (rel in ("prev", "first") and page > 1) or (rel in ("next", "last") and page < last):
            links.append(f'<{request.url.include_query_params(page=target, per_page=per_page)}>; rel="{rel}"')
    headers = {"Link": ", ".join(links)} if links else {}
    return items[(page - 1) * per_page : page * per_page], headers


# -- git -------------------------------------------------------------------------------------


def _diff(git_dir: Path, base: str, head: str) -> list[_File]:
    """The files a pull request changes: `git diff base...head`, renames detected, as GitHub shows them."""
    numstat = git(git_dir, "diff", "--numstat", "-z", "-M", f"{base}...{head}").split("\x00")
    counts: dict[str, tuple[int, int]] = {}
    i = 0
    while i < len(numstat) and numstat[i]:
        added, deleted, path = numstat[i].split("\t", 2)
        if path == "":  # a rename: the old and new paths follow as separate fields
            path, i = numstat[i + 2], i + 3
        else:
            i += 1
        counts[path] = (int(added) if added != "-" else 0, int(deleted) if deleted != "-" else 0)
    words = {"A": "added", "D": "removed", "M": "modified", "R": "renamed", "C": "copied", "T": "changed"}
    files: list[_File] = []
    for change in raw_changes(git_dir, f"{base}...{head}"):
        added, deleted = counts.get(change.new_path, (0, 0))
        sha = change.old_sha if change.letter == "D" else change.new_sha
        previous = change.old_path if change.letter in "RC" else None
        files.append(_File(change.new_path, words.get(change.letter, "modified"), sha, added, deleted, previous))
    return files


# -- small helpers ---------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(value: str) -> datetime | None:
    """An ISO 8601 timestamp ("2024-01-02T03:04:05Z"), as an aware datetime; None if unreadable."""
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _node_id(kind: str, name: str) -> str:
    return base64.b64encode(f"{kind}:{name}".encode()).decode()
