"""Slack: v0 signatures, Approve/Reject interactions, rendered messages, the notifier over real HTTP,
and who may approve a CI plan with the real bot."""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bot.ci.slack import (
    APPROVE_ACTION_ID,
    MESSAGE_KINDS,
    REJECT_ACTION_ID,
    SlackDecision,
    SlackNotifier,
    parse_interaction,
    render_run_message,
    verify_slack_signature,
)
from bot.forges.webhook import InvalidSignature, MalformedPayload
from bot.sandbox.forges import FORGES
from bot.sandbox.trial import REPO, wait_for
from tests.slack_fake import FakeSlack, form_body, interaction_body, interaction_payload, sign_slack_request
from tests.test_trigger_api import KEY, SIGNING_SECRET, click, get_run, post_run
from tests.world import TEST_POLICY, World, staging_change

SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
NOW = 1_700_000_000
SHA = "4d2c9a1e0f7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d"


@pytest.fixture
def slack() -> Iterator[FakeSlack]:
    with FakeSlack(bot_token="xoxb-1-secret-bot-token", channels=("C0123",)) as fake:
        yield fake


# -- signatures ------------------------------------------------------------------------------


def test_signature_good():
    body = interaction_body(7, True)
    verify_slack_signature(sign_slack_request(body, SECRET, NOW), body, SECRET, now=NOW + 299)


def test_signature_from_slacks_documentation():
    """The worked example in Slack's 'Verifying requests from Slack' guide."""
    body = (b"token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V"
            b"&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text="
            b"&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN"
            b"&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c")
    headers = {
        "X-Slack-Request-Timestamp": "1531420618",
        "X-Slack-Signature": "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503",
    }
    verify_slack_signature(headers, body, SECRET, now=1531420618)


@pytest.mark.parametrize("case", ["wrong secret", "changed body", "v1 scheme", "garbage"])
def test_signature_bad(case):
    body = interaction_body(7, True)
    headers = sign_slack_request(body, SECRET, NOW)
    if case == "wrong secret":
        headers = sign_slack_request(body, "another-secret", NOW)
    elif case == "changed body":
        body = interaction_body(8, True)
    elif case == "v1 scheme":
        headers["X-Slack-Signature"] = headers["X-Slack-Signature"].replace("v0=", "v1=")
    else:
        headers["X-Slack-Signature"] = "v0=zz"
    with pytest.raises(InvalidSignature, match="does not match"):
        verify_slack_signature(headers, body, SECRET, now=NOW)


@pytest.mark.parametrize("skew", [-301, 301, 3600])
def test_signature_stale_or_future(skew):
    body = interaction_body(7, True)
    headers = sign_slack_request(body, SECRET, NOW)
    with pytest.raises(InvalidSignature, match="five minutes"):
        verify_slack_signature(headers, body, SECRET, now=NOW + skew)


@pytest.mark.parametrize("missing", ["X-Slack-Signature", "X-Slack-Request-Timestamp"])
def test_signature_missing(missing):
    body = interaction_body(7, True)
    headers = sign_slack_request(body, SECRET, NOW)
    del headers[missing]
    with pytest.raises(InvalidSignature, match="missing"):
        verify_slack_signature(headers, body, SECRET, now=NOW)


def test_signature_headers_case_insensitive_and_timestamp_must_be_digits():
    body = interaction_body(7, True)
    headers = {k.lower(): v for k, v in sign_slack_request(body, SECRET, NOW).items()}
    verify_slack_signature(headers, body, SECRET, now=NOW)
    headers["x-slack-request-timestamp"] = "17e8"
    with pytest.raises(InvalidSignature, match="Unix seconds"):
        verify_slack_signature(headers, body, SECRET, now=NOW)


def test_signature_needs_a_configured_secret():
    body = interaction_body(7, True)
    with pytest.raises(ValueError):
        verify_slack_signature(sign_slack_request(body, "", NOW), body, "", now=NOW)


# -- interactions ----------------------------------------------------------------------------


def test_parse_approve():
    body = interaction_body(42, True, user_id="U123", username="alice", response_url="https://hooks.slack.com/actions/x")
    assert parse_interaction(body) == SlackDecision(
        run_id=42, approve=True, slack_user_id="U123", slack_username="alice",
        response_url="https://hooks.slack.com/actions/x",
    )


def test_parse_reject():
    decision = parse_interaction(interaction_body(42, False, user_id="U999", username="bob"))
    assert decision is not None
    assert (decision.run_id, decision.approve, decision.slack_user_id, decision.slack_username) == (
        42, False, "U999", "bob")


def test_foreign_actions_and_other_interactions_are_ignored():
    assert parse_interaction(interaction_body(42, True, action_id="someone_elses_button")) is None
    view_submission = {"type": "view_submission", "user": {"id": "U1"}, "view": {"id": "V1"}}
    assert parse_interaction(form_body(view_submission)) is None
    shortcut = {"type": "shortcut", "callback_id": "deploybot_approve", "user": {"id": "U1"}}
    assert parse_interaction(form_body(shortcut)) is None


def test_our_action_among_others_is_found():
    payload = interaction_payload(5, False)
    payload["actions"].insert(0, {"action_id": "other", "type": "button", "value": "x"})
    decision = parse_interaction(form_body(payload))
    assert decision is not None and decision.run_id == 5 and decision.approve is False


@pytest.mark.parametrize(
    "body",
    [
        b"not a form",
        b"payload=%7Bnot+json",
        b"payload=%5B1%2C2%5D",  # a JSON list
        b"other=1",
        b"payload=a&payload=b",
        b"\xff\xfe",
    ],
)
def test_malformed_bodies(body):
    with pytest.raises(MalformedPayload):
        parse_interaction(body)


@pytest.mark.parametrize("breakage", ["value not a number", "value missing", "no user", "no actions", "two of ours"])
def test_malformed_clicks_on_our_buttons(breakage):
    payload = interaction_payload(7, True)
    if breakage == "value not a number":
        payload["actions"][0]["value"] = "7; drop table"
    elif breakage == "value missing":
        del payload["actions"][0]["value"]
    elif breakage == "no user":
        del payload["user"]
    elif breakage == "no actions":
        del payload["actions"]
    else:
        payload["actions"].append(dict(payload["actions"][0], action_id=REJECT_ACTION_ID))
    with pytest.raises(MalformedPayload):
        parse_interaction(form_body(payload))


# -- messages --------------------------------------------------------------------------------


def _message(kind: str, **kwargs: object) -> dict:
    fields = dict(run_id=7, run_url="https://deploybot.example.com/api/v1/runs/7", repo="acme/infrastructure-live",
                  project="staging", sha=SHA, summary="Plan: 1 to add, 0 to change, 0 to destroy.")
    fields.update(kwargs)
    return render_run_message(kind, **fields)


def _buttons(message: dict) -> list[dict]:
    return [e for b in message["blocks"] if b["type"] == "actions" for e in b["elements"]]


def test_plan_ready_message_has_the_facts_a_link_and_both_buttons():
    message = _message("plan_ready")
    text = json.dumps(message)
    for fact in ("acme/infrastructure-live", "staging", SHA[:8], "Plan: 1 to add",
                 "<https://deploybot.example.com/api/v1/runs/7|run 7>"):
        assert fact in text
    buttons = {b["action_id"]: b for b in _buttons(message)}
    assert set(buttons) == {APPROVE_ACTION_ID, REJECT_ACTION_ID}
    assert buttons[APPROVE_ACTION_ID]["value"] == buttons[REJECT_ACTION_ID]["value"] == "7"
    assert buttons[APPROVE_ACTION_ID]["style"] == "primary" and buttons[REJECT_ACTION_ID]["style"] == "danger"
    assert "confirm" in buttons[APPROVE_ACTION_ID]
    assert "plan ready" in message["text"] and "Plan: 1 to add" in message["text"]


def test_the_buttons_round_trip_through_a_click():
    """What we render is what parse_interaction recognises."""
    for button in _buttons(_message("plan_ready", run_id=31)):
        payload = interaction_payload(0, True)
        payload["actions"] = [dict(button, block_id="b", action_ts="1.2")]
        decision = parse_interaction(form_body(payload))
        assert decision is not None and decision.run_id == 31
        assert decision.approve is (button["action_id"] == APPROVE_ACTION_ID)


@pytest.mark.parametrize("kind,expected", [
    ("approved", "Approved* by alice"),
    ("rejected", "Rejected* by alice"),
    ("applied", "Applied"),
    ("failed", "Apply failed"),
])
def test_outcome_messages_have_no_buttons(kind, expected):
    message = _message(kind, by="alice", command="apply")
    assert _buttons(message) == []
    assert expected in message["blocks"][0]["text"]["text"]
    assert "run 7" in message["blocks"][0]["text"]["text"]


def test_messages_escape_mrkdwn_and_bound_the_summary():
    message = _message("failed", command="plan", summary="<!channel> & " + "x" * 10_000, by="<@U1>")
    summary_block = message["blocks"][2]["text"]["text"]
    assert "<!channel>" not in json.dumps(message)
    assert "&lt;!channel&gt; &amp;" in summary_block
    assert len(summary_block) <= 3000
    assert len(message["text"]) <= 3000


def test_every_kind_renders_and_unknown_kinds_are_refused():
    for kind in MESSAGE_KINDS:
        assert _message(kind)["blocks"]
    with pytest.raises(ValueError):
        _message("exploded")


# -- notifier over HTTP ----------------------------------------------------------------------


def test_notify_through_incoming_webhook(slack: FakeSlack):
    notifier = SlackNotifier(webhook_url=slack.webhook_url)
    try:
        assert notifier.notify(_message("plan_ready")) is True
    finally:
        notifier.close()
    assert slack.webhook_posts == [_message("plan_ready")]


def test_notify_through_chat_post_message(slack: FakeSlack):
    notifier = SlackNotifier(bot_token=slack.bot_token, channel="C0123", api_url=slack.api_url)
    assert notifier.notify(_message("applied")) is True
    assert slack.chat_messages == [dict(_message("applied"), channel="C0123")]
    assert slack.auth_headers == [f"Bearer {slack.bot_token}"]


def test_notify_with_a_shared_http_client(slack: FakeSlack):
    with httpx.Client() as http:
        notifier = SlackNotifier(bot_token=slack.bot_token, channel="C0123", api_url=slack.api_url, http=http)
        assert notifier.notify(_message("approved", by="alice")) is True
        notifier.close()  # not ours: the shared client stays open
        assert not http.is_closed


@pytest.mark.parametrize("token,channel,error", [
    ("xoxb-1-secret-bot-token", "C-gone", "channel_not_found"),
    ("xoxb-wrong-token", "C0123", "invalid_auth"),
])
def test_ok_false_is_a_logged_failure_without_secrets(slack: FakeSlack, caplog, token, channel, error):
    caplog.set_level(logging.DEBUG)
    notifier = SlackNotifier(bot_token=token, channel=channel, api_url=slack.api_url)
    assert notifier.notify(_message("plan_ready")) is False
    assert slack.chat_messages == []
    assert error in caplog.text
    assert token not in caplog.text


def test_webhook_failures_are_logged_without_the_url(slack: FakeSlack, caplog):
    caplog.set_level(logging.DEBUG)  # httpx logs each request's URL at INFO: the webhook URL is a secret
    good = SlackNotifier(webhook_url=slack.webhook_url)
    assert good.notify(_message("applied")) is True
    wrong_url = slack.webhook_url + "-revoked"
    revoked = SlackNotifier(webhook_url=wrong_url)
    assert revoked.notify(_message("applied")) is False
    assert revoked.notify({"blocks": []}) is False
    assert "no_service" in caplog.text
    assert slack.webhook_path not in caplog.text
    assert "***" in caplog.text  # httpx's own request line, redacted
    assert slack.webhook_url not in repr(good)


def test_unreachable_slack_is_logged_not_raised(caplog):
    with FakeSlack() as fake:
        webhook_url, api_url = fake.webhook_url, fake.api_url
    # The fake has stopped: nothing listens on its port any more.
    caplog.set_level(logging.WARNING)
    assert SlackNotifier(webhook_url=webhook_url, timeout=2).notify(_message("applied")) is False
    assert SlackNotifier(bot_token="xoxb-secret-9", channel="C0123", api_url=api_url, timeout=2).notify(
        _message("applied")) is False
    assert "request failed" in caplog.text
    assert "xoxb-secret-9" not in caplog.text and webhook_url not in caplog.text


def test_respond_replaces_the_original_message_only_on_slacks_host(slack: FakeSlack, caplog):
    notifier = SlackNotifier(webhook_url=slack.webhook_url, response_url_prefix=slack.url + "/actions/")
    assert notifier.respond(slack.response_url, _message("approved", by="alice")) is True
    assert slack.responses == [dict(_message("approved", by="alice"), replace_original=True)]
    strict = SlackNotifier(webhook_url=slack.webhook_url)  # default: only https://hooks.slack.com/
    assert strict.respond(slack.response_url, _message("approved")) is False
    assert len(slack.responses) == 1


@pytest.mark.parametrize("kwargs", [
    {},
    {"webhook_url": "https://hooks.slack.com/services/x", "bot_token": "xoxb-1", "channel": "C1"},
    {"bot_token": "xoxb-1"},
    {"webhook_url": "hooks.slack.com/services/x"},
])
def test_notifier_options_are_checked_at_construction(kwargs):
    with pytest.raises(ValueError):
        SlackNotifier(**kwargs)


def test_notifier_repr_hides_secrets():
    assert "xoxb-1-abc" not in repr(SlackNotifier(bot_token="xoxb-1-abc", channel="C1"))
    assert "T0/B0/secret" not in repr(SlackNotifier(webhook_url="https://hooks.slack.com/services/T0/B0/secret"))


# -- who approves a CI plan, with the real bot --------------------------------------------------


@pytest.fixture(params=sorted(FORGES))
def ci_world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[World, FakeSlack]]:
    """The bot with one CI caller (jenkins: staging) and three Slack users mapped to approvers' logins."""
    key_file = tmp_path / "jenkins.key"
    key_file.write_text(KEY)
    policy = copy.deepcopy(TEST_POLICY)
    policy["callers"] = [{
        "name": "jenkins",
        "hmac": {"key_file": str(key_file)},
        "repos": {REPO: {"projects": ["staging"], "commands": ["plan", "apply"], "apply_refs": ["refs/heads/main"]}},
    }]
    with FakeSlack() as slack:
        world = World(tmp_path / "world", policy, forge=request.param, extra_config={
            "slack": {"signing_secret": SIGNING_SECRET, "webhook_url": slack.webhook_url,
                      "users": {"U_DAVE": "dave", "U_BOB": "bob"}},
        })
        try:
            yield world, slack
        finally:
            world.stop()


def test_the_commits_author_cannot_approve_its_ci_plan(ci_world: tuple[World, FakeSlack]):
    """dave (an approver) pushed the commit CI deploys: his Approve is refused, bob's applies it."""
    world, slack = ci_world
    sha = world.repo.commit(staging_change(world), "Resize staging", push="main", author="dave")
    request = {"repo": REPO, "ref": "main", "sha": sha, "project": "staging"}
    plan_id = post_run(world, {**request, "command": "plan"}).json()["id"]
    wait_for(lambda: slack.webhook_posts, 60, "the plan-ready message")
    apply = post_run(world, {**request, "command": "apply"})
    assert apply.status_code == 201 and apply.json()["status"] == "awaiting_approval", apply.text

    in_slack = click(world, plan_id, True, "U_DAVE")
    assert in_slack.status_code == 403, in_slack.text
    assert f"dave authored or committed {sha[:8]}" in in_slack.json()["error"]
    with_token = httpx.post(f"{world.url}/api/v1/runs/{plan_id}/approve",
                            headers={"Authorization": f"token {world.forge.user_token('dave')}"}, timeout=30)
    assert with_token.status_code == 403 and "authored or committed" in with_token.json()["error"]
    assert get_run(world, plan_id)["approval"] is None
    assert get_run(world, apply.json()["id"])["status"] == "awaiting_approval"
    store = world.store()
    try:
        refusals = [e for e in store.audit_entries() if e["action"] == "approve" and e["outcome"] == "refused"]
    finally:
        store.close()
    assert {e["actor"] for e in refusals} == {"slack:dave", "api:dave"}
    assert all("authored or committed" in e["detail"] and e["sha"] == sha for e in refusals)

    approved = click(world, plan_id, True, "U_BOB")  # another approver: the honest path
    assert approved.status_code == 200 and approved.json()["status"] == "approved", approved.text
    wait_for(lambda: get_run(world, apply.json()["id"])["status"] == "succeeded", 120, "the apply")
    assert world.state_resources("staging") > 0

