"""Keeping what terraform runs out of our own process."""

from __future__ import annotations

import ctypes

PR_SET_DUMPABLE = 4


def harden_process() -> None:
    """Terraform runs code from pull requests as our user: keep it out of our memory and environment.

    A non-dumpable process's /proc files (environ, mem) belong to root and it cannot
    be ptraced by processes of the same user. Linux only; elsewhere a no-op.
    """
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    except (OSError, AttributeError):
        pass
