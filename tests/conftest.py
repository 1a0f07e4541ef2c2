"""Shared fixtures: real terraform with the null provider from a local mirror, real git repos.

- `tf_settings` (session): TerraformSettings whose CLI config names a filesystem
  mirror holding the null provider 2.1.2, so `terraform init` never touches the
  network; plugin cache and HOME live in a session temp dir.
- `terraform`: a `bot.jobs.terraform.Terraform` built from `tf_settings`.
- `make_world`: end-to-end worlds (tests/world.py), once on each forge.
- `make_git_repo` / `git_repo`: an "upstream" bare repository plus a working clone,
  with helpers to write files, commit and push (see `GitRepo`).
- `store_location`: where a test's store lives, once on each backend: a SQLite file, and a
  schema of its own in the PostgreSQL database `$DEPLOYBOT_TEST_DATABASE_URL` (default
  `postgresql://postgres@127.0.0.1:5432/test`). Without a reachable PostgreSQL those tests
  are skipped, and fail with `CI=true`.

Async code is driven with `asyncio.run(...)` inside plain test functions.
"""

from __future__ import annotations

import copy
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bot.jobs.terraform import Terraform, TerraformSettings, find_terraform, make_null_provider_mirror
from bot.sandbox.forges import FORGES
from bot.sandbox.trial import REPO, GitRepo, git  # noqa: F401  (git is used by test modules)
from tests.world import TEST_POLICY, MakeWorld, World


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


@pytest.fixture
def repo_dirs(tmp_path: Path) -> tuple[Path, Path]:
    """The forge client tests' bare repository (`main`, and a `feature` branch that edits, renames
    and adds files) and its clone; see `tests.forge_support`."""
    from tests.forge_support import make_repo_dirs

    return make_repo_dirs(tmp_path)


@pytest.fixture(params=sorted(FORGES))
def make_world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MakeWorld]:
    """Worlds on each forge in turn: every scenario has a GitHub and a GitLab twin.

    `make(policy_changes, callers=[...], **kwargs)`: the repository's policy updated by
    `policy_changes`, trigger API `callers`, and World's own keyword arguments.
    """
    worlds: list[World] = []

    def make(policy_changes: dict | None = None, callers: list | None = None, **kwargs) -> World:
        policy = copy.deepcopy(TEST_POLICY)
        policy["repos"][REPO].update(policy_changes or {})
        if callers:
            policy["callers"] = callers
        world = World(tmp_path / f"world{len(worlds)}", policy, forge=request.param, **kwargs)
        worlds.append(world)
        return world

    yield make
    for world in worlds:
        world.stop()


TEST_DATABASE_URL = os.environ.get("DEPLOYBOT_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture(params=["sqlite", "postgresql"])
def store_location(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path | str]:
    """A place for a fresh store: a SQLite file, or a PostgreSQL schema dropped afterwards."""
    if request.param == "sqlite":
        yield tmp_path / "deploybot.sqlite3"
        return
    import psycopg

    schema = f"test_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(TEST_DATABASE_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        if os.environ.get("CI") == "true":
            raise RuntimeError(f"PostgreSQL at {TEST_DATABASE_URL} is not reachable, and CI needs it: {exc}") from None
        pytest.skip(f"PostgreSQL is not reachable at {TEST_DATABASE_URL}")
    with admin:
        admin.execute(f"CREATE SCHEMA {schema}")
        try:
            yield f"{TEST_DATABASE_URL}?search_path={schema}"
        finally:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")
