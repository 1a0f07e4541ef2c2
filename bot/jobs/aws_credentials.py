"""Short-lived AWS credentials per phase: a read-only role for plan, the deploy role for apply.

For each job the bot assumes the phase's IAM role with STS and hands terraform
only those temporary credentials, so:

- a plan (which runs code from the pull request: providers, data sources) never
  holds credentials that can change the account;
- CloudTrail names who caused each call: the role session name carries the
  phase, the repository, the pull request (or trigger-API run) and the actor,
  e.g. `deploybot-plan-acme-infra-pr12-alice`;
- the bot's own credentials (its ECS task role) are used only to call
  `sts:AssumeRole` and never reach terraform.

Plan can never get the apply role: `env_for("plan", ...)` only ever assumes
`plan_role_arn`, and a configuration that would let a plan run with anything
but its own role (no plan role while an apply role is set, or the same role for
both) is refused when `PhaseCredentials` is built.

With no roles configured at all, `env_for` returns `{}` and terraform gets only
the variables the server config gives it (`terraform.env`, `plan_env`,
`apply_env`); nothing comes from the bot's own environment (see
`bot.jobs.terraform.Terraform.environment`). Terraform's AWS provider then looks
further down its own credential chain: HOME is the bot's private terraform home
(no `~/.aws`), so on ECS/Fargate it finds no credentials (the container
credentials URI is in the bot's environment only) unless `plan_env`/`apply_env`
set some, while on EC2 it reaches the instance metadata service and so runs
with the instance role for plan and apply alike.

Everything here blocks (boto3): call it from a thread, not the event loop.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

PHASES: tuple[str, ...] = ("plan", "apply")

# Cached credentials are handed out until this long before they expire.
REFRESH_MARGIN_S = 300.0

# STS limits: RoleSessionName is 2-64 characters of [\w+=,.@-] (ASCII word
# characters); DurationSeconds is 900 s to 12 h (and at most the role's own
# MaxSessionDuration, which STS enforces).
SESSION_NAME_MAX = 64
MIN_DURATION_S = 900
MAX_DURATION_S = 43200

_ROLE_ARN_RE = re.compile(r"arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]{1,512}")
_NOT_SESSION_CHARS = re.compile(r"[^A-Za-z0-9_+=,.@-]+")
_ACTOR_MAX = 20

# Variables that would point an AWS SDK at credentials other than the ones the
# bot assumed; dropped from a phase's configured environment when a role is used.
CREDENTIAL_SOURCE_VARS = frozenset({
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
    "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE",
    "AWS_ROLE_ARN", "AWS_ROLE_SESSION_NAME", "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN", "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
})


class CredentialsError(Exception):
    """A phase's role could not be assumed, or the roles are misconfigured.

    The message names the role ARN and the reason, never a credential.
    """


@dataclass(frozen=True)
class PhaseRoles:
    """Which role each phase assumes; both empty means "no roles" (see the module doc)."""

    plan_role_arn: str = ""  # read-only role: plan, show
    apply_role_arn: str = ""  # deploy role: apply
    region: str = ""  # AWS_REGION/AWS_DEFAULT_REGION for terraform, and the STS endpoint's region
    endpoint_url: str = ""  # STS endpoint override (a VPC endpoint, or a local fake in tests)
    duration_seconds: int = 3600  # lifetime of the assumed credentials (900..43200)
    external_id: str = ""  # sts:ExternalId, if the roles' trust policies require one

    @property
    def enabled(self) -> bool:
        return bool(self.plan_role_arn or self.apply_role_arn)

    def problems(self) -> list[str]:
        """What is wrong with this configuration (empty when it is usable)."""
        found = []
        for name in ("plan_role_arn", "apply_role_arn"):
            value = getattr(self, name)
            if value and not _ROLE_ARN_RE.fullmatch(value):
                found.append(f"{name}: not an IAM role ARN: {value!r}")
        if self.apply_role_arn and not self.plan_role_arn:
            found.append("plan_role_arn: must be set when apply_role_arn is "
                         "(plan would otherwise run without a role of its own)")
        if self.plan_role_arn and not self.apply_role_arn:
            found.append("apply_role_arn: must be set when plan_role_arn is "
                         "(apply would otherwise run without a role of its own)")
        if self.plan_role_arn and self.plan_role_arn == self.apply_role_arn:
            found.append("plan_role_arn: must differ from apply_role_arn "
                         "(plan must never hold the apply role)")
        if not MIN_DURATION_S <= self.duration_seconds <= MAX_DURATION_S:
            found.append(f"duration_seconds: must be between {MIN_DURATION_S} and {MAX_DURATION_S}")
        return found

    def role_for(self, phase: str) -> str:
        """The role ARN of `phase` (empty when no roles are configured)."""
        if phase == "plan":
            return self.plan_role_arn
        if phase == "apply":
            return self.apply_role_arn
        raise CredentialsError(f"unknown phase {phase!r}: expected 'plan' or 'apply'")


def session_name(phase: str, repo_full_name: str, pull_number_or_run: int | str, actor: str) -> str:
    """The STS role session name for one job: who, where and what, in at most 64 characters.

    `pull_number_or_run` is a pull/merge request number (`pr12`), or a label of
    its own for runs without one (e.g. `"run42"` for a trigger-API run).
    Characters STS does not allow become `-`; the actor is cut to 20 characters;
    when the whole would still be too long, the repository part is cut to the
    repository's own name (no owner/group), shortened, and given a short hash of
    the full name, so the phase, the PR or run, and the actor always stay
    readable in CloudTrail.
    """
    if phase not in PHASES:
        raise CredentialsError(f"unknown phase {phase!r}: expected 'plan' or 'apply'")
    if isinstance(pull_number_or_run, int) and not isinstance(pull_number_or_run, bool):
        where = f"pr{pull_number_or_run}"
    else:
        where = _clean(str(pull_number_or_run)) or "run"
    who = _clean(actor)[:_ACTOR_MAX].strip("-") or "unknown"
    head = f"deploybot-{phase}-"
    tail = f"-{where[:16]}-{who}"
    repo = _clean(repo_full_name) or "repo"
    room = SESSION_NAME_MAX - len(head) - len(tail)
    if len(repo) > room:
        # The owner/group is usually the same for every repo the bot serves: keep the
        # repository's own name, and a hash of the full name so shortened ones differ.
        digest = hashlib.sha256(repo_full_name.encode()).hexdigest()[:6]
        own = _clean(repo_full_name.rstrip("/").rsplit("/", 1)[-1]) or repo
        repo = f"{own[: max(room - 7, 1)].rstrip('-')}-{digest}"[:room]
    return f"{head}{repo}{tail}"[:SESSION_NAME_MAX]


def _clean(text: str) -> str:
    return _NOT_SESSION_CHARS.sub("-", text).strip("-")


def with_credentials(phase_env: Mapping[str, str], credentials: Mapping[str, str]) -> dict[str, str]:
    """A phase's configured environment with the assumed credentials laid over it.

    When there are credentials, every variable that could point the AWS SDK at
    other credentials (static keys, profiles, web identity, container endpoint)
    is dropped from `phase_env` first, so the assumed role is the only one
    terraform can use. Without credentials `phase_env` is returned unchanged.
    """
    if not credentials:
        return dict(phase_env)
    merged = {k: v for k, v in phase_env.items() if k.upper() not in CREDENTIAL_SOURCE_VARS}
    merged.update(credentials)
    return merged


@dataclass(frozen=True)
class _Cached:
    env: dict[str, str]
    expires_at: float  # epoch seconds

    def __repr__(self) -> str:  # never show the keys
        return f"_Cached(expires_at={self.expires_at})"


StsClientFactory = Callable[[PhaseRoles], Any]


def _default_sts_client(roles: PhaseRoles) -> Any:
    """An STS client with the bot's own credentials (boto3's default chain)."""
    import boto3  # deferred: only needed when roles are configured

    return boto3.client(
        "sts",
        region_name=roles.region or None,
        endpoint_url=roles.endpoint_url or None,
    )


class PhaseCredentials:
    """Assumes the plan or apply role for a job and returns terraform's AWS variables.

    Thread-safe; credentials are cached per (phase, session name) and handed out
    again until `REFRESH_MARGIN_S` before they expire.
    """

    def __init__(
        self,
        roles: PhaseRoles,
        sts_client_factory: StsClientFactory | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        problems = roles.problems()
        if problems:
            raise CredentialsError("aws: " + "; ".join(problems))
        self.roles = roles
        self._factory = sts_client_factory or _default_sts_client
        self._clock = clock
        self._client: Any = None
        self._lock = threading.Lock()  # guards _client, _cache and _key_locks
        self._key_locks: dict[tuple[str, str], threading.Lock] = {}
        self._cache: dict[tuple[str, str], _Cached] = {}

    @property
    def enabled(self) -> bool:
        return self.roles.enabled

    def __repr__(self) -> str:
        return (f"PhaseCredentials(plan_role_arn={self.roles.plan_role_arn!r}, "
                f"apply_role_arn={self.roles.apply_role_arn!r})")

    def env_for(self, phase: str, session_name: str, *, valid_for: float = REFRESH_MARGIN_S) -> dict[str, str]:
        """AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN (and the region) for `phase`.

        `valid_for`: the credentials returned stay valid at least this many
        seconds (never less than the refresh margin); give a phase's timeout to
        make sure a long apply does not outlive them.
        Returns {} when no roles are configured. Raises CredentialsError.
        """
        role_arn = self.roles.role_for(phase)
        if not self.roles.enabled:
            return {}
        if not role_arn:  # problems() refuses this; never fall back to the bot's credentials
            raise CredentialsError(f"no role configured for {phase}")
        if not 2 <= len(session_name) <= SESSION_NAME_MAX or _NOT_SESSION_CHARS.search(session_name):
            raise CredentialsError(f"invalid role session name {session_name!r}: use session_name()")
        margin = max(REFRESH_MARGIN_S, valid_for)
        key = (phase, session_name)
        with self._lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:  # one AssumeRole per key at a time; other keys go on in parallel
            with self._lock:
                cached = self._cache.get(key)
            if cached is not None and cached.expires_at - self._clock() > margin:
                return dict(cached.env)
            fresh = self._assume(phase, role_arn, session_name)
            with self._lock:
                now = self._clock()
                for old in [k for k, v in self._cache.items() if v.expires_at <= now]:
                    del self._cache[old]
                    self._key_locks.pop(old, None)
                self._cache[key] = fresh
            return dict(fresh.env)

    def secrets(self) -> list[str]:
        """The secret parts of every credential handed out and not yet expired, for redaction."""
        with self._lock:
            return [value for cached in self._cache.values()
                    for name, value in cached.env.items()
                    if name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")]

    def clear(self) -> None:
        """Forget every cached credential."""
        with self._lock:
            self._cache.clear()
            self._key_locks.clear()

    # ---------------------------------------------------------------- internals

    def _sts(self) -> Any:
        with self._lock:
            if self._client is None:
                try:
                    self._client = self._factory(self.roles)
                except Exception as exc:  # boto3 is missing, or a bad region / endpoint
                    raise CredentialsError(f"cannot create an STS client: {_describe(exc)}") from None
            return self._client

    def _assume(self, phase: str, role_arn: str, name: str) -> _Cached:
        request: dict[str, Any] = {
            "RoleArn": role_arn,
            "RoleSessionName": name,
            "DurationSeconds": self.roles.duration_seconds,
        }
        if self.roles.external_id:
            request["ExternalId"] = self.roles.external_id
        client = self._sts()
        try:
            response = client.assume_role(**request)
            creds = response["Credentials"]
            env = {
                "AWS_ACCESS_KEY_ID": str(creds["AccessKeyId"]),
                "AWS_SECRET_ACCESS_KEY": str(creds["SecretAccessKey"]),
                "AWS_SESSION_TOKEN": str(creds["SessionToken"]),
            }
            expiration = creds["Expiration"]
        except Exception as exc:  # ClientError, NoCredentialsError, connection errors, odd replies
            raise CredentialsError(
                f"cannot assume the {phase} role {role_arn} as {name}: {_describe(exc)}"
            ) from None
        if self.roles.region:
            env["AWS_REGION"] = self.roles.region
            env["AWS_DEFAULT_REGION"] = self.roles.region
        return _Cached(env=env, expires_at=_epoch(expiration, self._clock()))


def _epoch(expiration: Any, now: float) -> float:
    if isinstance(expiration, datetime):
        return expiration.timestamp()
    if isinstance(expiration, (int, float)):
        return float(expiration)
    try:
        return datetime.fromisoformat(str(expiration).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return now  # unknown: never reuse these credentials


def _describe(exc: Exception) -> str:
    """A one-line reason; AWS error replies carry a code and a message, never a credential."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict) and isinstance(response.get("Error"), dict):
        error = response["Error"]
        return f"{error.get('Code', 'Error')}: {error.get('Message', '')}".strip()
    if isinstance(exc, KeyError):
        return f"STS reply without {exc}"
    return f"{type(exc).__name__}: {exc}"
