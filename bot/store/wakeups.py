"""Replicas wake each other: PostgreSQL's LISTEN/NOTIFY on the store's channel.

The store notifies a topic when it commits work another replica may take: `jobs` (queued),
`deliveries` (released by a dead replica), `lease:<pool>` (offered to a runner pool),
`lease-done` (a runner's result), `forget-pull:<pull request>` (closed: every replica drops
its working dirs of it). A thread of each replica listens on a connection of its
own and hands each topic to the event loop. A wake-up only saves waiting: every loop also
looks again every second or so, so one lost while the connection is down costs a second,
not the work. A webhook wakes the dispatcher of the replica that stored it.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

import psycopg
from psycopg import sql

from bot.store.backends import postgres_conninfo

log = logging.getLogger("deploybot.wakeups")

RECONNECT_SECONDS = 2.0


class Wakeups:
    """Listens on the store's channel in a thread; calls `on_topic(topic)` from that thread."""

    def __init__(self, url: str, channel: str, on_topic: Callable[[str], None]) -> None:
        self.url = url
        self.channel = channel
        self.on_topic = on_topic
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="store-wakeups", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)

    def _listen(self) -> None:
        conninfo, options = postgres_conninfo(self.url)
        lost = False
        while not self._stopping.is_set():
            try:
                with psycopg.connect(conninfo, autocommit=True, connect_timeout=10, **options) as conn:
                    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
                    if lost:
                        log.info("listening for other replicas again")
                        lost = False
                    while not self._stopping.is_set():
                        for notice in conn.notifies(timeout=1.0):
                            self.on_topic(notice.payload)
            except psycopg.Error as exc:
                if not lost:
                    log.warning("cannot hear other replicas (%s): their work is picked up by polling meanwhile",
                                type(exc).__name__)
                lost = True
                self._stopping.wait(RECONNECT_SECONDS)
