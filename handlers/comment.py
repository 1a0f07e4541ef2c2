"""`deploybot <command>` comments on a pull request: the command table is wired here."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from bot.apply_gate import may
from bot.models import CommentEvent, Project, PullRequest
from bot.store import project_key
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
from policies.policy import RepoPolicy, Subjects, select_projects

router = Router()

NOT_ALLOW_LISTED = "🚫 This repository is not allow-listed in deploybot's policy; deploybot runs nothing here."
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
SELF_APPROVAL = "🚫 @{user} opened this pull request and cannot approve it."
APPROVED = "👍 @{user} approved {what} at {sha}."
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
    if isinstance(parsed, Reply):
        reply(ctx, event.pull_number, parsed.text)
        return
    policy = repo_policy(ctx, event.repo)
    if policy is None:
        reply(ctx, event.pull_number, NOT_ALLOW_LISTED)
        return
    pull = ctx.client.get_pull_request(event.pull_number)
    if pull.state != "open":
        reply(ctx, pull.number, NOT_OPEN)
        return
    if pull.is_fork and not policy.allow_forks:
        reply(ctx, pull.number, FORK_REFUSED)
        return
    command = COMMANDS[parsed.name]
    if not may(ctx.client, event.author, command.allowed(policy)):
        ctx.store.audit(event.author, parsed.name, "refused", pull.repo.full_name, sha=pull.head_sha,
                        detail="not allowed by the policy")
        reply(ctx, pull.number, NOT_ALLOWED.format(user=event.author, command=parsed.name))
        return
    projects = _selected(ctx, policy, pull, parsed)
    if projects is not None:
        command.run(ctx, policy, pull, parsed, projects, event.author)


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
         projects: list[Project], user: str) -> None:
    if not _has_filters(cmd):
        projects = changed_projects(ctx, pull, projects)
        if not projects:
            reply(ctx, pull.number, NOTHING_CHANGED)
            return
    start_plan(ctx, pull, projects, "comment", user)


def apply(ctx: HandlerContext, policy: RepoPolicy, pull: PullRequest, cmd: Command,
          projects: list[Project], user: str) -> None:
    waiting = planned_projects(ctx, pull, projects)
    if not waiting:
        which = f" of {', '.join(p.label for p in projects)}" if _has_filters(cmd) else ""
        reply(ctx, pull.number, NOTHING_TO_APPLY.format(sha=pull.head_sha[:8], which=which))
        return
    start_apply(ctx, pull, waiting, "comment", user)


def approve(ctx: HandlerContext, policy: RepoPolicy, pull: PullRequest, cmd: Command,
            projects: list[Project], user: str) -> None:
    if user.lower() == pull.author.lower():
        ctx.store.audit(user, "approve", "refused", pull.repo.full_name, sha=pull.head_sha,
                        detail="the author cannot approve")
        reply(ctx, pull.number, SELF_APPROVAL.format(user=user))
        return
    if _has_filters(cmd):
        for project in projects:
            ctx.store.add_approval(pull.repo, pull.number, user, pull.head_sha, project.label)
        what = ", ".join(f"`{p.label}`" for p in projects)
    else:
        ctx.store.add_approval(pull.repo, pull.number, user, pull.head_sha, None)
        what = "every project"
    ctx.store.audit(user, "approve", "approved", pull.repo.full_name, what, pull.head_sha)
    reply(ctx, pull.number, APPROVED.format(user=user, what=what, sha=pull.head_sha[:8]))
    refresh_apply_status(ctx, policy, pull, user)


def unlock(ctx: HandlerContext, policy: RepoPolicy, pull: PullRequest, cmd: Command,
           projects: list[Project], user: str) -> None:
    freed = []
    for project in projects:
        key = project_key(pull.repo, project)
        if ctx.store.unlock(key, pull.number):
            freed.append(project.label)
        ctx.store.delete_plan(key, pull.number)
    what = ", ".join(f"`{label}`" for label in freed)
    ctx.store.audit(user, "unlock", "unlocked" if freed else "nothing locked", pull.repo.full_name,
                    ", ".join(freed), pull.head_sha)
    everything = "the selected projects" if _has_filters(cmd) else "this pull request's projects"
    reply(ctx, pull.number, UNLOCKED.format(what=what) if freed else NOTHING_LOCKED.format(what=everything))


def cancel(ctx: HandlerContext, policy: RepoPolicy, pull: PullRequest, cmd: Command,
           projects: list[Project], user: str) -> None:
    plans = [j for j in ctx.store.unfinished_jobs(pull.repo, pull.number) if j.run.command == "plan"]
    ctx.store.cancel_queued([j.id for j in plans])
    ctx.cancel_jobs(plans)
    reply(ctx, pull.number, CANCELLED.format(count=len(plans)))


CommandHandler = Callable[[HandlerContext, RepoPolicy, PullRequest, Command, list[Project], str], None]


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
