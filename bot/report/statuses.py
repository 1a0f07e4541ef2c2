"""Commit statuses: per project and aggregate, so branch protection and CI can require them."""

from __future__ import annotations

from bot.forges.vcs import VCSClient
from bot.store import Run, Store

PLAN_CONTEXT = "deploybot/plan"
APPLY_CONTEXT = "deploybot/apply"


def plan_context(label: str) -> str:
    """The per-project plan status context."""
    return f"{PLAN_CONTEXT}: {label}"


def report_aggregate_statuses(client: VCSClient, store: Store, run: Run) -> None:
    """Set `deploybot/plan` and `deploybot/apply` from every plan and apply of the run's head."""
    plan_jobs = store.latest_plan_jobs(run.repo, run.pull_number, run.head_sha)
    if run.command == "plan" and plan_jobs:
        failed = [j.project.label for j in plan_jobs if j.status != "succeeded"]
        if failed:
            client.set_status(run.head_sha, PLAN_CONTEXT, "failure", f"plan failed: {', '.join(failed)}")
        else:
            client.set_status(run.head_sha, PLAN_CONTEXT, "success", f"{len(plan_jobs)} project(s) planned")
    if run.command == "apply" and any(
        j.status in ("failed", "interrupted") and j.result.get("outcome") != "refused"
        for j in store.run_jobs(run.id)
    ):
        client.set_status(run.head_sha, APPLY_CONTEXT, "failure", "apply failed")
        return
    waiting = [p for p in store.plans_for_pull(run.repo, run.pull_number)
               if p.head_sha == run.head_sha and p.has_changes]
    if waiting:
        client.set_status(run.head_sha, APPLY_CONTEXT, "pending", f"{len(waiting)} project(s) waiting for apply")
    elif run.command == "apply":
        client.set_status(run.head_sha, APPLY_CONTEXT, "success", "applied")
    else:
        client.set_status(run.head_sha, APPLY_CONTEXT, "success", "no changes to apply")
