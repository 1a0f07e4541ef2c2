"""The `callers:` section of the policy: shape, strict validation, trigger decisions (pure)."""

from __future__ import annotations

import textwrap

import pytest

from bot.models import Project
from policies.callers import (
    Caller,
    CallerGrant,
    OidcTrust,
    authorize_trigger,
    parse_callers,
)
from policies.policy import load_policy
from policies.validation import PolicyError

REPOS = """
repos:
  acme/infrastructure-live:
    projects:
      - {name: staging, dir: staging}
      - {name: production, dir: production}
      - {dir: shared, workspace: blue}
      - {dir: shared, workspace: green}
  acme/other:
    projects: [{dir: .}]
"""

CALLERS = """
callers:
  - name: github-actions-infra
    oidc:
      issuer: https://token.actions.githubusercontent.com
      audience: deploybot
      claims:
        repository: acme/infrastructure-live
        repository_id: "123456"
        job_workflow_ref: acme/infrastructure-live/.github/workflows/deploy.yml@refs/heads/main
        ref: [refs/heads/main, refs/heads/release]
    repos:
      Acme/Infrastructure-Live:
        projects: [staging, production]
        commands: [apply, plan]
        apply_refs: [refs/heads/main]
  - name: gitlab-ci
    oidc: {issuer: https://gitlab.example.com, audience: deploybot,
           claims: {project_path: acme/infrastructure-live, project_id: "42", ref_protected: "true"}}
    repos:
      acme/infrastructure-live: {projects: [staging], commands: [plan]}
  - name: jenkins
    hmac: {key_file: /run/secrets/jenkins-deploybot-key}
    repos:
      acme/infrastructure-live: {projects: [shared], commands: [plan, apply], apply_refs: [refs/heads/main, refs/tags/v1]}
      acme/other: {projects: ["."], commands: [plan]}
  - name: circleci
    hmac: {key_env: CIRCLECI_DEPLOYBOT_KEY}
    repos:
      acme/other: {projects: ["."], commands: [plan]}
"""

STAGING = Project(dir="staging", name="staging")
PRODUCTION = Project(dir="production", name="production")
SHARED_BLUE = Project(dir="shared", workspace="blue")
ROOT = Project(dir=".")


def callers(text: str = CALLERS) -> tuple[Caller, ...]:
    return load_policy(textwrap.dedent(REPOS) + textwrap.dedent(text)).callers


def by_name(name: str) -> Caller:
    return next(c for c in callers() if c.name == name)


def error(callers_yaml: str) -> str:
    with pytest.raises(PolicyError) as info:
        load_policy(textwrap.dedent(REPOS) + textwrap.dedent(callers_yaml))
    return str(info.value)


# --- loading ---------------------------------------------------------------------


def test_full_example_loads_every_field():
    gha, gitlab, jenkins, circle = callers()
    assert gha == Caller(
        name="github-actions-infra",
        oidc=OidcTrust(
            issuer="https://token.actions.githubusercontent.com",
            audience="deploybot",
            claims={
                "repository": ("acme/infrastructure-live",),
                "repository_id": ("123456",),
                "job_workflow_ref": (
                    "acme/infrastructure-live/.github/workflows/deploy.yml@refs/heads/main",
                ),
                "ref": ("refs/heads/main", "refs/heads/release"),
            },
        ),
        hmac_key_file=None,
        hmac_key_env=None,
        repos={
            "acme/infrastructure-live": CallerGrant(
                projects=("staging", "production"),
                commands=("plan", "apply"),  # canonical order, whatever the file's
                apply_refs=("refs/heads/main",),
            )
        },
    )
    assert gitlab.oidc is not None and gitlab.oidc.claims["ref_protected"] == ("true",)
    assert gitlab.repos["acme/infrastructure-live"] == CallerGrant(("staging",), ("plan",), ())
    assert jenkins.oidc is None
    assert jenkins.hmac_key_file == "/run/secrets/jenkins-deploybot-key" and jenkins.hmac_key_env is None
    assert jenkins.repos["acme/infrastructure-live"].apply_refs == ("refs/heads/main", "refs/tags/v1")
    assert circle.hmac_key_env == "CIRCLECI_DEPLOYBOT_KEY" and circle.hmac_key_file is None


def test_no_callers_section_means_nobody():
    assert load_policy(textwrap.dedent(REPOS)).callers == ()
    assert load_policy(textwrap.dedent(REPOS) + "callers: []\n").callers == ()


def test_parse_callers_without_repos_skips_the_cross_check():
    raw = [{"name": "x", "hmac": {"key_env": "K"}, "repos": {"a/b": {"projects": ["p"], "commands": ["plan"]}}}]
    (caller,) = parse_callers(raw)
    assert caller.grant("A/B") == CallerGrant(("p",), ("plan",), ())
    with pytest.raises(PolicyError, match=r"^callers\[0\]\.repos\.a/b: not in `repos`"):
        parse_callers(raw, repos={})
    with pytest.raises(PolicyError, match=r"^mine: must be a list of callers, not a mapping"):
        parse_callers({}, path="mine")


def test_oidc_trust_matching_is_exact_strings():
    trust = OidcTrust("https://i", "a", {"repository_id": ("42",), "ref": ("refs/heads/main", "refs/heads/rel")})
    assert trust.matches({"repository_id": "42", "ref": "refs/heads/rel", "other": "x"})
    assert not trust.matches({"repository_id": 42, "ref": "refs/heads/main"})  # not a string
    assert not trust.matches({"repository_id": "42"})  # missing claim
    assert not trust.matches({"repository_id": "42", "ref": "refs/heads/Main"})
    assert not trust.matches({"repository_id": "420", "ref": "refs/heads/main"})
    assert not trust.matches({"repository_id": "42", "ref": ["refs/heads/main"]})


HMAC_CALLER = "  - name: j\n    hmac: {key_env: K}\n"
PLAN_GRANT = "    repos: {acme/other: {projects: ['.'], commands: [plan]}}\n"
OIDC = (
    "  - name: o\n    oidc: {issuer: https://i.example, audience: d, claims: %s}\n" + PLAN_GRANT
)
GOOD_CLAIMS = "{repository: acme/x, repository_id: '1'}"


@pytest.mark.parametrize(
    "text, message",
    [
        ("callers: {}\n", r"^callers: must be a list of callers, not a mapping"),
        ("callers:\n", r"^callers: must be a list of callers, not null"),
        ("callers: [x]\n", r"^callers\[0\]: must be a mapping, not a string"),
        ("callers:\n  - {hmac: {key_env: K}, repos: {}}\n", r"^callers\[0\]\.name: required"),
        ("callers:\n  - {name: 'a b', hmac: {key_env: K}}\n", r"^callers\[0\]\.name: must be 1-64"),
        ("callers:\n  - {name: -x, hmac: {key_env: K}}\n", r"^callers\[0\]\.name: must be 1-64"),
        ("callers:\n  - {name: 7, hmac: {key_env: K}}\n", r"^callers\[0\]\.name: must be 1-64"),
        ("callers:\n" + HMAC_CALLER + PLAN_GRANT + "  - name: J\n    hmac: {key_env: K2}\n" + PLAN_GRANT,
         r"^callers\[1\]\.name: 'J' is used by another caller"),
        ("callers:\n  - {name: a, hmac: {key_env: K}, repos: {}, role: admin}\n",
         r"^callers\[0\]\.role: unknown key \(allowed: name, oidc, hmac, repos\)"),
        ("callers:\n  - {name: a, key: s3cret, repos: {}}\n", r"^callers\[0\]: never write a key in the policy"),
        ("callers:\n  - {name: a, repos: {}}\n", r"^callers\[0\]: give exactly one of oidc, hmac"),
        ("callers:\n  - name: a\n    hmac: {key_env: K}\n    oidc: {}\n    repos: {}\n",
         r"^callers\[0\]: give exactly one of oidc, hmac"),
        # hmac
        ("callers:\n  - {name: a, hmac: {key: s3cret}}\n", r"^callers\[0\]\.hmac: never write the key in the policy"),
        ("callers:\n  - {name: a, hmac: /run/key}\n", r"^callers\[0\]\.hmac: must be a mapping with key_file or key_env"),
        ("callers:\n  - {name: a, hmac: {}}\n", r"^callers\[0\]\.hmac: give exactly one of key_file, key_env"),
        ("callers:\n  - {name: a, hmac: {key_file: /k, key_env: K}}\n",
         r"^callers\[0\]\.hmac: give exactly one of key_file, key_env"),
        ("callers:\n  - {name: a, hmac: {key_file: k.txt}}\n", r"^callers\[0\]\.hmac\.key_file: must be an absolute path"),
        ("callers:\n  - {name: a, hmac: {key_env: 'MY-KEY'}}\n",
         r"^callers\[0\]\.hmac\.key_env: must be an environment variable name"),
        ("callers:\n  - {name: a, hmac: {key_env: K, salt: x}}\n", r"^callers\[0\]\.hmac\.salt: unknown key"),
        # oidc
        ("callers:\n  - {name: a, oidc: x}\n", r"^callers\[0\]\.oidc: must be a mapping, not a string"),
        ("callers:\n  - {name: a, oidc: {audience: d, claims: {}}}\n", r"^callers\[0\]\.oidc\.issuer: required"),
        ("callers:\n  - {name: a, oidc: {issuer: https://i, claims: {}}}\n", r"^callers\[0\]\.oidc\.audience: required"),
        ("callers:\n  - {name: a, oidc: {issuer: https://i, audience: d}}\n", r"^callers\[0\]\.oidc\.claims: required"),
        ("callers:\n  - {name: a, oidc: {issuer: https://i, audience: d, claims: {}, jwks_uri: x}}\n",
         r"^callers\[0\]\.oidc\.jwks_uri: unknown key"),
        ("callers:\n  - {name: a, oidc: {issuer: 5, audience: d, claims: {}}}\n",
         r"^callers\[0\]\.oidc\.issuer: must be a string"),
        ("callers:\n  - {name: a, oidc: {issuer: token.actions.githubusercontent.com, audience: d, claims: {}}}\n",
         r"^callers\[0\]\.oidc\.issuer: must be an https:// URL"),
        ("callers:\n  - {name: a, oidc: {issuer: 'http://gitlab.example.com', audience: d, claims: {}}}\n",
         r"^callers\[0\]\.oidc\.issuer: must be an https:// URL \(http:// only for localhost\)"),
        ("callers:\n  - {name: a, oidc: {issuer: 'https://i.example/?x=1', audience: d, claims: {}}}\n",
         r"^callers\[0\]\.oidc\.issuer: must be a plain URL"),
        ("callers:\n  - {name: a, oidc: {issuer: https://i, audience: '', claims: {}}}\n",
         r"^callers\[0\]\.oidc\.audience: must be a non-empty string"),
        ("callers:\n  - {name: a, oidc: {issuer: https://i, audience: [d], claims: {}}}\n",
         r"^callers\[0\]\.oidc\.audience: must be a non-empty string"),
        ("callers:\n  - {name: a, oidc: {issuer: https://i, audience: d, claims: [repository]}}\n",
         r"^callers\[0\]\.oidc\.claims: must be a mapping of claim names to values, not a list"),
        ("callers:\n" + OIDC % "{repository: acme/x}", r"^callers\[0\]\.oidc\.claims: must pin an id claim"),
        ("callers:\n" + OIDC % "{sub: 'repo:acme/x:ref:refs/heads/main', ref: refs/heads/main}",
         r"^callers\[0\]\.oidc\.claims: must pin an id claim \(repository_id, repository_owner_id, project_id, namespace_id\)"),
        ("callers:\n" + OIDC % "{repository_id: '1'}",
         r"^callers\[0\]\.oidc\.claims: must pin a name claim \(repository, repository_owner, project_path, namespace_path\)"),
        ("callers:\n" + OIDC % "{project_id: '1', repository_id: '2'}", r"must pin a name claim"),
        ("callers:\n" + OIDC % "{repository: acme/x, repository_id: 123456}",
         r'^callers\[0\]\.oidc\.claims\.repository_id: must be a string; quote it: "123456"'),
        ("callers:\n" + OIDC % "{project_path: acme/x, project_id: '1', ref_protected: true}",
         r'^callers\[0\]\.oidc\.claims\.ref_protected: must be a string; quote it: "true"'),
        ("callers:\n" + OIDC % "{repository: acme/x, repository_id: ['1', 2]}",
         r"^callers\[0\]\.oidc\.claims\.repository_id\[1\]: must be a string"),
        ("callers:\n" + OIDC % "{repository: acme/x, repository_id: []}",
         r"^callers\[0\]\.oidc\.claims\.repository_id: must list at least one value"),
        ("callers:\n" + OIDC % "{repository: '', repository_id: '1'}",
         r"^callers\[0\]\.oidc\.claims\.repository: must be a non-empty string"),
        ("callers:\n" + OIDC % "{repository: acme/x, repository_id: '1', ref: null}",
         r"^callers\[0\]\.oidc\.claims\.ref: must be a non-empty string, not null"),
        ("callers:\n" + OIDC % "{repository: acme/x, repository_id: '1', aud: other}",
         r"^callers\[0\]\.oidc\.claims\.aud: checked by the verifier; cannot be pinned"),
        ("callers:\n" + OIDC % "{repository: acme/x, repository_id: '1', 'bad claim': x}",
         r"^callers\[0\]\.oidc\.claims\.bad claim: not a claim name"),
        # repos and grants
        ("callers:\n" + HMAC_CALLER, r"^callers\[0\]\.repos: required"),
        ("callers:\n" + HMAC_CALLER + "    repos: {}\n", r"^callers\[0\]\.repos: must list at least one repo"),
        ("callers:\n" + HMAC_CALLER + "    repos: [acme/other]\n", r"^callers\[0\]\.repos: must be a mapping"),
        ("callers:\n" + HMAC_CALLER + "    repos: {acme: {}}\n",
         r"^callers\[0\]\.repos\.acme: not a repo full name"),
        ("callers:\n" + HMAC_CALLER + "    repos: {acme/../x: {}}\n",
         r"^callers\[0\]\.repos\.acme/\.\./x: not a repo full name"),
        ("callers:\n" + HMAC_CALLER + "    repos: {acme/unlisted: {projects: [a], commands: [plan]}}\n",
         r"^callers\[0\]\.repos\.acme/unlisted: not in `repos`"),
        ("callers:\n" + HMAC_CALLER + "    repos:\n      acme/other: {projects: ['.'], commands: [plan]}\n"
         "      ACME/other: {projects: ['.'], commands: [plan]}\n",
         r"^callers\[0\]\.repos\.ACME/other: listed twice"),
        ("callers:\n" + HMAC_CALLER + "    repos: {acme/other: x}\n", r"^callers\[0\]\.repos\.acme/other: must be a mapping"),
        ("callers:\n" + HMAC_CALLER + "    repos: {acme/other: {commands: [plan]}}\n",
         r"^callers\[0\]\.repos\.acme/other\.projects: required"),
        ("callers:\n" + HMAC_CALLER + "    repos: {acme/other: {projects: [], commands: [plan]}}\n",
         r"^callers\[0\]\.repos\.acme/other\.projects: must list at least one project"),
        ("callers:\n" + HMAC_CALLER + "    repos: {acme/other: {projects: '.', commands: [plan]}}\n",
         r"^callers\[0\]\.repos\.acme/other\.projects: must be a list"),
        ("callers:\n" + HMAC_CALLER + "    repos: {acme/other: {projects: ['a b'], commands: [plan]}}\n",
         r"^callers\[0\]\.repos\.acme/other\.projects\[0\]: must be a project name or dir"),
        ("callers:\n" + HMAC_CALLER + "    repos: {acme/other: {projects: ['.', '.'], commands: [plan]}}\n",
         r"^callers\[0\]\.repos\.acme/other\.projects\[1\]: '\.' listed twice"),
        ("callers:\n" + HMAC_CALLER + "    repos: {acme/infrastructure-live: {projects: [prod], commands: [plan]}}\n",
         r"^callers\[0\]\.repos\.acme/infrastructure-live\.projects\[0\]: acme/infrastructure-live has no project"
         r" named 'prod'"),
        ("callers:\n" + HMAC_CALLER + "    repos: {acme/other: {projects: ['.']}}\n",
         r"^callers\[0\]\.repos\.acme/other\.commands: required"),
        ("callers:\n" + HMAC_CALLER + "    repos: {acme/other: {projects: ['.'], commands: []}}\n",
         r"^callers\[0\]\.repos\.acme/other\.commands: must list at least one of plan, apply"),
        ("callers:\n" + HMAC_CALLER + "    repos: {acme/other: {projects: ['.'], commands: plan}}\n",
         r"^callers\[0\]\.repos\.acme/other\.commands: must be a list"),
        ("callers:\n" + HMAC_CALLER + "    repos: {acme/other: {projects: ['.'], commands: [plan, destroy]}}\n",
         r"^callers\[0\]\.repos\.acme/other\.commands\[1\]: unknown command 'destroy' \(allowed: plan, apply\)"),
        ("callers:\n" + HMAC_CALLER + "    repos: {acme/other: {projects: ['.'], commands: [plan, plan]}}\n",
         r"^callers\[0\]\.repos\.acme/other\.commands\[1\]: 'plan' listed twice"),
        ("callers:\n" + HMAC_CALLER + "    repos: {acme/other: {projects: ['.'], commands: [plan], env: {A: b}}}\n",
         r"^callers\[0\]\.repos\.acme/other\.env: unknown key \(allowed: projects, commands, apply_refs\)"),
        ("callers:\n" + HMAC_CALLER + "    repos: {acme/other: {projects: ['.'], commands: [apply]}}\n",
         r"^callers\[0\]\.repos\.acme/other\.apply_refs: required when apply is allowed"),
        ("callers:\n" + HMAC_CALLER + "    repos: {acme/other: {projects: ['.'], commands: [apply], apply_refs: []}}\n",
         r"^callers\[0\]\.repos\.acme/other\.apply_refs: must list at least one ref"),
        ("callers:\n" + HMAC_CALLER + "    repos: {acme/other: {projects: ['.'], commands: [apply], apply_refs: main}}\n",
         r"^callers\[0\]\.repos\.acme/other\.apply_refs: must be a list of git refs"),
        ("callers:\n" + HMAC_CALLER + "    repos: {acme/other: {projects: ['.'], commands: [apply], apply_refs: [main]}}\n",
         r"^callers\[0\]\.repos\.acme/other\.apply_refs\[0\]: must be a full ref like refs/heads/main"),
        ("callers:\n" + HMAC_CALLER + "    repos: {acme/other: {projects: ['.'], commands: [apply], apply_refs: [3]}}\n",
         r"^callers\[0\]\.repos\.acme/other\.apply_refs\[0\]: must be a string, not an integer"),
        ("callers:\n" + HMAC_CALLER
         + "    repos: {acme/other: {projects: ['.'], commands: [apply], apply_refs: ['refs/heads/a..b']}}\n",
         r"^callers\[0\]\.repos\.acme/other\.apply_refs\[0\]: not a valid git ref"),
        ("callers:\n" + HMAC_CALLER
         + "    repos: {acme/other: {projects: ['.'], commands: [apply], apply_refs: ['refs/heads/*']}}\n",
         r"^callers\[0\]\.repos\.acme/other\.apply_refs\[0\]: not a valid git ref"),
        ("callers:\n" + HMAC_CALLER + "    repos: {acme/other: {projects: ['.'], commands: [apply],"
         " apply_refs: [refs/heads/main, refs/heads/main]}}\n",
         r"^callers\[0\]\.repos\.acme/other\.apply_refs\[1\]: 'refs/heads/main' listed twice"),
        ("callers:\n" + HMAC_CALLER
         + "    repos: {acme/other: {projects: ['.'], commands: [plan], apply_refs: [refs/heads/main]}}\n",
         r"^callers\[0\]\.repos\.acme/other\.apply_refs: only allowed when commands include apply"),
    ],
)
def test_invalid_callers_are_rejected_naming_the_key(text: str, message: str):
    assert error(text) != ""
    with pytest.raises(PolicyError, match=message):
        load_policy(textwrap.dedent(REPOS) + text)


def test_http_issuer_is_allowed_on_loopback_only():
    for issuer in ("http://127.0.0.1:8123", "http://localhost", "https://gitlab.example.com/sub"):
        text = "callers:\n" + (OIDC % GOOD_CLAIMS).replace("https://i.example", issuer)
        (caller,) = load_policy(textwrap.dedent(REPOS) + text).callers
        assert caller.oidc is not None and caller.oidc.issuer == issuer


def test_load_error_never_echoes_an_inline_key():
    message = error("callers:\n  - {name: a, hmac: {key: hunter2-very-secret}, repos: {}}\n")
    assert "hunter2" not in message


# --- authorize_trigger -------------------------------------------------------------


def test_allowed_plan_and_apply():
    gha = by_name("github-actions-infra")
    assert authorize_trigger(gha, "acme/infrastructure-live", STAGING, "plan", None) is None
    assert authorize_trigger(gha, "ACME/Infrastructure-Live", PRODUCTION, "plan", "refs/heads/feature") is None
    assert authorize_trigger(gha, "acme/infrastructure-live", PRODUCTION, "apply", "refs/heads/main") is None


def test_repo_not_granted():
    gha = by_name("github-actions-infra")
    assert (
        authorize_trigger(gha, "acme/other", ROOT, "plan", None)
        == "caller github-actions-infra may not trigger runs in acme/other"
    )
    assert authorize_trigger(gha, "acme/infrastructure-live-evil", STAGING, "plan", None) is not None


def test_command_not_granted():
    gitlab = by_name("gitlab-ci")
    assert (
        authorize_trigger(gitlab, "acme/infrastructure-live", STAGING, "apply", "refs/heads/main")
        == "caller gitlab-ci may not apply acme/infrastructure-live staging"
    )
    assert authorize_trigger(gitlab, "acme/infrastructure-live", STAGING, "destroy", None) == (
        "unknown command 'destroy' (allowed: plan, apply)"
    )


def test_project_not_granted():
    gitlab = by_name("gitlab-ci")
    assert authorize_trigger(gitlab, "acme/infrastructure-live", PRODUCTION, "plan", None) == (
        "caller gitlab-ci may not plan acme/infrastructure-live production (allowed projects: staging)"
    )


def test_project_by_dir_covers_every_workspace_of_it():
    jenkins = by_name("jenkins")
    green = Project(dir="shared", workspace="green")
    assert authorize_trigger(jenkins, "acme/infrastructure-live", SHARED_BLUE, "plan", None) is None
    assert authorize_trigger(jenkins, "acme/infrastructure-live", green, "apply", "refs/tags/v1") is None
    assert authorize_trigger(jenkins, "acme/infrastructure-live", STAGING, "plan", None) is not None
    assert authorize_trigger(jenkins, "acme/other", ROOT, "plan", None) is None


def test_project_name_does_not_match_a_dir_of_that_name_elsewhere():
    grant = CallerGrant(projects=("staging",), commands=("plan",))
    assert grant.covers(Project(dir="staging"))
    assert grant.covers(Project(dir="envs/stg", name="staging"))
    assert not grant.covers(Project(dir="envs/staging", name="stg"))
    assert not grant.covers(Project(dir="staging-2"))


def test_apply_ref_rules():
    gha = by_name("github-actions-infra")
    repo = "acme/infrastructure-live"
    assert authorize_trigger(gha, repo, STAGING, "apply", "refs/heads/feature") == (
        "apply from refs/heads/feature is not allowed for caller github-actions-infra; allowed: refs/heads/main"
    )
    assert authorize_trigger(gha, repo, STAGING, "apply", None) == (
        "apply needs the git ref of the commit; caller github-actions-infra may apply only from: refs/heads/main"
    )
    assert authorize_trigger(gha, repo, STAGING, "apply", "refs/heads/Main") is not None  # refs are exact
    assert authorize_trigger(gha, repo, STAGING, "apply", "main") is not None


def test_hand_made_caller_without_grants_may_do_nothing():
    nobody = Caller(name="x", oidc=None, hmac_key_file=None, hmac_key_env="K")
    assert authorize_trigger(nobody, "acme/infrastructure-live", STAGING, "plan", None) == (
        "caller x may not trigger runs in acme/infrastructure-live"
    )
