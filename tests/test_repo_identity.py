"""Repositories are known by id, not only by name: a re-created name does not inherit the policy.

The attack: an allow-listed repository is deleted (or renamed away) and someone creates
another by the same name, on the same forge the bot serves. Its pull requests must run
nothing: end to end on both forges, by webhook and by the trigger API, next to the honest
repository that keeps working.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
import uuid
from pathlib import Path

import httpx
import pytest

from bot import cli
from bot.ci.auth import hmac_signature
from bot.forges.github import webhook as github_webhook
from bot.forges.gitlab import webhook as gitlab_webhook
from bot.forges.webhook import MalformedPayload
from bot.sandbox.forges import WEBHOOK_SECRET
from bot.sandbox.local_forge import stable_id
from bot.sandbox.trial import REPO
from bot.store import Store
from policies.repo_identity import check_repo_id
from tests.world import MakeWorld, World, staging_change

# --- the decision (pure) ---------------------------------------------------------------


def test_nothing_pinned_or_recorded_lets_any_event_through():
    assert check_repo_id(None, None, 123) is None
    assert check_repo_id(None, None, None) is None  # no id to go by: let through (and not recorded)


def test_a_pinned_id_is_the_only_one_accepted():
    assert check_repo_id(123, None, 123) is None
    reason = check_repo_id(123, None, 456)
    assert reason is not None and "456" in reason and "the policy pins (123)" in reason
    assert "new id in the policy" in reason
    assert "the policy pins id 123" in (check_repo_id(123, None, None) or "")


def test_the_policy_wins_over_the_record():
    # The record is the bot's own guess; an admin who pinned the re-created repository's id means it.
    assert check_repo_id(456, 123, 456) is None
    assert check_repo_id(123, 456, 456) is not None


def test_a_recorded_id_is_the_only_one_accepted_and_says_how_to_reset():
    assert check_repo_id(None, 123, 123) is None
    reason = check_repo_id(None, 123, 456)
    assert reason is not None and "first saw for this name (123)" in reason
    assert "deploybot repo-id forget" in reason
    assert "first saw for this name id 123" in (check_repo_id(None, 123, None) or "")


# --- the parsers read the id from the signed payload --------------------------------------

GITHUB_COMMENT = {
    "action": "created", "issue": {"number": 1, "pull_request": {"url": "x"}},
    "comment": {"id": 5, "user": {"login": "alice"}, "body": "deploybot plan"},
    "repository": {"id": 123, "full_name": "acme/infra", "clone_url": "file:///x", "default_branch": "main"},
    "installation": {"id": 1}, "sender": {"login": "alice"},
}
GITLAB_NOTE = {
    "object_kind": "note", "user": {"username": "alice"}, "project_id": 77,
    "project": {"id": 77, "path_with_namespace": "acme/infra", "git_http_url": "file:///x", "default_branch": "main"},
    "object_attributes": {"id": 9, "note": "deploybot plan", "noteable_type": "MergeRequest", "action": "create"},
    "merge_request": {"iid": 1},
}


def test_github_repository_id_is_read():
    assert github_webhook.parse_event("issue_comment", GITHUB_COMMENT).repo.id == 123
    without = {**GITHUB_COMMENT, "repository": {k: v for k, v in GITHUB_COMMENT["repository"].items() if k != "id"}}
    assert github_webhook.parse_event("issue_comment", without).repo.id is None
    wrong = {**GITHUB_COMMENT, "repository": {**GITHUB_COMMENT["repository"], "id": "123"}}
    with pytest.raises(MalformedPayload):
        github_webhook.parse_event("issue_comment", wrong)


def test_gitlab_project_id_is_read_from_the_project_or_the_top_level():
    assert gitlab_webhook.parse_event("Note Hook", GITLAB_NOTE).repo.id == 77
    project = {k: v for k, v in GITLAB_NOTE["project"].items() if k != "id"}
    assert gitlab_webhook.parse_event("Note Hook", {**GITLAB_NOTE, "project": project}).repo.id == 77
    bare = {k: v for k, v in GITLAB_NOTE.items() if k != "project_id"} | {"project": project}
    assert gitlab_webhook.parse_event("Note Hook", bare).repo.id is None


# --- the store keeps the first id seen ---------------------------------------------------


def test_store_records_the_first_id_and_forgets_it_on_request(tmp_path: Path):
    store = Store(tmp_path / "db.sqlite3")
    assert store.repo_id("github:acme/infra") is None
    assert store.record_repo_id("github:acme/infra", 123) == 123
    assert store.record_repo_id("github:acme/infra", 456) == 123  # the first stays on record
    assert store.repo_id("github:acme/infra") == 123
    assert store.repo_id("gitlab:acme/infra") is None  # each forge has its own names
    assert store.forget_repo_id("github:acme/infra") == 123
    assert store.forget_repo_id("github:acme/infra") is None
    assert store.record_repo_id("github:acme/infra", 456) == 456
    store.close()


# --- end to end: the real bot, both forges ---------------------------------------------------

KEY = "jenkins-hmac-key-0123456789abcdef"


def recreate(world: World) -> int:
    """Delete the repository and let someone create another by its name; its new id."""
    fake = world.forge.fake
    return fake.recreate_repo(REPO) if world.forge.name == "github" else fake.recreate_project(REPO)


def repo_key(world: World) -> str:
    return f"{world.forge.name}:{REPO.lower()}"


def run_count(world: World) -> int:
    with sqlite3.connect(world.root / "data" / "deploybot.sqlite3") as db:
        return db.execute("SELECT COUNT(*) FROM runs").fetchone()[0]


def refusals(world: World, action: str) -> list[dict]:
    store = world.store()
    try:
        return [e for e in store.audit_entries(500) if e["action"] == action and e["outcome"] == "refused"]
    finally:
        store.close()


def recorded_id(world: World) -> int | None:
    store = world.store()
    try:
        return store.repo_id(repo_key(world))
    finally:
        store.close()


def test_a_repository_that_takes_a_known_name_inherits_nothing(make_world: MakeWorld):
    world = make_world()
    number = world.open_pr("honest", staging_change(world))
    world.wait_comment(number, "**deploybot plan**")
    original = stable_id(REPO)  # the id the local forges gave the repository
    assert recorded_id(world) == original  # the first id seen is recorded

    # Positive control: the same repository keeps working.
    world.push(number, "honest", staging_change(world, "medium"))
    world.wait_status(number, "deploybot/plan", "success")

    new_id = recreate(world)
    assert new_id != original
    runs = run_count(world)
    attack = world.open_pr("taken-name", staging_change(world, "medium"), author="alice")
    world.comment(attack, "bob", "deploybot apply")
    world.wait_idle()

    assert run_count(world) == runs  # nothing planned, nothing applied
    assert world.bot_comments(attack) == []
    assert world.state_resources("staging") == 0
    refused = refusals(world, "webhook")
    assert [e["actor"] for e in refused] == ["bob", "alice"]  # newest first
    assert all(e["repo"] == REPO for e in refused)
    assert f"repository id {new_id} is not the id deploybot first saw for this name ({original})" in refused[0]["detail"]
    assert "deploybot repo-id forget" in refused[0]["detail"]
    assert recorded_id(world) == original  # the impostor's id was never recorded

    # The documented reset: the new repository was meant to take the name.
    assert cli.main(["repo-id", "forget", "--config", str(world.config_path), world.forge.name, REPO]) == 0
    assert cli.main(["repo-id", "forget", "--config", str(world.config_path), world.forge.name, REPO]) == 1
    world.comment(attack, "alice", "deploybot plan")
    world.wait_comment(attack, "**deploybot plan**")
    assert recorded_id(world) == new_id
    forgotten = [e for e in world.store().audit_entries(500) if e["action"] == "repo-id forget"]
    assert forgotten[0]["detail"] == f"{world.forge.name} id {original}"


def post_webhook(world: World, event: str, body: bytes) -> httpx.Response:
    """A webhook signed as the world's forge signs it, under a new delivery id."""
    headers = {"Content-Type": "application/json"}
    if world.forge.name == "github":
        headers |= {"X-GitHub-Event": event, "X-GitHub-Delivery": str(uuid.uuid4()),
                    "X-Hub-Signature-256": github_webhook.sign(body, WEBHOOK_SECRET.encode())}
    else:
        headers |= {"X-Gitlab-Event": event, "Idempotency-Key": str(uuid.uuid4()), "X-Gitlab-Token": WEBHOOK_SECRET}
    return httpx.post(f"{world.url}/webhooks/{world.forge.name}", content=body, headers=headers, timeout=30)


def test_a_pinned_id_admits_that_repository_only(make_world: MakeWorld):
    pinned = stable_id(REPO)
    world = make_world({"id": pinned})
    number = world.open_pr("honest", staging_change(world))
    world.wait_comment(number, "**deploybot plan**")  # positive control: the pinned repository plans
    assert recorded_id(world) is None  # the policy is the authority: nothing is recorded

    # A signed payload that names no id cannot show it is the pinned repository.
    opened = world.forge.fake.deliveries[0]
    payload = json.loads(opened.body)
    if world.forge.name == "github":
        del payload["repository"]["id"]
    else:
        del payload["project"]["id"]
    runs = run_count(world)
    assert post_webhook(world, opened.event, json.dumps(payload).encode()).status_code == 202
    world.wait_idle()
    assert run_count(world) == runs
    assert f"the forge named no repository id, and the policy pins id {pinned}" in refusals(world, "webhook")[0]["detail"]

    new_id = recreate(world)
    attack = world.open_pr("taken-name", staging_change(world, "medium"), author="alice")
    world.wait_idle()
    assert run_count(world) == runs
    assert world.bot_comments(attack) == []
    refused = refusals(world, "webhook")
    assert len(refused) == 2
    assert f"repository id {new_id} is not the id the policy pins ({pinned})" in refused[0]["detail"]


def post_run(world: World, payload: dict) -> httpx.Response:
    """POST /api/v1/runs as the HMAC caller `jenkins`."""
    body = json.dumps(payload).encode()
    timestamp, nonce = str(int(time.time())), secrets.token_hex(16)
    headers = {"X-Deploybot-Key-Id": "jenkins", "X-Deploybot-Timestamp": timestamp, "X-Deploybot-Nonce": nonce,
               "Content-Type": "application/json",
               "X-Deploybot-Signature": hmac_signature(KEY.encode(), "POST", "/api/v1/runs", timestamp, nonce, body)}
    return httpx.post(f"{world.url}/api/v1/runs", content=body, headers=headers, timeout=30)


def test_the_trigger_api_refuses_a_repository_that_took_a_known_name(make_world: MakeWorld, tmp_path: Path):
    key_file = tmp_path / "jenkins.key"
    key_file.write_text(KEY)
    world = make_world(callers=[{"name": "jenkins", "hmac": {"key_file": str(key_file)},
                                 "repos": {REPO: {"projects": ["staging"], "commands": ["plan"]}}}])
    request = {"repo": REPO, "ref": "refs/heads/main", "project": "staging", "command": "plan",
               "forge": world.forge.name}

    honest = post_run(world, request)  # positive control; the forge API's id is recorded
    assert honest.status_code == 201, honest.text
    world.wait_idle()
    assert recorded_id(world) == stable_id(REPO)

    new_id = recreate(world)
    refused = post_run(world, request)
    assert refused.status_code == 403
    assert f"repository id {new_id} is not the id deploybot first saw for this name" in refused.json()["error"]
    assert "deploybot repo-id forget" in refused.json()["error"]
    audited = refusals(world, "api-plan")
    assert audited[0]["actor"] == "caller:jenkins" and f"repository id {new_id}" in audited[0]["detail"]
