"""The server policy file: shape, defaults, strict validation, project selection."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from bot.models import Project
from policies.policy import (
    DEFAULT_PLAN,
    NOBODY,
    Policy,
    RepoPolicy,
    Subjects,
    load_policy,
    load_policy_file,
    select_projects,
)
from policies.validation import PolicyError

FULL = """
repos:
  acme/infrastructure-live:
    allow_forks: false
    repo_config_file: ./deploybot.yaml
    plan:      {users: [], teams: [], permission: write}
    apply:     {users: [Alice], teams: [acme/platform], permission: maintain}
    approvers: {teams: [acme/platform]}
    apply_requirements: [approved, mergeable, undiverged]
    approvals: 2
    apply_on_merge: true
    auto_apply_on_approval: true
    projects:
      - name: staging
        dir: ./staging/
        workspace: default
        autoplan: ["*.tf*", "../modules/**/*.tf"]
      - dir: prod
        workspace: blue
      - dir: .
"""


def load(text: str) -> Policy:
    return load_policy(textwrap.dedent(text))


def one_repo(body: str) -> str:
    """A policy with one repo whose settings are `body` (YAML lines at repo level)."""
    return "repos:\n  acme/infra:\n" + textwrap.indent(textwrap.dedent(body), "    ")


MINIMAL = "projects: [{dir: staging}]\n"


def repo(body: str = MINIMAL) -> RepoPolicy:
    policy = load_policy(one_repo(body))
    result = policy.repo("acme/infra")
    assert result is not None
    return result


def error(text: str) -> str:
    with pytest.raises(PolicyError) as info:
        load_policy(text)
    return str(info.value)


# --- the full example ------------------------------------------------------------


def test_full_example_loads_every_field():
    r = load(FULL).repo("acme/infrastructure-live")
    assert r is not None
    assert r.name == "acme/infrastructure-live"
    assert r.allow_forks is False
    assert r.repo_config_file == "deploybot.yaml"
    assert r.plan == Subjects(frozenset(), (), "write")
    assert r.apply == Subjects(frozenset({"alice"}), ("acme/platform",), "maintain")
    assert r.approvers == Subjects(frozenset(), ("acme/platform",), None)
    assert r.apply_requirements == {"approved", "mergeable", "undiverged"}
    assert r.approvals == 2
    assert r.apply_on_merge is True
    assert r.auto_apply_on_approval is True
    assert r.projects == (
        Project(dir="staging", workspace="default", name="staging", autoplan=("*.tf*", "../modules/**/*.tf")),
        Project(dir="prod", workspace="blue"),
        Project(dir="."),
    )


def test_repo_lookup_is_case_insensitive_and_exact():
    policy = load(FULL)
    assert policy.repo("ACME/Infrastructure-Live") is policy.repo("acme/infrastructure-live")
    assert policy.repo("acme/infrastructure") is None
    assert policy.repo("acme/infrastructure-live/sub") is None
    assert policy.repo("evil/infrastructure-live") is None


def test_gitlab_nested_paths_work():
    policy = load_policy(
        "repos:\n  group/sub/deeper/repo:\n    approvers: {teams: [group/sub/team]}\n    projects: [{dir: a}]\n"
    )
    r = policy.repo("Group/Sub/Deeper/Repo")
    assert r is not None and r.approvers.teams == ("group/sub/team",)


def test_load_policy_file(tmp_path: Path):
    path = tmp_path / "policy.yaml"
    path.write_text(FULL, encoding="utf-8")
    assert load_policy_file(path) == load(FULL)
    path.write_text("repos: {acme/infra: {projects: [{dir: ../x}]}}", encoding="utf-8")
    with pytest.raises(PolicyError, match=r"policy\.yaml: repos\.acme/infra\.projects\[0\]\.dir"):
        load_policy_file(str(path))


# --- defaults: deny unless allowed -------------------------------------------------


def test_defaults():
    r = repo()
    assert r.allow_forks is False
    assert r.repo_config_file is None
    assert r.plan == DEFAULT_PLAN == Subjects(permission="write")
    assert r.apply == NOBODY and r.apply.empty
    assert r.approvers == NOBODY
    assert r.apply_requirements == {"approved"}
    assert r.approvals == 1
    assert r.apply_on_merge is False
    assert r.auto_apply_on_approval is False
    assert r.projects == (Project(dir="staging"),)


def test_approvers_default_to_apply_subjects():
    r = repo("apply: {users: [bob], teams: [acme/ops], permission: admin}\n" + MINIMAL)
    assert r.approvers == r.apply == Subjects(frozenset({"bob"}), ("acme/ops",), "admin")


def test_omitted_keys_inside_a_given_block_mean_nobody():
    # Giving `plan` at all replaces the default "write": only bob may plan.
    r = repo("plan: {users: [bob]}\n" + MINIMAL)
    assert r.plan == Subjects(frozenset({"bob"}), (), None)
    assert repo("plan: {}\n" + MINIMAL).plan.empty


def test_empty_policy_allows_no_repo():
    assert load_policy("repos: {}").repos == {}
    assert load_policy("repos: {}").repo("acme/infra") is None


def test_gitlab_permission_names_are_mapped():
    r = repo(
        "plan: {permission: developer}\napply: {permission: maintainer}\n"
        "approvers: {permission: owner}\n" + MINIMAL
    )
    assert (r.plan.permission, r.apply.permission, r.approvers.permission) == ("write", "maintain", "admin")


def test_explicit_null_permission_means_not_by_permission():
    assert repo("plan: {users: [a], permission: null}\n" + MINIMAL).plan.permission is None


def test_users_are_lower_cased_and_teams_deduplicated():
    r = repo("apply: {users: [Alice, ALICE, 'renovate[bot]'], teams: [acme/Ops, acme/ops]}\n" + MINIMAL)
    assert r.apply.users == {"alice", "renovate[bot]"}
    assert r.apply.teams == ("acme/Ops",)


# --- strict validation ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("projects: [{dir: ../x}]", r'repos\.acme/infra\.projects\[0\]\.dir: must not contain "\.\."'),
        ("projects: [{dir: a/../../x}]", r"projects\[0\]\.dir: must not contain"),
        ("projects: [{dir: /etc}]", r"projects\[0\]\.dir: must be relative"),
        ("projects: [{dir: 'a b'}]", r"projects\[0\]\.dir: may contain only"),
        ("projects: [{dir: '-rf'}]", r"projects\[0\]\.dir: must not start with"),
        ("projects: [{dir: ''}]", r"projects\[0\]\.dir: must be a non-empty path"),
        ("projects: [{dir: 5}]", r"projects\[0\]\.dir: must be a string, not an integer"),
        ("projects: [{name: x}]", r"projects\[0\]\.dir: required"),
        ("projects: [{dir: a}, {dir: ./a/}]", r"projects\[1\]: another project already has dir 'a'"),
        ("projects: [{dir: a, name: n}, {dir: b, name: n}]", r"projects\[1\]\.name: 'n' is used"),
        ("projects: [{dir: a, name: 'x y'}]", r"projects\[0\]\.name: may contain only"),
        ("projects: [{dir: a, workspace: 'a/b'}]", r"projects\[0\]\.workspace"),
        ("projects: [{dir: a, dri: b}]", r"projects\[0\]\.dri: unknown key"),
        ("projects: [{dir: a, autoplan: '*.tf'}]", r"projects\[0\]\.autoplan: must be a list"),
        ("projects: [{dir: a, autoplan: []}]", r"projects\[0\]\.autoplan: must list at least one"),
        ("projects: [{dir: a, autoplan: ['../../x.tf']}]", r"projects\[0\]\.autoplan\[0\]: must not point outside"),
        ("projects: [{dir: a, autoplan: ['/etc/*']}]", r"projects\[0\]\.autoplan\[0\]: must be relative"),
        ("projects: [{dir: a, autoplan: ['[ab].tf']}]", r"projects\[0\]\.autoplan\[0\]: may use only"),
        ("projects: []", r"repos\.acme/infra\.projects: must list at least one"),
        ("allow_forks: false", r"repos\.acme/infra\.projects: required"),
        ("allow_forks: 'no'\n" + MINIMAL, r"repos\.acme/infra\.allow_forks: must be true or false, not a string"),
        ("apply_on_merge: 1\n" + MINIMAL, r"apply_on_merge: must be true or false, not an integer"),
        ("approvals: 0\n" + MINIMAL, r"repos\.acme/infra\.approvals: must be an integer >= 1"),
        ("approvals: true\n" + MINIMAL, r"approvals: must be an integer"),
        ("approvals: '2'\n" + MINIMAL, r"approvals: must be an integer"),
        ("max_projects_per_pull: -1\n" + MINIMAL, r"max_projects_per_pull: must be an integer >= 0"),
        ("project_statuses_max: x\n" + MINIMAL, r"project_statuses_max: must be an integer >= 0"),
        ("apply_requirements: [approved, reviewed]\n" + MINIMAL, r"apply_requirements\[1\]: unknown requirement 'reviewed'"),
        ("apply_requirements: [approved, approved]\n" + MINIMAL, r"apply_requirements\[1\]: 'approved' listed twice"),
        ("apply_requirements: approved\n" + MINIMAL, r"apply_requirements: must be a list"),
        ("auto_apply_on_approval: true\napply_requirements: [mergeable]\n" + MINIMAL,
         r"auto_apply_on_approval: needs `approved`"),
        ("plan: {permission: none}\n" + MINIMAL, r"repos\.acme/infra\.plan\.permission: must be one of"),
        ("plan: {permission: superuser}\n" + MINIMAL, r"plan\.permission: must be one of"),
        ("plan: {permission: Write}\n" + MINIMAL, r"plan\.permission: must be one of"),
        ("plan: {permission: reporter}\n" + MINIMAL, r"plan\.permission: must be one of"),
        ("apply: {users: alice}\n" + MINIMAL, r"apply\.users: must be a list, not a string"),
        ("apply: {users: ['a b']}\n" + MINIMAL, r"apply\.users\[0\]: not a user login"),
        ("apply: {teams: [platform]}\n" + MINIMAL, r"apply\.teams\[0\]: must look like org/team"),
        ("apply: {teams: [acme/../x]}\n" + MINIMAL, r"apply\.teams\[0\]: must look like org/team"),
        ("apply: {team: [acme/x]}\n" + MINIMAL, r"repos\.acme/infra\.apply\.team: unknown key"),
        ("apply:\n" + MINIMAL, r"repos\.acme/infra\.apply: must be a mapping \(use \{\} for nobody\), not null"),
        ("approvers: [acme/x]\n" + MINIMAL, r"approvers: must be a mapping"),
        ("repo_config_file: ../x.yaml\n" + MINIMAL, r"repo_config_file: must not contain"),
        ("repo_config_file: .\n" + MINIMAL, r"repo_config_file: must name a file"),
        ("custom_commands: [rm]\n" + MINIMAL, r"repos\.acme/infra\.custom_commands: unknown key"),
    ],
)
def test_invalid_repo_settings_name_the_bad_key(body: str, message: str):
    assert_matches(error(one_repo(body)), message)


def assert_matches(text: str, pattern: str) -> None:
    import re

    assert re.search(pattern, text), f"{pattern!r} not in {text!r}"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", r"must be a mapping with a `repos` key"),
        ("- a\n- b\n", r"must be a mapping"),
        ("repo: {}\n", r"^repo: unknown key"),
        ("version: 1\nrepos: {}\n", r"^version: unknown key"),
        ("{}\n", r"^repos: required"),
        ("repos: [acme/infra]\n", r"^repos: must be a mapping of repo full names, not a list"),
        ("repos: {infra: {projects: [{dir: a}]}}\n", r"^repos\.infra: not a repo full name"),
        ("repos: {acme/..: {projects: [{dir: a}]}}\n", r"^repos\.acme/\.\.: not a repo full name"),
        ("repos: {acme/infra: null}\n", r"^repos\.acme/infra: must be a mapping, not null"),
        ("repos:\n  acme/infra: {projects: [{dir: a}]}\n  Acme/Infra: {projects: [{dir: a}]}\n",
         r"repos\.Acme/Infra: listed twice"),
        ("repos:\n  acme/infra: {projects: [{dir: a}]}\n  acme/infra: {projects: [{dir: b}]}\n",
         r"duplicate key 'acme/infra'"),
        ("repos: {acme/infra: {projects: [{dir: a, dir: b}]}}\n", r"duplicate key 'dir'"),
        ("repos: {acme/infra: [\n", r"invalid YAML"),
    ],
)
def test_invalid_documents(text: str, message: str):
    assert_matches(error(text), message)


def test_yaml_merge_keys_may_be_overridden():
    text = """
    base: &base
      projects: [{dir: a}]
    """
    # Merge keys are fine (not duplicates), but unknown top-level keys are still refused.
    assert "base: unknown key" in error(textwrap.dedent(text) + "repos: {}\n")
    policy = load_policy(
        "repos:\n  acme/a: &a {approvals: 2, projects: [{dir: x}]}\n  acme/b: {<<: *a, approvals: 3}\n"
    )
    assert policy.repos["acme/a"].approvals == 2
    assert policy.repos["acme/b"].approvals == 3


def test_policy_error_is_a_value_error():
    assert issubclass(PolicyError, ValueError)


# --- four eyes and apply on merge ---------------------------------------------------------


def test_approvers_exclude_defaults_to_author_and_committers():
    assert repo().approvers_exclude == frozenset({"author", "committers"})


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("[author, committers]", {"author", "committers"}),
        ("[committers, author]", {"author", "committers"}),
        ("[author]", {"author"}),
        ("[committers]", {"committers"}),
        ("[]", set()),
    ],
)
def test_approvers_exclude_may_be_loosened(value: str, expected: set[str]):
    assert repo(f"approvers_exclude: {value}\n" + MINIMAL).approvers_exclude == frozenset(expected)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("[reviewers]", r"^repos\.acme/infra\.approvers_exclude\[0\]: must be one of author, committers$"),
        ("[author, Committers]", r"^repos\.acme/infra\.approvers_exclude\[1\]: must be one of author, committers$"),
        ("[author, null]", r"^repos\.acme/infra\.approvers_exclude\[1\]: must be one of"),
        ("[[author]]", r"^repos\.acme/infra\.approvers_exclude\[0\]: must be one of"),
        ("author", r"^repos\.acme/infra\.approvers_exclude: must be a list, not a string$"),
        ("null", r"^repos\.acme/infra\.approvers_exclude: must be a list, not null$"),
        ("{author: true}", r"^repos\.acme/infra\.approvers_exclude: must be a list, not a mapping$"),
    ],
)
def test_invalid_approvers_exclude_names_the_bad_key(value: str, message: str):
    assert_matches(error(one_repo(f"approvers_exclude: {value}\n" + MINIMAL)), message)


def test_apply_on_merge_branches_default_to_none_given():
    # Empty: the repository's default branch (policies.apply_requirements.merge_apply_refusals).
    assert repo().apply_on_merge_branches == ()


def test_apply_on_merge_branches_are_a_list_of_names_in_order():
    r = repo("apply_on_merge: true\napply_on_merge_branches: [main, release/2026.12, hot_fix-1]\n" + MINIMAL)
    assert r.apply_on_merge_branches == ("main", "release/2026.12", "hot_fix-1")
    assert repo("apply_on_merge_branches: []\n" + MINIMAL).apply_on_merge_branches == ()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("[main, 'a b']", r"^repos\.acme/infra\.apply_on_merge_branches\[1\]: not a branch name$"),
        ("['']", r"^repos\.acme/infra\.apply_on_merge_branches\[0\]: not a branch name$"),
        ("[5]", r"apply_on_merge_branches\[0\]: not a branch name"),
        ("[null]", r"apply_on_merge_branches\[0\]: not a branch name"),
        ("[[main]]", r"apply_on_merge_branches\[0\]: not a branch name"),
        ("['release/../main']", r"apply_on_merge_branches\[0\]: not a branch name"),
        ("['a..b']", r"apply_on_merge_branches\[0\]: not a branch name"),
        ("['ma\u0456n']", r"apply_on_merge_branches\[0\]: not a branch name"),  # Cyrillic і
        ("['main;rm']", r"apply_on_merge_branches\[0\]: not a branch name"),
        ("main", r"^repos\.acme/infra\.apply_on_merge_branches: must be a list, not a string$"),
        ("null", r"^repos\.acme/infra\.apply_on_merge_branches: must be a list, not null$"),
    ],
)
def test_invalid_apply_on_merge_branches_name_the_bad_key(value: str, message: str):
    assert_matches(error(one_repo(f"apply_on_merge_branches: {value}\n" + MINIMAL)), message)


# --- select_projects ---------------------------------------------------------------------


@pytest.fixture
def three() -> RepoPolicy:
    return repo(
        """
        projects:
          - {name: staging, dir: envs/staging}
          - {dir: envs/prod, workspace: blue}
          - {dir: envs/prod, workspace: green}
        """
    )


def labels(projects: list[Project]) -> list[str]:
    return [p.label for p in projects]


def test_select_without_filters_is_everything(three: RepoPolicy):
    assert labels(select_projects(three)) == ["staging", "envs/prod:blue", "envs/prod:green"]


def test_select_by_name_dir_workspace(three: RepoPolicy):
    assert labels(select_projects(three, name="staging")) == ["staging"]
    assert labels(select_projects(three, dir="./envs/prod/")) == ["envs/prod:blue", "envs/prod:green"]
    assert labels(select_projects(three, dir="envs//prod", workspace="green")) == ["envs/prod:green"]
    assert labels(select_projects(three, workspace="default")) == ["staging"]


def test_select_filters_must_all_match(three: RepoPolicy):
    assert select_projects(three, name="staging", dir="envs/prod") == []
    assert select_projects(three, dir="envs/staging", workspace="blue") == []


def test_select_matching_nothing_is_empty(three: RepoPolicy):
    assert select_projects(three, name="prod") == []
    assert select_projects(three, name="") == []  # unnamed projects are not called ""
    assert select_projects(three, dir="envs") == []  # no prefix matching
    assert select_projects(three, dir="../envs/prod") == []
    assert select_projects(three, dir="/envs/prod") == []
    assert select_projects(three, name="Staging") == []


def test_select_root_dir():
    r = repo("projects: [{dir: .}, {dir: sub}]")
    assert select_projects(r, dir="./") == [Project(dir=".")]
    assert select_projects(r, dir=".") == [Project(dir=".")]


# --- pinned repository ids ---------------------------------------------------------


def test_repo_id_is_optional_and_pins_a_positive_integer():
    assert repo().id is None
    assert repo("id: 123456\n" + MINIMAL).id == 123456


@pytest.mark.parametrize("value", ["0", "-1", "'123456'", "true", "1.5", "null", "[1]"])
def test_repo_id_must_be_an_unquoted_positive_integer(value: str):
    # A quoted or wrong id would never match a payload's and would refuse every event: say so at load.
    assert_matches(error(one_repo(f"id: {value}\n" + MINIMAL)),
                   r"^repos\.acme/infra\.id: must be the forge's numeric repository \(GitLab: project\) id")


def test_projects_name_their_runner_pools_and_inherit_the_repos() -> None:
    policy = load_policy(
        "repos:\n  acme/live:\n    pools: {plan: plans, apply: applies}\n    projects:\n"
        "      - dir: staging\n      - dir: production\n        pools: {apply: prod-applies}\n")
    staging, production = policy.repo("acme/live").projects
    assert (staging.plan_pool, staging.apply_pool) == ("plans", "applies")
    assert (production.plan_pool, production.apply_pool) == ("plans", "prod-applies")
    assert production.pool("plan") == "plans" and production.pool("apply") == "prod-applies"
    for bad in ("{drift: x}", "{plan: '../x'}", "[plans]"):
        with pytest.raises(PolicyError, match="pools"):
            load_policy(f"repos:\n  acme/live:\n    projects:\n      - dir: staging\n        pools: {bad}\n")
