"""What the handlers share: finding a PR's projects, locking them, queueing plans and applies."""

from __future__ import annotations

import logging
from typing import Sequence

from bot.forges.vcs import ForgeError
from bot.jobs.apply_gate import apply_blockers, may
from bot.jobs.git import GitError
from bot.models import Project, PullRequest, Repo
from bot.report.comments import marker_line, with_marker
from bot.report.statuses import APPLY_CONTEXT, PLAN_CONTEXT
from bot.store import project_key
from handlers.context import HandlerContext
from policies.autoplan import NarrowedProject, narrow_projects, projects_to_autoplan
from policies.policy import RepoPolicy

log = logging.getLogger("deploybot.handlers")

LOCKED_BY_OTHER = (
    "🔒 `{label}` is locked by #{pull} (planned by @{holder}). It is freed when that pull request "
    "is merged or closed, or when someone comments `deploybot unlock` there."
)
TOO_MANY_PROJECTS = (
    "⛔ Not starting a {command} of {count} projects: this repository's policy allows at most {cap} per pull "
    "request (`max_projects_per_pull`). Split the change, or name projects: `deploybot {command} -p <project>`."
)
MODULE_DEPTH = 5  # how many levels of local modules count towards autoplan


def repo_policy(ctx: HandlerContext, repo: Repo) -> RepoPolicy | None:
    """The server policy for the repository, or None if it is not allow-listed."""
    return ctx.policy.repo(repo.full_name)


def reply(ctx: HandlerContext, number: int, text: str) -> None:
    """Post a short answer on the pull request, once: a delivery handled again after a crash
    or a forge outage finds its earlier answer by the hidden marker and does not repeat it."""
    ctx.replies += 1
    marker = f"delivery {ctx.delivery_id} reply {ctx.replies}"
    if ctx.client.find_comment(number, marker_line(marker)) is None:
        ctx.client.create_comment(number, with_marker(text, marker))


def pull_projects(ctx: HandlerContext, policy: RepoPolicy, pull: PullRequest) -> list[NarrowedProject]:
    """The projects the repo-level file (read from the base branch) leaves, with their autoplan."""
    repo_file = None
    if policy.repo_config_file:
        repo_file = ctx.client.read_file(pull.base_ref, policy.repo_config_file)
    narrowed, warnings = narrow_projects(list(policy.projects), repo_file)
    for warning in warnings:
        log.warning("%s %s: %s", pull.repo.full_name, policy.repo_config_file, warning)
    return narrowed


def changed_projects(
    ctx: HandlerContext, pull: PullRequest, projects: Sequence[Project | NarrowedProject]
) -> list[Project]:
    """The projects whose autoplan files (or local modules) the pull request changes."""
    changed = ctx.client.changed_files(pull.number)
    plain = [p.project if isinstance(p, NarrowedProject) else p for p in projects]
    module_dirs = _module_dirs(ctx, pull.head_sha, [p.dir for p in plain if not p.autoplan])
    return projects_to_autoplan(projects, changed, module_dirs)


def _module_dirs(ctx: HandlerContext, sha: str, project_dirs: list[str]) -> dict[str, set[str]]:
    """The local modules each project calls, MODULE_DEPTH levels deep."""
    try:
        return ctx.module_dirs(sha, project_dirs, MODULE_DEPTH)
    except GitError as exc:
        # The plan job fetches again and says on the PR what failed; autoplan goes on without modules.
        log.warning("could not read the modules of %s at %s: %s", ", ".join(project_dirs), sha[:8], exc)
        return {}


def start_plan(
    ctx: HandlerContext, pull: PullRequest, projects: list[Project], trigger: str, requested_by: str
) -> None:
    """Lock the projects for this PR and queue one plan run for those it got.

    Each project's status comes from its job ("planning…" when it starts, then the outcome).
    """
    _queue_run(ctx, pull, projects, "plan", trigger, requested_by, PLAN_CONTEXT, "planning")


def start_apply(
    ctx: HandlerContext, pull: PullRequest, projects: list[Project], trigger: str, requested_by: str
) -> None:
    """Queue one apply run; the worker checks every requirement again when it starts."""
    _queue_run(ctx, pull, projects, "apply", trigger, requested_by, APPLY_CONTEXT, "applying")


def _queue_run(ctx: HandlerContext, pull: PullRequest, projects: list[Project], command: str,
               trigger: str, requested_by: str, context: str, doing: str) -> None:
    """Lock what can be locked, set the run's pending status (`doing` N projects), then queue the run."""
    policy = repo_policy(ctx, pull.repo)
    cap = policy.max_projects_per_pull if policy is not None else 0
    if cap and len(projects) > cap:
        ctx.store.audit(requested_by, command, "refused", pull.repo.full_name, sha=pull.head_sha,
                        detail=f"#{pull.number}: {len(projects)} projects, more than max_projects_per_pull {cap}")
        reply(ctx, pull.number, TOO_MANY_PROJECTS.format(command=command, count=len(projects), cap=cap))
        return
    locked = _lock(ctx, pull, projects, requested_by)
    key = run_key(ctx, command)
    if not locked or ctx.store.has_run(key):
        return  # nothing to run; or this delivery was handled before a restart and queued its run
    # Before the run is queued: set after, it could reach the forge after the worker's final
    # status and leave a finished run pending (a retried call can take seconds). It is only
    # a status: the run goes ahead without it.
    try:
        ctx.client.set_status(pull.head_sha, context, "pending", f"{doing} {len(locked)} project(s)")
    except ForgeError as exc:
        log.error("could not set %s on %s@%s: %s", context, pull.repo.full_name, pull.head_sha[:8], exc)
    if ctx.store.add_run(key, pull.repo, pull.number, pull.head_sha, command, trigger, requested_by, locked):
        ctx.wake_workers()


def run_key(ctx: HandlerContext, command: str) -> str:
    """The key of the run a delivery queues for a command: one run per delivery and command."""
    return f"{ctx.delivery_id}:{command}"


def _lock(ctx: HandlerContext, pull: PullRequest, projects: list[Project], user: str) -> list[Project]:
    locked = []
    # One transaction for all: a monorepo change can touch thousands of projects.
    attempts = ctx.store.try_locks([project_key(pull.repo, project) for project in projects], pull.repo,
                                   pull.number, user)
    for project, attempt in zip(projects, attempts):
        if attempt.acquired:
            locked.append(project)
        elif attempt.holder is not None:
            ctx.store.audit(user, "lock", "refused", pull.repo.full_name, project.label, pull.head_sha,
                            f"#{pull.number}: locked by #{attempt.holder.pull_number}")
            reply(ctx, pull.number, LOCKED_BY_OTHER.format(
                label=project.label, pull=attempt.holder.pull_number, holder=attempt.holder.holder))
    return locked


def planned_projects(ctx: HandlerContext, pull: PullRequest, projects: list[Project]) -> list[Project]:
    """Those of the projects with a saved plan that has changes, for the current head."""
    plans = {p.project_key: p for p in ctx.store.plans_for_pull(pull.repo, pull.number)}
    waiting = []
    for project in projects:
        plan = plans.get(project_key(pull.repo, project))
        if plan and plan.has_changes and plan.head_sha == pull.head_sha:
            waiting.append(project)
    return waiting


def refresh_apply_status(ctx: HandlerContext, policy: RepoPolicy, pull: PullRequest, requested_by: str) -> None:
    """After an approval changed: apply if the repo auto-applies, else say what is missing."""
    projects = [n.project for n in pull_projects(ctx, policy, pull)]
    waiting = planned_projects(ctx, pull, projects)
    if not waiting or pull.state != "open":
        return
    blockers = {p.label: apply_blockers(ctx.client, ctx.store, policy, pull, p) for p in waiting}
    missing = [f"{label}: {reasons[0]}" for label, reasons in blockers.items() if reasons]
    if not missing and policy.auto_apply_on_approval:
        # The approver asked for nothing, so the apply runs with their authority checked here.
        if may(ctx.client, requested_by, policy.apply):
            start_apply(ctx, pull, waiting, "approval", requested_by)
            return
        missing = [f"@{requested_by} approved, but may not apply: comment `deploybot apply` as an applier"]
    description = "ready: comment `deploybot apply`" if not missing else missing[0]
    ctx.client.set_status(pull.head_sha, APPLY_CONTEXT, "pending", description)
