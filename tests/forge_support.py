"""What the forge client tests (`test_github_client.py`, `test_gitlab_client.py`) share.

- `git`, `commit` and `push_to_feature`: git in a working clone, as a test author would run it.
- `make_repo_dirs`: the bare repository both fakes serve, and its clone (conftest's
  `repo_dirs` fixture).
- `webhook_receiver`: a plain HTTP server that records every webhook a fake sends it.
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

Received = list[tuple[dict[str, str], bytes]]  # (headers with lower-case names, body), oldest first


def git(cwd: Path, *args: str) -> str:
    result = subprocess.run(
        ["git", "-c", "user.name=Test", "-c", "user.email=test@example.com", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip()


def commit(work: Path, files: dict[str, str | None], message: str) -> str:
    """Write (or, for None, delete) files in the clone, commit and return the new SHA."""
    for name, text in files.items():
        path = work / name
        if text is None:
            git(work, "rm", "-q", name)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        git(work, "add", name)
    git(work, "commit", "-q", "-m", message)
    return git(work, "rev-parse", "HEAD")


def make_repo_dirs(tmp_path: Path) -> tuple[Path, Path]:
    """A bare repository with `main` and a `feature` branch that edits, renames and adds files; and its clone."""
    bare, work = tmp_path / "infra.git", tmp_path / "work"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(bare)], check=True)
    subprocess.run(["git", "clone", "-q", str(bare), str(work)], check=True, capture_output=True)
    git(work, "checkout", "-q", "-b", "main")
    commit(
        work,
        {"main.tf": 'resource "null_resource" "a" {}\n', "old.tf": "# old\n" * 20, "modules/net/main.tf": "# net\n"},
        "initial",
    )
    git(work, "push", "-q", "origin", "main")
    git(work, "checkout", "-q", "-b", "feature")
    git(work, "mv", "old.tf", "new.tf")
    commit(work, {"main.tf": 'resource "null_resource" "b" {}\n', "env/prod.tf": "# prod\n"}, "change")
    git(work, "push", "-q", "origin", "feature")
    git(work, "checkout", "-q", "main")
    return bare, work


def push_to_feature(work: Path, files: dict[str, str | None], message: str) -> str:
    """Commit to the `feature` branch and push it; return the new SHA (the clone is left on `main`)."""
    git(work, "checkout", "-q", "feature")
    sha = commit(work, files, message)
    git(work, "push", "-q", "origin", "feature")
    git(work, "checkout", "-q", "main")
    return sha


class _Receiver(BaseHTTPRequestHandler):
    received: Received

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
        self.send_response(202)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def webhook_receiver(path: str) -> Iterator[tuple[str, Received]]:
    """Answer every POST with 202 on a free port of 127.0.0.1; yield the URL (ending in `path`) and what arrived."""
    received: Received = []
    handler = type("Handler", (_Receiver,), {"received": received})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}{path}", received
    finally:
        server.shutdown()
        server.server_close()
