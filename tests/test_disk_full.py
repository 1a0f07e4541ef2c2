"""The disk of the data dir fills: a clear error on the pull request, locks kept right, the store intact.

The bot's data dir is a tmpfs of its own, mounted by these tests (they need root and a
kernel that lets them mount; elsewhere they are skipped and say why), and filled with a
filler file:

- a plan whose plan file is bigger than the room left fails on the pull request with
  "deploybot's disk is full" and terraform's own "no space left on device", keeps the
  lock, and plans again once there is room;
- a webhook that cannot be stored gets a 503 with a JSON error and Retry-After (not a
  500), and the same delivery sent again once there is room is accepted and handled;
- the worker and the dispatcher, meeting a store that cannot be written at all, wait for
  room instead of dying or dropping what they were recording, and carry on by
  themselves once it is there: nothing stuck `running`, every accepted delivery handled,
  the database intact;
- a bot killed while the disk is full starts again (no crash loop) and recovers once
  there is room.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bot.forges.github.webhook import sign
from bot.jobs.terraform import find_terraform
from bot.sandbox.forges import WEBHOOK_SECRET
from bot.sandbox.local_forge import Fault
from bot.sandbox.trial import wait_for
from bot.store import project_key
from tests.test_races import held_deliveries
from tests.world import World, staging_change

TMPFS_BYTES = 64 << 20

# 48 resources whose triggers hold ~90 kB of hashes each: a plan file of about 3 MB (terraform
# keeps the values, zipped) while the plan output stays short (the values are sensitive).
BULK_TF = """
resource "null_resource" "bulk" {
  count    = 48
  triggers = { blob = sensitive(join("", [for i in range(1000) : base64sha512("${count.index}-${i}")])) }
}
"""

# Terraform that waits before `plan` until the test opens the gate: the disk can then be
# filled while a job is under way, at a moment the test chooses.
GATED_TERRAFORM = """#!/bin/sh
if [ "$1" = plan ]; then
  touch {gate}/waiting
  while [ ! -e {gate}/open ]; do sleep 0.1; done
  rm -f {gate}/waiting
fi
exec {terraform} "$@"
"""


# -- the data dir on a small file system of its own ---------------------------------------------


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    """`tmp_path/data`, the world's data dir, as a tmpfs of TMPFS_BYTES; unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs for the data dir needs root")
    if shutil.which("mount") is None:
        pytest.skip("no mount command on this machine")
    path = tmp_path / "data"
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES},mode=0700", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        reason = (mounted.stderr.strip().splitlines() or [f"mount exited {mounted.returncode}"])[0]
        pytest.skip(f"cannot mount a tmpfs here: {reason}")
    try:
        yield path
    finally:
        # Lazily if something still holds a file there (a process the test could not stop):
        # the mount must never outlive the test.
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(path)], check=True)


def free_bytes(directory: Path) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


class Filler:
    """A file that takes the free space of the data dir's file system, all of it or all but some."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / "filler"

    def fill(self, leave: int = 0) -> None:
        with open(self.path, "ab", buffering=0) as f:
            while (room := free_bytes(self.directory) - leave) > 0:
                try:
                    f.write(b"\0" * min(room, 1 << 20))
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
        assert free_bytes(self.directory) <= leave

    def free(self) -> None:
        self.path.unlink()


@pytest.fixture
def filler(data_dir: Path) -> Filler:
    return Filler(data_dir)


# -- helpers ----------------------------------------------------------------------------------------


def post_delivery(world: World, delivery) -> httpx.Response:
    """Send a delivery the forge made to the bot ourselves, to read the whole answer."""
    return httpx.post(f"{world.url}/webhooks/github", content=delivery.body, timeout=30, headers={
        "X-GitHub-Event": delivery.event, "X-GitHub-Delivery": delivery.delivery_id,
        "X-Hub-Signature-256": sign(delivery.body, WEBHOOK_SECRET.encode()), "Content-Type": "application/json"})


def healthy(world: World) -> bool:
    return httpx.get(f"{world.url}/healthz", timeout=5).status_code == 200


def read_store(world: World) -> sqlite3.Connection:
    """A read-only look at the bot's database (it needs no room, so it works on a full disk too)."""
    db = sqlite3.connect(f"file:{world.root / 'data' / 'deploybot.sqlite3'}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    return db


def job_statuses(world: World) -> list[tuple[str, str]]:
    """(project key, status) of every job, oldest first."""
    db = read_store(world)
    try:
        return [(r["project_key"], r["status"]) for r in db.execute("SELECT * FROM jobs ORDER BY id")]
    finally:
        db.close()


def unreported_runs(world: World) -> list[int]:
    db = read_store(world)
    try:
        return [r["id"] for r in db.execute("SELECT id FROM runs WHERE reported != 2")]
    finally:
        db.close()


def plan_comments(world: World, number: int) -> list[str]:
    return [c for c in world.bot_comments(number) if "**deploybot plan**" in c]


def assert_store_intact_and_settled(world: World, number: int) -> None:
    """The database passes SQLite's integrity check, every delivery the bot accepted was
    handled, no job is left queued or running, every run was reported, and the pull request
    holds its locks."""
    wait_for(lambda: not unreported_runs(world), 30, "every run's report to be recorded")
    db = read_store(world)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        deliveries = {r["id"]: r["status"] for r in db.execute("SELECT id, status FROM deliveries")}
        assert not [j for j in db.execute("SELECT id FROM jobs WHERE status IN ('queued', 'running')")]
        holders = {r["pull_number"] for r in db.execute("SELECT pull_number FROM locks")}
    finally:
        db.close()
    accepted = {d.delivery_id for d in world.forge.fake.deliveries if d.status == 202}
    assert accepted and all(deliveries.get(d) == "done" for d in accepted), (accepted, deliveries)
    assert holders == {number}


def gated_terraform(tmp_path: Path) -> tuple[Path, Path]:
    """A terraform that waits at `plan` while `gate/open` is missing; (binary, gate)."""
    gate = tmp_path / "gate"
    gate.mkdir()
    (gate / "open").touch()
    binary = tmp_path / "terraform-gated"
    binary.write_text(GATED_TERRAFORM.replace("{gate}", str(gate)).replace("{terraform}", find_terraform()))
    binary.chmod(0o755)
    return binary, gate


def seen_by_jobs(tmp_path: Path, gate: Path) -> dict[str, list[str]]:
    """What the gated terraform needs in its sandbox: the mirror and terraform to read, its gate to write."""
    return {"sandbox_read_only": [str(tmp_path / "terraform-mirror"), find_terraform()],
            "sandbox_read_write": [str(tmp_path / "state"), str(gate)]}


def _gated_alive(binary: Path) -> bool:
    """Whether a process of the gated terraform script still runs anywhere on the host."""
    for cmdline in Path("/proc").glob("*/cmdline"):
        try:
            if str(binary).encode() in cmdline.read_bytes():
                return True
        except OSError:
            continue
    return False


def store_log_lines(caplog: pytest.LogCaptureFixture, owner: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "deploybot.store" and r.levelno == logging.ERROR and r.getMessage().startswith(owner)]


# -- the tests ----------------------------------------------------------------------------------------


def test_plan_that_fills_the_disk_fails_clearly_keeps_the_lock_and_plans_again_once_there_is_room(
        tmp_path: Path, filler: Filler):
    world = World(tmp_path)
    try:
        number = world.open_pr("resize", staging_change(world))
        assert "✅ `staging`: +2 ~0 -0" in world.wait_comment(number, "**deploybot plan**")
        world.wait_idle()

        # A megabyte is left: enough for the store, the checkout and the job log, not for the
        # plan file of the next commit.
        filler.fill(leave=1 << 20)
        seen = len(world.bot_comments(number))
        sha = world.push(number, "resize", {"staging/bulk.tf": BULK_TF})
        failed = world.wait_comment(number, "**deploybot plan**", after=seen)
        assert f"**deploybot plan** for `{sha[:8]}`" in failed
        # The summary names the cause, and terraform's own words are in the output.
        assert "❌ `staging`: deploybot's disk is full: terraform plan failed (exit 1)" in failed
        assert "Failed to write plan file" in failed and "no space left on device" in failed
        assert "Traceback" not in failed
        assert world.wait_status(number, "deploybot/plan: staging", "failure") == (
            "deploybot's disk is full: terraform plan failed (exit 1)")
        assert world.wait_status(number, "deploybot/plan", "failure") == "plan failed: staging"
        assert healthy(world)

        # A failed plan keeps the pull request's lock, as every failed plan does (the lock is
        # taken when the plan is queued and freed only by merge, close or unlock); no plan of
        # the new head was saved, and terraform's half-written plan file is gone.
        store = world.store()
        try:
            repo = store.run_jobs(1)[0].run.repo
            assert [lock.pull_number for lock in store.locks_for_pull(repo, number)] == [number]
            assert store.lock_count() == 1
            key = project_key(repo, store.run_jobs(1)[0].project)
            saved = store.get_plan(key, number)
            assert saved is not None and saved.head_sha != sha
        finally:
            store.close()
        assert not list((tmp_path / "data" / "plans").rglob(f"*{sha}*"))

        # Another pull request touching staging is told who holds it, even now.
        other = world.open_pr("other", staging_change(world, "tiny"), author="carol")
        assert f"locked by #{number}" in world.wait_comment(other, "is locked by")

        filler.free()
        world.wait_idle()
        seen = len(world.bot_comments(number))
        world.comment(number, "alice", "deploybot plan")
        planned = world.wait_comment(number, "**deploybot plan**", after=seen)
        assert f"**deploybot plan** for `{sha[:8]}`" in planned and "✅ `staging`: +50 ~0 -0" in planned
        assert world.wait_status(number, "deploybot/plan: staging", "success").startswith("+50 ~0 -0 (plan `")
        world.wait_idle()
        assert_store_intact_and_settled(world, number)
    finally:
        world.stop()


def test_webhook_that_cannot_be_stored_gets_a_503_and_is_handled_when_sent_again(
        tmp_path: Path, filler: Filler, caplog: pytest.LogCaptureFixture):
    world = World(tmp_path)
    try:
        number = world.open_pr("docs", {"README.md": "docs only\n"})  # changes no project: no plan yet
        world.wait_idle()

        filler.fill()
        [held] = held_deliveries(world, lambda: world.comment(number, "alice", "deploybot plan -p staging"))
        with caplog.at_level(logging.INFO):
            response = post_delivery(world, held)
            # A second try while the disk is still full is refused the same way: nothing half-stored.
            again = post_delivery(world, held)
            # The trigger API (here: a caller without credentials, whose refusal is audited).
            api = httpx.post(f"{world.url}/api/v1/runs", json={"repo": "x"}, timeout=30)
        for answer in (response, again, api):
            assert answer.status_code == 503, answer.text
            assert int(answer.headers["Retry-After"]) > 0
            assert answer.headers["content-type"] == "application/json"
            assert "database or disk is full" in answer.json()["error"]
        stored = world.store()
        try:
            assert stored.delivery_status(held.delivery_id) is None
        finally:
            stored.close()
        logged = [r.getMessage() for r in caplog.records if r.name == "deploybot.app"]
        assert f"could not store github issue_comment delivery {held.delivery_id}: database or disk is full" in logged
        assert not [r for r in caplog.records if r.exc_info]  # no tracebacks
        assert all(WEBHOOK_SECRET not in r.getMessage() for r in caplog.records)
        metrics = httpx.get(f"{world.url}/metrics", timeout=5).text
        assert 'deploybot_deliveries_total{event="issue_comment",forge="github",outcome="unavailable"} 2.0' in metrics
        assert healthy(world)
        ready = httpx.get(f"{world.url}/readyz", timeout=30)
        assert ready.status_code == 503 and ready.json()["checks"]["disk"] == "failed: the data dir's disk is full"
        assert not plan_comments(world, number)

        filler.free()
        assert httpx.get(f"{world.url}/readyz", timeout=30).json()["checks"]["disk"] == "ok"
        assert world.forge.fake.redeliver(held.delivery_id) == 202
        assert "✅ `staging`: +2 ~0 -0" in world.wait_comment(number, "**deploybot plan**")
        world.wait_idle()
        assert_store_intact_and_settled(world, number)
    finally:
        world.stop()


def hold_a_staging_plan(world: World, gate: Path) -> tuple[int, int]:
    """Open a pull request, let its autoplan finish, then start a plan of staging that waits
    at the terraform gate; return the pull request's number and its count of bot comments."""
    number = world.open_pr("resize", staging_change(world))
    world.wait_comment(number, "**deploybot plan**")
    world.wait_idle()
    seen = len(world.bot_comments(number))
    (gate / "open").unlink()
    world.comment(number, "alice", "deploybot plan -p staging")
    wait_for((gate / "waiting").exists, 60, "terraform plan to start")
    return number, seen


def test_worker_and_dispatcher_wait_for_room_to_record_and_carry_on_by_themselves(
        tmp_path: Path, filler: Filler, caplog: pytest.LogCaptureFixture):
    binary, gate = gated_terraform(tmp_path)
    world = World(tmp_path, binary=str(binary), **seen_by_jobs(tmp_path, gate))
    caplog.set_level(logging.INFO)
    try:
        # A plan of staging is under way (terraform waits at the gate) ...
        number, seen = hold_a_staging_plan(world, gate)
        # ... and a plan of production is being handled, slowly: the forge asks the bot to
        # come back in three seconds for the pull request, so the handler reaches the store
        # only after the disk filled.
        world.forge.fake.inject_faults("GET", r"/pulls/\d+$", [Fault(503, headers={"Retry-After": "3"})])
        world.comment(number, "alice", "deploybot plan -p production")
        filler.fill()
        (gate / "open").touch()

        # Neither can record anything now: both wait, and say so once each.
        wait_for(lambda: store_log_lines(caplog, "the worker") and store_log_lines(caplog, "the dispatcher"),
                 60, "the worker and the dispatcher to meet the full store")
        # While they wait, the bot answers, refuses what it cannot store, and nothing moved on.
        [refused] = held_deliveries(world, lambda: world.comment(number, "alice", "deploybot plan -p staging"))
        assert post_delivery(world, refused).status_code == 503
        assert healthy(world)
        statuses = job_statuses(world)
        assert [status for _, status in statuses] == ["succeeded", "running"]  # the first plan, then staging's
        assert len(world.bot_comments(number)) == seen
        assert world.statuses(number)["deploybot/plan: staging"][0] == "pending"

        filler.free()
        # The worker records terraform's failure and reports it; the dispatcher handles the
        # production plan again; the refused delivery, sent again, is accepted and handled.
        # Terraform 1.0 itself says nothing here: it exits 0 with an empty plan file when the disk
        # is full as it saves the plan. The bot finds the plan file unreadable, and says why.
        failed = world.wait_comment(number, "❌ `staging`", after=seen)
        assert "❌ `staging`: deploybot's disk is full: " in failed
        assert "Traceback" not in failed
        world.wait_status(number, "deploybot/plan: staging", "failure")  # sent alongside the comment
        assert "✅ `production`: +2 ~0 -0" in world.wait_comment(number, "`production`", after=seen)
        assert world.forge.fake.redeliver(refused.delivery_id) == 202
        wait_for(lambda: len(plan_comments(world, number)) == 4, 120, "the re-sent plan of staging")
        assert "✅ `staging`: +2 ~0 -0" in plan_comments(world, number)[-1]
        world.wait_idle()

        assert_store_intact_and_settled(world, number)
        assert [status for _, status in job_statuses(world)] == ["succeeded", "failed", "succeeded", "succeeded"]
        assert len(store_log_lines(caplog, "the worker")) == 1 and len(store_log_lines(caplog, "the dispatcher")) == 1
        assert not [r for r in caplog.records if r.exc_info]  # nothing escaped into a traceback
        assert all(WEBHOOK_SECRET not in r.getMessage() for r in caplog.records)
    finally:
        (gate / "open").touch()
        world.stop()


def test_bot_killed_on_a_full_disk_starts_again_and_recovers_once_there_is_room(tmp_path: Path, filler: Filler):
    binary, gate = gated_terraform(tmp_path)
    world = World(tmp_path, in_process=False, binary=str(binary), **seen_by_jobs(tmp_path, gate))
    try:
        number, seen = hold_a_staging_plan(world, gate)
        filler.fill()
        world.kill_bot()  # the job's sandbox dies with it (bubblewrap's --die-with-parent)
        wait_for(lambda: not _gated_alive(binary), 30,
                 "the job's terraform to go with the bot")
        (gate / "waiting").unlink()
        (gate / "open").touch()

        # It starts, and serves, though it cannot re-queue the plan it was running yet.
        world.start_bot()
        [refused] = held_deliveries(world, lambda: world.comment(number, "alice", "deploybot plan"))
        assert post_delivery(world, refused).status_code == 503
        assert world.process is not None and world.process.poll() is None
        assert [status for _, status in job_statuses(world)] == ["succeeded", "running"]

        filler.free()
        comment = world.wait_comment(number, "**deploybot plan**", after=seen)
        assert "✅ `staging`: +2 ~0 -0" in comment
        assert world.process.poll() is None  # the same process: it was never restarted
        world.wait_idle()
        assert [status for _, status in job_statuses(world)] == ["succeeded", "succeeded"]
        assert_store_intact_and_settled(world, number)
        log = (tmp_path / "bot.log").read_text()
        entries = [json.loads(line) for line in log.splitlines() if line.strip().startswith("{")]
        assert [e for e in entries if e["logger"] == "deploybot.store" and e["level"] == "error"
                and "could not re-queue job 2" in e["msg"] and "database or disk is full" in e["msg"]]
        assert WEBHOOK_SECRET not in log
    finally:
        (gate / "open").touch()
        world.stop()
