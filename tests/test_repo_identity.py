"""Repositories are known by id, not only by name: a re-created name does not inherit the policy."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot import github_webhook, gitlab_webhook
from bot.store import Store
from policies.repo_identity import check_repo_id

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
    with pytest.raises(github_webhook.MalformedPayload):
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
