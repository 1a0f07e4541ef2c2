"""What a handler gets besides the event: the store, the policy, the forge client, the queue."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

from bot.forges.vcs import VCSClient
from bot.models import Repo
from bot.store import Job, Store
from policies.policy import Policy


@dataclass
class HandlerContext:
    """Everything a handler may touch. Handlers run in a worker thread, so all of it blocks."""

    delivery_id: str
    store: Store
    policy: Policy
    client: VCSClient  # the client for the event's repository
    bot_login: str
    wake_workers: Callable[[], None]
    cancel_jobs: Callable[[list[Job]], None]  # stop running plans, report cancelled runs
    forget_pull: Callable[[Repo, int], None]  # remove a closed pull request's working dirs and plan files
    # (sha, project dirs, depth) -> the local module dirs each calls at sha, read through git
    module_dirs: Callable[[str, Iterable[str], int], dict[str, set[str]]]
    replies: int = 0  # answers posted so far while handling this delivery: each one's marker
