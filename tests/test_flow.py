"""The pull/merge-request flow end to end on each forge: real HTTP, real git, real terraform."""

from __future__ import annotations

import copy
import json
import re
import uuid
from pathlib import Path

import httpx
import pytest

from bot.forges.github.webhook import sign
from bot.models import Repo
from bot.sandbox.forges import FORGES, WEBHOOK_SECRET
from bot.sandbox.trial import REPO, project_files, wait_for
from tests.world import TEST_POLICY, MakeWorld, World, staging_change


def post_webhook(world: World, event: str, body: bytes, secret: str | None = WEBHOOK_SECRET,
                 delivery: str | None = None) -> httpx.Response:
    """Send a webhook the way the world's forge signs it (secret None: unsigned)."""
    delivery = delivery or str(uuid.uuid4())
    headers = {"Content-Type": "application/json"}
    if world.forge.name == "github":
        headers |= {"X-GitHub-Event": event, "X-GitHub-Delivery": delivery}
        if secret is not None:
            headers["X-Hub-Signature-256"] = sign(body, secret.encode())
    else:
        headers |= {"X-Gitlab-Event": event, "X-Gitlab-Event-UUID": delivery}
        if secret is not None:
            headers["X-Gitlab-Token"] = secret
    return httpx.post(f"{world.url}/webhooks/{world.forge.name}", content=body, headers=headers, timeout=30)


def test_webhook_intake_answers_bad_input_with_4xx(make_world: MakeWorld):
    world = make_world()
    event = "pull_request" if world.forge.name == "github" else "Merge Request Hook"
    body = json.dumps({"object_kind": "merge_request", "action": "opened"}).encode()
    assert post_webhook(world, event, body, secret=None).status_code == 401
    assert post_webhook(world, event, body, secret="wrong-secret").status_code == 401
    assert post_webhook(world, event, b"{not json").status_code == 400
    assert post_webhook(world, event, b'{"action": "opened", "object_attributes": {"action": "open"}}').status_code == 400
    unknown = post_webhook(world, "Star Hook" if world.forge.name == "gitlab" else "star", b'{"action": "created"}')
    assert unknown.status_code == 200 and unknown.json()["status"] == "ignored"
    huge = b'{"pad": "' + b"x" * (26 * 1024 * 1024) + b'"}'
    assert post_webhook(world, event, huge).status_code == 413
    assert httpx.post(f"{world.url}/webhooks/bitbucket", content=b"{}").status_code == 404
    metrics = httpx.get(f"{world.url}/metrics").text
    assert (f'deploybot_deliveries_total{{event="unverified",forge="{world.forge.name}",'
            f'outcome="unauthorized"}} 2.0') in metrics
    assert "deploybot_queue_depth 0.0" in metrics and "deploybot_locks 0.0" in metrics
    if world.forge.name == "github":
        assert post_webhook(world, "ping", b'{"zen": "hi"}').status_code == 200


def test_autoplan_plans_only_changed_projects_once(make_world: MakeWorld):
    world = make_world()
    number = world.open_pr("resize-staging", staging_change(world))
    comment = world.wait_comment(number, "**deploybot plan**")
    assert "`staging`: +2 ~0 -0" in comment
    assert "production" not in comment
    assert "Plan: 2 to add, 0 to change, 0 to destroy." in comment
    assert "<details>" in comment and "\x1b[" not in comment

    assert world.wait_status(number, "deploybot/plan", "success") == "1 project(s) planned"
    world.wait_status(number, "deploybot/apply", "pending")  # set just after the plan's
    assert re.fullmatch(r"\+2 ~0 -0 \(plan `[0-9a-f]{12}`\)",
                        world.wait_status(number, "deploybot/plan: staging", "success"))
    statuses = world.statuses(number)
    assert "deploybot/plan: production" not in statuses
    metrics = httpx.get(f"{world.url}/metrics").text
    assert 'deploybot_job_duration_seconds_count{command="plan",outcome="succeeded"} 1.0' in metrics
    assert "deploybot_locks 1.0" in metrics

    # GitHub redelivers the same delivery: acknowledged, but nothing runs twice.
    first = world.forge.delivery_ids()[0]
    assert world.forge.redeliver(first) == 200
    world.wait_idle()
    assert len([c for c in world.bot_comments(number) if "**deploybot plan**" in c]) == 1


def test_module_change_plans_every_project_that_uses_it(make_world: MakeWorld):
    world = make_world()
    module = (world.repo.work / "modules/app/main.tf").read_text()
    number = world.open_pr("module", {"modules/app/main.tf": module + "\n# touched\n"})
    comment = world.wait_comment(number, "**deploybot plan**")
    assert "`staging`: +2 ~0 -0" in comment and "`production`: +2 ~0 -0" in comment


def test_apply_is_gated_on_approval_of_the_current_head(make_world: MakeWorld):
    world = make_world()
    number = world.open_pr("resize-staging", staging_change(world))
    world.wait_comment(number, "**deploybot plan**")

    world.comment(number, "alice", "deploybot apply")
    assert "@alice may not `apply`" in world.wait_comment(number, "may not")

    seen = len(world.bot_comments(number))
    world.comment(number, "bob", "deploybot apply")
    refused = world.wait_comment(number, "**deploybot apply**", after=seen)
    assert "apply refused" in refused and "approval" in refused
    assert world.state_resources("staging") == 0

    # carol may write but is no approver: her review does not count.
    world.forge.approve(number, "carol")
    seen = len(world.bot_comments(number))
    world.comment(number, "bob", "deploybot apply")
    assert "apply refused" in world.wait_comment(number, "**deploybot apply**", after=seen)

    # dave approves, then alice pushes: the approval was for the old head.
    world.forge.approve(number, "dave")
    world.push(number, "resize-staging", staging_change(world, size="huge"))
    seen_plans = len([c for c in world.bot_comments(number) if "**deploybot plan**" in c])
    wait_for(lambda: len([c for c in world.bot_comments(number) if "**deploybot plan**" in c]) > seen_plans,
             120, "the re-plan after the push")
    seen = len(world.bot_comments(number))
    world.comment(number, "bob", "deploybot apply")
    assert "apply refused" in world.wait_comment(number, "**deploybot apply**", after=seen)

    # A paths outside the policy is refused before anything runs.
    seen = len(world.bot_comments(number))
    world.comment(number, "bob", "deploybot apply -d secrets")
    assert "No allow-listed project matches `-d secrets`" in world.wait_comment(number, "No allow-listed", after=seen)

    # dave approves the new head: now bob's apply runs the saved plan.
    world.forge.approve(number, "dave")
    seen = len(world.bot_comments(number))
    world.comment(number, "bob", "deploybot apply")
    applied = world.wait_comment(number, "**deploybot apply**", after=seen)
    assert "`staging`: applied" in applied
    assert "Apply complete! Resources: 2 added" in applied
    assert world.state_resources("staging") == 2
    assert world.wait_status(number, "deploybot/apply", "success") == "applied"


def staging_plan_log(world: World, number: int) -> str:
    """The job log of the staging plan for the pull request's current head."""
    repo = Repo(world.forge.name, REPO, "", "main")
    jobs = world.store().latest_plan_jobs(repo, number, world.head(number))
    job = next(j for j in jobs if j.project.name == "staging")
    return world.job_logs()[job.id]


def wait_plan_comments(world: World, number: int, count: int) -> str:
    """The `count`th plan comment on the pull request, once it is there."""
    def plans() -> list[str]:
        return [c for c in world.bot_comments(number) if "**deploybot plan**" in c]
    wait_for(lambda: len(plans()) >= count, 120, f"plan comment {count}")
    return plans()[count - 1]


def test_replan_after_a_push_skips_init_until_terraform_asks_for_it(make_world: MakeWorld):
    world = make_world()
    number = world.open_pr("resize-staging", staging_change(world))
    wait_plan_comments(world, number, 1)
    assert "Terraform has been successfully initialized" in staging_plan_log(world, number)

    # Same modules and providers: the working dir of the first plan is planned again as is.
    world.push(number, "resize-staging", staging_change(world, size="huge"))
    assert "`staging`: +2 ~0 -0" in wait_plan_comments(world, number, 2)
    log = staging_plan_log(world, number)
    assert "Initializing" not in log and "Plan: 2 to add" in log

    # A new module: terraform refuses to plan without init, so the bot inits and plans again.
    main_tf = staging_change(world, size="huge")["staging/main.tf"]
    world.push(number, "resize-staging", {
        "staging/main.tf": main_tf + 'module "extra" {\n  source = "./extra"\n}\n',
        "staging/extra/main.tf": 'resource "null_resource" "extra" {}\n',
    })
    assert "`staging`: +3 ~0 -0" in wait_plan_comments(world, number, 3)
    log = staging_plan_log(world, number)
    assert "terraform asks for init" in log and "Terraform has been successfully initialized" in log


def test_changes_requested_after_approval_blocks_apply(make_world: MakeWorld):
    world = make_world()
    number = world.open_pr("resize-staging", staging_change(world))
    world.wait_comment(number, "**deploybot plan**")
    world.forge.approve(number, "dave")
    world.forge.request_changes(number, "dave")
    world.comment(number, "bob", "deploybot apply")
    assert "apply refused" in world.wait_comment(number, "**deploybot apply**")
    assert world.state_resources("staging") == 0


def test_approval_comments_count_only_from_approvers(make_world: MakeWorld):
    world = make_world()
    number = world.open_pr("resize-staging", staging_change(world), author="dave")
    world.wait_comment(number, "**deploybot plan**")

    world.comment(number, "carol", "deploybot approve")
    assert "@carol may not `approve`" in world.wait_comment(number, "@carol")
    world.comment(number, "dave", "deploybot approve")
    assert "cannot approve" in world.wait_comment(number, "@dave opened")
    seen = len(world.bot_comments(number))
    world.comment(number, "bob", "deploybot apply")
    assert "apply refused" in world.wait_comment(number, "**deploybot apply**", after=seen)

    world.comment(number, "bob", "deploybot approve -p staging")
    approved = world.wait_comment(number, "@bob approved")
    assert re.search(r"approved plan `[0-9a-f]{12}` of `staging`\.\n", approved)
    seen = len(world.bot_comments(number))
    world.comment(number, "bob", "deploybot apply")
    assert "`staging`: applied" in world.wait_comment(number, "**deploybot apply**", after=seen)
    assert world.state_resources("staging") == 2


def test_auto_apply_on_approval(make_world: MakeWorld):
    world = make_world({"auto_apply_on_approval": True})
    number = world.open_pr("resize-staging", staging_change(world))
    world.wait_comment(number, "**deploybot plan**")
    world.forge.approve(number, "dave")
    assert "`staging`: applied" in world.wait_comment(number, "**deploybot apply**")


def pull_files(world: World, number: int) -> list[str]:
    """The staging working dir and saved plans the bot keeps for a pull request."""
    safe = f"{world.forge.name}_{REPO.lower()}_staging_default".replace("/", "_").replace(":", "_")
    workdir = world.root / "data" / "work" / safe / f"pr-{number}"
    store = world.store()
    try:
        with store._db() as db:
            plans = [f"plan of {r[0]}" for r in db.execute(
                "SELECT project_key FROM plans WHERE pull_number = ?", (number,)).fetchall()]
    finally:
        store.close()
    return ([str(workdir)] if workdir.exists() else []) + plans


def test_apply_on_merge_then_locks_are_free(make_world: MakeWorld):
    world = make_world({"apply_on_merge": True})
    first = world.open_pr("resize-staging", staging_change(world))
    world.wait_comment(first, "**deploybot plan**")
    assert len(pull_files(world, first)) == 2  # the working dir and the saved plan
    world.forge.merge(first)
    assert "`staging`: applied" in world.wait_comment(first, "**deploybot apply**")
    assert world.state_resources("staging") == 2
    world.wait_idle()
    wait_for(lambda: not pull_files(world, first), 30, "the merged pull request's files to go")
    second = world.open_pr("again", staging_change(world, size="tiny"))
    assert "`staging`" in world.wait_comment(second, "**deploybot plan**")


def test_a_closed_pull_request_leaves_no_working_dir_or_plan(make_world: MakeWorld):
    world = make_world()  # no apply on merge: merging only closes it for the bot
    number = world.open_pr("resize-staging", staging_change(world))
    world.wait_comment(number, "**deploybot plan**")
    assert len(pull_files(world, number)) == 2
    world.forge.merge(number)
    wait_for(lambda: not pull_files(world, number), 30, "the closed pull request's files to go")
    assert world.state_resources("staging") == 0


def test_lock_conflict_between_two_pulls_and_unlock(make_world: MakeWorld):
    world = make_world()
    first = world.open_pr("first", staging_change(world))
    world.wait_comment(first, "**deploybot plan**")
    second = world.open_pr("second", staging_change(world, size="tiny"), author="carol")
    assert "locked by #1" in world.wait_comment(second, "locked by")
    world.wait_idle()
    assert not any("**deploybot plan**" in c for c in world.bot_comments(second))

    world.comment(first, "alice", "deploybot unlock")
    assert "`staging`" in world.wait_comment(first, "Unlocked")
    world.comment(second, "carol", "deploybot plan")
    assert "`staging`: +2 ~0 -0" in world.wait_comment(second, "**deploybot plan**")
    # The first pull request's plan was discarded with its lock.
    world.comment(first, "bob", "deploybot apply")
    assert "no saved plan" in world.wait_comment(first, "no saved plan")


def test_fork_pull_requests_are_never_planned(make_world: MakeWorld):
    world = make_world()
    number = world.open_pr("from-fork", staging_change(world), author="eve", fork=True)
    assert "forks" in world.wait_comment(number, "fork")
    world.comment(number, "bob", "deploybot plan")
    world.wait_comment(number, "comes from a fork")
    world.wait_idle()
    assert not any("**deploybot plan**" in c for c in world.bot_comments(number))


def test_terraform_error_is_shown_in_the_comment(make_world: MakeWorld):
    world = make_world()
    number = world.open_pr("broken", {"staging/broken.tf": 'resource "null_resource" {\n'})
    comment = world.wait_comment(number, "**deploybot plan**")
    assert "❌ `staging`: terraform init failed" in comment or "❌ `staging`: terraform plan failed" in comment
    assert "Error:" in comment
    assert "staging" in world.wait_status(number, "deploybot/plan", "failure")


def test_outsiders_and_edits_run_nothing(make_world: MakeWorld):
    world = make_world()
    number = world.open_pr("by-outsider", staging_change(world), author="eve")
    assert "@eve may not plan" in world.wait_comment(number, "did not autoplan")
    world.comment(number, "eve", "deploybot plan")
    world.wait_comment(number, "@eve may not `plan`")
    comment_id = world.comment(number, "eve", "hello")
    world.forge.edit_comment(number, comment_id, "deploybot plan", "eve")
    world.comment(number, "alice", "deploybot plan --destroy")
    world.wait_comment(number, "Usage")
    world.wait_idle()
    assert not any("**deploybot plan**" in c for c in world.bot_comments(number))
    assert world.state_resources("staging") == 0


def test_mergeable_ignores_our_own_required_apply_status(make_world: MakeWorld):
    world = make_world({"apply_requirements": ["approved", "mergeable"]})
    world.forge.require_ci(["deploybot/apply", "ci/test"])
    number = world.open_pr("resize-staging", staging_change(world))
    world.wait_comment(number, "**deploybot plan**")
    world.forge.approve(number, "dave")
    world.forge.set_ci_status(number, "ci/test", "failure")
    world.comment(number, "bob", "deploybot apply")
    refused = world.wait_comment(number, "**deploybot apply**")
    assert "apply refused" in refused and "mergeable" in refused

    # CI passes; the required deploybot/apply status is still pending, which must not deadlock.
    world.forge.set_ci_status(number, "ci/test", "success")
    seen = len(world.bot_comments(number))
    world.comment(number, "bob", "deploybot apply")
    assert "`staging`: applied" in world.wait_comment(number, "**deploybot apply**", after=seen)


def test_undiverged_requires_the_latest_base(make_world: MakeWorld):
    world = make_world({"apply_requirements": ["approved", "undiverged"]})
    number = world.open_pr("resize-staging", staging_change(world))
    world.wait_comment(number, "**deploybot plan**")
    world.forge.approve(number, "dave")
    git_main = world.repo
    git_main.branch("hotfix", "main")
    git_main.commit({"README.md": "hotfix\n"}, "Hotfix on main", push="main")
    world.comment(number, "bob", "deploybot apply")
    refused = world.wait_comment(number, "**deploybot apply**")
    assert "apply refused" in refused and "behind main" in refused


def test_dismissed_review_no_longer_counts(make_world: MakeWorld):
    world = make_world()
    number = world.open_pr("resize-staging", staging_change(world))
    world.wait_comment(number, "**deploybot plan**")
    approval = world.forge.approve(number, "dave")
    world.wait_idle()
    world.forge.withdraw_approval(number, "dave", approval)
    world.comment(number, "bob", "deploybot apply")
    refused = world.wait_comment(number, "**deploybot apply**")
    assert "apply refused" in refused and "approval" in refused


def test_secrets_of_the_bot_environment_are_redacted(make_world: MakeWorld):
    world = make_world(plan_env={"TF_VAR_token": "s3cr3t-plan-token-value"})
    files = staging_change(world)
    files["staging/leak.tf"] = 'variable "token" { type = string }\noutput "leak" { value = var.token }\n'
    number = world.open_pr("leak", files)
    comment = world.wait_comment(number, "**deploybot plan**")
    assert "s3cr3t-plan-token-value" not in comment
    assert "***" in comment


def test_cancel_stops_queued_plans(make_world: MakeWorld):
    world = make_world(parallelism=1)
    module = (world.repo.work / "modules/app/main.tf").read_text()
    number = world.open_pr("module", {"modules/app/main.tf": module + "\n# touched\n"})
    world.comment(number, "alice", "deploybot cancel")
    assert "Cancelled" in world.wait_comment(number, "Cancelled")
    world.wait_idle()
    comment = world.wait_comment(number, "**deploybot plan**")
    assert "⏹️" in comment  # with one job at a time, the second was still queued at least


def test_phase_timeout_is_stopped_and_reported(make_world: MakeWorld):
    world = make_world(apply_timeout=2)
    files = staging_change(world)
    files["staging/slow.tf"] = ('resource "null_resource" "slow" {\n'
                                '  provisioner "local-exec" { command = "sleep 30" }\n}\n')
    number = world.open_pr("slow", files)
    world.wait_comment(number, "**deploybot plan**")
    world.forge.approve(number, "dave")
    world.comment(number, "bob", "deploybot apply")
    comment = world.wait_comment(number, "**deploybot apply**", timeout=60)
    assert "terraform apply timed out" in comment and "was stopped" in comment
    assert world.wait_status(number, "deploybot/apply", "failure") == "apply failed"


def test_project_dir_symlinked_out_of_the_repo_is_refused(make_world: MakeWorld):
    world = make_world()
    world.repo.branch("escape", "main")
    target = world.repo.work / "staging"
    for child in target.iterdir():
        child.unlink()
    target.rmdir()
    target.symlink_to(world.root / "state")  # outside the clone: the bot must not follow it
    world.repo.commit(message="Point staging elsewhere", push="escape")
    number = world.forge.open("escape", author="alice")
    world.comment(number, "alice", "deploybot plan -p staging")
    comment = world.wait_comment(number, "**deploybot plan**")
    assert "❌ `staging`: checkout refused" in comment
    assert "points outside the repository" in comment


def test_repo_file_from_the_base_branch_only_narrows(make_world: MakeWorld):
    world = make_world({"repo_config_file": "deploybot.yaml"})
    world.repo.branch("narrow", "main")
    world.repo.commit({"deploybot.yaml": "projects:\n  - name: production\n"}, "Narrow", push="main")
    module = (world.repo.work / "modules/app/main.tf").read_text()
    # The pull request tries to widen the rules it is judged by, and to add a project.
    number = world.open_pr("widen", {
        "modules/app/main.tf": module + "\n# touched\n",
        "deploybot.yaml": "projects:\n  - name: staging\n  - name: production\n  - dir: secrets\n",
    })
    comment = world.wait_comment(number, "**deploybot plan**")
    assert "`production`: +2 ~0 -0" in comment
    assert "staging" not in comment and "secrets" not in comment
    world.comment(number, "alice", "deploybot plan -p staging")
    assert "No allow-listed project matches `-p staging`" in world.wait_comment(number, "No allow-listed")


def test_readiness_checks_store_disk_terraform_and_forge_credentials(make_world: MakeWorld):
    world = make_world()
    ready = httpx.get(f"{world.url}/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"store": "ok", "disk": "ok", "terraform": "ok", world.forge.name: "ok"}
    assert httpx.get(f"{world.url}/healthz").json() == {"status": "ok"}
    world.forge.stop()  # the forge is unreachable: not ready, and it says why
    broken = httpx.get(f"{world.url}/readyz", timeout=60)
    assert broken.status_code == 503
    assert broken.json()["checks"][world.forge.name].startswith("failed")


def test_a_change_with_nothing_to_plan_says_no_changes(make_world: MakeWorld):
    world = make_world()
    main_tf = (world.repo.work / "staging/main.tf").read_text()
    number = world.open_pr("comment-only", {"staging/main.tf": main_tf + "\n# a comment changes nothing\n"})
    comment = world.wait_comment(number, "**deploybot plan**")
    # The main branch was never applied, so the plan still creates; apply it first.
    assert "`staging`: +2 ~0 -0" in comment
    world.forge.approve(number, "dave")
    world.comment(number, "bob", "deploybot apply")
    world.wait_comment(number, "`staging`: applied")
    world.push(number, "comment-only", {"staging/main.tf": main_tf + "\n# another comment\n"})
    replan = world.wait_comment(number, "`staging`: no changes")
    assert "**deploybot plan**" in replan
    assert world.wait_status(number, "deploybot/apply", "success") == "no changes to apply"


@pytest.mark.parametrize("forge", sorted(FORGES))
def test_a_repository_the_policy_does_not_name_gets_no_answer_at_all(tmp_path: Path, forge: str):
    policy = copy.deepcopy(TEST_POLICY)
    policy["repos"] = {"acme/another-repo": policy["repos"][REPO]}
    world = World(tmp_path, policy, forge=forge)
    try:
        number = world.open_pr("resize", staging_change(world))
        for body in ("deploybot help", "deploybot plan", "deploybot nonsense"):
            world.comment(number, "bob", body)
        world.wait_idle()
        assert world.bot_comments(number) == []
        store = world.store()
        try:
            refused = [e for e in store.audit_entries() if e["outcome"] == "refused"]
        finally:
            store.close()
        assert [(e["action"], e["detail"]) for e in refused] == [("plan", "the repository is not allow-listed")]
    finally:
        world.stop()


def test_a_payload_nested_too_deeply_is_a_400_and_the_connection_stays_usable(make_world: MakeWorld):
    world = make_world()
    deep = "[" * 1000 + '"note"' + "]" * 1000  # within orjson's limit, too deep to print
    if world.forge.name == "gitlab":
        event, body = "Note Hook", f'{{"object_kind": {deep}}}'.encode()
    else:
        event, body = "issue_comment", f'{{"action": "created", "comment": {deep}}}'.encode()
    headers = {"Content-Type": "application/json"}
    with httpx.Client(timeout=30) as http:  # one kept-alive connection for both requests
        for _ in range(2):
            delivery = str(uuid.uuid4())
            if world.forge.name == "github":
                signed = {"X-GitHub-Event": event, "X-GitHub-Delivery": delivery,
                          "X-Hub-Signature-256": sign(body, WEBHOOK_SECRET.encode())}
            else:
                signed = {"X-Gitlab-Event": event, "X-Gitlab-Event-UUID": delivery, "X-Gitlab-Token": WEBHOOK_SECRET}
            answer = http.post(f"{world.url}/webhooks/{world.forge.name}", content=body, headers=headers | signed)
            assert answer.status_code == 400, answer.text
            assert "Traceback" not in answer.text


@pytest.mark.parametrize("bad_name", ["acme/infrastructure-live#x", "a" * 1_000_000, "", "acme/../etc",
                                      "acme/infra live", "no-slash"])
def test_a_repository_name_outside_the_forges_grammar_is_a_400_and_never_stored(make_world: MakeWorld,
                                                                                 bad_name: str):
    world = make_world()
    number = world.open_pr("resize", staging_change(world))
    world.wait_comment(number, "**deploybot plan**")
    world.comment(number, "bob", "deploybot help")
    sent = world.forge.fake.deliveries[-1]
    payload = json.loads(sent.body)
    if world.forge.name == "github":
        payload["repository"]["full_name"] = bad_name
    else:
        payload["project"]["path_with_namespace"] = bad_name
    answer = post_webhook(world, sent.event, json.dumps(payload).encode())
    assert answer.status_code == 400 and "repository path" in answer.json()["error"], answer.text
    assert len(answer.content) < 1000  # the one-line reason, never the value back
    store = world.store()
    try:
        assert store.delivery_status(answer.request.headers.get("X-GitHub-Delivery")
                                     or answer.request.headers["X-Gitlab-Event-UUID"]) is None
    finally:
        store.close()


def test_a_pull_request_touching_more_projects_than_the_cap_is_refused_and_named_projects_plan(
        make_world: MakeWorld):
    """`max_projects_per_pull` (issue 15): refused with the reason; the honest path of naming a
    project still plans it, and a repository without a cap plans both."""
    def both(world: World) -> dict[str, str]:
        return project_files(world.state_dir, {"staging": "large", "production": "large"})

    world = make_world({"max_projects_per_pull": 1})
    number = world.open_pr("both", both(world))
    refused = world.wait_comment(number, "Not starting a plan of 2 projects")
    assert "at most 1 per pull request (`max_projects_per_pull`)" in refused
    world.wait_idle()
    assert not world.bot_comments(number)[1:]  # nothing was planned
    world.comment(number, "alice", "deploybot plan -p staging")
    plan = world.wait_comment(number, "**deploybot plan**")
    assert "`staging`" in plan and "`production`" not in plan
    store = world.store()
    try:
        assert [e for e in store.audit_entries() if e["outcome"] == "refused" and "max_projects_per_pull" in e["detail"]]
    finally:
        store.close()

    uncapped = make_world()
    number = uncapped.open_pr("both", both(uncapped))
    plan = uncapped.wait_comment(number, "**deploybot plan**")
    assert "✅ `staging`" in plan and "✅ `production`" in plan


def test_a_run_of_more_projects_than_project_statuses_max_sets_only_the_aggregate_statuses(
        make_world: MakeWorld):
    """Issue 15: fewer forge writes for a change to many projects; the run is reported in full."""
    world = make_world({"project_statuses_max": 1})
    number = world.open_pr("both", project_files(world.state_dir, {"staging": "large", "production": "large"}))
    plan = world.wait_comment(number, "**deploybot plan**")
    assert "✅ `staging`" in plan and "✅ `production`" in plan
    world.wait_status(number, "deploybot/plan", "success")  # the aggregate, after every job's end
    world.wait_idle()
    statuses = world.statuses(number)
    assert not [context for context in statuses if context.startswith("deploybot/plan: ")], statuses
    # A run of one project, under the limit: its own status as before.
    world.comment(number, "alice", "deploybot plan -p staging")
    world.wait_status(number, "deploybot/plan: staging", "success")
