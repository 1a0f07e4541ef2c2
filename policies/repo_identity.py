"""Whether a repository is the one the policy means: by its forge id, not only by its name.

Pure: one decision over plain values. The edge (``bot.jobs.dispatcher.repo_id_refusal``)
reads the policy and the store and passes what it found.

A repository's name can be deleted (or renamed away) and registered again by someone
else, an id cannot: the same reason ``callers:`` must pin an id claim. Without this
check whoever takes the name of an allow-listed repository inherits its policy, and
with it the apply role. So each allow-listed repository is held to one forge id:

- ``pinned``: the id the policy gives (``repos: {NAME: {id: 123}}``). When set, it
  is the only id accepted.
- ``recorded``: otherwise, the id the bot saw first for that name (the store's
  ``repo_ids``); a different id later is refused.
- A payload that names no id cannot show it is the same repository: refused when an
  id is pinned or recorded, let through (and nothing recorded) when neither is.
"""

from __future__ import annotations

# What to do when a repository was re-created on purpose: every refusal says it, so whoever reads it knows.
PINNED_HINT = "if the repository was re-created on purpose, put its new id in the policy"
RECORDED_HINT = ("if the repository was re-created on purpose, pin its new id in the policy"
                 " or run `deploybot repo-id forget`")


def check_repo_id(pinned: int | None, recorded: int | None, seen: int | None) -> str | None:
    """None if an event naming repository id `seen` may go on; else the reason it is refused.

    `pinned` is the policy's id for the name, `recorded` the id the bot first saw for it
    (ignored when an id is pinned: the policy is the authority), `seen` the id the payload
    or the forge API names (None: it named none).
    """
    if pinned is not None:
        expected, whose, hint = pinned, "the policy pins", PINNED_HINT
    elif recorded is not None:
        expected, whose, hint = recorded, "deploybot first saw for this name", RECORDED_HINT
    else:
        return None
    if seen is None:
        return f"the forge named no repository id, and {whose} id {expected}"
    if seen != expected:
        return (f"repository id {seen} is not the id {whose} ({expected}):"
                f" the name may belong to another repository now; {hint}")
    return None
