"""The server-side policy file: which repos and projects the bot serves, and who may do what.

The policy lives with the server (``policy_file`` in the server config), never in a
repository, and is the authority: a repo-level file can only narrow it
(see ``policies.autoplan``). Everything is denied unless this file allows it: a
repo that is not listed is ignored, and a project that is not listed never runs.

Shape::

    repos:
      acme/infrastructure-live:          # full name; GitLab nested paths (group/sub/repo) work too
        id: 123456                       # optional: the forge's repository (GitLab: project) id
        allow_forks: false               # PRs from forks are never planned unless true
        repo_config_file: deploybot.yaml # optional repo-level narrowing file, read from the BASE branch
        plan:      {users: [], teams: [], permission: write}   # who may plan
        apply:     {users: [alice], teams: [acme/platform], permission: maintain}  # who may apply
        approvers: {teams: [acme/platform]}  # whose approvals count
        apply_requirements: [approved, mergeable, undiverged]  # any subset; default [approved]
        approvals: 1                     # how many approvals `approved` needs (>= 1)
        approvers_exclude: [author, committers]  # who never approves a PR: its opener, its commits' people
        apply_on_merge: false            # apply automatically when the PR is merged into ...
        apply_on_merge_branches: [main]  # ... one of these bases; default: the repo's default branch
        auto_apply_on_approval: false    # apply as soon as every requirement holds
        max_projects_per_pull: 0         # a plan or apply of more projects is refused; 0: no cap
        project_statuses_max: 20         # a run of more projects sets only the aggregate statuses
        projects:                        # at least one
          - name: staging                # optional; unique per repo
            dir: staging                 # repo-relative; "." for the root; no "..", not absolute
            workspace: default           # default "default"
            autoplan: ["*.tf*", "../modules/**/*.tf"]   # globs relative to dir

    callers: [...]                       # who may call the trigger API; see policies.callers

Defaults and rules:

- ``plan`` omitted: anyone with ``write`` permission may plan. ``apply`` omitted:
  NOBODY may apply. ``approvers`` omitted: the same users, teams and permission as
  ``apply``. Inside a block that is given, an omitted key means nobody
  (``plan: {users: [bob]}`` lets only bob plan); ``{}`` means nobody at all.
- A subject is allowed if listed in ``users`` (case-insensitive), a member of a
  listed team (``org/team``; GitLab groups ``group/subgroup[/...]``), or has at
  least ``permission`` on the repo: ``read < triage < write < maintain < admin``.
  GitLab levels are accepted too: ``developer`` = write, ``maintainer`` =
  maintain, ``owner`` = admin.
- ``apply_requirements``: ``approved`` (``approvals`` approvals from
  ``approvers`` on the current head), ``mergeable`` (the forge would merge it),
  ``undiverged`` (the branch is not behind its base). An up-to-date plan of the
  current head is always required on top of these.
- ``auto_apply_on_approval: true`` needs ``approved`` among the requirements.
- ``approvers_exclude``: ``author`` (whoever opened the pull request) and
  ``committers`` (whoever authored, committed or pushed one of its commits) never approve
  it. Both by default; ``[author]`` or ``[]`` loosen the four-eyes rule.
- ``apply_on_merge`` applies only when the merged pull request's base is the
  repository's default branch, or one of ``apply_on_merge_branches`` if given.
- Without ``autoplan``, a project plans itself when a ``*.tf*`` file changes in its
  dir or in a local module dir it references. Globs: ``*`` stays inside one path
  segment, ``**`` spans segments, ``?`` is one character.
- ``id`` pins the repository: events and trigger API calls for its name that
  name another id are refused (a deleted repository's name can be taken by
  someone else, its id cannot). Without it the bot pins the first id it sees;
  see ``policies.repo_identity``.
- Names, dirs and workspaces may contain only letters, digits, ``.``, ``_``,
  ``-`` (and ``/`` in names and dirs), so comments can name them.
- Unknown keys, wrong types and duplicate keys are errors; error messages name
  the path of the bad key, e.g. ``repos.acme/infra.projects[1].dir: must not
  contain ".."`` (list positions count from 0).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import yaml

from bot.models import Project
from policies.autoplan import normalize_dir, resolve_glob
from policies.callers import Caller, parse_callers
from policies.validation import (
    REPO_NAME,
    SEGMENT,
    PolicyError,
    expect,
    has_dot_segment,
    no_unknown_keys,
    type_name,
)


class ApplyRequirement(StrEnum):
    """Conditions a repo may require before an apply (besides an up-to-date plan)."""

    APPROVED = "approved"
    MERGEABLE = "mergeable"
    UNDIVERGED = "undiverged"


# Ordered weakest first; "none" exists for actors, never as a policy value
# (a policy saying "none" would let every stranger through).
PERMISSIONS: tuple[str, ...] = ("none", "read", "triage", "write", "maintain", "admin")
GITLAB_PERMISSIONS = {"developer": "write", "maintainer": "maintain", "owner": "admin"}


def normalize_permission(value: str) -> str | None:
    """A permission name in GitHub terms ("developer" -> "write"), or None if unknown."""
    value = GITLAB_PERMISSIONS.get(value, value)
    return value if value in PERMISSIONS else None


@dataclass(frozen=True)
class Subjects:
    """Who a rule allows: listed users, members of listed teams, or a minimum permission."""

    users: frozenset[str] = frozenset()  # lower-cased logins
    teams: tuple[str, ...] = ()  # "org/team" or GitLab "group/sub[/...]", as written
    permission: str | None = None  # minimum permission (GitHub terms); None: not by permission

    @property
    def empty(self) -> bool:
        """Whether nobody at all is allowed."""
        return not self.users and not self.teams and self.permission is None


NOBODY = Subjects()
DEFAULT_PLAN = Subjects(permission="write")


@dataclass(frozen=True)
class RepoPolicy:
    """Everything the policy says about one repository."""

    name: str  # full name as written in the policy file
    allow_forks: bool
    repo_config_file: str | None
    plan: Subjects
    apply: Subjects
    approvers: Subjects
    apply_requirements: frozenset[str]
    approvals: int
    apply_on_merge: bool
    auto_apply_on_approval: bool
    projects: tuple[Project, ...]
    approvers_exclude: frozenset[str] = frozenset({"author", "committers"})
    # Bases whose merges apply_on_merge applies; empty: the repository's default branch.
    apply_on_merge_branches: tuple[str, ...] = ()
    # The forge's repository (GitLab: project) id; None: the first id seen is recorded instead.
    id: int | None = None
    max_projects_per_pull: int = 0  # 0: no cap
    # Runs of more projects set only the aggregate statuses: two writes per project would run
    # into the forge's secondary rate limits (GitHub: about 80 a minute).
    project_statuses_max: int = 20


@dataclass(frozen=True)
class Policy:
    """The whole policy file; repos are keyed by lower-cased full name."""

    repos: dict[str, RepoPolicy]
    callers: tuple[Caller, ...] = ()  # trigger API callers (policies.callers); none: nobody

    def repo(self, full_name: str) -> RepoPolicy | None:
        """The policy for a repo, or None if it is not allow-listed (names are case-insensitive)."""
        if not isinstance(full_name, str):
            return None
        return self.repos.get(full_name.lower())


def select_projects(
    repo: RepoPolicy,
    name: str | None = None,
    dir: str | None = None,
    workspace: str | None = None,
) -> list[Project]:
    """The projects `deploybot <cmd> -p NAME -d DIR -w WS` refers to (all filters must match).

    No filters: every project. A filter that matches nothing gives [] (the caller
    refuses with a comment). The dir is compared normalised ("./a/" == "a").
    """
    if dir is not None:
        try:
            dir = normalize_dir(dir)
        except ValueError:
            return []
    return [
        p
        for p in repo.projects
        if (name is None or (p.name != "" and p.name == name))
        and (dir is None or p.dir == dir)
        and (workspace is None or p.workspace == workspace)
    ]


# --- loading -------------------------------------------------------------------

_REPO_KEYS = (
    "id",
    "allow_forks",
    "repo_config_file",
    "plan",
    "apply",
    "approvers",
    "apply_requirements",
    "approvals",
    "apply_on_merge",
    "apply_on_merge_branches",
    "approvers_exclude",
    "auto_apply_on_approval",
    "max_projects_per_pull",
    "project_statuses_max",
    "projects",
    "pools",
)
APPROVER_EXCLUSIONS = ("author", "committers")
_BRANCH = re.compile(r"[A-Za-z0-9._/-]+")
_SUBJECT_KEYS = ("users", "teams", "permission")
_POOL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")
_PROJECT_KEYS = ("name", "dir", "workspace", "autoplan", "pools")

_TEAM = re.compile(rf"{SEGMENT}(?:/{SEGMENT})+")
# GitHub logins, GitLab usernames, and GitHub App bots ("renovate[bot]").
_USER = re.compile(r"[A-Za-z0-9_.-]+(?:\[bot\])?")
_NAME = re.compile(r"[A-Za-z0-9._/-]+")  # what the comment parser accepts for -p
_WORKSPACE = re.compile(r"[A-Za-z0-9._-]+")


class _StrictLoader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicate keys (PyYAML would silently keep the last)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # "<<: *anchor" merges may be overridden by design
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
        except TypeError:
            continue  # unhashable key: construct_mapping reports it
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_policy_file(path: str | os.PathLike[str]) -> Policy:
    """Read and validate the policy file at `path` (errors are prefixed with the path)."""
    with open(path, encoding="utf-8") as f:
        try:
            text = f.read()
        except UnicodeDecodeError as e:
            raise PolicyError(f"{os.fspath(path)}: not UTF-8 text ({e.reason})") from None
    try:
        return load_policy(text)
    except PolicyError as e:
        raise PolicyError(f"{os.fspath(path)}: {e}") from None


def load_policy(text: str) -> Policy:
    """Parse and validate policy YAML; raise PolicyError naming the bad key."""
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    # PyYAML's constructors raise plain exceptions for explicit tags that do not fit
    # (`!!int A`), and its composer recurses: all of it is a bad policy file, not a crash.
    except (yaml.YAMLError, ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError) as e:
        raise PolicyError(f"invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise PolicyError("the policy must be a mapping with a `repos` key")
    no_unknown_keys(data, ("repos", "callers"), "")
    if "repos" not in data:
        raise PolicyError("repos: required")
    repos_raw = expect(data["repos"], dict, "repos", "a mapping of repo full names")
    repos: dict[str, RepoPolicy] = {}
    for name, raw in repos_raw.items():
        if not isinstance(name, str) or not REPO_NAME.fullmatch(name) or has_dot_segment(name):
            raise PolicyError(f"repos.{name}: not a repo full name like owner/repo or group/sub/repo")
        key = name.lower()
        if key in repos:
            raise PolicyError(f"repos.{name}: listed twice (repo names are case-insensitive)")
        repos[key] = _repo(name, raw, f"repos.{name}")

    callers = parse_callers(data["callers"], path="callers", repos=repos) if "callers" in data else ()
    return Policy(repos, callers)


def _repo(name: str, raw: Any, path: str) -> RepoPolicy:
    raw = expect(raw, dict, path, "a mapping")
    no_unknown_keys(raw, _REPO_KEYS, path)

    repo_config_file = raw.get("repo_config_file")
    if repo_config_file is not None:
        repo_config_file = _path(repo_config_file, f"{path}.repo_config_file")
        if repo_config_file == ".":
            raise PolicyError(f"{path}.repo_config_file: must name a file")

    apply = _subjects(raw, "apply", path, NOBODY)
    requirements = _requirements(raw, path)
    auto_apply = _bool(raw, "auto_apply_on_approval", path)
    if auto_apply and ApplyRequirement.APPROVED not in requirements:
        # Otherwise every plan by anyone who may plan would be applied unreviewed.
        raise PolicyError(f"{path}.auto_apply_on_approval: needs `approved` in apply_requirements")

    approvals = raw.get("approvals", 1)
    if type(approvals) is not int or approvals < 1:
        raise PolicyError(f"{path}.approvals: must be an integer >= 1")
    cap = raw.get("max_projects_per_pull", 0)
    if type(cap) is not int or cap < 0:
        raise PolicyError(f"{path}.max_projects_per_pull: must be an integer >= 0 (0: no cap)")
    statuses_max = raw.get("project_statuses_max", 20)
    if type(statuses_max) is not int or statuses_max < 0:
        raise PolicyError(f"{path}.project_statuses_max: must be an integer >= 0")

    return RepoPolicy(
        name=name,
        id=_repo_id(raw, path),
        allow_forks=_bool(raw, "allow_forks", path),
        repo_config_file=repo_config_file,
        plan=_subjects(raw, "plan", path, DEFAULT_PLAN),
        apply=apply,
        approvers=_subjects(raw, "approvers", path, apply),
        apply_requirements=requirements,
        approvals=approvals,
        apply_on_merge=_bool(raw, "apply_on_merge", path),
        auto_apply_on_approval=auto_apply,
        projects=_projects(raw, path),
        approvers_exclude=_approvers_exclude(raw, path),
        apply_on_merge_branches=_branches(raw, "apply_on_merge_branches", path),
        max_projects_per_pull=cap,
        project_statuses_max=statuses_max,
    )


def _approvers_exclude(raw: dict[str, Any], path: str) -> frozenset[str]:
    if "approvers_exclude" not in raw:
        return frozenset(APPROVER_EXCLUSIONS)
    path = f"{path}.approvers_exclude"
    values = expect(raw["approvers_exclude"], list, path, "a list")
    for i, value in enumerate(values):
        if value not in APPROVER_EXCLUSIONS:
            raise PolicyError(f"{path}[{i}]: must be one of {', '.join(APPROVER_EXCLUSIONS)}")
    return frozenset(values)


def _branches(raw: dict[str, Any], key: str, path: str) -> tuple[str, ...]:
    path = f"{path}.{key}"
    values = expect(raw.get(key, []), list, path, "a list")
    for i, value in enumerate(values):
        if not isinstance(value, str) or not _BRANCH.fullmatch(value) or ".." in value:
            raise PolicyError(f"{path}[{i}]: not a branch name")
    return tuple(values)


def _repo_id(raw: dict[str, Any], path: str) -> int | None:
    value = raw.get("id")
    if "id" in raw and (type(value) is not int or value < 1):
        # A quoted id would never equal the payload's number: refuse it rather than refuse every event.
        raise PolicyError(f"{path}.id: must be the forge's numeric repository (GitLab: project) id,"
                          " an unquoted integer >= 1")
    return value


def _subjects(raw: dict[str, Any], key: str, path: str, default: Subjects) -> Subjects:
    if key not in raw:
        return default
    path = f"{path}.{key}"
    block = expect(raw[key], dict, path, "a mapping (use {} for nobody)")
    no_unknown_keys(block, _SUBJECT_KEYS, path)

    users: set[str] = set()
    for i, user in enumerate(expect(block.get("users", []), list, f"{path}.users", "a list")):
        if not isinstance(user, str) or not _USER.fullmatch(user):
            raise PolicyError(f"{path}.users[{i}]: not a user login")
        users.add(user.lower())

    teams: list[str] = []
    for i, team in enumerate(expect(block.get("teams", []), list, f"{path}.teams", "a list")):
        if not isinstance(team, str) or not _TEAM.fullmatch(team) or has_dot_segment(team):
            raise PolicyError(f"{path}.teams[{i}]: must look like org/team (or group/subgroup)")
        if team.lower() not in (t.lower() for t in teams):
            teams.append(team)

    permission = block.get("permission")
    if permission is not None:
        if not isinstance(permission, str) or normalize_permission(permission) in (None, "none"):
            raise PolicyError(
                f"{path}.permission: must be one of read, triage, write, maintain, admin "
                "(or GitLab developer, maintainer, owner)"
            )
        permission = normalize_permission(permission)
    return Subjects(frozenset(users), tuple(teams), permission)


def _requirements(raw: dict[str, Any], path: str) -> frozenset[str]:
    if "apply_requirements" not in raw:
        return frozenset({ApplyRequirement.APPROVED.value})
    path = f"{path}.apply_requirements"
    names = expect(raw["apply_requirements"], list, path, "a list")
    allowed = [r.value for r in ApplyRequirement]
    result: set[str] = set()
    for i, name in enumerate(names):
        if name not in allowed:
            raise PolicyError(f"{path}[{i}]: unknown requirement {name!r} (allowed: {', '.join(allowed)})")
        if name in result:
            raise PolicyError(f"{path}[{i}]: {name!r} listed twice")
        result.add(name)
    return frozenset(result)


def _projects(raw: dict[str, Any], path: str) -> tuple[Project, ...]:
    path = f"{path}.projects"
    if "projects" not in raw:
        raise PolicyError(f"{path}: required (a repo without projects runs nothing)")
    items = expect(raw["projects"], list, path, "a list")
    if not items:
        raise PolicyError(f"{path}: must list at least one project")
    repo_pools = _pools(raw.get("pools", {}), f"{path[: -len('.projects')]}.pools")  # every project's default
    projects: list[Project] = []
    names: set[str] = set()
    places: set[tuple[str, str]] = set()
    for i, item in enumerate(items):
        ppath = f"{path}[{i}]"
        item = expect(item, dict, ppath, "a mapping")
        no_unknown_keys(item, _PROJECT_KEYS, ppath)
        if "dir" not in item:
            raise PolicyError(f"{ppath}.dir: required")
        dir_ = _path(item["dir"], f"{ppath}.dir")

        workspace = item.get("workspace", "default")
        if not isinstance(workspace, str) or not _WORKSPACE.fullmatch(workspace) or workspace.startswith("-"):
            raise PolicyError(f"{ppath}.workspace: may contain only letters, digits, '.', '_' and '-'")

        name = item.get("name", "")
        if "name" in item:
            if not isinstance(name, str) or not _NAME.fullmatch(name) or name.startswith("-"):
                raise PolicyError(f"{ppath}.name: may contain only letters, digits, '.', '_', '/' and '-'")
            if name in names:
                raise PolicyError(f"{ppath}.name: {name!r} is used by another project")
            names.add(name)

        if (dir_, workspace) in places:
            raise PolicyError(f"{ppath}: another project already has dir {dir_!r} and workspace {workspace!r}")
        places.add((dir_, workspace))

        autoplan: tuple[str, ...] = ()
        if "autoplan" in item:
            globs = expect(item["autoplan"], list, f"{ppath}.autoplan", "a list of globs")
            if not globs:
                raise PolicyError(f"{ppath}.autoplan: must list at least one glob (omit it for the default)")
            for j, glob in enumerate(globs):
                try:
                    resolve_glob(dir_, glob)
                except ValueError as e:
                    raise PolicyError(f"{ppath}.autoplan[{j}]: {e}") from None
            autoplan = tuple(globs)
        pools = {**repo_pools, **_pools(item.get("pools", {}), f"{ppath}.pools")}
        projects.append(Project(dir=dir_, workspace=workspace, name=name, autoplan=autoplan,
                                plan_pool=pools.get("plan", ""), apply_pool=pools.get("apply", "")))
    return tuple(projects)


def _pools(raw: Any, path: str) -> dict[str, str]:
    """`{plan: POOL, apply: POOL}`: the runner pools the phases run in (bot.runners)."""
    pools = expect(raw, dict, path, "a mapping of phase (plan, apply) to pool")
    no_unknown_keys(pools, ("plan", "apply"), path)
    for phase, pool in pools.items():
        if not isinstance(pool, str) or not _POOL.fullmatch(pool):
            raise PolicyError(f"{path}.{phase}: a pool name of letters, digits, '_' and '-'")
    return pools


# --- small checks ----------------------------------------------------------------


def _bool(raw: dict[str, Any], key: str, path: str) -> bool:
    value = raw.get(key, False)
    if not isinstance(value, bool):
        raise PolicyError(f"{path}.{key}: must be true or false, not {type_name(value)}")
    return value


def _path(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise PolicyError(f"{path}: must be a string, not {type_name(value)}")
    try:
        return normalize_dir(value)
    except ValueError as e:
        raise PolicyError(f"{path}: {e}") from None
