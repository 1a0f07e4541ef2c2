"""Which projects a pull request plans on its own, and how a repo file may narrow that.

Paths and globs
---------------
Every path here is repo-relative POSIX: no leading ``/``, no ``..``, ``"."`` for
the root. Autoplan globs are matched against changed file paths with these rules
(like ``.gitignore``, not like ``fnmatch``, whose ``*`` crosses ``/``):

- ``*`` matches any run of characters inside one path segment (never ``/``);
- ``?`` matches one character other than ``/``;
- ``**`` as a whole segment matches zero or more segments (``a/**/b`` matches
  ``a/b`` and ``a/x/y/b``; a trailing ``a/**`` matches every file under ``a``);
  ``**`` inside a segment (``a**b``) is just ``*``;
- ``[``, ``]``, ``{``, ``}`` and ``\\`` are refused rather than half-supported.

The repo-level file
-------------------
A repository may carry a file (named by ``repo_config_file`` in the server
policy, read from the BASE branch so a pull request cannot rewrite its own rules)
that can only NARROW what the server policy allows::

    autoplan: false            # optional: no project is planned automatically
    projects:                  # optional: when present, projects not listed are dropped
      - name: staging          # pick a server project by name ...
        autoplan: ["*.tf"]     # ... and plan it only when a changed file matches
                               #     these globs AND the server's autoplan globs
      - dir: prod              # ... or by dir (every workspace, unless given)
        workspace: default
        autoplan: false        # keep for `deploybot plan`, never autoplan

Nothing else is accepted: entries never add projects, repos, paths or commands,
unknown keys are ignored with a warning, and a broken file leaves the server
policy as it is (plus a warning) instead of failing the pull request.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import yaml

from bot.models import Project

DEFAULT_AUTOPLAN = "*.tf*"

# Limits that keep matching cheap: globs become backtracking regexes, and the
# repo file is untrusted-ish input (anyone who can merge to the base branch).
MAX_GLOB_LENGTH = 256
MAX_STARS_PER_SEGMENT = 4
MAX_DOUBLE_STARS = 4
MAX_REPO_CONFIG_CHARS = 64 * 1024

_DIR_CHARS = re.compile(r"[A-Za-z0-9._/-]+")
_GLOB_FORBIDDEN = re.compile(r"[\\\[\]{}\x00-\x1f\x7f]")
_WILDCARD = re.compile(r"[*?]")


def normalize_dir(path: str) -> str:
    """The canonical repo-relative form of a directory ("./a//b/" -> "a/b", "" is refused).

    Raises ValueError with a reason when the path is not a safe repo-relative directory.
    """
    if not isinstance(path, str) or not path:
        raise ValueError("must be a non-empty path")
    if path.startswith("/"):
        raise ValueError("must be relative to the repository root, not absolute")
    if not _DIR_CHARS.fullmatch(path):
        raise ValueError("may contain only letters, digits, '.', '_', '/' and '-'")
    if ".." in path:
        # Also refuses names like "a..b": never needed, and one rule is easier to trust.
        raise ValueError('must not contain ".."')
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if parts and parts[0].startswith("-"):
        # A leading "-" would read as a flag in `deploybot plan -d DIR`.
        raise ValueError('must not start with "-"')
    return "/".join(parts) or "."


def resolve_glob(dir: str, glob: str) -> str:
    """A glob written relative to `dir` as a repo-relative pattern ("staging", "../m/*" -> "m/*").

    `dir` must already be normalised. Raises ValueError when the glob is unsafe or
    leaves the repository.
    """
    if not isinstance(glob, str) or not glob:
        raise ValueError("must be a non-empty glob")
    if len(glob) > MAX_GLOB_LENGTH:
        raise ValueError(f"must be at most {MAX_GLOB_LENGTH} characters")
    if glob.startswith("/"):
        raise ValueError("must be relative to the project directory, not absolute")
    if glob.endswith("/"):
        raise ValueError('must match files; use "dir/**" for everything under a directory')
    if _GLOB_FORBIDDEN.search(glob):
        raise ValueError("may use only *, ** and ? as wildcards (no \\ [ ] { } or control characters)")
    out = [] if dir == "." else dir.split("/")
    for seg in glob.split("/"):
        if seg in ("", "."):
            continue
        if seg == "..":
            if not out:
                raise ValueError("must not point outside the repository")
            if _WILDCARD.search(out[-1]):
                # "*/.." cannot be resolved without knowing which directory "*" matched.
                raise ValueError('".." must not follow a wildcard')
            out.pop()
            continue
        if seg.count("*") > MAX_STARS_PER_SEGMENT and seg != "**":
            raise ValueError(f"at most {MAX_STARS_PER_SEGMENT} '*' per path segment")
        out.append(seg)
    if not out:
        raise ValueError("must match files, not the repository root")
    if sum(1 for s in out if s == "**") > MAX_DOUBLE_STARS:
        raise ValueError(f'at most {MAX_DOUBLE_STARS} "**" segments')
    return "/".join(out)


def _segment_regex(seg: str) -> str:
    """Regex for one path segment made of literals, "?" and "*".

    Pieces between stars are fixed-width, so matching each middle piece at its
    leftmost place is always right; atomic groups commit to that place, which keeps
    matching linear instead of letting "a*a*a*c" backtrack polynomially.
    """

    def piece(text: str) -> str:
        return "".join("[^/]" if ch == "?" else re.escape(ch) for ch in text)

    pieces = re.split(r"\*+", seg)  # a run of stars ("a**b") is one star
    if len(pieces) == 1:
        return piece(seg)
    first, *middle, last = pieces
    return piece(first) + "".join(f"(?>[^/]*?{piece(m)})" for m in middle) + "[^/]*" + piece(last)


@lru_cache(maxsize=4096)
@lru_cache(maxsize=1 << 16)
def glob_regex(pattern: str) -> re.Pattern[str]:
    """The compiled regex for a repo-relative glob; use `.fullmatch(path)`.

    Kept: a monorepo's thousands of projects share their module patterns, and `re`'s own
    cache (512 entries) would compile them again for every project.
    """
    segs: list[str] = []
    for seg in pattern.split("/"):
        if seg == "**" and segs and segs[-1] == "**":
            continue  # "**/**" is "**"
        segs.append(seg)
    parts: list[str] = []
    for i, seg in enumerate(segs):
        last = i == len(segs) - 1
        if seg == "**":
            # Whole segments only, so "**" never matches half a file name.
            parts.append(r"[^/]+(?:/[^/]+)*" if last else r"(?:[^/]+/)*")
        else:
            parts.append(_segment_regex(seg) + ("" if last else "/"))
    return re.compile("".join(parts), re.DOTALL)


def glob_match(pattern: str, path: str) -> bool:
    """Whether a repo-relative file path matches a repo-relative glob."""
    return glob_regex(pattern).fullmatch(path) is not None


def autoplan_patterns(project: Project, module_dirs: set[str]) -> list[str]:
    """The project's autoplan globs as repo-relative patterns.

    Without explicit globs: `<dir>/*.tf*` plus `<m>/*.tf*` for every local module
    directory the project references (so editing a module replans its users).
    """
    if project.autoplan:
        return [resolve_glob(project.dir, g) for g in project.autoplan]
    patterns = [resolve_glob(project.dir, DEFAULT_AUTOPLAN)]
    for m in sorted(module_dirs):
        try:
            pattern = resolve_glob(normalize_dir(m), DEFAULT_AUTOPLAN)
        except ValueError:
            continue  # a module outside the repo (or unsafe path) cannot change in this PR
        if pattern not in patterns:
            patterns.append(pattern)
    return patterns


@dataclass(frozen=True)
class NarrowedProject:
    """A server project the repo file kept, with what it says about autoplan."""

    project: Project
    autoplan_enabled: bool = True
    # Repo-relative globs from the repo file; when non-empty a changed file must
    # match one of these AND one of the server's patterns (an intersection, so the
    # repo file can never make a project autoplan more often than the server says).
    autoplan_only: tuple[str, ...] = ()


def projects_to_autoplan(
    projects: Iterable[Project | NarrowedProject],
    changed_files: list[str],
    module_dirs: Mapping[str, set[str]],
) -> list[Project]:
    """The projects (in order) whose autoplan patterns match at least one changed file.

    Accepts plain server projects or the result of `narrow_projects`; narrowed
    projects with autoplan disabled are skipped. `module_dirs` is keyed by project dir.
    """
    result: list[Project] = []
    for item in projects:
        if isinstance(item, NarrowedProject):
            if not item.autoplan_enabled:
                continue
            project, only = item.project, item.autoplan_only
        else:
            project, only = item, ()
        patterns = [glob_regex(p) for p in autoplan_patterns(project, module_dirs.get(project.dir, set()))]
        extra = [glob_regex(p) for p in only]
        for path in changed_files:
            if any(r.fullmatch(path) for r in patterns) and (
                not extra or any(r.fullmatch(path) for r in extra)
            ):
                result.append(project)
                break
    return result


_ENTRY_KEYS = ("name", "dir", "workspace", "autoplan")
_TOP_KEYS = ("projects", "autoplan")


def narrow_projects(
    projects: Sequence[Project], repo_config_text: str | None
) -> tuple[list[NarrowedProject], list[str]]:
    """Apply a repo-level file to the server's projects: (kept projects, warnings).

    Never raises and never adds a project: every failure keeps the server policy
    and explains itself in a warning. `None` (no file) keeps every project.
    For manual commands use the kept projects, e.g.
    `select_projects(replace(repo, projects=tuple(n.project for n in kept)), ...)`.
    """
    unchanged = [NarrowedProject(p) for p in projects]
    if repo_config_text is None:
        return unchanged, []
    if len(repo_config_text) > MAX_REPO_CONFIG_CHARS:
        return unchanged, [f"the repo config file is larger than {MAX_REPO_CONFIG_CHARS} characters; ignored"]
    try:
        data: Any = yaml.safe_load(repo_config_text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        return unchanged, [f"the repo config file is not valid YAML{line}; ignored"]
    except Exception:  # noqa: BLE001 - PyYAML can raise odd errors on hostile input; never fail the PR
        return unchanged, ["the repo config file could not be read; ignored"]
    if data is None:
        return unchanged, []
    if not isinstance(data, dict):
        return unchanged, ["the repo config file must be a mapping; ignored"]

    warnings: list[str] = []
    for key in data:
        if key not in _TOP_KEYS:
            warnings.append(f"{_show(key)}: unknown key ignored (allowed: {', '.join(_TOP_KEYS)})")

    all_autoplan = True
    if "autoplan" in data:
        if data["autoplan"] is False:
            all_autoplan = False
        elif data["autoplan"] is not True:
            warnings.append("autoplan: must be true or false; ignored")

    if "projects" not in data:
        return [NarrowedProject(p, all_autoplan) for p in projects], warnings
    entries = data["projects"]
    if not isinstance(entries, list):
        warnings.append("projects: must be a list; ignored")
        return [NarrowedProject(p, all_autoplan) for p in projects], warnings

    chosen: dict[int, NarrowedProject] = {}  # index in `projects` -> narrowed
    for i, entry in enumerate(entries):
        path = f"projects[{i}]"
        if not isinstance(entry, dict):
            warnings.append(f"{path}: must be a mapping; ignored")
            continue
        for key in entry:
            if key not in _ENTRY_KEYS:
                warnings.append(f"{path}.{_show(key)}: unknown key ignored (allowed: {', '.join(_ENTRY_KEYS)})")
        matches = _match_entry(projects, entry, path, warnings)
        if matches is None:
            continue
        if not matches:
            warnings.append(f"{path}: {_describe(entry)} is not a project in the server policy; ignored")
            continue
        for idx in matches:
            if idx in chosen:
                warnings.append(
                    f"{path}: project {_show(projects[idx].label)} is already listed; this entry is ignored for it"
                )
                continue
            chosen[idx] = _narrow_one(projects[idx], entry.get("autoplan", True), path, all_autoplan, warnings)
    # Keep the server's order, not the repo file's.
    return [chosen[i] for i in sorted(chosen)], warnings


def _match_entry(
    projects: Sequence[Project], entry: dict[Any, Any], path: str, warnings: list[str]
) -> list[int] | None:
    """Indexes of the server projects an entry names, or None if the entry is unusable."""
    name, dir_, ws = entry.get("name"), entry.get("dir"), entry.get("workspace")
    for key, value in (("name", name), ("dir", dir_), ("workspace", ws)):
        if value is not None and not isinstance(value, str):
            warnings.append(f"{path}.{key}: must be a string; entry ignored")
            return None
    if name is None and dir_ is None:
        warnings.append(f"{path}: needs a name or a dir; entry ignored")
        return None
    if dir_ is not None:
        try:
            dir_ = normalize_dir(dir_)
        except ValueError as e:
            warnings.append(f"{path}.dir: {e}; entry ignored")
            return None
    return [
        i
        for i, p in enumerate(projects)
        if (name is None or (p.name != "" and p.name == name))
        and (dir_ is None or p.dir == dir_)
        and (ws is None or p.workspace == ws)
    ]


def _narrow_one(
    project: Project, autoplan: Any, path: str, all_autoplan: bool, warnings: list[str]
) -> NarrowedProject:
    if autoplan is True:
        return NarrowedProject(project, all_autoplan)
    if autoplan is False:
        return NarrowedProject(project, False)
    if not isinstance(autoplan, list):
        # Unknown intent: the safe reading is "do not autoplan"; `deploybot plan` still works.
        warnings.append(f"{path}.autoplan: must be a list of globs or false; autoplan disabled for this project")
        return NarrowedProject(project, False)
    only: list[str] = []
    for j, glob in enumerate(autoplan):
        try:
            only.append(resolve_glob(project.dir, glob))
        except ValueError as e:
            warnings.append(f"{path}.autoplan[{j}]: {e}; glob ignored")
    if not only:
        # Dropping every bad glob must not turn "only these" into "anything".
        if autoplan:
            warnings.append(f"{path}.autoplan: no usable glob; autoplan disabled for this project")
        return NarrowedProject(project, False)
    return NarrowedProject(project, all_autoplan, tuple(only))


def _describe(entry: dict[Any, Any]) -> str:
    bits = [f"{k} {_show(entry[k])}" for k in ("name", "dir", "workspace") if entry.get(k) is not None]
    return ", ".join(bits)


def _show(value: Any) -> str:
    """A value from the repo file, quoted and cut short, for a warning posted as a comment."""
    text = repr(value) if not isinstance(value, str) else value
    text = text if len(text) <= 64 else text[:61] + "..."
    text = re.sub(r"[\x00-\x1f\x7f]", " ", text)
    # Backticks keep Markdown, @mentions and links from the repo file inert in the comment.
    return "`" + text.replace("`", "'") + "`"
