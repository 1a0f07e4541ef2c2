"""bot.jobs.git against real git repositories made by the tests."""

from __future__ import annotations

import asyncio
import base64
import http.server
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import bot.jobs.git
from bot.jobs.git import GitError, RepoCache, escapes, header_secrets, local_module_dirs
from bot.report.comments import redact
from bot.sandbox.trial import GitRepo, git

KEY = "github:acme/infra"  # as bot.store.repo_key makes it


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def cache(tmp_path: Path) -> RepoCache:
    return RepoCache(tmp_path / "cache")


# --------------------------------------------------------------------------- fetch and checkout


def test_fetch_exact_sha_that_is_not_a_branch_tip(git_repo: GitRepo, cache: RepoCache, tmp_path: Path) -> None:
    first = git_repo.commit({"main.tf": "# first\n"})
    tip = git_repo.commit({"main.tf": "# second\n"}, push="main")

    async def scenario() -> Path:
        mirror = await cache.fetch(KEY, git_repo.url, first, None)
        assert mirror == tmp_path / "cache/mirrors/github/acme/infra.git"
        return await cache.checkout(KEY, first, tmp_path / "job")

    dest = run(scenario())
    assert (dest / "main.tf").read_text() == "# first\n"
    assert git("rev-parse", "HEAD", cwd=dest) == first
    assert first != tip


def test_fetch_of_a_missing_sha_raises(git_repo: GitRepo, cache: RepoCache) -> None:
    git_repo.commit({"main.tf": ""}, push="main")
    with pytest.raises(GitError, match="not our ref"):
        run(cache.fetch(KEY, git_repo.url, "1" * 40, None))


def test_fetch_skips_the_network_when_the_commit_is_there(git_repo: GitRepo, cache: RepoCache) -> None:
    sha = git_repo.commit({"main.tf": ""}, push="main")

    async def scenario() -> None:
        await cache.fetch(KEY, git_repo.url, sha, None)
        await cache.fetch(KEY, "http://127.0.0.1:1/unreachable.git", sha, None)

    run(scenario())


def test_concurrent_fetches_of_one_repo(git_repo: GitRepo, cache: RepoCache) -> None:
    shas = [git_repo.commit({"f": str(i)}) for i in range(3)]
    git_repo.push("main")

    async def scenario() -> None:
        await asyncio.gather(*(cache.fetch(KEY, git_repo.url, sha, None) for sha in shas))

    run(scenario())


def test_reused_checkout_keeps_terraform_dir_and_drops_everything_stale(
    git_repo: GitRepo, cache: RepoCache, tmp_path: Path
) -> None:
    old = git_repo.commit({"main.tf": "# v1\n", "old.tf": "# old\n", "mod/m.tf": "# m\n"}, push="main")
    new = git_repo.commit({"main.tf": "# v2\n", "old.tf": None}, push="main")
    dest = tmp_path / "job"

    run(cache.fetch(KEY, git_repo.url, old, None))
    run(cache.checkout(KEY, old, dest))
    (dest / ".terraform" / "providers").mkdir(parents=True)
    (dest / ".terraform" / "providers" / "marker").write_text("cached")
    (dest / "mod" / ".terraform").mkdir()
    (dest / "junk.tfplan").write_text("untracked")
    (dest / "main.tf").write_text("# edited locally\n")
    (dest / "mod" / ".terraform.lock.hcl").write_text("# written by init\n")

    run(cache.fetch(KEY, git_repo.url, new, None))
    run(cache.checkout(KEY, new, dest))
    assert git("rev-parse", "HEAD", cwd=dest) == new
    assert (dest / "main.tf").read_text() == "# v2\n"
    assert not (dest / "old.tf").exists()
    assert not (dest / "junk.tfplan").exists()
    assert (dest / ".terraform" / "providers" / "marker").read_text() == "cached"
    assert (dest / "mod" / ".terraform").is_dir()
    assert (dest / "mod" / ".terraform.lock.hcl").read_text() == "# written by init\n"

    # Keeping less: an untracked lock file goes; a committed one is reset to the commit.
    run(cache.checkout(KEY, new, dest, keep=(".terraform",)))
    assert not (dest / "mod" / ".terraform.lock.hcl").exists()
    assert (dest / ".terraform" / "providers" / "marker").exists()
    locked = git_repo.commit({".terraform.lock.hcl": "# committed\n"}, push="main")
    run(cache.fetch(KEY, git_repo.url, locked, None))
    run(cache.checkout(KEY, locked, dest))
    (dest / ".terraform.lock.hcl").write_text("# rewritten by init\n")
    run(cache.checkout(KEY, locked, dest))
    assert (dest / ".terraform.lock.hcl").read_text() == "# committed\n"


def test_checkout_refuses_a_foreign_directory(git_repo: GitRepo, cache: RepoCache, tmp_path: Path) -> None:
    sha = git_repo.commit({"main.tf": ""}, push="main")
    dest = tmp_path / "job"
    dest.mkdir()
    (dest / "precious.txt").write_text("not ours")
    run(cache.fetch(KEY, git_repo.url, sha, None))
    with pytest.raises(GitError, match="not a checkout"):
        run(cache.checkout(KEY, sha, dest))
    assert (dest / "precious.txt").exists()


def test_checkout_of_an_unfetched_sha_raises(git_repo: GitRepo, cache: RepoCache, tmp_path: Path) -> None:
    sha = git_repo.commit({"main.tf": ""}, push="main")
    with pytest.raises(GitError, match="has not been fetched"):
        run(cache.checkout(KEY, sha, tmp_path / "job"))


def test_submodules_are_never_fetched(git_repo: GitRepo, cache: RepoCache, tmp_path: Path) -> None:
    other = git_repo.commit({"main.tf": ""})
    # A gitlink (what `git submodule add` records), pointing at some commit.
    git("update-index", "--add", "--cacheinfo", f"160000,{other},vendored", cwd=git_repo.work)
    (git_repo.work / ".gitmodules").write_text(f'[submodule "vendored"]\n\tpath = vendored\n\turl = {git_repo.url}\n')
    git("add", ".gitmodules", cwd=git_repo.work)
    git("commit", "--quiet", "-m", "add submodule", cwd=git_repo.work)  # not commit(): `add --all` would drop the gitlink
    git_repo.push("main")
    sha = git_repo.sha()
    assert "160000 commit" in git("ls-tree", sha, "vendored", cwd=git_repo.work)
    dest = tmp_path / "job"
    run(cache.fetch(KEY, git_repo.url, sha, None))
    run(cache.checkout(KEY, sha, dest))
    assert (dest / "vendored").is_dir() and not any((dest / "vendored").iterdir())


def module(source: str) -> str:
    return f'module "m" {{\n  source = "{source}"\n}}\n'


def test_module_dirs_follows_local_modules_level_by_level(git_repo: GitRepo, cache: RepoCache) -> None:
    sha = git_repo.commit(
        {
            "live/a/main.tf": module("../../modules/net"),
            "live/b/main.tf": module("../../modules/my mods/[x]*"),
            "live/b/sub/main.tf": module("../../../modules/unused"),  # a subdirectory is not the project
            "modules/net/main.tf": module("../dns"),
            "modules/net/extra.tf.json": '{"module": {"j": {"source": "../json"}}}',
            "modules/dns/main.tf": module("../../../outside"),  # leaves the repository: dropped
            "modules/json/main.tf": "",
            "modules/my mods/[x]*/main.tf": module("../../deep1"),
            "modules/deep1/main.tf": module("../deep2"),
            "modules/deep2/main.tf": module("../deep3"),
            "modules/deep3/main.tf": "",
            "main.tf": module("./live/a"),
        },
        push="main",
    )
    (git_repo.work / "modules/json/big.tf").write_text("#" * (1 << 20) + "\n" + module("../big"))
    (git_repo.work / "modules/json/latin1.tf").write_bytes(module("../latin").encode() + b"\xff")
    (git_repo.work / "modules/linked.txt").write_text(module("../linked"))
    (git_repo.work / "modules/json/link.tf").symlink_to("../linked.txt")  # symlinks are not followed
    sha = git_repo.commit(push="main")

    async def scenario() -> None:
        await cache.fetch(KEY, git_repo.url, sha, None)
        found = await cache.module_dirs(KEY, sha, ["live/a", "live/b", ".", "missing"], depth=3)
        assert found == {
            "live/a": {"modules/net", "modules/dns", "modules/json"},
            "live/b": {"modules/my mods/[x]*", "modules/deep1", "modules/deep2"},  # three levels only
            ".": {"live/a", "modules/net", "modules/dns", "modules/json"},
            "missing": set(),
        }
        assert await cache.module_dirs(KEY, sha, [], depth=5) == {}

    run(scenario())


def test_module_dirs_of_a_commit_not_in_the_mirror_is_a_git_error(git_repo: GitRepo, cache: RepoCache) -> None:
    sha = git_repo.commit({"main.tf": module("./m"), "m/main.tf": ""}, push="main")
    run(cache.fetch(KEY, git_repo.url, sha, None))
    assert run(cache.module_dirs(KEY, "f" * 40, ["."], depth=2)) == {".": set()}  # nothing at that SHA
    with pytest.raises(GitError):
        run(cache.module_dirs(KEY, "not-a-sha", ["."], depth=2))


def test_bad_inputs_are_rejected_before_git_runs(cache: RepoCache) -> None:
    with pytest.raises(GitError, match="SHA"):
        run(cache.fetch(KEY, "https://example.com/r.git", "--upload-pack=touch /tmp/pwned", None))
    with pytest.raises(GitError, match="SHA"):
        run(cache.fetch(KEY, "https://example.com/r.git", "abc123", None))
    with pytest.raises(GitError, match="clone URL"):
        run(cache.fetch(KEY, "--upload-pack=touch /tmp/pwned", "a" * 40, None))
    for key in ("github:../etc", "github:acme", "github:acme/.hidden", "/abs/x/y", "github:acme/x/../..", ":a/b"):
        with pytest.raises(GitError, match="repository key"):
            cache.mirror_path(key)
    mirrors = cache.root / "mirrors"
    assert cache.mirror_path("gitlab:group/sub/project") == mirrors / "gitlab/group/sub/project.git"
    assert cache.mirror_path("github/acme/infra") == mirrors / "github/acme/infra.git"


# --------------------------------------------------------------------------- the auth header


class _RecordingHandler(http.server.BaseHTTPRequestHandler):
    """Answers every request 401 and records the Authorization headers it saw."""

    seen: list[str] = []

    def do_GET(self) -> None:
        self.seen.append(self.headers.get("Authorization", ""))
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Basic realm="test"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_401() -> Iterator[tuple[str, list[str]]]:
    """A local HTTP server refusing everything: (base URL, Authorization headers seen)."""
    handler = type("Handler", (_RecordingHandler,), {"seen": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler.seen
    finally:
        server.shutdown()
        server.server_close()


def test_auth_header_reaches_git_only_through_the_environment(
    cache: RepoCache, http_401: tuple[str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    token = "ghs_SuperSecretInstallationToken123"
    header = "Basic " + base64.b64encode(f"x-access-token:{token}".encode()).decode()
    base_url, seen = http_401

    spawned: list[tuple[tuple[str, ...], dict[str, str]]] = []
    real_spawn = asyncio.create_subprocess_exec

    async def recording_spawn(*argv: str, **kwargs):
        spawned.append((argv, kwargs.get("env") or {}))
        return await real_spawn(*argv, **kwargs)

    monkeypatch.setattr(bot.jobs.git.asyncio, "create_subprocess_exec", recording_spawn)

    with pytest.raises(GitError) as raised:
        run(cache.fetch(KEY, f"{base_url}/acme/infra.git", "a" * 40, header))

    assert seen and all(h == header for h in seen)  # git did send it
    message = str(raised.value)
    assert token not in message and header not in message
    assert "terminal prompts disabled" in message or "could not read" in message.lower()
    for argv, env in spawned:
        assert not any(token in arg or header in arg for arg in argv)
    fetch_env = next(env for argv, env in spawned if "fetch" in argv)
    assert fetch_env["GIT_CONFIG_KEY_0"] == "http.extraHeader"
    assert fetch_env["GIT_CONFIG_VALUE_0"] == f"Authorization: {header}"
    assert fetch_env["GIT_TERMINAL_PROMPT"] == "0"
    # Only the fetch itself gets the header.
    assert all("GIT_CONFIG_VALUE_0" not in env for argv, env in spawned if "fetch" not in argv)


def test_unreachable_server_error_has_no_secret(cache: RepoCache) -> None:
    header = "Bearer glpat-AnotherSecretValue"
    with pytest.raises(GitError) as raised:
        run(cache.fetch(KEY, "http://127.0.0.1:1/acme/infra.git", "b" * 40, header))
    assert "AnotherSecretValue" not in str(raised.value)
    with pytest.raises(GitError) as raised:
        run(cache.fetch(KEY, "http://x:url-password-123@127.0.0.1:1/acme/infra.git", "b" * 40, None))
    assert "url-password-123" not in str(raised.value)


def test_redact_covers_every_form_of_the_credential() -> None:
    token = "ghs_tok3n"
    header = "Basic " + base64.b64encode(f"x-access-token:{token}".encode()).decode()
    secrets = header_secrets(header)
    text = f"fatal: header {header}; raw {header.split()[1]}; user x-access-token:{token}; {token}"
    redacted = redact(text, secrets)
    assert token not in redacted and header.split()[1] not in redacted
    assert header_secrets(None) == []


# --------------------------------------------------------------------------- pure helpers


def test_local_module_dirs() -> None:
    files = {
        "envs/prod/main.tf": """
            module "vpc" {
              source = "../../modules/vpc"
              cidr   = "10.0.0.0/16"
            }
            module "app" { source = "./app/" }
            module "registry" {
              source  = "terraform-aws-modules/vpc/aws"
              version = "~> 5.0"
            }
            module "nested_object" {
              source = "../../modules/db"
              tags = {
                source = "../../not/a/module"
              }
            }
            # module "commented" { source = "../../modules/old" }
            /* module "block_comment" { source = "../../modules/older" } */
            resource "null_resource" "x" {
              provisioner "file" {
                source      = "./files/conf"
                destination = "/tmp/conf"
              }
            }
            module "escapes" { source = "../../../outside" }
            module "braces_in_strings" {
              description = "a } b {"
              source      = "../shared"
            }
        """,
        "envs/prod/extra.tf.json": '{"module": {"json": {"source": "../../modules/json"}}}',
        "envs/prod/sub/ignored.tf": 'module "sub" { source = "../../../modules/sub" }',
        "envs/prod/notes.md": 'module "md" { source = "./md" }',
    }
    assert local_module_dirs("envs/prod", files) == {
        "modules/vpc",
        "envs/prod/app",
        "modules/db",
        "envs/shared",
        "modules/json",
    }
    assert local_module_dirs(".", {"main.tf": 'module "m" {\n  source = "./modules/m"\n}\n'}) == {"modules/m"}
    assert local_module_dirs("", {"main.tf": 'module "up" { source = "../x" }'}) == set()


def test_escapes(tmp_path: Path) -> None:
    root = tmp_path / "checkout"
    (root / "dir").mkdir(parents=True)
    (root / "inside").symlink_to(root / "dir")
    (root / "outside").symlink_to("/etc")
    (root / "dotdot").symlink_to("../..")
    assert not escapes(root, Path("dir"))
    assert not escapes(root, Path("inside"))
    assert not escapes(root, root / "dir" / "file.tf")
    assert escapes(root, Path("outside"))
    assert escapes(root, Path("dotdot"))
    assert escapes(root, Path("../elsewhere"))
    assert escapes(root, Path("/etc/passwd"))


def test_module_dirs_of_three_thousand_projects_match_the_direct_reading(git_repo: GitRepo, cache: RepoCache) -> None:
    """A monorepo (issue 15): every project's modules, through nested ones, as a direct reading of
    every file finds them; the files are indexed by directory once, not read per project."""
    rng = random.Random(15)
    files = {"modules/common/main.tf": module("../leaf"), "modules/leaf/main.tf": ""}
    for j in range(20):
        files[f"modules/m{j}/main.tf"] = module("../common") if j % 2 else module(f"../m{(j + 1) % 20}")
    projects = [f"live/p{i}" for i in range(3000)]
    for project in projects:
        called = rng.sample(range(20), rng.randint(0, 2))
        files[f"{project}/main.tf"] = "".join(module(f"../../modules/m{j}").replace('"m"', f'"m{j}"') for j in called)
        files[f"{project}/vars.tf"] = 'variable "x" {}\n'
    sha = git_repo.commit(files, push="main")

    def direct(project: str, depth: int) -> set[str]:
        """Today's reading: for each directory, every file of the commit is looked at."""
        found, frontier = set(), {project}
        for _ in range(depth):
            reached = set().union(*(local_module_dirs(d, files) for d in frontier)) - found - {project}
            found |= reached
            frontier = reached
        return found

    async def scenario() -> dict[str, set[str]]:
        await cache.fetch(KEY, git_repo.url, sha, None)
        return await cache.module_dirs(KEY, sha, projects, depth=4)

    found = run(scenario())
    assert set(found) == set(projects)
    for project in rng.sample(projects, 60):
        assert found[project] == direct(project, 4), project
    assert any("modules/leaf" in dirs for dirs in found.values())  # reached through nested modules
    assert any(not dirs for dirs in found.values())  # and some call none
