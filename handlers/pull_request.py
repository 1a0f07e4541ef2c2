"""Pull request opened, updated, reopened or closed: autoplan, or clean up (and apply on merge)."""

from __future__ import annotations

import logging

from bot.jobs.apply_gate import may
from bot.models import PullRequestEvent
from handlers.context import HandlerContext
from handlers.project_commands import (
    changed_projects,
    planned_projects,
    pull_projects,
    reply,
    repo_policy,
    run_key,
    start_apply,
    start_plan,
)
from handlers.router import Router
from policies.apply_requirements import merge_apply_refusals

log = logging.getLogger("deploybot.handlers")
router = Router()

FORK_REFUSED = (
    "deploybot does not plan pull requests from forks in this repository: their code would run "
    "with this account's credentials. Push the branch to the repository itself to get a plan."
)
AUTOPLAN_NOT_ALLOWED = (
    "deploybot did not autoplan: @{user} may not plan in this repository. "
    "Someone who may can comment `deploybot plan`."
)
MERGE_NOT_APPLIED = "🚫 This pull request was merged, but deploybot applied nothing: {reasons}."
MERGED_WITHOUT_PLAN = (
    "This pull request was merged, but there is no saved plan with changes for its head {sha}, "
    "so deploybot applied nothing."
)


@router.register("pull_request", "opened")
@router.register("pull_request", "updated")
@router.register("pull_request", "reopened")
def autoplan(event: PullRequestEvent, ctx: HandlerContext) -> None:
    """Plan every allow-listed project whose files the pull request changes."""
    pull = event.pull
    policy = repo_policy(ctx, pull.repo)
    if policy is None:
        log.info("%s is not allow-listed; not planning #%s", pull.repo.full_name, pull.number)
        return
    if event.action in ("opened", "updated"):
        # A commit's e-mail can name anyone; who pushed is the forge's own word, and never approves.
        ctx.store.add_pusher(pull.repo, pull.number, event.sender)
    if event.action == "updated" and not ctx.store.has_run(run_key(ctx, "plan")):
        # Older plans stop. Not when this very delivery queued its plans before a crash cut
        # its handling off: handled again, it must not cancel what it did itself.
        _cancel_pull_jobs(ctx, event, command="plan")
    if pull.is_fork and not policy.allow_forks:
        if event.action != "updated":
            reply(ctx, pull.number, FORK_REFUSED)
        return
    # Asked first: the forge answers while the head commit is still being fetched for the
    # module scan below (see Deploybot.context_for), instead of after it.
    allowed = may(ctx.client, event.sender, policy.plan)
    to_plan = changed_projects(ctx, pull, pull_projects(ctx, policy, pull))
    if not to_plan:
        return
    if not allowed:
        reply(ctx, pull.number, AUTOPLAN_NOT_ALLOWED.format(user=event.sender))
        return
    start_plan(ctx, pull, to_plan, "autoplan", event.sender)


@router.register("pull_request", "closed")
def closed(event: PullRequestEvent, ctx: HandlerContext) -> None:
    """Stop the PR's plans; apply its reviewed plans if merged and the repo applies on merge."""
    pull = event.pull
    _cancel_pull_jobs(ctx, event, command="plan")
    policy = repo_policy(ctx, pull.repo)
    if pull.merged and policy is not None and policy.apply_on_merge:
        # The merge is the approval: judge it as the forge API reports it, not as the payload says.
        pull = ctx.client.get_pull_request(pull.number)
        if refusals := merge_apply_refusals(policy, pull):
            ctx.store.audit(event.sender, "apply", "refused", pull.repo.full_name, sha=pull.head_sha,
                            detail="apply on merge: " + "; ".join(refusals))
            reply(ctx, pull.number, MERGE_NOT_APPLIED.format(reasons="; ".join(refusals)))
        else:
            projects = [n.project for n in pull_projects(ctx, policy, pull)]
            waiting = planned_projects(ctx, pull, projects)
            if waiting:
                start_apply(ctx, pull, waiting, "merge", event.sender)
                return  # the worker frees the locks and the working dirs once the apply has run
            reply(ctx, pull.number, MERGED_WITHOUT_PLAN.format(sha=pull.head_sha[:8]))
    for plan in ctx.store.plans_for_pull(pull.repo, pull.number):
        ctx.store.delete_plan(plan.project_key, pull.number)
    for lock in ctx.store.locks_for_pull(pull.repo, pull.number):
        ctx.store.unlock(lock.project_key, pull.number)
    ctx.forget_pull(pull.repo, pull.number)


def _cancel_pull_jobs(ctx: HandlerContext, event: PullRequestEvent, command: str) -> None:
    jobs = [j for j in ctx.store.unfinished_jobs(event.pull.repo, event.pull.number)
            if j.run.command == command]
    ctx.store.cancel_queued([j.id for j in jobs])
    ctx.cancel_jobs(jobs)
