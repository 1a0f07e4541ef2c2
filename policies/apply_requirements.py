"""Whether an apply may run now, and if not, the reasons the bot posts.

An approval is of a plan, not of a commit: it counts only for the saved plan the
approver could see when they acted (shown on the pull request no later than
their review or comment), by someone who neither opened the pull request nor
authored or committed any of its commits. Every fact comes from the forge API at
apply time, never from comment text; every time is the forge's own clock.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from bot.models import Mergeability, PullRequest, Review, plan_id
from policies.policy import ApplyRequirement, RepoPolicy

__all__ = [
    "ApplyRequirement",
    "ApplyFacts",
    "PlanFacts",
    "check_apply_requirements",
    "excluded_approvers",
    "merge_apply_refusals",
    "plan_approvers",
    "shown_by",
]

# Review states that settle a reviewer's verdict; COMMENTED and PENDING leave the
# previous verdict in place (a remark after approving does not withdraw it).
_NEUTRAL_STATES = frozenset({"COMMENTED", "PENDING"})


def _same_sha(a: str | None, b: str | None) -> bool:
    """Equal, non-empty commit SHAs (the forges differ in case only in hand-written input)."""
    return bool(a and b and a.strip().lower() == b.strip().lower())


def _forge_time(value: str | None) -> datetime | None:
    """An ISO 8601 time as the forges write it ("2026-12-07T19:20:00Z"); None if unreadable."""
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def shown_by(shown_at: str | None, moment: str | None) -> bool:
    """Whether a plan shown at `shown_at` was on the pull request by `moment` (forge times).

    GitHub reports times to the second, so the same second counts as "by": a plan
    takes far longer than a second to make, so a re-plan cannot slip in unseen.
    """
    shown, acted = _forge_time(shown_at), _forge_time(moment)
    return shown is not None and acted is not None and shown <= acted


@dataclass(frozen=True)
class PlanFacts:
    """The saved plan an apply would run."""

    head_sha: str  # the commit it was made from
    sha256: str
    shown_at: str | None  # when the forge showed it on the pull request; None: never shown


@dataclass(frozen=True)
class CommentApproval:
    """A recorded `deploybot approve` of a plan, with the forge's time of the comment."""

    user: str
    approved_at: str


def plan_approvers(
    plan: PlanFacts,
    reviews: list[Review],
    comment_approvals: Iterable[CommentApproval],
    excluded: set[str],
) -> set[str]:
    """Users whose approval counts for exactly this plan (before the approvers policy).

    A review counts if it is the user's latest deciding review, approves the commit the
    plan was made from, and was submitted once the plan was shown. A comment approval
    was recorded for this very plan; a later "changes requested" by the same user voids
    it. `reviews` must be oldest first. Users in `excluded` (lower case) never count.
    """
    latest: dict[str, Review] = {}
    for review in reviews:
        if review.state.upper() in _NEUTRAL_STATES or not review.user:
            continue
        latest[review.user.lower()] = review
    users = {
        r.user for r in latest.values()
        if r.state.upper() == "APPROVED" and _same_sha(r.commit_sha, plan.head_sha)
        and shown_by(plan.shown_at, r.submitted_at)
    }
    withdrawals = [r for r in reviews if r.state.upper() not in _NEUTRAL_STATES | {"APPROVED"}]
    for approval in comment_approvals:
        # Any change request (or dismissal) since the comment voids it, whatever came after.
        withdrawn = any(r.user.lower() == approval.user.lower() and shown_by(approval.approved_at, r.submitted_at)
                        for r in withdrawals)
        if approval.user and not withdrawn and shown_by(plan.shown_at, approval.approved_at):
            users.add(approval.user)
    return {u for u in users if u.lower() not in excluded}


def excluded_approvers(repo: RepoPolicy, pull: PullRequest, commit_people: set[str]) -> set[str]:
    """Lower-cased logins whose approval never counts for this pull request (four eyes)."""
    excluded: set[str] = set()
    if "author" in repo.approvers_exclude and pull.author:
        excluded.add(pull.author.lower())
    if "committers" in repo.approvers_exclude:
        excluded |= {p.lower() for p in commit_people if p}
    return excluded


@dataclass(frozen=True)
class ApplyFacts:
    """What the forge says now about the pull request, gathered by the caller just before apply."""

    head_sha: str
    plan: PlanFacts | None  # the saved plan of the project; None if there is none
    # Users whose approval of this plan counts (plan_approvers) AND whom the caller
    # confirmed as eligible approvers (authz.is_allowed on repo.approvers).
    approvers: set[str]
    mergeable: Mergeability | None  # None: the forge has not decided yet
    behind_base: bool | None  # None: unknown
    base_ref: str = ""  # only for the message ("behind main")


def _short(sha: str | None) -> str:
    return (sha or "")[:7] or "(unknown)"


def check_apply_requirements(repo: RepoPolicy, facts: ApplyFacts) -> list[str]:
    """Human-readable reasons the apply may not run now; an empty list means it may."""
    reasons: list[str] = []
    head = _short(facts.head_sha)
    plan = facts.plan

    # Always: apply runs the saved plan, so it must be a plan of this exact head.
    if not facts.head_sha:
        reasons.append("the head commit of the pull request is unknown — try again in a moment")
    elif plan is None:
        reasons.append(f"no plan for the current head {head} — comment `deploybot plan` first")
    elif not _same_sha(plan.head_sha, facts.head_sha):
        reasons.append(
            f"the plan was made for {_short(plan.head_sha)} but the head is now {head}"
            " — comment `deploybot plan` again"
        )

    required = repo.apply_requirements
    if ApplyRequirement.APPROVED in required and plan is not None:
        have = len({u.lower() for u in facts.approvers})
        if have < repo.approvals:
            noun = "approval" if repo.approvals == 1 else "approvals"
            who = f" ({', '.join(sorted(facts.approvers, key=str.lower))})" if have else ""
            reasons.append(f"plan `{plan_id(plan.sha256)}` needs {repo.approvals} {noun} from approvers,"
                           f" has {have}{who}")

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


def merge_apply_refusals(repo: RepoPolicy, pull: PullRequest) -> list[str]:
    """Why a merge must not apply this pull request, judged on the pull request as the API shows it.

    The merge is then the only approval, so only merges into a branch the policy names
    (or the default branch) apply: a developer can merge into an unprotected branch of
    their own alone.
    """
    if not repo.apply_on_merge:
        return ["this repository does not apply on merge"]
    if not pull.merged:
        return ["the forge does not report the pull request as merged"]
    branches = repo.apply_on_merge_branches or (pull.repo.default_branch,)
    if not pull.base_ref or pull.base_ref not in branches:
        allowed = ", ".join(f"`{b}`" for b in branches)
        return [f"it was merged into `{pull.base_ref}`, and only merges into {allowed} apply"]
    return []
