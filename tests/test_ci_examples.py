"""The CI examples in deploy/ci/ call `deploybot run` the way the CLI accepts.

Each `deploybot run …` line of an example is split like a shell would, its variables are
replaced by what that CI sets (plus what the example itself defines), and the result is
parsed with the CLI's own parser and request builder: a flag the CLI does not know, a
missing --repo/--ref/--project, or a variable the CI does not set fails here.
"""

from __future__ import annotations

import re
import shlex
import string
from pathlib import Path
from typing import Any

import pytest
import yaml

from bot.ci import cli as run_cli
from policies.callers import parse_callers

CI_DIR = Path(__file__).resolve().parent.parent / "deploy" / "ci"
SHA = "4d2c9a1e0f7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d"
SHELL_OPERATORS = {"||", "&&", ";", "|", "&", ")", "(", ";;"}

# What each CI sets for a job (and what the example defines for itself, checked below).
CI_VARIABLES = {
    "github-actions.yml": {"GITHUB_REPOSITORY": "acme/infrastructure-live", "GITHUB_SHA": SHA,
                           "GITHUB_REF": "refs/heads/main", "PROJECT": "staging"},
    "gitlab-ci.yml": {"CI_PROJECT_PATH": "acme/infrastructure-live", "CI_COMMIT_SHA": SHA,
                      "CI_COMMIT_BRANCH": "main", "DEPLOYBOT_PROJECT": "staging"},
    "Jenkinsfile": {"GIT_COMMIT": SHA, "BRANCH_NAME": "main", "DEPLOYBOT_REPO": "acme/infrastructure-live",
                    "DEPLOYBOT_PROJECT": "staging"},
    "circleci-config.yml": {"CIRCLE_PROJECT_USERNAME": "acme", "CIRCLE_PROJECT_REPONAME": "infrastructure-live",
                            "CIRCLE_SHA1": SHA, "CIRCLE_BRANCH": "main", "DEPLOYBOT_PROJECT": "staging"},
}


def _strings(node: Any) -> list[str]:
    """Every string value in a parsed YAML document."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for value in node.values() for s in _strings(value)]
    if isinstance(node, list):
        return [s for item in node for s in _strings(item)]
    return []


def _scripts(name: str) -> list[str]:
    text = (CI_DIR / name).read_text()
    if name.endswith(".yml"):
        return _strings(yaml.safe_load(text))
    return [text]


def invocations(name: str) -> list[tuple[list[str], list[str]]]:
    """(arguments after `deploybot run`, the shell tokens after the command) per invocation."""
    found = []
    for script in _scripts(name):
        for line in script.splitlines():
            if "deploybot run " not in line or line.lstrip().startswith(("#", "//")):
                continue
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            tokens = list(lexer)
            start = next(i for i in range(len(tokens) - 1)
                         if tokens[i].endswith("deploybot") and tokens[i + 1] == "run") + 2
            end = next((i for i in range(start, len(tokens)) if tokens[i] in SHELL_OPERATORS), len(tokens))
            found.append((tokens[start:end], tokens[end:]))
    return found


def parse(name: str, argv: list[str]):
    variables = CI_VARIABLES[name]
    expanded = [string.Template(arg).substitute(variables) for arg in argv]
    try:
        args = run_cli.build_parser().parse_args(expanded)
    except SystemExit:
        pytest.fail(f"{name}: `deploybot run {' '.join(argv)}` is not accepted by the CLI")
    return args, run_cli.run_request(args)  # raises CliError for empty or malformed values


@pytest.mark.parametrize("name", sorted(CI_VARIABLES))
def test_examples_plan_and_apply_with_flags_the_cli_accepts(name):
    calls = invocations(name)
    commands = [parse(name, argv)[0].command for argv, _ in calls]
    assert "plan" in commands and "apply" in commands, f"{name} should both plan and apply"
    for argv, rest in calls:
        args, body = parse(name, argv)
        assert body["repo"] == "acme/infrastructure-live" and body["project"] == "staging"
        assert body["sha"] == SHA, "every run names the exact commit the CI job is for"
        if args.command == "apply":
            assert body["ref"] == "refs/heads/main", "apply needs the ref the policy's apply_refs allow"
        else:
            # exit 2 means "changes present": the example must not fail the job on it
            assert rest[:1] == ["||"] and ("-eq" in rest and "2" in rest or rest[1:2] == ["rc=$?"]), (
                f"{name}: the plan's exit code 2 must not fail the job: {' '.join(rest)}")


@pytest.mark.parametrize("name", sorted(CI_VARIABLES))
def test_examples_install_the_cli_from_a_pinned_source_not_the_unrelated_pypi_name(name):
    text = (CI_DIR / name).read_text()
    assert "DEPLOYBOT_PIP_SPEC" in text
    assert not re.search(r"pip install (--?\S+ )*['\"]?deploybot['\"]?(\s|$)", text)


def test_github_actions_workflow():
    workflow = yaml.safe_load((CI_DIR / "github-actions.yml").read_text())
    assert workflow["permissions"] == {"id-token": "write", "contents": "read"}
    triggers = workflow[True] if True in workflow else workflow["on"]  # YAML 1.1 reads `on` as true
    assert set(triggers) == {"pull_request", "push"}
    assert triggers["push"]["branches"] == ["main"]
    for job_name, job in workflow["jobs"].items():
        assert job["env"]["PROJECT"] == "${{ matrix.project }}"
        steps = " ".join(step.get("run", "") for step in job["steps"])
        if "deploybot run apply" in steps:
            assert "github.event_name == 'push'" in job["if"] and "refs/heads/main" in job["if"], job_name
        else:
            assert job["if"] == "github.event_name == 'pull_request'"


def test_gitlab_ci_uses_an_id_token_for_deploybot():
    config = yaml.safe_load((CI_DIR / "gitlab-ci.yml").read_text())
    assert config[".deploybot"]["id_tokens"] == {run_cli.DEFAULT_ID_TOKEN_VAR: {"aud": run_cli.DEFAULT_AUDIENCE}}
    assert config["variables"]["DEPLOYBOT_PROJECT"] == "staging"
    for job in ("deploybot-plan", "deploybot-deploy"):
        assert config[job]["extends"] == ".deploybot"
    assert "CI_DEFAULT_BRANCH" in config["deploybot-deploy"]["rules"][0]["if"]
    assert "merge_request_event" in config["deploybot-plan"]["rules"][0]["if"]


def test_jenkinsfile_binds_the_hmac_key_from_credentials_only_around_deploybot():
    text = (CI_DIR / "Jenkinsfile").read_text()
    assert "DEPLOYBOT_HMAC_KEY_ID = 'jenkins'" in text
    assert "DEPLOYBOT_REPO = 'acme/infrastructure-live'" in text and "DEPLOYBOT_PROJECT = 'staging'" in text
    binds = re.findall(r"withCredentials\(\[string\(credentialsId: '([^']+)', variable: '([^']+)'\)\]\)", text)
    assert binds and set(binds) == {("deploybot-hmac-key", "DEPLOYBOT_HMAC_KEY")}
    # Shell scripts in single-quoted Groovy strings: the key is never interpolated by Groovy.
    assert 'sh "' not in text and 'sh """' not in text
    assert text.count("withCredentials") == len(re.findall(r"sh '''", text))


def test_circleci_uses_a_context_and_passes_its_oidc_token():
    config = yaml.safe_load((CI_DIR / "circleci-config.yml").read_text())
    assert config["executors"]["python"]["environment"]["DEPLOYBOT_PROJECT"] == "staging"
    for entry in config["workflows"]["deploybot"]["jobs"]:
        (job, settings), = entry.items()
        assert settings["context"] == "deploybot", job
    commands = " ".join(_strings(config["jobs"]))
    assert commands.count('export DEPLOYBOT_OIDC_TOKEN="${CIRCLE_OIDC_TOKEN_V2:-}"') == 2


def test_readme_documents_every_example_and_the_exit_codes():
    readme = (CI_DIR / "README.md").read_text()
    for name in CI_VARIABLES:
        assert f"]({name})" in readme
    for fragment in ("| 2 | changes present |", "https://token.actions.githubusercontent.com", "id_tokens",
                     "key_file", "apply_refs", "repository_id", "project_id"):
        assert fragment in readme
    # The callers entries in the README are valid policy YAML, as the server's policy parser reads it.
    blocks = re.findall(r"```yaml\n(.*?)```", readme, re.S)
    callers = [c for block in blocks for c in (yaml.safe_load(block) or {}).get("callers", [])]
    assert {c["name"] for c in callers} >= {"github-actions-deploy", "github-actions-pull-requests",
                                            "gitlab-deploy", "gitlab-merge-requests", "jenkins"}
    parsed = parse_callers(callers)  # the policy's own parser: raises PolicyError on any drift
    deploy = next(c for c in parsed if c.name == "github-actions-deploy")
    assert deploy.oidc is not None and deploy.oidc.audience == run_cli.DEFAULT_AUDIENCE
