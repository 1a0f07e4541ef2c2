"""A review was submitted or dismissed: the apply requirements may have changed."""

from __future__ import annotations

from bot.models import ReviewEvent
from handlers.context import HandlerContext
from handlers.project_commands import refresh_apply_status, repo_policy
from handlers.router import Router

router = Router()


@router.register("review", "submitted")
@router.register("review", "dismissed")
def review_changed(event: ReviewEvent, ctx: HandlerContext) -> None:
    """Re-evaluate the apply status (and auto-apply) against the forge's reviews now.

    A change request or withdrawal needs nothing more here: the apply gate reads it from the
    forge's reviews (GitLab: its system notes) and drops the same user's comment approvals.
    """
    policy = repo_policy(ctx, event.pull.repo)
    if policy is None:
        return
    # The payload may be stale by the time we run: judge the PR as it is now.
    pull = ctx.client.get_pull_request(event.pull.number)
    refresh_apply_status(ctx, policy, pull, event.reviewer)
