"""Checks on a pull request's checkout before terraform touches it.

A pull request is written by whoever may push a branch, so its files are hostile
input. `checkout_problems` looks at the checkout on disk (no subprocess, no
network) and says, in sentences the bot can post, why terraform must not run
there; an empty list means nothing was found. It refuses:

- a project directory that resolves outside the checkout (or into `.git`);
- a symlink, in the project directory or in any local module directory it uses
  (transitively), that points outside the checkout or into `.git`; terraform
  follows symlinks when it reads configuration and when it writes local state;
- a module `source` that leaves the checkout: a `./`/`../` path that climbs out,
  an absolute path, `~`, or a `file:` URL (go-getter would symlink or clone it from
  the bot's own disk, e.g. another repository's mirror); and a module `source`
  that is not a plain string (an escape, a template or a heredoc can hide a path
  from readers, and terraform accepts all of them);
- terraform CLI config files (`.terraformrc`, `terraform.rc`): terraform reads its
  CLI config only from `TF_CLI_CONFIG_FILE` or the private HOME the bot sets, but
  nobody may come to rely on a file in the repository;
- a committed `.terraform` directory (or a `.terraform` that is not a directory):
  terraform re-uses a provider binary found there when the lock file's hash
  matches, so a pull request could ship and run its own "provider" during plan,
  bypassing the server's provider mirror. The `.terraform` the bot's own `terraform
  init` made is told apart by the git index: it is never tracked;
- in the project directory itself: `terraform.d/` (an implied provider mirror
  when the CLI config has no `provider_installation` block) and committed state
  (`terraform.tfstate`, `terraform.tfstate.backup`, `terraform.tfstate.d/`). State
  belongs in the configured backend: a committed one lets the pull request choose
  the "current state" its plan is compared with, and `init` would offer to copy
  it into the real backend.

`.terraform.lock.hcl` is allowed: pinning provider hashes is what it is for.

The `source` of each module is found by a small HCL lexer (strings, templates,
heredocs and comments are understood, so a module cannot hide behind a comment
trick); `installed_module_problems` double-checks after `terraform init` against
terraform's own record of where each module came from.
"""

from __future__ import annotations

import json
import os
import re
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# --------------------------------------------------------------------------- output cap

# How much of one project's terraform output a pull request comment should carry.
# GitHub takes 65,536 characters per comment, so 256 KiB is at most about five
# comments per project; anything longer is almost always a hostile or runaway
# plan, and the whole output stays in the run's log (GET /api/v1/runs/{id}/log).
MAX_OUTPUT_BYTES = 256 * 1024


def cap_output(text: str, max_bytes: int = MAX_OUTPUT_BYTES) -> str:
    """`text` cut to about `max_bytes` of UTF-8: the first quarter and the last three
    quarters are kept (terraform's errors and its "Plan:" line come last), with a
    line in between saying how much was left out."""
    if max_bytes <= 0:
        raise ValueError("max_bytes must be positive")
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= max_bytes:
        return text
    head_bytes = max_bytes // 4
    tail_bytes = max_bytes - head_bytes
    head = data[:head_bytes].decode("utf-8", "ignore")
    tail = data[len(data) - tail_bytes :].decode("utf-8", "ignore")
    omitted = len(data) - len(head.encode()) - len(tail.encode())
    return f"{head}\n\n… {omitted} bytes of output left out here; the run's log has all of it …\n\n{tail}"


# --------------------------------------------------------------------------- the checks

RC_FILES = frozenset({".terraformrc", "terraform.rc"})
# Refused in the project directory itself: what terraform reads from its working directory.
PROJECT_ONLY = {
    "terraform.d": "a committed terraform.d directory (terraform can install providers from it)",
    "terraform.tfstate": "committed terraform state (state belongs in the configured backend)",
    "terraform.tfstate.backup": "committed terraform state (state belongs in the configured backend)",
    "terraform.tfstate.d": "committed terraform workspace state (state belongs in the configured backend)",
}
MAX_REASONS = 10  # a refusal lists this many reasons at most, then "and N more"
MAX_MODULE_DIRS = 1000  # local module directories followed before giving up (a cycle?)

_SHOWABLE = re.compile(r"[^\w./+=@,~ -]", re.ASCII)
_FILE_SOURCE = re.compile(r"(?:[A-Za-z0-9+.-]+::)?(?:file:|/|~|\\)", re.IGNORECASE)
_WINDOWS_DRIVE = re.compile(r"(?:[A-Za-z0-9+.-]+::)?[A-Za-z]:[\\/]")


def checkout_problems(checkout_root: Path, project_dir: Path) -> list[str]:
    """Why terraform must not run in `project_dir` of the checkout at `checkout_root`.

    `project_dir` may be absolute or relative to `checkout_root`, resolved or not.
    Returns human-readable reasons, safe to post in a comment (paths are
    repo-relative and stripped of markup); an empty list means the checkout is fine.
    """
    root = os.path.realpath(checkout_root)
    given = os.path.join(root, project_dir) if not os.path.isabs(project_dir) else os.fspath(project_dir)
    project = os.path.realpath(given)
    shown = _show(os.path.relpath(os.path.normpath(given), root) if _inside(root, os.path.normpath(given))
                  else os.path.basename(given))
    if not _inside(root, project):
        return [f"the project directory {shown} leads outside the repository"]
    if _inside(os.path.join(root, ".git"), project):
        return [f"the project directory {shown} leads into .git"]
    if not os.path.isdir(project):
        return [f"the project directory {shown} is not a directory"]
    guard = _Guard(root)
    guard.scan_tree(project, project_top=True)
    guard.follow_modules(project)
    return guard.reasons()


def installed_module_problems(checkout_root: Path, project_dir: Path, data_dir: str = ".terraform") -> list[str]:
    """After `terraform init`: modules that terraform itself placed outside the checkout.

    Reads terraform's module manifest (`<data_dir>/modules/modules.json`) and refuses
    a local module that resolves outside the checkout, and a module "downloaded"
    into the data dir that is really a link to the bot's disk (an absolute path or a
    `file:` source). The local module directories are scanned like in
    `checkout_problems`. Run it between init and plan; `[]` when all is well.
    """
    root = os.path.realpath(checkout_root)
    given = os.path.join(root, project_dir) if not os.path.isabs(project_dir) else os.fspath(project_dir)
    project = os.path.realpath(given)
    if not _inside(root, project):
        return ["the project directory leads outside the repository"]
    manifest = os.path.join(project, data_dir, "modules", "modules.json")
    try:
        modules = json.loads(read_job_file(manifest, 64 << 20)).get("Modules") or []
    except FileNotFoundError:
        return []
    except (OSError, ValueError, AttributeError):
        return ["terraform's module manifest could not be read"]
    downloads = os.path.realpath(os.path.join(project, data_dir, "modules"))
    guard = _Guard(root)
    for module in modules:
        if not isinstance(module, dict) or not isinstance(module.get("Dir"), str) or not module["Dir"]:
            continue
        key = _show(str(module.get("Key", "")) or "(root)")
        where = os.path.realpath(os.path.join(project, module["Dir"]))
        if _inside(downloads, where):
            continue  # fetched by init from a remote source, inside the data dir
        if not _inside(root, where):
            guard.add(f"module {key} was installed from outside the repository")
        elif _inside(os.path.join(root, ".git"), where):
            guard.add(f"module {key} was installed from .git")
        elif where != project and os.path.isdir(where):  # the root module was checked before init
            guard.scan_tree(where)
    return guard.reasons()


def tracked_paths(root: str | os.PathLike[str]) -> set[str] | None:
    """The paths git tracks in a checkout, from its index; None when that cannot be read."""
    return set(paths) if (paths := _Index.load(os.fspath(root)).paths) is not None else None


def read_job_file(path: str | os.PathLike[str], limit: int) -> bytes:
    """The bytes of a regular file that a job wrote, at most `limit` of them; raises OSError otherwise.

    The job chose what is at that path: a symlink must not lead the bot to its own
    files, a FIFO must not hang it, and a huge (or sparse) file must not fill its memory.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise OSError(f"{os.fspath(path)} is not a regular file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise OSError(f"{os.fspath(path)} is larger than {limit} bytes")
    return data


# --------------------------------------------------------------------------- internals


def _inside(root: str, path: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _show(text: str, limit: int = 100) -> str:
    """A path or source as inert inline code: no backticks, markup, mentions or newlines."""
    text = _SHOWABLE.sub("?", text)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return f"`{text}`"


@dataclass
class _Guard:
    root: str
    _reasons: list[str] = field(default_factory=list)
    _scanned: set[str] = field(default_factory=set)
    _index: "_Index | None" = None

    def add(self, reason: str) -> None:
        if reason not in self._reasons:
            self._reasons.append(reason)

    def reasons(self) -> list[str]:
        if len(self._reasons) <= MAX_REASONS:
            return list(self._reasons)
        return [*self._reasons[:MAX_REASONS], f"and {len(self._reasons) - MAX_REASONS} more"]

    def rel(self, path: str) -> str:
        return _show(os.path.relpath(path, self.root))

    # Files and symlinks -------------------------------------------------------

    def scan_tree(self, top: str, project_top: bool = False) -> None:
        """Look at everything under the real directory `top` (inside the checkout).

        Symlinks are never followed out of the checkout; one that stays inside and
        names a directory is scanned too, since terraform would read through it.
        """
        stack = [(top, project_top)]
        while stack:
            directory, is_project_top = stack.pop()
            if directory in self._scanned:
                continue
            self._scanned.add(directory)
            try:
                entries = list(os.scandir(directory))
            except OSError:
                self.add(f"{self.rel(directory)} could not be read")
                continue
            for entry in sorted(entries, key=lambda e: e.name):
                path = entry.path
                name = entry.name
                if name == ".git":
                    continue  # never tracked; the checkout's own
                is_link = entry.is_symlink()
                if name in RC_FILES:
                    self.add(f"{self.rel(path)}: terraform CLI config files are not accepted in the repository")
                if is_project_top and name in PROJECT_ONLY:
                    self.add(f"{self.rel(path)}: {PROJECT_ONLY[name]}")
                if name == ".terraform":
                    if is_link or not entry.is_dir(follow_symlinks=False) or self.tracked_under(path):
                        self.add(f"{self.rel(path)}: a committed .terraform directory "
                                 "(it could carry provider binaries or module code)")
                    continue  # the one `terraform init` made: provider links into the shared cache
                if is_link:
                    target = os.path.realpath(path)
                    if not _inside(self.root, target):
                        self.add(f"{self.rel(path)} is a symlink that points outside the repository")
                    elif _inside(os.path.join(self.root, ".git"), target):
                        self.add(f"{self.rel(path)} is a symlink into .git")
                    elif os.path.isdir(target):
                        stack.append((target, False))
                elif entry.is_dir(follow_symlinks=False):
                    stack.append((path, False))

    def tracked_under(self, path: str) -> bool:
        """Whether git tracks `path` or anything under it (fail closed when unsure)."""
        if self._index is None:
            self._index = _Index.load(self.root)
        if self._index.error:
            self.add(f"the checkout's git index could not be read ({self._index.error})")
            return True
        if self._index.paths is None:
            return True  # not a git work tree: everything in it came with the pull request
        rel = os.path.relpath(path, self.root).replace(os.sep, "/")
        return rel in self._index.terraform_dirs

    # Modules ------------------------------------------------------------------

    def follow_modules(self, project: str) -> None:
        """Every local module the project calls, transitively, checked and scanned."""
        queue = [project]  # lexical paths, as terraform joins them (then the OS follows links)
        seen = {project}
        while queue:
            if len(seen) > MAX_MODULE_DIRS:
                self.add(f"more than {MAX_MODULE_DIRS} local module directories (a cycle?)")
                return
            module_dir = queue.pop(0)
            real_dir = os.path.realpath(module_dir)
            for file_path, text in self._config_files(real_dir):
                for source in _module_sources(os.path.basename(file_path), text):
                    found = self._check_source(file_path, source, module_dir)
                    if found is not None and found not in seen:
                        seen.add(found)
                        queue.append(found)

    def _config_files(self, directory: str) -> Iterator[tuple[str, str]]:
        """(path, text) of the `.tf` / `.tf.json` files terraform would load from `directory`."""
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            if not entry.name.endswith((".tf", ".tf.json")):
                continue
            real = os.path.realpath(entry.path)
            if not _inside(self.root, real) or _inside(os.path.join(self.root, ".git"), real):
                continue  # scan_tree, which sees every directory read here, says why
            if not os.path.isfile(real):
                continue
            try:
                with open(real, "rb") as f:
                    text = f.read().decode("utf-8", "replace")
            except OSError:
                self.add(f"{self.rel(entry.path)} could not be read")
                continue
            yield entry.path, text

    def _check_source(self, file_path: str, source: "str | None", module_dir: str) -> str | None:
        """The lexical directory of a local module source inside the checkout, or None (and a reason)."""
        where = self.rel(file_path)
        if source is None:
            self.add(f"{where}: a module source must be a plain string (no escapes, templates or heredocs)")
            return None
        if _FILE_SOURCE.match(source) or _WINDOWS_DRIVE.match(source):
            self.add(f"{where}: the module source {_show(source)} is a path on the bot's machine; "
                     "use ./ or ../ paths inside the repository")
            return None
        if not source.startswith(("./", "../", ".\\", "..\\")):
            return None  # registry, git, http, s3...: fetched by terraform init, not from this disk
        lexical = os.path.normpath(os.path.join(module_dir, source.replace("\\", "/")))
        real = os.path.realpath(lexical)
        if not _inside(self.root, real):
            self.add(f"{where}: the module source {_show(source)} leads outside the repository")
            return None
        if _inside(os.path.join(self.root, ".git"), real):
            self.add(f"{where}: the module source {_show(source)} leads into .git")
            return None
        if os.path.isdir(real):
            self.scan_tree(real)
        return lexical


# --------------------------------------------------------------------------- module sources


def _module_sources(name: str, text: str) -> list["str | None"]:
    """The `source` of every module block in one file; None for one that is not a plain string."""
    if name.endswith(".tf.json"):
        return _json_module_sources(text)
    return _hcl_module_sources(text)


def _json_module_sources(text: str) -> list["str | None"]:
    # HCL's JSON syntax allows repeated keys (each is one more block): keep every pair.
    try:
        doc = json.loads(text, object_pairs_hook=lambda pairs: pairs)
    except ValueError:
        return []  # terraform refuses the file too
    sources: list[str | None] = []

    def objects(value: object) -> Iterator[list]:
        if isinstance(value, list) and all(isinstance(p, tuple) for p in value):
            yield value  # an object (list of pairs)
        elif isinstance(value, list):
            for item in value:
                yield from objects(item)

    if not (isinstance(doc, list) and all(isinstance(p, tuple) for p in doc)):
        return []
    for key, value in doc:
        if key != "module":
            continue
        for modules in objects(value):
            for _name, body in modules:
                for block in objects(body):
                    for attr, source in block:
                        if attr != "source":
                            continue
                        plain = isinstance(source, str) and "${" not in source and "%{" not in source
                        sources.append(source if plain else None)
    return sources


class _Lexer:
    """Just enough of HCL's native syntax to find top-level `module` blocks and their `source`."""

    _IDENT = re.compile(r"[^\W\d][\w-]*")
    _HEREDOC = re.compile(r"<<(-?)([^\W\d][\w-]*)[ \t]*\r?\n")
    _ESCAPES = {"n": "\n", "r": "\r", "t": "\t", '"': '"', "\\": "\\"}

    def __init__(self, text: str) -> None:
        self.text = text
        self.i = 0

    def tokens(self) -> Iterator[tuple[str, object]]:
        """("ident", name) | ("string", value or None if not plain) | ("other", None)
        | ("nl", None) | ("punct", char); comments are dropped."""
        text, n = self.text, len(self.text)
        while self.i < n:
            c = text[self.i]
            if c == "\n":
                self.i += 1
                yield "nl", None
            elif c in " \t\r":
                self.i += 1
            elif c == "#" or text.startswith("//", self.i):
                end = text.find("\n", self.i)
                self.i = n if end < 0 else end
            elif text.startswith("/*", self.i):
                end = text.find("*/", self.i + 2)
                if end < 0:
                    raise ValueError("unterminated comment")
                self.i = end + 2
            elif c == '"':
                yield "string", self._string()
            elif heredoc := self._HEREDOC.match(text, self.i):
                self._skip_heredoc(heredoc)
                yield "other", None
            elif ident := self._IDENT.match(text, self.i):
                self.i = ident.end()
                yield "ident", ident.group()
            elif text.startswith(("==", "!=", "<=", ">=", "=>"), self.i):
                self.i += 2
                yield "other", None
            else:
                self.i += 1
                yield "punct", c

    def _string(self) -> str | None:
        """A quoted string starting at self.i; its value, or None if it holds a template."""
        text, n = self.text, len(self.text)
        self.i += 1
        out: list[str] = []
        plain = True
        while True:
            if self.i >= n or text[self.i] == "\n":
                raise ValueError("unterminated string")
            c = text[self.i]
            if c == '"':
                self.i += 1
                return "".join(out) if plain else None
            if c == "\\":
                out.append(self._escape())
            elif text.startswith(("$${", "%%{"), self.i):
                out.append(text[self.i + 1 : self.i + 3])
                self.i += 3
            elif text.startswith(("${", "%{"), self.i):
                plain = False
                self._skip_template()
            else:
                out.append(c)
                self.i += 1

    def _escape(self) -> str:
        text = self.text
        kind = text[self.i + 1 : self.i + 2]
        if kind in self._ESCAPES:
            self.i += 2
            return self._ESCAPES[kind]
        width = {"u": 4, "U": 8}.get(kind)
        digits = text[self.i + 2 : self.i + 2 + width] if width else ""
        if width and len(digits) == width and all(d in "0123456789abcdefABCDEF" for d in digits):
            self.i += 2 + width
            try:
                return chr(int(digits, 16))
            except ValueError:
                raise ValueError("bad escape") from None
        raise ValueError("bad escape")

    def _skip_template(self) -> None:
        """Skip `${ ... }` / `%{ ... }`, which may nest braces and strings (and span lines)."""
        text, n = self.text, len(self.text)
        self.i += 2
        depth = 1
        while depth:
            if self.i >= n:
                raise ValueError("unterminated template")
            c = text[self.i]
            if c == '"':
                self._string()
                continue
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
            self.i += 1

    def _skip_heredoc(self, match: re.Match) -> None:
        marker = match.group(2)
        pos = match.end()
        for line in re.finditer(r"[^\n]*(?:\n|$)", self.text[pos:]):
            if line.group().strip() == marker:
                self.i = pos + line.end()
                return
            if not line.group():
                break
        raise ValueError("unterminated heredoc")


def _hcl_module_sources(text: str) -> list["str | None"]:
    try:
        tokens = list(_Lexer(text).tokens())
    except ValueError:
        # Terraform cannot parse such a file either; if it could, we would rather refuse.
        return [None] if re.search(r"\bmodule\b", text) else []
    sources: list[str | None] = []
    depth = 0
    module_depth = 0  # depth of the body of the module block we are in, or 0
    i, n = 0, len(tokens)
    while i < n:
        kind, value = tokens[i]
        if depth == 0 and kind == "ident" and value == "module":
            j = i + 1
            while j < n and tokens[j][0] in ("ident", "string"):
                j += 1  # the block's label(s), quoted or not
            if j > i + 1 and j < n and tokens[j] == ("punct", "{"):
                depth = module_depth = 1
                i = j + 1
                continue
        if (module_depth and depth == module_depth and kind == "ident" and value == "source"
                and i + 1 < n and tokens[i + 1] == ("punct", "=")):
            j = i + 2
            value_tokens = []
            nesting = 0
            while j < n:
                t = tokens[j]
                if nesting == 0 and (t[0] == "nl" or t == ("punct", "}")):
                    break
                if t[0] == "punct" and t[1] in "{[(":
                    nesting += 1
                elif t[0] == "punct" and t[1] in "}])":
                    nesting -= 1
                value_tokens.append(t)
                j += 1
            if len(value_tokens) == 1 and value_tokens[0][0] == "string":
                sources.append(value_tokens[0][1])  # type: ignore[arg-type]
            else:
                sources.append(None)
            i = j
            continue
        if kind == "punct" and value in ("{", "[", "("):
            depth += 1
        elif kind == "punct" and value in ("}", "]", ")"):
            depth -= 1
            if depth < module_depth:
                module_depth = 0
        i += 1
    return sources


# --------------------------------------------------------------------------- the git index


@dataclass
class _Index:
    """Which paths git tracks in a checkout, read from `.git/index` (formats 2, 3 and 4)."""

    paths: list[str] | None  # None: not a git work tree
    error: str = ""
    terraform_dirs: set[str] = field(default_factory=set)  # tracked `.../.terraform` directories

    @classmethod
    def load(cls, root: str) -> "_Index":
        git_dir = os.path.join(root, ".git")
        if os.path.isfile(git_dir):  # a worktree's `gitdir: PATH` file
            try:
                with open(git_dir, encoding="utf-8") as f:
                    line = f.read().strip()
            except (OSError, UnicodeDecodeError):
                return cls(None, "unreadable .git file")
            if not line.startswith("gitdir:"):
                return cls(None, "unreadable .git file")
            git_dir = os.path.join(root, line[len("gitdir:") :].strip())
        elif not os.path.isdir(git_dir):
            return cls(None)
        hash_len = 32 if _uses_sha256(git_dir) else 20
        try:
            with open(os.path.join(git_dir, "index"), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return cls([])  # nothing checked out yet
        except OSError as exc:
            return cls(None, exc.strerror or "unreadable")
        try:
            paths = parse_index(data, hash_len)
        except ValueError as exc:
            return cls(None, str(exc))
        dirs = set()
        for path in paths:
            parts = path.split("/")
            for k, part in enumerate(parts):
                if part == ".terraform":
                    dirs.add("/".join(parts[: k + 1]))
        return cls(paths, "", dirs)


def _uses_sha256(git_dir: str) -> bool:
    try:
        with open(os.path.join(git_dir, "config"), encoding="utf-8", errors="replace") as f:
            config = f.read()
    except OSError:
        return False
    return re.search(r"(?im)^\s*objectformat\s*=\s*sha256\s*$", config) is not None


def parse_index(data: bytes, hash_len: int = 20) -> list[str]:
    """The paths of the entries of a git index file (raises ValueError when it is not one we read)."""
    try:
        if data[:4] != b"DIRC":
            raise ValueError("not a git index")
        version, count = struct.unpack(">II", data[4:12])
        if version not in (2, 3, 4):
            raise ValueError(f"index version {version}")
        pos = 12
        previous = b""
        paths: list[str] = []
        for _ in range(count):
            flags_at = pos + 40 + hash_len
            (flags,) = struct.unpack(">H", data[flags_at : flags_at + 2])
            name_at = flags_at + 2
            if version >= 3 and flags & 0x4000:
                name_at += 2
            if version == 4:
                strip, name_at = _varint(data, name_at)
                if strip > len(previous):
                    raise ValueError("bad path compression")
                end = data.index(b"\0", name_at)
                name = previous[: len(previous) - strip] + data[name_at:end]
                pos = end + 1
            else:
                end = data.index(b"\0", name_at)
                name = data[name_at:end]
                pos += (end - pos + 8) & ~7
            if not name:
                raise ValueError("empty path")
            previous = name
            paths.append(name.decode("utf-8", "surrogateescape"))
        # Extensions: a split index keeps most entries in another file we do not read.
        while pos + 8 <= len(data) - hash_len:
            signature = data[pos : pos + 4]
            (size,) = struct.unpack(">I", data[pos + 4 : pos + 8])
            if signature == b"link":
                raise ValueError("split index")
            pos += 8 + size
        return paths
    except (struct.error, IndexError) as exc:
        raise ValueError("truncated index") from exc


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """git's offset varint (as in `decode_varint`): value and the position after it."""
    byte = data[pos]
    pos += 1
    value = byte & 0x7F
    while byte & 0x80:
        value += 1
        byte = data[pos]
        pos += 1
        value = (value << 7) + (byte & 0x7F)
    return value, pos
