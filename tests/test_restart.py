"""A bot killed with SIGKILL mid-queue loses nothing and runs nothing twice when restarted."""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import sqlite3
import time
from pathlib import Path

from bot.sandbox.forges import WEBHOOK_SECRET
from bot.sandbox.trial import REPO, wait_for
from tests.world import TEST_POLICY, World, staging_change

SLOW_APPLY = """
resource "null_resource" "slow" {
  provisioner "local-exec" { command = "sleep 4" }
}
"""


def running_job(world: World, command: str):
    store = world.store()
    try:
        return next((j for j in store.jobs_with_status("running") if j.run.command == command), None)
    finally:
        store.close()


def start_planning_both_projects(world: World) -> int:
    """Open a PR that changes the shared module; return once the first plan is running."""
    module = (world.repo.work / "modules/app/main.tf").read_text()
    number = world.open_pr("module", {"modules/app/main.tf": module + "\n# touched\n"})
    wait_for(lambda: running_job(world, "plan"), 60, "a plan to start")
    return number


def start_a_slow_apply(world: World) -> int:
    """Plan, approve and apply a change whose apply takes seconds; return once it runs."""
    files = staging_change(world)
    files["staging/slow.tf"] = SLOW_APPLY
    number = world.open_pr("slow", files)
    world.wait_comment(number, "**deploybot plan**")
    world.forge.approve(number, "dave")
    world.comment(number, "bob", "deploybot apply")
    wait_for(lambda: running_job(world, "apply"), 60, "the apply to start")
    return number


def test_plan_cut_off_by_a_crash_runs_again_and_reports_once(tmp_path: Path):
    world = World(tmp_path, in_process=False, parallelism=1)
    try:
        number = start_planning_both_projects(world)
        world.kill_bot()
        assert not world.bot_comments(number)

        world.start_bot()
        comment = world.wait_comment(number, "**deploybot plan**")
        assert "`staging`: +2 ~0 -0" in comment and "`production`: +2 ~0 -0" in comment
        world.wait_idle()
        time.sleep(1)
        assert len([c for c in world.bot_comments(number) if "**deploybot plan**" in c]) == 1
        store = world.store()
        assert [d for d in store.pending_deliveries()] == []
        store.close()
        # The server logs JSON lines that name what they concern, and never a secret.
        log = (tmp_path / "bot.log").read_text()
        entries = [json.loads(line) for line in log.splitlines() if line.strip()]
        assert any(e.get("job") and e.get("repo") == REPO and e.get("pr") == number for e in entries)
        assert WEBHOOK_SECRET not in log
    finally:
        world.stop()


def test_apply_cut_off_by_a_crash_is_reported_not_rerun(tmp_path: Path):
    policy = copy.deepcopy(TEST_POLICY)
    world = World(tmp_path, policy, in_process=False)
    try:
        number = start_a_slow_apply(world)
        time.sleep(1.5)  # terraform is applying now
        world.kill_bot()

        world.start_bot()
        comment = world.wait_comment(number, "**deploybot apply**")
        assert "⚠️ `staging`" in comment and "stopped while this apply was running" in comment
        world.wait_idle()
        store = world.store()
        try:
            applies = [j for j in store.jobs_with_status("interrupted")]
            assert len(applies) == 1
            assert store.jobs_with_status("succeeded") and not [
                j for j in store.jobs_with_status("succeeded") if j.run.command == "apply"]
            assert store.locks_for_pull(applies[0].run.repo, number), "the lock is kept for a human"
        finally:
            store.close()
        assert world.wait_status(number, "deploybot/apply", "failure")
    finally:
        world.stop()


def terminate(world: World) -> None:
    """SIGTERM the bot process, as ECS stops a task, and wait for it to exit.

    uvicorn shuts down gracefully, then re-raises the signal, so the exit status is -SIGTERM.
    """
    assert world.process is not None
    world.process.send_signal(signal.SIGTERM)
    assert world.process.wait(timeout=90) in (0, -signal.SIGTERM)


def test_sigterm_lets_a_running_apply_finish(tmp_path: Path):
    world = World(tmp_path, in_process=False, extra_config={"server": {"shutdown_grace": 60}})
    try:
        number = start_a_slow_apply(world)
        time.sleep(1)
        terminate(world)
        assert "`staging`: applied" in world.wait_comment(number, "**deploybot apply**", timeout=5)
        assert world.state_resources("staging") == 3
    finally:
        world.stop()


def test_sigterm_puts_running_plans_back_in_the_queue(tmp_path: Path):
    world = World(tmp_path, in_process=False, parallelism=1)
    try:
        number = start_planning_both_projects(world)
        terminate(world)
        store = world.store()
        try:
            assert not store.jobs_with_status("running")
            assert len(store.jobs_with_status("queued")) >= 1
        finally:
            store.close()
        world.start_bot()
        comment = world.wait_comment(number, "**deploybot plan**")
        assert "`staging`: +2 ~0 -0" in comment and "`production`: +2 ~0 -0" in comment
    finally:
        world.stop()


def test_sigkills_at_random_points_lose_no_delivery_and_run_nothing_twice(tmp_path: Path):
    rng = random.Random(int(os.environ.get("DEPLOYBOT_CHAOS_SEED", "20261122")))
    world = World(tmp_path, in_process=False)
    try:
        number = world.open_pr("chaos", staging_change(world))
        kills = 4
        for _ in range(kills):
            time.sleep(rng.uniform(0.0, 1.5))  # somewhere in intake, dispatch, plan or report
            world.kill_bot()
            world.start_bot()
            world.comment(number, "alice", "deploybot plan -p staging")
        accepted = [d for d in world.forge.fake.deliveries if d.status == 202]
        assert len(accepted) == kills + 1
        wait_for(lambda: len([c for c in world.bot_comments(number) if "**deploybot plan**" in c]) >= kills + 1,
                 180, "a plan comment for every accepted delivery")
        world.wait_idle()
        store = world.store()
        try:
            assert all(store.delivery_status(d.delivery_id) == "done" for d in accepted)
            runs = {job.run.id for status in ("succeeded", "failed") for job in store.jobs_with_status(status)}
        finally:
            store.close()
        assert len(runs) == kills + 1  # one run per delivery: none lost, none doubled
        plan_comments = [c for c in world.bot_comments(number) if "**deploybot plan**" in c]
        # A kill between posting a comment and recording it posts it again: at least once, rarely twice.
        assert kills + 1 <= len(plan_comments) <= 2 * (kills + 1)
    finally:
        world.stop()


# Effects exactly once: a delivery or a report handled again after a crash repeats nothing. ------


def cut_off(world: World, delivery_id: str) -> None:
    """Leave the stored delivery as a crash before `finish_delivery` does: received, body kept.

    The bot must be stopped; the body is the one the forge sent (a handled delivery drops its own).
    """
    body = next(d.body for d in world.forge.fake.deliveries if d.delivery_id == delivery_id)
    with sqlite3.connect(world.root / "data" / "deploybot.sqlite3") as db:
        changed = db.execute("UPDATE deliveries SET status = 'received', body = ? WHERE id = ?",
                             (body, delivery_id)).rowcount
    assert changed == 1


def plan_comments(world: World, number: int) -> list[str]:
    return [c for c in world.bot_comments(number) if "**deploybot plan**" in c]


def test_a_push_handled_again_after_a_crash_keeps_the_plans_it_queued(tmp_path: Path):
    world = World(tmp_path, in_process=False, parallelism=1)
    try:
        number = start_planning_both_projects(world)
        world.wait_idle()
        world.push(number, "module", {"staging/extra.tf": 'resource "null_resource" "extra" {}\n'})
        head = world.head(number)
        pushed = world.forge.fake.deliveries[-1].delivery_id
        wait_for(lambda: (job := running_job(world, "plan")) and job.run.head_sha == head, 60, "the new plan")
        world.kill_bot()
        cut_off(world, pushed)  # killed between queueing the plans and finishing the delivery

        world.start_bot()
        world.wait_idle()
        wait_for(lambda: len(plan_comments(world, number)) >= 2, 60, "the plan of the push")
        latest = plan_comments(world, number)[-1]
        assert f"`{head[:8]}`" in latest and "`staging`: +3 ~0 -0" in latest, latest
        assert "⏹️" not in latest and "cancelled" not in latest
        assert world.wait_status(number, "deploybot/plan", "success")
    finally:
        world.stop()


def test_a_report_cut_off_after_its_comment_is_not_posted_twice(tmp_path: Path):
    world = World(tmp_path, in_process=False)
    try:
        number = world.open_pr("resize", staging_change(world))
        world.wait_comment(number, "**deploybot plan**")
        world.wait_idle()
        world.kill_bot()
        # The crash came after the forge stored the comment, before the bot recorded it.
        with sqlite3.connect(world.root / "data" / "deploybot.sqlite3") as db:
            assert db.execute("UPDATE runs SET reported = 1 WHERE command = 'plan'").rowcount == 1

        world.start_bot()
        world.wait_idle()
        time.sleep(2)
        assert len(plan_comments(world, number)) == 1
        store = world.store()
        try:
            assert store.unreported_runs() == []  # the recovery found its comment and recorded it
        finally:
            store.close()
    finally:
        world.stop()


def test_a_reply_of_a_delivery_handled_again_is_not_posted_twice(tmp_path: Path):
    world = World(tmp_path, in_process=False)
    try:
        number = world.open_pr("resize", staging_change(world))
        world.wait_comment(number, "**deploybot plan**")
        world.comment(number, "eve", "deploybot apply")
        asked = world.forge.fake.deliveries[-1].delivery_id
        world.wait_comment(number, "@eve may not")
        world.wait_idle()
        world.kill_bot()
        cut_off(world, asked)  # killed after the refusal was posted, before the delivery was done

        world.start_bot()
        world.wait_idle()
        time.sleep(2)
        assert len([c for c in world.bot_comments(number) if "@eve may not" in c]) == 1
    finally:
        world.stop()
