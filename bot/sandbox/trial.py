"""`deploybot sandbox`: the whole pull-request flow on this machine, with only the forge local.

It makes a local `infrastructure-live` repository with two Terraform projects, starts
a local GitHub-compatible API and the real bot, and walks plan → approval → apply.
Webhooks are signed and sent over HTTP, the bot calls the API through PyGithub, and
terraform really runs: the same code paths as production. The tests build their
worlds from the same parts.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Callable

import uvicorn
import yaml

from bot.app import create_app
from bot.config import load_config
from bot.jobs.terraform import find_terraform, make_null_provider_mirror
from bot.sandbox.forges import FORGES, REPO, TEAM, SandboxForge, email_of

PROJECT_TF = """\
terraform {{
  required_providers {{
    null = {{ source = "hashicorp/null", version = "2.1.2" }}
  }}
  backend "local" {{ path = "{state}" }}
}}

module "app" {{
  source = "../modules/app"
  name   = "{name}"
}}

resource "null_resource" "web" {{
  triggers = {{ size = "{size}" }}
}}
"""

MODULE_TF = """\
variable "name" { type = string }

resource "null_resource" "this" {
  triggers = { name = var.name }
}
"""

POLICY = {
    "repos": {
        REPO: {
            "plan": {"permission": "write"},
            "apply": {"teams": [TEAM]},
            "approvers": {"teams": [TEAM]},
            "apply_requirements": ["approved", "mergeable"],
            "approvals": 1,
            "projects": [
                {"name": "staging", "dir": "staging"},
                {"name": "production", "dir": "production"},
            ],
        }
    }
}


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Git for the sandbox and the tests runs without the developer's or CI's global config.
_GIT_ENV = {
    "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    "LC_ALL": "C",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_TERMINAL_PROMPT": "0",
}
_GIT_IDENTITY = ("-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false")


def git(*args: str, cwd: Path | None = None) -> str:
    """Run git for the sandbox or a test (not the code under test); return stripped stdout."""
    done = subprocess.run(
        ["git", *_GIT_IDENTITY, *args],
        cwd=cwd,
        env=_GIT_ENV,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {done.stderr}")
    return done.stdout.strip()


class GitRepo:
    """An upstream bare repo (`bare`, reachable at `url`) and a working clone (`work`).

    Typical use::

        a = repo.commit({"main.tf": "..."}, push="main")
        b = repo.commit({"old.tf": None}, message="remove old.tf")  # None deletes
        c = repo.commit({"main.tf": "..."}, author="bob")  # authored and committed by bob@example.com
        repo.push("feature")
    """

    def __init__(self, root: Path) -> None:
        self.bare = root / "upstream.git"
        self.work = root / "work"
        git("init", "--quiet", "--bare", "-b", "main", str(self.bare))
        git("init", "--quiet", "-b", "main", str(self.work))
        git("remote", "add", "origin", str(self.bare), cwd=self.work)

    @property
    def url(self) -> str:
        """The clone URL the bot would get from a payload (`file://`)."""
        return self.bare.as_uri()

    def write(self, files: Mapping[str, str | None]) -> None:
        """Write (or, for None, delete) files in the working clone; paths are repo-relative."""
        for rel, text in files.items():
            path = self.work / rel
            if text is None:
                path.unlink()
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)

    def commit(
        self,
        files: Mapping[str, str | None] | None = None,
        message: str = "change",
        push: str | None = None,
        author: str | None = None,
    ) -> str:
        """Write `files`, commit everything, optionally push to branch `push`; return the SHA.

        The commit's author and committer are "t <t@example.com>", an email no forge account
        has, unless `author` names a sandbox person: then both are them, with the email the
        sandbox forges know them by (`email_of`).
        """
        if files:
            self.write(files)
        git("add", "--all", cwd=self.work)
        identity = ("-c", f"user.name={author}", "-c", f"user.email={email_of(author)}") if author else ()
        git(*identity, "commit", "--quiet", "--allow-empty", "-m", message, cwd=self.work)
        if push:
            self.push(push)
        return self.sha()

    def push(self, branch: str = "main") -> None:
        """Push the working clone's HEAD to `branch` upstream (forced)."""
        git("push", "--quiet", "--force", "origin", f"HEAD:refs/heads/{branch}", cwd=self.work)

    def branch(self, name: str, start: str = "HEAD") -> None:
        """Switch the working clone to a new branch `name` at `start`."""
        git("switch", "--quiet", "-c", name, start, cwd=self.work)

    def sha(self, ref: str = "HEAD") -> str:
        """The full SHA of `ref` in the working clone."""
        return git("rev-parse", f"{ref}^{{commit}}", cwd=self.work)


def project_files(state_dir: Path, sizes: dict[str, str]) -> dict[str, str]:
    """Terraform files for each project (name → size), plus the shared module."""
    files = {"modules/app/main.tf": MODULE_TF}
    for name, size in sizes.items():
        state = (state_dir / f"{name}.tfstate").as_posix()
        files[f"{name}/main.tf"] = PROJECT_TF.format(state=state, name=name, size=size)
    return files


def write_config(root: Path, forge: SandboxForge, policy: dict, extra: dict | None = None,
                 **terraform: object) -> Path:
    """Write a policy file and a config file for the forge (plus `extra` sections); return its path."""
    (root / "policy.yaml").write_text(yaml.safe_dump(policy, sort_keys=False))
    cli_config = make_null_provider_mirror(root / "terraform-mirror")
    port = free_port()
    config = {
        "server": {"host": "127.0.0.1", "port": port, "public_url": f"http://127.0.0.1:{port}",
                   "data_dir": str(root / "data")},
        **forge.config_section(root),
        # Jobs see the provider mirror, and share the trial's local state (a real deployment
        # keeps state in a backend such as S3, and shares nothing between jobs).
        "terraform": {"binary": find_terraform(), "cli_config_file": str(cli_config),
                      "plugin_cache_dir": str(root / "plugin-cache"),
                      "sandbox_read_only": [str(cli_config.parent)], "sandbox_read_write": [str(root / "state")],
                      **terraform},
        "policy_file": str(root / "policy.yaml"),
    }
    for section, values in (extra or {}).items():
        config.setdefault(section, {}).update(values)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class BotServer:
    """The real ASGI app under uvicorn on a background thread."""

    def __init__(self, config_path: Path) -> None:
        self.config = load_config(config_path)
        self.url = f"http://{self.config.server.host}:{self.config.server.port}"
        self.app = create_app(self.config)
        self._server = uvicorn.Server(uvicorn.Config(
            self.app, host=self.config.server.host, port=self.config.server.port,
            log_level="warning", lifespan="on"))
        self._thread = threading.Thread(target=self._server.run, name="deploybot", daemon=True)

    def start(self) -> "BotServer":
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("deploybot did not start")
            time.sleep(0.05)
        return self

    def wait_idle(self, timeout: float = 120) -> None:
        """Wait until every delivery was handled and no job is queued or running."""
        store = self.app.state.bot.store

        def idle() -> bool:
            return not (store.pending_deliveries() or store.jobs_with_status("queued")
                        or store.jobs_with_status("running"))

        wait_for(idle, timeout, "deploybot to go idle")

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=60)


def wait_for(predicate: Callable[[], object], timeout: float = 120, what: str = "condition") -> object:
    """Poll until the predicate returns something truthy; return it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


class Narrator:
    """Prints each new comment and status on the pull request as it appears."""

    def __init__(self, forge: SandboxForge) -> None:
        self.forge = forge
        self.number = 0
        self._seen_comments = 0
        self._seen_statuses: set[tuple] = set()

    def say(self, text: str) -> None:
        print(f"\n\033[1m▶ {text}\033[0m", flush=True)

    def catch_up(self) -> None:
        comments = self.forge.comments(self.number)
        for comment in comments[self._seen_comments:]:
            print(f"\n💬 @{comment['user']} commented:\n{_indent(comment['body'])}", flush=True)
        self._seen_comments = len(comments)
        sha = self.forge.head(self.number)
        for context, (state, description) in sorted(self.forge.statuses(self.number).items()):
            key = (sha, context, state, description)
            if key not in self._seen_statuses:
                self._seen_statuses.add(key)
                print(f"   status {context} = {state}: {description}", flush=True)

    def wait_for_comment(self, contains: str, timeout: float = 300) -> dict:
        def found() -> dict | None:
            self.catch_up()
            for comment in self.forge.comments(self.number):
                if contains in comment["body"] and comment["user"] == self.forge.bot_login:
                    return comment
            return None

        return wait_for(found, timeout, f"a comment containing {contains!r}")  # type: ignore[return-value]


def _indent(text: str) -> str:
    lines = text.splitlines()
    if len(lines) > 40:
        lines = lines[:40] + [f"… ({len(lines) - 40} more lines)"]
    return "\n".join(f"    {line}" for line in lines)


def bare_terraform_seconds(root: Path, project_dir: Path, cli_config: Path) -> float:
    """Time a plain `terraform init && terraform plan` of a copy of the project, cold."""
    copy = root / "bare-run"
    shutil.copytree(project_dir.parent, copy, ignore=shutil.ignore_patterns(".git", ".terraform*"))
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(root),
           "TF_CLI_CONFIG_FILE": str(cli_config), "TF_IN_AUTOMATION": "1", "TF_INPUT": "0"}
    workdir = copy / project_dir.name
    started = time.monotonic()
    terraform = find_terraform()
    for args in (["init", "-input=false"], ["plan", "-input=false", "-lock=false"]):
        subprocess.run([terraform, *args], cwd=workdir, env=env, capture_output=True, check=False)
    return time.monotonic() - started


def run_sandbox(directory: str | None, keep: bool = False, forge_name: str = "github") -> int:
    """Walk the whole flow on a local forge; return a process exit code."""
    root = Path(directory or tempfile.mkdtemp(prefix="deploybot-sandbox-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    print(f"deploybot sandbox ({forge_name}) in {root}")
    repo = GitRepo(root)
    state_dir = root / "state"
    state_dir.mkdir(exist_ok=True)
    repo.commit(project_files(state_dir, {"staging": "small", "production": "small"}),
                "Two projects", push="main")

    forge: SandboxForge = FORGES[forge_name]()
    forge.start(repo.bare)
    bot = None
    try:
        bot = BotServer(write_config(root, forge, POLICY)).start()
        forge.set_webhook(bot.url)
        print(f"local {forge_name} API and deploybot at {bot.url} are up")

        narrator = Narrator(forge)
        narrator.say("alice pushes a branch that resizes staging and asks for a review")
        repo.branch("resize-staging", "main")
        repo.commit({"staging/main.tf": project_files(state_dir, {"staging": "large"})["staging/main.tf"]},
                    "Resize staging", push="resize-staging")
        sent = time.monotonic()
        narrator.number = forge.open("resize-staging", author="alice")
        narrator.wait_for_comment("deploybot plan")
        webhook_to_comment = time.monotonic() - sent

        narrator.say("alice comments `deploybot apply`: she may plan, but not apply")
        forge.comment(narrator.number, "alice", "deploybot apply")
        narrator.wait_for_comment("may not")

        narrator.say(f"bob ({TEAM}) comments `deploybot apply` before anyone approved")
        forge.comment(narrator.number, "bob", "deploybot apply")
        narrator.wait_for_comment("apply refused")

        narrator.say("dave (also platform) approves in the forge's UI")
        forge.approve(narrator.number, "dave")
        bot.wait_idle()
        narrator.catch_up()

        narrator.say("bob comments `deploybot apply` again")
        forge.comment(narrator.number, "bob", "deploybot apply")
        narrator.wait_for_comment(": applied")

        narrator.say("the change is merged: deploybot frees the lock")
        forge.merge(narrator.number)
        time.sleep(1)
        narrator.catch_up()

        bare = bare_terraform_seconds(root, repo.work / "staging",
                                      root / "terraform-mirror" / "terraformrc")
        print(f"\nwebhook → plan comment: {webhook_to_comment:.2f}s; "
              f"bare `terraform init && terraform plan`: {bare:.2f}s")
        print("\n✅ sandbox finished: plan → approval → apply worked end to end")
        return 0
    finally:
        if bot is not None:
            bot.stop()
        forge.stop()
        if not keep and directory is None:
            shutil.rmtree(root, ignore_errors=True)
