"""Each terraform job in a bubblewrap sandbox: what a job can see, write and reach (issue 13).

The attacker is code that runs in a job: a provider, `data "external"`, a provisioner, or
terraform functions like `file()` and `fileset()`. Each attack runs for real through
bubblewrap, next to a positive control: the same attack without the sandbox reaches the
bot's files, which is what every pull request could do before.
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from bot.jobs.sandbox import JOB_UID, JobFiles, Sandbox, SandboxError
from bot.jobs.terraform import Terraform, make_null_provider_mirror
from tests.world import World, staging_change, visible

if shutil.which("bwrap") is None:
    if os.environ.get("CI") == "true":
        raise RuntimeError("bubblewrap is missing: CI must install it (scripts/prepare-host)")
    pytest.skip("bubblewrap is not installed (scripts/prepare-host)", allow_module_level=True)


def bot_disk(tmp_path: Path) -> dict[str, Path]:
    """A data dir like the bot's: a store, secrets, another pull request's checkout and plan."""
    data = tmp_path / "data"
    paths = {
        "store": data / "deploybot.db",
        "secret": tmp_path / "etc" / "webhook-secret",
        "config": tmp_path / "etc" / "config.yaml",
        "other_checkout": data / "work" / "acme_infra_staging" / "pr-2" / "main.tf",
        "other_plan": data / "plans" / "acme_infra_staging" / "pr-2-abc-job7.tfplan",
        "log": data / "logs" / "job-7.log",
    }
    for name, path in paths.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{name} of the bot\n")
    checkout = data / "work" / "acme_infra_staging" / "pr-1"
    (checkout / ".git").mkdir(parents=True)
    (checkout / ".git" / "config").write_text("[core]\n")
    (checkout / "main.tf").write_text("# the job's own code\n")
    scratch = data / "jobs" / "job-8"
    scratch.mkdir(parents=True)
    paths["files"] = JobFiles(checkout=checkout, scratch=scratch)  # type: ignore[assignment]
    return paths


def run_in(sandbox: Sandbox, files: JobFiles, script: str, env: dict[str, str] | None = None,
           ) -> subprocess.CompletedProcess:
    sandbox.hand_over(files)
    argv = sandbox.command(["/bin/sh", "-c", script], files, files.checkout)
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=files.checkout,
                          env={"PATH": "/usr/bin:/bin", **(env or {})})


READ_EVERYTHING = """
cat {store} {secret} {config} {other_checkout} {other_plan} {log} 2>/dev/null
echo "own code: $(cat main.tf)"
"""


@pytest.mark.parametrize("kind", ["bubblewrap", "none"])
def test_a_job_reads_none_of_the_bots_files(tmp_path: Path, kind: str) -> None:
    paths = bot_disk(tmp_path)
    files = paths.pop("files")
    result = run_in(Sandbox(kind), files, READ_EVERYTHING.format(**paths))
    assert "own code: # the job's own code" in result.stdout  # the job has its own files either way
    leaked = [name for name in paths if f"{name} of the bot" in result.stdout]
    if kind == "bubblewrap":
        assert leaked == [], result.stdout
    else:  # positive control: this is what every job could read before
        assert sorted(leaked) == sorted(paths)


@pytest.mark.parametrize("kind", ["bubblewrap", "none"])
def test_a_job_writes_nothing_outside_its_own_dirs(tmp_path: Path, kind: str) -> None:
    paths = bot_disk(tmp_path)
    files = paths.pop("files")
    script = (" ".join(f"echo pwned >> {path} 2>/dev/null;" for path in paths.values())
              + " echo '[core] fsmonitor = touch /tmp/owned' >> .git/config 2>/dev/null;"
              + " echo planned > $HOME/plan.tfplan && echo own-scratch-ok; echo x > new.tf && echo own-checkout-ok")
    result = run_in(Sandbox(kind), files, script, {"HOME": str(files.scratch)})
    assert "own-scratch-ok" in result.stdout and "own-checkout-ok" in result.stdout, result.stderr
    changed = [name for name, path in paths.items() if "pwned" in path.read_text()]
    git_config_changed = "fsmonitor" in (files.checkout / ".git" / "config").read_text()
    if kind == "bubblewrap":
        assert changed == [] and not git_config_changed
    else:
        assert sorted(changed) == sorted(paths) and git_config_changed


def test_jobs_see_no_other_process_and_no_other_jobs_environment(tmp_path: Path) -> None:
    """While one job runs with apply credentials, another job lists /proc and reads every environ."""
    sandbox = Sandbox("bubblewrap")
    first = bot_disk(tmp_path / "a")["files"]
    second = bot_disk(tmp_path / "b")["files"]
    sandbox.hand_over(first)
    sandbox.hand_over(second)
    apply = subprocess.Popen(sandbox.command(["/bin/sleep", "30"], first, first.checkout),
                             env={"PATH": "/usr/bin:/bin", "AWS_SECRET_ACCESS_KEY": "apply-role-secret-1234"})
    try:
        spy = subprocess.run(
            sandbox.command(["/bin/sh", "-c", "ls /proc | grep -c '^[0-9]'; cat /proc/*/environ | tr '\\0' '\\n'"],
                            second, second.checkout),
            capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
        # Positive control: from the bot's side, the other job's environment is there to steal.
        unconfined = subprocess.run(["/bin/sh", "-c", "cat /proc/*/environ 2>/dev/null | tr '\\0' '\\n'"],
                                    capture_output=True, text=True, timeout=60)
    finally:
        apply.kill()
        apply.wait()
    assert "apply-role-secret-1234" in unconfined.stdout
    assert "apply-role-secret-1234" not in spy.stdout
    assert int(spy.stdout.splitlines()[0]) <= 4  # bubblewrap's init, sh, ls, grep: nothing of the host


def test_a_data_dir_reached_through_a_symlink_is_the_same_place_inside(tmp_path: Path) -> None:
    (tmp_path / "disk").mkdir()
    (tmp_path / "data").symlink_to(tmp_path / "disk")
    files = JobFiles(checkout=tmp_path / "data" / "work", scratch=tmp_path / "data" / "scratch")
    files.checkout.mkdir()
    files.scratch.mkdir()
    (files.checkout / "main.tf").write_text("# code\n")
    script = f"cat {files.checkout}/main.tf {tmp_path / 'disk' / 'work' / 'main.tf'} && echo x > {files.scratch}/out"
    result = run_in(Sandbox("bubblewrap"), files, script)
    assert result.stdout == "# code\n# code\n", result.stderr
    assert (tmp_path / "disk" / "scratch" / "out").read_text() == "x\n"
    with pytest.raises(SandboxError, match="do not exist"):
        Sandbox("bubblewrap", read_only=(tmp_path / "no-such-mirror",)).check()


@pytest.mark.skipif(os.geteuid() != 0, reason="only a bot running as root hands jobs to another uid")
def test_a_bot_running_as_root_runs_jobs_as_nobody_without_capabilities(tmp_path: Path) -> None:
    files = bot_disk(tmp_path)["files"]
    result = run_in(Sandbox("bubblewrap"), files, "id -u; grep -E '^Cap(Eff|Prm|Bnd)' /proc/self/status; "
                    "stat -c %u main.tf .git/config")
    lines = result.stdout.split()
    assert lines[0] == str(JOB_UID)
    assert all(value == "0000000000000000" for value in lines[2:7:2])
    assert lines[-2:] == [str(JOB_UID), "0"]  # the job's files are its own, `.git` stays the bot's


def test_real_terraform_plans_and_applies_in_the_sandbox(terraform: Terraform, tf_settings, tmp_path: Path) -> None:
    """Positive control: init, plan, and apply of a saved plan, all through bubblewrap."""
    import dataclasses

    cli_config = make_null_provider_mirror(tmp_path / "mirror")  # readable by the job's uid
    state = tmp_path / "state"
    sandbox = Sandbox("bubblewrap", read_only=(cli_config.parent,), read_write=(state,))
    sandbox.share()
    confined = Terraform(dataclasses.replace(tf_settings, sandbox=sandbox, cli_config_file=cli_config))
    files = bot_disk(tmp_path)["files"]
    (files.checkout / "main.tf").write_text(
        f'terraform {{\n  backend "local" {{ path = "{state}/s.tfstate" }}\n}}\n'
        'resource "null_resource" "a" {}\n')
    sandbox.hand_over(files)
    env = {"HOME": str(files.scratch)}

    async def story() -> tuple:
        init = await confined.init(files.checkout, env, files=files)
        plan = await confined.plan(files.checkout, files.scratch / "plan.tfplan", env, files=files)
        apply = await confined.apply(files.checkout, files.scratch / "plan.tfplan", env, files=files)
        return init, plan, apply

    init, plan, apply = asyncio.run(story())
    assert init.ok, init.output
    assert plan.exit_code == 2, plan.output
    assert apply.ok and "1 added" in apply.output, apply.output
    assert (state / "s.tfstate").is_file()
    with pytest.raises(Exception, match="sandbox"):
        asyncio.run(confined.plan(files.checkout, files.scratch / "plan.tfplan", env))  # no job named


def test_serve_refuses_to_start_without_bubblewrap_and_says_how_to_fix_it(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"server:\n  data_dir: {tmp_path / 'data'}\npolicy_file: {tmp_path / 'policy.yaml'}\n")
    (tmp_path / "policy.yaml").write_text("repos: {}\n")
    done = subprocess.run([sys.executable, "-m", "bot.cli", "serve", "--config", str(config)],
                          capture_output=True, text=True, timeout=60, env={"PATH": str(tmp_path)})
    assert done.returncode == 2
    assert "bubblewrap" in done.stderr and "apt-get install bubblewrap" in done.stderr
    assert "terraform.sandbox: none" in done.stderr and "Traceback" not in done.stderr
    with pytest.raises(SandboxError, match="not installed"):
        Sandbox("bubblewrap", bwrap="no-such-bwrap").check()


def test_sandbox_none_is_a_warning_at_start_and_in_readyz(make_world, caplog) -> None:
    confined = make_world()
    assert httpx.get(f"{confined.url}/readyz").json()["sandbox"] == "bubblewrap"
    with caplog.at_level("WARNING"):
        unconfined = make_world(sandbox="none")
    ready = httpx.get(f"{unconfined.url}/readyz").json()
    assert ready["sandbox"] == "none" and "not confined" in ready["warning"]
    assert any("terraform.sandbox is none" in r.getMessage() for r in caplog.records)


def secret_reading_change(world: World) -> dict[str, str]:
    """A pull request whose plan posts the bot's secret files, store and processes (base64, past redaction)."""
    config = world.config_path
    data = world.root / "data"
    secret_files = sorted(str(p) for p in world.root.iterdir() if p.is_file() and p.suffix in ("", ".pem", ".key"))
    targets = [str(config), *secret_files]
    change = staging_change(world)
    change["staging/steal.tf"] = (
        "output \"stolen\" {\n"
        f"  value = [for f in {_hcl_list(targets)} : base64encode(file(f)) if fileexists(f)]\n"
        "}\n"
        "output \"store\" {\n"
        f"  value = fileset(\"{data}\", \"*.sqlite3\")\n"
        "}\n"
        "output \"processes\" {\n"
        "  value = [for f in fileset(\"/proc\", \"*/cmdline\") : replace(file(\"/proc/${f}\"), \"\\u0000\", \" \")]\n"
        "}\n")
    return change


def _hcl_list(items: list[str]) -> str:
    return "[" + ", ".join(f'"{item}"' for item in items) + "]"


@pytest.mark.parametrize("sandbox", ["bubblewrap", "none"])
def test_a_pull_requests_plan_posts_none_of_the_bots_secrets(make_world, sandbox: str) -> None:
    world = make_world(in_process=False, sandbox=sandbox)
    number = world.open_pr("steal", secret_reading_change(world))
    comment = visible(world.wait_comment(number, "staging"))
    config_b64 = base64.b64encode(world.config_path.read_bytes()).decode()
    if sandbox == "bubblewrap":
        assert "Plan:" in comment or "+" in comment  # the plan itself ran
        assert config_b64 not in comment
        assert "deploybot.sqlite3" not in comment
        assert "bot.cli" not in comment  # the bot's own process is not there
    else:  # positive control: without the sandbox the pull request posts the config and sees the bot
        assert config_b64[:40] in comment
        assert "deploybot.sqlite3" in comment and "bot.cli serve" in comment


@pytest.mark.parametrize("sandbox", ["bubblewrap", "none"])
def test_an_apply_provisioner_cannot_touch_the_store_or_another_pull_requests_plan(make_world, sandbox: str) -> None:
    """An approved apply runs code (local-exec); it must not reach the store, where another PR's plan waits."""
    world = make_world(sandbox=sandbox)
    victim = world.open_pr("victim", staging_change(world, "medium"))
    world.wait_comment(victim, "staging")
    data = world.root / "data"
    store_file = data / "deploybot.sqlite3"
    hostile = {"production/evil.tf": (
        'resource "null_resource" "evil" {\n'
        '  provisioner "local-exec" {\n'
        f'    command = "ls {data} 2>&1 | sed s/^/LISTED-/; test -w {store_file} && echo $((6*7))-WRITABLE;'
        ' echo $((40+2))-RAN"\n'
        '  }\n'
        '}\n')}
    attacker = world.open_pr("attacker", hostile)
    world.wait_comment(attacker, "production")
    world.forge.approve(attacker, "dave")
    world.comment(attacker, "bob", "deploybot apply -p production")
    applied = visible(world.wait_comment(attacker, "42-RAN"))
    if sandbox == "none":  # positive control: the provisioner could rewrite the store, plans and approvals included
        assert "42-WRITABLE" in applied and "LISTED-deploybot.sqlite3" in applied
        return
    assert "42-WRITABLE" not in applied and "LISTED-deploybot.sqlite3" not in applied
    # The victim's plan still applies: its bytes and hash are intact.
    world.forge.approve(victim, "dave")
    world.comment(victim, "bob", "deploybot apply -p staging")
    assert "applied plan" in visible(world.wait_comment(victim, "applied plan"))


def test_files_a_job_leaves_never_hang_or_flood_the_bot(tmp_path: Path, terraform: Terraform) -> None:
    """A FIFO, a link or a huge file where the bot reads what terraform wrote: refused at once."""
    from bot.jobs.repo_guard import read_job_file

    (tmp_path / ".terraform").mkdir()
    os.mkfifo(tmp_path / ".terraform" / "environment")
    assert terraform._current_workspace(tmp_path, {}) == ""  # unknown, not a hang: terraform selects it
    (tmp_path / "secret").write_text("the bot's")
    (tmp_path / "link").symlink_to(tmp_path / "secret")
    (tmp_path / "big").write_bytes(b"x" * 1025)
    for name in ("link", "big"):
        with pytest.raises(OSError):
            read_job_file(tmp_path / name, 1024)
    assert read_job_file(tmp_path / "secret", 1024) == b"the bot's"


def test_a_job_no_runner_takes_fails_after_the_queue_time_and_frees_its_project(tmp_path: Path) -> None:
    from bot.jobs.executor import JobSpec
    from bot.runners.pools import RunnerPools
    from bot.store import Store

    pools = RunnerPools(Store(tmp_path / "store.sqlite3"), {"plans": "plan"}, lease_seconds=0.2,
                        claim_wait_seconds=0.1, queue_seconds=0.3)
    files = bot_disk(tmp_path)["files"]

    class Log:
        def write(self, data: bytes) -> int:
            return len(data)

    started = time.monotonic()
    result = asyncio.run(pools.executor("plans").execute(JobSpec(1, "plan", ".", "default", {}), files, Log()))
    assert "no runner of pool plans took the job" in result.failure and time.monotonic() - started < 5
