"""The GitHub edge: App authentication and a `VCSClient` for one repository.

`GitHubApp` signs App JWTs with PyJWT and trades them for installation tokens,
cached per installation. `GitHubClient` makes the REST calls with PyGithub,
asking the app for a (cached, refreshed) token on every request. Both talk to
whatever `api_url` says: api.github.com, a GitHub Enterprise Server
(`https://HOST/api/v3`) or the local fake in `bot.github_fake`.

Tokens and the private key never appear in a repr, a log line or an exception.
"""

from __future__ import annotations

import base64
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime

import github
import httpx
import jwt
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from github import Auth, GithubException, UnknownObjectException
from github.GithubRetry import GithubRetry

from bot.models import Mergeability, PullRequest, Repo, Review
from bot.vcs import ForgeError, Permission, StatusState

USER_AGENT = "deploybot"
API_VERSION = "2022-11-28"
JWT_LIFETIME = 9 * 60  # GitHub rejects App JWTs that live longer than 10 minutes
JWT_BACKDATE = 60  # allow for clock drift between us and GitHub
TOKEN_REFRESH_MARGIN = 5 * 60  # a token with less than this left is replaced before use
STATUS_DESCRIPTION_LIMIT = 140  # GitHub answers 422 to longer commit status descriptions

PERMISSIONS: tuple[Permission, ...] = ("none", "read", "triage", "write", "maintain", "admin")
MERGEABLE_STATES = frozenset({"clean", "unstable", "has_hooks"})
PASSING_CHECK_CONCLUSIONS = frozenset({"success", "neutral", "skipped"})  # what branch protection accepts


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
            raise ForgeError(f"repository {repo.full_name} has no GitHub App installation id")
        installation_id = repo.installation_id
        return GitHubClient(
            self.api_url, repo, lambda: self.installation_token(installation_id), write_interval=self.write_interval
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
        try:
            response = self._http.get(f"{self.api_url}/repos/{path}", headers={"Authorization": f"token {token}"})
        except httpx.HTTPError as exc:
            raise ForgeError(f"could not reach GitHub at {self.api_url}: {type(exc).__name__}") from None
        if response.status_code != 200:
            raise ForgeError(f"GitHub has no repository {full_name}: {response.status_code} "
                             f"{_error_message(response)}", status=response.status_code)
        data = response.json()
        return Repo(forge="github", full_name=data["full_name"], clone_url=data["clone_url"],
                    default_branch=data["default_branch"], installation_id=installation_id)

    def check(self) -> None:
        """Raise ForgeError unless GitHub accepts the App's JWT (a readiness check)."""
        self._app_get("/app")

    def _app_get(self, path: str) -> dict:
        """A GET authenticated as the App itself (JWT)."""
        try:
            response = self._http.get(f"{self.api_url}{path}", headers={"Authorization": f"Bearer {self.jwt()}"})
        except httpx.HTTPError as exc:
            raise ForgeError(f"could not reach GitHub at {self.api_url}: {type(exc).__name__}") from None
        if response.status_code != 200:
            raise ForgeError(f"GitHub answered {path}: {response.status_code} {_error_message(response)}",
                             status=response.status_code)
        return response.json()

    def _fetch_token(self, installation_id: int) -> _Token:
        url = f"{self.api_url}/app/installations/{int(installation_id)}/access_tokens"
        try:
            response = self._http.post(url, headers={"Authorization": f"Bearer {self.jwt()}"})
        except httpx.HTTPError as exc:
            raise ForgeError(f"could not reach GitHub at {self.api_url}: {type(exc).__name__}") from None
        if response.status_code != 201:
            raise ForgeError(
                f"GitHub refused a token for installation {installation_id}: "
                f"{response.status_code} {_error_message(response)}",
                status=response.status_code,
            )
        try:
            data = response.json()
            expires_at = datetime.fromisoformat(data["expires_at"]).timestamp()
            return _Token(value=str(data["token"]), expires_at=expires_at)
        except (ValueError, KeyError, TypeError):
            raise ForgeError("GitHub answered the installation token request with an unexpected body") from None


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
    ) -> None:
        self.repo = repo
        self._token = token
        self._mergeable_retries = mergeable_retries
        self._mergeable_retry_delay = mergeable_retry_delay
        self._gh = github.Github(
            base_url=api_url.rstrip("/"),
            auth=_InstallationAuth(token),
            user_agent=USER_AGENT,
            timeout=timeout,
            per_page=100,
            retry=GithubRetry(total=3),
            # PyGithub spaces every request by default. The bot's few writes per job stay far below
            # GitHub's secondary rate limits, and a 403 with Retry-After is retried by GithubRetry;
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
        with _api(f"fetching pull request #{number} of {self.repo.full_name}"):
            pr = self._repo.get_pull(number)
            head_repo = pr.head.repo  # None when the fork was deleted
            return PullRequest(
                repo=self.repo,
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

    def changed_files(self, number: int) -> list[str]:
        """Every path the pull request touches; a rename counts on both sides."""
        paths: dict[str, None] = {}  # ordered set
        with _api(f"listing files of pull request #{number} of {self.repo.full_name}"):
            for changed in self._repo.get_pull(number).get_files():
                paths[changed.filename] = None
                if changed.previous_filename:
                    paths[changed.previous_filename] = None
        return list(paths)

    def create_comment(self, number: int, body: str) -> int:
        """Post a comment on the pull request's conversation; return its id."""
        with _api(f"commenting on pull request #{number} of {self.repo.full_name}"):
            return self._repo.get_issue(number).create_comment(body).id

    def set_status(self, sha: str, context: str, state: StatusState, description: str, target_url: str = "") -> None:
        """Set a commit status; the description is cut to GitHub's 140 characters."""
        if len(description) > STATUS_DESCRIPTION_LIMIT:
            description = description[: STATUS_DESCRIPTION_LIMIT - 1] + "…"
        payload = {"state": state, "context": context, "description": description}
        if target_url:
            payload["target_url"] = target_url
        # Commit.create_status would first fetch the commit just to learn the SHA we already have.
        with _api(f"setting status {context!r} on {sha[:12]} of {self.repo.full_name}"):
            self._request("POST", f"/statuses/{_quote(sha)}", payload)

    def reviews(self, number: int) -> list[Review]:
        """Every review of the pull request, oldest first (GitHub lists them in order)."""
        with _api(f"listing reviews of pull request #{number} of {self.repo.full_name}"):
            return [
                Review(
                    user=review.user.login if review.user else "ghost",
                    state=review.state,
                    commit_sha=review.commit_id,
                    submitted_at=_iso(review.submitted_at),
                )
                for review in self._repo.get_pull(number).get_reviews()
            ]

    def permission(self, user: str) -> Permission:
        """The user's role on the repository; "none" when GitHub does not know them."""
        try:
            with _api(f"reading {user}'s permission on {self.repo.full_name}"):
                # One request for both fields: `permission` folds maintain into write and
                # triage into read, `role_name` does not (but may name a custom role).
                data = self._request("GET", f"/collaborators/{_quote(user)}/permission")
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
        try:
            with _api(f"reading {user}'s membership of {team}"):
                membership = self._gh.get_organization(org).get_team_by_slug(slug).get_team_membership(user)
                return membership.state == "active"
        except ForgeError as exc:
            if exc.status == 404:
                return False
            raise

    def mergeability(self, pull: PullRequest, ignore_contexts: frozenset[str]) -> Mergeability:
        """Whether GitHub would merge the PR, not counting the given status contexts."""
        with _api(f"checking mergeability of pull request #{pull.number} of {self.repo.full_name}"):
            pr = self._repo.get_pull(pull.number)
            for _ in range(self._mergeable_retries - 1):
                if pr.mergeable is not None:
                    break
                # GitHub computes mergeability in the background after a push; asking starts it.
                time.sleep(self._mergeable_retry_delay)
                pr = self._repo.get_pull(pull.number)
            if pr.mergeable is None:
                return Mergeability(False, "GitHub has not computed mergeability yet")
            if pr.mergeable is False:
                return Mergeability(False, "the pull request has merge conflicts")
            if pr.draft:
                return Mergeability(False, "the pull request is a draft")
            state = pr.mergeable_state
            if state in MERGEABLE_STATES:
                return Mergeability(True)
            if state == "blocked":
                return self._required_checks_pass(pr.base.ref, pr.head.sha, ignore_contexts)
            if state == "behind":
                return Mergeability(False, "the head branch is behind the base branch")
            if state == "dirty":
                return Mergeability(False, "the pull request has merge conflicts")
            return Mergeability(False, f"GitHub reports mergeable state {state!r}")

    def is_behind_base(self, pull: PullRequest) -> bool:
        """Whether the base branch has commits the PR head does not contain."""
        with _api(f"comparing {pull.base_ref} with {pull.head_sha[:12]} on {self.repo.full_name}"):
            return self._repo.compare(pull.base_ref, pull.head_sha).behind_by > 0

    def commit_sha(self, ref: str) -> str | None:
        """The commit a branch, tag, ref or SHA names in this repository, or None."""
        try:
            with _api(f"resolving {ref} in {self.repo.full_name}"):
                # Not PyGithub's get_commit: with lazy objects it would echo the ref back unresolved.
                return str(self._request("GET", f"/commits/{_quote(ref.removeprefix('refs/heads/'))}")["sha"])
        except ForgeError as exc:
            if exc.status in (404, 422):
                return None
            raise

    def is_on_default_branch(self, sha: str) -> bool:
        """Whether the commit is (an ancestor of) the head of the default branch."""
        with _api(f"comparing {sha[:12]} with {self.repo.default_branch} on {self.repo.full_name}"):
            status = self._repo.compare(sha, self.repo.default_branch).status
        return status in ("identical", "ahead")

    def read_file(self, ref: str, path: str) -> str | None:
        """A file's text at a ref, or None if there is no file there."""
        try:
            with _api(f"reading {path} at {ref} of {self.repo.full_name}"):
                content = self._repo.get_contents(path, ref=ref)
                if isinstance(content, list) or content.type != "file":
                    return None
                if content.encoding != "base64":  # files over 1 MB come back without content
                    raise ForgeError(f"{path} at {ref} is too large for the contents API")
                return content.decoded_content.decode("utf-8")
        except ForgeError as exc:
            if exc.status == 404:
                return None
            raise

    def git_auth_header(self) -> str:
        """`Authorization` value for git over HTTPS: GitHub takes the token as basic-auth password."""
        credentials = f"x-access-token:{self._token()}".encode()
        return "Basic " + base64.b64encode(credentials).decode("ascii")

    def _required_checks_pass(self, branch: str, sha: str, ignore: frozenset[str]) -> Mergeability:
        """Decide a "blocked" PR by the required checks alone, minus the ones we were told to ignore."""
        try:
            checks = self._request("GET", f"/branches/{_quote(branch)}/protection/required_status_checks")
            required = set(checks.get("contexts") or [])
            required.update(c["context"] for c in checks.get("checks") or [])
        except UnknownObjectException:
            required = set()  # branch not protected or no required checks
        results = {s.context: s.state for s in self._repo.get_commit(sha).get_combined_status().statuses}
        # GitHub Actions and other Apps report check runs, not statuses; both satisfy a required context.
        for run in self._repo.get_commit(sha).get_check_runs():
            if run.status != "completed":
                results.setdefault(run.name, "pending")
            elif run.conclusion in PASSING_CHECK_CONCLUSIONS:
                results[run.name] = "success"
            else:
                results.setdefault(run.name, run.conclusion or "failure")
        for context in sorted(required - ignore):
            state = results.get(context)
            if state is None:
                return Mergeability(False, f"required status check {context!r} has not been reported")
            if state != "success":
                return Mergeability(False, f"required status check {context!r} is {state}")
        return Mergeability(True)

    def _request(self, verb: str, path: str, payload: dict | None = None) -> dict:
        """A JSON call below the repository URL, for endpoints PyGithub has no direct method for."""
        _, data = self._gh.requester.requestJsonAndCheck(verb, f"{self._repo.url}{path}", input=payload)
        return data or {}


@contextmanager
def _api(action: str) -> Iterator[None]:
    """Turn PyGithub and transport failures into ForgeError with a message free of credentials."""
    try:
        yield
    except ForgeError:
        raise
    except GithubException as exc:
        message = exc.data.get("message", "") if isinstance(exc.data, dict) else ""
        raise ForgeError(f"GitHub API error while {action}: {exc.status} {message}".rstrip(), exc.status) from exc
    except (requests.RequestException, httpx.HTTPError) as exc:
        raise ForgeError(f"could not reach GitHub while {action}: {type(exc).__name__}") from exc


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
