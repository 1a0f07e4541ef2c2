"""Whether a project may be applied now: facts from the forge API, judged by the policy.

The facts are fetched at the moment of asking (reviews, approvers' permissions and
teams, mergeability) and never taken from comment text or earlier events.
"""

from __future__ import annotations

from bot.models import PullRequest, Project
from bot.store import Store, project_key
from bot.vcs import VCSClient
from policies.apply_requirements import (
    ApplyFacts,
    ApprovalComment,
    approving_users,
    check_apply_requirements,
    comment_approvers,
)
from policies.authz import Actor, is_allowed, teams_to_check
from policies.policy import RepoPolicy, Subjects

OWN_APPLY_CONTEXT = "deploybot/apply"


def actor(client: VCSClient, user: str, *subjects: Subjects) -> Actor:
    """The user's permission and relevant team memberships, as the forge reports them now."""
    teams = frozenset(t for t in sorted(teams_to_check(*subjects)) if client.is_team_member(user, t))
    return Actor(login=user, permission=client.permission(user), teams=teams)


def may(client: VCSClient, user: str, subjects: Subjects) -> bool:
    """Whether the policy subjects include this user right now."""
    return is_allowed(subjects, actor(client, user, subjects))


def eligible_approvers(
    client: VCSClient, store: Store, policy: RepoPolicy, pull: PullRequest, project: Project
) -> set[str]:
    """Users whose approval of the current head counts for this project."""
    approvals = [ApprovalComment(user, sha, label) for user, sha, label in store.approvals(pull.repo, pull.number)]
    candidates = approving_users(client.reviews(pull.number), pull.head_sha)
    candidates |= comment_approvers(approvals, pull.head_sha, project.label)
    # Nobody approves their own change, whatever the forge allows.
    candidates = {u for u in candidates if u.lower() != pull.author.lower()}
    return {u for u in candidates if may(client, u, policy.approvers)}


def apply_blockers(
    client: VCSClient, store: Store, policy: RepoPolicy, pull: PullRequest, project: Project
) -> list[str]:
    """Why this project may not be applied now (empty: it may)."""
    plan = store.get_plan(project_key(pull.repo, project), pull.number)
    requirements = policy.apply_requirements
    facts = ApplyFacts(
        head_sha=pull.head_sha,
        plan_sha=plan.head_sha if plan else None,
        approvers=eligible_approvers(client, store, policy, pull, project)
        if "approved" in requirements else set(),
        mergeable=client.mergeability(pull, frozenset({OWN_APPLY_CONTEXT}))
        if "mergeable" in requirements else None,
        behind_base=client.is_behind_base(pull) if "undiverged" in requirements else None,
        base_ref=pull.base_ref,
        author=pull.author,
    )
    return check_apply_requirements(policy, facts)
