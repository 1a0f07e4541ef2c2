"""What every part of the policy file is checked with: typed values, known keys, names.

Error messages name the path of the bad key (``repos.acme/infra.projects[1].dir``).
"""

from __future__ import annotations

import re
from typing import Any

SEGMENT = r"[A-Za-z0-9_.-]+"
REPO_NAME = re.compile(rf"{SEGMENT}(?:/{SEGMENT})+")  # owner/name; GitLab paths may be nested


class PolicyError(ValueError):
    """The policy file is invalid; the message names the offending key."""


def expect(value: Any, kind: type, path: str, what: str) -> Any:
    """`value` if it is a `kind`, else a PolicyError saying it must be `what`."""
    if not isinstance(value, kind):
        raise PolicyError(f"{path}: must be {what}, not {type_name(value)}")
    return value


def no_unknown_keys(raw: dict[Any, Any], allowed: tuple[str, ...], path: str) -> None:
    """A PolicyError for the first key of `raw` that is not `allowed`."""
    for key in raw:
        if key not in allowed:
            where = f"{path}.{key}" if path else str(key)
            raise PolicyError(f"{where}: unknown key (allowed: {', '.join(allowed)})")


def has_dot_segment(name: str) -> bool:
    """Whether a slash-separated name has a `.` or `..` segment."""
    return any(seg in (".", "..") for seg in name.split("/"))


def type_name(value: Any) -> str:
    """How an error message calls a YAML value's type."""
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a mapping"}.get(type(value), type(value).__name__)
