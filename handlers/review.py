"""A review was submitted or dismissed: the apply requirements may have changed."""

from __future__ import annotations

from bot.models import ReviewEvent
from handlers.context import HandlerContext
from handlers.project_commands import refresh_apply_status, repo_policy
from handlers.router import Router

router = Router()

# GitHub's "changes requested", and a dismissed review or withdrawn GitLab approval.
WITHDRAWING_STATES = frozenset({"changes_requested", "dismissed"})


@router.register("review", "submitted")
@router.register("review", "dismissed")
def review_changed(event: ReviewEvent, ctx: HandlerContext) -> None:
    """Re-evaluate the apply status (and auto-apply) against the forge's reviews now."""
    policy = repo_policy(ctx, event.pull.repo)
    if policy is None:
        return
    if event.state.lower() in WITHDRAWING_STATES:
        # Whoever asks for changes (or withdraws their approval) no longer approves by comment either.
        voided = ctx.store.void_approvals_by(event.pull.repo, event.pull.number, event.reviewer)
        if voided:
            ctx.store.audit(event.reviewer, "approve", "voided", event.pull.repo.full_name,
                            sha=event.pull.head_sha, detail=f"{voided} comment approval(s) voided by a "
                            f"{event.state} review")
    # The payload may be stale by the time we run: judge the PR as it is now.
    pull = ctx.client.get_pull_request(event.pull.number)
    refresh_apply_status(ctx, policy, pull, event.reviewer)
