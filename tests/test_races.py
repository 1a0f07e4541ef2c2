"""Races: one delivery sent three times at once, two pull requests racing for one project."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx

from bot.forges.github.webhook import sign
from bot.sandbox.forges import WEBHOOK_SECRET
from bot.sandbox.trial import wait_for
from tests.world import World, staging_change


def held_deliveries(world: World, act) -> list:
    """Let people act on the forge while its webhooks go nowhere; return what it would have sent."""
    fake = world.forge.fake
    seen = len(fake.deliveries)
    fake.set_webhook("http://127.0.0.1:9/unreachable", WEBHOOK_SECRET)
    act()
    world.forge.set_webhook(world.url)
    return fake.deliveries[seen:]


def send_at_once(world: World, deliveries: list, copies: int = 1) -> list[int]:
    """POST each delivery `copies` times, all from their own threads at the same moment."""
    barrier = threading.Barrier(len(deliveries) * copies)
    statuses: list[int] = []

    def send(delivery) -> None:
        headers = {"X-GitHub-Event": delivery.event, "X-GitHub-Delivery": delivery.delivery_id,
                   "X-Hub-Signature-256": sign(delivery.body, WEBHOOK_SECRET.encode()),
                   "Content-Type": "application/json"}
        barrier.wait()
        statuses.append(httpx.post(f"{world.url}/webhooks/github", content=delivery.body, headers=headers,
                                   timeout=30).status_code)

    threads = [threading.Thread(target=send, args=(d,)) for d in deliveries for _ in range(copies)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sorted(statuses)


def test_one_comment_delivered_three_times_at_once_runs_once(tmp_path: Path):
    world = World(tmp_path)
    try:
        number = world.open_pr("resize", {"README.md": "docs only\n"})  # no project changes: no autoplan
        world.wait_idle()
        [comment] = held_deliveries(world, lambda: world.comment(number, "alice", "deploybot plan -p staging"))
        assert send_at_once(world, [comment], copies=3) == [200, 200, 202]
        world.wait_comment(number, "**deploybot plan**")
        world.wait_idle()
        store = world.store()
        try:
            assert len([j for j in store.jobs_with_status("succeeded") if j.run.command == "plan"]) == 1
        finally:
            store.close()
        assert len([c for c in world.bot_comments(number) if "**deploybot plan**" in c]) == 1
    finally:
        world.stop()


def test_two_pull_requests_racing_for_one_project_get_one_lock_holder(tmp_path: Path):
    world = World(tmp_path)
    try:
        def open_both() -> None:
            world.open_pr("first", staging_change(world))
            world.open_pr("second", staging_change(world, size="tiny"), author="carol")

        assert send_at_once(world, held_deliveries(world, open_both)) == [202, 202]
        wait_for(lambda: any("**deploybot plan**" in c for n in (1, 2) for c in world.bot_comments(n)),
                 60, "a plan comment")
        world.wait_idle()
        planned = [n for n in (1, 2) if any("**deploybot plan**" in c for c in world.bot_comments(n))]
        told = [n for n in (1, 2) if any("is locked by" in c for c in world.bot_comments(n))]
        assert len(planned) == 1 and len(told) == 1 and planned != told
        store = world.store()
        try:
            locks = store.locks_for_pull(store.run_jobs(1)[0].run.repo, planned[0])
            assert len(locks) == 1
        finally:
            store.close()
        assert f"locked by #{planned[0]}" in world.bot_comments(told[0])[0]
    finally:
        world.stop()
