"""The databases the store runs on: SQLite (embedded, one process) and PostgreSQL (replicas).

Both take the same SQL, written in the subset they share (`?` parameters, `ON CONFLICT`,
`RETURNING`); a backend gives connections and write transactions. A write transaction
is exclusive on both: SQLite's `BEGIN IMMEDIATE`, and on PostgreSQL one advisory lock
taken first in every write transaction, across every replica. So what the store decides
in a transaction (the next job of a project, a lock, who reports a run) is decided once,
whichever process asks.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg

# PRAGMA wal_autocheckpoint: a write that takes the WAL past this many pages copies them into
# the database before it returns. At SQLite's default of 1000 pages (4 MB: one 25 KB webhook in
# ~160) that held the event loop for 10-15 ms, the intake's p99; at 250 it is ~3 ms, for
# ~0.03 ms more per write on average.
WAL_AUTOCHECKPOINT_PAGES = 250

# The advisory lock every PostgreSQL write transaction of the store takes ("dpl" + "oybt").
WRITE_LOCK = 0x64706C6F79627400 - (1 << 63)


# What a store call raises when the database cannot be written or reached right now (a full
# disk, a lost connection): callers answer 503 or wait and try again; never a 500.
UNAVAILABLE: tuple[type[Exception], ...] = (sqlite3.OperationalError, psycopg.OperationalError)

# What a claim raises when another replica claimed a conflicting row at the same moment (a
# unique index said no): nothing was claimed, and asking again sees the other's claim.
CONFLICT: tuple[type[Exception], ...] = (sqlite3.IntegrityError, psycopg.IntegrityError)


class Cursor(Protocol):
    rowcount: int

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Connection(Protocol):
    """What store methods run their SQL on."""

    dialect: str

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Cursor: ...


class Backend(Protocol):
    dialect: str

    def connection(self) -> Any: ...  # a context manager giving a Connection

    def transaction(self) -> Any: ...  # the same, inside one exclusive write transaction

    def row_lock(self, alias: str) -> str: ...  # the clause that locks the selected rows of `alias`

    def notify(self, db: Connection, topic: str) -> None: ...  # wake other replicas when it commits

    def close(self) -> None: ...


class SQLiteBackend:
    """One connection, shared by the process's threads under a lock."""

    dialect = "sqlite"

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")

    def execute(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Cursor:
        return self._db.execute(sql, args)

    @contextmanager
    def connection(self) -> Iterator["SQLiteBackend"]:
        with self._lock:
            yield self

    @contextmanager
    def transaction(self) -> Iterator["SQLiteBackend"]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self
                self._db.execute("COMMIT")
            finally:
                # After an error, also one of COMMIT itself. When a write failed on a full disk or
                # an I/O error SQLite has rolled back already: a second ROLLBACK would raise and
                # hide that error.
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")

    def row_lock(self, alias: str) -> str:
        return ""  # one writer at a time already

    def notify(self, db: Connection, topic: str) -> None:
        """One process serves a SQLite store: it wakes its own loops."""

    def close(self) -> None:
        with self._lock:
            self._db.close()


class _PgRow(dict):
    """A row by column name, as sqlite3.Row gives it, and by position."""

    def __init__(self, names: list[str], values: Sequence[Any]) -> None:
        super().__init__(zip(names, values))
        self._values = values

    def __getitem__(self, key: Any) -> Any:
        return self._values[key] if isinstance(key, int) else super().__getitem__(key)


def _pg_rows(cursor: Any) -> Any:
    names = [column.name for column in cursor.description or ()]
    return lambda values: _PgRow(names, values)


class _PgConnection:
    dialect = "postgresql"

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Any:
        # The store's SQL has no `%` and no `?` inside literals: `?` is always a parameter.
        return self._conn.execute(sql.replace("?", "%s"), tuple(args))


class PostgresBackend:
    """A pool of connections to one database; `?search_path=` in the URL picks a schema."""

    dialect = "postgresql"

    def __init__(self, url: str, max_connections: int = 8) -> None:
        from psycopg_pool import ConnectionPool

        conninfo, options = postgres_conninfo(url)
        self.url = url
        self._pool = ConnectionPool(conninfo, min_size=1, max_size=max_connections, open=False,
                                    kwargs={"autocommit": True, "row_factory": _pg_rows, **options})
        self._pool.open(wait=True, timeout=30)
        with self.connection() as db:
            # One channel per schema: stores in other schemas of the database are not woken.
            self.channel = "deploybot_" + db.execute("SELECT current_schema()").fetchone()[0]

    @contextmanager
    def connection(self) -> Iterator[_PgConnection]:
        with self._pool.connection() as conn:
            yield _PgConnection(conn)

    @contextmanager
    def transaction(self) -> Iterator[_PgConnection]:
        with self._pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
            yield _PgConnection(conn)

    def row_lock(self, alias: str) -> str:
        """Claims (one UPDATE each, not behind the write lock) go on side by side, each skipping
        rows another claim holds; unique indexes settle the rest (CONFLICT)."""
        return f" FOR UPDATE OF {alias} SKIP LOCKED"

    def notify(self, db: Connection, topic: str) -> None:
        """Every replica listening hears `topic` once the transaction commits (bot.store.wakeups)."""
        db.execute("SELECT pg_notify(?, ?)", (self.channel, topic))

    def close(self) -> None:
        self._pool.close()


def postgres_conninfo(url: str) -> tuple[str, dict[str, str]]:
    """libpq's URL, and psycopg connection options for the store's own `search_path=SCHEMA` parameter.

    Every other query parameter (`sslmode=require`, ...) stays in the URL for libpq.
    """
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    schemas = [value for key, value in query if key == "search_path"]
    rest = urlencode([(key, value) for key, value in query if key != "search_path"])
    options = {"options": f"-c search_path={schemas[-1]}"} if schemas else {}
    return urlunsplit(parts._replace(query=rest)), options


def open_backend(database: Path | str) -> SQLiteBackend | PostgresBackend:
    """A backend for a SQLite file, or a `postgresql://` URL."""
    if isinstance(database, str) and database.startswith(("postgresql://", "postgres://")):
        return PostgresBackend(database)
    return SQLiteBackend(Path(database))
