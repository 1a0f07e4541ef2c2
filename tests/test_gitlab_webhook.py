"""Token and signature checks and payload parsing against GitLab's documented webhook examples."""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path

import pytest

import bot.forges.github.webhook
import bot.forges.gitlab.webhook
from bot.forges.gitlab.webhook import FORGE, delivery_id, parse_event, sign, verify_signing_token, verify_token
from bot.forges.webhook import InvalidSignature, MalformedPayload, load_body
from bot.models import CommentEvent, PullRequestEvent, ReviewEvent

FIXTURES = Path(__file__).parent / "fixtures" / "gitlab"
MR_HOOK = "Merge Request Hook"
NOTE_HOOK = "Note Hook"
SIGNING_TOKEN = "whsec_" + base64.b64encode(bytes(range(32))).decode()


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


# -- X-Gitlab-Token ------------------------------------------------------------------------------


def test_token_accepts_the_exact_secret_and_rejects_everything_else():
    verify_token("s3cret", b"s3cret")
    verify_token("s3cret", b"s3cret\n")  # a secret file's newline: GitLab sends the token without it
    for header in (None, "", "s3cre", "s3cret ", "S3CRET", "s3cret\n", "other"):
        with pytest.raises(InvalidSignature):
            verify_token(header, b"s3cret")
    with pytest.raises(InvalidSignature):  # an unconfigured secret fails closed, whatever is sent
        verify_token("", b"")


def test_both_forges_raise_the_shared_exception_types():
    # The intake turns exactly these into 401 and 400, whichever forge sent the body.
    assert bot.forges.github.webhook.InvalidSignature is InvalidSignature
    assert bot.forges.gitlab.webhook.InvalidSignature is InvalidSignature
    assert bot.forges.gitlab.webhook.MalformedPayload is MalformedPayload
    assert bot.forges.gitlab.webhook.load_body is load_body
    assert FORGE == "gitlab"


@pytest.mark.parametrize("body", [b"", b"not json", b"[1, 2]", b'"text"', b"\xff\xfe"])
def test_load_body_rejects_non_objects(body):
    with pytest.raises(MalformedPayload):
        load_body(body)


# -- signing token (webhook-signature) ----------------------------------------------------------


def signed_headers(body: bytes, timestamp: int = 1_700_000_000, webhook_id: str = "b6d2c9b0-idem") -> dict[str, str]:
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(body, webhook_id, timestamp, SIGNING_TOKEN),
    }


def test_signing_token_accepts_a_fresh_exact_signature():
    body = b'{"object_kind": "merge_request"}'
    headers = signed_headers(body)
    assert headers["webhook-signature"].startswith("v1,")
    verify_signing_token(headers, body, SIGNING_TOKEN, now=1_700_000_000)
    verify_signing_token(headers, body, SIGNING_TOKEN, now=1_700_000_000 + 299)  # within five minutes
    verify_signing_token(headers, body, SIGNING_TOKEN, now=1_700_000_000 - 299)
    # Header names are case-insensitive; during a rotation any one listed signature may match.
    rotated = {k.title(): v for k, v in headers.items()}
    rotated["Webhook-Signature"] = "v1,bm90IGl0 v1a,ignored " + headers["webhook-signature"]
    verify_signing_token(rotated, body, SIGNING_TOKEN, now=1_700_000_000)


def test_signing_token_matches_the_standard_webhooks_construction():
    # HMAC-SHA256 over "{id}.{timestamp}.{body}" keyed with the base64-decoded token, base64 out.
    import hashlib
    import hmac

    body = b"{}"
    expected = hmac.new(bytes(range(32)), b"msg_1.1700000000.{}", hashlib.sha256).digest()
    assert sign(body, "msg_1", 1_700_000_000, SIGNING_TOKEN) == "v1," + base64.b64encode(expected).decode()


@pytest.mark.parametrize(
    "change",
    ["body", "token", "stale", "future", "no id", "no timestamp", "no signature", "bad timestamp", "v2 only", "id"],
)
def test_signing_token_rejects_tampering_staleness_and_missing_headers(change):
    body = b'{"object_kind": "note"}'
    headers, token, now = signed_headers(body), SIGNING_TOKEN, 1_700_000_000
    if change == "body":
        body = body + b" "
    elif change == "token":
        token = "whsec_" + base64.b64encode(b"x" * 32).decode()
    elif change == "stale":
        now += 301
    elif change == "future":
        now -= 301
    elif change == "no id":
        del headers["webhook-id"]
    elif change == "no timestamp":
        del headers["webhook-timestamp"]
    elif change == "no signature":
        del headers["webhook-signature"]
    elif change == "bad timestamp":
        headers["webhook-timestamp"] = "1700000000.5"
    elif change == "v2 only":
        headers["webhook-signature"] = headers["webhook-signature"].replace("v1,", "v2,")
    elif change == "id":
        headers["webhook-id"] = "another-delivery"
    with pytest.raises(InvalidSignature):
        verify_signing_token(headers, body, token, now=now)


def test_a_malformed_signing_token_is_a_configuration_error():
    body = b"{}"
    with pytest.raises(ValueError):
        verify_signing_token(signed_headers(body), body, "whsec_not base64!", now=1_700_000_000)


# -- delivery ids ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers, expected",
    [
        ({"Idempotency-Key": "idem", "X-Gitlab-Event-UUID": "event", "X-Gitlab-Webhook-UUID": "hook"}, "idem"),
        ({"idempotency-key": " idem ", "x-gitlab-event-uuid": "event"}, "idem"),
        ({"X-Gitlab-Event-UUID": "event", "X-Gitlab-Webhook-UUID": "hook"}, "event"),
        ({"x-gitlab-event-uuid": "", "X-GITLAB-WEBHOOK-UUID": "hook"}, "hook"),
        ({"Idempotency-Key": "", "X-Gitlab-Webhook-UUID": "hook"}, "hook"),
        ({"webhook-id": "signed", "X-Gitlab-Event-UUID": "event"}, "signed"),
        ({"X-Gitlab-Event": "Note Hook"}, None),
        ({}, None),
    ],
)
def test_delivery_id_prefers_the_key_that_survives_resends(headers, expected):
    assert delivery_id(headers) == expected


# -- merge request events ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, action, merged",
    [
        ("merge_request.open.json", "opened", False),
        ("merge_request.update.json", "updated", False),
        ("merge_request.reopen.json", "reopened", False),
        ("merge_request.close.json", "closed", False),
        ("merge_request.merge.json", "closed", True),
    ],
)
def test_merge_request_examples_become_pull_request_events(name, action, merged):
    payload = fixture(name)
    event = parse_event(MR_HOOK, payload)
    assert isinstance(event, PullRequestEvent)
    assert event.action == action and event.sender == "root"
    pull = event.pull
    assert (pull.number, pull.head_ref, pull.base_ref) == (1, "ms-viewport", "master")
    assert pull.head_sha == "da1560886d4f094c3e6c9ef40349f7d38b5d27d7"
    assert pull.repo.forge == "gitlab" and pull.repo.installation_id is None
    assert pull.repo.full_name == "gitlabhq/gitlab-test"
    assert pull.repo.clone_url == "http://example.com/gitlabhq/gitlab-test.git"
    assert pull.repo.default_branch == "master"
    assert pull.url == "http://example.com/diaspora/merge_requests/1"
    assert pull.is_fork is False  # source_project_id 14 == target_project_id 14
    assert pull.merged is merged
    assert pull.state == ("closed" if action == "closed" else "open")


@pytest.mark.parametrize(
    "name, action, state",
    [
        ("merge_request.approved.json", "submitted", "approved"),
        ("merge_request.approval.json", "submitted", "approved"),
        ("merge_request.unapproved.json", "dismissed", "dismissed"),
        ("merge_request.unapproval.json", "dismissed", "dismissed"),
    ],
)
def test_approvals_become_review_events(name, action, state):
    event = parse_event(MR_HOOK, fixture(name))
    assert isinstance(event, ReviewEvent)
    assert (event.action, event.state, event.reviewer) == (action, state, "root")
    assert event.pull.number == 1 and event.pull.repo.full_name == "gitlabhq/gitlab-test"


def test_updates_without_new_commits_are_ignored():
    assert parse_event(MR_HOOK, fixture("merge_request.update.edit.json")) is None
    payload = fixture("merge_request.update.json")
    payload["object_attributes"]["oldrev"] = ""
    assert parse_event(MR_HOOK, payload) is None
    payload["object_attributes"]["oldrev"] = None
    assert parse_event(MR_HOOK, payload) is None


@pytest.mark.parametrize("action", ["", "unknown", "merge_when_pipeline_succeeds", None])
def test_other_merge_request_actions_are_ignored(action):
    payload = fixture("merge_request.open.json")
    if action is None:
        del payload["object_attributes"]["action"]
    else:
        payload["object_attributes"]["action"] = action
    assert parse_event(MR_HOOK, payload) is None


def test_author_comes_from_the_user_whose_id_is_author_id():
    opened = fixture("merge_request.open.json")
    # The example's actor (id 1) is not the author (id 51), but only the author opens one.
    assert parse_event(MR_HOOK, opened).pull.author == "root"

    updated = fixture("merge_request.update.json")
    assert parse_event(MR_HOOK, updated).pull.author == ""  # not in the payload: handlers re-fetch it
    updated["assignees"][0].update(id=51, username="mr-author")
    assert parse_event(MR_HOOK, updated).pull.author == "mr-author"

    approved = fixture("merge_request.approved.json")
    approved["user"].update(id=51, username="self-approver")
    event = parse_event(MR_HOOK, approved)
    assert event.pull.author == event.reviewer == "self-approver"


def test_nested_project_paths_and_forks():
    payload = fixture("merge_request.open.json")
    payload["project"]["path_with_namespace"] = "acme/platform/infrastructure-live"
    payload["project"]["git_http_url"] = "https://gitlab.example.com/acme/platform/infrastructure-live.git"
    event = parse_event(MR_HOOK, payload)
    assert event.pull.repo.full_name == "acme/platform/infrastructure-live"
    assert event.pull.repo.clone_url.endswith("/acme/platform/infrastructure-live.git")

    payload["object_attributes"]["source_project_id"] = 99  # a fork's project
    assert parse_event(MR_HOOK, payload).pull.is_fork is True


def test_a_merge_request_without_a_last_commit_has_no_head():
    payload = fixture("merge_request.close.json")
    payload["object_attributes"]["last_commit"] = None
    assert parse_event(MR_HOOK, payload).pull.head_sha == ""


# -- note events --------------------------------------------------------------------------------


def test_comment_on_a_merge_request_becomes_an_event():
    payload = fixture("note.merge_request.json")
    event = parse_event(NOTE_HOOK, payload)
    assert isinstance(event, CommentEvent)
    assert event == CommentEvent(
        repo=event.repo, pull_number=1, comment_id=1244, author="root", body="This MR needs work."
    )
    assert (event.repo.forge, event.repo.full_name) == ("gitlab", "gitlab-org/gitlab-test")
    assert event.repo.clone_url == "http://example.com/gitlab-org/gitlab-test.git"

    del payload["object_attributes"]["action"]  # GitLab before 16.11 sends no action: always a new note
    assert isinstance(parse_event(NOTE_HOOK, payload), CommentEvent)


@pytest.mark.parametrize("name", ["note.merge_request.update.json", "note.issue.json", "note.commit.json"])
def test_edits_and_comments_on_other_things_are_ignored(name):
    assert parse_event(NOTE_HOOK, fixture(name)) is None


def test_system_notes_are_ignored():
    payload = fixture("note.merge_request.json")
    payload["object_attributes"].update(system=True, note="approved this merge request")
    assert parse_event(NOTE_HOOK, payload) is None


@pytest.mark.parametrize("event_name", ["Push Hook", "Pipeline Hook", "Tag Push Hook", "System Hook", "merge_request"])
def test_other_events_are_ignored(event_name):
    assert parse_event(event_name, fixture("push.json")) is None
    assert parse_event(event_name, fixture("merge_request.open.json")) is None


# -- malformed payloads -------------------------------------------------------------------------


def _broken(name: str, *path: str, value: object = KeyError) -> dict:
    payload = copy.deepcopy(fixture(name))
    target = payload
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return payload


@pytest.mark.parametrize(
    "event_name, payload",
    [
        (MR_HOOK, _broken("merge_request.open.json", "object_attributes", "iid")),
        (MR_HOOK, _broken("merge_request.open.json", "object_attributes", "iid", value="seven")),
        (MR_HOOK, _broken("merge_request.open.json", "object_attributes", "last_commit", "id")),
        (MR_HOOK, _broken("merge_request.open.json", "object_attributes", "source_branch", value=7)),
        (MR_HOOK, _broken("merge_request.open.json", "object_attributes", "target_project_id", value=True)),
        (MR_HOOK, _broken("merge_request.open.json", "project")),
        (MR_HOOK, _broken("merge_request.open.json", "project", "path_with_namespace", value=None)),
        (MR_HOOK, _broken("merge_request.open.json", "user", "username", value=1)),
        (MR_HOOK, _broken("merge_request.open.json", "object_attributes", value=[])),
        (MR_HOOK, _broken("merge_request.open.json", "object_kind", value="note")),
        (NOTE_HOOK, _broken("note.merge_request.json", "merge_request")),
        (NOTE_HOOK, _broken("note.merge_request.json", "object_attributes", "id", value="1244")),
        (NOTE_HOOK, _broken("note.merge_request.json", "object_attributes", "note", value=["x"])),
        (NOTE_HOOK, _broken("note.merge_request.json", "user")),
    ],
)
def test_missing_or_mistyped_keys_are_malformed(event_name, payload):
    with pytest.raises(MalformedPayload):
        parse_event(event_name, payload)
