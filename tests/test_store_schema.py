"""The store's schema migrations, and one serving process per SQLite store (issue 14)."""

from __future__ import annotations

import hashlib
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from bot.sandbox.trial import free_port, wait_for
from bot.store import SavedPlan, SchemaTooNew, ServeLock, Store, StoreInUse
from bot.store.migrations import BASE_SCHEMA, LATEST


def versions(path: Path) -> list[int]:
    db = sqlite3.connect(path)
    try:
        return [row[0] for row in db.execute("SELECT version FROM schema_version ORDER BY version")]
    finally:
        db.close()


def test_a_new_store_gets_every_migration_once(tmp_path: Path) -> None:
    Store(tmp_path / "db").close()
    Store(tmp_path / "db").close()
    assert versions(tmp_path / "db") == list(range(1, LATEST + 1))


def test_a_data_dir_from_before_migrations_is_migrated_and_keeps_its_data(tmp_path: Path) -> None:
    """The first releases: no version table, no plans.shown_at, no runner tokens."""
    path = tmp_path / "deploybot.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(BASE_SCHEMA.replace("    shown_at TEXT,", "").replace(
        "                -- the forge's time of the comment that showed it; NULL: not shown yet\n", "\n"))
    assert "shown_at" not in {row[1] for row in old.execute("PRAGMA table_info(plans)")}
    legacy = tmp_path / "pr-7.tfplan"  # plans were files beside the database then
    legacy.write_bytes(b"an old plan")
    old.execute("INSERT INTO plans (project_key, pull_number, head_sha, planfile, sha256, has_changes, created_at)"
                " VALUES ('github:acme/live:staging:default', 7, 'abc', ?, ?, 1, 1.0)",
                (str(legacy), hashlib.sha256(b"an old plan").hexdigest()))
    old.commit()
    old.close()

    store = Store(path)
    try:
        plan = store.get_plan("github:acme/live:staging:default", 7)
        assert plan == SavedPlan("github:acme/live:staging:default", 7, "abc", str(legacy),
                                 hashlib.sha256(b"an old plan").hexdigest(), True, None)
        assert store.plan_content(plan) == b"an old plan"  # still applies after the upgrade
        assert store.add_runner_token("plans", "0" * 64) == 1  # a table the old release had not
    finally:
        store.close()
    assert versions(path) == list(range(1, LATEST + 1))


def test_a_store_migrated_by_a_newer_deploybot_is_refused(tmp_path: Path) -> None:
    Store(tmp_path / "db").close()
    db = sqlite3.connect(tmp_path / "db")
    db.execute("INSERT INTO schema_version (version) VALUES (?)", (LATEST + 1,))
    db.commit()
    db.close()
    with pytest.raises(SchemaTooNew, match=f"schema version {LATEST + 1}.*only up to {LATEST}"):
        Store(tmp_path / "db")
    config = minimal_config(tmp_path, data_dir=tmp_path)
    (tmp_path / "deploybot.sqlite3").write_bytes((tmp_path / "db").read_bytes())
    done = subprocess.run([sys.executable, "-m", "bot.cli", "serve", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "newer deploybot" in done.stderr and "Traceback" not in done.stderr


def minimal_config(tmp_path: Path, data_dir: Path | None = None) -> Path:
    port = free_port()
    (tmp_path / "policy.yaml").write_text("repos: {}\n")
    config = tmp_path / "config.yaml"
    config.write_text(f"server:\n  port: {port}\n  data_dir: {data_dir or tmp_path / 'data'}\n"
                      f"policy_file: {tmp_path / 'policy.yaml'}\n")
    return config


def test_a_second_serve_on_one_sqlite_store_is_refused_until_the_first_is_gone(tmp_path: Path) -> None:
    config = minimal_config(tmp_path)
    port = int(config.read_text().split("port: ")[1].split()[0])
    serve = [sys.executable, "-m", "bot.cli", "serve", "--config", str(config)]
    first = subprocess.Popen(serve, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _healthy(port), 30, "the first bot")
        second = subprocess.run(serve, capture_output=True, text=True, timeout=60)
        assert second.returncode == 2
        assert f"another deploybot serve (pid {first.pid})" in second.stderr and "one deploybot serve" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)  # however it ends, the kernel lets go of the lock
        first.wait()
    third = subprocess.Popen(serve, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _healthy(port), 30, "a bot after the first was killed")
    finally:
        third.terminate()
        third.wait(30)
    # In one process too: the lock is released when the bot stops, and taken again.
    lock = ServeLock(tmp_path / "other.sqlite3")
    with pytest.raises(StoreInUse):
        ServeLock(tmp_path / "other.sqlite3")
    lock.release()
    ServeLock(tmp_path / "other.sqlite3").release()


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        time.sleep(0.1)
        return False
