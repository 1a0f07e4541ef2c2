"""Signature checks and payload parsing against GitHub's published webhook examples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bot.forges.github.webhook import parse_event, sign, verify_signature
from bot.forges.webhook import InvalidSignature, MalformedPayload, load_body
from bot.models import CommentEvent, PullRequestEvent, ReviewEvent

FIXTURES = Path(__file__).parent / "fixtures" / "github"


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def test_signature_accepts_exact_body_and_rejects_everything_else():
    body = b'{"zen": "Keep it logically awesome."}'
    header = sign(body, b"s3cret")
    verify_signature(body, header, b"s3cret")
    for bad_body, bad_header in [
        (body + b" ", header),
        (body, sign(body, b"other")),
        (body, None),
        (body, ""),
        (body, header.replace("sha256=", "sha1=")),
        (body, header[:-2]),
    ]:
        with pytest.raises(InvalidSignature):
            verify_signature(bad_body, bad_header, b"s3cret")


@pytest.mark.parametrize("body", [b"", b"not json", b"[1, 2]", b'"text"', b"\xff\xfe"])
def test_load_body_rejects_non_objects(body):
    with pytest.raises(MalformedPayload):
        load_body(body)


@pytest.mark.parametrize(
    "name, action",
    [("pull_request.opened.1.json", "opened"), ("pull_request.synchronize.1.json", "updated"),
     ("pull_request.reopened.1.json", "reopened"), ("pull_request.closed.1.json", "closed")],
)
def test_pull_request_examples_become_events(name, action):
    payload = fixture(name)
    event = parse_event("pull_request", payload)
    assert isinstance(event, PullRequestEvent)
    assert event.action == action
    pr = payload["pull_request"]
    assert event.pull.number == pr["number"]
    assert event.pull.head_sha == pr["head"]["sha"]
    assert event.pull.repo.full_name == "Codertocat/Hello-World"
    assert event.pull.repo.clone_url == payload["repository"]["clone_url"]
    assert event.pull.is_fork is False


def test_fork_detected_from_head_repo():
    payload = fixture("pull_request.opened.1.json")
    payload["pull_request"]["head"]["repo"]["full_name"] = "mallory/Hello-World"
    assert parse_event("pull_request", payload).pull.is_fork
    payload["pull_request"]["head"]["repo"] = None  # the fork was deleted
    assert parse_event("pull_request", payload).pull.is_fork


@pytest.mark.parametrize("action", ["assigned", "labeled", "edited", "locked", "ready_for_review"])
def test_other_pull_request_actions_are_ignored(action):
    payload = fixture("pull_request.opened.1.json")
    payload["action"] = action
    assert parse_event("pull_request", payload) is None


def test_comment_on_pull_request_becomes_event_and_installation_is_kept():
    payload = fixture("issue_comment.created.1.json")
    payload["issue"]["pull_request"] = {"url": "https://api.github.com/repos/x/y/pulls/1"}
    payload["installation"] = {"id": 77}
    event = parse_event("issue_comment", payload)
    assert isinstance(event, CommentEvent)
    assert event.pull_number == payload["issue"]["number"]
    assert event.author == payload["comment"]["user"]["login"]
    assert event.body == payload["comment"]["body"]
    assert event.repo.installation_id == 77


@pytest.mark.parametrize("name", ["issue_comment.created.1.json", "issue_comment.edited.1.json",
                                  "issue_comment.deleted.1.json"])
def test_issue_comments_and_edits_are_ignored(name):
    payload = fixture(name)
    assert parse_event("issue_comment", payload) is None  # a plain issue, not a PR
    payload["issue"]["pull_request"] = {"url": "x"}
    event = parse_event("issue_comment", payload)
    assert (event is not None) == (payload["action"] == "created")


def test_review_examples_become_events():
    submitted = parse_event("pull_request_review", fixture("pull_request_review.submitted.1.json"))
    assert isinstance(submitted, ReviewEvent) and submitted.action == "submitted"
    dismissed = parse_event("pull_request_review", fixture("pull_request_review.dismissed.1.json"))
    assert isinstance(dismissed, ReviewEvent) and dismissed.state == "dismissed"


def test_unknown_events_are_ignored_and_missing_keys_are_malformed():
    assert parse_event("star", fixture("push.none.1.json")) is None
    payload = fixture("pull_request.opened.1.json")
    del payload["pull_request"]["head"]
    with pytest.raises(MalformedPayload):
        parse_event("pull_request", payload)
    payload = fixture("pull_request.opened.1.json")
    payload["pull_request"]["number"] = "seven"
    with pytest.raises(MalformedPayload):
        parse_event("pull_request", payload)
