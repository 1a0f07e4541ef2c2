"""May this actor do this here? Pure checks over facts the caller fetched from the forge."""

from __future__ import annotations

from dataclasses import dataclass

from policies.policy import PERMISSIONS, Subjects, normalize_permission


@dataclass(frozen=True)
class Actor:
    """A user as the forge reports them for one repository."""

    login: str
    permission: str  # "none" ... "admin" (GitLab names accepted); anything unknown counts as none
    teams: frozenset[str] = frozenset()  # of the teams asked about (teams_to_check), those they are in


def permission_rank(permission: str | None) -> int:
    """Position in none < read < triage < write < maintain < admin; unknown or None is none (0)."""
    if not isinstance(permission, str):
        return 0
    normalized = normalize_permission(permission)
    return PERMISSIONS.index(normalized) if normalized is not None else 0


def is_allowed(subjects: Subjects, actor: Actor) -> bool:
    """Whether the actor is listed, in a listed team, or has at least the listed permission."""
    if not actor.login:
        return False
    # Loaded policies hold lower-cased users already; lowering again covers hand-built Subjects.
    if actor.login.lower() in {u.lower() for u in subjects.users}:
        return True
    if {t.lower() for t in subjects.teams} & {t.lower() for t in actor.teams}:
        return True
    if subjects.permission is not None:
        required = permission_rank(subjects.permission)
        # required > 0 always holds for a loaded policy; the check keeps a hand-built
        # Subjects(permission="none") from letting strangers in.
        return required > 0 and permission_rank(actor.permission) >= required
    return False


def teams_to_check(*subjects: Subjects) -> set[str]:
    """Every team named by the given rules: exactly what the caller should ask the forge about."""
    return {team for s in subjects for team in s.teams}
