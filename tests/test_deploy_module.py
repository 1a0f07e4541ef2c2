"""deploy/: the Terraform module that runs deploybot in AWS, and its container image.

Neither can be deployed here (no AWS, no Docker engine, no provider download), so these
tests check what can be checked from the files: `terraform fmt` with the real terraform,
and the security properties of the module (parsed with python-hcl2) and of the Dockerfile.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hcl2
import pytest

from bot.jobs.terraform import find_terraform

ROOT = Path(__file__).resolve().parent.parent
MODULE = ROOT / "deploy" / "terraform"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|PRIVATE|CREDENTIAL|WEBHOOK_URL|(^|_)KEY($|_)", re.I)


# -- the module, parsed ------------------------------------------------------------------------


@dataclass
class Module:
    resources: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    data: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    locals: dict[str, Any] = field(default_factory=dict)
    variables: dict[str, dict[str, Any]] = field(default_factory=dict)
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    terraform: list[dict[str, Any]] = field(default_factory=list)

    def of_type(self, kind: str) -> dict[str, dict[str, Any]]:
        return {name: body for (k, name), body in self.resources.items() if k == kind}


@pytest.fixture(scope="module")
def module() -> Module:
    options = hcl2.SerializationOptions(strip_string_quotes=True, explicit_blocks=False, with_comments=False)
    parsed = Module()
    for path in sorted(MODULE.glob("*.tf")):
        with path.open() as f:
            doc = hcl2.load(f, serialization_options=options)
        for kind, target in (("resource", parsed.resources), ("data", parsed.data)):
            for entry in doc.get(kind, []):
                for rtype, named in entry.items():
                    for name, body in named.items():
                        assert (rtype, name) not in target, f"{rtype}.{name} twice"
                        target[(rtype, name)] = body
        for block in doc.get("locals", []):
            parsed.locals.update(block)
        for entry in doc.get("variable", []):
            parsed.variables.update(entry)
        for entry in doc.get("output", []):
            parsed.outputs.update(entry)
        parsed.terraform += doc.get("terraform", [])
    return parsed


def ref(address: str) -> str:
    """How the parser writes a plain reference: `${aws_iam_role.task.arn}`."""
    return "${" + address + "}"


def one(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    assert len(blocks) == 1, blocks
    return blocks[0]


def statements(document: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every statement of an aws_iam_policy_document, dynamic ones included."""
    yield from document.get("statement", [])
    for dynamic in document.get("dynamic", []):
        for name, block in dynamic.items():
            assert name == "statement"
            yield from block["content"]


def policy_document(module: Module, expression: str) -> dict[str, Any]:
    """The aws_iam_policy_document that `${data.aws_iam_policy_document.NAME.json}` names."""
    match = re.fullmatch(r"\$\{data\.aws_iam_policy_document\.(\w+)\.json\}", expression)
    assert match, f"policy is not a policy document of this module: {expression}"
    return module.data[("aws_iam_policy_document", match[1])]


def policies_of_role(module: Module, role: str) -> tuple[list[dict], list[dict]]:
    """(inline policies, managed attachments) that name aws_iam_role.<role>."""
    refs = {ref(f"aws_iam_role.{role}.id"), ref(f"aws_iam_role.{role}.name")}
    inline = [b for b in module.of_type("aws_iam_role_policy").values() if b["role"] in refs]
    attached = [b for b in module.of_type("aws_iam_role_policy_attachment").values() if b["role"] in refs]
    attached += [b for b in module.of_type("aws_iam_policy_attachment").values()
                 if refs & set(b.get("roles", []))]
    return inline, attached


# -- formatting and layout ------------------------------------------------------------------


def test_terraform_fmt_accepts_the_module() -> None:
    result = subprocess.run([find_terraform(), "fmt", "-check", "-recursive", "-diff", str(MODULE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


GOOD_VARIABLES = """
vpc_id                   = "vpc-0123"
private_subnet_ids       = ["subnet-a", "subnet-b"]
load_balancer_subnet_ids = ["subnet-c", "subnet-d"]
allowed_ingress_cidrs    = ["192.30.252.0/22", "185.199.108.0/22"]
domain_name              = "deploybot.example.com"
certificate_arn          = "arn:aws:acm:eu-west-1:123456789012:certificate/0"
container_image          = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/deploybot@sha256:0"
apply_role_policy_arns   = ["arn:aws:iam::123456789012:policy/deploys"]
extra_environment        = { DEPLOYBOT_TERRAFORM__PARALLELISM = "2" }
extra_secrets            = { DEPLOYBOT_SLACK__BOT_TOKEN = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:t" }
"""


@pytest.mark.parametrize("override, culprit", [
    (None, None),
    ('allowed_ingress_cidrs=["2001:db8::/32"]', "allowed_ingress_cidrs"),
    ('allowed_ingress_cidrs=[]', "allowed_ingress_cidrs"),
    ('extra_environment={DEPLOYBOT_GITHUB__WEBHOOK_SECRET="x"}', "extra_environment"),
    ('extra_environment={DEPLOYBOT_SLACK__WEBHOOK_URL="https://hooks.slack.com/x"}', "extra_environment"),
    ('apply_role_policy_arns=[]', "apply_role_policy_arns"),
    ("log_retention_days=0", "log_retention_days"),
    ("replicas=0", "replicas"),
    ('load_balancer_subnet_ids=["subnet-c"]', "load_balancer_subnet_ids"),
])
def test_variable_validations_with_real_terraform(tmp_path: Path, override: str | None, culprit: str | None) -> None:
    """The variables alone need no provider: terraform itself evaluates their validations."""
    (tmp_path / "variables.tf").write_text((MODULE / "variables.tf").read_text())
    (tmp_path / "good.tfvars").write_text(GOOD_VARIABLES)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "CHECKPOINT_DISABLE": "1", "TF_IN_AUTOMATION": "1"}
    terraform = find_terraform()
    subprocess.run([terraform, "init", "-input=false", "-no-color"], cwd=tmp_path, env=env, check=True,
                   capture_output=True, timeout=120)
    args = [terraform, "plan", "-input=false", "-no-color", "-var-file=good.tfvars"]
    if override:
        args += ["-var", override]
    result = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    if culprit is None:
        assert result.returncode == 0, result.stdout + result.stderr
    else:
        assert result.returncode != 0
        assert "Invalid value for variable" in result.stderr
        assert f'variable "{culprit}"' in (MODULE / "variables.tf").read_text().splitlines()[
            int(re.search(r"on variables.tf line (\d+)", result.stderr)[1]) - 1]


def test_versions_pin_terraform_and_the_aws_provider(module: Module) -> None:
    block = one(module.terraform)
    assert block["required_version"] == ">= 1.0"
    aws = one(block["required_providers"])["aws"]
    assert aws == {"source": "hashicorp/aws", "version": "~> 5.0"}
    assert {p.name for p in MODULE.glob("*.tf")} == {"main.tf", "runners.tf", "variables.tf", "outputs.tf",
                                                     "versions.tf"}


def test_every_variable_and_output_is_described_and_in_the_readme(module: Module) -> None:
    readme = (MODULE / "README.md").read_text()
    for kind, items in (("variable", module.variables), ("output", module.outputs)):
        for name, body in items.items():
            assert body.get("description"), f"{kind} {name} has no description"
            assert f"`{name}`" in readme, f"{kind} {name} is not in deploy/terraform/README.md"
    for name in ("plan_role_arn", "apply_role_arn", "github_webhook_url", "log_group_name"):
        assert name in module.outputs


# -- network --------------------------------------------------------------------------------


def test_security_groups_have_no_inline_or_legacy_rules(module: Module) -> None:
    # Rules live in aws_vpc_security_group_*_rule resources only, so the checks below see them all.
    assert not module.of_type("aws_security_group_rule")
    for name, group in module.of_type("aws_security_group").items():
        assert "ingress" not in group and "egress" not in group, name
    assert set(module.of_type("aws_security_group")) == {"alb", "task", "db", "runner"}


def _ingress(module: Module, group: str) -> list[dict[str, Any]]:
    return [rule for rule in module.of_type("aws_vpc_security_group_ingress_rule").values()
            if rule["security_group_id"] == ref(f"aws_security_group.{group}.id")]


def test_load_balancer_admits_only_https_from_the_allowed_networks_and_the_runners(module: Module) -> None:
    rules = _ingress(module, "alb")
    runners = [rule for rule in rules if rule.get("referenced_security_group_id") == ref("aws_security_group.runner.id")]
    assert [(rule["ip_protocol"], rule["from_port"], rule["to_port"]) for rule in runners] == [("tcp", 443, 443)]
    rules = [rule for rule in rules if rule not in runners]
    assert rules
    for rule in rules:
        assert (rule["ip_protocol"], rule["from_port"], rule["to_port"]) == ("tcp", 443, 443)
        assert rule["for_each"] == "${toset(var.allowed_ingress_cidrs)}"
        assert rule["cidr_ipv4"] == "${each.value}"
        assert not {"cidr_ipv6", "prefix_list_id", "referenced_security_group_id"} & set(rule)
    assert "default" not in module.variables["allowed_ingress_cidrs"], "the user chooses who may connect"
    # The load balancer listens on 443 only, with TLS.
    listeners = module.of_type("aws_lb_listener")
    assert [(lst["port"], lst["protocol"]) for lst in listeners.values()] == [(443, "HTTPS")]
    assert one(list(listeners.values()))["certificate_arn"] == ref("var.certificate_arn")
    alb = module.resources[("aws_lb", "this")]
    assert alb["security_groups"] == [ref("aws_security_group.alb.id")]
    assert alb["drop_invalid_header_fields"] is True


def test_load_balancer_forwards_only_the_public_routes(module: Module) -> None:
    listener = module.resources[("aws_lb_listener", "https")]
    default = one(listener["default_action"])
    assert default["type"] == "fixed-response" and one(default["fixed_response"])["status_code"] == "404"
    rule = one(list(module.of_type("aws_lb_listener_rule").values()))
    paths = one(one(rule["condition"])["path_pattern"])["values"]
    assert paths == ["/webhooks/*", "/api/v1/*", "/slack/interactions"]  # not /metrics, /readyz


def test_task_admits_only_its_load_balancer(module: Module) -> None:
    rules = _ingress(module, "task")
    assert rules
    for rule in rules:
        assert rule["referenced_security_group_id"] == ref("aws_security_group.alb.id")
        assert not {"cidr_ipv4", "cidr_ipv6", "prefix_list_id", "for_each"} & set(rule)
        assert rule["from_port"] == rule["to_port"] == ref("var.container_port")
    egress = [r for r in module.of_type("aws_vpc_security_group_egress_rule").values()
              if r["security_group_id"] == ref("aws_security_group.alb.id")]
    assert [r["referenced_security_group_id"] for r in egress] == [ref("aws_security_group.task.id")]


def test_service_runs_private_replicas_without_exec_and_deploys_without_downtime(module: Module) -> None:
    service = module.resources[("aws_ecs_service", "this")]
    network = one(service["network_configuration"])
    assert network["assign_public_ip"] is False
    assert network["subnets"] == ref("var.private_subnet_ids")
    assert network["security_groups"] == [ref("aws_security_group.task.id")]
    assert service["desired_count"] == ref("var.replicas")
    # New tasks start before old ones stop: a deployment never leaves webhooks unanswered.
    assert (service["deployment_minimum_healthy_percent"], service["deployment_maximum_percent"]) == (100, 200)
    assert service["enable_execute_command"] is False


# -- IAM ------------------------------------------------------------------------------------


def test_the_module_has_exactly_four_roles(module: Module) -> None:
    assert set(module.of_type("aws_iam_role")) == {"execution", "task", "plan", "apply"}
    for name, role in module.of_type("aws_iam_role").items():
        assert "inline_policy" not in role and "managed_policy_arns" not in role, name
    assert not module.of_type("aws_iam_policy_attachment")
    assert not module.of_type("aws_iam_user") and not module.of_type("aws_iam_access_key")


def test_the_bots_task_role_holds_no_permission_at_all(module: Module) -> None:
    """The bot runs no terraform: its task role may not even assume the phase roles."""
    task = module.resources[("aws_ecs_task_definition", "this")]
    assert task["task_role_arn"] == ref("aws_iam_role.task.arn")
    assert policies_of_role(module, "task") == ([], [])
    assert not any(key.startswith("DEPLOYBOT_AWS__") for key in module.locals["base_environment"])


@pytest.mark.parametrize("role", ["plan", "apply"])
def test_phase_roles_are_the_task_roles_of_their_runners_and_of_nothing_else(module: Module, role: str) -> None:
    trust = module.resources[("aws_iam_role", role)]["assume_role_policy"]
    assert trust == ref("data.aws_iam_policy_document.task_trust.json")
    statement = one(policy_document(module, trust)["statement"])
    assert statement["principals"] == [{"type": "Service", "identifiers": ["ecs-tasks.amazonaws.com"]}]
    assert {c["variable"] for c in statement["condition"]} == {"aws:SourceAccount", "aws:SourceArn"}
    assert module.locals["runner_pools"][role]["role_arn"] == ref(f"aws_iam_role.{role}.arn")
    runner = module.resources[("aws_ecs_task_definition", "runner")]
    assert runner["for_each"] == ref("local.runner_pools") and runner["task_role_arn"] == ref("each.value.role_arn")
    # Nothing else is given the role: only the apply role's guardrails name it (to deny changing it).
    named_by = [key for key, body in [*module.resources.items(), *module.data.items()]
                if f"aws_iam_role.{role}.arn" in str(body)]
    assert named_by == [("aws_iam_policy_document", "apply_guardrails")]


def test_runners_run_one_job_each_in_a_locked_down_private_task(module: Module) -> None:
    container = module.resources[("aws_ecs_task_definition", "runner")]["container_definitions"]
    for part in ('"--once"', '"--sandbox", "none"', "readonlyRootFilesystem = true", 'drop = ["ALL"]',
                 'user = "${local.uid}:${local.uid}"', "DEPLOYBOT_RUNNER_TOKEN",
                 "aws_secretsmanager_secret.runner_token[each.key].arn"):
        assert part in container, part
    assert container.count("valueFrom") == 1  # its pool's token, and no other secret
    assert "DEPLOYBOT_GITHUB" not in container and "DEPLOYBOT_GITLAB" not in container
    service = module.resources[("aws_ecs_service", "runner")]
    network = one(service["network_configuration"])
    assert network["assign_public_ip"] is False and network["subnets"] == ref("var.private_subnet_ids")
    assert service["enable_execute_command"] is False
    assert not [rule for rule in module.of_type("aws_vpc_security_group_ingress_rule").values()
                if rule["security_group_id"] == ref("aws_security_group.runner.id")]  # nothing comes in


def test_plan_role_is_read_only_and_denied_secret_values(module: Module) -> None:
    assert module.locals["plan_role_policy_arns"].endswith(':iam::aws:policy/ReadOnlyAccess"]}')
    inline, attached = policies_of_role(module, "plan")
    assert [a["policy_arn"] for a in attached] == ["${local.plan_role_policy_arns[count.index]}"]
    document = policy_document(module, one(inline)["policy"])
    denies = [s for s in statements(document) if s.get("effect") == "Deny"]
    assert one(denies)["actions"] == ref("var.plan_role_denied_actions") and one(denies)["resources"] == ["*"]
    assert "secretsmanager:GetSecretValue" in module.variables["plan_role_denied_actions"]["default"]
    # What it may do beyond read-only: state lock items, on the tables and lock files given.
    allows = [s for s in statements(document) if s.get("effect", "Allow") == "Allow"]
    assert {s["sid"]: s["resources"] for s in allows} == {
        "TakeTheStateLock": ref("var.state_lock_table_arns"),
        "TakeTheStateLockFile": ref("var.state_lockfile_arns"),
    }
    for statement in allows:
        assert all(re.fullmatch(r"(dynamodb|s3):(Describe|Get|Put|Delete)\w+", a) for a in statement["actions"])


def test_apply_role_gets_the_given_policies_and_never_deploybot_itself(module: Module) -> None:
    inline, attached = policies_of_role(module, "apply")
    assert [a["policy_arn"] for a in attached] == ["${var.apply_role_policy_arns[count.index]}"]
    assert "default" not in module.variables["apply_role_policy_arns"]
    document = policy_document(module, one(inline)["policy"])
    assert all(s.get("effect") == "Deny" for s in statements(document))
    by_sid = {s["sid"]: s for s in statements(document)}
    roles = by_sid["LeaveDeploybotsRolesAlone"]
    assert roles["actions"] == ["iam:*"]
    assert set(roles["resources"]) == {ref(f"aws_iam_role.{r}.arn") for r in ("execution", "task", "plan", "apply")}
    assert by_sid["LeaveDeploybotsSecretsAlone"]["resources"] == ref("local.module_secret_arns")


def test_execution_role_reads_only_the_containers_secrets(module: Module) -> None:
    inline, attached = policies_of_role(module, "execution")
    assert attached == []
    by_sid = {s["sid"]: s for s in statements(policy_document(module, one(inline)["policy"]))}
    resources = by_sid["ReadTheContainersSecrets"]["resources"]
    assert 'local.container_secrets : arn if name != "PGPASSWORD"' in resources  # its ARN, not its key path
    assert "[local.database_secret_arn]" in resources and "aws_secretsmanager_secret.runner_token" in resources
    assert by_sid["WriteLogs"]["resources"] == ["${aws_cloudwatch_log_group.this.arn}:*"]
    for sid, statement in by_sid.items():
        assert statement.get("effect", "Allow") == "Allow"
        if statement["resources"] == ["*"]:
            assert statement["actions"] == ["ecr:GetAuthorizationToken"], sid


# -- secrets, data, logs --------------------------------------------------------------------


def test_secrets_reach_the_container_only_through_ecs_secrets(module: Module) -> None:
    task = module.resources[("aws_ecs_task_definition", "this")]
    assert task["container_definitions"] == "${jsonencode([local.container])}"
    container = module.locals["container"]
    assert container["environment"] == (
        "${[for name in sort(keys(local.environment)) : {name = name, value = local.environment[name]}]}")
    assert container["secrets"] == ("${[for name in sort(keys(local.container_secrets)) : "
                                    "{name = name, valueFrom = local.container_secrets[name]}]}")
    assert "healthCheck" not in container  # a health check process would hold the secrets too

    # The environment is made of these literal maps and the user's validated extra_environment.
    parts = re.findall(r"(local|var)\.(\w+)", module.locals["environment"])
    assert {f"{a}.{b}" for a, b in parts} == {"local.base_environment", "local.github_environment",
                                                "local.gitlab_environment", "var.github_app_id",
                                                "var.gitlab_enabled", "var.extra_environment"}
    for name in ("base_environment", "github_environment", "gitlab_environment"):
        for key in module.locals[name]:
            assert not SECRET_NAME.search(key), f"{key} looks like a secret: put it in secrets"
    guard = one(module.variables["extra_environment"]["validation"])["condition"]
    assert "SECRET|TOKEN" in guard and "PRIVATE_KEY" in guard

    # Every secret the bot reads is a Secrets Manager secret, under the config field's variable.
    envs = {spec["env"] for spec in module.locals["secret_specs"].values()}
    assert envs == {"DEPLOYBOT_GITHUB__PRIVATE_KEY", "DEPLOYBOT_GITHUB__WEBHOOK_SECRET", "DEPLOYBOT_GITLAB__TOKEN",
                    "DEPLOYBOT_GITLAB__WEBHOOK_SECRET", "DEPLOYBOT_SLACK__SIGNING_SECRET",
                    "DEPLOYBOT_SLACK__WEBHOOK_URL"}
    assert "aws_secretsmanager_secret.this[key].arn" in module.locals["container_secrets"]
    # Values are put in by hand, so they never land in Terraform state.
    assert not module.of_type("aws_secretsmanager_secret_version")


def test_secret_environment_names_are_config_fields() -> None:
    from bot.config import SECTIONS

    for env in ("DEPLOYBOT_GITHUB__PRIVATE_KEY", "DEPLOYBOT_GITHUB__WEBHOOK_SECRET", "DEPLOYBOT_GITLAB__TOKEN",
                "DEPLOYBOT_GITLAB__WEBHOOK_SECRET", "DEPLOYBOT_SLACK__SIGNING_SECRET", "DEPLOYBOT_SLACK__WEBHOOK_URL"):
        section, field_name = env.removeprefix("DEPLOYBOT_").lower().split("__")
        assert field_name in SECTIONS[section].__dataclass_fields__, env


def test_the_task_environment_is_a_config_deploybot_accepts(module: Module) -> None:
    """Every variable the module sets, plain and secret, names a config field (no silent typo)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from bot.config import load_config

    samples = {"PORT": "8080", "APP_ID": "123456", "POOLS": '{"plan": "plan", "apply": "apply"}',
               "DATABASE_URL": "postgresql://deploybot@db.internal:5432/deploybot?sslmode=require",
               "DATA_DIR": "/var/lib/deploybot", "REGION": "eu-west-1", "POLICY_FILE": "/etc/deploybot/policy.yaml"}
    environ: dict[str, str] = {}
    for name in ("base_environment", "github_environment", "gitlab_environment"):
        for key, value in module.locals[name].items():
            role = re.fullmatch(r"\$\{aws_iam_role\.(\w+)\.arn\}", str(value))
            if role:
                value = f"arn:aws:iam::123456789012:role/deploybot-{role[1]}"
            elif isinstance(value, str) and "${" in value:
                value = next((v for suffix, v in samples.items() if key.endswith(suffix)), "https://deploybot.test")
            environ[key] = str(value)
    pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    ).decode()
    for spec in module.locals["secret_specs"].values():
        environ[spec["env"]] = pem if spec["env"].endswith("PRIVATE_KEY") else "a-secret-value"

    config = load_config(None, environ=environ)

    assert config.github.enabled and config.gitlab.enabled
    assert config.github.private_key.reveal().strip() == pem.strip()
    assert config.server.data_dir == Path("/var/lib/deploybot")
    assert config.runners.pools == {"plan": "plan", "apply": "apply"}
    assert str(config.server.database).startswith("postgresql://")
    assert (config.aws.plan_role_arn, config.aws.apply_role_arn) == ("", "")  # the bot assumes no role
    assert config.policy_file == Path("/etc/deploybot/policy.yaml")


def test_the_store_is_an_encrypted_private_postgresql_reached_only_by_the_task(module: Module) -> None:
    db = module.resources[("aws_db_instance", "this")]
    assert db["engine"] == "postgres" and db["storage_encrypted"] is True and db["publicly_accessible"] is False
    assert db["manage_master_user_password"] is True and "password" not in db  # RDS keeps it in Secrets Manager
    assert db["vpc_security_group_ids"] == [ref("aws_security_group.db.id")]
    assert db["skip_final_snapshot"] is False and db["backup_retention_period"] == ref("var.db_backup_retention_days")
    assert [r["referenced_security_group_id"] for r in _ingress(module, "db")] == [ref("aws_security_group.task.id")]
    # The bot reaches it by URL with TLS required; the password comes as libpq's PGPASSWORD, from the secret.
    url = module.locals["base_environment"]["DEPLOYBOT_SERVER__DATABASE_URL"]
    assert url.startswith("postgresql://") and url.endswith("?sslmode=require") and "password" not in url
    assert module.locals["container_secrets"].count("PGPASSWORD") == 1
    assert "${local.database_secret_arn}:password::" in module.locals["container_secrets"]
    # No file system holds the store any more: the task's own storage keeps only caches.
    assert not module.of_type("aws_efs_file_system")
    volume = next(v for v in module.resources[("aws_ecs_task_definition", "this")]["volume"] if v["name"] == "data")
    assert set(volume) == {"name"}
    mount = next(m for m in module.locals["container"]["mountPoints"] if m["sourceVolume"] == "data")
    assert mount["containerPath"] == ref("local.data_dir")


def test_logs_are_kept_for_a_set_time(module: Module) -> None:
    group = module.resources[("aws_cloudwatch_log_group", "this")]
    assert group["retention_in_days"] == ref("var.log_retention_days")
    assert module.variables["log_retention_days"]["default"] > 0
    logging = module.locals["container"]["logConfiguration"]
    assert logging["logDriver"] == "awslogs"
    assert logging["options"]["awslogs-group"] == ref("aws_cloudwatch_log_group.this.name")


def test_container_runs_as_the_images_user_on_a_read_only_root(module: Module) -> None:
    container = module.locals["container"]
    assert container["readonlyRootFilesystem"] is True
    assert container["linuxParameters"] == {"capabilities": {"drop": ["ALL"]}}
    assert container["user"] == "${local.uid}:${local.uid}"
    assert f"USER {module.locals['uid']}:{module.locals['uid']}" in DOCKERFILE.read_text()


# -- the Dockerfile -------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") and not pending:
            continue
        if line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip():
            keyword, _, rest = pending.strip().partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    return instructions


def _args(kind: str) -> list[str]:
    return [rest for keyword, rest in dockerfile() if keyword == kind]


def _arg_defaults() -> dict[str, str]:
    defaults = {}
    for rest in _args("ARG"):
        name, _, value = rest.partition("=")
        defaults[name] = value
    return defaults


def test_image_runs_as_a_non_root_user() -> None:
    user = _args("USER")[-1]
    assert user.split(":")[0] not in ("root", "0")
    assert re.fullmatch(r"\d+:\d+", user), "a numeric user, so Kubernetes/ECS can verify runAsNonRoot"


def test_image_starts_deploybot_serve_with_a_health_check() -> None:
    entrypoint = json.loads(_args("ENTRYPOINT")[-1])
    command = json.loads(_args("CMD")[-1])
    assert entrypoint + command == ["deploybot", "serve"]
    healthcheck = _args("HEALTHCHECK")[-1]
    assert "/healthz" in healthcheck and "CMD" in healthcheck


def test_image_is_small_and_python_3_11() -> None:
    assert _arg_defaults()["PYTHON_IMAGE"].startswith("python:3.11-slim")
    stages = [rest.split()[0] for rest in _args("FROM")]
    assert stages == ["${PYTHON_IMAGE}"] * 3
    assert "@sha256:" in DOCKERFILE.read_text(), "say how to pin the base image by digest"


def test_terraform_is_pinned_and_verified_before_use() -> None:
    defaults = _arg_defaults()
    assert re.fullmatch(r"\d+\.\d+\.\d+", defaults["TERRAFORM_VERSION"])
    sums = {name: value for name, value in defaults.items() if name.startswith("TERRAFORM_SHA256_")}
    assert set(sums) == {"TERRAFORM_SHA256_AMD64", "TERRAFORM_SHA256_ARM64"}
    assert all(re.fullmatch(r"[0-9a-f]{64}", value) for value in sums.values())
    run = next(rest for rest in _args("RUN") if "releases.hashicorp.com" in rest)
    assert "https://releases.hashicorp.com/terraform/${TERRAFORM_VERSION}/" in run
    assert run.startswith("set -eu;")  # any failing step fails the build
    check = run.index("sha256sum -c")
    assert run.index("urlretrieve") < check < run.index("zipfile -e") < run.index("install -m 0755")


def test_image_environment_holds_no_secret() -> None:
    names: list[str] = []
    for rest in _args("ENV"):
        for item in shlex.split(rest):
            name, _, value = item.partition("=")
            names.append(name)
            assert "PRIVATE KEY" not in value
    names += list(_arg_defaults())
    assert "DEPLOYBOT_SERVER__DATA_DIR" in names
    for name in names:
        assert not SECRET_NAME.search(name), f"{name} looks like a secret baked into the image"


def test_build_context_is_an_allow_list() -> None:
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().split("\n")
    rules = [line.strip() for line in ignore if line.strip() and not line.startswith("#")]
    assert rules[0] == "*"
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "bot", "handlers", "policies"}
    copied = {part for rest in _args("COPY") if not rest.startswith("--from") for part in rest.split()[:-1]}
    assert copied <= allowed
