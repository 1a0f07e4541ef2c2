"""A delivery whose handling meets a forge outage is tried again later, not lost."""

from __future__ import annotations

import asyncio
from pathlib import Path

from bot.forges.vcs import ForgeError
from bot.jobs.dispatcher import Dispatcher
from bot.metrics import Metrics
from bot.models import CommentEvent
from bot.store import Delivery, Store
from handlers.router import Router

COMMENT = (b'{"action": "created", "issue": {"number": 1, "pull_request": {"url": "x"}},'
           b' "comment": {"id": 5, "user": {"login": "alice"}, "body": "deploybot plan"},'
           b' "repository": {"full_name": "acme/infra", "clone_url": "file:///x", "default_branch": "main"},'
           b' "installation": {"id": 1}, "sender": {"login": "alice"}}')


def run_dispatcher(store: Store, router: Router, seconds: float) -> None:
    async def go() -> None:
        dispatcher = Dispatcher(store, router, lambda delivery, event: None, Metrics(store))  # type: ignore[arg-type]
        await dispatcher.start()
        await asyncio.sleep(seconds)
        await dispatcher.stop()

    asyncio.run(go())


def test_outage_is_retried_later_and_other_errors_are_final(tmp_path: Path, monkeypatch):
    monkeypatch.setattr("bot.jobs.dispatcher.RETRY_BASE_SECONDS", 0.2)
    store = Store(tmp_path / "db.sqlite3")
    calls: list[int] = []
    router = Router()

    @router.register("comment", "created")
    def flaky(event: CommentEvent, ctx) -> None:
        calls.append(event.comment_id)
        if len(calls) < 3:
            raise ForgeError("GitHub answered 502", status=502)

    store.add_delivery(Delivery("d1", "github", "issue_comment", COMMENT))
    run_dispatcher(store, router, 3.5)
    assert len(calls) == 3  # two outages, then handled
    assert store.delivery_status("d1") == "done"

    @router.register("comment", "created")
    def forbidden(event: CommentEvent, ctx) -> None:
        raise ForgeError("GitHub answered 404", status=404)

    store.add_delivery(Delivery("d2", "github", "issue_comment", COMMENT.replace(b'"id": 5', b'"id": 6')))
    run_dispatcher(store, router, 1.0)
    assert store.delivery_status("d2") == "failed"
