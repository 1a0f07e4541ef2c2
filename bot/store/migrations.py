"""The store's schema as ordered migrations: each database records the last one it got.

The bot migrates its database when it starts, inside one write transaction (a second
process waits for it). A database that records a migration this code does not know was
made by a newer deploybot and is refused: running older code on it could lose what the
newer one keeps. A database from before migrations existed (no `schema_version` table) is
at version 0; the first migration's `IF NOT EXISTS` makes it a no-op there.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass


class SchemaTooNew(RuntimeError):
    """The database was migrated by a newer deploybot."""


@dataclass(frozen=True)
class Migration:
    version: int
    what: str
    apply: Callable[[sqlite3.Connection], None]


def _script(text: str) -> Callable[[sqlite3.Connection], None]:
    """Run each statement of `text` in the open transaction (executescript would commit it)."""
    def apply(db: sqlite3.Connection) -> None:
        statement = ""
        for line in text.splitlines(keepends=True):
            statement += line
            if sqlite3.complete_statement(statement):
                db.execute(statement)
                statement = ""
    return apply


def _add_column(table: str, column: str, definition: str) -> Callable[[sqlite3.Connection], None]:
    def apply(db: sqlite3.Connection) -> None:
        if column not in {row[1] for row in db.execute(f"PRAGMA table_info({table})")}:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
    return apply


BASE_SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    id TEXT PRIMARY KEY,          -- the forge's delivery id: a redelivery is a no-op
    forge TEXT NOT NULL,
    event TEXT NOT NULL,
    body BLOB NOT NULL,           -- emptied once handled without error
    status TEXT NOT NULL,         -- received | done | failed
    error TEXT NOT NULL DEFAULT '',
    received_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,       -- handlings that failed on a forge outage
    next_attempt_at REAL NOT NULL DEFAULT 0
);
-- The dispatcher asks for pending deliveries every second: never scan the stored bodies.
CREATE INDEX IF NOT EXISTS deliveries_pending ON deliveries(status, next_attempt_at, received_at);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,     -- what caused it (delivery id + command): re-dispatch adds nothing
    repo TEXT NOT NULL,           -- Repo as JSON
    repo_key TEXT NOT NULL,
    pull_number INTEGER NOT NULL,
    head_sha TEXT NOT NULL,
    command TEXT NOT NULL,        -- plan | apply
    trigger TEXT NOT NULL,        -- comment | autoplan | approval | merge
    requested_by TEXT NOT NULL,
    reported INTEGER NOT NULL DEFAULT 0,  -- 0 not yet, 1 being reported, 2 reported
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id INTEGER NOT NULL REFERENCES runs(id),
    project TEXT NOT NULL,        -- Project as JSON
    project_key TEXT NOT NULL,    -- forge:repo:dir:workspace; two jobs on one key never run at once
    status TEXT NOT NULL,         -- waiting (for approval) | queued | running | succeeded | failed | cancelled | interrupted
    result TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, id);
CREATE TABLE IF NOT EXISTS plans (
    project_key TEXT NOT NULL,
    pull_number INTEGER NOT NULL,
    head_sha TEXT NOT NULL,
    planfile TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    has_changes INTEGER NOT NULL,
    created_at REAL NOT NULL,
    shown_at TEXT,                -- the forge's time of the comment that showed it; NULL: not shown yet
    PRIMARY KEY (project_key, pull_number)
);
CREATE TABLE IF NOT EXISTS locks (
    project_key TEXT PRIMARY KEY,
    repo TEXT NOT NULL,
    pull_number INTEGER NOT NULL,
    holder TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS decisions (
    run_id INTEGER PRIMARY KEY REFERENCES runs(id),  -- a plan run started from the trigger API
    approved INTEGER NOT NULL,
    decided_by TEXT NOT NULL,     -- the forge login the approver was mapped to
    via TEXT NOT NULL,            -- slack | api
    decided_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    repo TEXT NOT NULL DEFAULT '',
    project TEXT NOT NULL DEFAULT '',
    sha TEXT NOT NULL DEFAULT '',
    outcome TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS used_once (
    scope TEXT NOT NULL,          -- "jti:<issuer>", "nonce:<caller>", "slack"
    value TEXT NOT NULL,
    expires_at REAL NOT NULL,     -- kept until then; afterwards the token or timestamp is stale anyway
    PRIMARY KEY (scope, value)
);
-- Approvals by SHA (before plan ids) approve no plan: dropped, never carried over.
DROP TABLE IF EXISTS approvals;
CREATE TABLE IF NOT EXISTS plan_approvals (
    project_key TEXT NOT NULL,
    pull_number INTEGER NOT NULL,
    plan_sha256 TEXT NOT NULL,    -- the approved plan; a new plan of the project deletes these rows
    user TEXT NOT NULL,
    comment_id INTEGER NOT NULL,  -- the `deploybot approve` comment
    approved_at TEXT NOT NULL,    -- the forge's time of that comment
    PRIMARY KEY (project_key, pull_number, plan_sha256, user)
);
CREATE TABLE IF NOT EXISTS acted_comments (
    comment_key TEXT PRIMARY KEY, -- forge:repo:comment id: a comment is acted on once
    delivery_id TEXT NOT NULL     -- whichever delivery brought it first (its retries go on)
);
CREATE TABLE IF NOT EXISTS pushers (
    repo_key TEXT NOT NULL,
    pull_number INTEGER NOT NULL,
    login TEXT NOT NULL,          -- lower case: who opened or pushed to the PR, as its webhooks say
    PRIMARY KEY (repo_key, pull_number, login)
);
CREATE TABLE IF NOT EXISTS repo_ids (
    repo_key TEXT PRIMARY KEY,    -- forge:full name, lower-cased (repo_key)
    repo_id INTEGER NOT NULL,     -- the forge's id first seen for that name: a later other id is refused
    first_seen REAL NOT NULL
);
"""

MIGRATIONS = (
    Migration(1, "the schema of the first releases", _script(BASE_SCHEMA)),
    Migration(2, "plans.shown_at: when the forge showed a plan (data dirs made before it)",
              _add_column("plans", "shown_at", "TEXT")),
    Migration(3, "runner tokens", _script("""
CREATE TABLE IF NOT EXISTS runner_tokens (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    pool TEXT NOT NULL,           -- the one pool the token claims jobs of
    sha256 TEXT NOT NULL UNIQUE,  -- of the token: the token itself is shown once and never stored
    created_at REAL NOT NULL,
    revoked_at REAL
);
""")),
)
LATEST = MIGRATIONS[-1].version


def migrate(db: sqlite3.Connection, where: str) -> int:
    """Bring the database up to LATEST in one write transaction; the version it was at."""
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = db.execute("SELECT MAX(version) FROM schema_version").fetchone()
        found = row[0] or 0
        if found > LATEST:
            raise SchemaTooNew(f"the database {where} has schema version {found}, but this deploybot knows only "
                               f"up to {LATEST}: run the newer deploybot that migrated it (or restore a backup)")
        for migration in MIGRATIONS:
            if migration.version > found:
                migration.apply(db)
                db.execute("INSERT INTO schema_version (version) VALUES (?)", (migration.version,))
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return found
