"""Shared fixtures: real terraform with the null provider from a local mirror, real git repos.

- `tf_settings` (session): TerraformSettings whose CLI config names a filesystem
  mirror holding the null provider 2.1.2, so `terraform init` never touches the
  network; plugin cache and HOME live in a session temp dir.
- `terraform`: a `bot.terraform.Terraform` built from `tf_settings`.
- `make_git_repo` / `git_repo`: an "upstream" bare repository plus a working clone,
  with helpers to write files, commit and push (see `GitRepo`).

Async code is driven with `asyncio.run(...)` inside plain test functions.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from bot.terraform import Terraform, TerraformSettings, find_terraform, make_null_provider_mirror

# Git for the test helpers runs without the developer's or CI's global config.
_GIT_ENV = {
    "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    "LC_ALL": "C",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_TERMINAL_PROMPT": "0",
}
_GIT_IDENTITY = ("-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false")


@pytest.fixture(scope="session")
def tf_settings(tmp_path_factory: pytest.TempPathFactory) -> TerraformSettings:
    """Settings for real terraform 1.0.3 that installs the null provider from a local mirror.

    Tests needing other timeouts or env use `dataclasses.replace(tf_settings, ...)`.
    """
    base = tmp_path_factory.mktemp("terraform")
    return TerraformSettings(
        binary=find_terraform(),
        plugin_cache_dir=base / "plugin-cache",
        home_dir=base / "home",
        cli_config_file=make_null_provider_mirror(base),
        kill_grace=3,
    )


@pytest.fixture
def terraform(tf_settings: TerraformSettings) -> Terraform:
    """A Terraform runner with the session settings."""
    return Terraform(tf_settings)


def git(*args: str, cwd: Path | None = None) -> str:
    """Run git for a test (not the code under test); return stripped stdout."""
    done = subprocess.run(
        ["git", *_GIT_IDENTITY, *args],
        cwd=cwd,
        env=_GIT_ENV,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} failed: {done.stderr}")
    return done.stdout.strip()


class GitRepo:
    """An upstream bare repo (`bare`, reachable at `url`) and a working clone (`work`).

    Typical use::

        a = repo.commit({"main.tf": "..."}, push="main")
        b = repo.commit({"old.tf": None}, message="remove old.tf")  # None deletes
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
    ) -> str:
        """Write `files`, commit everything, optionally push to branch `push`; return the SHA."""
        if files:
            self.write(files)
        git("add", "--all", cwd=self.work)
        git("commit", "--quiet", "--allow-empty", "-m", message, cwd=self.work)
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


@pytest.fixture
def make_git_repo(tmp_path: Path) -> Callable[[str], GitRepo]:
    """Factory: `make_git_repo("name")` gives a fresh GitRepo under tmp_path/name."""

    def make(name: str = "repo") -> GitRepo:
        root = tmp_path / name
        root.mkdir()
        return GitRepo(root)

    return make


@pytest.fixture
def git_repo(make_git_repo: Callable[[str], GitRepo]) -> GitRepo:
    """One fresh GitRepo with no commits yet."""
    return make_git_repo("repo")
