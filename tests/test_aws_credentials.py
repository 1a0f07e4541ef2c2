"""Credentials per phase, against moto's STS/IAM in server mode on loopback, and real terraform.

The bot's own credentials are fake ones set in this process's environment (as an
ECS task would have its task role); they must be the ones that call STS, and must
never reach terraform. Plan and apply must each get their own role's short-lived
credentials, and a plan must never see the apply role's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import stat
import time
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError
from moto.server import ThreadedMotoServer

from bot.jobs.aws_credentials import (
    REFRESH_MARGIN_S,
    CredentialsError,
    PhaseCredentials,
    PhaseRoles,
    session_name,
    with_credentials,
)
from bot.jobs.terraform import Terraform, TerraformSettings

ACCOUNT = "123456789012"  # moto's default account
REGION = "eu-west-1"
BOT_KEY_ID = "AKIABOTOWNCREDENTIAL"
BOT_SECRET = "bot-own-secret-access-key-never-for-terraform"
BOT_CONTAINER_URI = "/v2/credentials/bot-task-role-uri"

TRUST_POLICY = """{"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
 "Principal": {"AWS": "arn:aws:iam::123456789012:role/deploybot-task"}, "Action": "sts:AssumeRole"}]}"""


@dataclasses.dataclass
class Moto:
    endpoint: str
    plan_role_arn: str
    apply_role_arn: str

    def client(self, service: str, env: dict[str, str] | None = None) -> Any:
        """A boto3 client against moto, with the given credentials (default: the bot's own)."""
        env = env or {"AWS_ACCESS_KEY_ID": BOT_KEY_ID, "AWS_SECRET_ACCESS_KEY": BOT_SECRET}
        return boto3.client(
            service,
            region_name=REGION,
            endpoint_url=self.endpoint,
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            aws_session_token=env.get("AWS_SESSION_TOKEN"),
        )

    def caller_arn(self, env: dict[str, str]) -> str:
        """Whom AWS takes these credentials for."""
        return self.client("sts", env).get_caller_identity()["Arn"]

    def roles(self, **overrides: Any) -> PhaseRoles:
        values = {"plan_role_arn": self.plan_role_arn, "apply_role_arn": self.apply_role_arn,
                  "region": REGION, "endpoint_url": self.endpoint} | overrides
        return PhaseRoles(**values)


@pytest.fixture(scope="module")
def moto() -> Any:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        m = Moto(f"http://{host}:{port}", "", "")
        iam = m.client("iam")
        arns = []
        for name in ("deploybot-plan", "deploybot-apply"):
            try:
                arns.append(iam.create_role(RoleName=name, AssumeRolePolicyDocument=TRUST_POLICY)["Role"]["Arn"])
            except iam.exceptions.EntityAlreadyExistsException:
                # moto keeps one in-memory account per process: another module made them already.
                arns.append(iam.get_role(RoleName=name)["Role"]["Arn"])
        m.plan_role_arn, m.apply_role_arn = arns
        yield m
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def bot_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The bot process's own AWS credentials, as boto3's default chain finds them."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", BOT_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", BOT_SECRET)
    monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", BOT_CONTAINER_URI)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)


class CountingFactory:
    """Builds real boto3 STS clients (the bot's own credentials) and counts AssumeRole calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def __call__(self, roles: PhaseRoles) -> Any:
        client = boto3.client("sts", region_name=roles.region, endpoint_url=roles.endpoint_url)
        factory = self

        class Counted:
            def assume_role(self, **kwargs: Any) -> Any:
                factory.calls.append((kwargs["RoleArn"], kwargs["RoleSessionName"]))
                return client.assume_role(**kwargs)

        return Counted()


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _aws_values(env: dict[str, str]) -> set[str]:
    return {v for k, v in env.items() if k.startswith("AWS_")}


# --------------------------------------------------------------------------- roles per phase


def test_plan_and_apply_get_their_own_roles(moto: Moto) -> None:
    creds = PhaseCredentials(moto.roles())
    plan_name = session_name("plan", "acme/infra", 12, "alice")
    apply_name = session_name("apply", "acme/infra", 12, "alice")
    assert plan_name == "deploybot-plan-acme-infra-pr12-alice"

    plan = creds.env_for("plan", plan_name)
    apply = creds.env_for("apply", apply_name)

    for env in (plan, apply):
        assert set(env) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                            "AWS_REGION", "AWS_DEFAULT_REGION"}
        assert env["AWS_REGION"] == env["AWS_DEFAULT_REGION"] == REGION
        assert BOT_KEY_ID not in env.values() and BOT_SECRET not in env.values()
    assert plan["AWS_ACCESS_KEY_ID"] != apply["AWS_ACCESS_KEY_ID"]
    assert plan["AWS_SECRET_ACCESS_KEY"] != apply["AWS_SECRET_ACCESS_KEY"]
    assert plan["AWS_SESSION_TOKEN"] != apply["AWS_SESSION_TOKEN"]

    # AWS itself (moto) takes each set for its role, under the session name CloudTrail will show.
    assert moto.caller_arn(plan) == f"arn:aws:sts::{ACCOUNT}:assumed-role/deploybot-plan/{plan_name}"
    assert moto.caller_arn(apply) == f"arn:aws:sts::{ACCOUNT}:assumed-role/deploybot-apply/{apply_name}"
    # ...and the bot's own credentials are what called STS, not something terraform got.
    assert moto.caller_arn({"AWS_ACCESS_KEY_ID": BOT_KEY_ID, "AWS_SECRET_ACCESS_KEY": BOT_SECRET}) \
        != moto.caller_arn(plan)

    assert set(creds.secrets()) == _aws_values(plan) - {REGION} | _aws_values(apply) - {REGION}


def test_plan_only_ever_assumes_the_plan_role(moto: Moto) -> None:
    factory = CountingFactory()
    creds = PhaseCredentials(moto.roles(), factory)
    for actor in ("alice", "bob"):
        creds.env_for("plan", session_name("plan", "acme/infra", 3, actor))
    creds.env_for("apply", session_name("apply", "acme/infra", 3, "alice"))
    # Even a session name that says "apply" gets the plan role when asked for a plan.
    creds.env_for("plan", session_name("apply", "acme/infra", 3, "mallory"))
    assert [arn for arn, _ in factory.calls] == [
        moto.plan_role_arn, moto.plan_role_arn, moto.apply_role_arn, moto.plan_role_arn]
    with pytest.raises(CredentialsError, match="unknown phase"):
        creds.env_for("destroy", "deploybot-x")


def test_session_name_is_sanitised_and_truncated(moto: Moto) -> None:
    allowed = re.compile(r"[\w+=,.@-]{2,64}", re.ASCII)

    name = session_name("apply", "group/sub group/projéct", "run42", "dependabot[bot]")
    assert name == "deploybot-apply-group-sub-group-proj-ct-run42-dependabot-bot"
    assert allowed.fullmatch(name)

    long_repo = "an-organisation-with-a-long-name/" + "infrastructure-live-" * 6
    long_name = session_name("plan", long_repo, 123456, "a-very-long-login-name-for-a-person")
    assert len(long_name) <= 64 and allowed.fullmatch(long_name)
    # The phase, the PR and (the start of) the actor survive; the repo is shortened, with a hash.
    assert re.fullmatch(r"deploybot-plan-infrastructu-[0-9a-f]{6}-pr123456-a-very-long-login-na", long_name)
    assert long_name != session_name("plan", long_repo + "x", 123456, "a-very-long-login-name-for-a-person")

    assert session_name("plan", "///", "", "!!!") == "deploybot-plan-repo-run-unknown"
    with pytest.raises(CredentialsError):
        session_name("destroy", "acme/infra", 1, "alice")

    # STS accepts it, and CloudTrail (here: GetCallerIdentity) shows it whole.
    env = PhaseCredentials(moto.roles()).env_for("plan", long_name)
    assert moto.caller_arn(env).endswith(f"assumed-role/deploybot-plan/{long_name}")

    # Names not made by session_name() are refused before any call.
    creds = PhaseCredentials(moto.roles(), _refusing_factory)
    for bad in ("a", "x" * 65, "deploybot plan", "deploybot/plan"):
        with pytest.raises(CredentialsError, match="invalid role session name"):
            creds.env_for("plan", bad)


def test_credentials_are_cached_until_shortly_before_expiry(moto: Moto) -> None:
    factory = CountingFactory()
    clock = Clock(time.time())
    creds = PhaseCredentials(moto.roles(duration_seconds=900), factory, clock=clock)
    alice = session_name("plan", "acme/infra", 7, "alice")

    first = creds.env_for("plan", alice)
    assert creds.env_for("plan", alice) == first
    assert len(factory.calls) == 1

    creds.env_for("plan", session_name("plan", "acme/infra", 7, "bob"))  # another session
    creds.env_for("apply", session_name("apply", "acme/infra", 7, "alice"))  # another phase
    assert len(factory.calls) == 3
    assert creds.env_for("plan", alice) == first and len(factory.calls) == 3

    clock.now += 900 - REFRESH_MARGIN_S - 30  # still more than the margin left
    assert creds.env_for("plan", alice) == first and len(factory.calls) == 3
    # A caller that needs them longer than they have left gets fresh ones.
    longer = creds.env_for("plan", alice, valid_for=600)
    assert longer["AWS_ACCESS_KEY_ID"] != first["AWS_ACCESS_KEY_ID"] and len(factory.calls) == 4

    clock.now += 900 - REFRESH_MARGIN_S + 1  # within the margin of the new ones' expiry
    renewed = creds.env_for("plan", alice)
    assert renewed["AWS_ACCESS_KEY_ID"] not in (first["AWS_ACCESS_KEY_ID"], longer["AWS_ACCESS_KEY_ID"])
    assert len(factory.calls) == 5
    assert moto.caller_arn(renewed).endswith(f"assumed-role/deploybot-plan/{alice}")

    creds.clear()
    creds.env_for("plan", alice)
    assert len(factory.calls) == 6


# --------------------------------------------------------------------------- configuration


def _refusing_factory(roles: PhaseRoles) -> Any:
    raise AssertionError("no STS client may be made")


def test_no_roles_gives_no_credentials() -> None:
    creds = PhaseCredentials(PhaseRoles(region=REGION), _refusing_factory)
    assert not creds.enabled
    assert creds.env_for("plan", "deploybot-plan-acme-infra-pr1-alice") == {}
    assert creds.env_for("apply", "deploybot-apply-acme-infra-pr1-alice") == {}
    assert creds.secrets() == []
    # The phase's configured environment then goes to terraform as it is.
    assert with_credentials({"AWS_PROFILE": "ops"}, {}) == {"AWS_PROFILE": "ops"}


@pytest.mark.parametrize(("roles", "complaint"), [
    (PhaseRoles(apply_role_arn="arn:aws:iam::123456789012:role/apply"), "plan_role_arn: must be set"),
    (PhaseRoles(plan_role_arn="arn:aws:iam::123456789012:role/plan"), "apply_role_arn: must be set"),
    (PhaseRoles(plan_role_arn="arn:aws:iam::123456789012:role/same",
                apply_role_arn="arn:aws:iam::123456789012:role/same"), "must differ"),
    (PhaseRoles(plan_role_arn="deploybot-plan",
                apply_role_arn="arn:aws:iam::123456789012:role/apply"), "not an IAM role ARN"),
    (PhaseRoles(plan_role_arn="arn:aws:iam::123456789012:role/plan",
                apply_role_arn="arn:aws:iam::123456789012:role/apply", duration_seconds=60), "duration_seconds"),
])
def test_misconfigured_roles_are_refused(roles: PhaseRoles, complaint: str) -> None:
    assert any(complaint in problem for problem in roles.problems())
    with pytest.raises(CredentialsError, match=complaint):
        PhaseCredentials(roles, _refusing_factory)


def test_plan_without_its_role_never_falls_back(moto: Moto) -> None:
    """Even if the construction checks were bypassed, a plan with no role of its own raises."""
    creds = PhaseCredentials(moto.roles(), _refusing_factory)
    object.__setattr__(creds.roles, "plan_role_arn", "")  # as if the config changed under us
    with pytest.raises(CredentialsError, match="no role configured for plan"):
        creds.env_for("plan", session_name("plan", "acme/infra", 1, "alice"))


def test_errors_name_the_role_but_no_secret(moto: Moto) -> None:
    def denied(roles: PhaseRoles) -> Any:
        class Sts:
            def assume_role(self, **kwargs: Any) -> Any:
                raise ClientError({"Error": {"Code": "AccessDenied", "Message": (
                    f"User: arn:aws:sts::{ACCOUNT}:assumed-role/deploybot-task/x is not authorized "
                    f"to perform: sts:AssumeRole on resource: {kwargs['RoleArn']}")}}, "AssumeRole")
        return Sts()

    creds = PhaseCredentials(moto.roles(external_id="ext-secret-ish"), denied)
    with pytest.raises(CredentialsError) as caught:
        creds.env_for("apply", session_name("apply", "acme/infra", 1, "alice"))
    message = str(caught.value)
    assert moto.apply_role_arn in message and "AccessDenied" in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__

    def unreachable(roles: PhaseRoles) -> Any:  # nothing listens on port 9 of loopback
        return boto3.client("sts", region_name=REGION, endpoint_url="http://127.0.0.1:9",
                            config=BotoConfig(retries={"max_attempts": 1}, connect_timeout=2))

    creds = PhaseCredentials(moto.roles(), unreachable)
    with pytest.raises(CredentialsError) as caught:
        creds.env_for("plan", session_name("plan", "acme/infra", 1, "alice"))
    message = str(caught.value)
    assert moto.plan_role_arn in message and "EndpointConnectionError" in message
    for secret in (BOT_KEY_ID, BOT_SECRET, BOT_CONTAINER_URI):
        assert secret not in message and secret not in repr(creds)


def test_with_credentials_leaves_terraform_no_other_source() -> None:
    phase_env = {"TF_VAR_env": "prod", "AWS_PROFILE": "admin", "AWS_ACCESS_KEY_ID": "AKIASTATIC",
                 "AWS_SECRET_ACCESS_KEY": "static", "aws_web_identity_token_file": "/t",
                 "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": "/v2/x", "AWS_REGION": "us-east-1",
                 "AWS_STS_REGIONAL_ENDPOINTS": "regional"}
    creds = {"AWS_ACCESS_KEY_ID": "ASIAROLE", "AWS_SECRET_ACCESS_KEY": "s", "AWS_SESSION_TOKEN": "t"}
    assert with_credentials(phase_env, creds) == {
        "TF_VAR_env": "prod", "AWS_REGION": "us-east-1", "AWS_STS_REGIONAL_ENDPOINTS": "regional", **creds}


# --------------------------------------------------------------------------- real terraform

TF_CONFIG = """
resource "null_resource" "env" {
  provisioner "local-exec" {
    command = "env | grep ^AWS_ > ${path.module}/env-apply.txt"
  }
}
"""


def _read_env(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return dict(pairs)


def test_terraform_gets_only_its_phase_credentials(
    moto: Moto, tf_settings: TerraformSettings, tmp_path: Path
) -> None:
    """init/plan run with the plan role's credentials, init/apply (and its provisioners) with
    the apply role's; the bot's own never reach terraform, and plan never sees apply's."""
    # A terraform that first records the AWS_* variables it was started with, per subcommand.
    seen = tmp_path / "seen"
    seen.mkdir()
    wrapper = tmp_path / "terraform"
    wrapper.write_text(
        "#!/bin/sh\n"
        f"env | grep '^AWS_' > '{seen}'/\"$1\".env\n"
        f"exec '{tf_settings.binary}' \"$@\"\n"
    )
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    terraform = Terraform(dataclasses.replace(tf_settings, binary=str(wrapper)))

    workdir = tmp_path / "project"
    workdir.mkdir()
    (workdir / "main.tf").write_text(TF_CONFIG)
    planfile = tmp_path / "plan.tfplan"
    # What the server config gives each phase; a profile there must not win over the role.
    plan_cfg = {"AWS_PROFILE": "bot-admin", "TF_VAR_unused": "1"}
    apply_cfg = {"AWS_PROFILE": "bot-admin"}

    creds = PhaseCredentials(moto.roles())
    plan_name = session_name("plan", "acme/infra", 5, "alice")
    apply_name = session_name("apply", "acme/infra", 5, "bob")

    # ---- plan phase
    plan_creds = creds.env_for("plan", plan_name)
    plan_env = with_credentials(plan_cfg, plan_creds)
    full_plan_env = terraform.environment(plan_env)
    assert full_plan_env["AWS_ACCESS_KEY_ID"] == plan_creds["AWS_ACCESS_KEY_ID"]
    assert "AWS_PROFILE" not in full_plan_env and full_plan_env["TF_VAR_unused"] == "1"
    init = asyncio.run(terraform.init(workdir, plan_env))
    assert init.ok, init.output
    plan = asyncio.run(terraform.plan(workdir, planfile, plan_env))
    assert plan.exit_code == 2, plan.output
    plan_seen = {name: _read_env(seen / f"{name}.env") for name in ("init", "plan")}
    for env in plan_seen.values():
        assert env["AWS_ACCESS_KEY_ID"] == plan_creds["AWS_ACCESS_KEY_ID"]
        assert env["AWS_SESSION_TOKEN"] == plan_creds["AWS_SESSION_TOKEN"]
        assert env["AWS_REGION"] == REGION
        assert "AWS_PROFILE" not in env
    assert moto.caller_arn(plan_seen["plan"]).endswith(f"assumed-role/deploybot-plan/{plan_name}")
    for path in list(seen.iterdir()):
        path.unlink()

    # ---- apply phase
    apply_creds = creds.env_for("apply", apply_name)
    apply_env = with_credentials(apply_cfg, apply_creds)
    assert asyncio.run(terraform.init(workdir, apply_env)).ok
    applied = asyncio.run(terraform.apply(workdir, planfile, apply_env))
    assert applied.ok, applied.output
    provisioner_env = _read_env(workdir / "env-apply.txt")
    apply_seen = {name: _read_env(seen / f"{name}.env") for name in ("init", "apply")}
    for env in (provisioner_env, *apply_seen.values()):
        assert env["AWS_ACCESS_KEY_ID"] == apply_creds["AWS_ACCESS_KEY_ID"]
        assert env["AWS_SECRET_ACCESS_KEY"] == apply_creds["AWS_SECRET_ACCESS_KEY"]
        assert "AWS_PROFILE" not in env
    assert moto.caller_arn(provisioner_env).endswith(f"assumed-role/deploybot-apply/{apply_name}")

    # ---- what must never be seen
    apply_secrets = {apply_creds[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")}
    for env in (full_plan_env, *plan_seen.values()):
        assert not apply_secrets & set(env.values())
    bot_own = {BOT_KEY_ID, BOT_SECRET, BOT_CONTAINER_URI}
    for env in (full_plan_env, *plan_seen.values(), provisioner_env, *apply_seen.values(),
                terraform.environment(apply_env)):
        assert not bot_own & set(env.values())
        assert "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI" not in env
    for text in (init.output, plan.output, applied.output):
        assert not any(secret in text for secret in bot_own | apply_secrets)
