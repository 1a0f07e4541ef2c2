"""Faults outside the bot: git fetch fails, terraform crashes. Clear errors, locks kept right."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from bot.forges.github.webhook import sign
from bot.jobs.terraform import find_terraform
from bot.sandbox.forges import WEBHOOK_SECRET
from tests.test_races import held_deliveries
from tests.world import World, staging_change


def test_git_fetch_failure_is_reported_and_the_project_can_be_planned_again(tmp_path: Path):
    world = World(tmp_path)
    try:
        number = world.open_pr("resize", staging_change(world))
        world.wait_comment(number, "**deploybot plan**")
        # A new commit the bot has not fetched yet, announced while git (not the API) is down.
        [held] = held_deliveries(world, lambda: world.push(number, "resize", staging_change(world, "huge")))
        payload = json.loads(held.body)
        payload["repository"]["clone_url"] = "http://127.0.0.1:9/acme/infrastructure-live.git"
        body = json.dumps(payload).encode()
        response = httpx.post(f"{world.url}/webhooks/github", content=body, headers={
            "X-GitHub-Event": "pull_request", "X-GitHub-Delivery": held.delivery_id,
            "X-Hub-Signature-256": sign(body, WEBHOOK_SECRET.encode()), "Content-Type": "application/json"})
        assert response.status_code == 202
        failed = world.wait_comment(number, "checkout failed", after=1)
        assert "❌ `staging`" in failed
        assert "x-access-token" not in failed and "Basic " not in failed
        seen = len(world.bot_comments(number))
        world.comment(number, "alice", "deploybot plan")
        assert "`staging`: +2 ~0 -0" in world.wait_comment(number, "**deploybot plan**", after=seen)
        store = world.store()
        try:
            holders = {lock.pull_number for lock in store.locks_for_pull(store.run_jobs(1)[0].run.repo, number)}
        finally:
            store.close()
        assert holders == {number}  # the failed plan kept the pull request's lock, nobody else got it
    finally:
        world.stop()


def test_terraform_crash_is_reported_with_its_exit(tmp_path: Path):
    crashing = tmp_path / "terraform-that-crashes"
    crashing.write_text(f'#!/bin/sh\nif [ "$1" = plan ]; then echo "panic: runtime error" >&2; kill -SEGV $$; fi\n'
                        f'exec {find_terraform()} "$@"\n')
    crashing.chmod(0o755)
    # The sandbox shows a job its terraform binary only: here the script, and the real one it runs.
    world = World(tmp_path / "world", binary=str(crashing),
                  sandbox_read_only=[str(tmp_path / "world" / "terraform-mirror"), find_terraform()])
    try:
        number = world.open_pr("resize", staging_change(world))
        comment = world.wait_comment(number, "**deploybot plan**")
        assert "❌ `staging`: terraform plan failed (exit -11)" in comment
        assert "panic: runtime error" in comment
        assert world.wait_status(number, "deploybot/plan: staging", "failure") == "terraform plan failed (exit -11)"
    finally:
        world.stop()
