"""What the bot says on a pull request: pure rendering of run results into comments."""

from __future__ import annotations

import re
from dataclasses import dataclass

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")
_FENCE = "```"


@dataclass(frozen=True)
class ProjectOutcome:
    """How one project's job ended, as the comment shows it."""

    label: str
    status: str  # succeeded | failed | cancelled | interrupted | refused
    summary: str  # "+2 ~1 -0", "no changes", "applied", or the one-line error
    output: str = ""


def strip_ansi(text: str) -> str:
    """Remove terminal colour and cursor codes."""
    return _ANSI.sub("", text)


def redact(text: str, secrets: list[str]) -> str:
    """Replace every occurrence of each secret (longest first) with a fixed mask."""
    for secret in sorted(set(secrets), key=len, reverse=True):
        if secret:
            text = text.replace(secret, "***")
    return text


_ICONS = {"succeeded": "✅", "failed": "❌", "cancelled": "⏹️", "interrupted": "⚠️",
          "refused": "🚫"}


MARKER_ROOM = 100  # characters a comment keeps free for its marker


def with_marker(body: str, marker: str) -> str:
    """The body with a hidden line naming what it reports, so it is found again after a crash."""
    return f"{body}\n\n{marker_line(marker)}"


def marker_line(marker: str) -> str:
    """The hidden line `with_marker` appends: an HTML comment, which the forges do not show."""
    return f"<!-- deploybot: {marker} -->"


def render_run_comment(
    command: str, head_sha: str, outcomes: list[ProjectOutcome], footer: str, limit: int
) -> list[str]:
    """The comment(s) for one command: a summary line per project, output folded away.

    Returns several bodies when the output does not fit in one comment.
    """
    title = f"**deploybot {command}** for `{head_sha[:8]}`"
    summary = [title, ""]
    for outcome in outcomes:
        summary.append(f"- {_ICONS.get(outcome.status, '')} `{outcome.label}`: {outcome.summary}")
    head = "\n".join(summary)
    sections = [
        _details(outcome.label, outcome.output) for outcome in outcomes if outcome.output
    ]
    tail = f"\n\n{footer}" if footer else ""
    return _pack(head, sections, tail, limit)


def _details(label: str, output: str) -> str:
    # A fence inside terraform's output would end our code block early.
    body = output.replace(_FENCE, "`\u200b``").rstrip()
    return f"<details><summary>Output of <code>{label}</code></summary>\n\n{_FENCE}\n{body}\n{_FENCE}\n</details>"


PART_MARKS = len("\n\n_(continued)_") + len("\n\n_part 9999 of 9999_")


def _pack(head: str, sections: list[str], tail: str, limit: int) -> list[str]:
    """Fill comments up to the limit; split a section that is too big on its own."""
    limit -= PART_MARKS  # room for the marks added to split comments
    comments: list[str] = []
    current = head
    for section in sections:
        for piece in _split_section(section, limit - len(head) - len(tail) - 64):
            if len(current) + 2 + len(piece) + len(tail) > limit:
                comments.append(current)
                current = f"{head}\n\n_(continued)_"
            current = f"{current}\n\n{piece}"
    comments.append(current + tail)
    if len(comments) > 1:
        total = len(comments)
        comments = [f"{c}\n\n_part {i} of {total}_" for i, c in enumerate(comments, 1)]
    return comments


def _split_section(section: str, room: int) -> list[str]:
    if len(section) <= room:
        return [section]
    label_end = section.index("</summary>")
    label = section[len("<details><summary>"):label_end]
    body = section[section.index(f"{_FENCE}\n") + 4 : section.rindex(f"\n{_FENCE}")]
    chunk = room - len(label) - 100
    pieces = []
    lines = body.splitlines(keepends=True)
    buf = ""
    for line in lines:
        while len(line) > chunk:  # a single line longer than a comment
            if buf:
                pieces.append(buf)
                buf = ""
            pieces.append(line[:chunk])
            line = line[chunk:]
        if len(buf) + len(line) > chunk:
            pieces.append(buf)
            buf = ""
        buf += line
    if buf:
        pieces.append(buf)
    return [
        f"<details><summary>{label} ({i} of {len(pieces)})</summary>\n\n{_FENCE}\n{p.rstrip()}\n{_FENCE}\n</details>"
        for i, p in enumerate(pieces, 1)
    ]
