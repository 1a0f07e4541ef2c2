"""Whether a project may be applied now: facts from the forge API, judged by the policy.

The facts are fetched at the moment of asking (reviews, the pull request's commits,
approvers' permissions and teams, mergeability) and never taken from comment text or
earlier events. A forge that cannot answer fails the check closed, saying what it said.
"""

from __future__ import annotations

from bot.forges.vcs import ForgeError, VCSClient
from bot.models import Project, PullRequest
from bot.store import SavedPlan, Store, project_key
from policies.apply_requirements import (
    ApplyFacts,
    CommentApproval,
    PlanFacts,
    check_apply_requirements,
    excluded_approvers,
    plan_approvers,
)
from policies.authz import Actor, is_allowed, teams_to_check
from policies.policy import RepoPolicy, Subjects

OWN_APPLY_CONTEXT = "deploybot/apply"
FORGE_FAILED = "could not check the apply requirements: {error}"


def actor(client: VCSClient, user: str, *subjects: Subjects) -> Actor:
    """The user's permission and relevant team memberships, as the forge reports them now."""
    teams = frozenset(t for t in sorted(teams_to_check(*subjects)) if client.is_team_member(user, t))
    return Actor(login=user, permission=client.permission(user), teams=teams)


def may(client: VCSClient, user: str, subjects: Subjects) -> bool:
    """Whether the policy subjects include this user right now."""
    return is_allowed(subjects, actor(client, user, subjects))


def excluded(client: VCSClient, store: Store, policy: RepoPolicy, pull: PullRequest) -> set[str]:
    """Lower-cased logins who may not approve this pull request: its opener, and whoever wrote
    its commits (as the forge lists them now) or pushed them (as its webhooks said)."""
    people: set[str] = set()
    if "committers" in policy.approvers_exclude:
        people = client.commit_people(pull.number) | store.pushers(pull.repo, pull.number)
    return excluded_approvers(policy, pull, people)


def eligible_approvers(
    client: VCSClient, store: Store, policy: RepoPolicy, pull: PullRequest, plan: SavedPlan
) -> set[str]:
    """Users whose approval of exactly this saved plan counts."""
    facts = PlanFacts(plan.head_sha, plan.sha256, plan.shown_at)
    comments = [CommentApproval(a.user, a.approved_at) for a in store.plan_approvals(plan)]
    candidates = plan_approvers(facts, client.reviews(pull.number), comments, excluded(client, store, policy, pull))
    return {u for u in candidates if may(client, u, policy.approvers)}


def apply_blockers(
    client: VCSClient, store: Store, policy: RepoPolicy, pull: PullRequest, project: Project
) -> list[str]:
    """Why this project may not be applied now (empty: it may). Never raises ForgeError."""
    plan = store.get_plan(project_key(pull.repo, project), pull.number)
    requirements = policy.apply_requirements
    try:
        facts = ApplyFacts(
            head_sha=pull.head_sha,
            plan=PlanFacts(plan.head_sha, plan.sha256, plan.shown_at) if plan else None,
            approvers=eligible_approvers(client, store, policy, pull, plan)
            if plan and "approved" in requirements else set(),
            mergeable=client.mergeability(pull, frozenset({OWN_APPLY_CONTEXT}))
            if "mergeable" in requirements else None,
            behind_base=client.is_behind_base(pull) if "undiverged" in requirements else None,
            base_ref=pull.base_ref,
        )
    except ForgeError as exc:
        return [FORGE_FAILED.format(error=exc)]
    return check_apply_requirements(policy, facts)

