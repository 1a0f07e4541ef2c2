"""The `mergeable` apply requirement end to end on each forge: what the forge blocks, the bot refuses.

Real HTTP, git and terraform: an approved pull request that the forge would not merge
(required reviews missing, a rule the bot cannot see) is refused with the forge's reason on
the pull request; the same pull request applies once the forge would merge it. A base
branch without classic protection (GitHub's 404 "Branch not protected") is no error.
"""

from __future__ import annotations

from bot.sandbox.trial import REPO
from tests.world import MakeWorld, World, staging_change

MERGEABLE = {"apply_requirements": ["approved", "mergeable"]}


def planned_and_approved(world: World) -> int:
    """A pull request changing staging, planned and approved by dave (one approval: the policy's)."""
    number = world.open_pr("resize-staging", staging_change(world))
    world.wait_comment(number, "**deploybot plan**")
    world.forge.approve(number, "dave")
    world.wait_idle()
    return number


def apply(world: World, number: int) -> str:
    """Ask for an apply as bob and return the bot's answer."""
    seen = len(world.bot_comments(number))
    world.comment(number, "bob", "deploybot apply")
    return world.wait_comment(number, "**deploybot apply**", after=seen)


def test_approved_but_missing_the_forges_required_reviews_is_refused(make_world: MakeWorld):
    world = make_world(MERGEABLE)
    if world.forge.name == "github":
        world.forge.fake.set_required_reviews(REPO, "main", 2)  # branch protection: two approvals
        reason = "it lacks the approving reviews main requires"
    else:
        world.forge.fake.set_project_settings(REPO, approvals_required=2)
        reason = "lacks the approvals GitLab requires (GitLab: not_approved)"
    number = planned_and_approved(world)

    refused = apply(world, number)
    assert "apply refused" in refused and "the pull request is not mergeable" in refused and reason in refused
    assert "internal error" not in refused
    assert world.state_resources("staging") == 0

    # Positive control: a second approval satisfies the forge, and the same request applies.
    world.forge.approve(number, "bob")
    world.wait_idle()
    assert "`staging`: applied" in apply(world, number)
    assert world.state_resources("staging") > 0


def test_blocked_for_a_reason_the_bot_cannot_see_is_refused(make_world: MakeWorld):
    world = make_world(MERGEABLE)
    number = planned_and_approved(world)
    if world.forge.name == "github":
        # GitHub says blocked, yet the base has no classic protection (404) and no ruleset
        # the bot can read: whatever blocks it, the bot refuses rather than guess.
        world.forge.fake.set_mergeable_state(REPO, number, "blocked")
        reason = "it is blocked by main's protection (missing required reviews or checks)"
    else:
        world.forge.fake.set_detailed_merge_status(REPO, number, "discussions_not_resolved")
        reason = "unresolved threads (GitLab: discussions_not_resolved)"

    refused = apply(world, number)
    assert "apply refused" in refused and reason in refused and "internal error" not in refused
    assert world.state_resources("staging") == 0

    # Positive control: the forge's own verdict again ("clean" / "mergeable"), and it applies.
    if world.forge.name == "github":
        world.forge.fake.set_mergeable_state(REPO, number, "clean")
    else:
        world.forge.fake.set_detailed_merge_status(REPO, number, "mergeable")
    assert "`staging`: applied" in apply(world, number)


def test_a_base_without_classic_protection_applies(make_world: MakeWorld):
    """No classic protection is no error; a ruleset that requires our own status does not deadlock."""
    world = make_world(MERGEABLE)
    if world.forge.name == "github":
        world.forge.fake.set_branch_rules(REPO, "main", [{"type": "required_status_checks", "parameters": {
            "strict_required_status_checks_policy": False,
            "required_status_checks": [{"context": "deploybot/apply"}],
        }}])
    number = planned_and_approved(world)
    if world.forge.name == "github":
        assert world.forge.fake.pull(REPO, number)["mergeable_state"] == "blocked"  # by our own status

    assert "`staging`: applied" in apply(world, number)
    if world.forge.name == "github":
        answers = [r.status for r in world.forge.fake.requests if r.path == f"/repos/{REPO}/branches/main/protection"]
        assert answers and set(answers) == {404}
