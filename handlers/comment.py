"""`deploybot <command>` comments on a pull request: the command table is wired here."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Callable

from bot.jobs.apply_gate import excluded, may
from bot.models import CommentEvent, Project, PullRequest, plan_id
from bot.store import SavedPlan, project_key
from handlers.comment_parser import Command, Reply, parse_comment
from handlers.context import HandlerContext
from handlers.project_commands import (
    changed_projects,
    planned_projects,
    pull_projects,
    refresh_apply_status,
    reply,
    repo_policy,
    start_apply,
    start_plan,
)
from handlers.router import Router
from policies.apply_requirements import shown_by
from policies.policy import RepoPolicy, Subjects, select_projects

log = logging.getLogger("deploybot.handlers")
router = Router()

NOT_OPEN = "🚫 This pull request is closed; deploybot runs nothing on it."
FORK_REFUSED = "🚫 This pull request comes from a fork, and this repository's policy does not plan forks."
NOT_ALLOWED = "🚫 @{user} may not `{command}` in this repository."
NO_SUCH_PROJECT = "🚫 No allow-listed project matches {filters}. Allow-listed projects: {known}."
NOTHING_CHANGED = (
    "No allow-listed project is changed by this pull request. "
    "Name one with `deploybot plan -p PROJECT` or `-d DIR`."
)
NOTHING_TO_APPLY = (
    "There is no saved plan with changes for {sha}{which}. Comment `deploybot plan` first."
)
SELF_APPROVAL = (
    "🚫 @{user} opened this pull request or authored or committed one of its commits, "
    "and cannot approve it."
)
UNCONFIRMED = (
    "🚫 deploybot could not confirm this `approve` with the forge (the comment is gone or was "
    "changed); approve again in a new comment."
)
NOTHING_SHOWN = (
    "🚫 Nothing approved: no plan with changes of the current head {sha}{which} was shown on this "
    "pull request before @{user}'s comment. An approval is of the plans shown when you approve; "
    "a newer plan needs a new approval."
)
UNKNOWN_PLAN_IDS = (
    "🚫 Nothing approved: {ids} is not a current plan shown on this pull request before "
    "@{user}'s comment. Current plans: {known}."
)
APPROVED = "👍 @{user} approved {what}."
UNLOCKED = "🔓 Unlocked {what}; its saved plans were discarded."
NOTHING_LOCKED = "Nothing of {what} is locked by this pull request."
CANCELLED = "⏹️ Cancelled {count} queued or running plan(s). A running apply is never stopped halfway."


@router.register("comment", "created")
def comment_created(event: CommentEvent, ctx: HandlerContext) -> None:
    """Parse the comment and run the command it names, if the policy allows it."""
    if event.author.lower() == ctx.bot_login.lower():
        return  # our own comments quote commands in help texts
    parsed = parse_comment(event.body)
    if parsed is None:
        return
    policy = repo_policy(ctx, event.repo)
    if policy is None:
        # Not even a usage reply: nothing of a repository the policy does not name reaches its API.
        log.info("%s is not allow-listed; ignoring a comment on #%s", event.repo.full_name, event.pull_number)
        if isinstance(parsed, Command):
            ctx.store.audit(event.author, parsed.name, "refused", event.repo.full_name,
                            detail="the repository is not allow-listed")
        return
    if isinstance(parsed, Reply):
        reply(ctx, event.pull_number, parsed.text)
        return
    comment_key = f"{event.repo.forge}:{event.repo.full_name.lower()}:{event.comment_id}"
    if not ctx.store.claim_comment(comment_key, ctx.delivery_id):
        # The same comment brought again (a redelivery, a replayed capture): acted on once only.
        log.info("comment %s was acted on before; ignoring delivery %s", comment_key, ctx.delivery_id)
        ctx.store.audit(event.author, parsed.name, "refused", event.repo.full_name,
                        detail=f"comment {event.comment_id} was acted on before (delivery {ctx.delivery_id})")
        return

    pull = ctx.client.get_pull_request(event.pull_number)
    if pull.state != "open":
        _refuse(ctx, event, parsed.name, pull.head_sha, NOT_OPEN, "the pull request is closed")
        return
    if pull.is_fork and not policy.allow_forks:
        _refuse(ctx, event, parsed.name, pull.head_sha, FORK_REFUSED, "the pull request comes from a fork")
        return
    command = COMMANDS[parsed.name]
    if not may(ctx.client, event.author, command.allowed(policy)):
        _refuse(ctx, event, parsed.name, pull.head_sha, NOT_ALLOWED.format(user=event.author, command=parsed.name),
                "not allowed by the policy")
        return
    projects = _selected(ctx, policy, pull, parsed)
    if projects is not None:
        command.run(ctx, policy, pull, parsed, projects, event)


def _refuse(ctx: HandlerContext, event: CommentEvent, command: str, sha: str, text: str, detail: str) -> None:
    """Audit a refused command with its reason, and tell the pull request why."""
    ctx.store.audit(event.author, command, "refused", event.repo.full_name, sha=sha, detail=detail)
    reply(ctx, event.pull_number, text)


def _selected(ctx: HandlerContext, policy: RepoPolicy, pull: PullRequest, cmd: Command) -> list[Project] | None:
    """The projects the command's flags name, or None (after replying) if they name none."""
    projects = [n.project for n in pull_projects(ctx, policy, pull)]
    if not (cmd.project or cmd.dir or cmd.workspace):
        return projects
    # Select among the projects the repo-level file left, never the whole server policy.
    selected = select_projects(dataclasses.replace(policy, projects=tuple(projects)), name=cmd.project, dir=cmd.dir, workspace=cmd.workspace)
    if not selected:
        filters = " ".join(f"`{flag} {value}`" for flag, value in
                           (("-p", cmd.project), ("-d", cmd.dir), ("-w", cmd.workspace)) if value)
        known = ", ".join(f"`{p.label}`" for p in projects) or "none"
        reply(ctx, pull.number, NO_SUCH_PROJECT.format(filters=filters, known=known))
        return None
    return selected


def _has_filters(cmd: Command) -> bool:
    return bool(cmd.project or cmd.dir or cmd.workspace)


def plan(ctx: HandlerContext, policy: RepoPolicy, pull: PullRequest, cmd: Command,
         projects: list[Project], event: CommentEvent) -> None:
    if not _has_filters(cmd):
        projects = changed_projects(ctx, pull, projects)
        if not projects:
            reply(ctx, pull.number, NOTHING_CHANGED)
            return
    start_plan(ctx, pull, projects, "comment", event.author)


def apply(ctx: HandlerContext, policy: RepoPolicy, pull: PullRequest, cmd: Command,
          projects: list[Project], event: CommentEvent) -> None:
    waiting = planned_projects(ctx, pull, projects)
    if not waiting:
        which = f" of {', '.join(p.label for p in projects)}" if _has_filters(cmd) else ""
        reply(ctx, pull.number, NOTHING_TO_APPLY.format(sha=pull.head_sha[:8], which=which))
        return
    start_apply(ctx, pull, waiting, "comment", event.author)


def approve(ctx: HandlerContext, policy: RepoPolicy, pull: PullRequest, cmd: Command,
            projects: list[Project], event: CommentEvent) -> None:
    user = event.author

    def refuse(text: str, detail: str) -> None:
        _refuse(ctx, event, "approve", pull.head_sha, text, detail)

    if user.lower() in excluded(ctx.client, ctx.store, policy, pull):
        refuse(SELF_APPROVAL.format(user=user), "the author or a committer cannot approve")
        return
    # What the approver saw is judged by the comment as the forge has it, at the forge's time:
    # a replayed or late-handled webhook body must not move the moment of approval.
    comment = ctx.client.get_comment(pull.number, event.comment_id)
    if comment is None or comment.author.lower() != user.lower() or parse_comment(comment.body) != cmd:
        refuse(UNCONFIRMED, f"comment {event.comment_id} not confirmed by the forge")
        return
    shown = _shown_plans(ctx, pull, projects, comment.created_at)
    if cmd.plan_ids:
        unknown = [i for i in cmd.plan_ids if i not in {plan_id(p.sha256) for p, _ in shown}]
        if unknown:
            known = ", ".join(f"`{plan_id(p.sha256)}` ({label})" for p, label in shown) or "none"
            refuse(UNKNOWN_PLAN_IDS.format(ids=", ".join(f"`{i}`" for i in unknown), user=user, known=known),
                   f"unknown plan ids {', '.join(unknown)}")
            return
        shown = [(p, label) for p, label in shown if plan_id(p.sha256) in cmd.plan_ids]
    approved = [(p, label) for p, label in shown
                if ctx.store.approve_plan(p, user, event.comment_id, comment.created_at)]
    if not approved:
        which = f" of {', '.join(f'`{p.label}`' for p in projects)}" if _has_filters(cmd) else ""
        refuse(NOTHING_SHOWN.format(sha=pull.head_sha[:8], which=which, user=user),
               f"no plan shown before comment {event.comment_id}")
        return
    what = ", ".join(f"plan `{plan_id(p.sha256)}` of `{label}`" for p, label in approved)
    ctx.store.audit(user, "approve", "approved", pull.repo.full_name, what, pull.head_sha,
                    f"comment {event.comment_id}")
    reply(ctx, pull.number, APPROVED.format(user=user, what=what))
    refresh_apply_status(ctx, policy, pull, user)


def _shown_plans(ctx: HandlerContext, pull: PullRequest, projects: list[Project],
                 moment: str) -> list[tuple[SavedPlan, str]]:
    """The projects' saved plans with changes, of the current head, shown on the PR by `moment`."""
    shown = []
    for project in projects:
        saved = ctx.store.get_plan(project_key(pull.repo, project), pull.number)
        if saved and saved.has_changes and saved.head_sha == pull.head_sha and shown_by(saved.shown_at, moment):
            shown.append((saved, project.label))
    return shown


def unlock(ctx: HandlerContext, policy: RepoPolicy, pull: PullRequest, cmd: Command,
           projects: list[Project], event: CommentEvent) -> None:
    freed = []
    for project in projects:
        key = project_key(pull.repo, project)
        if ctx.store.unlock(key, pull.number):
            freed.append(project.label)
        ctx.store.delete_plan(key, pull.number)
    what = ", ".join(f"`{label}`" for label in freed)
    ctx.store.audit(event.author, "unlock", "unlocked" if freed else "nothing locked", pull.repo.full_name,
                    ", ".join(freed), pull.head_sha)
    everything = "the selected projects" if _has_filters(cmd) else "this pull request's projects"
    reply(ctx, pull.number, UNLOCKED.format(what=what) if freed else NOTHING_LOCKED.format(what=everything))


def cancel(ctx: HandlerContext, policy: RepoPolicy, pull: PullRequest, cmd: Command,
           projects: list[Project], event: CommentEvent) -> None:
    plans = [j for j in ctx.store.unfinished_jobs(pull.repo, pull.number) if j.run.command == "plan"]
    ctx.store.cancel_queued([j.id for j in plans])
    ctx.cancel_jobs(plans)
    reply(ctx, pull.number, CANCELLED.format(count=len(plans)))


CommandHandler = Callable[[HandlerContext, RepoPolicy, PullRequest, Command, list[Project], CommentEvent], None]


@dataclass(frozen=True)
class CommandSpec:
    """A comment command: what runs it, and which policy subjects may issue it."""

    run: CommandHandler
    allowed: Callable[[RepoPolicy], Subjects]


COMMANDS: dict[str, CommandSpec] = {
    "plan": CommandSpec(plan, lambda policy: policy.plan),
    "apply": CommandSpec(apply, lambda policy: policy.apply),
    "approve": CommandSpec(approve, lambda policy: policy.approvers),
    "unlock": CommandSpec(unlock, lambda policy: policy.plan),
    "cancel": CommandSpec(cancel, lambda policy: policy.plan),
}
