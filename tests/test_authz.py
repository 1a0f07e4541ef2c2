"""Who may do what: users, teams, permission levels; empty rules allow nobody."""

from __future__ import annotations

import pytest

from policies.authz import Actor, is_allowed, permission_rank, teams_to_check
from policies.policy import NOBODY, Subjects, load_policy


def actor(login: str = "carol", permission: str = "none", teams: frozenset[str] = frozenset()) -> Actor:
    return Actor(login, permission, teams)


def test_permission_order():
    order = ["none", "read", "triage", "write", "maintain", "admin"]
    assert [permission_rank(p) for p in order] == list(range(6))
    assert permission_rank("developer") == permission_rank("write")
    assert permission_rank("maintainer") == permission_rank("maintain")
    assert permission_rank("owner") == permission_rank("admin")
    assert permission_rank("root") == 0
    assert permission_rank("ADMIN") == 0  # no guessing at spellings
    assert permission_rank(None) == 0


@pytest.mark.parametrize(
    ("have", "need", "allowed"),
    [
        ("admin", "write", True),
        ("maintain", "write", True),
        ("write", "write", True),
        ("triage", "write", False),
        ("read", "write", False),
        ("none", "write", False),
        ("write", "maintain", False),
        ("maintain", "maintain", True),
        ("admin", "admin", True),
        ("maintain", "admin", False),
        ("read", "read", True),
        ("none", "read", False),
        ("developer", "write", True),  # a GitLab actor
        ("maintainer", "admin", False),
        ("superuser", "read", False),  # unknown actor permission counts as none
    ],
)
def test_permission_threshold(have: str, need: str, allowed: bool):
    assert is_allowed(Subjects(permission=need), actor(permission=have)) is allowed


def test_listed_user_is_case_insensitive():
    subjects = load_policy(
        "repos: {acme/x: {apply: {users: [Alice]}, projects: [{dir: a}]}}"
    ).repos["acme/x"].apply
    assert is_allowed(subjects, actor("alice"))
    assert is_allowed(subjects, actor("ALICE"))
    assert not is_allowed(subjects, actor("alice2"))
    assert not is_allowed(subjects, actor("alic"))


def test_hand_built_subjects_with_capitals_still_match():
    assert is_allowed(Subjects(users=frozenset({"Bob"})), actor("bob"))


def test_unicode_lookalike_login_is_not_the_user():
    assert not is_allowed(Subjects(users=frozenset({"alice"})), actor("\u0430lice"))  # Cyrillic а


def test_team_membership():
    subjects = Subjects(teams=("acme/platform",))
    assert is_allowed(subjects, actor(teams=frozenset({"acme/platform"})))
    assert is_allowed(subjects, actor(teams=frozenset({"ACME/Platform"})))
    assert not is_allowed(subjects, actor(teams=frozenset({"acme/platform-readers"})))
    assert not is_allowed(subjects, actor(teams=frozenset({"other/platform"})))
    assert not is_allowed(subjects, actor(permission="admin"))  # admin alone is not a team member


def test_any_one_rule_is_enough():
    subjects = Subjects(frozenset({"alice"}), ("acme/ops",), "maintain")
    assert is_allowed(subjects, actor("alice", "read"))
    assert is_allowed(subjects, actor("bob", "read", frozenset({"acme/ops"})))
    assert is_allowed(subjects, actor("carol", "maintain"))
    assert not is_allowed(subjects, actor("dave", "write", frozenset({"acme/dev"})))


def test_empty_subjects_allow_nobody():
    assert NOBODY.empty
    assert not is_allowed(NOBODY, actor("admin", "admin", frozenset({"acme/platform"})))
    assert not is_allowed(Subjects(), actor("alice", "admin"))


def test_permission_none_never_lets_strangers_in():
    # A loaded policy cannot say "none"; a hand-built one must still deny.
    assert not is_allowed(Subjects(permission="none"), actor(permission="none"))


def test_empty_login_is_nobody():
    assert not is_allowed(Subjects(users=frozenset({""}), permission="read"), actor("", "admin"))


def test_teams_to_check():
    a = Subjects(teams=("acme/platform", "acme/ops"))
    b = Subjects(users=frozenset({"x"}), teams=("acme/ops", "group/sub/team"))
    assert teams_to_check(a, b) == {"acme/platform", "acme/ops", "group/sub/team"}
    assert teams_to_check(NOBODY) == set()
    assert teams_to_check() == set()
