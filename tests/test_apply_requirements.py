"""Approvals tied to the head SHA, and the reasons an apply is refused."""

from __future__ import annotations

from dataclasses import replace

import pytest

from bot.models import Mergeability, Review
from policies.apply_requirements import (
    ApplyFacts,
    ApplyRequirement,
    ApprovalComment,
    approving_users,
    check_apply_requirements,
    comment_approvers,
)
from policies.policy import RepoPolicy, load_policy

HEAD = "abc1234def5678abc1234def5678abc1234def56"
OLD = "0ld5678abc1234def5678abc1234def5678abc12"


def review(user: str, state: str, sha: str = HEAD) -> Review:
    return Review(user=user, state=state, commit_sha=sha)


# --- approving_users ------------------------------------------------------------------


def test_approval_on_head_counts():
    assert approving_users([review("alice", "APPROVED")], HEAD) == {"alice"}


def test_approval_on_an_older_commit_does_not_count():
    assert approving_users([review("alice", "APPROVED", OLD)], HEAD) == set()


def test_new_approval_after_a_push_counts():
    assert approving_users([review("alice", "APPROVED", OLD), review("alice", "APPROVED")], HEAD) == {"alice"}


def test_changes_requested_after_approval_cancels_it():
    reviews = [review("alice", "APPROVED"), review("alice", "CHANGES_REQUESTED")]
    assert approving_users(reviews, HEAD) == set()


def test_approval_after_changes_requested_counts():
    reviews = [review("alice", "CHANGES_REQUESTED"), review("alice", "APPROVED")]
    assert approving_users(reviews, HEAD) == {"alice"}


def test_dismissal_cancels_approval():
    # GitHub turns a dismissed review's state into DISMISSED; an earlier approval
    # by the same user does not come back.
    reviews = [review("alice", "APPROVED"), review("alice", "DISMISSED")]
    assert approving_users(reviews, HEAD) == set()


def test_comment_after_approval_keeps_it():
    reviews = [review("alice", "APPROVED"), review("alice", "COMMENTED"), review("alice", "PENDING")]
    assert approving_users(reviews, HEAD) == {"alice"}


def test_comment_on_head_does_not_revive_an_old_approval():
    reviews = [review("alice", "APPROVED", OLD), review("alice", "COMMENTED", HEAD)]
    assert approving_users(reviews, HEAD) == set()


def test_unknown_state_cancels_rather_than_approves():
    reviews = [review("alice", "APPROVED"), review("alice", "SOMETHING_NEW")]
    assert approving_users(reviews, HEAD) == set()


def test_users_are_tracked_case_insensitively_and_independently():
    reviews = [
        review("Alice", "APPROVED"),
        review("alice", "CHANGES_REQUESTED"),  # same user: cancels
        review("bob", "APPROVED"),
        review("carol", "CHANGES_REQUESTED"),
        review("dave", "approved"),  # state case does not matter
    ]
    assert approving_users(reviews, HEAD) == {"bob", "dave"}


def test_empty_head_or_sha_never_matches():
    assert approving_users([review("alice", "APPROVED", "")], "") == set()
    assert approving_users([review("alice", "APPROVED")], "") == set()


def test_sha_comparison_ignores_case():
    assert approving_users([review("alice", "APPROVED", HEAD.upper())], HEAD) == {"alice"}


# --- comment approvals -------------------------------------------------------------------


def test_comment_approvers():
    approvals = [
        ApprovalComment("alice", HEAD, None),  # all projects
        ApprovalComment("bob", HEAD, "staging"),
        ApprovalComment("carol", OLD, None),  # before the last push
        ApprovalComment("dave", HEAD, "prod"),
    ]
    assert comment_approvers(approvals, HEAD, "staging") == {"alice", "bob"}
    assert comment_approvers(approvals, HEAD, "prod") == {"alice", "dave"}
    assert comment_approvers(approvals, HEAD, None) == {"alice"}
    assert comment_approvers(approvals, OLD, "staging") == {"carol"}
    assert comment_approvers([], HEAD, None) == set()


# --- check_apply_requirements ---------------------------------------------------------------


def policy(body: str = "") -> RepoPolicy:
    text = "repos:\n  acme/infra:\n" + "".join(f"    {line}\n" for line in body.splitlines()) + (
        "    projects: [{dir: a}]\n"
    )
    return load_policy(text).repos["acme/infra"]


def facts(**changes: object) -> ApplyFacts:
    base = ApplyFacts(
        head_sha=HEAD,
        plan_sha=HEAD,
        approvers={"alice"},
        mergeable=Mergeability(True),
        behind_base=False,
        base_ref="main",
    )
    return replace(base, **changes)  # type: ignore[arg-type]


ALL = "apply_requirements: [approved, mergeable, undiverged]"


def test_everything_holds():
    assert check_apply_requirements(policy(ALL), facts()) == []


def test_requirement_names():
    assert {r.value for r in ApplyRequirement} == {"approved", "mergeable", "undiverged"}
    assert ApplyRequirement.APPROVED == "approved"


def test_no_plan():
    assert check_apply_requirements(policy(), facts(plan_sha=None)) == [
        "no plan for the current head abc1234 — comment `deploybot plan` first"
    ]


def test_plan_of_an_older_commit():
    assert check_apply_requirements(policy(), facts(plan_sha=OLD)) == [
        "the plan was made for 0ld5678 but the head is now abc1234 — comment `deploybot plan` again"
    ]


def test_plan_check_applies_even_with_no_requirements():
    repo = policy("apply_requirements: []")
    assert repo.apply_requirements == frozenset()
    assert check_apply_requirements(repo, facts(approvers=set(), plan_sha=None)) != []
    assert check_apply_requirements(repo, facts(approvers=set())) == []


def test_unknown_head_is_refused():
    assert "unknown" in check_apply_requirements(policy(), facts(head_sha="", plan_sha=""))[0]


def test_approvals_count():
    repo = policy("approvals: 2")
    assert check_apply_requirements(repo, facts(approvers={"bob"})) == [
        "needs 2 approvals from approvers, has 1 (bob)"
    ]
    assert check_apply_requirements(repo, facts(approvers=set())) == ["needs 2 approvals from approvers, has 0"]
    assert check_apply_requirements(repo, facts(approvers={"bob", "alice"})) == []
    assert check_apply_requirements(policy(), facts(approvers=set())) == [
        "needs 1 approval from approvers, has 0"
    ]


def test_same_user_in_two_spellings_counts_once():
    repo = policy("approvals: 2")
    assert check_apply_requirements(repo, facts(approvers={"Bob", "bob"})) != []


def test_authors_own_approval_does_not_count():
    assert check_apply_requirements(policy(), facts(approvers={"Alice"}, author="alice")) == [
        "needs 1 approval from approvers, has 0"
    ]
    assert check_apply_requirements(policy(), facts(approvers={"alice", "bob"}, author="alice")) == []


def test_approvals_not_checked_unless_required():
    assert check_apply_requirements(policy("apply_requirements: [mergeable]"), facts(approvers=set())) == []


def test_mergeable():
    repo = policy("apply_requirements: [mergeable]")
    assert check_apply_requirements(repo, facts(mergeable=Mergeability(False, "merge conflicts"))) == [
        "the pull request is not mergeable: merge conflicts"
    ]
    assert check_apply_requirements(repo, facts(mergeable=Mergeability(False))) == [
        "the pull request is not mergeable"
    ]
    # Unknown is not "yes".
    assert len(check_apply_requirements(repo, facts(mergeable=None))) == 1
    # Not required: not checked.
    assert check_apply_requirements(policy(), facts(mergeable=Mergeability(False, "x"))) == []


def test_undiverged():
    repo = policy("apply_requirements: [undiverged]")
    assert check_apply_requirements(repo, facts(behind_base=True)) == [
        "the branch is behind main: merge or rebase first"
    ]
    assert check_apply_requirements(repo, facts(behind_base=True, base_ref="")) == [
        "the branch is behind its base branch: merge or rebase first"
    ]
    assert len(check_apply_requirements(repo, facts(behind_base=None))) == 1
    assert check_apply_requirements(policy(), facts(behind_base=True)) == []


def test_every_failure_is_reported_at_once():
    reasons = check_apply_requirements(
        policy(ALL + "\napprovals: 2"),
        facts(plan_sha=OLD, approvers={"bob"}, mergeable=Mergeability(False, "blocked"), behind_base=True),
    )
    assert len(reasons) == 4


@pytest.mark.parametrize("state", ["APPROVED", "COMMENTED"])
def test_end_to_end_reviews_to_reasons(state: str):
    reviews = [review("bob", "APPROVED", OLD), review("bob", state)]
    approvers = approving_users(reviews, HEAD)
    reasons = check_apply_requirements(policy(), facts(approvers=approvers))
    assert (reasons == []) is (state == "APPROVED")
