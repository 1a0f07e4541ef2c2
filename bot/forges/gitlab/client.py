"""The GitLab edge: a `VCSClient` for one project (merge requests), over python-gitlab.

`GitLabClient` talks to whatever `url` says: gitlab.com, a self-managed GitLab, or the
local fake in `bot.sandbox.gitlab_fake`. It authenticates with one token (a project, group or
personal access token of the bot user, scope `api`), looks the project up by its path
(nested groups allowed: `group/subgroup/infrastructure-live`), and numbers merge
requests by their iid. The token never appears in a repr, a log line or an exception.

How GitLab's words become the bot's:

- Commit statuses: pending → pending, success → success, failure and error → failed.
  GitLab refuses (400 "Cannot transition status via :enqueue from :pending") to put a
  pending or running status into the state it already has; that repeat counts as done.
- Permissions: the project's `members/all` access level (own or inherited from its
  groups): 10 Guest → read, 15 Planner → read, 20 Reporter → triage, 30 Developer →
  write, 40 Maintainer → maintain, 50 Owner → admin; not a member → none.
- Teams are groups (`group` or `group/subgroup`); a user is in one when the group's
  `members/all` lists them as active.
- Mergeability comes from the merge request's `detailed_merge_status` (see `mergeability`).
- Approvals: see `reviews`.

Retries: the same `RetryPolicy` as the GitHub client (`bot.forges.github.client`; constructor kwarg
`retry`, else this module's `DEFAULT_RETRY`): exponential backoff with full jitter inside a
budget per call, `Retry-After` (or `RateLimit-Reset`) obeyed where GitLab sends it. Retried:
429; 500, 502, 503, 504; connection failures and timeouts. Reads and status writes are
repeated as they are; a note whose fate an error left open is looked for before it is posted
again (see `create_comment`). python-gitlab's own retries (`retry_transient_errors`, its 429
handling) are off, so nothing waits twice or without bound.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

import gitlab
import httpx
import requests
from gitlab.exceptions import GitlabError

from bot.forges.retry import (
    COMMENT_LOOKBACK,
    TRANSIENT_STATUSES,
    RetryPolicy,
    Transient,
    header,
    post_once,
    reset_wait_seconds,
    retry_after_seconds,
    transport_transient,
)
from bot.forges.vcs import ForgeError, Permission, StatusState
from bot.models import ForgeComment, Mergeability, PullRequest, Repo, Review

USER_AGENT = "deploybot"
NOTE_LIMIT = 1_000_000  # characters: GitLab refuses longer notes (400 "is too long")
STATUS_DESCRIPTION_LIMIT = 255  # kept short, like a column that holds it
PER_PAGE = 100  # GitLab's maximum page size
APPROVED_NOTE = "approved this merge request"  # the system note GitLab adds for each approval
UNAPPROVED_NOTE = "unapproved this merge request"  # ... and for each withdrawn one
# Who made a merge request's commits: REST names only emails, GraphQL the users they belong to.
# 100 is the most GitLab gives a page; commits are paged with `after`.
COMMIT_PEOPLE_QUERY = """
query($project: ID!, $iid: String!, $after: String) {
  project(fullPath: $project) {
    mergeRequest(iid: $iid) {
      committers(first: 100) { pageInfo { hasNextPage } nodes { username } }
      commits(first: 100, after: $after) {
        pageInfo { hasNextPage endCursor }
        nodes { author { username } }
      }
    }
  }
}
"""
# Who wrote one commit: the user GitLab ties its author email to (`Repository.commit`: GitLab 17.10+).
COMMIT_AUTHOR_QUERY = """
query($project: ID!, $ref: String!) {
  project(fullPath: $project) { repository { commit(ref: $ref) { sha author { username } } } }
}
"""
DEFAULT_RETRY = RetryPolicy()

log = logging.getLogger("deploybot.forge")
T = TypeVar("T")

STATUS_STATES: dict[str, str] = {"pending": "pending", "success": "success", "failure": "failed", "error": "failed"}
ACCESS_LEVELS: tuple[tuple[int, Permission], ...] = (
    (50, "admin"),  # Owner
    (40, "maintain"),  # Maintainer
    (30, "write"),  # Developer
    (20, "triage"),  # Reporter
    (10, "read"),  # Guest (and 15, Planner)
)
# detailed_merge_status values that mean "not decided yet": ask again shortly.
UNSETTLED_MERGE_STATUSES = frozenset({"unchecked", "checking", "preparing", "approvals_syncing"})
# Statuses that block only on the pipeline: decided by the head commit's statuses instead.
CI_MERGE_STATUSES = frozenset({"ci_must_pass", "ci_still_running"})
PASSING_STATUSES = frozenset({"success", "skipped"})
MERGE_STATUS_REASONS = {
    "not_approved": "the merge request lacks the approvals GitLab requires",
    "requested_changes": "a reviewer requested changes",
    "discussions_not_resolved": "the merge request has unresolved threads",
    "need_rebase": "the merge request must be rebased onto the target branch",
    "not_open": "the merge request is not open",
    "blocked_status": "the merge request is blocked by another merge request",
    "merge_request_blocked": "the merge request is blocked by another merge request",
    "external_status_checks": "external status checks have not passed",
    "status_checks_must_pass": "external status checks have not passed",
    "jira_association_missing": "the title or description must reference a Jira issue",
    "broken_status": "the source branch cannot be merged (broken)",
    "commits_status": "the source branch has no commits or is missing",
    "security_policy_violations": "security policy rules are violated",
    "merge_time": "the merge request may not be merged before its merge-after time",
    "locked_paths": "paths the merge request changes are locked",
    "locked_lfs_files": "LFS files the merge request changes are locked",
    "title_regex": "the title does not match the project's required pattern",
    # GitLab before 15.6: `merge_status` alone, which speaks of conflicts and nothing else.
    "can_be_merged": "GitLab reports only merge_status (GitLab before 15.6), which does not say whether "
                     "approvals, threads or the pipeline block the merge",
}


class _Gitlab(gitlab.Gitlab):
    """python-gitlab without retries of its own, keeping each thread's last answer.

    Its errors carry no headers, so a response hook remembers the status and headers of the
    last answer per thread: where `Retry-After` comes from when GitLabClient classifies one.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._answers = threading.local()
        self.session.hooks["response"].append(self._remember)

    def _remember(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        self._answers.last = (response.status_code, response.headers)

    def answer_headers(self, status: int) -> Mapping[str, str] | None:
        """The headers of this thread's last answer, if it had this status."""
        last = getattr(self._answers, "last", None)
        return last[1] if last is not None and last[0] == status else None

    def http_request(self, *args: Any, **kwargs: Any) -> requests.Response:
        kwargs["obey_rate_limit"] = False  # else python-gitlab sleeps on 429 itself, up to 10 times
        kwargs["retry_transient_errors"] = False
        return super().http_request(*args, **kwargs)


class GitLabClient:
    """`VCSClient` for one GitLab project, over python-gitlab."""

    comment_limit = NOTE_LIMIT

    def __init__(
        self,
        url: str,
        token: str,
        repo: Repo,
        *,
        timeout: float = 15,
        mergeable_retries: int = 4,
        mergeable_retry_delay: float = 1.0,
        retry: RetryPolicy | None = None,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"gitlab url must be an http(s) URL, got {url!r}")
        if not token or not token.strip():
            raise ValueError("gitlab token is empty")
        if not repo.full_name or repo.full_name.strip("/") != repo.full_name:
            raise ValueError(f"not a GitLab project path: {repo.full_name!r}")
        self.url = url.rstrip("/")
        self.repo = repo
        self._token = token
        self._mergeable_retries = max(mergeable_retries, 1)
        self._mergeable_retry_delay = mergeable_retry_delay
        self._retry = retry if retry is not None else DEFAULT_RETRY
        self._gl = _Gitlab(
            self.url,
            private_token=token,
            timeout=timeout,
            retry_transient_errors=False,  # `_call` retries (see the module docstring)
            per_page=PER_PAGE,
            user_agent=USER_AGENT,
        )
        self._project = self._gl.projects.get(repo.full_name, lazy=True)  # no request: the path is the id
        self._path = f"/projects/{_quote(repo.full_name)}"

    def __repr__(self) -> str:
        return f"GitLabClient(url={self.url!r}, project={self.repo.full_name!r})"

    def close(self) -> None:
        """Close the HTTP connections."""
        self._gl.session.close()

    # -- merge requests ------------------------------------------------------------------------

    def get_pull_request(self, number: int) -> PullRequest:
        """The merge request (by iid) as GitLab sees it now."""
        return self._call(f"fetching merge request !{number} of {self.repo.full_name}",
                          lambda: self._pull(self._project.mergerequests.get(number).attributes))

    def changed_files(self, number: int) -> list[str]:
        """Every path the merge request touches (`/merge_requests/:iid/diffs`); a rename counts on both sides."""

        def fetch() -> list[str]:
            paths: dict[str, None] = {}  # ordered set
            diffs = self._gl.http_list(
                f"{self._path}/merge_requests/{int(number)}/diffs", query_data={"per_page": PER_PAGE}, iterator=True
            )
            for diff in diffs:
                paths[diff["new_path"]] = None
                paths[diff["old_path"]] = None
            return list(paths)

        return self._call(f"listing the diffs of merge request !{number} of {self.repo.full_name}", fetch)

    def create_comment(self, number: int, body: str) -> ForgeComment:
        """Post a note (up to `NOTE_LIMIT` characters) on the merge request; return it as GitLab recorded it.

        Posted at most once across retries (see `bot.forges.github.client.post_once`): identical notes
        of the last few minutes are listed first, and after an answer that leaves open whether
        GitLab made the note, a new identical one is taken for ours instead of posting again.
        """
        threshold = datetime.fromtimestamp(max(time.time() - COMMENT_LOOKBACK, 0), UTC)
        wanted = _normalized(body)
        notes = self._project.mergerequests.get(number, lazy=True).notes

        def identical() -> list[ForgeComment]:
            found = []
            for note in notes.list(iterator=True, sort="desc", order_by="created_at"):
                created = _parse_time(note.created_at)
                if created is not None and created < threshold:
                    break
                if not note.system and _normalized(str(note.body)) == wanted:
                    found.append(_forge_comment(note.attributes))
            return found

        what = f"commenting on merge request !{number} of {self.repo.full_name}"
        return self._call(what, post_once(lambda: _forge_comment(notes.create({"body": body}).attributes), identical,
                                          self._transient, what))

    def find_comment(self, number: int, text: str) -> ForgeComment | None:
        """The oldest note of the merge request whose body contains `text` (system notes never do)."""

        def fetch() -> ForgeComment | None:
            notes = self._project.mergerequests.get(number, lazy=True).notes
            for note in notes.list(iterator=True, sort="asc", order_by="created_at"):
                if not note.system and text in str(note.body):
                    return _forge_comment(note.attributes)
            return None

        return self._call(f"looking for a note on merge request !{number} of {self.repo.full_name}", fetch)

    def get_comment(self, number: int, comment_id: int) -> ForgeComment | None:
        """A note on the merge request as GitLab has it now; None if there is none by that id, or it is a system note.

        System notes ("approved this merge request", "added 1 commit") are GitLab's own record
        of events, nobody's comment.
        """
        try:
            note = self._call(f"reading note {comment_id} of merge request !{number} of {self.repo.full_name}",
                              lambda: self._project.mergerequests.get(number, lazy=True).notes.get(comment_id))
        except ForgeError as exc:
            if exc.status == 404:
                return None
            raise
        if note.attributes.get("system"):
            return None
        return _forge_comment(note.attributes)

    def commit_people(self, number: int) -> set[str]:
        """Usernames of everyone who authored or committed a commit of the merge request.

        From GitLab's GraphQL API (the REST API names no users for commits): the merge
        request's `committers` (users with the committer email of one of its commits, merge
        commits aside, as GitLab counts them) and each commit's `author` (the user with the
        author email, if any). Commits come 100 a page. A merge request with more committers
        than one page holds raises ForgeError rather than answer with people missing.
        """
        action = f"listing the commits of merge request !{number} of {self.repo.full_name}"
        people: set[str] = set()
        after: str | None = None
        while True:
            variables = {"project": self.repo.full_name, "iid": str(number), "after": after}
            project = self._graphql(action, COMMIT_PEOPLE_QUERY, variables).get("project")
            merge_request = project.get("mergeRequest") if isinstance(project, dict) else None
            if not isinstance(merge_request, dict):  # GitLab answers null for what the token cannot see, too
                raise ForgeError(f"GitLab has no merge request !{number} in {self.repo.full_name}", status=404)
            committers, commits = merge_request["committers"], merge_request["commits"]
            if committers["pageInfo"]["hasNextPage"]:
                raise ForgeError(f"merge request !{number} of {self.repo.full_name} has more committers than "
                                 f"GitLab lists at once", status=422)
            people.update(str(user["username"]) for user in committers["nodes"])
            people.update(str(commit["author"]["username"]) for commit in commits["nodes"] if commit.get("author"))
            if not commits["pageInfo"]["hasNextPage"]:
                return people
            after = commits["pageInfo"]["endCursor"]

    def set_status(self, sha: str, context: str, state: StatusState, description: str, target_url: str = "") -> None:
        """Set the commit status `context` (GitLab's `name`); a repeat of its current state is a success."""
        gitlab_state = STATUS_STATES.get(state)
        if gitlab_state is None:
            raise ValueError(f"unknown status state {state!r}")
        if len(description) > STATUS_DESCRIPTION_LIMIT:
            description = description[: STATUS_DESCRIPTION_LIMIT - 1] + "…"
        payload = {"state": gitlab_state, "name": context, "description": description}
        if target_url:
            payload["target_url"] = target_url
        action = f"setting status {context!r} on {sha[:12]} of {self.repo.full_name}"
        try:
            # Safe to repeat; a repeat of a pending status that did arrive is the 400 below.
            self._call(action, lambda: self._gl.http_post(f"{self._path}/statuses/{_quote(sha)}", post_data=payload))
        except ForgeError as exc:
            if exc.status == 400 and "Cannot transition status" in str(exc):
                if self._call(action, lambda: self._current_status(sha, context)) == gitlab_state:
                    return  # GitLab already shows exactly this
            raise

    def _current_status(self, sha: str, name: str) -> str | None:
        statuses = self._gl.http_list(
            f"{self._path}/repository/commits/{_quote(sha)}/statuses",
            query_data={"name": name, "per_page": PER_PAGE},
            get_all=True,
        )
        mine = [s for s in statuses if s.get("name") == name]
        return max(mine, key=lambda s: s["id"])["status"] if mine else None

    def reviews(self, number: int) -> list[Review]:
        """Who approves the merge request now, each with the SHA their approval counts for, oldest first.

        GitLab's approvals API names the approvers but not the commit they approved. The
        rule: an approval counts for the merge request's current head only if it was given
        after that head was pushed. "Pushed" is the `created_at` of the newest diff version
        (`/merge_requests/:iid/versions`) whose `head_commit_sha` is the current head: the
        moment GitLab registered the push. "Given" is `approved_by[].approved_at` where the
        API reports it (GitLab 18.4+), else the time of the approver's latest "approved this
        merge request" system note. Both are GitLab server times.

        - approved after the head was pushed → `commit_sha` is the head;
        - approved before → the head of the newest version that existed then (never the
          current head, even if a branch was reset back to it);
        - when either time cannot be established → `commit_sha` is "" and it never counts.

        Standing approvals are "APPROVED" (GitLab's approvals API lists only those); each
        withdrawal ("unapproved this merge request" system note) is a "DISMISSED" review at
        its time, so a `deploybot approve` the same user commented before it stays withdrawn
        whatever order the webhooks arrive in. `submitted_at` is "" if unknown.
        """

        def fetch() -> tuple[str, list[tuple[str, datetime | None]], list[tuple[str, datetime | None]],
                             list[tuple[str, datetime]]]:
            mr = self._project.mergerequests.get(number)
            head = str(mr.sha or "")
            versions = [(v.head_commit_sha, _parse_time(v.created_at)) for v in mr.diffs.list(get_all=True)]
            approved_by = mr.approvals.get().attributes.get("approved_by") or []
            approvals = [
                (entry["user"]["username"], _parse_time(entry.get("approved_at")))
                for entry in approved_by
                if isinstance(entry, dict) and isinstance(entry.get("user"), dict)
            ]
            noted, withdrawals = self._approval_notes(mr)
            approvals = [(user, when or noted.get(user.lower())) for user, when in approvals]
            return head, versions, approvals, withdrawals

        head, versions, approvals, withdrawals = self._call(
            f"listing approvals of merge request !{number} of {self.repo.full_name}", fetch)
        pushed = [created for sha, created in versions if sha == head and created is not None]
        pushed_at = max(pushed) if pushed else None
        reviews = [
            Review(user=user, state="APPROVED", commit_sha=approved_sha(when, head, pushed_at, versions),
                   submitted_at=_iso(when))
            for user, when in approvals
        ]
        reviews += [Review(user=user, state="DISMISSED", commit_sha="", submitted_at=_iso(when))
                    for user, when in withdrawals]
        return sorted(reviews, key=lambda r: (r.submitted_at == "", r.submitted_at))

    def _approval_notes(self, mr: Any) -> tuple[dict[str, datetime], list[tuple[str, datetime]]]:
        """Each user's latest "approved this merge request" system note time (by lower-cased
        username), and every "unapproved this merge request" note as (username, time)."""
        approved: dict[str, datetime] = {}
        withdrawn: list[tuple[str, datetime]] = []
        for note in mr.notes.list(iterator=True, sort="asc", order_by="created_at"):
            body = note.body.strip() if note.system else ""
            when = _parse_time(note.created_at)
            if body not in (APPROVED_NOTE, UNAPPROVED_NOTE) or when is None:
                continue
            user = str(note.author["username"])
            if body == UNAPPROVED_NOTE:
                withdrawn.append((user, when))
            elif user.lower() not in approved or when > approved[user.lower()]:
                approved[user.lower()] = when
        return approved, withdrawn

    # -- people ------------------------------------------------------------------------------

    def permission(self, user: str) -> Permission:
        """The user's role on the project (own or inherited from its groups); "none" if not a member."""
        user_id = self._user_id(user)
        if user_id is None:
            return "none"
        try:
            member = self._call(f"reading {user}'s access level on {self.repo.full_name}",
                                lambda: self._project.members_all.get(user_id))
        except ForgeError as exc:
            if exc.status == 404:
                return "none"
            raise
        if not _active(member.attributes):
            return "none"
        level = int(member.access_level or 0)
        return next((permission for minimum, permission in ACCESS_LEVELS if level >= minimum), "none")

    def is_team_member(self, user: str, team: str) -> bool:
        """Whether the user is an active member of the group `team` (`group` or `group/subgroup`)."""
        group = team.strip()
        if not group or group.strip("/") != group or "//" in group:
            raise ValueError(f"team must be a GitLab group path like 'group/subgroup', got {team!r}")
        user_id = self._user_id(user)
        if user_id is None:
            return False
        try:
            member = self._call(f"reading {user}'s membership of {group}",
                                lambda: self._gl.groups.get(group, lazy=True).members_all.get(user_id))
        except ForgeError as exc:
            if exc.status == 404:
                return False
            raise
        return _active(member.attributes)

    def _user_id(self, username: str) -> int | None:
        if not username:
            return None
        users = self._call(f"looking up user {username}",
                           lambda: self._gl.users.list(username=username, get_all=False))
        return next((int(u.id) for u in users if str(u.username).lower() == username.lower()), None)

    # -- merging -------------------------------------------------------------------------------

    def mergeability(self, pull: PullRequest, ignore_contexts: frozenset[str]) -> Mergeability:
        """Whether GitLab would merge the MR, judging "pipeline must succeed" without `ignore_contexts`.

        From `detailed_merge_status` (plus `draft` and `has_conflicts`), asked again
        (`mergeable_retries` times in all) while GitLab is still checking (`unchecked`,
        `checking`, `preparing`, `approvals_syncing`); still so after that: not mergeable.
        Only "mergeable" merges, with one exception: `ci_must_pass` and `ci_still_running`
        are decided by the head commit's statuses, every one not ignored (and not
        `allow_failure`) having to be success (or skipped), so the bot's own pending
        `deploybot/apply` cannot block its own apply. That is sound because GitLab reports
        the pipeline only once every other check (approvals, threads, rebase, conflicts, …)
        passed. Every other status (`not_approved`, `discussions_not_resolved`,
        `need_rebase`, `conflict`, …, and any GitLab adds later) does not merge, and the
        reason names it. GitLab before 15.6 sends only `merge_status`, whose "can_be_merged"
        speaks of conflicts alone: not mergeable either (deny by default).
        """

        def fetch() -> Mergeability:
            data = self._project.mergerequests.get(pull.number).attributes
            for _ in range(self._mergeable_retries - 1):
                if _merge_status(data) not in UNSETTLED_MERGE_STATUSES:
                    break
                # GitLab checks mergeability in the background after a push; asking starts it.
                time.sleep(self._mergeable_retry_delay)
                data = self._project.mergerequests.get(pull.number).attributes
            status = _merge_status(data)
            if status in UNSETTLED_MERGE_STATUSES:
                return Mergeability(False, f"GitLab has not checked mergeability yet ({status})")
            if data.get("draft") or data.get("work_in_progress") or status == "draft_status":
                return Mergeability(False, "it is a draft (GitLab: draft_status)")
            if data.get("has_conflicts") or status == "conflict":
                return Mergeability(False, f"it has conflicts with {data.get('target_branch') or pull.base_ref} "
                                           f"(GitLab: {status})")
            if status == "mergeable":
                return Mergeability(True)
            if status in CI_MERGE_STATUSES:
                return self._statuses_pass(str(data.get("sha") or pull.head_sha), ignore_contexts)
            reason = MERGE_STATUS_REASONS.get(status, "GitLab would not merge it")
            return Mergeability(False, f"{reason} (GitLab: {status})")

        return self._call(f"checking mergeability of merge request !{pull.number} of {self.repo.full_name}", fetch)

    def _statuses_pass(self, sha: str, ignore: frozenset[str]) -> Mergeability:
        statuses = self._gl.http_list(
            f"{self._path}/repository/commits/{_quote(sha)}/statuses", query_data={"per_page": PER_PAGE}, get_all=True
        )
        latest: dict[str, dict[str, Any]] = {}
        for status in sorted(statuses, key=lambda s: s["id"]):
            latest[status["name"]] = status
        for name in sorted(set(latest) - ignore):
            status = latest[name]
            if status.get("allow_failure"):
                continue  # a job allowed to fail never fails its pipeline
            if status["status"] not in PASSING_STATUSES:
                return Mergeability(False, f"commit status {name!r} is {status['status']}")
        return Mergeability(True)

    def is_behind_base(self, pull: PullRequest) -> bool:
        """Whether the target branch has commits the MR head does not contain (compare head → target)."""
        comparison = self._call(f"comparing {pull.head_sha[:12]} with {pull.base_ref} on {self.repo.full_name}",
                                lambda: self._project.repository_compare(pull.head_sha, pull.base_ref))
        return bool(comparison["commits"])

    # -- repository ----------------------------------------------------------------------------

    def lookup_repo(self) -> Repo:
        """This project as a Repo (clone URL, default branch): for runs no webhook announced."""
        data = self._call(f"looking up {self.repo.full_name}",
                          lambda: self._gl.projects.get(self.repo.full_name).attributes)
        return Repo(forge="gitlab", full_name=str(data["path_with_namespace"]),
                    clone_url=str(data["http_url_to_repo"]), default_branch=str(data["default_branch"]),
                    id=int(data["id"]))

    def commit_sha(self, ref: str) -> str | None:
        """The commit a branch, tag, ref or SHA names in this project, or None."""
        try:
            return self._call(f"resolving {ref} in {self.repo.full_name}",
                              lambda: str(self._project.commits.get(ref.removeprefix("refs/heads/")).id))
        except ForgeError as exc:
            if exc.status == 404:
                return None
            raise

    def is_on_default_branch(self, sha: str) -> bool:
        """Whether the commit is (an ancestor of) the head of the default branch."""
        comparison = self._call(f"comparing {sha[:12]} with {self.repo.default_branch} on {self.repo.full_name}",
                                lambda: self._project.repository_compare(self.repo.default_branch, sha))
        return not comparison["commits"]  # nothing in sha that the default branch lacks

    def read_file(self, ref: str, path: str) -> str | None:
        """A file's text at a ref, or None if there is no file there."""
        try:
            raw = self._call(f"reading {path} at {ref} of {self.repo.full_name}",
                             lambda: self._project.files.raw(file_path=path, ref=ref))
        except ForgeError as exc:
            if exc.status == 404:
                return None
            raise
        return bytes(raw).decode("utf-8")

    def git_auth_header(self) -> str:
        """`Authorization` value for git over HTTPS: GitLab takes a token as the password of `oauth2`."""
        return "Basic " + base64.b64encode(f"oauth2:{self._token}".encode()).decode("ascii")

    # -- plumbing ------------------------------------------------------------------------------

    def _pull(self, data: dict[str, Any]) -> PullRequest:
        state = data.get("state")
        return PullRequest(
            repo=self.repo,
            number=int(data["iid"]),
            head_sha=str(data.get("sha") or ""),
            head_ref=str(data["source_branch"]),
            base_ref=str(data["target_branch"]),
            author=str((data.get("author") or {}).get("username") or ""),
            is_fork=data.get("source_project_id") != data.get("target_project_id"),
            state="closed" if state in ("closed", "merged") else "open",
            merged=state == "merged",
            url=str(data.get("web_url") or ""),
        )

    def _graphql(self, action: str, query: str, variables: dict[str, Any]) -> dict[str, Any]:
        """The `data` of a GraphQL query (`POST /api/graphql`, the same token), retried like any read.

        GitLab answers a query it cannot run with 200 and a list of `errors`: a ForgeError here.
        """
        answer = self._call(action, lambda: self._gl.http_post(f"{self.url}/api/graphql",
                                                               post_data={"query": query, "variables": variables}))
        data = answer.get("data") if isinstance(answer, dict) else None
        errors = answer.get("errors") if isinstance(answer, dict) else None
        if errors or not isinstance(data, dict):
            messages = "; ".join(str(e.get("message")) if isinstance(e, dict) else str(e) for e in errors or [])
            raise ForgeError(f"GitLab GraphQL error while {action}: {_error_text(messages or 'no data')}", status=200)
        return data

    def _call(self, action: str, fn: Callable[[], T]) -> T:
        """`fn()` (python-gitlab calls) under the retry policy; failures become ForgeError, token scrubbed."""
        return self._retry.run(fn, self._transient, lambda exc: self._forge_error(exc, action), what=action,
                               chain=False)

    def _transient(self, exc: BaseException) -> Transient | None:
        """Whether a failure is worth another attempt, and what GitLab asked for."""
        if isinstance(exc, GitlabError):
            status = exc.response_code
            if status is None:
                return None
            headers = self._gl.answer_headers(status)
            retry_after = retry_after_seconds(header(headers, "Retry-After"))
            if status == 429:
                reset = reset_wait_seconds(header(headers, "RateLimit-Reset"))
                return Transient("429", retry_after if retry_after is not None else reset)
            if status in TRANSIENT_STATUSES:
                return Transient(str(status), retry_after, maybe_done=True)
            return None
        return transport_transient(exc)

    def _forge_error(self, exc: BaseException, action: str) -> ForgeError | None:
        """python-gitlab and transport failures as ForgeError, with the token scrubbed; None for others."""
        if isinstance(exc, GitlabError):
            message = _error_text(exc.error_message).replace(self._token, "***")
            status = exc.response_code
            return ForgeError(
                f"GitLab API error while {action}: {status or ''} {message}".replace("  ", " ").rstrip(), status
            )
        if isinstance(exc, requests.RequestException):
            return ForgeError(f"could not reach GitLab while {action}: {type(exc).__name__}")
        return None

    def commit_author_logins(self, sha: str) -> set[str]:
        """The username of the user GitLab ties the commit's author email to; empty if none.

        From GraphQL (the REST API names only emails). GitLab ties no user to a commit's
        committer in either API, so the committer adds nothing. An unknown commit, or a
        GitLab older than 17.10 (no `Repository.commit`), is a ForgeError.
        """
        action = f"reading commit {sha[:12]} of {self.repo.full_name}"
        project = self._graphql(action, COMMIT_AUTHOR_QUERY, {"project": self.repo.full_name, "ref": sha}).get("project")
        repository = project.get("repository") if isinstance(project, dict) else None
        commit = repository.get("commit") if isinstance(repository, dict) else None
        if not isinstance(commit, dict):  # GitLab answers null for what the token cannot see, too
            raise ForgeError(f"GitLab has no commit {sha[:12]} in {self.repo.full_name}", status=404)
        author = commit.get("author")
        return {str(author["username"])} if isinstance(author, dict) and author.get("username") else set()


def approved_sha(
    when: datetime | None, head: str, pushed_at: datetime | None, versions: list[tuple[str, datetime | None]]
) -> str:
    """The commit an approval given at `when` counts for (see `GitLabClient.reviews`)."""
    if when is None or pushed_at is None or not head:
        return ""
    if when > pushed_at:
        return head
    seen = [(created, sha) for sha, created in versions if created is not None and created <= when]
    if not seen:
        return ""
    sha = max(seen)[1]
    return sha if sha != head else ""  # the head was pushed again since: that approval is older than it


def _merge_status(data: dict[str, Any]) -> str:
    """`detailed_merge_status`; before GitLab 15.6, which sends only `merge_status`, what that says.

    `merge_status` is git's view alone: "cannot_be_merged" is a conflict, "can_be_merged"
    stays itself (it leaves approvals, threads and the pipeline open, so it is not
    "mergeable"), and the rest ("unchecked", "checking", "cannot_be_merged_recheck", …) are
    still being checked.
    """
    detailed = data.get("detailed_merge_status")
    if detailed:
        return str(detailed)
    legacy = str(data.get("merge_status"))
    if legacy == "cannot_be_merged":
        return "conflict"
    return legacy if legacy == "can_be_merged" else "unchecked"


def _active(member: dict[str, Any]) -> bool:
    """An active user whose membership is not waiting for approval."""
    return member.get("state", "active") == "active" and member.get("membership_state", "active") == "active"


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _iso(moment: datetime | None) -> str:
    if moment is None:
        return ""
    moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _error_text(message: Any) -> str:
    if isinstance(message, bytes):
        message = message.decode("utf-8", errors="replace")
    if not isinstance(message, str):
        message = json.dumps(message, sort_keys=True)
    return message[:300]


def _normalized(body: str) -> str:
    return body.replace("\r\n", "\n").strip()


def _forge_comment(note: dict[str, Any]) -> ForgeComment:
    """A note as GitLab's API reports it, as a ForgeComment (`created_at` as GitLab wrote it)."""
    return ForgeComment(
        id=int(note["id"]),
        author=str((note.get("author") or {}).get("username") or ""),
        body=str(note.get("body") or ""),
        created_at=str(note.get("created_at") or ""),
    )


def _quote(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


def lookup_gitlab_repo(url: str, token: str, full_name: str) -> Repo:
    """A project by path, as a Repo."""
    probe = Repo(forge="gitlab", full_name=full_name, clone_url="", default_branch="")
    return GitLabClient(url, token, probe).lookup_repo()


def gitlab_login_of(url: str, token: str) -> str:
    """Whose GitLab token this is (GET /user): how an approver proves who they are."""
    try:
        response = httpx.get(f"{url.rstrip('/')}/api/v4/user", headers={"PRIVATE-TOKEN": token}, timeout=15)
    except httpx.HTTPError as exc:
        raise ForgeError(f"could not reach GitLab at {url}: {type(exc).__name__}") from None
    if response.status_code != 200:
        raise ForgeError(f"GitLab did not accept the token: {response.status_code}", status=response.status_code)
    return str(response.json()["username"])


def check_gitlab_token(url: str, token: str) -> None:
    """Raise ForgeError unless GitLab accepts the bot's token (a readiness check)."""
    gitlab_login_of(url, token)
