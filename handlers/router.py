"""Handlers registered by event type and action; each module has a router, combined in one place."""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Callable

from bot.models import CommentEvent, Event, PullRequestEvent, ReviewEvent
from handlers.context import HandlerContext

log = logging.getLogger("deploybot.handlers")

Handler = Callable[[Event, HandlerContext], None]

_EVENT_NAMES: dict[type, str] = {
    PullRequestEvent: "pull_request",
    CommentEvent: "comment",
    ReviewEvent: "review",
}


def event_key(event: Event) -> tuple[str, str]:
    """(event type, action) of a domain event; a new comment's action is `created`."""
    return _EVENT_NAMES[type(event)], getattr(event, "action", "created")


class Router:
    """Maps (event type, action) to handlers; several actions may share one handler."""

    def __init__(self, *others: "Router") -> None:
        self._handlers: dict[tuple[str, str], list[Handler]] = defaultdict(list)
        for other in others:
            for key, handlers in other._handlers.items():
                self._handlers[key].extend(handlers)

    def register(self, event_type: str, action: str) -> Callable[[Handler], Handler]:
        """Decorator: call the handler for this event type and action."""

        def decorator(handler: Handler) -> Handler:
            self._handlers[(event_type, action)].append(handler)
            return handler

        return decorator

    def dispatch(self, event: Event, ctx: HandlerContext) -> int:
        """Run every handler for the event; return how many ran."""
        handlers = self._handlers.get(event_key(event), [])
        if not handlers:
            log.info("no handler for %s/%s", *event_key(event))
        for handler in handlers:
            handler(event, ctx)
        return len(handlers)
