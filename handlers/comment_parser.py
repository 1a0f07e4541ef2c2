"""Turn a pull request comment into a command, a reply, or nothing.

Only the first non-empty line is read, and only if its first word is exactly
`deploybot` or `@deploybot`; everything after that line is free text for humans.
Anything for us that is not a well-formed command gets the usage text back, so a
typo never silently runs something else.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from typing import Literal

USAGE = """\
**deploybot** plans and applies the Terraform projects of this pull request.

Usage: `deploybot <command> [-p PROJECT] [-d DIR] [-w WORKSPACE]`, or `deploybot approve [PLAN-ID ...]`

| Command | What it does |
| --- | --- |
| `plan` | plan every project, or the ones the flags select |
| `apply` | apply the saved plans, if every apply requirement holds |
| `approve` | approve the plans shown above (for approvers); name plan ids to approve only those |
| `unlock` | release the project locks this pull request holds |
| `cancel` | cancel this pull request's queued runs |
| `help` | show this message |

Flags (each at most once; together they must all match):

- `-p`, `--project NAME`: the project with this name
- `-d`, `--dir DIR`: the projects in this directory
- `-w`, `--workspace WORKSPACE`: the projects in this Terraform workspace

Values may contain only letters, digits, `.`, `_`, `/` and `-`.
Extra Terraform arguments cannot be passed from a comment.
"""

HELP = USAGE

CommandName = Literal["plan", "apply", "approve", "unlock", "cancel", "help"]
COMMANDS: tuple[str, ...] = ("plan", "apply", "approve", "unlock", "cancel")

MAX_LINE_BYTES = 10 * 1024

_FLAGS = {
    "-p": "project",
    "--project": "project",
    "-d": "dir",
    "--dir": "dir",
    "-w": "workspace",
    "--workspace": "workspace",
}
# ASCII only, on purpose: look-alike letters must not name a different project.
_VALUE = re.compile(r"[A-Za-z0-9._/-]+")
_PLAN_ID = re.compile(r"[0-9a-f]{12}")  # bot.models.plan_id
# What we may echo back inside backticks without it turning into a mention, link or markup.
_ECHOABLE = re.compile(r"[A-Za-z0-9._/=-]{1,64}")
_NEWLINE = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True)
class Command:
    """A well-formed command for the bot; flags not given are None."""

    name: CommandName
    project: str | None = None
    dir: str | None = None
    workspace: str | None = None
    plan_ids: tuple[str, ...] = ()  # `approve` only: approve just these plans


@dataclass(frozen=True)
class Reply:
    """The comment was for the bot but is not a command to run: answer with this Markdown."""

    text: str


def parse_comment(body: str, bot_name: str = "deploybot") -> Command | Reply | None:
    """A Command, a Reply (usage/error), or None when the comment is not for the bot. Never raises."""
    try:
        line = _first_line(body)
        if line is None:
            return None
        first, rest = _split_first_word(line)
        if first not in (bot_name, "@" + bot_name) or not bot_name:
            return None
        return _parse_args(line, rest)
    except Exception:  # noqa: BLE001 - a comment must never crash the handler
        return Reply(USAGE)


def _first_line(body: object) -> str | None:
    if not isinstance(body, str):
        return None
    for raw in _NEWLINE.split(body):
        line = raw.strip()
        if line:
            return line
    return None


def _split_first_word(line: str) -> tuple[str, str]:
    # Words are separated by spaces and tabs only, like shlex below; other
    # Unicode spaces stay inside a word and make it unknown.
    end = len(line)
    for sep in (" ", "\t"):
        i = line.find(sep)
        if i != -1:
            end = min(end, i)
    return line[:end], line[end:]


def _parse_args(line: str, rest: str) -> Command | Reply:
    if len(line.encode("utf-8", "surrogatepass")) > MAX_LINE_BYTES:
        return _error("That command is too long.")
    try:
        words = shlex.split(rest, comments=False, posix=True)
    except ValueError:
        return _error("I could not read that command (unbalanced quotes?).")
    if not words:
        return Reply(USAGE)
    name, args = words[0], words[1:]
    if name == "help":
        return Reply(HELP)
    if name not in COMMANDS:
        return _error(f"Unknown command{_echo(name)}.")

    values: dict[str, str] = {}
    plan_ids: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if name == "approve" and not arg.startswith("-"):
            if not _PLAN_ID.fullmatch(arg.lower()):
                return _error(f"Not a plan id{_echo(arg)}: plan ids are the 12 hex digits shown with each plan.")
            if arg.lower() not in plan_ids:
                plan_ids.append(arg.lower())
            i += 1
            continue
        if arg == "--":
            return _error("Extra Terraform arguments cannot be passed from a comment.")
        flag, eq, inline = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        key = _FLAGS.get(flag)
        if key is None:
            if arg.startswith("-"):
                return _error(f"Unknown flag{_echo(flag)}.")
            return _error(f"Unexpected argument{_echo(arg)}.")
        if key in values:
            return _error(f"The flag{_echo(flag)} may be given only once.")
        if eq:
            value = inline
            i += 1
        else:
            if i + 1 >= len(args) or args[i + 1].startswith("-"):
                return _error(f"The flag{_echo(flag)} needs a value.")
            value = args[i + 1]
            i += 2
        if not value:
            return _error(f"The flag{_echo(flag)} needs a value.")
        if not _VALUE.fullmatch(value):
            return _error(f"The value of the flag{_echo(flag)} may contain only letters, digits, `.`, `_`, `/` and `-`.")
        if key == "dir":
            if ".." in value:
                return _error('A directory must not contain "..".')
            if value.startswith("/"):
                return _error("A directory must be relative to the repository root.")
        values[key] = value
    return Command(name, values.get("project"), values.get("dir"), values.get("workspace"),  # type: ignore[arg-type]
                   tuple(plan_ids))


def _echo(word: str) -> str:
    """ " `word`" if the word is harmless to post back (no mention, link or markup), else ""."""
    return f" `{word}`" if _ECHOABLE.fullmatch(word) else ""


def _error(message: str) -> Reply:
    return Reply(f"{message}\n\n{USAGE}")
