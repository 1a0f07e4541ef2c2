"""The interface every forge client implements; handlers only ever see this."""

from __future__ import annotations

from typing import Literal, Protocol

from bot.models import ForgeComment, Mergeability, PullRequest, Review

StatusState = Literal["pending", "success", "failure", "error"]
Permission = Literal["none", "read", "triage", "write", "maintain", "admin"]


class VCSClient(Protocol):
    """Calls to one repository on one forge, authenticated as the bot.

    Methods are blocking (the forge SDKs are); callers run them off the event loop.
    """

    comment_limit: int  # the longest comment body the forge accepts, in characters

    def get_pull_request(self, number: int) -> PullRequest:
        """The pull request as the forge sees it now."""

    def changed_files(self, number: int) -> list[str]:
        """Paths (repo-relative) changed by the pull request, renames on both sides."""

    def create_comment(self, number: int, body: str) -> ForgeComment:
        """Post a comment; return it as the forge recorded it (id and creation time)."""

    def find_comment(self, number: int, text: str) -> ForgeComment | None:
        """The oldest comment of the pull request whose body contains `text`; None if there is none."""

    def get_comment(self, number: int, comment_id: int) -> ForgeComment | None:
        """A comment on the pull request as the forge has it now; None if there is none by that id."""

    def commit_people(self, number: int) -> set[str]:
        """Logins of everyone who authored or committed a commit of the pull request.

        Commits whose author or committer the forge cannot tie to an account add nothing.
        """

    def commit_author_logins(self, sha: str) -> set[str]:
        """Logins of the author and the committer of one commit, as the forge ties them to accounts.

        What the forge cannot tie to an account adds nothing.
        """

    def set_status(
        self, sha: str, context: str, state: StatusState, description: str, target_url: str = ""
    ) -> None:
        """Set a commit status that branch protection and CI can require."""

    def reviews(self, number: int) -> list[Review]:
        """Every review of the pull request, oldest first."""

    def permission(self, user: str) -> Permission:
        """The user's permission on the repository."""

    def is_team_member(self, user: str, team: str) -> bool:
        """Whether the user is an active member of `org/team-slug`."""

    def mergeability(self, pull: PullRequest, ignore_contexts: frozenset[str]) -> Mergeability:
        """Whether the forge would merge the PR, not counting the given status contexts."""

    def is_behind_base(self, pull: PullRequest) -> bool:
        """Whether the base branch has commits the PR head does not contain."""

    def commit_sha(self, ref: str) -> str | None:
        """The commit a branch, tag, ref or SHA names in this repository, or None."""

    def is_on_default_branch(self, sha: str) -> bool:
        """Whether the commit is (an ancestor of) the head of the default branch."""

    def read_file(self, ref: str, path: str) -> str | None:
        """A file's text at a ref, or None if it does not exist."""

    def git_auth_header(self) -> str:
        """An HTTP `Authorization` header value that lets git fetch the repository."""


class ForgeError(Exception):
    """A forge API call failed; the message never contains a token or a key."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status  # HTTP status when the forge answered, None if it could not be reached
