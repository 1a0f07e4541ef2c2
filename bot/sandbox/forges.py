"""The local forges of `deploybot sandbox` and the end-to-end tests, behind one interface.

Each wraps a local API fake (`bot.sandbox.github_fake`, `bot.sandbox.gitlab_fake`) and acts the
way people act on that forge: open a pull/merge request, comment, approve, merge.
The fake then sends its signed webhooks to the bot over HTTP.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from bot.sandbox.github_fake import FakeGitHub
from bot.sandbox.gitlab_fake import FakeGitLab

REPO = "acme/infrastructure-live"
TEAM = "acme/platform"
WEBHOOK_SECRET = "sandbox-webhook-secret"
APP_ID = 1001
INSTALLATION_ID = 4242

# Who is who in the sandbox organisation, and their permission on the repository.
PEOPLE = {
    "alice": "write",     # developer: opens pull requests, may plan
    "carol": "write",     # another developer, no approver
    "bob": "maintain",    # platform team: approves and applies
    "dave": "maintain",   # platform team: approves and applies
    "eve": "read",        # outsider
}
TEAM_MEMBERS = ("bob", "dave")


def email_of(user: str) -> str:
    """The email each sandbox person has on both forges: commits with it are theirs (`GitRepo.commit(author=)`)."""
    return f"{user}@example.com"


class SandboxForge(Protocol):
    """A local forge the sandbox and the tests drive."""

    name: str
    bot_login: str

    def start(self, bare_repo: Path) -> None: ...
    def stop(self) -> None: ...
    def config_section(self, root: Path) -> dict: ...
    def set_webhook(self, bot_url: str) -> None: ...
    def open(self, branch: str, author: str = "alice", fork: bool = False, base: str = "main") -> int: ...
    def synchronize(self, number: int, pusher: str | None = None) -> None: ...
    def comment(self, number: int, user: str, body: str) -> int: ...
    def edit_comment(self, number: int, comment_id: int, body: str, user: str) -> None: ...
    def approve(self, number: int, user: str) -> int: ...
    def request_changes(self, number: int, user: str) -> None: ...
    def withdraw_approval(self, number: int, user: str, approval_id: int) -> None: ...
    def merge(self, number: int) -> None: ...
    def set_ci_status(self, number: int, context: str, state: str) -> None: ...
    def require_ci(self, contexts: list[str]) -> None: ...
    def comments(self, number: int) -> list[dict]: ...
    def statuses(self, number: int) -> dict[str, tuple[str, str]]: ...
    def head(self, number: int) -> str: ...
    def delivery_ids(self) -> list[str]: ...
    def redeliver(self, delivery_id: str) -> int: ...
    def user_token(self, user: str) -> str: ...


class _LocalForge:
    """What both sandbox forges do the same way: their fake has the same records and comments."""

    fake: FakeGitHub | FakeGitLab

    def stop(self) -> None:
        self.fake.stop()

    def comment(self, number: int, user: str, body: str) -> int:
        return self.fake.comment(REPO, number, user, body)

    def edit_comment(self, number: int, comment_id: int, body: str, user: str) -> None:
        self.fake.edit_comment(REPO, comment_id, body, user=user)

    def comments(self, number: int) -> list[dict]:
        return self.fake.comments(REPO, number)

    def delivery_ids(self) -> list[str]:
        return [d.delivery_id for d in self.fake.deliveries]

    def redeliver(self, delivery_id: str) -> int:
        return self.fake.redeliver(delivery_id)

    def user_token(self, user: str) -> str:
        """A token of the user's own, as an approver would use to call the bot's API."""
        return self.fake.user_token(user)


class SandboxGitHub(_LocalForge):
    """GitHub: an App installed on the repository; reviews in the UI."""

    name = "github"

    def __init__(self) -> None:
        self.fake = FakeGitHub(app_id=APP_ID)
        self.bot_login = self.fake.bot_login

    def start(self, bare_repo: Path) -> None:
        self.fake.start()
        self.fake.add_repo(REPO, bare_repo, default_branch="main")
        self.fake.add_installation(INSTALLATION_ID, [REPO])
        for user, level in PEOPLE.items():
            self.fake.set_permission(REPO, user, level)
            self.fake.set_user_email(user, email_of(user))
        for user in TEAM_MEMBERS:
            self.fake.add_team_member(TEAM, user)

    def config_section(self, root: Path) -> dict:
        key = root / "app-private-key.pem"
        key.write_text(self.fake.private_key_pem)
        key.chmod(0o600)
        return {"github": {"api_url": self.fake.url, "app_id": APP_ID,
                           "private_key_file": str(key), "webhook_secret": WEBHOOK_SECRET}}

    def set_webhook(self, bot_url: str) -> None:
        self.fake.set_webhook(f"{bot_url}/webhooks/github", WEBHOOK_SECRET)

    def open(self, branch: str, author: str = "alice", fork: bool = False, base: str = "main") -> int:
        return self.fake.open_pull(REPO, branch, base, author=author, fork=fork, title=f"Change {branch}")

    def synchronize(self, number: int, pusher: str | None = None) -> None:
        self.fake.synchronize(REPO, number, sender=pusher)

    def approve(self, number: int, user: str) -> int:
        return self.fake.review(REPO, number, user, "APPROVED")

    def request_changes(self, number: int, user: str) -> None:
        self.fake.review(REPO, number, user, "CHANGES_REQUESTED")

    def withdraw_approval(self, number: int, user: str, approval_id: int) -> None:
        self.fake.dismiss_review(REPO, number, approval_id)

    def merge(self, number: int) -> None:
        self.fake.merge(REPO, number)

    def set_ci_status(self, number: int, context: str, state: str) -> None:
        self.fake.set_status(REPO, self.head(number), context, state)

    def require_ci(self, contexts: list[str]) -> None:
        self.fake.set_required_contexts(REPO, "main", contexts)

    def statuses(self, number: int) -> dict[str, tuple[str, str]]:
        return self.fake.statuses(REPO, self.head(number))

    def head(self, number: int) -> str:
        return self.fake.pull(REPO, number)["head"]["sha"]


class SandboxGitLab(_LocalForge):
    """GitLab: a bot user's token; approvals on the merge request; groups as teams."""

    name = "gitlab"
    ACCESS_LEVELS = {"read": 20, "write": 30, "maintain": 40}  # Reporter, Developer, Maintainer
    # GitLab's commit status words, told in the words the bot (and GitHub) use.
    STATES = {"failed": "failure", "canceled": "error", "running": "pending"}

    def __init__(self) -> None:
        self.fake = FakeGitLab(bot_username="deploybot")
        self.bot_login = self.fake.bot_username
        self._approved: set[tuple[int, str]] = set()  # (iid, user) approving now

    def start(self, bare_repo: Path) -> None:
        self.fake.start()
        self.fake.add_project(REPO, bare_repo, default_branch="main")
        for user, level in PEOPLE.items():
            self.fake.set_access_level(REPO, user, self.ACCESS_LEVELS[level])
            self.fake.set_user_email(user, email_of(user))
        for user in TEAM_MEMBERS:
            self.fake.add_group_member(TEAM, user, level=40)

    def config_section(self, root: Path) -> dict:
        token = root / "gitlab-token"
        token.write_text(self.fake.token)
        token.chmod(0o600)
        return {"gitlab": {"url": self.fake.url, "token_file": str(token),
                           "webhook_secret": WEBHOOK_SECRET, "bot_username": self.bot_login}}

    def set_webhook(self, bot_url: str) -> None:
        self.fake.set_webhook(f"{bot_url}/webhooks/gitlab", WEBHOOK_SECRET)

    def open(self, branch: str, author: str = "alice", fork: bool = False, base: str = "main") -> int:
        return self.fake.open_merge_request(REPO, branch, base, author=author, fork=fork, title=f"Change {branch}")

    def synchronize(self, number: int, pusher: str | None = None) -> None:
        self.fake.push(REPO, number, user=pusher)

    def approve(self, number: int, user: str) -> int:
        if (number, user) in self._approved:
            # Approving the new head after a push: revoke the old approval first, as in the UI.
            self.fake.unapprove(REPO, number, user)
        self._approved.add((number, user))
        return self.fake.approve(REPO, number, user)

    def request_changes(self, number: int, user: str) -> None:
        self.withdraw_approval(number, user, 0)  # GitLab's nearest: the approval is revoked

    def withdraw_approval(self, number: int, user: str, approval_id: int) -> None:
        self._approved.discard((number, user))
        self.fake.unapprove(REPO, number, user)

    def merge(self, number: int) -> None:
        self.fake.merge(REPO, number)

    def set_ci_status(self, number: int, context: str, state: str) -> None:
        gitlab_state = {"failure": "failed", "error": "failed"}.get(state, state)
        self.fake.set_commit_status(REPO, self.head(number), context, gitlab_state)

    def require_ci(self, contexts: list[str]) -> None:
        self.fake.set_project_settings(REPO, pipeline_must_succeed=True)

    def statuses(self, number: int) -> dict[str, tuple[str, str]]:
        return {name: (self.STATES.get(state, state), description)
                for name, (state, description) in self.fake.statuses(REPO, self.head(number)).items()}

    def head(self, number: int) -> str:
        return self.fake.mr(REPO, number)["sha"]


FORGES: dict[str, type] = {"github": SandboxGitHub, "gitlab": SandboxGitLab}
