"""Runners apart from the bot: real `deploybot runner` processes, the real bot, real terraform (issue 13).

Each world declares two pools, `plans` and `applies`, and sends both phases of every
project to them; the bot then runs no terraform itself.
"""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx
import pytest

from bot.jobs.terraform import find_terraform
from bot.runners.pools import pack_checkout
from bot.runners.runner import RunnerError, UnpackError, check_server_url, unpack_checkout
from bot.sandbox.trial import wait_for
from tests.world import World, staging_change, visible

POOLS = {"plans": "plan", "applies": "apply"}
ADMIN_TOKEN = "admin-token-of-the-runner-tests"


def pooled_world(make_world, lease_seconds: float = 3) -> World:
    projects = [{"name": name, "dir": name, "pools": {"plan": "plans", "apply": "applies"}}
                for name in ("staging", "production")]
    return make_world({"projects": projects},
                      extra_config={"runners": {"pools": POOLS, "lease_seconds": lease_seconds,
                                                "claim_wait_seconds": 2},
                                    "server": {"admin_token": ADMIN_TOKEN}})


def token_cli(world: World, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bot.cli", "runner-token", *args, "--server", world.url],
                          capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "DEPLOYBOT_ADMIN_TOKEN": ADMIN_TOKEN})


def make_token(world: World, pool: str) -> str:
    done = token_cli(world, "create", "--pool", pool)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


class Runner:
    """A `deploybot runner` process of one pool, its log in a file."""

    def __init__(self, world: World, pool: str, name: str, token: str | None = None, once: bool = False) -> None:
        self.log = world.root / f"runner-{name}.log"
        token_file = world.root / f"token-{name}"
        token_file.write_text(token or make_token(world, pool))
        mirror = world.root / "terraform-mirror"
        args = [sys.executable, "-m", "bot.cli", "runner", "--server", world.url, "--token-file", str(token_file),
                "--pool", pool, "--name", name, "--terraform", find_terraform(),
                "--cli-config-file", str(mirror / "terraformrc"), "--sandbox-read-only", str(mirror),
                "--sandbox-read-write", str(world.state_dir), "--work-dir", str(world.root)]
        self.process = subprocess.Popen(args + (["--once"] if once else []), stdout=subprocess.DEVNULL,
                                        stderr=open(self.log, "ab"))

    def said(self) -> str:
        return self.log.read_text()

    def wait_said(self, text: str, timeout: float = 60) -> None:
        wait_for(lambda: text in self.said(), timeout, f"the runner to say {text!r}")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


@pytest.fixture
def runners():
    started: list[Runner] = []
    yield started
    for runner in started:
        runner.stop()


def test_two_runners_carry_a_pull_request_from_plan_to_apply(make_world, runners) -> None:
    world = pooled_world(make_world)
    runners += [Runner(world, "plans", "planner"), Runner(world, "applies", "applier")]
    number = world.open_pr("resize", staging_change(world))
    plan = visible(world.wait_comment(number, "**deploybot plan**"))
    assert "✅ `staging`: +" in plan and "(plan `" in plan
    world.forge.approve(number, "dave")
    world.comment(number, "bob", "deploybot apply")
    applied = visible(world.wait_comment(number, "**deploybot apply**"))
    assert "✅ `staging`: applied plan" in applied
    assert world.state_resources("staging") > 0
    planner, applier = (runner.said() for runner in runners)
    assert "(plan): claimed" in planner and "(apply)" not in planner
    assert "(apply): claimed" in applier and "(plan)" not in applier
    # The bot ran no terraform itself: no working dir of its own has a `.terraform`.
    assert not list((world.root / "data" / "work").rglob(".terraform"))
    # The runners streamed terraform's output into the jobs' logs (what the run log API serves).
    logs = world.job_logs().values()
    assert any("Plan: " in text for text in logs) and any("Apply complete!" in text for text in logs)


def test_bad_and_revoked_tokens_get_401_and_a_runner_never_claims_another_pool(make_world) -> None:
    world = pooled_world(make_world)
    claim = f"{world.url}/api/v1/runners/claim"
    for headers in ({}, {"Authorization": "Bearer dbr_made-up"}, {"Authorization": "Basic x"}):
        assert httpx.post(claim, json={"pool": "plans"}, headers=headers, timeout=10).status_code == 401
    token = make_token(world, "plans")
    bearer = {"Authorization": f"Bearer {token}"}
    assert httpx.post(claim, json={"pool": "applies"}, headers=bearer, timeout=10).status_code == 403
    assert httpx.post(claim, json={"pool": "plans"}, headers=bearer, timeout=10).status_code == 204  # the long poll
    listed = token_cli(world, "list").stdout
    token_id = listed.split()[0]
    assert token not in listed and "plans" in listed and "active" in listed
    assert token_cli(world, "revoke", token_id).returncode == 0
    assert token_cli(world, "revoke", token_id).returncode == 1  # once
    # Tokens are the admin's to make: without the admin token, nothing.
    tokens = f"{world.url}/api/v1/runner-tokens"
    assert httpx.post(tokens, json={"pool": "plans"}, headers=bearer, timeout=10).status_code == 401
    assert httpx.get(tokens, timeout=10).status_code == 401
    assert httpx.post(claim, json={"pool": "plans"}, headers=bearer, timeout=10).status_code == 401
    # A runner holding the revoked token stops with the reason, and exit code 2.
    runner = Runner(world, "plans", "revoked", token=token)
    assert runner.process.wait(60) == 2
    assert "401" in runner.said() and token not in runner.said()
    with pytest.raises(RunnerError, match="https"):
        check_server_url("http://deploybot.example.com")


def test_a_plan_pool_runner_never_gets_an_apply_job(make_world, runners) -> None:
    world = pooled_world(make_world)
    runners.append(Runner(world, "plans", "planner"))
    number = world.open_pr("resize", staging_change(world))
    world.wait_comment(number, "**deploybot plan**")
    world.forge.approve(number, "dave")
    world.comment(number, "bob", "deploybot apply")
    time.sleep(6)  # the apply waits for its pool; the plan runner polls all the while
    assert "(apply)" not in runners[0].said() and world.state_resources("staging") == 0
    runners.append(Runner(world, "applies", "applier", once=True))
    assert "✅ `staging`: applied" in visible(world.wait_comment(number, "**deploybot apply**"))
    assert runners[1].process.wait(60) == 0  # --once: exits after its one job


def test_a_runner_killed_mid_plan_is_replaced_and_mid_apply_is_reported_interrupted(make_world, runners) -> None:
    world = pooled_world(make_world)
    first = Runner(world, "plans", "first")
    runners.append(first)
    number = world.open_pr("resize", staging_change(world))
    first.wait_said("(plan): claimed")
    first.kill()  # terraform is at work: --die-with-parent takes the sandbox down with it
    runners.append(Runner(world, "plans", "second"))
    plan = visible(world.wait_comment(number, "**deploybot plan**"))
    assert "✅ `staging`: +" in plan
    assert "(plan): claimed" in runners[1].said()

    applier = Runner(world, "applies", "doomed")
    runners.append(applier)
    world.forge.approve(number, "dave")
    world.comment(number, "bob", "deploybot apply")
    applier.wait_said("(apply): claimed")
    applier.kill()
    applied = visible(world.wait_comment(number, "**deploybot apply**"))
    assert "was not re-run" in applied and "went silent" in applied
    store = world.store()
    assert store.locks_for_pull(store.run_jobs(1)[0].run.repo, number), "the lock is kept for a human"


def test_a_checkout_travels_whole_and_a_hostile_tarball_stays_in_its_dir(tmp_path: Path) -> None:
    source = tmp_path / "source"
    (source / ".git").mkdir(parents=True)
    (source / ".git" / "config").write_text("[core]\n")
    (source / "staging" / ".terraform").mkdir(parents=True)
    (source / "staging" / "main.tf").write_text("# code\n")
    (source / "staging" / "shared.tf").symlink_to("../modules/shared.tf")
    (source / "modules").mkdir()
    (source / "modules" / "shared.tf").write_text("# shared\n")
    dest = tmp_path / "dest"
    unpack_checkout(pack_checkout(source), dest)
    assert (dest / "staging" / "shared.tf").read_text() == "# shared\n"
    assert not (dest / ".git").exists() and not (dest / "staging" / ".terraform").exists()
    (source / "staging" / "escape.tf").symlink_to("/etc/passwd")
    unpack_checkout(pack_checkout(source), tmp_path / "dest2")  # the bot leaves a link out behind
    assert not (tmp_path / "dest2" / "staging" / "escape.tf").exists()
    # A tarball made to escape (not by the bot) is refused whole, whatever the Python's tarfile would do.
    for n, entries in enumerate(([("link", "sym", "/etc")], [("../outside.tf", "file", "")],
                                 [("x", "sym", "../.."), ("y", "sym", "x/etc")],
                                 [("d", "sym", "."), ("d/then-through.tf", "file", "")],
                                 [("hard", "link", "staging/main.tf")])):
        with pytest.raises(UnpackError):
            unpack_checkout(hostile_tarball(entries), tmp_path / f"hostile-{n}")
    assert not (tmp_path / "outside.tf").exists()


def hostile_tarball(entries: list[tuple[str, str, str]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, kind, target in entries:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = 2
                archive.addfile(info, io.BytesIO(b"x\n"))
                continue
            info.type = tarfile.SYMTYPE if kind == "sym" else tarfile.LNKTYPE
            info.linkname = target
            archive.addfile(info)
    return buffer.getvalue()
