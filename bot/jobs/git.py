"""Git checkouts at an exact commit, from one bare mirror per repository.

The forge's token reaches git only through environment-borne config
(`http.extraHeader`), never an URL, argv, a log line or an exception message.
Git runs with a scrubbed environment and no system or global config, so nothing
from the bot user's setup (credential helpers, hooks, traces) takes part.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import posixpath
import re
import shutil
import signal
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from bot.report.comments import redact

_SHA_RE = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")  # SHA-1 or SHA-256 object names
_KEY_PART_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")

# What a reused checkout keeps between commits: terraform's data dir (downloaded
# modules, provider links) and the dependency lock file init wrote when the repository
# commits none (a committed one is reset like any tracked file). Everything else is
# reset to the commit. Together they let a re-plan skip init.
KEEP_ON_RESET: tuple[str, ...] = (".terraform", ".terraform.lock.hcl")

# Network settings git may need to reach a forge from inside a VPC; the only
# variables taken from the bot's own environment.
_PASSTHROUGH_ENV = (
    "http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
    "GIT_SSL_CAINFO", "SSL_CERT_FILE", "SSL_CERT_DIR",
)  # fmt: skip

# Given to every git command, first on its command line.
_GIT_OPTIONS = (
    "-c", "core.hooksPath=/dev/null",
    "-c", "core.fsmonitor=false",
    "-c", "protocol.ext.allow=never",
    "-c", "submodule.recurse=false",
    "-c", "fetch.recurseSubmodules=false",
    "-c", "credential.helper=",
    "-c", "advice.detachedHead=false",
)  # fmt: skip

FETCH_TIMEOUT_S = 600.0
LOCAL_TIMEOUT_S = 300.0  # commands that only touch the disk


class GitError(RuntimeError):
    """A git command failed; the message never contains the auth header."""


def escapes(root: Path, path: Path) -> bool:
    """Whether `path` (relative to `root` unless absolute), symlinks followed, lies outside `root`."""
    root = Path(root).resolve()
    target = (root / path).resolve()
    return not target.is_relative_to(root)


# --------------------------------------------------------------------------- local modules

_MODULE_OPEN_RE = re.compile(r'\bmodule\s+"[^"\n]*"\s*\{')
_SOURCE_RE = re.compile(r'^\s*source\s*=\s*"((?:\\.|[^"\\\n])*)"', re.MULTILINE)


def _strip_comments(text: str) -> str:
    """HCL text without `#`, `//` and `/* */` comments (strings kept as they are)."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == '"':
            j = i + 1
            while j < n and text[j] != '"' and text[j] != "\n":
                j += 2 if text[j] == "\\" else 1
            out.append(text[i : j + 1])
            i = j + 1
        elif c == "#" or text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            i = n if j < 0 else j + 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _block_body(text: str, start: int) -> str:
    """The top level of a `{ ... }` block opened just before `start` in comment-free text.

    Nested blocks and objects are left out, so a `source` inside them is never
    read as the module's; braces inside strings do not count.
    """
    depth = 1
    out: list[str] = []
    i, n = start, len(text)
    while i < n and depth:
        c = text[i]
        if c == '"':
            j = i + 1
            while j < n and text[j] != '"' and text[j] != "\n":
                j += 2 if text[j] == "\\" else 1
            if depth == 1:
                out.append(text[i : j + 1])
            i = j + 1
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
        elif depth == 1:
            out.append(c)
        i += 1
    return "".join(out)


def _module_sources(name: str, text: str) -> list[str]:
    """`source` values of the module blocks in one `.tf` or `.tf.json` file."""
    if name.endswith(".tf.json"):
        try:
            doc = json.loads(text)
        except ValueError:
            return []
        modules = doc.get("module", {}) if isinstance(doc, dict) else {}
        blocks = modules if isinstance(modules, list) else [modules]
        sources = []
        for block in blocks:
            if isinstance(block, dict):
                for body in block.values():
                    for b in body if isinstance(body, list) else [body]:
                        if isinstance(b, dict) and isinstance(b.get("source"), str):
                            sources.append(b["source"])
        return sources
    text = _strip_comments(text)
    sources = []
    for match in _MODULE_OPEN_RE.finditer(text):
        body = _block_body(text, match.end())
        found = _SOURCE_RE.search(body)
        if found:
            sources.append(found.group(1))
    return sources


def local_module_dirs(project_dir: str, files: Mapping[str, str]) -> set[str]:
    """Repo-relative directories of the local modules (`./x`, `../x`) a project calls.

    `files` maps repo-relative paths to text; only `.tf` / `.tf.json` files directly
    in `project_dir` count, as for terraform.
    Sources that would leave the repository are dropped. Not transitive.
    """
    project = posixpath.normpath(project_dir.strip("/") or ".")
    found: set[str] = set()
    for path, text in files.items():
        if not (path.endswith(".tf") or path.endswith(".tf.json")):
            continue
        if posixpath.normpath(posixpath.dirname(path) or ".") != project:
            continue
        for source in _module_sources(path, text):
            if not (source.startswith("./") or source.startswith("../")):
                continue  # registry, git, http... sources are not in this repo
            resolved = posixpath.normpath(posixpath.join(project, source))
            if resolved == ".." or resolved.startswith("../") or posixpath.isabs(resolved):
                continue
            found.add(resolved)
    return found


def local_calls(dirs: list[str], files: Mapping[str, str]) -> dict[str, set[str]]:
    """The local modules each directory calls (`local_module_dirs`), the files indexed by their
    directory first: linear in the files, where asking every directory of every file was not."""
    by_dir: dict[str, dict[str, str]] = {d: {} for d in dirs}
    for path, text in files.items():
        directory = posixpath.normpath(posixpath.dirname(path) or ".")
        if directory in by_dir:
            by_dir[directory][path] = text
    return {d: local_module_dirs(d, by_dir[d]) for d in dirs}


async def _module_graph(reader: "_TreeReader", project_dirs: list[str], depth: int) -> dict[str, set[str]]:
    calls: dict[str, set[str]] = {}  # directory -> the local modules it calls
    found: dict[str, set[str]] = {d: set() for d in project_dirs}
    frontier: dict[str, set[str]] = {d: {d} for d in project_dirs}
    for _ in range(depth):
        unread = sorted(set().union(*frontier.values()) - calls.keys())
        if unread:
            files = await reader.terraform_files(unread)
            # Thousands of directories take a while to parse: not on the loop that answers webhooks.
            calls.update(await asyncio.to_thread(local_calls, unread, files))
        for project_dir, dirs in frontier.items():
            reached = set().union(*(calls[d] for d in dirs)) - found[project_dir] - {project_dir}
            found[project_dir] |= reached
            frontier[project_dir] = reached
        if not any(frontier.values()):
            break
    return found


class _TreeReader:
    """Trees and blobs of one commit, asked of a running `git cat-file --batch`."""

    MAX_FILE_BYTES = 1 << 20
    TERRAFORM_SUFFIXES = (".tf", ".tf.json")

    def __init__(self, proc: asyncio.subprocess.Process, sha: str) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        self._stdin, self._stdout = proc.stdin, proc.stdout
        self._sha = sha
        self._oid_bytes = len(sha) // 2  # 20 for SHA-1 repositories, 32 for SHA-256

    async def terraform_files(self, dirs: list[str]) -> dict[str, str]:
        """{repo-relative path: text} of the terraform files directly in each directory."""
        # A name with a newline would break the line protocol; no such directory is ours to read.
        dirs = [d for d in dirs if "\n" not in d]
        trees = await self._objects([f"{self._sha}:{'' if d == '.' else d}" for d in dirs])
        wanted: list[tuple[str, str]] = []
        for directory, tree in zip(dirs, trees):
            if tree is None or tree[0] != b"tree":
                continue
            for mode, name, oid in self._entries(tree[1]):
                if mode in (b"100644", b"100755") and name.endswith(self.TERRAFORM_SUFFIXES):
                    wanted.append((name if directory == "." else f"{directory}/{name}", oid))
        files: dict[str, str] = {}
        for (path, _), blob in zip(wanted, await self._objects([oid for _, oid in wanted])):
            if blob is not None and blob[0] == b"blob":
                try:
                    files[path] = blob[1].decode("utf-8")
                except UnicodeDecodeError:
                    continue
        return files

    async def _objects(self, names: list[str]) -> list[tuple[bytes, bytes] | None]:
        """(type, content) of each named object; None for one that is missing or too big."""
        if not names:
            return []
        # Asked while the answers are read: thousands of names at once would fill both pipes,
        # git waiting for us to read and we for git to take the rest.
        self._stdin.write(b"".join(n.encode("utf-8", "surrogateescape") + b"\n" for n in names))
        asking = asyncio.create_task(self._stdin.drain())
        try:
            return await self._answers(len(names))
        finally:
            asking.cancel()
            await asyncio.gather(asking, return_exceptions=True)

    async def _answers(self, count: int) -> list[tuple[bytes, bytes] | None]:
        found: list[tuple[bytes, bytes] | None] = []
        for _ in range(count):
            fields = (await self._stdout.readline()).split()
            # "<oid> <type> <size>" for an object; "<name> missing" (or "ambiguous") otherwise.
            if len(fields) != 3 or len(fields[0]) != 2 * self._oid_bytes or not fields[2].isdigit():
                found.append(None)
                continue
            size = int(fields[2])
            if size > self.MAX_FILE_BYTES:
                left = size + 1  # read past it (and its newline) without holding it
                while left:
                    left -= len(await self._stdout.readexactly(min(left, 1 << 16)))
                found.append(None)
                continue
            found.append((fields[1], (await self._stdout.readexactly(size + 1))[:-1]))
        return found

    def _entries(self, tree: bytes) -> Iterator[tuple[bytes, str, str]]:
        """(mode, name, object id) of each entry of a raw tree object."""
        i = 0
        while i < len(tree):
            space = tree.index(b" ", i)
            nul = tree.index(b"\0", space)
            oid = tree[nul + 1 : nul + 1 + self._oid_bytes]
            yield tree[i:space], tree[space + 1 : nul].decode("utf-8", "surrogateescape"), oid.hex()
            i = nul + 1 + self._oid_bytes


# --------------------------------------------------------------------------- running git


def header_secrets(auth_header: str | None) -> list[str]:
    """The auth header value and every form of its credential that could show up in output."""
    if not auth_header:
        return []
    secrets = [auth_header]
    scheme, _, credential = auth_header.partition(" ")
    if credential:
        secrets.append(credential.strip())
        if scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(credential.strip(), validate=True).decode()
            except ValueError:
                decoded = ""
            secrets.append(decoded)
            secrets.append(decoded.partition(":")[2])
    return [s for s in secrets if len(s) >= 4]  # never redact trivia like "x"


def _owned_by_jobs(dest: Path) -> list[str]:
    """Git options for a checkout whose work tree a sandboxed job's uid owns.

    Git refuses a repository whose top directory another user owns, so that their
    `.git/config` cannot run commands as us. Here the bot made `.git` and keeps it:
    jobs see it read-only (bot.jobs.sandbox), so it is safe to say so.
    """
    return ["-c", f"safe.directory={dest}"]


def _check_sha(sha: str) -> str:
    if not isinstance(sha, str) or not _SHA_RE.fullmatch(sha):
        raise GitError(f"not a full commit SHA: {sha!r}")
    return sha


class RepoCache:
    """Bare mirrors under `root/mirrors/<forge>/<full_name>.git`, and checkouts made from them."""

    def __init__(self, root: Path, *, fetch_timeout_s: float = FETCH_TIMEOUT_S) -> None:
        if fetch_timeout_s <= 0:
            raise ValueError("fetch_timeout_s must be positive")
        self.root = Path(root).resolve()
        self.fetch_timeout_s = fetch_timeout_s
        self._home = self.root / "home"  # an empty HOME: no ~/.gitconfig, ~/.netrc or ssh config
        self._home.mkdir(parents=True, exist_ok=True)
        self._locks: dict[str, asyncio.Lock] = {}
        # Found on the bot's PATH once; git itself then runs with a minimal PATH.
        self._git_binary = shutil.which("git") or "git"

    def mirror_path(self, key: str) -> Path:
        """Where the bare mirror for a repository lives.

        `key` is `forge:full_name` (what `bot.store.repo_key` gives, e.g.
        `github:acme/infra`) or `forge/full_name`; GitLab names may be nested.
        """
        forge, sep, full_name = key.partition(":")
        if not sep:
            forge, _, full_name = key.partition("/")
        parts = [forge, *full_name.split("/")]
        if len(parts) < 3 or not all(_KEY_PART_RE.fullmatch(p) for p in parts):
            raise GitError(f"bad repository key: {key!r}")
        return self.root.joinpath("mirrors", *parts[:-1], parts[-1] + ".git")

    async def fetch(self, key: str, clone_url: str, sha: str, auth_header: str | None = None) -> Path:
        """Make sure commit `sha` is in the mirror, fetching it from `clone_url` if needed.

        `auth_header` is an HTTP Authorization header value (`Basic ...`, `Bearer ...`).
        The fetched commit is pinned by a ref so garbage collection never drops it
        from under the checkouts that borrow the mirror's objects.
        """
        _check_sha(sha)
        try:
            url_password = urlsplit(clone_url).password or ""
        except ValueError:
            raise GitError("bad clone URL") from None
        if clone_url.startswith("-") or "\n" in clone_url:
            raise GitError("bad clone URL")
        mirror = self.mirror_path(key)
        async with self._locks.setdefault(key, asyncio.Lock()):
            if not (mirror / "HEAD").exists():
                mirror.parent.mkdir(parents=True, exist_ok=True)
                await self._git(["init", "--quiet", "--bare", str(mirror)])
            if await self._has_commit(mirror, sha):
                return mirror
            env: dict[str, str] = {}
            if auth_header:
                env = {
                    "GIT_CONFIG_COUNT": "1",
                    "GIT_CONFIG_KEY_0": "http.extraHeader",
                    "GIT_CONFIG_VALUE_0": f"Authorization: {auth_header}",
                }
            await self._git(
                ["--git-dir", str(mirror), "fetch", "--quiet", "--no-tags", "--no-write-fetch-head",
                 "--", clone_url, f"+{sha}:refs/deploybot/{sha}"],
                extra_env=env,
                timeout_s=self.fetch_timeout_s,
                # A URL should carry no credentials; if one does, keep them out of errors too.
                secrets=[*header_secrets(auth_header), url_password],
            )  # fmt: skip
            if not await self._has_commit(mirror, sha):
                raise GitError(f"commit {sha} is not in {key} after fetching it")
        return mirror

    async def checkout(self, key: str, sha: str, dest: Path, keep: Sequence[str] = KEEP_ON_RESET) -> Path:
        """Make `dest` a checkout of exactly `sha` (fetched before), reusing it if it is one.

        A reused checkout keeps only untracked files and directories named in `keep`;
        tracked files are reset to the commit and every other file is removed.
        Submodules stay empty.
        """
        _check_sha(sha)
        mirror = self.mirror_path(key)
        dest = Path(dest).resolve()
        try:
            if not self._is_checkout_of(dest, mirror):
                if dest.exists() and any(dest.iterdir()):
                    raise GitError(f"{dest} exists and is not a checkout of {key}")
                dest.parent.mkdir(parents=True, exist_ok=True)
                # --shared borrows the mirror's objects (no copy); the pinning refs keep them alive.
                await self._git(["clone", "--quiet", "--shared", "--no-checkout", str(mirror), str(dest)])
            await self._git(["-C", str(dest), *_owned_by_jobs(dest), "checkout", "--quiet", "--force", "--detach", sha])
        except GitError:
            # Asked only now, not before every checkout: the commit is almost always there.
            if not await self._has_commit(mirror, sha):
                raise GitError(f"commit {sha} has not been fetched into {key}") from None
            raise
        excludes = [arg for name in keep for arg in ("-e", name)]
        await self._git(["-C", str(dest), *_owned_by_jobs(dest), "clean", "--quiet", "-ffdx", *excludes])
        return dest

    async def module_dirs(self, key: str, sha: str, project_dirs: Iterable[str], depth: int) -> dict[str, set[str]]:
        """The local modules each project directory calls at `sha`, `depth` levels deep.

        Read from the mirror (no checkout) through one `git cat-file --batch` process for
        every level: each level asks for the new directories' trees, then for the
        terraform files in them (files bigger than 1 MiB, symlinks and files that are
        not UTF-8 are left out). A directory shared by several projects is read once.
        """
        _check_sha(sha)
        proc = await asyncio.create_subprocess_exec(
            self._git_binary, *_GIT_OPTIONS, "--git-dir", str(self.mirror_path(key)), "cat-file", "--batch",
            env=self._env({}), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL, start_new_session=True,
        )
        reader = _TreeReader(proc, sha)
        try:
            return await asyncio.wait_for(_module_graph(reader, list(project_dirs), depth), LOCAL_TIMEOUT_S)
        except TimeoutError:
            raise GitError(f"git cat-file timed out after {LOCAL_TIMEOUT_S:g} s") from None
        except (asyncio.IncompleteReadError, ValueError, OSError) as exc:  # it died, or said what we cannot read
            raise GitError(f"git cat-file failed: {type(exc).__name__}") from None
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await asyncio.shield(proc.wait())

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _is_checkout_of(dest: Path, mirror: Path) -> bool:
        """Whether `dest` is a checkout this cache made from `mirror`."""
        alternates = dest / ".git" / "objects" / "info" / "alternates"
        try:
            lines = alternates.read_text().split()
        except (FileNotFoundError, NotADirectoryError):
            return False
        return str(mirror / "objects") in lines

    async def _has_commit(self, mirror: Path, sha: str) -> bool:
        if not (mirror / "HEAD").exists():
            return False
        try:
            await self._git(["--git-dir", str(mirror), "cat-file", "-e", f"{sha}^{{commit}}"])
        except GitError:
            return False
        return True

    def _env(self, extra: Mapping[str, str]) -> dict[str, str]:
        env = {k: os.environ[k] for k in _PASSTHROUGH_ENV if k in os.environ}
        env.update(
            {
                "PATH": "/usr/local/bin:/usr/bin:/bin",
                "HOME": str(self._home),
                "LC_ALL": "C",  # stable, English error messages
                "GIT_CONFIG_NOSYSTEM": "1",
                "GIT_CONFIG_GLOBAL": "/dev/null",
                "GIT_TERMINAL_PROMPT": "0",  # fail instead of waiting for a password
                "GIT_ASKPASS": "/bin/false",
                "GIT_LFS_SKIP_SMUDGE": "1",
                "GIT_LITERAL_PATHSPECS": "1",  # a directory name is never pathspec magic
            }
        )
        env.update(extra)
        return env

    async def _git(
        self,
        args: Sequence[str],
        *,
        extra_env: Mapping[str, str] | None = None,
        timeout_s: float = LOCAL_TIMEOUT_S,
        secrets: Sequence[str] = (),
        stdin: bytes | None = None,
    ) -> bytes:
        """Run git; return stdout, or raise GitError with redacted stderr."""
        argv = [self._git_binary, *_GIT_OPTIONS, *args]
        proc = await asyncio.create_subprocess_exec(
            *argv,
            env=self._env(extra_env or {}),
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # so a kill reaches git-remote-https too
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin), timeout_s)
        except BaseException as exc:  # timeout or cancellation: take the whole group down
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await asyncio.shield(proc.wait())
            if isinstance(exc, TimeoutError):
                raise GitError(f"git {git_subcommand(args)} timed out after {timeout_s:g} s") from None
            raise
        if proc.returncode != 0:
            detail = redact(err.decode("utf-8", "replace").strip(), secrets)
            raise GitError(f"git {git_subcommand(args)} failed ({proc.returncode}): {detail}")
        return out


def git_subcommand(args: Sequence[str]) -> str:
    """The git subcommand of an argument list, for error messages (no URLs, no paths)."""
    skip_next = False
    for arg in args:
        if skip_next:
            skip_next = False
        elif arg in ("-C", "--git-dir", "-c"):
            skip_next = True
        elif not arg.startswith("-"):
            return arg
    return "command"
