"""The trigger API end to end: `deploybot run` against the real server, Slack approval, refusals."""

from __future__ import annotations

import copy
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from bot import models
from bot.ci.auth import hmac_signature
from bot.sandbox.forges import FORGES
from bot.sandbox.trial import REPO, wait_for
from tests.slack_fake import FakeSlack, interaction_body, sign_slack_request
from tests.test_ci_auth import FakeIssuer, github_claims, rsa_key
from tests.world import TEST_POLICY, World, staging_change

SIGNING_SECRET = "slack-signing-secret-for-tests"
KEY = "jenkins-hmac-key-0123456789abcdef"
RELEASE_KEY = "release-hmac-key-0123456789abcdef"  # a second caller, granted production too
ADMIN_TOKEN = "admin-token-for-the-audit-log"


@pytest.fixture
def slack() -> Iterator[FakeSlack]:
    fake = FakeSlack()
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture(params=sorted(FORGES))
def world(request: pytest.FixtureRequest, tmp_path: Path, slack: FakeSlack) -> Iterator[World]:
    key_file = tmp_path / "jenkins.key"
    key_file.write_text(KEY)
    release_key_file = tmp_path / "release.key"
    release_key_file.write_text(RELEASE_KEY)
    policy = copy.deepcopy(TEST_POLICY)
    policy["callers"] = [{
        "name": "jenkins",
        "hmac": {"key_file": str(key_file)},
        "repos": {REPO: {"projects": ["staging"], "commands": ["plan", "apply"],
                         "apply_refs": ["refs/heads/main"]}},
    }, {
        "name": "release",
        "hmac": {"key_file": str(release_key_file)},
        "repos": {REPO: {"projects": ["staging", "production"], "commands": ["plan"]}},
    }]
    world = World(tmp_path / "world", policy, forge=request.param, extra_config={
        "slack": {"signing_secret": SIGNING_SECRET, "webhook_url": slack.webhook_url,
                  "users": {"U_DAVE": "dave", "U_CAROL": "carol"}},
        "server": {"admin_token": ADMIN_TOKEN},
    })
    yield world
    world.stop()


def signed_headers(method: str, path: str, body: bytes, key: str = KEY, key_id: str = "jenkins",
                   timestamp: float | None = None, nonce: str | None = None) -> dict[str, str]:
    timestamp_text = str(int(timestamp if timestamp is not None else time.time()))
    nonce = nonce or secrets.token_hex(16)
    return {"X-Deploybot-Key-Id": key_id, "X-Deploybot-Timestamp": timestamp_text,
            "X-Deploybot-Nonce": nonce, "Content-Type": "application/json",
            "X-Deploybot-Signature": hmac_signature(key.encode(), method, path, timestamp_text, nonce, body)}


def post_run(world: World, payload: dict, **sign) -> httpx.Response:
    body = json.dumps(payload).encode()
    return httpx.post(f"{world.url}/api/v1/runs", content=body,
                      headers=signed_headers("POST", "/api/v1/runs", body, **sign), timeout=30)


def cli(world: World, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ["PATH"], "DEPLOYBOT_SERVER": world.url,
           "DEPLOYBOT_HMAC_KEY_ID": "jenkins", "DEPLOYBOT_HMAC_KEY": KEY}
    return subprocess.run([sys.executable, "-m", "bot.cli", "run", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def click(world: World, run_id: int, approve: bool, user_id: str, secret: str = SIGNING_SECRET) -> httpx.Response:
    body = interaction_body(run_id, approve, user_id=user_id)
    return httpx.post(f"{world.url}/slack/interactions", content=body,
                      headers=sign_slack_request(body, secret, time.time()), timeout=30)


def test_plan_from_ci_streams_output_and_exits_like_detailed_exitcode(world: World, slack: FakeSlack):
    done = cli(world, "plan", "--repo", REPO, "--ref", "main", "--project", "staging")
    assert done.returncode == 2, done.stderr
    assert "Plan: 2 to add, 0 to change, 0 to destroy." in done.stdout
    assert KEY not in done.stdout + done.stderr
    message = wait_for(lambda: slack.webhook_posts, 30, "the plan-ready message")[0]
    assert "Approve" in json.dumps(message) and "staging" in json.dumps(message)

    assert world.state_resources("staging") == 0  # a plan changes nothing


def test_apply_waits_for_slack_approval_then_applies_the_saved_plan(world: World, slack: FakeSlack):
    plan = post_run(world, {"repo": REPO, "ref": "refs/heads/main", "project": "staging", "command": "plan"})
    assert plan.status_code == 201, plan.text
    plan_id = plan.json()["id"]
    wait_for(lambda: slack.webhook_posts, 60, "the plan-ready message")

    applying = subprocess.Popen(
        [sys.executable, "-m", "bot.cli", "run", "apply", "--repo", REPO, "--ref", "main", "--project",
         "staging", "--approval-timeout", "120"],
        env={"PATH": os.environ["PATH"], "DEPLOYBOT_SERVER": world.url, "DEPLOYBOT_HMAC_KEY_ID": "jenkins",
             "DEPLOYBOT_HMAC_KEY": KEY},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(3)
    assert applying.poll() is None, "apply must wait for the approval"
    assert world.state_resources("staging") == 0

    assert click(world, plan_id, True, "U_CAROL").status_code == 403  # mapped, but no approver
    assert click(world, plan_id, True, "U_NOBODY").status_code == 403
    assert click(world, plan_id, True, "U_DAVE", secret="forged").status_code == 401
    approved = click(world, plan_id, True, "U_DAVE")
    assert approved.status_code == 200 and approved.json()["status"] == "approved"

    out, err = applying.communicate(timeout=120)
    assert applying.returncode == 0, err
    assert "Apply complete! Resources: 2 added" in out
    assert world.state_resources("staging") == 2
    assert click(world, plan_id, False, "U_DAVE").status_code == 409  # decided once


def test_rejected_plan_is_never_applied(world: World):
    plan_id = post_run(world, {"repo": REPO, "ref": "main", "project": "staging", "command": "plan"}).json()["id"]
    wait_for(lambda: get_run(world, plan_id)["status"] == "succeeded", 60, "the plan")
    apply = post_run(world, {"repo": REPO, "ref": "main", "project": "staging", "command": "apply"})
    assert apply.status_code == 201 and apply.json()["status"] == "awaiting_approval"
    assert click(world, plan_id, False, "U_DAVE").json()["status"] == "rejected"
    wait_for(lambda: get_run(world, apply.json()["id"])["status"] == "rejected", 30, "the rejection")
    again = post_run(world, {"repo": REPO, "ref": "main", "project": "staging", "command": "apply"})
    assert again.status_code == 409 and "rejected" in again.json()["error"]
    assert world.state_resources("staging") == 0


def get_run(world: World, run_id: int, **sign) -> dict:
    return read(world, f"/api/v1/runs/{run_id}", **sign).json()


def read(world: World, path: str, **sign) -> httpx.Response:
    """A signed GET of the trigger API (as jenkins unless `sign` says otherwise)."""
    return httpx.get(f"{world.url}{path}", headers=signed_headers("GET", path, b"", **sign), timeout=30)


def audit_entries(world: World) -> list[dict]:
    store = world.store()
    try:
        return store.audit_entries(1000)
    finally:
        store.close()


def test_a_caller_reads_only_runs_of_projects_it_may_run(world: World):
    """jenkins is granted staging only: production runs (and their output) do not exist for it."""
    release = {"key": RELEASE_KEY, "key_id": "release"}
    staging = post_run(world, {"repo": REPO, "ref": "main", "project": "staging", "command": "plan"})
    production = post_run(world, {"repo": REPO, "ref": "main", "project": "production", "command": "plan"}, **release)
    assert staging.status_code == production.status_code == 201, production.text
    staging_id, production_id = staging.json()["id"], production.json()["id"]
    wait_for(lambda: get_run(world, production_id, **release)["status"] == "succeeded", 60, "the production plan")
    wait_for(lambda: get_run(world, staging_id)["status"] == "succeeded", 60, "the staging plan")

    # The honest path: jenkins reads its staging run and its log; release reads both.
    assert "Plan: 2 to add" in get_run(world, staging_id)["output"]
    assert "Plan: 2 to add" in read(world, f"/api/v1/runs/{staging_id}/log").text
    assert get_run(world, production_id, **release)["project"] == "production"

    # jenkins asks for production's run and its log: the same 404 as for a run that does not exist.
    for path in (f"/api/v1/runs/{production_id}", f"/api/v1/runs/{production_id}/log"):
        refused = read(world, path)
        assert refused.status_code == 404 and refused.json() == {"error": "no such run"}, path
        assert "production" not in refused.text and "Plan:" not in refused.text
    assert read(world, "/api/v1/runs/999999").json() == {"error": "no such run"}

    refusals = [e for e in audit_entries(world) if e["outcome"] == "refused" and e["actor"] == "caller:jenkins"]
    assert {e["action"] for e in refusals} >= {f"GET /api/v1/runs/{production_id}",
                                               f"GET /api/v1/runs/{production_id}/log"}
    hidden = next(e for e in refusals if e["action"] == f"GET /api/v1/runs/{production_id}")
    assert hidden["project"] == "production" and "may not run" in hidden["detail"]


def test_ci_runs_are_refused_while_a_pull_request_holds_the_project(world: World):
    """A pull request's plan locks staging: CI may neither plan, apply nor approve it until the lock is freed."""
    plan = {"repo": REPO, "ref": "main", "project": "staging", "command": "plan"}
    before = post_run(world, plan).json()["id"]  # planned before the pull request, then waiting for approval
    wait_for(lambda: get_run(world, before)["status"] == "succeeded", 60, "the CI plan")
    waiting = post_run(world, {**plan, "command": "apply"})
    assert waiting.json()["status"] == "awaiting_approval", waiting.text
    number = world.open_pr("resize", staging_change(world), author="alice")
    world.wait_comment(number, "**deploybot plan**")

    held = f"staging is locked by #{number} (planned by @alice)"
    for command in ("plan", "apply"):
        refused = post_run(world, {**plan, "command": command})
        assert refused.status_code == 409 and held in refused.json()["error"], refused.text
    # Approving would release the waiting apply under the lock.
    approval = click(world, before, True, "U_DAVE")
    assert approval.status_code == 409 and held in approval.json()["error"], approval.text
    assert get_run(world, waiting.json()["id"])["status"] == "awaiting_approval"
    # Another project is not held: CI plans it as before.
    assert post_run(world, {**plan, "project": "production"}, key=RELEASE_KEY, key_id="release").status_code == 201
    locked = [e for e in audit_entries(world) if e["outcome"] == "refused" and held in e["detail"]]
    assert sorted((e["actor"], e["action"]) for e in locked) == [
        ("caller:jenkins", "api-apply"), ("caller:jenkins", "api-plan"), ("slack:dave", "approve")]
    assert all(e["project"] == "staging" for e in locked)

    world.comment(number, "alice", "deploybot unlock")
    world.wait_comment(number, "Unlocked")
    assert click(world, before, True, "U_DAVE").json()["status"] == "approved"
    wait_for(lambda: get_run(world, waiting.json()["id"])["status"] == "succeeded", 60, "the CI apply after unlock")
    freed = post_run(world, plan)
    assert freed.status_code == 201, freed.text
    wait_for(lambda: get_run(world, freed.json()["id"])["status"] == "succeeded", 60, "the CI plan after unlock")


def test_a_queued_ci_apply_steps_aside_for_a_lock_taken_after_it_was_queued(world: World):
    plan = {"repo": REPO, "ref": "main", "project": "staging", "command": "plan"}
    planned = post_run(world, plan).json()["id"]
    wait_for(lambda: get_run(world, planned)["status"] == "succeeded", 60, "the CI plan")
    waiting = post_run(world, {**plan, "command": "apply"}).json()["id"]
    store = world.store()
    try:
        job = next(j for j in store.jobs_with_status("waiting") if j.run.id == waiting)
        # A pull request locks staging between the approval and the start of the job: the
        # store is written here directly, since the approval itself is refused under a lock.
        assert store.try_locks([job.project_key], job.run.repo, 7, "alice")[0].acquired
        assert store.decide(planned, True, "dave", "slack") and store.release_job(job.id)
    finally:
        store.close()
    world.forge.set_webhook(world.url)  # nudges nothing; the worker polls its queue
    run = wait_for(lambda: (r := get_run(world, waiting))["status"] not in ("queued", "awaiting_approval",
                                                                            "running") and r, 60, "the apply")
    assert run["status"] != "succeeded" and "locked by #7 (planned by @alice)" in json.dumps(run)
    assert world.state_resources("staging") == 0


def test_refusals_are_clear_and_audited(world: World):
    base = {"repo": REPO, "ref": "main", "project": "staging", "command": "plan"}
    assert post_run(world, base, key="wrong-key").status_code == 401
    assert post_run(world, base, key_id="circleci").status_code == 401
    assert post_run(world, base, timestamp=time.time() - 3600).status_code == 401
    nonce = secrets.token_hex(16)
    assert post_run(world, base, nonce=nonce).status_code == 201
    assert post_run(world, base, nonce=nonce).status_code == 401  # replayed
    assert post_run(world, {**base, "repo": "acme/other"}).status_code == 403
    assert post_run(world, {**base, "project": "production"}).status_code == 403
    assert post_run(world, {**base, "command": "apply", "ref": "feature"}).status_code == 403
    assert post_run(world, {**base, "ref": "no-such-branch"}).status_code == 404
    extra = post_run(world, {**base, "args": "-target=x"})
    assert extra.status_code == 400 and "unknown field" in extra.json()["error"]
    no_plan = post_run(world, {**base, "command": "apply", "sha": world.repo.sha("main"), "ref": "main"})
    assert no_plan.status_code in (201, 409)
    unsigned = httpx.post(f"{world.url}/api/v1/runs", json=base)
    assert unsigned.status_code == 401
    store = world.store()
    try:
        outcomes = [entry["outcome"] for entry in store.audit_entries()]
    finally:
        store.close()
    assert outcomes.count("refused") >= 9
    spec = httpx.get(f"{world.url}/api/v1/openapi.json").json()
    assert "/api/v1/runs" in spec["paths"]


def test_api_approval_with_the_approvers_own_forge_token(world: World):
    plan_id = post_run(world, {"repo": REPO, "ref": "main", "project": "staging", "command": "plan"}).json()["id"]
    wait_for(lambda: get_run(world, plan_id)["status"] == "succeeded", 60, "the plan")
    apply_id = post_run(world, {"repo": REPO, "ref": "main", "project": "staging", "command": "apply"}).json()["id"]
    url = f"{world.url}/api/v1/runs/{plan_id}/approve"
    assert httpx.post(url).status_code == 401
    assert httpx.post(url, headers={"Authorization": "token not-a-real-token"}).status_code == 401
    carol = httpx.post(url, headers={"Authorization": f"token {world.forge.user_token('carol')}"})
    assert carol.status_code == 403 and "not an approver" in carol.json()["error"]
    dave = httpx.post(url, headers={"Authorization": f"token {world.forge.user_token('dave')}"})
    assert dave.status_code == 200 and dave.json() == {"status": "approved", "run": plan_id, "by": "dave"}
    wait_for(lambda: get_run(world, apply_id)["status"] == "succeeded", 60, "the apply")
    assert world.state_resources("staging") == 2
    assert get_run(world, plan_id)["approval"]["by"] == "dave"


def test_runs_name_their_plan_and_only_the_newest_plan_is_approved(world: World):
    """The run API shows the plan id (the start of the saved plan's SHA-256), as the OpenAPI document says."""
    request = {"repo": REPO, "ref": "main", "project": "staging"}
    first = post_run(world, {**request, "command": "plan"}).json()["id"]
    wait_for(lambda: get_run(world, first)["status"] == "succeeded", 60, "the first plan")
    second = post_run(world, {**request, "command": "plan"}).json()["id"]
    wait_for(lambda: get_run(world, second)["status"] == "succeeded", 60, "the second plan")
    store = world.store()
    try:
        saved = store.plans_for_pull(store.run_jobs(second)[0].run.repo, 0)[0]
    finally:
        store.close()
    shown = get_run(world, second)
    assert shown["plan_id"] == models.plan_id(saved.sha256) and len(shown["plan_id"]) == 12
    assert f"plan `{shown['plan_id']}`" in shown["summary"]
    schema = httpx.get(f"{world.url}/api/v1/openapi.json").json()["components"]["schemas"]["Run"]["properties"]
    assert set(shown) == set(schema)

    # The first plan was replaced: approving it would approve a plan that can no longer be applied.
    replaced = click(world, first, True, "U_DAVE")
    assert replaced.status_code == 409 and "no longer the saved plan" in replaced.json()["error"]
    assert click(world, second, True, "U_DAVE").json()["status"] == "approved"
    apply = post_run(world, {**request, "command": "apply"}).json()["id"]
    wait_for(lambda: get_run(world, apply)["status"] == "succeeded", 60, "the apply")
    assert get_run(world, apply)["plan_id"] == shown["plan_id"]  # it applied the approved plan
    assert get_run(world, first)["approval"] is None


@pytest.fixture
def oidc_world(tmp_path: Path) -> Iterator[tuple[World, FakeIssuer]]:
    issuer = FakeIssuer()
    issuer.add_rsa_key("k1")
    policy = copy.deepcopy(TEST_POLICY)
    policy["callers"] = [{
        "name": "github-actions",
        "oidc": {"issuer": issuer.url, "audience": "deploybot",
                 "claims": {"repository": REPO, "repository_id": "123456", "ref": "refs/heads/main"}},
        "repos": {REPO: {"projects": ["staging"], "commands": ["plan"]}},
    }]
    world = World(tmp_path / "world", policy)
    yield world, issuer
    world.stop()
    issuer.close()


def test_oidc_callers_are_verified_against_the_issuer_and_pinned_claims(oidc_world):
    world, issuer = oidc_world
    sha = world.repo.sha("main")
    body = {"repo": REPO, "ref": "refs/heads/main", "project": "staging", "command": "plan"}

    def post(token: str) -> httpx.Response:
        return httpx.post(f"{world.url}/api/v1/runs", json=body, headers={"Authorization": f"Bearer {token}"})

    forged = issuer.mint(github_claims(issuer.url, sha=sha), key=rsa_key("attacker"))
    assert post(forged).status_code == 401
    assert post(issuer.mint(github_claims(issuer.url, sha=sha, aud="someone-else"))).status_code == 401
    assert post(issuer.mint(github_claims(issuer.url, sha=sha, exp=int(time.time()) - 120))).status_code == 401
    other_repo = issuer.mint(github_claims(issuer.url, sha=sha, repository="mallory/infra", repository_id="666"))
    assert post(other_repo).status_code == 401
    other_commit = post(issuer.mint(github_claims(issuer.url, sha="0" * 40)))
    assert other_commit.status_code == 403 and "another commit" in other_commit.json()["error"]

    token = issuer.mint(github_claims(issuer.url, sha=sha))
    started = post(token)
    assert started.status_code == 201, started.text
    assert post(token).status_code == 401  # a token starts one run
    run = httpx.get(f"{world.url}/api/v1/runs/{started.json()['id']}", headers={"Authorization": f"Bearer {token}"})
    assert run.status_code == 200 and run.json()["sha"] == sha

    store = world.store()
    try:
        refused = [e for e in store.audit_entries() if e["outcome"] == "refused"]
    finally:
        store.close()
    assert len(refused) >= 5
    assert any("signature" in e["detail"] for e in refused)


def test_audit_log_is_for_admins_and_readable_from_the_cli(world: World):
    assert post_run(world, {"repo": REPO, "ref": "main", "project": "production", "command": "plan"}).status_code == 403
    url = f"{world.url}/api/v1/audit"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
    entries = httpx.get(url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).json()["entries"]
    refusal = entries[0]
    assert (refusal["actor"], refusal["action"], refusal["outcome"]) == ("caller:jenkins", "api-plan", "refused")
    assert "production" in refusal["detail"]
    done = subprocess.run([sys.executable, "-m", "bot.cli", "audit", "--server", world.url, "--limit", "5"],
                          env={"PATH": os.environ["PATH"], "DEPLOYBOT_ADMIN_TOKEN": ADMIN_TOKEN},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "caller:jenkins" in done.stdout and "refused" in done.stdout


def test_a_ci_callers_hmac_key_read_by_a_plan_is_redacted(world: World, tmp_path: Path):
    """Whatever a plan prints of a CI caller's key never reaches the pull request.

    The sandbox keeps the bot's own copy out of reach; here the key is where a job can read it
    (a careless copy in a shared path), and redaction is the second wall.
    """
    leaked = world.state_dir / "jenkins.key"
    leaked.write_text((tmp_path / "jenkins.key").read_text())
    files = staging_change(world)
    files["staging/leak.tf"] = f'output "leak" {{\n  value = file("{leaked}")\n}}\n'
    number = world.open_pr("leak", files)
    plan = world.wait_comment(number, "**deploybot plan**")
    assert "leak" in plan and KEY not in plan and "***" in plan
    # Positive control: the output itself is there, only the key is masked.
    assert 'leak = "***"' in plan or "leak = ***" in plan, plan
