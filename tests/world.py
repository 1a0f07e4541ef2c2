"""An end-to-end world: a real git repo, a local forge API, and the real bot over HTTP.

Tests drive the local forge the way people drive GitHub or GitLab (open a pull
request, comment, approve, merge); the fake sends signed webhooks to the bot, and
the bot calls the fake's API through PyGithub or python-gitlab and runs real terraform.
"""

from __future__ import annotations

import copy
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import httpx

from bot.config import load_config
from bot.sandbox.forges import FORGES, SandboxForge
from bot.sandbox.trial import POLICY, REPO, BotServer, GitRepo, git, project_files, wait_for, write_config
from bot.store import FINISHED, Store

TEST_POLICY = copy.deepcopy(POLICY)
TEST_POLICY["repos"][REPO]["apply_requirements"] = ["approved"]


class World:
    """One repository on the local GitHub, the bot serving it, and helpers to act and wait."""

    def __init__(self, root: Path, policy: dict | None = None, in_process: bool = True,
                 forge: str = "github", extra_config: dict | None = None, **terraform: Any) -> None:
        self.root = root
        self.state_dir = root / "state"
        self.state_dir.mkdir(parents=True)
        self.repo = GitRepo(root)
        self.repo.commit(project_files(self.state_dir, {"staging": "small", "production": "small"}),
                         "Two projects", push="main")
        self.forge: SandboxForge = FORGES[forge]()
        self.forge.start(self.repo.bare)
        self.policy = copy.deepcopy(policy or TEST_POLICY)
        self.config_path = write_config(root, self.forge, self.policy, extra_config, **terraform)
        self.in_process = in_process
        self.server: BotServer | None = None
        self.process: subprocess.Popen | None = None
        self.start_bot()

    # The bot ----------------------------------------------------------------------

    def start_bot(self) -> None:
        if self.in_process:
            self.server = BotServer(self.config_path).start()
            self.url = self.server.url
        else:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "bot.cli", "serve", "--config", str(self.config_path),
                 "--log-level", "info"],
                stdout=subprocess.DEVNULL, stderr=open(self.root / "bot.log", "ab"),
            )
            port = int(self.config_path.read_text().split("port: ")[1].split()[0])
            self.url = f"http://127.0.0.1:{port}"
            wait_for(self._healthy, 30, "the bot to start")
        self.forge.set_webhook(self.url)

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def kill_bot(self) -> None:
        """SIGKILL the bot process: no shutdown code runs."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)
        self.forge.stop()

    def store(self) -> Store:
        """A second handle on the bot's database, for assertions."""
        return Store(load_config(self.config_path).server.database)

    def job_logs(self) -> dict[int, str]:
        """Every job's log as the store keeps it (raw terraform output), by job id."""
        store = self.store()
        try:
            jobs = [job for status in FINISHED + ("running",) for job in store.jobs_with_status(status)]
            return {job.id: store.job_log(job.id)[0].decode(errors="replace") for job in jobs}
        finally:
            store.close()

    def wait_idle(self, timeout: float = 120) -> None:
        """Wait until every delivery was handled and no job is queued or running."""
        store = self.store()
        try:
            def idle() -> bool:
                return (not store.pending_deliveries() and not store.jobs_with_status("queued")
                        and not store.jobs_with_status("running"))
            wait_for(idle, timeout, "the bot to go idle")
        finally:
            store.close()

    # Acting like people on GitHub ---------------------------------------------------

    def open_pr(self, branch: str, files: dict[str, str | None], author: str = "alice",
                fork: bool = False, base: str = "main") -> int:
        self.repo.branch(branch, base)
        self.repo.commit(files, f"Change on {branch}", push=branch)
        return self.forge.open(branch, author=author, fork=fork, base=base)

    def push(self, number: int, branch: str, files: dict[str, str | None]) -> str:
        """Commit to the pull request's branch and let the forge tell the bot."""
        git("switch", "--quiet", branch, cwd=self.repo.work)
        sha = self.repo.commit(files, "Another change", push=branch)
        self.forge.synchronize(number)
        return sha

    def comment(self, number: int, user: str, body: str) -> int:
        return self.forge.comment(number, user, body)

    def head(self, number: int) -> str:
        return self.forge.head(number)

    # Looking ------------------------------------------------------------------------

    def bot_comments(self, number: int) -> list[str]:
        return [c["body"] for c in self.forge.comments(number) if c["user"] == self.forge.bot_login]

    def wait_comment(self, number: int, contains: str, timeout: float = 120, after: int = 0) -> str:
        """The first bot comment (from index `after`) containing the text."""

        def found() -> str | None:
            return next((b for b in self.bot_comments(number)[after:] if contains in b), None)

        return wait_for(found, timeout, f"a bot comment on #{number} containing {contains!r}")  # type: ignore[return-value]

    def statuses(self, number: int) -> dict[str, tuple[str, str]]:
        return self.forge.statuses(number)

    def wait_status(self, number: int, context: str, state: str, timeout: float = 60) -> str:
        """Wait until the head's status `context` is `state`; return its description."""
        wait_for(lambda: self.statuses(number).get(context, ("", ""))[0] == state, timeout,
                 f"status {context} to be {state}")
        return self.statuses(number)[context][1]

    def wait_for_description(self, number: int, context: str, contains: str, timeout: float = 60) -> str:
        """Wait until the head's status `context` has a description containing the text."""
        wait_for(lambda: contains in self.statuses(number).get(context, ("", ""))[1], timeout,
                 f"status {context} to say {contains!r}")
        return self.statuses(number)[context][1]

    def state_resources(self, project: str) -> int:
        """How many resources terraform's state of the project holds."""
        path = self.state_dir / f"{project}.tfstate"
        if not path.exists():
            return 0
        return len(json.loads(path.read_text()).get("resources", []))


def staging_change(world: World, size: str = "large") -> dict[str, str]:
    """Files that change the staging project only."""
    return {"staging/main.tf": project_files(world.state_dir, {"staging": size})["staging/main.tf"]}


MakeWorld = Callable[..., World]  # the `make_world` fixture (tests/conftest.py)


def visible(body: str) -> str:
    """A bot comment without its hidden marker line (what it reports, for finding it again)."""
    return body.split("\n\n<!-- deploybot:")[0]
