"""An approval is of a plan: each way to apply without a valid approval, tried on the real bot.

Every attack runs on both forges with real terraform, git and HTTP, and ends with nothing
applied; next to it, the honest path still applies. The people (bot.sandbox.forges.PEOPLE):
alice and carol are developers, bob and dave approvers and appliers.
"""

from __future__ import annotations

import json
import re
import time

import pytest

from bot.sandbox.local_forge import Fault
from bot.sandbox.trial import git, wait_for
from tests.test_flow import post_webhook
from tests.world import MakeWorld, World, staging_change

PLAN_ID = re.compile(r"plan `([0-9a-f]{12})`")


def plan_comments(world: World, number: int) -> list[str]:
    return [c for c in world.bot_comments(number) if "**deploybot plan**" in c]


def wait_plan(world: World, number: int, count: int) -> str:
    """The `count`th plan comment, once the bot has also recorded it as shown (its status follows)."""
    wait_for(lambda: len(plan_comments(world, number)) >= count, 120, f"plan comment {count}")
    world.wait_status(number, "deploybot/plan", "success")
    world.wait_idle()
    return plan_comments(world, number)[count - 1]


def next_second() -> None:
    """Let the forge's clock (GitHub's is in whole seconds) move on before the next step."""
    time.sleep(1.1)


def apply_as(world: World, number: int, user: str = "bob") -> str:
    """Comment `deploybot apply` and return the bot's answer to it."""
    seen = len(world.bot_comments(number))
    world.comment(number, user, "deploybot apply")
    return world.wait_comment(number, "**deploybot apply**", after=seen)


def answer_to(world: World, number: int, user: str, body: str, contains: str) -> str:
    seen = len(world.bot_comments(number))
    world.comment(number, user, body)
    return world.wait_comment(number, contains, after=seen)


def audit(world: World, action: str, outcome: str) -> list[dict]:
    store = world.store()
    try:
        return [e for e in store.audit_entries(500) if e["action"] == action and e["outcome"] == outcome]
    finally:
        store.close()


def push_as(world: World, number: int, branch: str, files: dict[str, str], user: str,
            identity: str | None = None) -> str:
    """`user` commits to the pull request's branch (as `identity`'s name and e-mail, by default
    their own) and pushes."""
    identity = identity or user
    git("switch", "--quiet", branch, cwd=world.repo.work)
    world.repo.write(files)
    git("add", "--all", cwd=world.repo.work)
    git("-c", f"user.name={identity}", "-c", f"user.email={identity}@example.com",
        "commit", "--quiet", "-m", f"{user}'s change", cwd=world.repo.work)
    world.repo.push(branch)
    world.forge.synchronize(number, pusher=user)
    return world.repo.sha()


# 1. apply_on_merge into any branch -----------------------------------------------------------


def test_apply_on_merge_applies_only_merges_into_the_default_branch(make_world: MakeWorld):
    world = make_world({"apply_on_merge": True})
    world.repo.branch("scratch", "main")
    world.repo.push("scratch")

    # The attack: alice opens a pull request into her own unprotected branch and merges it alone.
    attack = world.open_pr("sneaky", staging_change(world), base="scratch")
    wait_plan(world, attack, 1)
    world.forge.merge(attack)
    refused = world.wait_comment(attack, "applied nothing")
    assert "merged into `scratch`, and only merges into `main` apply" in refused
    world.wait_idle()
    assert world.state_resources("staging") == 0
    assert any("apply on merge" in e["detail"] for e in audit(world, "apply", "refused"))

    # The honest path: a merge into the default branch applies the reviewed plan.
    honest = world.open_pr("resize-staging", staging_change(world))
    wait_plan(world, honest, 1)
    world.forge.merge(honest)
    assert "`staging`: applied plan" in world.wait_comment(honest, "**deploybot apply**")
    assert world.state_resources("staging") == 2


def test_a_closed_payload_that_claims_a_merge_is_checked_with_the_forge(make_world: MakeWorld):
    world = make_world({"apply_on_merge": True})
    number = world.open_pr("resize-staging", staging_change(world))
    wait_plan(world, number, 1)
    # A correctly signed body (think: a captured one, edited by whoever holds the secret) says
    # the still open pull request was merged. The bot asks the forge, which says it was not.
    opened = json.loads(next(d.body for d in world.forge.fake.deliveries if d.action in ("opened", "open")))
    if world.forge.name == "github":
        opened["action"] = "closed"
        opened["pull_request"].update(state="closed", merged=True)
        event = "pull_request"
    else:
        opened["object_attributes"].update(action="merge", state="merged")
        event = "Merge Request Hook"
    assert post_webhook(world, event, json.dumps(opened).encode()).status_code in (200, 202)
    world.wait_comment(number, "applied nothing")
    world.wait_idle()
    assert world.state_resources("staging") == 0
    assert any("does not report the pull request as merged" in e["detail"] for e in audit(world, "apply", "refused"))


# 2. an approval comment binds to whatever head the bot sees when it handles it ---------------


def test_a_replayed_approve_comment_approves_nothing_new(make_world: MakeWorld):
    world = make_world()
    number = world.open_pr("resize-staging", staging_change(world))
    first = PLAN_ID.search(wait_plan(world, number, 1)).group(1)
    approved = answer_to(world, number, "bob", "deploybot approve", "approved")
    assert f"plan `{first}` of `staging`" in approved
    captured = next(d.delivery_id for d in reversed(world.forge.fake.deliveries)
                    if b"deploybot approve" in d.body)

    # alice pushes more; then the captured approve is sent again under a new delivery id.
    next_second()
    world.push(number, "resize-staging", staging_change(world, size="huge"))
    second = PLAN_ID.search(wait_plan(world, number, 2)).group(1)
    assert second != first
    world.forge.fake.replay(captured)
    world.wait_idle()
    assert any("was acted on before" in e["detail"] for e in audit(world, "approve", "refused"))
    refused = apply_as(world, number)
    assert "apply refused" in refused and f"plan `{second}` needs 1 approval from approvers" in refused
    assert world.state_resources("staging") == 0

    # The honest path: bob approves what he now sees, and the apply runs that plan.
    assert f"plan `{second}`" in answer_to(world, number, "bob", "deploybot approve", "approved")
    assert f"applied plan `{second}`" in apply_as(world, number)
    assert world.state_resources("staging") == 2


def test_an_approve_handled_late_approves_only_the_plan_shown_before_it(make_world: MakeWorld):
    world = make_world()
    number = world.open_pr("resize-staging", staging_change(world))
    wait_plan(world, number, 1)

    # The bot cannot be reached while bob approves (the forge's delivery fails) ...
    world.forge.set_webhook("http://127.0.0.1:9")
    world.comment(number, "bob", "deploybot approve")
    failed = world.forge.fake.deliveries[-1]
    assert failed.status == 0
    world.forge.set_webhook(world.url)
    # ... and by the time it is redelivered, alice has pushed and a new plan is shown.
    next_second()
    world.push(number, "resize-staging", staging_change(world, size="huge"))
    wait_plan(world, number, 2)
    world.forge.fake.redeliver(failed.delivery_id)
    assert "Nothing approved" in world.wait_comment(number, "Nothing approved")
    assert "apply refused" in apply_as(world, number)
    assert world.state_resources("staging") == 0

    # Positive control: a delivery that arrives late, before any new plan, still approves.
    world.forge.set_webhook("http://127.0.0.1:9")
    world.comment(number, "dave", "deploybot approve")
    late = world.forge.fake.deliveries[-1]
    world.forge.set_webhook(world.url)
    world.forge.fake.redeliver(late.delivery_id)
    world.wait_comment(number, "@dave approved")
    assert "applied plan" in apply_as(world, number)


# 3. a re-plan after the approval ---------------------------------------------------------------


def test_a_replan_at_the_same_head_voids_every_approval_of_the_old_plan(make_world: MakeWorld):
    world = make_world()
    number = world.open_pr("resize-staging", staging_change(world))
    first = PLAN_ID.search(wait_plan(world, number, 1)).group(1)
    assert first in world.statuses(number)["deploybot/plan: staging"][1]
    world.comment(number, "bob", "deploybot approve")
    world.wait_comment(number, "@bob approved")
    world.forge.approve(number, "dave")
    world.wait_idle()

    # alice plans again at the same head: a new plan, that nobody has seen yet.
    next_second()
    world.comment(number, "alice", "deploybot plan")
    second = PLAN_ID.search(wait_plan(world, number, 2)).group(1)
    assert second != first
    refused = apply_as(world, number)
    assert "apply refused" in refused and f"plan `{second}` needs 1 approval from approvers, has 0" in refused
    assert world.state_resources("staging") == 0
    # The old plan's id names nothing any more.
    assert "is not a current plan" in answer_to(world, number, "bob", f"deploybot approve {first}",
                                                "Nothing approved")

    # Positive control: approving the new plan by its id lets it apply.
    assert f"plan `{second}`" in answer_to(world, number, "bob", f"deploybot approve {second}", "approved")
    assert f"applied plan `{second}`" in apply_as(world, number)
    assert world.state_resources("staging") == 2


# 4. four eyes -------------------------------------------------------------------------------------


# bob commits as himself, or as alice (a commit's e-mail is whatever git was told), and pushes.
@pytest.mark.parametrize("identity", [None, "alice"], ids=["own-name", "someone-elses-name"])
def test_an_approver_who_pushed_a_commit_to_the_pull_request_cannot_approve_it(make_world: MakeWorld,
                                                                              identity: str | None):
    world = make_world()
    number = world.open_pr("resize-staging", staging_change(world))
    wait_plan(world, number, 1)
    next_second()
    push_as(world, number, "resize-staging", staging_change(world, size="huge"), "bob", identity=identity)
    wait_plan(world, number, 2)
    # bob then approves in both ways.
    assert "cannot approve" in answer_to(world, number, "bob", "deploybot approve", "@bob")
    world.forge.approve(number, "bob")
    world.wait_idle()
    refused = apply_as(world, number, "bob")
    assert "apply refused" in refused and "needs 1 approval from approvers, has 0" in refused
    assert world.state_resources("staging") == 0
    assert any("committer" in e["detail"] for e in audit(world, "approve", "refused"))

    # Positive control: dave, who wrote and pushed none of it, approves; bob may then apply.
    world.forge.approve(number, "dave")
    assert "applied plan" in apply_as(world, number, "bob")
    assert world.state_resources("staging") == 2


def test_approvers_exclude_author_only_lets_a_committer_approve(make_world: MakeWorld):
    world = make_world({"approvers_exclude": ["author"]})
    number = world.open_pr("resize-staging", staging_change(world))
    wait_plan(world, number, 1)
    next_second()
    push_as(world, number, "resize-staging", staging_change(world, size="huge"), "bob")
    wait_plan(world, number, 2)
    assert "@bob approved" in answer_to(world, number, "bob", "deploybot approve", "@bob approved")
    assert "applied plan" in apply_as(world, number, "dave")


# 6. a comment approval and a later "request changes" ---------------------------------------------


def test_changes_requested_voids_the_same_approvers_comment_approval(make_world: MakeWorld):
    world = make_world()
    number = world.open_pr("resize-staging", staging_change(world))
    wait_plan(world, number, 1)
    world.comment(number, "bob", "deploybot approve")
    world.wait_comment(number, "@bob approved")
    next_second()
    if world.forge.name == "gitlab":
        world.forge.approve(number, "bob")  # GitLab's nearest to "request changes": withdraw an approval
        world.wait_idle()
    world.forge.request_changes(number, "bob")
    world.wait_idle()
    refused = apply_as(world, number, "dave")
    assert "apply refused" in refused and "needs 1 approval from approvers, has 0" in refused
    assert world.state_resources("staging") == 0

    # Positive control: bob approves again, later than his change request.
    next_second()
    assert "@bob approved" in answer_to(world, number, "bob", "deploybot approve", "@bob approved")
    assert "applied plan" in apply_as(world, number, "dave")
    assert world.state_resources("staging") == 2


# A forge error while the apply gate asks the API ---------------------------------------------------


def test_a_forge_error_in_the_apply_gate_fails_closed_and_says_what_the_forge_said(make_world: MakeWorld):
    world = make_world()
    number = world.open_pr("resize-staging", staging_change(world))
    wait_plan(world, number, 1)
    world.forge.approve(number, "dave")
    world.wait_idle()
    # The approvals cannot be read when the apply starts: GitHub's reviews, GitLab's approvals.
    approvals = r"/pulls/\d+/reviews$" if world.forge.name == "github" else r"/merge_requests/\d+/approvals$"
    world.forge.fake.inject_faults("GET", approvals, [Fault(403, {}, {"message": "Resource not accessible"})])
    refused = apply_as(world, number)
    assert "apply refused: could not check the apply requirements:" in refused
    assert "Resource not accessible" in refused and "internal error" not in refused
    assert world.state_resources("staging") == 0

    # Positive control: once the forge answers again, the same approval applies.
    assert "applied plan" in apply_as(world, number)


def test_a_withdrawal_voids_a_comment_approval_that_reaches_the_bot_after_it(make_world: MakeWorld):
    world = make_world()
    number = world.open_pr("resize-staging", staging_change(world))
    wait_plan(world, number, 1)
    world.forge.approve(number, "bob")
    world.wait_idle()
    # bob comments `deploybot approve`, but its delivery fails and comes back only after bob has
    # withdrawn his approval (GitHub: requested changes), whose webhook the bot handled first.
    world.forge.set_webhook("http://127.0.0.1:9")
    world.comment(number, "bob", "deploybot approve")
    late = world.forge.fake.deliveries[-1]
    world.forge.set_webhook(world.url)
    next_second()
    world.forge.request_changes(number, "bob")
    world.wait_idle()
    world.forge.fake.redeliver(late.delivery_id)
    world.wait_comment(number, "@bob approved")
    refused = apply_as(world, number, "dave")
    assert "apply refused" in refused and "has 0" in refused
    assert world.state_resources("staging") == 0

    # Positive control: approving again, after the withdrawal, counts.
    next_second()
    assert "@bob approved" in answer_to(world, number, "bob", "deploybot approve", "@bob approved")
    assert "applied plan" in apply_as(world, number, "dave")
