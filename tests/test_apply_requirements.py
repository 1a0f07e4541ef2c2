"""Approvals of a plan (not of a commit), four eyes, and the reasons an apply is refused."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import pytest

from bot.models import Mergeability, PullRequest, Repo, Review, plan_id
from policies.apply_requirements import (
    ApplyFacts,
    ApplyRequirement,
    CommentApproval,
    PlanFacts,
    check_apply_requirements,
    excluded_approvers,
    merge_apply_refusals,
    plan_approvers,
    shown_by,
)
from policies.policy import RepoPolicy, load_policy

HEAD = "abc1234def5678abc1234def5678abc1234def56"
OLD = "0ld5678abc1234def5678abc1234def5678abc12"
SHA256 = "0123456789ab" + "cd" * 26  # the saved plan's SHA-256; its plan id is 0123456789ab
OTHER_SHA256 = "fedcba987654" + "32" * 26

# Forge times (GitHub: to the second, UTC, "Z").
BEFORE = "2026-12-07T19:19:59Z"  # one second before the plan was shown
SHOWN = "2026-12-07T19:20:00Z"  # the plan's comment appeared
AFTER = "2026-12-07T19:25:00Z"
LATER = "2026-12-07T19:30:00Z"

PLAN = PlanFacts(head_sha=HEAD, sha256=SHA256, shown_at=SHOWN)


def review(user: str, state: str, sha: str = HEAD, at: str = AFTER) -> Review:
    return Review(user=user, state=state, commit_sha=sha, submitted_at=at)


def approvers(
    reviews: list[Review],
    comments: Iterable[CommentApproval] = (),
    excluded: Iterable[str] = (),
    plan: PlanFacts = PLAN,
) -> set[str]:
    return plan_approvers(plan, reviews, list(comments), set(excluded))


# --- shown_by: forge times ------------------------------------------------------------------


def test_shown_by_same_second_counts_one_second_earlier_does_not():
    assert shown_by(SHOWN, SHOWN) is True
    assert shown_by(SHOWN, AFTER) is True
    assert shown_by(SHOWN, BEFORE) is False


def test_shown_by_compares_instants_across_offsets():
    assert shown_by(SHOWN, "2026-12-07T20:20:00+01:00") is True  # the same instant
    assert shown_by(SHOWN, "2026-12-07T20:19:59+01:00") is False
    assert shown_by("2026-12-07T14:20:00-05:00", SHOWN) is True
    assert shown_by(SHOWN, "2026-12-07T19:20:00") is True  # no offset: UTC
    assert shown_by(SHOWN, "2026-12-07T19:19:59") is False
    assert shown_by(f" {SHOWN}\n", f"\t{SHOWN} ") is True  # surrounding whitespace is not the time


def test_shown_by_sub_second_times():
    assert shown_by("2026-12-07T19:20:00.500Z", "2026-12-07T19:20:00.500Z") is True
    assert shown_by("2026-12-07T19:20:00.500Z", "2026-12-07T19:20:00.100Z") is False


@pytest.mark.parametrize(
    ("shown_at", "moment"),
    [
        (None, AFTER),  # never shown
        ("", AFTER),
        (SHOWN, None),
        (SHOWN, ""),
        ("yesterday", AFTER),
        (SHOWN, "soon"),
        (SHOWN, "2026-13-01T00:00:00Z"),
        ("   ", "   "),
    ],
)
def test_shown_by_is_false_for_missing_or_unreadable_times(shown_at: str | None, moment: str | None):
    assert shown_by(shown_at, moment) is False


# --- reviews: the latest deciding review per user ---------------------------------------------


def test_approval_of_the_plans_commit_after_it_was_shown_counts():
    assert approvers([review("alice", "APPROVED")]) == {"alice"}


def test_approval_of_another_commit_does_not_count():
    assert approvers([review("alice", "APPROVED", OLD)]) == set()


def test_new_approval_after_a_push_counts():
    assert approvers([review("alice", "APPROVED", OLD, BEFORE), review("alice", "APPROVED")]) == {"alice"}


def test_latest_deciding_review_wins_even_if_it_is_of_another_commit():
    assert approvers([review("alice", "APPROVED"), review("alice", "APPROVED", OLD, LATER)]) == set()


def test_changes_requested_after_approval_cancels_it():
    assert approvers([review("alice", "APPROVED"), review("alice", "CHANGES_REQUESTED", at=LATER)]) == set()


def test_approval_after_changes_requested_counts():
    assert approvers([review("alice", "CHANGES_REQUESTED"), review("alice", "APPROVED", at=LATER)]) == {"alice"}


def test_dismissal_cancels_approval():
    # GitHub turns a dismissed review's state into DISMISSED; an earlier approval
    # by the same user does not come back.
    assert approvers([review("alice", "APPROVED"), review("alice", "DISMISSED", at=LATER)]) == set()


def test_unknown_state_cancels_rather_than_approves():
    assert approvers([review("alice", "APPROVED"), review("alice", "SOMETHING_NEW", at=LATER)]) == set()


def test_comment_and_pending_reviews_after_approval_keep_it():
    reviews = [review("alice", "APPROVED"), review("alice", "COMMENTED", at=LATER), review("alice", "PENDING", at="")]
    assert approvers(reviews) == {"alice"}


def test_comment_review_on_head_does_not_revive_an_old_approval():
    assert approvers([review("alice", "APPROVED", OLD), review("alice", "COMMENTED", HEAD, LATER)]) == set()


def test_comment_review_after_the_plan_does_not_re_date_an_earlier_approval():
    # The approval was given before the plan existed; a later remark is not an approval of it.
    assert approvers([review("alice", "APPROVED", at=BEFORE), review("alice", "COMMENTED", at=LATER)]) == set()


def test_users_are_tracked_case_insensitively_and_independently():
    reviews = [
        review("Alice", "APPROVED"),
        review("alice", "CHANGES_REQUESTED", at=LATER),  # same user: cancels
        review("bob", "APPROVED"),
        review("carol", "CHANGES_REQUESTED"),
        review("dave", "approved"),  # state case does not matter
        review("erin", "APPROVED"),
        review("erin", "commented", at=LATER),  # neutral in any case
    ]
    assert approvers(reviews) == {"bob", "dave", "erin"}


def test_reviews_without_a_user_are_ignored():
    assert approvers([review("", "APPROVED")]) == set()
    assert approvers([review("alice", "APPROVED"), review("", "CHANGES_REQUESTED", at=LATER)]) == {"alice"}


def test_empty_shas_never_match():
    assert approvers([review("alice", "APPROVED", "")], plan=replace(PLAN, head_sha="")) == set()
    assert approvers([review("alice", "APPROVED", "")]) == set()
    assert approvers([review("alice", "APPROVED")], plan=replace(PLAN, head_sha="")) == set()


def test_sha_comparison_ignores_case():
    assert approvers([review("alice", "APPROVED", HEAD.upper())]) == {"alice"}


# --- reviews: bound to the plan shown before them ---------------------------------------------


def test_review_in_the_same_second_the_plan_was_shown_counts():
    assert approvers([review("alice", "APPROVED", at=SHOWN)]) == {"alice"}


def test_review_one_second_before_the_plan_was_shown_does_not_count():
    assert approvers([review("alice", "APPROVED", at=BEFORE)]) == set()


def test_a_plan_never_shown_is_never_approved():
    never_shown = replace(PLAN, shown_at=None)
    assert approvers([review("alice", "APPROVED", at=LATER)], plan=never_shown) == set()
    assert approvers([], [CommentApproval("bob", LATER)], plan=never_shown) == set()


@pytest.mark.parametrize("when", ["", "not a time", "2026-12-07T25:00:00Z"])
def test_review_with_an_unreadable_time_does_not_count(when: str):
    assert approvers([review("alice", "APPROVED", at=when)]) == set()


def test_plan_with_an_unreadable_shown_time_is_never_approved():
    garbled = replace(PLAN, shown_at="19:20 yesterday")
    assert approvers([review("alice", "APPROVED", at=LATER)], [CommentApproval("bob", LATER)], plan=garbled) == set()


# --- comment approvals (`deploybot approve`) ---------------------------------------------------


def test_comment_approval_after_the_plan_was_shown_counts():
    assert approvers([], [CommentApproval("bob", AFTER)]) == {"bob"}


def test_comment_approval_in_the_same_second_counts_one_second_earlier_does_not():
    assert approvers([], [CommentApproval("bob", SHOWN)]) == {"bob"}
    assert approvers([], [CommentApproval("bob", BEFORE)]) == set()


@pytest.mark.parametrize("when", ["", "now", "2026-02-30T10:00:00Z"])
def test_comment_approval_with_an_unreadable_time_does_not_count(when: str):
    assert approvers([], [CommentApproval("bob", when)]) == set()


def test_comment_approval_without_a_user_is_ignored():
    assert approvers([], [CommentApproval("", AFTER)]) == set()


def test_later_changes_request_voids_a_comment_approval():
    assert approvers([review("bob", "CHANGES_REQUESTED", at=LATER)], [CommentApproval("bob", AFTER)]) == set()


def test_changes_request_in_the_same_second_voids_a_comment_approval():
    # Which came first cannot be told: the approval does not count.
    assert approvers([review("bob", "CHANGES_REQUESTED", at=AFTER)], [CommentApproval("bob", AFTER)]) == set()


def test_earlier_changes_request_does_not_void_a_comment_approval():
    assert approvers([review("bob", "CHANGES_REQUESTED", at=SHOWN)], [CommentApproval("bob", AFTER)]) == {"bob"}
    assert approvers([review("bob", "CHANGES_REQUESTED", at=BEFORE)], [CommentApproval("bob", AFTER)]) == {"bob"}


def test_changes_request_voids_a_comment_approval_case_insensitively():
    assert approvers([review("BOB", "changes_requested", at=LATER)], [CommentApproval("Bob", AFTER)]) == set()


def test_later_dismissed_or_unknown_review_voids_a_comment_approval():
    assert approvers([review("bob", "DISMISSED", at=LATER)], [CommentApproval("bob", AFTER)]) == set()
    assert approvers([review("bob", "SOMETHING_NEW", at=LATER)], [CommentApproval("bob", AFTER)]) == set()


def test_later_comment_review_leaves_a_comment_approval_in_place():
    assert approvers([review("bob", "COMMENTED", at=LATER)], [CommentApproval("bob", AFTER)]) == {"bob"}


def test_changes_request_by_someone_else_does_not_void_a_comment_approval():
    assert approvers([review("carol", "CHANGES_REQUESTED", at=LATER)], [CommentApproval("bob", AFTER)]) == {"bob"}


def test_reviews_and_comment_approvals_add_up():
    reviews = [review("alice", "APPROVED"), review("carol", "APPROVED", at=BEFORE)]
    comments = [CommentApproval("bob", AFTER), CommentApproval("dave", BEFORE)]
    assert approvers(reviews, comments) == {"alice", "bob"}


# --- four eyes: who never approves --------------------------------------------------------------


def test_excluded_users_never_count():
    reviews = [review("Alice", "APPROVED"), review("bob", "APPROVED")]
    comments = [CommentApproval("CAROL", AFTER), CommentApproval("dave", AFTER)]
    assert approvers(reviews, comments, excluded={"alice", "carol"}) == {"bob", "dave"}
    assert approvers(reviews, comments) == {"Alice", "bob", "CAROL", "dave"}


REPO = Repo(forge="github", full_name="acme/infra", clone_url="", default_branch="main")


def pull(**changes: object) -> PullRequest:
    base = PullRequest(repo=REPO, number=7, head_sha=HEAD, head_ref="feature", base_ref="main",
                       author="Alice", is_fork=False, state="closed", merged=True)
    return replace(base, **changes)  # type: ignore[arg-type]


def test_author_and_committers_are_excluded_by_default():
    repo = policy()
    assert repo.approvers_exclude == {"author", "committers"}
    assert excluded_approvers(repo, pull(), {"Bob", "carol", ""}) == {"alice", "bob", "carol"}


def test_excluding_only_the_author():
    assert excluded_approvers(policy("approvers_exclude: [author]"), pull(), {"Bob", "carol"}) == {"alice"}


def test_excluding_only_committers():
    assert excluded_approvers(policy("approvers_exclude: [committers]"), pull(), {"Bob"}) == {"bob"}


def test_excluding_nobody():
    assert excluded_approvers(policy("approvers_exclude: []"), pull(), {"Bob", "carol"}) == set()


def test_unknown_author_excludes_nobody_by_accident():
    assert excluded_approvers(policy("approvers_exclude: [author]"), pull(author=""), set()) == set()


@pytest.mark.parametrize(
    ("exclude", "counted"),
    [
        ("", {"dave"}),  # default: the author and the committer bob are both out
        ("approvers_exclude: [author, committers]", {"dave"}),
        ("approvers_exclude: [author]", {"bob", "dave"}),
        ("approvers_exclude: []", {"Alice", "bob", "dave"}),
    ],
)
def test_self_approval_end_to_end(exclude: str, counted: set[str]):
    repo = policy(exclude)
    excluded = excluded_approvers(repo, pull(), {"bob"})
    reviews = [review("Alice", "APPROVED"), review("bob", "APPROVED"), review("dave", "APPROVED")]
    assert approvers(reviews, excluded=excluded) == counted


# --- check_apply_requirements ----------------------------------------------------------------


def policy(body: str = "") -> RepoPolicy:
    text = "repos:\n  acme/infra:\n" + "".join(f"    {line}\n" for line in body.splitlines()) + (
        "    projects: [{dir: a}]\n"
    )
    return load_policy(text).repos["acme/infra"]


def facts(**changes: object) -> ApplyFacts:
    base = ApplyFacts(
        head_sha=HEAD,
        plan=PLAN,
        approvers={"alice"},
        mergeable=Mergeability(True),
        behind_base=False,
        base_ref="main",
    )
    return replace(base, **changes)  # type: ignore[arg-type]


ALL = "apply_requirements: [approved, mergeable, undiverged]"
NEEDS_ONE = "plan `0123456789ab` needs 1 approval from approvers, has 0"


def test_everything_holds():
    assert check_apply_requirements(policy(ALL), facts()) == []


def test_requirement_names():
    assert {r.value for r in ApplyRequirement} == {"approved", "mergeable", "undiverged"}
    assert ApplyRequirement.APPROVED == "approved"


def test_no_plan():
    assert check_apply_requirements(policy(), facts(plan=None)) == [
        "no plan for the current head abc1234 — comment `deploybot plan` first"
    ]


def test_no_plan_is_the_only_reason_even_without_approvals():
    # There is no plan id to name, so no approvals line: just the missing plan.
    assert check_apply_requirements(policy(), facts(plan=None, approvers=set())) == [
        "no plan for the current head abc1234 — comment `deploybot plan` first"
    ]


def test_plan_of_an_older_commit():
    assert check_apply_requirements(policy(), facts(plan=replace(PLAN, head_sha=OLD))) == [
        "the plan was made for 0ld5678 but the head is now abc1234 — comment `deploybot plan` again"
    ]


def test_plan_sha_comparison_ignores_case():
    assert check_apply_requirements(policy(), facts(plan=replace(PLAN, head_sha=HEAD.upper()))) == []


def test_plan_check_applies_even_with_no_requirements():
    repo = policy("apply_requirements: []")
    assert repo.apply_requirements == frozenset()
    assert check_apply_requirements(repo, facts(approvers=set(), plan=None)) != []
    assert check_apply_requirements(repo, facts(approvers=set(), plan=replace(PLAN, head_sha=OLD))) != []
    assert check_apply_requirements(repo, facts(approvers=set())) == []


def test_unknown_head_is_refused():
    reasons = check_apply_requirements(policy(), facts(head_sha="", plan=replace(PLAN, head_sha="")))
    assert reasons[0] == "the head commit of the pull request is unknown — try again in a moment"
    assert check_apply_requirements(policy("apply_requirements: []"), facts(head_sha="", plan=None)) != []


def test_approvals_count_and_the_reason_names_the_plan_id():
    assert plan_id(SHA256) == "0123456789ab"
    repo = policy("approvals: 2")
    assert check_apply_requirements(repo, facts(approvers={"bob"})) == [
        "plan `0123456789ab` needs 2 approvals from approvers, has 1 (bob)"
    ]
    assert check_apply_requirements(repo, facts(approvers=set())) == [
        "plan `0123456789ab` needs 2 approvals from approvers, has 0"
    ]
    assert check_apply_requirements(repo, facts(approvers={"bob", "alice"})) == []
    assert check_apply_requirements(policy(), facts(approvers=set())) == [NEEDS_ONE]


def test_approvals_reason_names_the_plan_it_is_about():
    other = replace(PLAN, sha256=OTHER_SHA256)
    assert check_apply_requirements(policy(), facts(plan=other, approvers=set())) == [
        f"plan `{plan_id(OTHER_SHA256)}` needs 1 approval from approvers, has 0"
    ]
    assert plan_id(OTHER_SHA256) == "fedcba987654"


def test_approvers_are_listed_sorted_ignoring_case():
    reasons = check_apply_requirements(policy("approvals: 4"), facts(approvers={"bob", "Carol", "alice"}))
    assert reasons == ["plan `0123456789ab` needs 4 approvals from approvers, has 3 (alice, bob, Carol)"]


def test_same_user_in_two_spellings_counts_once():
    repo = policy("approvals: 2")
    assert check_apply_requirements(repo, facts(approvers={"Bob", "bob"})) != []
    assert check_apply_requirements(repo, facts(approvers={"Bob", "carol"})) == []


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
    assert check_apply_requirements(repo, facts(mergeable=None)) == [
        "the forge has not yet decided whether the pull request is mergeable — try again in a moment"
    ]
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
    assert check_apply_requirements(repo, facts(behind_base=None)) == [
        "could not tell whether the branch is behind main — try again in a moment"
    ]
    assert check_apply_requirements(policy(), facts(behind_base=True)) == []


def test_every_failure_is_reported_at_once():
    reasons = check_apply_requirements(
        policy(ALL + "\napprovals: 2"),
        facts(plan=replace(PLAN, head_sha=OLD), approvers={"bob"},
              mergeable=Mergeability(False, "blocked"), behind_base=True),
    )
    assert reasons == [
        "the plan was made for 0ld5678 but the head is now abc1234 — comment `deploybot plan` again",
        "plan `0123456789ab` needs 2 approvals from approvers, has 1 (bob)",
        "the pull request is not mergeable: blocked",
        "the branch is behind main: merge or rebase first",
    ]


@pytest.mark.parametrize(
    ("later", "when", "applies"),
    [
        ("APPROVED", AFTER, True),
        ("APPROVED", SHOWN, True),
        ("APPROVED", BEFORE, False),  # approved what was there before this plan
        ("COMMENTED", AFTER, False),  # the old approval stays an approval of the old commit
    ],
)
def test_end_to_end_reviews_to_reasons(later: str, when: str, applies: bool):
    reviews = [review("bob", "APPROVED", OLD, BEFORE), review("bob", later, at=when)]
    counted = approvers(reviews, excluded=excluded_approvers(policy(), pull(), set()))
    reasons = check_apply_requirements(policy(), facts(approvers=counted))
    assert reasons == ([] if applies else [NEEDS_ONE])


def test_end_to_end_a_new_plan_voids_the_approvals_of_the_old_one():
    # bob approved the first plan; a re-plan of the same commit was shown later.
    reviews = [review("bob", "APPROVED", at=AFTER)]
    comments = [CommentApproval("carol", AFTER)]
    replanned = PlanFacts(head_sha=HEAD, sha256=OTHER_SHA256, shown_at=LATER)
    assert approvers(reviews, comments) == {"bob", "carol"}
    counted = approvers(reviews, comments, plan=replanned)
    assert counted == set()
    assert check_apply_requirements(policy(), facts(plan=replanned, approvers=counted)) == [
        "plan `fedcba987654` needs 1 approval from approvers, has 0"
    ]


# --- merge_apply_refusals --------------------------------------------------------------------


ON_MERGE = "apply_on_merge: true"


def test_merge_into_the_default_branch_applies():
    assert merge_apply_refusals(policy(ON_MERGE), pull()) == []


def test_merge_into_another_base_is_refused_naming_the_default_branch():
    assert merge_apply_refusals(policy(ON_MERGE), pull(base_ref="dev")) == [
        "it was merged into `dev`, and only merges into `main` apply"
    ]


def test_the_default_branch_is_the_repositorys():
    trunk = pull(repo=replace(REPO, default_branch="trunk"), base_ref="trunk")
    assert merge_apply_refusals(policy(ON_MERGE), trunk) == []
    assert merge_apply_refusals(policy(ON_MERGE), replace(trunk, base_ref="main")) == [
        "it was merged into `main`, and only merges into `trunk` apply"
    ]


def test_apply_on_merge_branches_are_honoured():
    repo = policy(ON_MERGE + "\napply_on_merge_branches: [release, prod/eu]")
    assert repo.apply_on_merge_branches == ("release", "prod/eu")
    assert merge_apply_refusals(repo, pull(base_ref="release")) == []
    assert merge_apply_refusals(repo, pull(base_ref="prod/eu")) == []
    # Given branches replace the default branch rather than add to it.
    assert merge_apply_refusals(repo, pull(base_ref="main")) == [
        "it was merged into `main`, and only merges into `release`, `prod/eu` apply"
    ]
    assert merge_apply_refusals(repo, pull(base_ref="prod")) != []


def test_apply_on_merge_branches_may_include_the_default_branch():
    repo = policy(ON_MERGE + "\napply_on_merge_branches: [main, release]")
    assert merge_apply_refusals(repo, pull(base_ref="main")) == []
    assert merge_apply_refusals(repo, pull(base_ref="dev")) == [
        "it was merged into `dev`, and only merges into `main`, `release` apply"
    ]


def test_unmerged_pull_request_is_refused():
    assert merge_apply_refusals(policy(ON_MERGE), pull(merged=False)) == [
        "the forge does not report the pull request as merged"
    ]


def test_repository_that_does_not_apply_on_merge_refuses():
    assert merge_apply_refusals(policy(), pull()) == ["this repository does not apply on merge"]
    assert merge_apply_refusals(policy("apply_on_merge: false"), pull(merged=False)) == [
        "this repository does not apply on merge"
    ]
