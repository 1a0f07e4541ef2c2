"""The durable store: deliveries once, per-project job ordering, locks, plans; on both backends."""

from __future__ import annotations

import concurrent.futures
import hashlib
import sqlite3
import time
from pathlib import Path

import pytest

from bot.models import Project, Repo
from bot.store import Delivery, SavedPlan, Store, project_key

REPO = Repo("github", "acme/infra", "file:///x", "main", 1)
STAGING = Project("staging", name="staging")
PROD = Project("production", name="production")


def test_delivery_is_persisted_once_and_survives_reopen(store_location: Path | str):
    store = Store(store_location)
    assert store.add_delivery(Delivery("d1", "github", "pull_request", b"{}"))
    assert not store.add_delivery(Delivery("d1", "github", "pull_request", b"{}"))
    store.close()
    store = Store(store_location)
    assert [d.id for d in store.pending_deliveries()] == ["d1"]
    store.finish_delivery("d1")
    assert store.pending_deliveries() == []
    assert store.delivery_status("d1") == "done"


def test_run_key_is_unique_and_jobs_of_one_project_never_overlap(store_location: Path | str):
    store = Store(store_location)
    first = store.add_run("d1:plan", REPO, 1, "a" * 40, "plan", "comment", "alice", [STAGING, PROD])
    assert first is not None
    assert store.add_run("d1:plan", REPO, 1, "a" * 40, "plan", "comment", "alice", [STAGING]) is None
    second = store.add_run("d2:plan", REPO, 1, "a" * 40, "plan", "comment", "alice", [STAGING])
    staging = store.claim_next_job()
    prod = store.claim_next_job()
    assert (staging.project, prod.project) == (STAGING, PROD)
    assert store.claim_next_job() is None  # the second staging job waits for the first
    store.finish_job(staging.id, "succeeded", {})
    third = store.claim_next_job()
    assert third.run.id == second.id and third.project == STAGING
    assert not store.claim_run_report(first.id)  # production still running
    store.finish_job(prod.id, "failed", {"summary": "x"})
    assert store.claim_run_report(first.id)
    assert not store.claim_run_report(first.id)  # reported once


def test_locks_name_their_holder_and_plans_are_replaced(store_location: Path | str):
    store = Store(store_location)
    key = project_key(REPO, STAGING)
    assert store.try_locks([key], REPO, 1, "alice")[0].acquired
    assert store.try_locks([key], REPO, 1, "alice")[0].acquired  # the holder keeps it
    other = store.try_locks([key], REPO, 2, "bob")[0]
    assert not other.acquired and other.holder.pull_number == 1 and other.holder.holder == "alice"
    assert not store.unlock(key, 2)
    assert store.unlock(key, 1)
    assert store.try_locks([key], REPO, 2, "bob")[0].acquired
    first, second = b"first plan", b"second plan"
    store.save_plan(SavedPlan(key, 2, "a" * 40, "", hashlib.sha256(first).hexdigest(), True), first)
    store.save_plan(SavedPlan(key, 2, "b" * 40, "", hashlib.sha256(second).hexdigest(), False), second)
    plan = store.get_plan(key, 2)
    assert plan.head_sha == "b" * 40 and [p.sha256 for p in store.plans_for_pull(REPO, 2)] == [plan.sha256]
    assert store.plan_content(plan) == second  # the bytes come back, hash checked
    with store._db() as db:
        db.execute("UPDATE plans SET content = ? WHERE pull_number = 2", (b"second plaN",))
    assert store.plan_content(plan) is None  # changed bytes are never handed out


def test_a_transaction_that_cannot_begin_leaves_the_store_usable(tmp_path: Path):
    store = Store(tmp_path / "db.sqlite")
    with store._db() as db:
        db.execute("PRAGMA query_only = ON")  # BEGIN IMMEDIATE now fails, as on a read-only disk
    with pytest.raises(sqlite3.OperationalError):
        store.try_locks(["k"], REPO, 1, "alice")
    with store._db() as db:
        db.execute("PRAGMA query_only = OFF")
    # From another thread too: the store's lock was not left taken by the failed BEGIN.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        attempt = pool.submit(store.try_locks, ["k"], REPO, 1, "alice").result(timeout=5)[0]
    assert attempt.acquired


def test_a_handled_delivery_keeps_its_id_but_not_its_body(store_location: Path | str):
    store = Store(store_location)
    for name in ("done", "failed"):
        store.add_delivery(Delivery(name, "github", "pull_request", b"x" * 25_000))
    store.finish_delivery("done")
    store.finish_delivery("failed", "forge API error: 404")
    with store._db() as db:
        bodies = {row[0]: row[1] for row in db.execute("SELECT id, length(body) FROM deliveries").fetchall()}
    assert bodies == {"done": 0, "failed": 25_000}  # a failed one stays to be looked into
    assert not store.add_delivery(Delivery("done", "github", "pull_request", b"{}"))  # still a duplicate
    assert store.delivery_status("done") == "done" and store.delivery_status("failed") == "failed"


def test_pull_queries_stay_in_their_repository(store_location: Path | str):
    """`_` in a repository's name is no wildcard: closing one pull request never touches another repo's."""
    store = Store(store_location)
    mine = Repo("github", "acme/infra_live", "", "main")
    other = Repo("github", "acme/infra-live", "", "main")
    theirs = SavedPlan(project_key(other, Project("staging")), 7, "a" * 40, "/p", "f" * 64, True)
    store.save_plan(theirs, b"their plan")
    store.mark_plan_shown(theirs.project_key, 7, theirs.sha256, "2026-01-01T00:00:00Z")
    assert store.approve_plan(theirs, "bob", 1, "2026-01-01T00:00:05Z")
    assert store.plans_for_pull(mine, 7) == []
    assert [p.sha256 for p in store.plans_for_pull(other, 7)] == ["f" * 64]
    assert [a.user for a in store.plan_approvals(theirs)] == ["bob"]


def test_a_postgresql_url_keeps_its_own_parameters_and_gives_the_schema_to_the_session():
    from bot.store.backends import postgres_conninfo

    assert postgres_conninfo("postgresql://u:p@db:5432/deploybot?search_path=bot&sslmode=require") == (
        "postgresql://u:p@db:5432/deploybot?sslmode=require", {"options": "-c search_path=bot"})
    assert postgres_conninfo("postgresql://u@db/deploybot") == ("postgresql://u@db/deploybot", {})


def test_a_claim_stays_quick_with_thousands_of_deliveries_pending(store_location: Path | str):
    """The dispatcher claims one at a time: a claim that sorted every pending delivery made a
    backlog's drain quadratic (seconds per claim at 5,000)."""
    store = Store(store_location)
    with store._db() as db:
        for i in range(5000):
            db.execute("INSERT INTO deliveries (id, forge, event, body, status, received_at, subject)"
                       " VALUES (?, 'github', 'pull_request', ?, 'received', ?, ?)", (f"d{i}", b"{}", i, f"s{i}"))
    claimed = [store.claim_delivery(time.time()).id for _ in range(20)]
    assert claimed == [f"d{i}" for i in range(20)]  # oldest first
    with store._db() as db:
        plan = " ".join(str(tuple(r)) for r in db.execute(
            "EXPLAIN QUERY PLAN SELECT id FROM deliveries AS d WHERE status = 'received' AND next_attempt_at <= 1"
            " ORDER BY received_at LIMIT 1").fetchall()) if isinstance(store_location, Path) else ""
    assert "TEMP B-TREE" not in plan  # walked in order, not sorted
