"""Whether an apply may run now, and if not, the reasons the bot posts.

Every fact comes from the forge API at apply time (never from comment text), and
every approval is tied to the exact head SHA: a push after an approval needs a
new approval.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from bot.models import Mergeability, Review
from policies.policy import ApplyRequirement, RepoPolicy

__all__ = [
    "ApplyRequirement",
    "ApprovalComment",
    "ApplyFacts",
    "approving_users",
    "comment_approvers",
    "check_apply_requirements",
]

# Review states that settle a reviewer's verdict; COMMENTED and PENDING leave the
# previous verdict in place (a remark after approving does not withdraw it).
_NEUTRAL_STATES = frozenset({"COMMENTED", "PENDING"})


def _same_sha(a: str | None, b: str | None) -> bool:
    """Equal, non-empty commit SHAs (the forges differ in case only in hand-written input)."""
    return bool(a and b and a.strip().lower() == b.strip().lower())


def approving_users(reviews: list[Review], head_sha: str) -> set[str]:
    """Users whose latest deciding review approves exactly `head_sha`.

    `reviews` must be oldest first (as `VCSClient.reviews` returns them). A later
    CHANGES_REQUESTED or DISMISSED review cancels an approval, and so does any state
    this code does not know; an approval of an older commit does not count.
    """
    latest: dict[str, Review] = {}
    for review in reviews:
        if review.state.upper() in _NEUTRAL_STATES or not review.user:
            continue
        latest[review.user.lower()] = review
    return {
        r.user
        for r in latest.values()
        if r.state.upper() == "APPROVED" and _same_sha(r.commit_sha, head_sha)
    }


@dataclass(frozen=True)
class ApprovalComment:
    """A `deploybot approve` the bot recorded, with the head SHA it saw when it did."""

    user: str
    sha: str
    project_label: str | None = None  # None: every project of the pull request


def comment_approvers(
    approvals: Iterable[ApprovalComment], head_sha: str, project_label: str | None
) -> set[str]:
    """Users who approved `project_label` (or all projects, for None) at exactly `head_sha`."""
    return {
        a.user
        for a in approvals
        if a.user
        and _same_sha(a.sha, head_sha)
        and (a.project_label is None or a.project_label == project_label)
    }


@dataclass(frozen=True)
class ApplyFacts:
    """What the forge says now about the pull request, gathered by the caller just before apply."""

    head_sha: str
    plan_sha: str | None  # the head SHA the stored plan was made from; None if there is no plan
    # Users whose approval counts (see approving_users / comment_approvers) AND whom
    # the caller confirmed as eligible approvers (authz.is_allowed on repo.approvers).
    approvers: set[str]
    mergeable: Mergeability | None  # None: the forge has not decided yet
    behind_base: bool | None  # None: unknown
    base_ref: str = ""  # only for the message ("behind main")
    author: str = ""  # the PR author; their own approval never counts (four eyes)


def _short(sha: str | None) -> str:
    return (sha or "")[:7] or "(unknown)"


def check_apply_requirements(repo: RepoPolicy, facts: ApplyFacts) -> list[str]:
    """Human-readable reasons the apply may not run now; an empty list means it may."""
    reasons: list[str] = []
    head = _short(facts.head_sha)

    # Always: apply runs the saved plan, so it must be a plan of this exact head.
    if not facts.head_sha:
        reasons.append("the head commit of the pull request is unknown — try again in a moment")
    elif not facts.plan_sha:
        reasons.append(f"no plan for the current head {head} — comment `deploybot plan` first")
    elif not _same_sha(facts.plan_sha, facts.head_sha):
        reasons.append(
            f"the plan was made for {_short(facts.plan_sha)} but the head is now {head}"
            " — comment `deploybot plan` again"
        )

    required = repo.apply_requirements
    if ApplyRequirement.APPROVED in required:
        author = facts.author.lower()
        by_login = {u.lower(): u for u in facts.approvers if u and u.lower() != author}
        have = len(by_login)
        if have < repo.approvals:
            noun = "approval" if repo.approvals == 1 else "approvals"
            who = f" ({', '.join(sorted(by_login.values(), key=str.lower))})" if have else ""
            reasons.append(f"needs {repo.approvals} {noun} from approvers, has {have}{who}")

    if ApplyRequirement.MERGEABLE in required:
        if facts.mergeable is None:
            reasons.append("the forge has not yet decided whether the pull request is mergeable — try again in a moment")
        elif not facts.mergeable.mergeable:
            why = f": {facts.mergeable.reason}" if facts.mergeable.reason else ""
            reasons.append(f"the pull request is not mergeable{why}")

    if ApplyRequirement.UNDIVERGED in required:
        base = facts.base_ref or "its base branch"
        if facts.behind_base is None:
            reasons.append(f"could not tell whether the branch is behind {base} — try again in a moment")
        elif facts.behind_base:
            reasons.append(f"the branch is behind {base}: merge or rebase first")

    return reasons
