"""Who may call the trigger API (``POST /api/v1/runs``): the ``callers:`` section of the policy.

Pure: parsing and decisions over plain data, no network, no disk. The HTTP edge
(``bot.ci.auth``) proves which caller a request comes from; this module says what
that caller may do. Anything not listed is refused.

Shape::

    callers:
      - name: github-actions-infra        # unique; the HMAC key id; letters, digits, '.', '_', '-'
        oidc:
          issuer: https://token.actions.githubusercontent.com   # the token's `iss`, exactly
          audience: deploybot              # required; the token's `aud` must contain it
          claims:                          # pinned claims, all must match the token's
            repository: acme/infrastructure-live
            repository_id: "123456"        # strings: quote numbers and booleans
            job_workflow_ref: acme/infrastructure-live/.github/workflows/deploy.yml@refs/heads/main
            ref: [refs/heads/main, refs/heads/release]   # a list: any of these
        repos:
          acme/infrastructure-live:
            projects: [staging, production] # project names or dirs (a dir covers its workspaces)
            commands: [plan, apply]         # a non-empty subset of plan, apply
            apply_refs: [refs/heads/main]   # full refs; required exactly when apply is allowed
      - name: jenkins
        hmac: {key_file: /run/secrets/jenkins-deploybot-key}   # or {key_env: NAME}
        repos: {...}

Rules:

- Each caller has exactly one of ``oidc`` and ``hmac``. An HMAC key is never
  written in the policy: ``key_file`` (an absolute path) or ``key_env`` (an
  environment variable name).
- An OIDC caller pins at least one id claim (``repository_id``,
  ``repository_owner_id``, ``project_id``, ``namespace_id``) and at least one name
  claim (``repository``, ``repository_owner``, ``project_path``,
  ``namespace_path``): a name can be deleted and registered again by someone
  else, an id cannot; the name keeps the policy readable. ``iss``, ``aud`` and
  the time and id claims are checked by the verifier and cannot be pinned.
- The issuer is an ``https://`` URL (``http://`` only for localhost, for tests).
- Every granted repo must be a repo of the policy's ``repos`` and every granted
  project one of that repo's projects (checked when ``repos`` is given to
  :func:`parse_callers`, as ``load_policy`` does).
- Repo names compare case-insensitively; refs, claims and project names exactly.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

from bot.models import Project
from policies.autoplan import normalize_dir
from policies.validation import REPO_NAME, PolicyError, expect, has_dot_segment, no_unknown_keys, type_name


class AllowListedRepo(Protocol):
    """What a grant is checked against: a repository of the policy (`policies.policy.RepoPolicy`)."""

    name: str
    projects: tuple[Project, ...]


COMMANDS: tuple[str, ...] = ("plan", "apply")
ID_CLAIMS: tuple[str, ...] = ("repository_id", "repository_owner_id", "project_id", "namespace_id")
NAME_CLAIMS: tuple[str, ...] = ("repository", "repository_owner", "project_path", "namespace_path")
# Checked by the verifier itself; a pin on them would be meaningless or misleading.
RESERVED_CLAIMS: tuple[str, ...] = ("iss", "aud", "exp", "nbf", "iat", "jti")

_CALLER_KEYS = ("name", "oidc", "hmac", "repos")
_OIDC_KEYS = ("issuer", "audience", "claims")
_HMAC_KEYS = ("key_file", "key_env")
_GRANT_KEYS = ("projects", "commands", "apply_refs")

_CALLER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_CLAIM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.:-]{0,127}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PROJECT_REF = re.compile(r"[A-Za-z0-9._/-]+")
_GIT_REF = re.compile(r"refs/[A-Za-z0-9._/+-]+")
_LOOPBACK = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class OidcTrust:
    """Which OIDC tokens identify a caller: issuer, audience and pinned claims."""

    issuer: str
    audience: str
    claims: dict[str, tuple[str, ...]]  # claim -> accepted values (any of)

    def matches(self, token_claims: Mapping[str, Any]) -> bool:
        """Whether every pinned claim of the (verified) token has an accepted value.

        Values compare as exact strings; a claim that is missing or is not a string
        never matches.
        """
        for claim, accepted in self.claims.items():
            value = token_claims.get(claim)
            if not isinstance(value, str) or value not in accepted:
                return False
        return True


@dataclass(frozen=True)
class CallerGrant:
    """What a caller may trigger in one repo."""

    projects: tuple[str, ...]  # project names or dirs, as written
    commands: tuple[str, ...]  # subset of COMMANDS, in COMMANDS order
    apply_refs: tuple[str, ...] = ()  # full git refs apply may run from; () when apply is not granted

    def covers(self, project: Project) -> bool:
        """Whether the project is granted, by its name or by its dir (any workspace)."""
        return any(_entry_covers(entry, project) for entry in self.projects)


@dataclass(frozen=True)
class Caller:
    """One CI system allowed to call the trigger API, and what it may trigger."""

    name: str
    oidc: OidcTrust | None
    hmac_key_file: str | None
    hmac_key_env: str | None
    repos: dict[str, CallerGrant] = field(default_factory=dict)  # keyed by lower-cased repo name

    def grant(self, repo: str) -> CallerGrant | None:
        """The grant for a repo (case-insensitive), or None."""
        if not isinstance(repo, str):
            return None
        return self.repos.get(repo.lower())


# --- decisions -------------------------------------------------------------------


def authorize_trigger(
    caller: Caller, repo: str, project: Project, command: str, ref: str | None
) -> str | None:
    """None if `caller` may run `command` on `project` of `repo` from `ref`; else the reason.

    `ref` is the full git ref the commit was taken from (``refs/heads/main``); it
    only matters for apply, which needs a ref listed in ``apply_refs``.
    """
    label = project.label
    if command not in COMMANDS:
        return f"unknown command {command!r} (allowed: {', '.join(COMMANDS)})"
    grant = caller.grant(repo)
    if grant is None:
        return f"caller {caller.name} may not trigger runs in {repo}"
    if command not in grant.commands:
        return f"caller {caller.name} may not {command} {repo} {label}"
    if not grant.covers(project):
        return (
            f"caller {caller.name} may not {command} {repo} {label}"
            f" (allowed projects: {', '.join(grant.projects)})"
        )
    if command == "apply":
        allowed = ", ".join(grant.apply_refs)
        if not ref:
            return f"apply needs the git ref of the commit; caller {caller.name} may apply only from: {allowed}"
        if ref not in grant.apply_refs:
            return f"apply from {ref} is not allowed for caller {caller.name}; allowed: {allowed}"
    return None


def authorize_read(caller: Caller, repo: str, projects: Sequence[Project]) -> str | None:
    """None if `caller` may read a run of `projects` of `repo` (its status, plans, output); else the reason.

    Reading a run needs what starting one needs of the repo and the projects: a grant for
    the repo that covers every project of the run. Plan output shows what a project holds
    and is about to change, so a caller granted `staging` sees nothing of `production`.
    The command and the ref do not matter: a caller that may plan a project may also
    read the applies of it.
    """
    grant = caller.grant(repo)
    if grant is None:
        return f"caller {caller.name} may not trigger runs in {repo}"
    hidden = [project.label for project in projects if not grant.covers(project)]
    if hidden:
        return (
            f"caller {caller.name} may not run {repo} {', '.join(hidden)}"
            f" (allowed projects: {', '.join(grant.projects)})"
        )
    return None


def _entry_covers(entry: str, project: Project) -> bool:
    if project.name and entry == project.name:
        return True
    try:
        return normalize_dir(entry) == project.dir
    except ValueError:
        return False


# --- parsing ---------------------------------------------------------------------


def parse_callers(
    raw: Any, path: str = "callers", repos: Mapping[str, AllowListedRepo] | None = None
) -> tuple[Caller, ...]:
    """Validate the ``callers`` list; raise PolicyError naming the bad key.

    With `repos` (the policy's repos keyed by lower-cased name), every granted repo
    and project must exist there.
    """
    items = expect(raw, list, path, "a list of callers")
    callers: list[Caller] = []
    names: set[str] = set()
    for i, item in enumerate(items):
        cpath = f"{path}[{i}]"
        caller = _caller(item, cpath, repos)
        if caller.name.lower() in names:
            raise PolicyError(f"{cpath}.name: {caller.name!r} is used by another caller")
        names.add(caller.name.lower())
        callers.append(caller)
    return tuple(callers)


def _caller(raw: Any, path: str, repos: Mapping[str, AllowListedRepo] | None) -> Caller:
    raw = expect(raw, dict, path, "a mapping")
    if "key" in raw or "secret" in raw:
        raise PolicyError(f"{path}: never write a key in the policy; use hmac: {{key_file: PATH}} or {{key_env: NAME}}")
    no_unknown_keys(raw, _CALLER_KEYS, path)

    if "name" not in raw:
        raise PolicyError(f"{path}.name: required")
    name = raw["name"]
    if not isinstance(name, str) or not _CALLER_NAME.fullmatch(name):
        raise PolicyError(
            f"{path}.name: must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )

    has_oidc, has_hmac = "oidc" in raw, "hmac" in raw
    if has_oidc == has_hmac:
        raise PolicyError(f"{path}: give exactly one of oidc, hmac")
    oidc = _oidc(raw["oidc"], f"{path}.oidc") if has_oidc else None
    key_file, key_env = _hmac(raw["hmac"], f"{path}.hmac") if has_hmac else (None, None)

    if "repos" not in raw:
        raise PolicyError(f"{path}.repos: required (a caller without repos may trigger nothing)")
    grants_raw = expect(raw["repos"], dict, f"{path}.repos", "a mapping of repo full names")
    if not grants_raw:
        raise PolicyError(f"{path}.repos: must list at least one repo")
    grants: dict[str, CallerGrant] = {}
    for repo_name, grant_raw in grants_raw.items():
        gpath = f"{path}.repos.{repo_name}"
        if not isinstance(repo_name, str) or not REPO_NAME.fullmatch(repo_name) or has_dot_segment(repo_name):
            raise PolicyError(f"{gpath}: not a repo full name like owner/repo or group/sub/repo")
        key = repo_name.lower()
        if key in grants:
            raise PolicyError(f"{gpath}: listed twice (repo names are case-insensitive)")
        repo_policy = None
        if repos is not None:
            repo_policy = repos.get(key)
            if repo_policy is None:
                raise PolicyError(f"{gpath}: not in `repos` (callers may only trigger allow-listed repos)")
        grants[key] = _grant(grant_raw, gpath, repo_policy)
    return Caller(name=name, oidc=oidc, hmac_key_file=key_file, hmac_key_env=key_env, repos=grants)


def _oidc(raw: Any, path: str) -> OidcTrust:
    raw = expect(raw, dict, path, "a mapping")
    no_unknown_keys(raw, _OIDC_KEYS, path)
    for key in _OIDC_KEYS:
        if key not in raw:
            raise PolicyError(f"{path}.{key}: required")

    issuer = raw["issuer"]
    if not isinstance(issuer, str):
        raise PolicyError(f"{path}.issuer: must be a string, not {type_name(issuer)}")
    _check_issuer(issuer, f"{path}.issuer")

    audience = raw["audience"]
    if not isinstance(audience, str) or not audience.strip():
        raise PolicyError(f"{path}.audience: must be a non-empty string")

    claims_raw = expect(raw["claims"], dict, f"{path}.claims", "a mapping of claim names to values")
    claims: dict[str, tuple[str, ...]] = {}
    for claim, value in claims_raw.items():
        cpath = f"{path}.claims.{claim}"
        if not isinstance(claim, str) or not _CLAIM_NAME.fullmatch(claim):
            raise PolicyError(f"{cpath}: not a claim name")
        if claim in RESERVED_CLAIMS:
            raise PolicyError(f"{cpath}: checked by the verifier; cannot be pinned ({', '.join(RESERVED_CLAIMS)})")
        claims[claim] = _claim_values(value, cpath)
    if not any(c in claims for c in ID_CLAIMS):
        raise PolicyError(
            f"{path}.claims: must pin an id claim ({', '.join(ID_CLAIMS)}): "
            "names can be registered again by someone else, ids cannot"
        )
    if not any(c in claims for c in NAME_CLAIMS):
        raise PolicyError(f"{path}.claims: must pin a name claim ({', '.join(NAME_CLAIMS)}) as well as an id")
    return OidcTrust(issuer=issuer, audience=audience, claims=claims)


def _check_issuer(issuer: str, path: str) -> None:
    try:
        url = urlsplit(issuer)
        host = url.hostname
    except ValueError:
        raise PolicyError(f"{path}: not a URL") from None
    if url.scheme not in ("https", "http") or not host:
        raise PolicyError(f"{path}: must be an https:// URL")
    if url.scheme == "http" and host not in _LOOPBACK:
        raise PolicyError(f"{path}: must be an https:// URL (http:// only for localhost)")
    if url.query or url.fragment or url.username or url.password or issuer != issuer.strip():
        raise PolicyError(f"{path}: must be a plain URL without user, query or fragment")


def _claim_values(value: Any, path: str) -> tuple[str, ...]:
    values = value if isinstance(value, list) else [value]
    if not values:
        raise PolicyError(f"{path}: must list at least one value")
    result: list[str] = []
    for j, v in enumerate(values):
        where = f"{path}[{j}]" if isinstance(value, list) else path
        if isinstance(v, (bool, int, float)):
            text = str(v).lower() if isinstance(v, bool) else str(v)
            raise PolicyError(f'{where}: must be a string; quote it: "{text}" (claims compare as exact strings)')
        if not isinstance(v, str) or not v:
            raise PolicyError(f"{where}: must be a non-empty string, not {type_name(v)}")
        if v not in result:
            result.append(v)
    return tuple(result)


def _hmac(raw: Any, path: str) -> tuple[str | None, str | None]:
    raw = expect(raw, dict, path, "a mapping with key_file or key_env")
    if "key" in raw or "secret" in raw:
        raise PolicyError(f"{path}: never write the key in the policy; use key_file or key_env")
    no_unknown_keys(raw, _HMAC_KEYS, path)
    if ("key_file" in raw) == ("key_env" in raw):
        raise PolicyError(f"{path}: give exactly one of key_file, key_env")
    if "key_file" in raw:
        key_file = raw["key_file"]
        if not isinstance(key_file, str) or not key_file.startswith("/") or "\0" in key_file:
            raise PolicyError(f"{path}.key_file: must be an absolute path")
        return key_file, None
    key_env = raw["key_env"]
    if not isinstance(key_env, str) or not _ENV_NAME.fullmatch(key_env):
        raise PolicyError(f"{path}.key_env: must be an environment variable name")
    return None, key_env


def _grant(raw: Any, path: str, repo_policy: AllowListedRepo | None) -> CallerGrant:
    raw = expect(raw, dict, path, "a mapping")
    no_unknown_keys(raw, _GRANT_KEYS, path)

    if "projects" not in raw:
        raise PolicyError(f"{path}.projects: required")
    projects = expect(raw["projects"], list, f"{path}.projects", "a list of project names or dirs")
    if not projects:
        raise PolicyError(f"{path}.projects: must list at least one project")
    entries: list[str] = []
    for j, entry in enumerate(projects):
        ppath = f"{path}.projects[{j}]"
        if not isinstance(entry, str) or not _PROJECT_REF.fullmatch(entry) or entry.startswith("-"):
            raise PolicyError(f"{ppath}: must be a project name or dir")
        if entry in entries:
            raise PolicyError(f"{ppath}: {entry!r} listed twice")
        if repo_policy is not None and not any(_entry_covers(entry, p) for p in repo_policy.projects):
            raise PolicyError(f"{ppath}: {repo_policy.name} has no project named {entry!r} or in dir {entry!r}")
        entries.append(entry)

    if "commands" not in raw:
        raise PolicyError(f"{path}.commands: required (plan, apply)")
    commands_raw = expect(raw["commands"], list, f"{path}.commands", "a list")
    if not commands_raw:
        raise PolicyError(f"{path}.commands: must list at least one of {', '.join(COMMANDS)}")
    seen: set[str] = set()
    for j, command in enumerate(commands_raw):
        if command not in COMMANDS:
            raise PolicyError(f"{path}.commands[{j}]: unknown command {command!r} (allowed: {', '.join(COMMANDS)})")
        if command in seen:
            raise PolicyError(f"{path}.commands[{j}]: {command!r} listed twice")
        seen.add(command)
    commands = tuple(c for c in COMMANDS if c in seen)

    apply_refs: list[str] = []
    if "apply" in seen:
        if "apply_refs" not in raw:
            raise PolicyError(f"{path}.apply_refs: required when apply is allowed (e.g. [refs/heads/main])")
        refs = expect(raw["apply_refs"], list, f"{path}.apply_refs", "a list of git refs")
        if not refs:
            raise PolicyError(f"{path}.apply_refs: must list at least one ref")
        for j, ref in enumerate(refs):
            rpath = f"{path}.apply_refs[{j}]"
            if not isinstance(ref, str):
                raise PolicyError(f"{rpath}: must be a string, not {type_name(ref)}")
            if not ref.startswith("refs/"):
                raise PolicyError(f"{rpath}: must be a full ref like refs/heads/{ref or 'main'}")
            if not _GIT_REF.fullmatch(ref) or ".." in ref or "//" in ref or ref.endswith(("/", ".lock", ".")):
                raise PolicyError(f"{rpath}: not a valid git ref")
            if ref in apply_refs:
                raise PolicyError(f"{rpath}: {ref!r} listed twice")
            apply_refs.append(ref)
    elif "apply_refs" in raw:
        raise PolicyError(f"{path}.apply_refs: only allowed when commands include apply")
    return CallerGrant(projects=tuple(entries), commands=commands, apply_refs=tuple(apply_refs))
