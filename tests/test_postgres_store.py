"""The bot on PostgreSQL: a pull request's whole story, and one database shared by processes (issue 14)."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import pytest

from bot.models import Project, Repo
from bot.store import Store
from tests.world import staging_change, visible

REPO = Repo("github", "acme/infra", "file:///x", "main", 1)


@pytest.fixture
def postgres_location(store_location: Path | str) -> str:
    if not isinstance(store_location, str):
        pytest.skip("PostgreSQL only")
    return store_location


@pytest.mark.parametrize("store_location", ["postgresql"], indirect=True)
def test_a_pull_request_goes_from_plan_to_apply_on_postgresql(make_world, postgres_location: str) -> None:
    world = make_world(extra_config={"server": {"database_url": postgres_location}})
    number = world.open_pr("resize", staging_change(world))
    assert "✅ `staging`: +" in visible(world.wait_comment(number, "**deploybot plan**"))
    world.forge.approve(number, "dave")
    world.comment(number, "bob", "deploybot apply")
    assert "✅ `staging`: applied plan" in visible(world.wait_comment(number, "**deploybot apply**"))
    store = world.store()
    try:
        assert [job.status for job in store.jobs_with_status("succeeded")]  # it is all in PostgreSQL
    finally:
        store.close()
    assert not (world.root / "data" / "deploybot.sqlite3").exists()


@pytest.mark.parametrize("store_location", ["postgresql"], indirect=True)
def test_fifty_jobs_claimed_by_two_stores_at_once_are_each_claimed_once(postgres_location: str) -> None:
    """Two replicas' stores on one database: every job once, never two of one project at once."""
    first, second = Store(postgres_location), Store(postgres_location)
    try:
        for i in range(50):
            first.add_run(f"d{i}:plan", REPO, i, "a" * 40, "plan", "comment", "alice", [Project(f"p{i % 10}")])

        def drain(store: Store) -> list[tuple[int, str]]:
            claimed = []
            while True:
                job = store.claim_next_job()
                if job is None:
                    running = store.jobs_with_status("running") + store.jobs_with_status("queued")
                    if not running:
                        return claimed
                    continue
                # No other job of its project runs meanwhile, whichever store claimed it.
                others = [j for j in store.jobs_with_status("running") if j.project_key == job.project_key]
                assert [j.id for j in others] == [job.id]
                claimed.append((job.id, job.project_key))
                store.finish_job(job.id, "succeeded", {})

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            results = list(pool.map(drain, (first, second)))
    finally:
        first.close()
        second.close()
    ids = [job_id for result in results for job_id, _ in result]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 50
    assert all(results)  # both took part
