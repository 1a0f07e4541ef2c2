"""A local stand-in for GitLab: the REST endpoints deploybot calls, plus webhooks.

`FakeGitLab` serves, over real HTTP on 127.0.0.1, the subset of GitLab's REST API v4
that `bot.forges.gitlab.client` uses, with GitLab's paths (URL-encoded project and group
paths such as `/api/v4/projects/group%2Fsub%2Frepo/...` as well as numeric ids), its
JSON shapes, status codes and error bodies, its offset pagination headers (`X-Page`,
`X-Per-Page`, `X-Total`, `X-Total-Pages`, `X-Next-Page`, `X-Prev-Page`, `Link`) and
its authentication: one bot token, required on every call as `PRIVATE-TOKEN` or
`Authorization: Bearer`. Tests and `deploybot sandbox` drive it the way people drive
GitLab (open a merge request, push, comment, approve, merge) and it sends the webhook
GitLab would send, built from GitLab's documented example payloads
(`bot/sandbox/payloads/gitlab_*.json`).

Projects are real bare git repositories on disk: SHAs, diffs, comparisons, conflicts,
merge commits and file contents come from git itself. A commit's author or committer is
the user with its email (`set_user_email`), as GitLab finds them; other emails are nobody.

GraphQL (`POST /api/graphql`): just enough to ask who made a merge request's commits
(`project(fullPath:) { mergeRequest(iid:) { commits, committers } }`, paged with
`first`/`after`) and who wrote one commit (`project(fullPath:) { repository { commit(ref:) } }`). Queries are parsed and run against those types: a field they lack is
GitLab's error answer; fragments, directives and mutations are not understood. The bot
token sees every project, no token none (they are private), any other token is a 401.

Faults: `inject_faults` (from `bot.sandbox.local_forge`) makes the next matching API requests
fail (patterns see the raw path, `projects/group%2Frepo/...`); `server_error` and
`rate_limited` below build the answers GitLab gives, headers and all.

Deliberate simplifications: the bot token sees every project; notes and statuses the
API creates send no webhooks (GitLab would send a Note Hook for the bot's own notes;
the bot ignores those anyway); there are no pipelines, only the commit statuses that
CI jobs and external tools report, and "pipelines must succeed" looks at those.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import re
import secrets
import string
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
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
    raw_path,
    rev_parse,
    stable_id,
)

API_PREFIX = "/api/v4"
GRAPHQL_PATH = "/api/graphql"
GRAPHQL_MAX_PAGE_SIZE = 100  # GitLab's most nodes a connection gives at once
FAKE_VERSION = "18.0.0-fake"
NOTE_MAX_LENGTH = 1_000_000
DEFAULT_PER_PAGE = 20
MAX_PER_PAGE = 100
# Access levels GitLab knows (GET /projects/:id/members/all/:user_id reports the number).
ACCESS_LEVELS = {5: "Minimal access", 10: "Guest", 15: "Planner", 20: "Reporter", 30: "Developer",
                 40: "Maintainer", 50: "Owner"}
STATUS_STATES = ("pending", "running", "success", "failed", "canceled", "skipped")
# The state machine event GitLab fires to reach each state (it names it in its 400 answer).
STATUS_EVENTS = {"pending": "enqueue", "running": "run", "success": "success", "failed": "drop",
                 "canceled": "cancel", "skipped": "skip"}
DETAILED_MERGE_STATUSES = frozenset({
    "approvals_syncing", "checking", "ci_must_pass", "ci_still_running", "commits_status", "conflict",
    "discussions_not_resolved", "draft_status", "jira_association_missing", "mergeable", "merge_request_blocked",
    "merge_time", "need_rebase", "not_approved", "not_open", "preparing", "requested_changes",
    "security_policy_violations", "status_checks_must_pass", "title_regex", "unchecked", "locked_paths",
    "locked_lfs_files", "blocked_status", "broken_status", "external_status_checks",
})
STATE_IDS = {"opened": 1, "closed": 2, "merged": 3, "locked": 4}
APPROVED_NOTE = "approved this merge request"
UNAPPROVED_NOTE = "unapproved this merge request"


@dataclass
class _User:
    id: int
    username: str
    name: str
    created_at: datetime
    state: str = "active"
    email: str | None = None  # primary, confirmed: how GitLab ties commits to the user


@dataclass
class _Diff:
    old_path: str
    new_path: str
    a_mode: str
    b_mode: str
    new_file: bool
    renamed_file: bool
    deleted_file: bool
    diff: str


@dataclass
class _Version:
    id: int
    head_sha: str
    base_sha: str
    start_sha: str
    created_at: datetime
    files: list[_Diff]


@dataclass
class _MergeRequest:
    id: int
    iid: int
    title: str
    description: str
    author_id: int
    source_branch: str
    target_branch: str
    source_project_id: int
    draft: bool
    created_at: datetime
    updated_at: datetime
    versions: list[_Version]  # oldest first, like the pushes that made them
    state: str = "opened"
    approvals: dict[int, tuple[int, datetime]] = field(default_factory=dict)  # user id -> (approval id, when)
    merged_at: datetime | None = None
    merged_by_id: int | None = None
    merge_commit_sha: str | None = None
    closed_at: datetime | None = None
    closed_by_id: int | None = None
    detailed_merge_status: str | None = None  # an override set by a test

    @property
    def head(self) -> _Version:
        return self.versions[-1]


@dataclass
class _Project:
    id: int
    path: str
    git_dir: Path
    default_branch: str
    created_at: datetime
    members: dict[int, int] = field(default_factory=dict)  # user id -> access level
    approvals_required: int = 0
    reset_approvals_on_push: bool = False
    pipeline_must_succeed: bool = False
    merge_requests: dict[int, _MergeRequest] = field(default_factory=dict)
    statuses: list[_Status] = field(default_factory=list)  # oldest first
    next_iid: int = 1

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def namespace(self) -> str:
        return self.path.rsplit("/", 1)[0] if "/" in self.path else ""


@dataclass
class _Note:
    id: int
    project_id: int
    iid: int
    author_id: int
    body: str
    system: bool
    created_at: datetime
    updated_at: datetime


@dataclass
class _Status:
    id: int
    sha: str
    ref: str | None
    name: str
    status: str
    description: str | None
    target_url: str | None
    author_id: int
    pipeline_id: int
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None


class _ApiError(Exception):
    """An error answer in GitLab's shape: `{"message": ...}` or, from parameter checks, `{"error": ...}`."""

    def __init__(self, status: int, message: Any, key: str = "message") -> None:
        super().__init__(str(message))
        self.status = status
        self.body = {key: message}


Handler = Callable[[Request, dict[str, Any], dict[str, Any]], Response]


class FakeGitLab(LocalForge):
    """In-memory GitLab with a real HTTP API; see the module docstring."""

    _thread_name = "fake-gitlab"

    def __init__(self, *, bot_username: str = "deploybot", token: str | None = None) -> None:
        super().__init__()
        self.bot_username = bot_username
        self.token = token or "glpat-" + "".join(
            secrets.choice(string.ascii_letters + string.digits + "-_") for _ in range(20)
        )
        # Whether GET .../approvals reports `approved_by[].approved_at` (GitLab 18.4 and later).
        self.report_approval_times = True
        # Whether a merge request in the REST API has `detailed_merge_status` (GitLab 15.6 and
        # later); False: only the older `merge_status`.
        self.report_detailed_merge_status = True

        self._users: dict[int, _User] = {}
        self._projects: dict[int, _Project] = {}
        self._groups: dict[str, dict[int, tuple[int, str]]] = {}  # full path -> user id -> (level, membership state)
        self._notes: dict[int, _Note] = {}
        self._user_tokens: dict[str, int] = {}  # personal access tokens -> user id
        self._ids = iter(range(1000, 10**9))
        self._user_ids = iter(range(2, 10**9))
        self._last_time = datetime.fromtimestamp(0, UTC)
        self._templates = {
            name: json.loads(resources.files("bot.sandbox").joinpath("payloads", f"gitlab_{name}.json").read_text())
            for name in ("merge_request", "note")
        }
        self.bot_user_id = self.add_user(bot_username, name="deploybot")

        self.app = Starlette(
            routes=[Route(API_PREFIX + "/{rest:path}", self._dispatch, methods=["GET", "POST", "PUT", "DELETE"]),
                    Route(GRAPHQL_PATH, self._graphql, methods=["POST"])],
            middleware=[Middleware(RequestLog, record=self._record_request, raw_path=True),
                        Middleware(FaultInjector, forge=self, raw_path=True)],
        )
        self._routes: list[tuple[str, tuple[str, ...], Handler]] = self._route_table()

    def __repr__(self) -> str:
        return f"FakeGitLab(bot_username={self.bot_username!r}, url={self.url!r})"

    # -- set-up ------------------------------------------------------------------------------

    def add_project(
        self,
        path_with_namespace: str,
        git_dir: str | Path,
        default_branch: str = "main",
        *,
        approvals_required: int = 0,
        reset_approvals_on_push: bool = False,
        pipeline_must_succeed: bool = False,
    ) -> int:
        """Register a project (nested groups allowed) backed by a real bare git repository; return its id."""
        if path_with_namespace.strip("/") != path_with_namespace or "//" in path_with_namespace:
            raise ValueError(f"not a project path: {path_with_namespace!r}")
        git_dir = Path(git_dir).resolve()
        git(git_dir, "rev-parse", "--git-dir")  # fails early on a path that is not a repository
        with self._lock:
            project = _Project(
                stable_id(path_with_namespace), path_with_namespace, git_dir, default_branch, self._now(),
                approvals_required=approvals_required, reset_approvals_on_push=reset_approvals_on_push,
                pipeline_must_succeed=pipeline_must_succeed,
            )
            self._projects[project.id] = project
            for group in _ancestors(path_with_namespace):
                self._groups.setdefault(group, {})
            return project.id

    def set_project_settings(
        self,
        project: str,
        *,
        approvals_required: int | None = None,
        reset_approvals_on_push: bool | None = None,
        pipeline_must_succeed: bool | None = None,
    ) -> None:
        """Change merge request settings: required approvals, resetting them on push, "pipelines must succeed"."""
        with self._lock:
            state = self._project(project)
            if approvals_required is not None:
                state.approvals_required = approvals_required
            if reset_approvals_on_push is not None:
                state.reset_approvals_on_push = reset_approvals_on_push
            if pipeline_must_succeed is not None:
                state.pipeline_must_succeed = pipeline_must_succeed

    def add_user(self, username: str, name: str | None = None) -> int:
        """Create a user (or find the one with this username); return the user id."""
        with self._lock:
            existing = self._user_by_name(username)
            if existing is not None:
                return existing.id
            user = _User(next(self._user_ids), username, name or username.title(), self._now())
            self._users[user.id] = user
            return user.id

    def set_user_email(self, username: str, email: str) -> None:
        """Give a user (made if new) a confirmed email: commits with it as author or committer email are theirs.

        An email is one user's only, as in GitLab ("has already been taken").
        """
        with self._lock:
            user_id = self.add_user(username)
            owner = self._user_by_email(email)
            if owner is not None and owner.id != user_id:
                raise ValueError(f"{email} is already the email of {owner.username}")
            self._users[user_id].email = email

    def set_access_level(self, project: str, username: str, level: int | None) -> None:
        """Make a user a direct project member with an access level (10 Guest … 50 Owner); None removes."""
        if level is not None and level not in ACCESS_LEVELS:
            raise ValueError(f"unknown access level {level!r}; GitLab knows {sorted(ACCESS_LEVELS)}")
        with self._lock:
            user_id = self.add_user(username)
            members = self._project(project).members
            if level is None:
                members.pop(user_id, None)
            else:
                members[user_id] = level

    def add_group_member(self, group_path: str, username: str, level: int = 30, state: str = "active") -> None:
        """Put a user in a group (`group/subgroup`); state "awaiting" models a membership pending approval."""
        if level not in ACCESS_LEVELS:
            raise ValueError(f"unknown access level {level!r}")
        with self._lock:
            user_id = self.add_user(username)
            for group in _self_and_ancestors(group_path):
                self._groups.setdefault(group, {})
            self._groups[group_path][user_id] = (level, state)

    def set_detailed_merge_status(self, project: str, iid: int, status: str | None) -> None:
        """Override the merge request's `detailed_merge_status`; None computes it again."""
        if status is not None and status not in DETAILED_MERGE_STATUSES:
            raise ValueError(f"GitLab has no detailed_merge_status {status!r}")
        with self._lock:
            self._mr(project, iid).detailed_merge_status = status

    def set_commit_status(self, project: str, sha: str, name: str, state: str, description: str = "") -> None:
        """Report a commit status as a CI pipeline's job (or any other tool) would."""
        if state not in STATUS_STATES:
            raise ValueError(f"state must be one of {STATUS_STATES}")
        with self._lock:
            user_id = self.add_user("ci-bot")
            self._add_status(self._project(project), sha, None, name, state, description or None, None, user_id)

    # -- forge behaviour: what people do on GitLab, each sending its webhook -------------------

    def open_merge_request(
        self,
        project: str,
        source_branch: str,
        target_branch: str = "main",
        author: str = "alice",
        fork: bool = False,
        title: str = "Update infrastructure",
        description: str = "",
        draft: bool = False,
    ) -> int:
        """Open a merge request from a branch of the bare repository; return its iid."""
        with self._lock:
            state = self._project(project)
            git_dir = state.git_dir
        version = self._make_version(git_dir, source_branch, target_branch)
        with self._lock:
            author_id = self.add_user(author)
            iid = state.next_iid
            state.next_iid += 1
            now = self._now()
            mr = _MergeRequest(
                next(self._ids), iid, title, description, author_id, source_branch, target_branch,
                stable_id(f"{author}/{state.name}") if fork else state.id, draft, now, now, [version],
            )
            state.merge_requests[iid] = mr
            git(git_dir, "update-ref", f"refs/merge-requests/{iid}/head", version.head_sha)
            payload = self._merge_request_hook("open", state, mr, actor=author_id)
        self._deliver("Merge Request Hook", payload)
        return iid

    def push(self, project: str, iid: int, user: str | None = None) -> int | None:
        """Pick up commits the test pushed to the source branch: a new diff version and an `update` with `oldrev`.

        Returns the delivery's status (None without a webhook, or when the branch did not move).
        """
        with self._lock:
            state, mr = self._project(project), self._mr(project, iid)
            git_dir, source, target, before = state.git_dir, mr.source_branch, mr.target_branch, mr.head.head_sha
        version = self._make_version(git_dir, source, target)
        if version.head_sha == before:
            return None  # GitLab sends nothing when nothing changed
        with self._lock:
            actor = self.add_user(user) if user else mr.author_id
            previous_update = mr.updated_at
            added = count_commits(git_dir, before, version.head_sha)
            mr.versions.append(version)
            mr.updated_at = version.created_at
            if state.reset_approvals_on_push:
                mr.approvals.clear()
            git(git_dir, "update-ref", f"refs/merge-requests/{iid}/head", version.head_sha)
            self._add_note(state, mr, actor, f"added {added} commit{'s' if added != 1 else ''}", system=True)
            payload = self._merge_request_hook("update", state, mr, actor=actor)
            payload["object_attributes"]["oldrev"] = before  # GitLab's mark of an update that brought code
            payload["changes"] = {"updated_at": {"previous": _note_time(previous_update),
                                                 "current": _note_time(version.created_at)}}
        return self._deliver("Merge Request Hook", payload)

    def comment(self, project: str, iid: int, user: str, body: str) -> int:
        """Comment on a merge request; return the note id."""
        with self._lock:
            state, mr = self._project(project), self._mr(project, iid)
            note = self._add_note(state, mr, self.add_user(user), body, system=False)
            payload = self._note_hook("create", state, mr, note)
        self._deliver("Note Hook", payload)
        return note.id

    def edit_comment(self, project: str, note_id: int, body: str, user: str | None = None) -> int | None:
        """Edit a note (by its author unless `user` says otherwise): a Note Hook with action `update`."""
        with self._lock:
            note = self._notes.get(note_id)
            state = self._project(project)
            if note is None or note.project_id != state.id or note.system:
                raise KeyError(f"no note {note_id} in {project}")
            note.body, note.updated_at = body, self._now()
            actor = self.add_user(user) if user else note.author_id
            payload = self._note_hook("update", state, self._mr(project, note.iid), note, actor=actor)
        return self._deliver("Note Hook", payload)

    def approve(self, project: str, iid: int, user: str) -> int:
        """Approve as `user` (again is a 401 in GitLab; here a ValueError); return the approval id.

        Sends `approved` when that leaves no approvals required, else `approval`, as GitLab does.
        """
        with self._lock:
            state, mr = self._project(project), self._mr(project, iid)
            user_id = self.add_user(user)
            if user_id in mr.approvals:
                raise ValueError(f"{user} already approved !{iid}")
            if mr.state != "opened":
                raise ValueError(f"!{iid} is {mr.state}")
            approval_id = next(self._ids)
            mr.approvals[user_id] = (approval_id, self._now())
            self._add_note(state, mr, user_id, APPROVED_NOTE, system=True)
            action = "approved" if self._approvals_left(state, mr) == 0 else "approval"
            payload = self._merge_request_hook(action, state, mr, actor=user_id)
        self._deliver("Merge Request Hook", payload)
        return approval_id

    def unapprove(self, project: str, iid: int, user: str) -> int | None:
        """Withdraw `user`'s approval: `unapproved` if the merge request was approved, else `unapproval`."""
        with self._lock:
            state, mr = self._project(project), self._mr(project, iid)
            user_id = self.add_user(user)
            if user_id not in mr.approvals:
                raise ValueError(f"{user} has not approved !{iid}")
            was_approved = self._approvals_left(state, mr) == 0
            del mr.approvals[user_id]
            self._add_note(state, mr, user_id, UNAPPROVED_NOTE, system=True)
            payload = self._merge_request_hook("unapproved" if was_approved else "unapproval", state, mr, actor=user_id)
        return self._deliver("Merge Request Hook", payload)

    def close(self, project: str, iid: int, user: str | None = None) -> int | None:
        """Close a merge request without merging."""
        with self._lock:
            state, mr = self._project(project), self._mr(project, iid)
            actor = self.add_user(user) if user else mr.author_id
            mr.state, mr.closed_at, mr.closed_by_id = "closed", self._now(), actor
            payload = self._merge_request_hook("close", state, mr, actor=actor)
        return self._deliver("Merge Request Hook", payload)

    def reopen(self, project: str, iid: int, user: str | None = None) -> int | None:
        """Reopen a closed (unmerged) merge request."""
        with self._lock:
            state, mr = self._project(project), self._mr(project, iid)
            if mr.state != "closed":
                raise ValueError(f"!{iid} is {mr.state}, not closed")
            actor = self.add_user(user) if user else mr.author_id
            mr.state, mr.closed_at, mr.closed_by_id = "opened", None, None
            payload = self._merge_request_hook("reopen", state, mr, actor=actor)
        return self._deliver("Merge Request Hook", payload)

    def merge(self, project: str, iid: int, user: str = "admin") -> int | None:
        """Merge: a real merge commit on the target branch when git can make one, then `merge`."""
        with self._lock:
            state, mr = self._project(project), self._mr(project, iid)
            if mr.state != "opened":
                raise ValueError(f"!{iid} is {mr.state}")
            git_dir, target, head = state.git_dir, mr.target_branch, mr.head.head_sha
            message = (f"Merge branch '{mr.source_branch}' into '{target}'\n\n{mr.title}\n\n"
                       f"See merge request {state.path}!{iid}")
        merge_sha = merge_commit(git_dir, target, head, message, committer=("GitLab", "noreply@gitlab.example.com"))
        with self._lock:
            actor = self.add_user(user)
            now = self._now()
            mr.state, mr.merged_at, mr.merged_by_id, mr.merge_commit_sha = "merged", now, actor, merge_sha
            mr.updated_at = now
            payload = self._merge_request_hook("merge", state, mr, actor=actor)
        return self._deliver("Merge Request Hook", payload)

    # -- webhooks ----------------------------------------------------------------------------

    def set_webhook(self, url: str, secret: str, signing_token: str | None = None) -> None:
        """Send every event from now on to `url` with `X-Gitlab-Token: secret` (and signed, given a signing token)."""
        with self._lock:
            self._webhook = (url, (secret, signing_token))

    def _action(self, payload: dict[str, Any]) -> str:
        return str(payload.get("object_attributes", {}).get("action", ""))

    def _webhook_headers(
        self, key: tuple[str, str | None], event: str, body: bytes, delivery_id: str
    ) -> dict[str, str]:
        # A redelivery ("Resend request") repeats the Idempotency-Key but gets new UUID headers.
        secret, signing_token = key
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"GitLab/{FAKE_VERSION}",
            "Idempotency-Key": delivery_id,
            "X-Gitlab-Event": event,
            "X-Gitlab-Webhook-UUID": str(uuid.uuid4()),  # new on every request, as in GitLab
            "X-Gitlab-Instance": self._base_url,
            "X-Gitlab-Event-UUID": str(uuid.uuid4()),  # new per execution: not kept across resends
        }
        if secret:
            headers["X-Gitlab-Token"] = secret.replace("\r", "").replace("\n", "")  # as GitLab sends it
        if signing_token:
            timestamp = int(time.time())
            key = base64.b64decode(signing_token.removeprefix("whsec_"))
            digest = hmac.new(key, f"{delivery_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
            headers["webhook-id"] = delivery_id
            headers["webhook-timestamp"] = str(timestamp)
            headers["webhook-signature"] = "v1," + base64.b64encode(digest).decode()
        return headers

    # -- records for assertions ---------------------------------------------------------------

    def comments(self, project: str, iid: int) -> list[dict[str, Any]]:
        """The user notes on a merge request (not GitLab's system notes), oldest first: id, user, body."""
        with self._lock:
            state = self._project(project)
            return [
                {"id": n.id, "user": self._users[n.author_id].username, "body": n.body}
                for n in sorted(self._notes.values(), key=lambda n: n.id)
                if n.project_id == state.id and n.iid == iid and not n.system
            ]

    def statuses(self, project: str, sha: str) -> dict[str, tuple[str, str]]:
        """The latest status per name on a commit: name -> (GitLab state, description)."""
        with self._lock:
            return {s.name: (s.status, s.description or "") for s in self._project(project).statuses if s.sha == sha}

    def status_history(self, project: str, sha: str | None = None) -> list[dict[str, Any]]:
        """Every status record of the project (or one commit), oldest first, as the API shows them."""
        with self._lock:
            state = self._project(project)
            return [self._status_json(s) for s in state.statuses if sha is None or s.sha == sha]

    def mr(self, project: str, iid: int) -> dict[str, Any]:
        """The merge request as GET /projects/:id/merge_requests/:iid returns it."""
        with self._lock:
            state = self._project(project)
            return self._mr_json(state, self._mr(project, iid))

    # -- state helpers (call with the lock held) ------------------------------------------------

    def _now(self) -> datetime:
        """Wall-clock time, strictly later than any time handed out before (GitLab's are in ms)."""
        now = datetime.now(UTC)
        now = now.replace(microsecond=now.microsecond // 1000 * 1000)
        with self._lock:
            if now <= self._last_time:
                now = self._last_time + timedelta(milliseconds=1)
            self._last_time = now
        return now

    def _project(self, path: str) -> _Project:
        found = self._find_project(path)
        if found is None:
            raise KeyError(f"unknown project {path!r}; call add_project first")
        return found

    def _find_project(self, ref: str) -> _Project | None:
        if ref.isdigit():
            return self._projects.get(int(ref))
        return next((p for p in self._projects.values() if p.path.lower() == ref.lower()), None)

    def _mr(self, project: str, iid: int) -> _MergeRequest:
        try:
            return self._project(project).merge_requests[iid]
        except KeyError:
            raise KeyError(f"no merge request !{iid} in {project}") from None

    def _user_by_name(self, username: str) -> _User | None:
        return next((u for u in self._users.values() if u.username.lower() == username.lower()), None)

    def _user_by_email(self, email: str) -> _User | None:
        return next((u for u in self._users.values() if u.email and u.email.lower() == email.lower()), None)

    def _add_note(self, project: _Project, mr: _MergeRequest, author_id: int, body: str, system: bool) -> _Note:
        now = self._now()
        note = _Note(next(self._ids), project.id, mr.iid, author_id, body, system, now, now)
        self._notes[note.id] = note
        return note

    def _add_status(
        self, project: _Project, sha: str, ref: str | None, name: str, state: str,
        description: str | None, target_url: str | None, author_id: int,
    ) -> _Status:
        now = self._now()
        status = _Status(next(self._ids), sha, ref, name, state, description, target_url, author_id,
                         pipeline_id=stable_id(f"pipeline:{project.id}:{sha}"), created_at=now)
        _stamp(status, now)
        project.statuses.append(status)
        return status

    def _latest_statuses(self, project: _Project, sha: str) -> dict[str, _Status]:
        return {s.name: s for s in project.statuses if s.sha == sha}

    def _approvals_left(self, project: _Project, mr: _MergeRequest) -> int:
        approvers = set(mr.approvals) - {mr.author_id}
        return max(project.approvals_required - len(approvers), 0)

    def _make_version(self, git_dir: Path, source: str, target: str) -> _Version:
        head, base = branch_heads(git_dir, source, target, "the repository")
        merge_base = git(git_dir, "merge-base", base, head, check=False).strip() or base
        # diff_refs: base_sha is the merge base, start_sha the target branch's head at the time.
        return _Version(next(self._ids), head, merge_base, base, self._now(), _diff(git_dir, merge_base, head))

    def _detailed_merge_status(self, project: _Project, mr: _MergeRequest) -> str:
        """What GitLab computes for `detailed_merge_status`, unless a test overrode it."""
        if mr.detailed_merge_status is not None:
            return mr.detailed_merge_status
        if mr.state != "opened":
            return "not_open"
        if mr.draft:
            return "draft_status"
        if self._has_conflicts(project, mr):
            return "conflict"
        if self._approvals_left(project, mr) > 0:
            return "not_approved"
        if project.pipeline_must_succeed:
            states = {s.status for s in self._latest_statuses(project, mr.head.head_sha).values()}
            if states & {"pending", "running"}:
                return "ci_still_running"
            if not states or states - {"success", "skipped"}:
                return "ci_must_pass"
        return "mergeable"

    def _has_conflicts(self, project: _Project, mr: _MergeRequest) -> bool:
        return mr.state == "opened" and merge_conflicts(project.git_dir, mr.target_branch, mr.head.head_sha)

    # -- JSON shapes ---------------------------------------------------------------------------

    @property
    def _base_url(self) -> str:
        return self.url or "http://fake-gitlab.invalid"

    def _web_url(self, path: str) -> str:
        return f"{self._base_url}/{path}"

    def _user_json(self, user_id: int) -> dict[str, Any]:
        """A user as the REST API embeds one (author, merged_by, approved_by[].user, …)."""
        user = self._users[user_id]
        return {
            "id": user.id,
            "username": user.username,
            "public_email": None,
            "name": user.name,
            "state": user.state,
            "locked": False,
            "avatar_url": None,
            "web_url": self._web_url(user.username),
        }

    def _hook_user(self, user_id: int) -> dict[str, Any]:
        user = self._users[user_id]
        return {"id": user.id, "name": user.name, "username": user.username, "avatar_url": None,
                "email": "[REDACTED]"}

    def _hook_project(self, project: _Project, source_fork_of: str | None = None) -> dict[str, Any]:
        """A project as webhooks embed it; `source_fork_of` names the fork owner for a fork's source."""
        path, pid = project.path, project.id
        if source_fork_of is not None:
            path = f"{source_fork_of}/{project.name}"
            pid = stable_id(path)
        web = self._web_url(path)
        # A fork's repository is not reachable here: its commits exist only as refs/merge-requests/N/head.
        clone = f"{web}.git" if source_fork_of is not None else f"file://{project.git_dir}"
        host = self._base_url.split("://", 1)[-1]
        return {
            "id": pid,
            "name": project.name if source_fork_of is None else path.rsplit("/", 1)[-1],
            "description": "",
            "web_url": web,
            "avatar_url": None,
            "git_ssh_url": f"git@{host}:{path}.git",
            "git_http_url": clone,
            "namespace": path.rsplit("/", 1)[0].rsplit("/", 1)[-1] if "/" in path else "",
            "visibility_level": 0,
            "path_with_namespace": path,
            "default_branch": project.default_branch,
            "ci_config_path": "",
            "homepage": web,
            "url": clone,
            "ssh_url": f"git@{host}:{path}.git",
            "http_url": clone,
        }

    def _hook_commit(self, project: _Project, sha: str) -> dict[str, Any]:
        info = commit_info(project.git_dir, sha)
        return {
            "id": sha,
            "message": info.message + "\n",
            "title": info.title,
            "timestamp": info.authored_date,
            "url": self._web_url(f"{project.path}/-/commit/{sha}"),
            "author": {"name": info.author_name, "email": info.author_email},
        }

    def _source_project(self, project: _Project, mr: _MergeRequest) -> dict[str, Any]:
        fork_owner = self._users[mr.author_id].username if mr.source_project_id != project.id else None
        return self._hook_project(project, source_fork_of=fork_owner)

    def _merge_request_hook(self, action: str, project: _Project, mr: _MergeRequest, actor: int) -> dict[str, Any]:
        """A `Merge Request Hook` payload: the template's keys, in its order, filled from our state."""
        template = self._templates["merge_request"]
        detailed = self._detailed_merge_status(project, mr)
        attributes = {
            "id": mr.id,
            "iid": mr.iid,
            "target_branch": mr.target_branch,
            "source_branch": mr.source_branch,
            "source_project_id": mr.source_project_id,
            "author_id": mr.author_id,
            "assignee_ids": [],
            "assignee_id": None,
            "reviewer_ids": [],
            "title": mr.title,
            "created_at": _hook_time(mr.created_at),
            "updated_at": _hook_time(mr.updated_at),
            "last_edited_at": None,
            "last_edited_by_id": None,
            "milestone_id": None,
            "state_id": STATE_IDS[mr.state],
            "state": mr.state,
            "blocking_discussions_resolved": True,
            "work_in_progress": mr.draft,
            "draft": mr.draft,
            "first_contribution": False,
            "merge_status": "cannot_be_merged" if detailed == "conflict" else "can_be_merged",
            "target_project_id": project.id,
            "description": mr.description,
            "prepared_at": _hook_time(mr.created_at),
            "total_time_spent": 0,
            "time_change": 0,
            "human_total_time_spent": None,
            "human_time_change": None,
            "human_time_estimate": None,
            "url": self._web_url(f"{project.path}/-/merge_requests/{mr.iid}"),
            "source": _shape(template["object_attributes"]["source"], self._source_project(project, mr)),
            "target": _shape(template["object_attributes"]["target"], self._hook_project(project)),
            "last_commit": _shape(template["object_attributes"]["last_commit"],
                                  self._hook_commit(project, mr.head.head_sha)),
            "labels": [],
            "action": action,
            "detailed_merge_status": detailed,
        }
        values = {
            "object_kind": "merge_request",
            "event_type": "merge_request",
            "user": _shape(template["user"], self._hook_user(actor)),
            "project": _shape(template["project"], self._hook_project(project)),
            "repository": self._hook_repository(template["repository"], project),
            "object_attributes": _shape(template["object_attributes"], attributes),
            "labels": [],
            "changes": {},
        }
        # GitLab adds `assignees` and `reviewers` only when there are some; the fake has none.
        return {key: values[key] for key in template if key in values}

    def _hook_repository(self, template: dict[str, Any], project: _Project) -> dict[str, Any]:
        hook = self._hook_project(project)
        return _shape(template, {"name": hook["name"], "url": hook["url"], "description": hook["description"],
                                 "homepage": hook["homepage"]})

    def _note_hook(
        self, action: str, project: _Project, mr: _MergeRequest, note: _Note, actor: int | None = None
    ) -> dict[str, Any]:
        """A `Note Hook` payload for a note on a merge request."""
        template = self._templates["note"]
        detailed = self._detailed_merge_status(project, mr)
        note_values = {
            "id": note.id,
            "note": note.body,
            "noteable_type": "MergeRequest",
            "author_id": note.author_id,
            "created_at": _note_time(note.created_at),
            "updated_at": _note_time(note.updated_at),
            "project_id": project.id,
            "attachment": None,
            "line_code": None,
            "commit_id": "",
            "noteable_id": mr.id,
            "system": note.system,
            "st_diff": None,
            "action": action,
            "url": self._web_url(f"{project.path}/-/merge_requests/{mr.iid}#note_{note.id}"),
        }
        mr_template = template["merge_request"]
        mr_values = {
            "id": mr.id,
            "target_branch": mr.target_branch,
            "source_branch": mr.source_branch,
            "source_project_id": mr.source_project_id,
            "author_id": mr.author_id,
            "assignee_id": None,
            "title": mr.title,
            "created_at": _note_time(mr.created_at),
            "updated_at": _note_time(mr.updated_at),
            "milestone_id": None,
            "state": mr.state,
            "merge_status": "cannot_be_merged" if detailed == "conflict" else "can_be_merged",
            "target_project_id": project.id,
            "iid": mr.iid,
            "description": mr.description,
            "position": 0,
            "labels": [],
            "source": _shape(mr_template["source"], self._source_project(project, mr)),
            "target": _shape(mr_template["target"], self._hook_project(project)),
            "last_commit": _shape(mr_template["last_commit"], self._hook_commit(project, mr.head.head_sha)),
            "work_in_progress": mr.draft,
            "draft": mr.draft,
            "assignee": None,
            "detailed_merge_status": detailed,
        }
        values = {
            "object_kind": "note",
            "event_type": "note",
            "user": _shape(template["user"], self._hook_user(actor or note.author_id)),
            "project_id": project.id,
            "project": _shape(template["project"], self._hook_project(project)),
            "repository": self._hook_repository(template["repository"], project),
            "object_attributes": _shape(template["object_attributes"], note_values),
            "merge_request": _shape(mr_template, mr_values),
        }
        return {key: values[key] for key in template}

    def _mr_basics(self, project: _Project, mr: _MergeRequest) -> dict[str, Any]:
        """The fields a merge request and its approvals both begin with."""
        return {
            "id": mr.id,
            "iid": mr.iid,
            "project_id": project.id,
            "title": mr.title,
            "description": mr.description,
            "state": mr.state,
            "created_at": _api_time(mr.created_at),
            "updated_at": _api_time(mr.updated_at),
        }

    def _mr_json(self, project: _Project, mr: _MergeRequest, diverged: bool = False) -> dict[str, Any]:
        """A merge request as GET /projects/:id/merge_requests/:iid returns it."""
        detailed = self._detailed_merge_status(project, mr)
        conflicts = self._has_conflicts(project, mr)
        head = mr.head
        notes = sum(1 for n in self._notes.values() if (n.project_id, n.iid) == (project.id, mr.iid) and not n.system)
        data: dict[str, Any] = {
            **self._mr_basics(project, mr),
            "merged_by": self._user_json(mr.merged_by_id) if mr.merged_by_id else None,
            "merge_user": self._user_json(mr.merged_by_id) if mr.merged_by_id else None,
            "merged_at": _api_time(mr.merged_at),
            "merge_after": None,
            "prepared_at": _api_time(mr.created_at),
            "closed_by": self._user_json(mr.closed_by_id) if mr.closed_by_id else None,
            "closed_at": _api_time(mr.closed_at),
            "target_branch": mr.target_branch,
            "source_branch": mr.source_branch,
            "user_notes_count": notes,
            "upvotes": 0,
            "downvotes": 0,
            "author": self._user_json(mr.author_id),
            "assignees": [],
            "assignee": None,
            "reviewers": [],
            "source_project_id": mr.source_project_id,
            "target_project_id": project.id,
            "labels": [],
            "draft": mr.draft,
            "imported": False,
            "imported_from": "none",
            "work_in_progress": mr.draft,
            "milestone": None,
            "merge_when_pipeline_succeeds": False,
            "merge_status": _merge_status(detailed, conflicts),
            "detailed_merge_status": detailed,
            "sha": head.head_sha,
            "merge_commit_sha": mr.merge_commit_sha,
            "squash_commit_sha": None,
            "discussion_locked": None,
            "should_remove_source_branch": None,
            "force_remove_source_branch": False,
            "reference": f"!{mr.iid}",
            "references": {"short": f"!{mr.iid}", "relative": f"!{mr.iid}", "full": f"{project.path}!{mr.iid}"},
            "web_url": self._web_url(f"{project.path}/-/merge_requests/{mr.iid}"),
            "time_stats": {"time_estimate": 0, "total_time_spent": 0, "human_time_estimate": None,
                           "human_total_time_spent": None},
            "squash": False,
            "squash_on_merge": False,
            "task_completion_status": {"count": 0, "completed_count": 0},
            "has_conflicts": conflicts,
            "blocking_discussions_resolved": True,
            "approvals_before_merge": None,
            "subscribed": False,
            "changes_count": str(len(head.files)),
            "latest_build_started_at": None,
            "latest_build_finished_at": None,
            "first_deployed_to_production_at": None,
            "pipeline": None,
            "head_pipeline": None,
            "diff_refs": {"base_sha": head.base_sha, "head_sha": head.head_sha, "start_sha": head.start_sha},
            "merge_error": None,
            "first_contribution": False,
            "user": {"can_merge": True},
        }
        if diverged:
            base = rev_parse(project.git_dir, f"refs/heads/{mr.target_branch}")
            data["diverged_commits_count"] = count_commits(project.git_dir, head.head_sha, base) if base else 0
        if not self.report_detailed_merge_status:
            del data["detailed_merge_status"]
        return data

    def _status_json(self, status: _Status) -> dict[str, Any]:
        return {
            "id": status.id,
            "sha": status.sha,
            "ref": status.ref,
            "status": status.status,
            "name": status.name,
            "target_url": status.target_url,
            "description": status.description,
            "created_at": _api_time(status.created_at),
            "started_at": _api_time(status.started_at),
            "finished_at": _api_time(status.finished_at),
            "allow_failure": False,
            "coverage": None,
            "pipeline_id": status.pipeline_id,
            "author": self._user_json(status.author_id),
        }

    def _note_json(self, project: _Project, mr: _MergeRequest, note: _Note) -> dict[str, Any]:
        return {
            "id": note.id,
            "type": None,
            "body": note.body,
            "attachment": None,
            "author": self._user_json(note.author_id),
            "created_at": _api_time(note.created_at),
            "updated_at": _api_time(note.updated_at),
            "system": note.system,
            "noteable_id": mr.id,
            "noteable_type": "MergeRequest",
            "project_id": project.id,
            "resolvable": False,
            "confidential": False,
            "internal": False,
            "imported": False,
            "imported_from": "none",
            "noteable_iid": mr.iid,
            "commands_changes": {},
        }

    def _project_json(self, project: _Project) -> dict[str, Any]:
        hook = self._hook_project(project)
        namespace = project.namespace
        return {
            "id": project.id,
            "description": "",
            "name": project.name,
            "name_with_namespace": " / ".join(project.path.split("/")),
            "path": project.name,
            "path_with_namespace": project.path,
            "created_at": _api_time(project.created_at),
            "default_branch": project.default_branch,
            "ssh_url_to_repo": hook["git_ssh_url"],
            "http_url_to_repo": hook["git_http_url"],
            "web_url": hook["web_url"],
            "visibility": "private",
            "namespace": {"id": stable_id(namespace), "name": namespace.rsplit("/", 1)[-1], "path":
                          namespace.rsplit("/", 1)[-1], "kind": "group", "full_path": namespace},
            "only_allow_merge_if_pipeline_succeeds": project.pipeline_must_succeed,
            "approvals_before_merge": project.approvals_required,
            "merge_method": "merge",
        }

    def _member_json(self, user_id: int, level: int, membership_state: str) -> dict[str, Any]:
        return {
            **self._user_json(user_id),
            "access_level": level,
            "created_at": _api_time(self._users[user_id].created_at),
            "created_by": None,
            "expires_at": None,
            "membership_state": membership_state,
        }

    # -- HTTP API ------------------------------------------------------------------------------

    def _route_table(self) -> list[tuple[str, tuple[str, ...], Handler]]:
        mr = ("projects", "{project}", "merge_requests", "{iid:int}")
        return [
            ("GET", ("user",), self._get_current_user),
            ("GET", ("users",), self._list_users),
            ("GET", ("projects", "{project}"), self._get_project),
            ("GET", mr, self._get_merge_request),
            ("GET", (*mr, "diffs"), self._list_diffs),
            ("GET", (*mr, "versions"), self._list_versions),
            ("GET", (*mr, "approvals"), self._get_approvals),
            ("GET", (*mr, "notes"), self._list_notes),
            ("POST", (*mr, "notes"), self._create_note),
            ("GET", (*mr, "notes", "{note_id:int}"), self._get_note),
            ("PUT", (*mr, "notes", "{note_id:int}"), self._update_note),
            ("POST", ("projects", "{project}", "statuses", "{sha}"), self._create_status),
            ("GET", ("projects", "{project}", "repository", "commits", "{sha}", "statuses"), self._list_statuses),
            ("GET", ("projects", "{project}", "repository", "commits", "{sha}"), self._get_commit),
            ("GET", ("projects", "{project}", "repository", "compare"), self._compare),
            ("GET", ("projects", "{project}", "repository", "files", "{file_path}", "raw"), self._raw_file),
            ("GET", ("projects", "{project}", "members", "all", "{user_id:int}"), self._project_member),
            ("GET", ("groups", "{group}", "members", "all", "{user_id:int}"), self._group_member),
        ]

    async def _dispatch(self, request: Request) -> Response:
        """Route on the raw path, so `group%2Fsub%2Frepo` stays one segment as it does in GitLab."""
        segments = raw_path(request.scope)[len(API_PREFIX) + 1:].split("/")
        try:
            self._authenticate(request)
            handler, params = self._match(request.method, segments)
            data = await _request_data(request)
            return await run_in_threadpool(handler, request, params, data)
        except _ApiError as exc:
            return JSONResponse(exc.body, status_code=exc.status)

    def _match(self, method: str, segments: list[str]) -> tuple[Handler, dict[str, Any]]:
        path_matched = False
        for route_method, pattern, handler in self._routes:
            params = _match_segments(pattern, segments)
            if params is None:
                continue
            path_matched = True
            if route_method == method:
                return handler, params
        if path_matched:
            raise _ApiError(405, "405 Not Allowed", key="error")
        raise _ApiError(404, "404 Not Found", key="error")

    def user_token(self, username: str) -> str:
        """A personal access token of a user (scope read_user: it may only ask who it is)."""
        token = "glpat-" + secrets.token_urlsafe(15)
        with self._lock:
            self._user_tokens[token] = self.add_user(username)
        return token

    def _fault_authorized(self, request: Request) -> bool:
        """Faults come after authentication: only requests with a token GitLab accepts get them."""
        path = raw_path(request.scope)
        if path != GRAPHQL_PATH and not path.startswith(API_PREFIX + "/"):
            return False
        try:
            self._authenticate(request)
        except _ApiError:
            return False
        return True

    def _fault_body(self, status: int) -> dict[str, Any]:
        return {"message": f"{status} {SERVER_ERROR_PHRASES.get(status, 'Error')}"}

    def _authenticate(self, request: Request) -> None:
        token = _request_token(request)
        if token and hmac.compare_digest(token.encode(), self.token.encode()):
            request.state.user_id = self.bot_user_id
            return
        with self._lock:
            user_id = self._user_tokens.get(token or "")
        if user_id is not None and raw_path(request.scope) == f"{API_PREFIX}/user":
            request.state.user_id = user_id
            return
        raise _ApiError(401, "401 Unauthorized")

    def _request_project(self, params: dict[str, Any]) -> _Project:
        with self._lock:
            project = self._find_project(params["project"])
        if project is None:
            raise _ApiError(404, "404 Project Not Found")
        return project

    def _request_mr(self, params: dict[str, Any]) -> tuple[_Project, _MergeRequest]:
        project = self._request_project(params)
        with self._lock:
            mr = project.merge_requests.get(params["iid"])
        if mr is None:
            raise _ApiError(404, "404 Not found")
        return project, mr

    def _get_current_user(self, request: Request, params: dict[str, Any], data: dict[str, Any]) -> Response:
        with self._lock:
            return JSONResponse(self._user_json(request.state.user_id))

    def _list_users(self, request: Request, params: dict[str, Any], data: dict[str, Any]) -> Response:
        username = data.get("username")
        with self._lock:
            users = [self._user_json(u.id) for u in sorted(self._users.values(), key=lambda u: u.id)
                     if username is None or u.username.lower() == str(username).lower()]
        return _paginated(request, data, users)

    def _get_project(self, request: Request, params: dict[str, Any], data: dict[str, Any]) -> Response:
        project = self._request_project(params)
        with self._lock:
            return JSONResponse(self._project_json(project))

    def _get_merge_request(self, request: Request, params: dict[str, Any], data: dict[str, Any]) -> Response:
        project, mr = self._request_mr(params)
        diverged = _truthy(data.get("include_diverged_commits_count"))
        with self._lock:
            return JSONResponse(self._mr_json(project, mr, diverged=diverged))

    def _list_diffs(self, request: Request, params: dict[str, Any], data: dict[str, Any]) -> Response:
        _, mr = self._request_mr(params)
        with self._lock:
            files = list(mr.head.files)
        return _paginated(request, data, [_diff_json(f) for f in files])

    def _list_versions(self, request: Request, params: dict[str, Any], data: dict[str, Any]) -> Response:
        _, mr = self._request_mr(params)
        with self._lock:
            versions = [
                {"id": v.id, "head_commit_sha": v.head_sha, "base_commit_sha": v.base_sha,
                 "start_commit_sha": v.start_sha, "created_at": _api_time(v.created_at), "merge_request_id": mr.id,
                 "state": "collected", "real_size": str(len(v.files)),
                 "patch_id_sha": hashlib.sha1(f"{v.start_sha}..{v.head_sha}".encode()).hexdigest()}
                for v in reversed(mr.versions)  # newest first, as GitLab lists them
            ]
        return _paginated(request, data, versions)

    def _get_approvals(self, request: Request, params: dict[str, Any], data: dict[str, Any]) -> Response:
        project, mr = self._request_mr(params)
        with self._lock:
            approved_by = []
            for user_id, (_, when) in sorted(mr.approvals.items(), key=lambda item: item[1][0]):
                entry: dict[str, Any] = {"user": self._user_json(user_id)}
                if self.report_approval_times:
                    entry["approved_at"] = _api_time(when)
                approved_by.append(entry)
            left = self._approvals_left(project, mr)
            body = {
                **self._mr_basics(project, mr),
                "merge_status": "can_be_merged",
                "approved": left == 0,
                "approvals_required": project.approvals_required,
                "approvals_left": left,
                "require_password_to_approve": False,
                "approved_by": approved_by,
                "suggested_approvers": [],
                "approvers": [],
                "approver_groups": [],
                "user_has_approved": self.bot_user_id in mr.approvals,
                "user_can_approve": mr.state == "opened" and self.bot_user_id not in mr.approvals,
                "approval_rules_left": [],
                "has_approval_rules": False,
                "merge_request_approvers_available": True,
                "multiple_approval_rules_available": True,
                "invalid_approvers_rules": [],
            }
        return JSONResponse(body)

    def _list_notes(self, request: Request, params: dict[str, Any], data: dict[str, Any]) -> Response:
        project, mr = self._request_mr(params)
        order = "updated_at" if data.get("order_by") == "updated_at" else "created_at"
        with self._lock:
            notes = [n for n in self._notes.values() if (n.project_id, n.iid) == (project.id, mr.iid)]
            notes.sort(key=lambda n: (getattr(n, order), n.id), reverse=data.get("sort", "desc") != "asc")
            items = [self._note_json(project, mr, n) for n in notes]
        return _paginated(request, data, items)

    def _note_body(self, data: dict[str, Any]) -> str:
        body = data.get("body")
        if not isinstance(body, str) or not body:
            raise _ApiError(400, "body is missing", key="error")
        if len(body) > NOTE_MAX_LENGTH:
            raise _ApiError(400, {"note": [f"is too long (maximum is {NOTE_MAX_LENGTH} characters)"]})
        return body

    def _create_note(self, request: Request, params: dict[str, Any], data: dict[str, Any]) -> Response:
        project, mr = self._request_mr(params)
        body = self._note_body(data)
        with self._lock:
            note = self._add_note(project, mr, self.bot_user_id, body, system=False)
            return JSONResponse(self._note_json(project, mr, note), status_code=201)

    def _get_note(self, request: Request, params: dict[str, Any], data: dict[str, Any]) -> Response:
        """GET .../merge_requests/:iid/notes/:note_id: a note of this merge request, system notes too."""
        project, mr = self._request_mr(params)
        with self._lock:
            note = self._notes.get(params["note_id"])
            if note is None or (note.project_id, note.iid) != (project.id, mr.iid):
                raise _ApiError(404, "404 Note Not Found")
            return JSONResponse(self._note_json(project, mr, note))

    def _update_note(self, request: Request, params: dict[str, Any], data: dict[str, Any]) -> Response:
        project, mr = self._request_mr(params)
        body = self._note_body(data)
        with self._lock:
            note = self._notes.get(params["note_id"])
            if note is None or (note.project_id, note.iid) != (project.id, mr.iid) or note.system:
                raise _ApiError(404, "404 Note Not Found")
            if note.author_id != self.bot_user_id:
                raise _ApiError(403, "403 Forbidden")
            note.body, note.updated_at = body, self._now()
            return JSONResponse(self._note_json(project, mr, note))

    def _create_status(self, request: Request, params: dict[str, Any], data: dict[str, Any]) -> Response:
        project = self._request_project(params)
        state = data.get("state")
        if state is None:
            raise _ApiError(400, "state is missing", key="error")
        if state not in STATUS_STATES:
            raise _ApiError(400, "state does not have a valid value", key="error")
        sha = rev_parse(project.git_dir, params["sha"])
        if sha is None:
            raise _ApiError(404, "404 Commit Not Found")
        name = data.get("name") or data.get("context") or "default"
        ref = data.get("ref")
        with self._lock:
            # GitLab reuses the newest pending/running status of that name and moves it on; a
            # finished one stays as it was and a new one is created. Moving to its own state fails.
            live = next((s for s in reversed(project.statuses)
                         if s.sha == sha and s.name == name and s.status in ("pending", "running")), None)
            if live is not None:
                allowed = {"pending": {"running", "success", "failed", "canceled", "skipped"},
                           "running": {"success", "failed", "canceled"}}[live.status]
                if state not in allowed:
                    event = STATUS_EVENTS[state]
                    raise _ApiError(400, f"Cannot transition status via :{event} from :{live.status} "
                                         f"(Reason(s): Status cannot transition via \"{event}\")")
                live.status = state
                live.description = data.get("description", live.description)
                live.target_url = data.get("target_url", live.target_url)
                _stamp(live, self._now())
                project.statuses.remove(live)
                project.statuses.append(live)  # the latest of its name again
                status = live
            else:
                status = self._add_status(project, sha, ref, name, state, data.get("description"),
                                          data.get("target_url"), self.bot_user_id)
            return JSONResponse(self._status_json(status), status_code=201)

    def _list_statuses(self, request: Request, params: dict[str, Any], data: dict[str, Any]) -> Response:
        project = self._request_project(params)
        sha = rev_parse(project.git_dir, params["sha"])
        if sha is None:
            raise _ApiError(404, "404 Commit Not Found")
        with self._lock:
            records = [s for s in project.statuses if s.sha == sha]
            if not _truthy(data.get("all")):
                records = list(self._latest_statuses(project, sha).values())
            for key in ("name", "ref"):
                if data.get(key):
                    records = [s for s in records if getattr(s, key) == data[key]]
            items = [self._status_json(s) for s in sorted(records, key=lambda s: s.id)]
        return _paginated(request, data, items)

    def _compare(self, request: Request, params: dict[str, Any], data: dict[str, Any]) -> Response:
        project = self._request_project(params)
        for key in ("from", "to"):
            if not data.get(key):
                raise _ApiError(400, f"{key} is missing", key="error")
        start, end = rev_parse(project.git_dir, data["from"]), rev_parse(project.git_dir, data["to"])
        if start is None or end is None:
            raise _ApiError(404, "404 Ref Not Found")
        straight = _truthy(data.get("straight"))
        base = start if straight else (git(project.git_dir, "merge-base", start, end, check=False).strip() or start)
        shas = git(project.git_dir, "rev-list", "--reverse", f"{base}..{end}").split()
        commits = [self._commit_json(project, sha) for sha in shas]
        diffs = [_diff_json(f) for f in _diff(project.git_dir, base, end)]
        return JSONResponse({
            "commit": commits[-1] if commits else None,
            "commits": commits,
            "diffs": diffs,
            "compare_timeout": False,
            "compare_same_ref": start == end,
            "web_url": self._web_url(f"{project.path}/-/compare/{start}...{end}"),
        })

    def _get_commit(self, request: Request, params: dict[str, Any], data: dict[str, Any]) -> Response:
        """GET .../repository/commits/:sha — a SHA, branch or tag name."""
        project = self._request_project(params)
        sha = rev_parse(project.git_dir, unquote(params["sha"]))
        if sha is None:
            raise _ApiError(404, "404 Commit Not Found")
        return JSONResponse(self._commit_json(project, sha))

    def _commit_json(self, project: _Project, sha: str) -> dict[str, Any]:
        info = commit_info(project.git_dir, sha)
        return {
            "id": sha,
            "short_id": sha[:8],
            "created_at": info.committed_date,
            "parent_ids": info.parents,
            "title": info.title,
            "message": info.message + "\n",
            "author_name": info.author_name,
            "author_email": info.author_email,
            "authored_date": info.authored_date,
            "committer_name": info.committer_name,
            "committer_email": info.committer_email,
            "committed_date": info.committed_date,
            "trailers": {},
            "extended_trailers": {},
            "web_url": self._web_url(f"{project.path}/-/commit/{sha}"),
        }

    def _raw_file(self, request: Request, params: dict[str, Any], data: dict[str, Any]) -> Response:
        project = self._request_project(params)
        path = params["file_path"]
        ref = data.get("ref") or project.default_branch
        commit = rev_parse(project.git_dir, ref)
        if commit is None:
            raise _ApiError(404, "404 Commit Not Found")
        if git(project.git_dir, "cat-file", "-t", f"{commit}:{path}", check=False).strip() != "blob":
            raise _ApiError(404, "404 File Not Found")
        blob = git_bytes(project.git_dir, "cat-file", "blob", f"{commit}:{path}")
        return Response(blob, media_type="text/plain; charset=utf-8", headers={
            "X-Gitlab-File-Path": path, "X-Gitlab-Ref": ref, "X-Gitlab-Size": str(len(blob)),
            "X-Gitlab-Commit-Id": commit,
        })

    def _membership(self, paths: list[str], project: _Project | None, user_id: int) -> tuple[int, str] | None:
        """The highest membership among a project's own and its groups' (what `members/all` reports)."""
        found: list[tuple[int, str]] = []
        if project is not None and user_id in project.members:
            found.append((project.members[user_id], "active"))
        for path in paths:
            membership = self._groups.get(path, {}).get(user_id)
            if membership is not None:
                found.append(membership)
        return max(found, key=lambda m: m[0]) if found else None

    def _project_member(self, request: Request, params: dict[str, Any], data: dict[str, Any]) -> Response:
        project = self._request_project(params)
        user_id = params["user_id"]
        with self._lock:
            membership = self._membership(_ancestors(project.path), project, user_id)
            if membership is None or user_id not in self._users:
                raise _ApiError(404, "404 Not found")
            return JSONResponse(self._member_json(user_id, *membership))

    def _group_member(self, request: Request, params: dict[str, Any], data: dict[str, Any]) -> Response:
        ref, user_id = params["group"], params["user_id"]
        with self._lock:
            path = next((p for p in self._groups if p.lower() == ref.lower() or str(stable_id(p)) == ref), None)
            if path is None:
                raise _ApiError(404, "404 Group Not Found")
            membership = self._membership(_self_and_ancestors(path), None, user_id)
            if membership is None or user_id not in self._users:
                raise _ApiError(404, "404 Not found")
            return JSONResponse(self._member_json(user_id, *membership))


    # -- GraphQL -------------------------------------------------------------------------------

    async def _graphql(self, request: Request) -> Response:
        """POST /api/graphql with `{"query", "variables"}`: GitLab's answers, errors with 200 included."""
        token = _request_token(request)
        if token and not hmac.compare_digest(token.encode(), self.token.encode()):
            # A token GitLab does not know is refused; no token at all is an anonymous caller.
            return JSONResponse({"errors": [{"message": "Invalid token"}]}, status_code=401)
        try:
            payload = json.loads(await request.body() or b"{}")
            variables = payload.get("variables") or {}
            if isinstance(variables, str):  # GitLab also takes the variables as a JSON string
                variables = json.loads(variables or "{}")
        except (ValueError, AttributeError):
            return JSONResponse({"errors": [{"message": "Unexpected end of JSON input"}]}, status_code=400)
        return await run_in_threadpool(self._run_graphql, payload.get("query"), dict(variables), bool(token))

    def _run_graphql(self, query: Any, variables: dict[str, Any], authenticated: bool) -> Response:
        try:
            if not isinstance(query, str) or not query.strip():
                raise _GraphQLError("No query string was present")
            fields = _GraphQLParser(query, variables).document()
            data = _execute(self._graphql_query(authenticated), fields, "query")
        except _GraphQLError as exc:
            return JSONResponse({"errors": [{"message": str(exc)}]})
        return JSONResponse({"data": data})

    def _graphql_query(self, authenticated: bool) -> _Object:
        """The root `Query` type: the bot sees every project, an anonymous caller no private one (here: none)."""

        def project(arguments: dict[str, Any]) -> _Object | None:
            path = str(_required(arguments, "project", "fullPath"))
            with self._lock:
                found = self._find_project(path) if authenticated and not path.isdigit() else None
            return self._graphql_project(found) if found is not None else None

        return _Object("Query", {"project": project})

    def _graphql_project(self, project: _Project) -> _Object:
        def merge_request(arguments: dict[str, Any]) -> _Object | None:
            iid = str(_required(arguments, "mergeRequest", "iid"))
            with self._lock:
                mr = project.merge_requests.get(int(iid)) if iid.isdigit() else None
            return self._graphql_merge_request(project, mr) if mr is not None else None

        return _Object("Project", {
            "id": lambda _: f"gid://gitlab/Project/{project.id}",
            "fullPath": lambda _: project.path,
            "mergeRequest": merge_request,
            "repository": lambda _: self._graphql_repository(project),
        })

    def _graphql_repository(self, project: _Project) -> _Object:
        """A project's repository: `commit(ref:)` (GitLab 17.10+) is the commit a branch, tag or SHA names."""

        def commit(arguments: dict[str, Any]) -> _Object | None:
            sha = rev_parse(project.git_dir, str(_required(arguments, "commit", "ref")))
            return self._graphql_commit(project, sha) if sha is not None else None

        return _Object("Repository", {"commit": commit})

    def _graphql_merge_request(self, project: _Project, mr: _MergeRequest) -> _Object:
        """A merge request's commits (newest first) and committers, from its latest diff version."""
        with self._lock:
            commits_range = f"{mr.head.base_sha}..{mr.head.head_sha}"

        def commits(arguments: dict[str, Any]) -> _Object:
            shas = git(project.git_dir, "rev-list", commits_range).split()
            return _connection("Commit", [self._graphql_commit(project, sha) for sha in shas], arguments)

        def committers(arguments: dict[str, Any]) -> _Object:
            # GitLab: the users with the committer email of a commit, merge commits not counted.
            emails = set(git(project.git_dir, "log", "--no-merges", "--format=%ce", commits_range).lower().split())
            with self._lock:
                users = sorted(u.id for u in self._users.values() if u.email and u.email.lower() in emails)
            return _connection("UserCore", [self._graphql_user(user_id) for user_id in users], arguments)

        return _Object("MergeRequest", {
            "id": lambda _: f"gid://gitlab/MergeRequest/{mr.id}",
            "iid": lambda _: str(mr.iid),
            "title": lambda _: mr.title,
            "commits": commits,
            "committers": committers,
        })

    def _graphql_commit(self, project: _Project, sha: str) -> _Object:
        info = functools.cache(lambda: commit_info(project.git_dir, sha))  # read only if a field asks

        def author(arguments: dict[str, Any]) -> _Object | None:
            with self._lock:
                user = self._user_by_email(info().author_email)
            return self._graphql_user(user.id) if user is not None else None

        return _Object("Commit", {
            "sha": lambda _: sha,
            "title": lambda _: info().title,
            "authorName": lambda _: info().author_name,
            "authorEmail": lambda _: info().author_email,
            "committerName": lambda _: info().committer_name,
            "committerEmail": lambda _: info().committer_email,
            "author": author,
        })

    def _graphql_user(self, user_id: int) -> _Object:
        with self._lock:
            user = self._users[user_id]
        return _Object("UserCore", {
            "id": lambda _: f"gid://gitlab/User/{user.id}",
            "username": lambda _: user.username,
            "name": lambda _: user.name,
        })

    def recreate_project(self, path_with_namespace: str) -> int:
        """Delete a project and create another at the same path, as someone who took the path would.

        The new one has a new id and no merge requests or statuses; it keeps the git data and
        the members, so only its id tells it apart. Returns the id.
        """
        with self._lock:
            old = self._project(path_with_namespace)
            del self._projects[old.id]
            new = _Project(next(self._ids), old.path, old.git_dir, old.default_branch, self._now(),
                           members=dict(old.members))
            self._projects[new.id] = new
            return new.id


# -- faults as GitLab answers them -------------------------------------------------------------

SERVER_ERROR_PHRASES = {500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
                        504: "Gateway Timeout", 429: "Too Many Requests"}


def server_error(status: int = 500, **fault: Any) -> Fault:
    """A 5xx as GitLab's API answers it: `{"message": "500 Internal Server Error"}`."""
    return Fault(status, {}, {"message": f"{status} {SERVER_ERROR_PHRASES.get(status, 'Error')}"}, **fault)


def rate_limited(retry_after: int = 60, limit: int = 2000, **fault: Any) -> Fault:
    """429 from GitLab's rate limiter: text body "Retry later", `Retry-After` and the `RateLimit-*` headers."""
    reset = int(time.time()) + retry_after
    headers = {
        "RateLimit-Name": "throttle_authenticated_api",
        "RateLimit-Limit": str(limit),
        "RateLimit-Observed": str(limit + 1),
        "RateLimit-Remaining": "0",
        "RateLimit-Reset": str(reset),
        "RateLimit-ResetTime": datetime.fromtimestamp(reset, UTC).strftime("%a, %d %b %Y %H:%M:%S GMT"),
        "Retry-After": str(retry_after),
    }
    return Fault(429, headers, "Retry later\n", **fault)


# -- HTTP plumbing ---------------------------------------------------------------------------


def _match_segments(pattern: tuple[str, ...], segments: list[str]) -> dict[str, Any] | None:
    """Parameters of a route whose segments match the raw ones (each percent-decoded on its own)."""
    if len(pattern) != len(segments):
        return None
    params: dict[str, Any] = {}
    for expected, raw in zip(pattern, segments, strict=True):
        value = unquote(raw)
        if expected.startswith("{"):
            name, _, kind = expected[1:-1].partition(":")
            if not value:
                return None
            if kind == "int":
                if not value.isdigit():
                    return None
                params[name] = int(value)
            else:
                params[name] = value
        elif value != expected:
            return None
    return params


async def _request_data(request: Request) -> dict[str, Any]:
    """Query parameters and the JSON or form body, merged (GitLab accepts parameters in either)."""
    data: dict[str, Any] = dict(parse_qsl(request.url.query, keep_blank_values=True))
    body = await request.body()
    if body:
        content_type = request.headers.get("content-type", "")
        if "application/json" in content_type:
            try:
                parsed = json.loads(body)
            except ValueError:
                raise _ApiError(400, "400 Bad request - The provided content-type 'application/json' is "
                                     "not valid JSON", key="error") from None
            if isinstance(parsed, dict):
                data.update(parsed)
        else:
            data.update(parse_qsl(body.decode(errors="replace"), keep_blank_values=True))
    return data


def _paginated(request: Request, data: Mapping[str, Any], items: list[Any]) -> JSONResponse:
    """One page of a list with GitLab's offset pagination headers (per_page 20 by default, 100 at most)."""
    try:
        per_page = min(max(int(data.get("per_page", DEFAULT_PER_PAGE)), 1), MAX_PER_PAGE)
        page = max(int(data.get("page", 1)), 1)
    except (TypeError, ValueError):
        per_page, page = DEFAULT_PER_PAGE, 1
    total_pages = max((len(items) + per_page - 1) // per_page, 1)
    headers = {
        "X-Page": str(page),
        "X-Per-Page": str(per_page),
        "X-Total": str(len(items)),
        "X-Total-Pages": str(total_pages),
        "X-Next-Page": str(page + 1) if page < total_pages else "",
        "X-Prev-Page": str(page - 1) if page > 1 else "",
    }
    # Starlette's request.url is built from the decoded path; links must keep group%2Fproject encoded.
    base = f"{request.url.scheme}://{request.url.netloc}{raw_path(request.scope)}"
    query = dict(parse_qsl(request.url.query, keep_blank_values=True))
    links = []
    for rel, target in (("prev", page - 1), ("next", page + 1), ("first", 1), ("last", total_pages)):
        if (rel == "prev" and page > 1) or (rel == "next" and page < total_pages) or rel in ("first", "last"):
            url = f"{base}?{urlencode({**query, 'page': target, 'per_page': per_page})}"
            links.append(f'<{url}>; rel="{rel}"')
    headers["Link"] = ", ".join(links)
    return JSONResponse(items[(page - 1) * per_page: page * per_page], headers=headers)


def _truthy(value: Any) -> bool:
    return value is True or str(value).lower() in ("true", "1", "yes")


def _diff_json(f: _Diff) -> dict[str, Any]:
    return {"diff": f.diff, "new_path": f.new_path, "old_path": f.old_path, "a_mode": f.a_mode, "b_mode": f.b_mode,
            "new_file": f.new_file, "renamed_file": f.renamed_file, "deleted_file": f.deleted_file,
            "generated_file": False}


def _merge_status(detailed: str, conflicts: bool) -> str:
    """The older `merge_status` beside a `detailed_merge_status`: git's view alone (conflicts), or still checking."""
    if detailed in ("unchecked", "checking", "preparing"):
        return detailed
    return "cannot_be_merged" if conflicts or detailed == "conflict" else "can_be_merged"


def _shape(template: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """The template's keys in its order, every value from ours (a missing one is a bug: KeyError)."""
    return {key: values[key] for key in template}


def _ancestors(path: str) -> list[str]:
    """The groups above a project or group path, outermost first: a/b/c -> [a, a/b]."""
    parts = path.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def _self_and_ancestors(path: str) -> list[str]:
    return [*_ancestors(path), path]


def _stamp(status: _Status, now: datetime) -> None:
    if status.status == "running" and status.started_at is None:
        status.started_at = now
    if status.status in ("success", "failed", "canceled", "skipped"):
        status.started_at = status.started_at or now
        status.finished_at = now


def _request_token(request: Request) -> str | None:
    """The token a request carries: `PRIVATE-TOKEN`, else `Authorization: Bearer`."""
    token = request.headers.get("private-token")
    if token is None:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        token = value if scheme.lower() == "bearer" else None
    return token


# -- GraphQL: one query of fields, arguments and nested selections -------------------------------

_GRAPHQL_TOKENS = re.compile(
    r'(?P<skip>[\s,]+|#[^\n]*)|(?P<punct>[{}():!$=\[\]])|(?P<name>[_A-Za-z][_0-9A-Za-z]*)'
    r'|(?P<number>-?\d+)|(?P<string>"(?:[^"\\\n]|\\.)*")'
)


class _GraphQLError(Exception):
    """A query GitLab would refuse: answered with 200 and `{"errors": [{"message": ...}]}`."""


@dataclass
class _Field:
    name: str
    alias: str  # the key of its value in the answer
    arguments: dict[str, Any]  # variables already replaced by their values
    selections: list[_Field] | None


@dataclass
class _Object:
    """A GraphQL object: its type's name and, per field, what resolves it from the field's arguments."""

    type: str
    fields: dict[str, Callable[[dict[str, Any]], Any]]


class _GraphQLParser:
    """Recursive descent over one query: `query Name($v: Type!) { field(arg: $v) { ... } }`."""

    def __init__(self, text: str, variables: dict[str, Any]) -> None:
        self._tokens: list[tuple[str, str]] = []
        position = 0
        while position < len(text):
            match = _GRAPHQL_TOKENS.match(text, position)
            if match is None:
                raise _GraphQLError(f"Parse error on {text[position]!r} at offset {position}")
            if match.lastgroup != "skip":
                self._tokens.append((str(match.lastgroup), match.group()))
            position = match.end()
        self._at = 0
        self._variables = variables

    def document(self) -> list[_Field]:
        if self._peek() == "query":
            self._take()
            if self._peek() not in ("(", "{"):
                self._name()  # the operation's name
            if self._peek() == "(":
                self._variable_definitions()
        elif self._peek() != "{":
            raise _GraphQLError("The fake GitLab runs queries only: no mutations, subscriptions or fragments")
        fields = self._selection_set()
        if self._peek() is not None:
            raise _GraphQLError(f'Parse error on "{self._peek()}": the fake GitLab runs one operation a document')
        return fields

    def _variable_definitions(self) -> None:
        self._take("(")
        while self._peek() != ")":
            self._take("$")
            name = self._name()
            self._take(":")
            required = self._type()
            if self._peek() == "=":
                self._take()
                self._variables.setdefault(name, self._value())
            if required and self._variables.get(name) is None:
                raise _GraphQLError(f"Variable ${name} of a non-null type was provided invalid value")
        self._take(")")

    def _type(self) -> bool:
        """Skip a type (`ID!`, `[String]`); whether it is non-null."""
        if self._peek() == "[":
            self._take()
            self._type()
            self._take("]")
        else:
            self._name()
        if self._peek() == "!":
            self._take()
            return True
        return False

    def _selection_set(self) -> list[_Field]:
        self._take("{")
        fields = []
        while self._peek() != "}":
            fields.append(self._field())
        self._take("}")
        if not fields:
            raise _GraphQLError('Parse error on "}" (RCURLY): a selection needs a field')
        return fields

    def _field(self) -> _Field:
        alias = name = self._name()
        if self._peek() == ":":
            self._take()
            name = self._name()
        arguments: dict[str, Any] = {}
        if self._peek() == "(":
            self._take()
            while self._peek() != ")":
                key = self._name()
                self._take(":")
                arguments[key] = self._value()
            self._take(")")
        selections = self._selection_set() if self._peek() == "{" else None
        return _Field(name, alias, arguments, selections)

    def _value(self) -> Any:
        kind, text = self._next()
        if text == "$":
            return self._variables.get(self._name())
        if kind == "string":
            return json.loads(text)
        if kind == "number":
            return int(text)
        if kind == "name":
            return {"true": True, "false": False, "null": None}.get(text, text)  # else an enum value
        raise _GraphQLError(f'Parse error on "{text}": the fake GitLab takes no lists or objects as values')

    def _name(self) -> str:
        kind, text = self._next()
        if kind != "name":
            raise _GraphQLError(f'Parse error on "{text}": expected a name')
        return text

    def _peek(self) -> str | None:
        return self._tokens[self._at][1] if self._at < len(self._tokens) else None

    def _next(self) -> tuple[str, str]:
        if self._at >= len(self._tokens):
            raise _GraphQLError("Unexpected end of document")
        self._at += 1
        return self._tokens[self._at - 1]

    def _take(self, expected: str | None = None) -> str:
        _, text = self._next()
        if expected is not None and text != expected:
            raise _GraphQLError(f'Parse error on "{text}": expected "{expected}"')
        return text


def _execute(value: Any, selections: list[_Field] | None, field: str) -> Any:
    """The answer for `value` (resolved for `field`) under its selections."""
    if isinstance(value, list):
        return [_execute(item, selections, field) for item in value]
    if not isinstance(value, _Object):
        if selections is not None and value is not None:
            raise _GraphQLError(f"Selections can't be made on scalars (field '{field}' returns a scalar)")
        return value
    if selections is None:
        raise _GraphQLError(f"Field must have selections (field '{field}' returns {value.type} but has no selections)")
    answer: dict[str, Any] = {}
    for selected in selections:
        if selected.name == "__typename":
            answer[selected.alias] = value.type
            continue
        resolve = value.fields.get(selected.name)
        if resolve is None:
            raise _GraphQLError(f"Field '{selected.name}' doesn't exist on type '{value.type}'")
        answer[selected.alias] = _execute(resolve(selected.arguments), selected.selections, selected.name)
    return answer


def _required(arguments: dict[str, Any], field: str, name: str) -> Any:
    if arguments.get(name) is None:
        raise _GraphQLError(f"Field '{field}' is missing required arguments: {name}")
    return arguments[name]


def _connection(type_name: str, items: list[Any], arguments: dict[str, Any]) -> _Object:
    """A page of `items` as a GitLab connection: `first` (at most 100) after the `after` cursor."""
    start = _cursor_offset(arguments.get("after"))
    size = min(int(arguments.get("first") or GRAPHQL_MAX_PAGE_SIZE), GRAPHQL_MAX_PAGE_SIZE)
    page = items[start:start + size]
    end = start + len(page)
    page_info = _Object("PageInfo", {
        "hasNextPage": lambda _: end < len(items),
        "hasPreviousPage": lambda _: start > 0,
        "startCursor": lambda _: _cursor(start) if page else None,
        "endCursor": lambda _: _cursor(end) if page else None,
    })
    return _Object(f"{type_name}Connection", {"nodes": lambda _: page, "pageInfo": lambda _: page_info})


def _cursor(offset: int) -> str:
    """An opaque cursor, as GitLab's are: base64 of where the next page starts."""
    return base64.b64encode(json.dumps({"offset": offset}).encode()).decode()


def _cursor_offset(cursor: Any) -> int:
    if cursor is None:
        return 0
    try:
        return max(int(json.loads(base64.b64decode(str(cursor)))["offset"]), 0)
    except (ValueError, KeyError, TypeError):
        raise _GraphQLError(f"Invalid cursor: {cursor}") from None


# -- git -------------------------------------------------------------------------------------


def _diff(git_dir: Path, base: str, head: str) -> list[_Diff]:
    """The files between two commits as GitLab's diff objects: renames detected, each with its patch text."""
    patch = git(git_dir, "diff", "--no-color", "--no-ext-diff", "-M", base, head)
    chunks = re.split(r"^diff --git ", patch, flags=re.MULTILINE)[1:]
    files: list[_Diff] = []
    for n, change in enumerate(raw_changes(git_dir, base, head)):
        chunk = chunks[n] if n < len(chunks) else ""
        hunk = chunk.find("\n@@")
        files.append(_Diff(
            old_path=change.old_path,
            new_path=change.new_path,
            a_mode="0" if set(change.old_mode) == {"0"} else change.old_mode,
            b_mode="0" if set(change.new_mode) == {"0"} else change.new_mode,
            new_file=change.letter == "A",
            renamed_file=change.letter == "R",
            deleted_file=change.letter == "D",
            diff=chunk[hunk + 1:] if hunk >= 0 else "",
        ))
    return files


# -- small helpers ---------------------------------------------------------------------------


def _api_time(moment: datetime | None) -> str | None:
    """REST timestamps: ISO 8601 with milliseconds, "2016-06-08T00:19:52.638Z"."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z" if moment else None


def _hook_time(moment: datetime) -> str:
    """Merge request webhook timestamps, as in GitLab's example: "2013-12-03T17:23:34Z"."""
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _note_time(moment: datetime) -> str:
    """Note webhook timestamps, as in GitLab's example: "2015-05-17 18:21:36 UTC"."""
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def encoded_path(path: str) -> str:
    """A project or group path as GitLab's API takes it in a URL: `group%2Fsub%2Frepo`."""
    return quote(path, safe="")
