"""Replicas sharing one store: leases, take-over after a dead replica, deliveries in order (issue 14).

Each test runs on SQLite and on PostgreSQL: the store's rules are the same on both, though
on SQLite only one process serves at a time (the serve lock).
"""

from __future__ import annotations

import queue
import time
from pathlib import Path

from bot.models import Project, Repo
from bot.store import Delivery, RunnerLease, Store

REPO = Repo("github", "acme/infra", "file:///x", "main", 1)
LEASE = 0.5


def _replicas(location: Path | str) -> tuple[Store, Store]:
    first, second = Store(location, "a", LEASE), Store(location, "b", LEASE)
    first.heartbeat()
    second.heartbeat()
    return first, second


def _let_lease_run_out(alive: Store) -> None:
    """Time passes: only `alive` says it is alive."""
    for _ in range(3):
        time.sleep(LEASE / 2)
        alive.heartbeat()


def test_a_dead_replicas_running_job_is_taken_over_once_and_its_late_outcome_is_dropped(store_location):
    first, second = _replicas(store_location)
    first.add_run("d1:plan", REPO, 1, "a" * 40, "plan", "comment", "alice", [Project("staging")])
    job = first.claim_next_job()
    assert job.attempt == 1
    assert second.orphaned_jobs() == []  # its replica is alive
    _let_lease_run_out(second)
    [orphan] = second.orphaned_jobs()
    assert orphan.id == job.id
    assert second.requeue_job(orphan)
    assert not first.requeue_job(orphan)  # one replica takes it over
    again = second.claim_next_job()
    assert (again.id, again.attempt) == (job.id, 2)
    # The first replica comes back and finishes the job it thought it held: that outcome is dropped.
    assert not first.heartbeat()  # it hears it was given up as dead
    assert not first.finish_job(job.id, "succeeded", {"summary": "late"}, attempt=job.attempt)
    assert second.finish_job(job.id, "succeeded", {"summary": "planned"}, attempt=again.attempt)
    assert second.run_jobs(job.run.id)[0].result == {"summary": "planned"}


def test_a_replica_that_leaves_is_taken_over_at_once(store_location):
    first, second = _replicas(store_location)
    first.add_run("d1:plan", REPO, 1, "a" * 40, "plan", "comment", "alice", [Project("staging")])
    job = first.claim_next_job()
    assert second.orphaned_jobs() == []
    first.retire()
    assert [orphan.id for orphan in second.orphaned_jobs()] == [job.id]
    assert second.replicas() == ["b"]


def test_jobs_of_one_project_run_in_order_and_never_together_across_replicas(store_location):
    first, second = _replicas(store_location)
    staging, prod = Project("staging"), Project("production")
    first.add_run("d1:plan", REPO, 1, "a" * 40, "plan", "comment", "alice", [staging])
    first.add_run("d2:plan", REPO, 2, "b" * 40, "plan", "comment", "alice", [staging, prod])
    one = first.claim_next_job()
    other = second.claim_next_job()
    assert (one.run.pull_number, one.project) == (1, staging)
    assert (other.run.pull_number, other.project) == (2, prod)  # staging of #2 waits for #1's
    assert second.claim_next_job() is None
    first.finish_job(one.id, "succeeded", {}, attempt=one.attempt)
    third = second.claim_next_job()
    assert (third.run.pull_number, third.project) == (2, staging)


def test_deliveries_of_one_pull_request_are_handled_one_at_a_time_in_order(store_location):
    first, second = _replicas(store_location)
    for name, subject in (("s1", "github:acme/infra#1"), ("s2", "github:acme/infra#1"), ("t1", "github:acme/infra#2")):
        first.add_delivery(Delivery(name, "github", "issue_comment", b"{}", subject=subject))
        time.sleep(0.01)  # received in this order
    now = time.time()
    assert first.claim_delivery(now).id == "s1"
    assert second.claim_delivery(now).id == "t1"  # s2 waits while s1 is handled
    assert second.claim_delivery(now) is None
    first.finish_delivery("s1")
    assert second.claim_delivery(now).id == "s2"
    # A delivery put off after a forge error does not hold its pull request's next one.
    first.add_delivery(Delivery("s3", "github", "issue_comment", b"{}", subject="github:acme/infra#1"))
    second.retry_delivery("s2", "forge API error: 502", 60)
    assert first.claim_delivery(time.time()).id == "s3"


def test_a_dead_replicas_delivery_and_report_are_taken_over(store_location):
    first, second = _replicas(store_location)
    first.add_delivery(Delivery("d1", "github", "issue_comment", b"{}", subject="github:acme/infra#1"))
    assert first.claim_delivery(time.time()).id == "d1"
    run = first.add_run("d1:plan", REPO, 1, "a" * 40, "plan", "comment", "alice", [Project("staging")])
    job = first.claim_next_job()
    first.finish_job(job.id, "succeeded", {}, attempt=job.attempt)
    assert first.claim_run_report(run.id)
    assert second.release_orphaned_deliveries() == 0 and second.unreported_runs() == []  # first is alive
    _let_lease_run_out(second)
    assert second.release_orphaned_deliveries() == 1
    assert second.claim_delivery(time.time()).id == "d1"  # handled again (its run key adds nothing twice)
    assert [r.id for r in second.unreported_runs(grace=LEASE)] == [run.id]
    assert second.claim_run_report(run.id) and not first.claim_run_report(run.id)


def test_a_run_whose_reporter_died_before_claiming_its_report_is_reported_after_the_grace(store_location):
    first, second = _replicas(store_location)
    run = first.add_run("d1:plan", REPO, 1, "a" * 40, "plan", "comment", "alice", [Project("staging")])
    job = first.claim_next_job()
    first.finish_job(job.id, "succeeded", {}, attempt=job.attempt)  # ... and died before its claim
    assert second.unreported_runs(grace=LEASE) == []  # its own replica may still claim it
    time.sleep(LEASE * 1.2)
    assert [r.id for r in second.unreported_runs(grace=LEASE)] == [run.id]


def test_replicas_on_postgresql_hear_the_work_others_commit(store_location):
    """LISTEN/NOTIFY: a queued job, an offered runner lease; only after the commit. SQLite has no one to wake."""
    first, second = _replicas(store_location)
    heard: queue.Queue[str] = queue.Queue()
    wakeups = second.wakeups(heard.put)
    if not isinstance(store_location, str):
        assert wakeups is None
        return
    wakeups.start()
    try:
        time.sleep(0.3)  # listening
        first.add_run("d1:plan", REPO, 1, "a" * 40, "plan", "comment", "alice", [Project("staging")])
        assert heard.get(timeout=5) == "jobs"
        first.add_run("d2:apply", REPO, 1, "a" * 40, "apply", "api", "ci", [Project("staging")], job_status="waiting")
        first.offer_runner_lease(RunnerLease("l1", 1, "plans", {}), b"")
        assert heard.get(timeout=5) == "lease:plans"  # a waiting job wakes no one
        assert heard.empty()
    finally:
        wakeups.stop()
