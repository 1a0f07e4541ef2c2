"""The GitHub edge: App authentication and a `VCSClient` for one repository.

`GitHubApp` signs App JWTs with PyJWT and trades them for installation tokens,
cached per installation. `GitHubClient` makes the REST calls with PyGithub,
asking the app for a (cached, refreshed) token on every request. Both talk to
whatever `api_url` says: api.github.com, a GitHub Enterprise Server
(`https://HOST/api/v3`) or the local fake in `bot.sandbox.github_fake`.

Tokens and the private key never appear in a repr, a log line or an exception.

Retries. Every call goes through a `RetryPolicy` (constructor kwarg `retry`; the module's
`DEFAULT_RETRY` otherwise): exponential backoff with full jitter (0.5 s base, 30 s cap) inside a
60 s budget per call, and the forge's own word on when to come back wins over the backoff:
`Retry-After` (seconds or an HTTP date), or GitHub's `x-ratelimit-reset` when
`x-ratelimit-remaining` is 0, or a minute for a secondary rate limit that names no time (what
GitHub's documentation asks for). A wait the budget cannot hold ends the call at once.

What is retried: 500, 502, 503, 504; 429; a 403 that is a rate limit (primary or secondary);
connection failures and timeouts. Reads are repeated as they are, and so are status writes (a
repeated status only says the same again). Creating a comment is not idempotent: `post_once`
lists identical recent comments before posting, and after an answer that leaves open whether
GitHub made it (a 5xx, a timeout, a dropped connection) looks again and takes a new identical
one for ours instead of posting twice; after a rate limit or a refused connection, which GitHub
never carries out, it simply posts again. A call that runs out of budget raises `ForgeError`
with the last status. PyGithub's own retries are off, so no wait happens twice.
"""

from __future__ import annotations

import base64
import logging
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TypeVar

import github
import httpx
import jwt
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from github import Auth, GithubException
from github.IssueComment import IssueComment

from bot.forges.retry import (
    COMMENT_LOOKBACK,
    DEFAULT_RETRY,
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
API_VERSION = "2022-11-28"
JWT_LIFETIME = 9 * 60  # GitHub rejects App JWTs that live longer than 10 minutes
JWT_BACKDATE = 60  # allow for clock drift between us and GitHub
TOKEN_REFRESH_MARGIN = 5 * 60  # a token with less than this left is replaced before use
STATUS_DESCRIPTION_LIMIT = 140  # GitHub answers 422 to longer commit status descriptions

PERMISSIONS: tuple[Permission, ...] = ("none", "read", "triage", "write", "maintain", "admin")
MERGEABLE_STATES = frozenset({"clean", "unstable", "has_hooks"})
PASSING_CHECK_CONCLUSIONS = frozenset({"success", "neutral", "skipped"})  # what branch protection accepts
# A blocked pull request's GraphQL `reviewDecision` that blocks it, in the bot's words.
REVIEW_DECISION_REASONS = {
    "REVIEW_REQUIRED": "it lacks the approving reviews {base} requires",
    "CHANGES_REQUESTED": "a reviewer requested changes",
}
# Classic protection settings that can block a merge and that the bot does not check (see `mergeability`).
UNCHECKED_SETTINGS = {
    "required_signatures": "signed commits",
    "required_conversation_resolution": "resolved conversations",
    "lock_branch": "an unlocked branch",
}
# Ruleset rules that govern pushes to the branch or how it is merged, never whether a pull request may be.
MERGE_NEUTRAL_RULES = frozenset({"creation", "deletion", "non_fast_forward", "required_linear_history"})
REVIEW_DECISION_QUERY = """
query($owner: String!, $name: String!, $number: Int!) {
  repository(owner: $owner, name: $name) { pullRequest(number: $number) { reviewDecision } }
}
"""
PULL_COMMITS_LISTED = 250  # GitHub lists no more commits of a pull request than this
WEB_FLOW = "web-flow"  # the account GitHub commits as itself: web edits, merges of the base branch
GHOST = "ghost"  # who GitHub shows for a deleted account

log = logging.getLogger("deploybot.forge")
T = TypeVar("T")

SECONDARY_RATE_LIMIT_WAIT = 60.0  # GitHub: "wait at least one minute" when a secondary limit names no time


def github_transient(status: int, headers: Mapping[str, str] | None, message: str) -> Transient | None:
    """Whether GitHub's answer `status` asks for another try, and when."""
    retry_after = retry_after_seconds(header(headers, "retry-after"))
    if header(headers, "x-ratelimit-remaining") == "0":
        reset = reset_wait_seconds(header(headers, "x-ratelimit-reset"))
    else:
        reset = None
    if status in TRANSIENT_STATUSES:
        return Transient(str(status), retry_after, maybe_done=True)
    if status == 429:
        return Transient("429", retry_after if retry_after is not None else reset)
    if status == 403:
        if retry_after is not None:
            return Transient("403 rate limit", retry_after)
        if reset is not None:
            return Transient("403 primary rate limit", reset)
        if "secondary rate limit" in message.lower() or "abuse detection" in message.lower():
            return Transient("403 secondary rate limit", SECONDARY_RATE_LIMIT_WAIT)
    return None


@dataclass(frozen=True)
class _Token:
    value: str
    expires_at: float  # unix time


class GitHubApp:
    """A GitHub App: signs JWTs and hands out installation tokens, cached per installation."""

    def __init__(
        self,
        api_url: str,
        app_id: int,
        private_key: str,
        *,
        timeout: float = 15.0,
        write_interval: float = 0.0,
        clock: Callable[[], float] = time.time,
        retry: RetryPolicy | None = None,
    ) -> None:
        if not api_url.startswith(("http://", "https://")):
            raise ValueError(f"github api_url must be an http(s) URL, got {api_url!r}")
        if not isinstance(app_id, int) or app_id <= 0:
            raise ValueError("github app_id must be a positive integer")
        try:
            key = serialization.load_pem_private_key(private_key.encode(), password=None)
        except (ValueError, TypeError):
            # The key itself must not end up in the message.
            raise ValueError("github private key is not an unencrypted PEM private key") from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError("github private key must be an RSA key (GitHub signs App JWTs with RS256)")
        self.api_url = api_url.rstrip("/")
        self.app_id = app_id
        self.write_interval = write_interval
        self.retry = retry if retry is not None else DEFAULT_RETRY  # also what its clients get
        self._private_key = key
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens: dict[int, _Token] = {}
        self._http = httpx.Client(
            timeout=timeout,
            headers={
                "Accept": "application/vnd.github+json",
                "User-Agent": USER_AGENT,
                "X-GitHub-Api-Version": API_VERSION,
            },
        )

    def __repr__(self) -> str:
        return f"GitHubApp(api_url={self.api_url!r}, app_id={self.app_id})"

    def jwt(self) -> str:
        """A freshly signed App JWT (RS256), good for nine minutes."""
        now = int(self._clock())
        claims = {"iat": now - JWT_BACKDATE, "exp": now + JWT_LIFETIME, "iss": str(self.app_id)}
        return jwt.encode(claims, self._private_key, algorithm="RS256")

    def installation_token(self, installation_id: int) -> str:
        """A token for the installation, reused until it has under five minutes left."""
        with self._lock:  # one refresh at a time; worker threads wait for it instead of racing
            cached = self._tokens.get(installation_id)
            if cached is not None and cached.expires_at - self._clock() > TOKEN_REFRESH_MARGIN:
                return cached.value
            token = self._fetch_token(installation_id)
            self._tokens[installation_id] = token
            return token.value

    def client(self, repo: Repo) -> GitHubClient:
        """A client for one repository, authenticated as the installation that sent its events."""
        if repo.installation_id is None:
            # Not an outage: the payload named no installation, and asking again will not change that.
            raise ForgeError(f"repository {repo.full_name} has no GitHub App installation id", status=400)
        installation_id = repo.installation_id
        return GitHubClient(
            self.api_url, repo, lambda: self.installation_token(installation_id), write_interval=self.write_interval,
            retry=self.retry,
        )

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._http.close()

    def lookup_repo(self, full_name: str) -> Repo:
        """A repository the App is installed on, by name: for runs no webhook announced."""
        path = "/".join(_quote(part) for part in full_name.split("/"))
        installation = self._app_get(f"/repos/{path}/installation")
        try:
            installation_id = int(installation["id"])
        except (KeyError, TypeError, ValueError):
            raise ForgeError("GitHub answered the installation lookup with an unexpected body") from None
        token = self.installation_token(installation_id)
        failure = f"GitHub has no repository {full_name}"
        response = self._send("GET", f"/repos/{path}", lambda: f"token {token}", failure)
        if response.status_code != 200:
            raise ForgeError(f"{failure}: {response.status_code} {_error_message(response)}",
                             status=response.status_code)
        data = response.json()
        return Repo(forge="github", full_name=data["full_name"], clone_url=data["clone_url"],
                    default_branch=data["default_branch"], installation_id=installation_id, id=int(data["id"]))

    def check(self) -> None:
        """Raise ForgeError unless GitHub accepts the App's JWT (a readiness check: one attempt, no retries)."""
        self._app_get("/app", once=True)

    def _app_get(self, path: str, once: bool = False) -> dict:
        """A GET authenticated as the App itself (JWT)."""
        response = self._send("GET", path, lambda: f"Bearer {self.jwt()}", f"GitHub answered {path}", once=once)
        if response.status_code != 200:
            raise ForgeError(f"GitHub answered {path}: {response.status_code} {_error_message(response)}",
                             status=response.status_code)
        return response.json()

    def _fetch_token(self, installation_id: int) -> _Token:
        path = f"/app/installations/{int(installation_id)}/access_tokens"
        failure = f"GitHub refused a token for installation {installation_id}"
        # Safe to repeat: each call only hands out one more token; a fresh JWT signs every attempt.
        response = self._send("POST", path, lambda: f"Bearer {self.jwt()}", failure)
        if response.status_code != 201:
            raise ForgeError(f"{failure}: {response.status_code} {_error_message(response)}",
                             status=response.status_code)
        try:
            data = response.json()
            expires_at = datetime.fromisoformat(data["expires_at"]).timestamp()
            return _Token(value=str(data["token"]), expires_at=expires_at)
        except (ValueError, KeyError, TypeError):
            raise ForgeError("GitHub answered the installation token request with an unexpected body") from None

    def _send(
        self, method: str, path: str, authorization: Callable[[], str], failure: str, once: bool = False
    ) -> httpx.Response:
        """One API call, retried under `self.retry` (`once`: a single attempt, whatever it answers).

        Returns the answer unless it is a transient failure the budget could not outlast (then
        ForgeError "`failure`: status message"); `authorization` is asked again for every attempt.
        """
        url = f"{self.api_url}{path}"

        def attempt() -> httpx.Response:
            response = self._http.request(method, url, headers={"Authorization": authorization()})
            transient = github_transient(response.status_code, response.headers, _error_message(response))
            if transient is not None:
                raise _TransientAnswer(response, transient)
            return response

        def convert(exc: BaseException) -> ForgeError | None:
            if isinstance(exc, _TransientAnswer):
                status = exc.response.status_code
                return ForgeError(f"{failure}: {status} {_error_message(exc.response)}".rstrip(), status)
            if isinstance(exc, httpx.HTTPError):
                return ForgeError(f"could not reach GitHub at {self.api_url}: {type(exc).__name__}")
            return None

        if once:
            try:
                return attempt()
            except _TransientAnswer as exc:
                return exc.response
            except httpx.HTTPError as exc:
                raise ForgeError(f"could not reach GitHub at {self.api_url}: {type(exc).__name__}") from None
        return self.retry.run(attempt, _transient_of, convert, what=f"GitHub {method} {path}", chain=False)


class _TransientAnswer(Exception):
    """An answer of the forge that asks for another attempt (raised inside a retry loop only)."""

    def __init__(self, response: httpx.Response, transient: Transient) -> None:
        super().__init__(transient.reason)
        self.response = response
        self.transient = transient


def _transient_of(exc: BaseException) -> Transient | None:
    if isinstance(exc, _TransientAnswer):
        return exc.transient
    return transport_transient(exc)


class _InstallationAuth(Auth.Auth):
    """PyGithub auth that asks for the current installation token on every request."""

    def __init__(self, token: Callable[[], str]) -> None:
        self._token = token

    @property
    def token_type(self) -> str:
        return "token"

    @property
    def token(self) -> str:
        return self._token()

    @property
    def _masked_token(self) -> str:  # what PyGithub's debug log shows instead of the header
        return "token (installation token removed)"


class GitHubClient:
    """`VCSClient` for one GitHub repository, over PyGithub."""

    comment_limit = 65_536

    def __init__(
        self,
        api_url: str,
        repo: Repo,
        token: Callable[[], str],
        *,
        timeout: int = 15,
        write_interval: float = 0.0,
        mergeable_retries: int = 4,
        mergeable_retry_delay: float = 1.0,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.repo = repo
        self._token = token
        self._mergeable_retries = mergeable_retries
        self._mergeable_retry_delay = mergeable_retry_delay
        self._retry = retry if retry is not None else DEFAULT_RETRY
        self._gh = github.Github(
            base_url=api_url.rstrip("/"),
            auth=_InstallationAuth(token),
            user_agent=USER_AGENT,
            timeout=timeout,
            per_page=100,
            # No retries inside PyGithub (urllib3): `_call` retries whole calls under one budget,
            # honours the rate-limit headers itself and knows which writes may be repeated.
            retry=None,
            # PyGithub spaces every request by default. The bot's few writes per job stay far below
            # GitHub's secondary rate limits, and a 403 with Retry-After is retried by `_call`;
            # write_interval (seconds between writes) is there for installations that need more care.
            seconds_between_requests=None,
            seconds_between_writes=write_interval or None,
            lazy=True,  # build objects from URLs without fetching them first: one request per call
        )
        self._repo = self._gh.get_repo(repo.full_name)

    def __repr__(self) -> str:
        return f"GitHubClient(repo={self.repo.full_name!r})"

    def close(self) -> None:
        """Close the HTTP connections."""
        self._gh.close()

    def get_pull_request(self, number: int) -> PullRequest:
        """The pull request as GitHub sees it now."""

        def fetch() -> PullRequest:
            pr = self._repo.get_pull(number)
            head_repo = pr.head.repo  # None when the fork was deleted
            return PullRequest(
                # The default branch as GitHub has it now (apply on merge trusts merges into it),
                # not as the webhook that made this client said.
                repo=replace(self.repo, default_branch=pr.base.repo.default_branch or self.repo.default_branch),
                number=pr.number,
                head_sha=pr.head.sha,
                head_ref=pr.head.ref,
                base_ref=pr.base.ref,
                author=pr.user.login,
                is_fork=head_repo is None or head_repo.full_name != pr.base.repo.full_name,
                state="closed" if pr.state == "closed" else "open",
                merged=bool(pr.merged),
                url=pr.html_url,
            )

        return self._call(f"fetching pull request #{number} of {self.repo.full_name}", fetch)

    def changed_files(self, number: int) -> list[str]:
        """Every path the pull request touches; a rename counts on both sides."""

        def fetch() -> list[str]:
            paths: dict[str, None] = {}  # ordered set
            for changed in self._repo.get_pull(number).get_files():
                paths[changed.filename] = None
                if changed.previous_filename:
                    paths[changed.previous_filename] = None
            return list(paths)

        return self._call(f"listing files of pull request #{number} of {self.repo.full_name}", fetch)

    def create_comment(self, number: int, body: str) -> ForgeComment:
        """Post a comment on the pull request's conversation; return it as GitHub recorded it.

        Posted at most once across retries (see `post_once`): identical comments of the last
        few minutes are listed first, and after an answer that leaves open whether GitHub made
        the comment, a new identical one is taken for ours instead of posting again.
        """
        since = datetime.fromtimestamp(max(time.time() - COMMENT_LOOKBACK, 0), UTC)

        def identical() -> list[ForgeComment]:
            wanted = _normalized(body)
            return [_forge_comment(c) for c in self._repo.get_issue(number).get_comments(since=since)
                    if _normalized(c.body or "") == wanted]

        what = f"commenting on pull request #{number} of {self.repo.full_name}"
        return self._call(what, post_once(lambda: _forge_comment(self._repo.get_issue(number).create_comment(body)),
                                          identical, _github_exception_transient, what))

    def find_comment(self, number: int, text: str) -> ForgeComment | None:
        """The oldest comment of the pull request whose body contains `text` (every page is read)."""

        def fetch() -> ForgeComment | None:
            found = next((c for c in self._repo.get_issue(number).get_comments() if text in (c.body or "")), None)
            return _forge_comment(found) if found is not None else None

        return self._call(f"looking for a comment on pull request #{number} of {self.repo.full_name}", fetch)

    def get_comment(self, number: int, comment_id: int) -> ForgeComment | None:
        """A comment on the pull request's conversation as GitHub has it now; None if there is none by that id.

        `GET /issues/comments/{id}` finds a comment on any issue or pull request of the
        repository, so one whose `issue_url` names another is not this pull request's.
        """
        try:
            data = self._call(f"reading comment {comment_id} of pull request #{number} of {self.repo.full_name}",
                              lambda: self._request("GET", f"/issues/comments/{int(comment_id)}"))
        except ForgeError as exc:
            if exc.status == 404:
                return None
            raise
        if not str(data.get("issue_url") or "").endswith(f"/issues/{int(number)}"):
            return None
        user = data.get("user")
        return ForgeComment(
            id=int(data["id"]),
            author=str(user["login"]) if isinstance(user, dict) else GHOST,
            body=str(data.get("body") or ""),
            created_at=str(data.get("created_at") or ""),
        )

    def commit_people(self, number: int) -> set[str]:
        """Logins of everyone who authored or committed a commit of the pull request.

        From `GET /pulls/{number}/commits`: each commit's `author` and `committer` account.
        GitHub gives none (null) when a commit's email belongs to no account, and names
        `web-flow` for commits GitHub made itself (web edits, "Update branch"): neither is a
        person. GitHub lists at most 250 commits of a pull request; for a longer one this
        raises ForgeError rather than answer with people missing.
        """

        def fetch() -> set[str]:
            pr = self._repo.get_pull(number)
            commits = list(pr.get_commits())
            # `pr.commits` costs a request (the pull is fetched lazily): asked only when the list may be cut short.
            if len(commits) >= PULL_COMMITS_LISTED and pr.commits > len(commits):
                raise ForgeError(f"pull request #{number} of {self.repo.full_name} has {pr.commits} commits, "
                                 f"more than the {len(commits)} GitHub lists", status=422)
            people: set[str] = set()
            for commit in commits:
                for account in (commit.author, commit.committer):
                    if account is not None and account.login != WEB_FLOW:
                        people.add(account.login)
            return people

        return self._call(f"listing commits of pull request #{number} of {self.repo.full_name}", fetch)

    def set_status(self, sha: str, context: str, state: StatusState, description: str, target_url: str = "") -> None:
        """Set a commit status; the description is cut to GitHub's 140 characters.

        Repeating it is harmless (the newest status of a context is the one that counts), so
        every transient failure is retried.
        """
        if len(description) > STATUS_DESCRIPTION_LIMIT:
            description = description[: STATUS_DESCRIPTION_LIMIT - 1] + "…"
        payload = {"state": state, "context": context, "description": description}
        if target_url:
            payload["target_url"] = target_url
        # Commit.create_status would first fetch the commit just to learn the SHA we already have.
        self._call(f"setting status {context!r} on {sha[:12]} of {self.repo.full_name}",
                   lambda: self._request("POST", f"/statuses/{_quote(sha)}", payload))

    def reviews(self, number: int) -> list[Review]:
        """Every review of the pull request, oldest first (GitHub lists them in order)."""

        def fetch() -> list[Review]:
            return [
                Review(
                    user=review.user.login if review.user else GHOST,
                    state=review.state,
                    commit_sha=review.commit_id,
                    submitted_at=_iso(review.submitted_at),
                )
                for review in self._repo.get_pull(number).get_reviews()
            ]

        return self._call(f"listing reviews of pull request #{number} of {self.repo.full_name}", fetch)

    def permission(self, user: str) -> Permission:
        """The user's role on the repository; "none" when GitHub does not know them."""
        try:
            # One request for both fields: `permission` folds maintain into write and
            # triage into read, `role_name` does not (but may name a custom role).
            data = self._call(f"reading {user}'s permission on {self.repo.full_name}",
                              lambda: self._request("GET", f"/collaborators/{_quote(user)}/permission"))
        except ForgeError as exc:
            if exc.status == 404:
                return "none"
            raise
        for field in ("role_name", "permission"):
            value = data.get(field)
            if value in PERMISSIONS:
                return value
        return "none"

    def is_team_member(self, user: str, team: str) -> bool:
        """Whether the user is an active member of `org/team-slug`."""
        org, slash, slug = team.partition("/")
        if not slash or not org or not slug:
            raise ValueError(f"team must be 'org/team-slug', got {team!r}")

        def fetch() -> bool:
            membership = self._gh.get_organization(org).get_team_by_slug(slug).get_team_membership(user)
            return membership.state == "active"

        try:
            return self._call(f"reading {user}'s membership of {team}", fetch)
        except ForgeError as exc:
            if exc.status == 404:
                return False
            raise

    def mergeability(self, pull: PullRequest, ignore_contexts: frozenset[str]) -> Mergeability:
        """Whether GitHub would merge the PR, not counting the given status contexts (the bot's own).

        From the pull request's `mergeable` and `mergeable_state`, asked again (`mergeable_retries`
        times in all) while GitHub is still computing them:

        - `clean`, `unstable` (only checks that are not required fail), `has_hooks`: mergeable.
        - still null / `unknown` after the retries: not, GitHub has not computed it.
        - `dirty` (`mergeable` false): not, it conflicts with the base branch.
        - `draft`: not. `behind`: not, the base branch wants it up to date first.
        - `blocked`: the base branch's protection or rulesets are not met: required checks,
          required or CODEOWNERS reviews, or another rule. See `_blocked`: mergeable only when
          the one thing missing is a required status in `ignore_contexts`, which would
          otherwise keep a branch that requires `deploybot/apply` from ever being applied.
        - any other state: not, naming it.
        """

        def fetch() -> Mergeability:
            pr = self._repo.get_pull(pull.number)
            for _ in range(self._mergeable_retries - 1):
                if pr.mergeable is not None and pr.mergeable_state != "unknown":
                    break
                # GitHub computes mergeability in the background after a push; asking starts it.
                time.sleep(self._mergeable_retry_delay)
                pr = self._repo.get_pull(pull.number)
            state, base = pr.mergeable_state, pr.base.ref
            if pr.mergeable is None or state == "unknown":
                return Mergeability(False, "GitHub has not computed mergeability yet")
            if pr.mergeable is False or state == "dirty":
                return Mergeability(False, f"it has conflicts with {base}")
            if pr.draft or state == "draft":
                return Mergeability(False, "it is a draft")
            if state in MERGEABLE_STATES:
                return Mergeability(True)
            if state == "behind":
                return Mergeability(False, f"it is behind {base}, which requires it to be up to date")
            if state == "blocked":
                return self._blocked(pr.number, base, pr.head.sha, ignore_contexts)
            return Mergeability(False, f"GitHub reports mergeable state {state!r}")

        return self._call(f"checking mergeability of pull request #{pull.number} of {self.repo.full_name}", fetch)

    def is_behind_base(self, pull: PullRequest) -> bool:
        """Whether the base branch has commits the PR head does not contain."""
        return self._call(f"comparing {pull.base_ref} with {pull.head_sha[:12]} on {self.repo.full_name}",
                          lambda: self._repo.compare(pull.base_ref, pull.head_sha).behind_by > 0)

    def commit_sha(self, ref: str) -> str | None:
        """The commit a branch, tag, ref or SHA names in this repository, or None."""
        try:
            # Not PyGithub's get_commit: with lazy objects it would echo the ref back unresolved.
            data = self._call(
                f"resolving {ref} in {self.repo.full_name}",
                lambda: self._request("GET", f"/commits/{_quote(ref.removeprefix('refs/heads/'))}"),
            )
        except ForgeError as exc:
            if exc.status in (404, 422):
                return None
            raise
        sha = data.get("sha") if isinstance(data, dict) else None
        # Anything but a full SHA (an odd ref can land on another endpoint) names no commit.
        return sha if isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{40}", sha) else None

    def is_on_default_branch(self, sha: str) -> bool:
        """Whether the commit is (an ancestor of) the head of the default branch."""
        status = self._call(f"comparing {sha[:12]} with {self.repo.default_branch} on {self.repo.full_name}",
                            lambda: self._repo.compare(sha, self.repo.default_branch).status)
        return status in ("identical", "ahead")

    def read_file(self, ref: str, path: str) -> str | None:
        """A file's text at a ref, or None if there is no file there."""

        def fetch() -> str | None:
            content = self._repo.get_contents(path, ref=ref)
            if isinstance(content, list) or content.type != "file":
                return None
            if content.encoding != "base64":  # files over 1 MB come back without content
                raise ForgeError(f"{path} at {ref} is too large for the contents API")
            return content.decoded_content.decode("utf-8")

        try:
            return self._call(f"reading {path} at {ref} of {self.repo.full_name}", fetch)
        except ForgeError as exc:
            if exc.status == 404:
                return None
            raise

    def git_auth_header(self) -> str:
        """`Authorization` value for git over HTTPS: GitHub takes the token as basic-auth password."""
        credentials = f"x-access-token:{self._token()}".encode()
        return "Basic " + base64.b64encode(credentials).decode("ascii")

    def _blocked(self, number: int, base: str, sha: str, ignore: frozenset[str]) -> Mergeability:
        """Decide a `blocked` pull request: mergeable only if all GitHub waits for is an ignored status.

        Deny by default: `blocked` counts as mergeable only when the bot sees that
        1. every required status check (classic protection and rulesets) not in `ignore` succeeded,
        2. the GraphQL `reviewDecision` is APPROVED or null (no review required): GitHub's own
           verdict on required approvals, CODEOWNERS, changes requested and stale approvals,
           which the bot could not work out from the reviews alone,
        3. nothing else that can block a merge is required: signed commits, resolved
           conversations, a locked branch, or a ruleset rule other than `pull_request`,
           `required_status_checks` and those that govern pushes only, and
        4. a required status in `ignore` has not succeeded yet, so it explains the block.
        Otherwise GitHub blocks for something the bot cannot see, and it is not mergeable.
        A required check pinned to one App (`app_id`) counts whoever reported it.
        """
        protection = self._classic_protection(base)
        rules = self._branch_rules(base)
        classic_checks = protection.get("required_status_checks") or {}
        required = set(classic_checks.get("contexts") or [])
        required.update(c["context"] for c in classic_checks.get("checks") or [])
        for rule in rules:
            if rule.get("type") == "required_status_checks":
                parameters = rule.get("parameters") or {}
                required.update(c["context"] for c in parameters.get("required_status_checks") or [])
        results = self._check_results(sha)
        for context in sorted(required - ignore):
            state = results.get(context)
            if state is None:
                return Mergeability(False, f"required status check {context!r} has not been reported")
            if state != "success":
                return Mergeability(False, f"required status check {context!r} is {state}")
        decision = self._review_decision(number)
        if decision in REVIEW_DECISION_REASONS:
            return Mergeability(False, REVIEW_DECISION_REASONS[decision].format(base=base))
        unchecked = [words for setting, words in UNCHECKED_SETTINGS.items()
                     if (protection.get(setting) or {}).get("enabled")]
        for rule in rules:
            kind, parameters = rule.get("type"), rule.get("parameters") or {}
            if kind == "pull_request" and parameters.get("required_review_thread_resolution"):
                unchecked.append("resolved conversations")
            elif kind not in MERGE_NEUTRAL_RULES | {"pull_request", "required_status_checks"}:
                unchecked.append(f"the ruleset rule {kind!r}")
        if unchecked:
            return Mergeability(False, f"it is blocked by {base}'s protection, which also requires "
                                       f"{', '.join(sorted(set(unchecked)))} (the bot cannot check those)")
        if not any(results.get(context) != "success" for context in required & ignore):
            return Mergeability(False, f"it is blocked by {base}'s protection (missing required reviews or checks)")
        return Mergeability(True)

    def _classic_protection(self, branch: str) -> dict:
        """The branch's classic protection; {} for a branch without (GitHub: 404 "Branch not protected")."""
        try:
            return self._request("GET", f"/branches/{_quote(branch)}/protection")
        except GithubException as exc:
            if exc.status == 404 and _github_message(exc) == "Branch not protected":
                return {}
            raise

    def _branch_rules(self, branch: str) -> list[dict]:
        """The active ruleset rules for the branch, from every level (repository, organization)."""
        url = f"{self._repo.url}/rules/branches/{_quote(branch)}"
        rules: list[dict] = []
        page = 1
        while True:
            _, batch = self._gh.requester.requestJsonAndCheck("GET", url, parameters={"per_page": 100, "page": page})
            rules.extend(batch)
            if len(batch) < 100:  # a short page is the last
                return rules
            page += 1

    def _check_results(self, sha: str) -> dict[str, str]:
        """Each status context and check run of the commit: "success", or what else it is."""
        results = {s.context: s.state for s in self._repo.get_commit(sha).get_combined_status().statuses}
        # GitHub Actions and other Apps report check runs, not statuses; both satisfy a required context.
        for run in self._repo.get_commit(sha).get_check_runs():
            if run.status != "completed":
                results.setdefault(run.name, "pending")
            elif run.conclusion in PASSING_CHECK_CONCLUSIONS:
                results[run.name] = "success"
            else:
                results.setdefault(run.name, run.conclusion or "failure")
        return results

    def _review_decision(self, number: int) -> str | None:
        """The pull request's GraphQL `reviewDecision`: APPROVED, CHANGES_REQUESTED, REVIEW_REQUIRED or None."""
        owner, name = self.repo.full_name.split("/", 1)
        _, data = self._gh.requester.graphql_query(REVIEW_DECISION_QUERY,
                                                  {"owner": owner, "name": name, "number": number})
        return data["data"]["repository"]["pullRequest"]["reviewDecision"]

    def _request(self, verb: str, path: str, payload: dict | None = None) -> dict:
        """A JSON call below the repository URL, for endpoints PyGithub has no direct method for."""
        _, data = self._gh.requester.requestJsonAndCheck(verb, f"{self._repo.url}{path}", input=payload)
        return data or {}

    def _call(self, action: str, fn: Callable[[], T]) -> T:
        """`fn()` (PyGithub calls) under the retry policy; failures become ForgeError without credentials."""
        return self._retry.run(fn, _github_exception_transient, lambda exc: _forge_error(exc, action),
                               what=action)

    def commit_author_logins(self, sha: str) -> set[str]:
        """Logins of the commit's author and committer: `GET /commits/{sha}`'s `author` and `committer`.

        As in `commit_people`: GitHub gives null for an email of no account, and `web-flow`
        for commits it made itself (web edits, merges); neither is a person.
        """
        data = self._call(f"reading commit {sha[:12]} of {self.repo.full_name}",
                          lambda: self._request("GET", f"/commits/{_quote(sha)}"))
        accounts = (data.get("author"), data.get("committer"))
        return {str(account["login"]) for account in accounts
                if isinstance(account, dict) and account.get("login") and account["login"] != WEB_FLOW}


def _github_exception_transient(exc: BaseException) -> Transient | None:
    if isinstance(exc, GithubException):
        return github_transient(exc.status, exc.headers, _github_message(exc))
    return transport_transient(exc)


def _github_message(exc: GithubException) -> str:
    return str(exc.data.get("message", "")) if isinstance(exc.data, dict) else ""


def _forge_error(exc: BaseException, action: str) -> ForgeError | None:
    """PyGithub and transport failures as ForgeError, with a message free of credentials; None for others."""
    if isinstance(exc, GithubException):
        return ForgeError(f"GitHub API error while {action}: {exc.status} {_github_message(exc)}".rstrip(), exc.status)
    if isinstance(exc, (requests.RequestException, httpx.HTTPError)):
        return ForgeError(f"could not reach GitHub while {action}: {type(exc).__name__}")
    return None


def _normalized(body: str) -> str:
    return body.replace("\r\n", "\n").strip()


def _forge_comment(comment: IssueComment) -> ForgeComment:
    """A PyGithub issue comment as a ForgeComment.

    GitHub's timestamps are whole seconds in UTC ("2011-04-14T16:00:49Z"), so `_iso` of the
    datetime PyGithub parsed is the API's own string (its `raw_data` would fetch listed comments again).
    """
    return ForgeComment(
        id=comment.id,
        author=comment.user.login if comment.user else GHOST,
        body=comment.body or "",
        created_at=_iso(comment.created_at),
    )


def _error_message(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return ""
    return str(data.get("message", "")) if isinstance(data, dict) else ""


def _quote(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


def _iso(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ") if moment else ""


def github_login_of(api_url: str, token: str) -> str:
    """Whose GitHub token this is (GET /user): how an approver proves who they are."""
    try:
        response = httpx.get(f"{api_url.rstrip('/')}/user", headers={"Authorization": f"token {token}"}, timeout=15)
    except httpx.HTTPError as exc:
        raise ForgeError(f"could not reach GitHub at {api_url}: {type(exc).__name__}") from None
    if response.status_code != 200:
        raise ForgeError(f"GitHub did not accept the token: {response.status_code}", status=response.status_code)
    return str(response.json()["login"])
