"""How the forge clients retry: backoff inside a budget, the forge's word on when to come back.

Both clients (bot.forges.github.client, bot.forges.gitlab.client) classify a failed attempt
as a `Transient` (or not) and let a `RetryPolicy` run the call; `post_once` keeps a comment
from being posted twice when an answer leaves open whether the forge made it.
"""

from __future__ import annotations

import email.utils
import logging
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC
from typing import TypeVar

import httpx
import requests
import urllib3

from bot.forges.vcs import ForgeError
from bot.models import ForgeComment

log = logging.getLogger("deploybot.forge")
T = TypeVar("T")

TRANSIENT_STATUSES = frozenset({500, 502, 503, 504})
RATE_LIMIT_RESET_MARGIN = 1.0  # reset times are whole seconds on the forge's clock
COMMENT_LOOKBACK = 300.0  # seconds: how far back identical comments are listed before and after posting


@dataclass(frozen=True)
class Transient:
    """A failed attempt worth repeating, as a forge client's classifier sees it."""

    reason: str  # for the log: "502", "429", "ReadTimeout" (never a secret)
    wait: float | None = None  # seconds the forge asked for (Retry-After, rate-limit reset); None: back off
    maybe_done: bool = False  # the forge may have carried the request out (5xx, timeout, dropped connection)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long a forge client tries one call.

    Attempt n (from 0) that fails transiently is followed by a pause of `wait` seconds if the
    forge named one, else a random pause in [0, min(cap, base * 2**n)] ("full jitter"). No
    attempt starts once `budget` seconds have passed since the first (a pause that would end
    later ends the call instead), so a call takes at most `budget` plus one request timeout.
    """

    base: float = 0.5
    cap: float = 30.0
    budget: float = 60.0

    def __post_init__(self) -> None:
        for name in ("base", "cap", "budget"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"retry {name} must be a finite number of seconds >= 0, got {value!r}")

    def backoff(self, retry: int) -> float:
        """The pause before retry number `retry` (from 0) when the forge named none."""
        return random.uniform(0.0, min(self.cap, self.base * 2.0 ** min(retry, 32)))

    def run(
        self,
        call: Callable[[], T],
        classify: Callable[[BaseException], Transient | None],
        convert: Callable[[BaseException], ForgeError | None],
        *,
        what: str,
        chain: bool = True,
    ) -> T:
        """`call()`, again after each transient failure while the budget lasts.

        `classify` says whether a failure is transient (and what the forge asked for),
        `convert` turns it into the ForgeError the caller gets (None: not a forge failure,
        raised as it is). A ForgeError from `call` (a token fetch that already had its own
        retries) passes through untouched. `what` names the call in log lines and errors;
        `chain=False` keeps the library's exception out of the traceback.
        """
        started = time.monotonic()
        attempts = 0
        while True:
            attempts += 1
            try:
                return call()
            except ForgeError:
                raise
            except Exception as exc:
                error = convert(exc)
                if error is None:
                    raise
                cause = exc if chain else None
                transient = classify(exc)
                if transient is None:
                    raise error from cause
                wait = self.backoff(attempts - 1) if transient.wait is None else transient.wait
                elapsed = time.monotonic() - started
                if elapsed + wait > self.budget:
                    asked = f"; asked to wait {wait:.0f}s more" if transient.wait is not None else ""
                    log.warning("giving up %s after %d attempt(s) in %.1fs: %s%s", what, attempts, elapsed,
                                transient.reason, asked)
                    raise ForgeError(f"{error} (gave up after {attempts} attempt(s) in {elapsed:.1f}s{asked})",
                                     error.status) from cause
                log.warning("retrying %s in %.2fs after %s (attempt %d)", what, wait, transient.reason, attempts)
                time.sleep(wait)


DEFAULT_RETRY = RetryPolicy()


def post_once(
    post: Callable[[], ForgeComment],
    identical: Callable[[], list[ForgeComment]],
    classify: Callable[[BaseException], Transient | None],
    what: str,
) -> Callable[[], ForgeComment]:
    """One attempt at creating a comment, for `RetryPolicy.run`, that never makes it twice.

    Creating a comment is not idempotent, and a 5xx, a timeout or a dropped connection does
    not say whether the forge made it. So the first attempt notes the ids of the comments
    `identical()` lists (comments with the same body, recent ones), and an attempt after such
    an answer lists them again: a new one is ours and is returned instead of posting again.
    After a rate limit or a refused connection (never carried out) it simply posts again.
    Costs one extra read per comment; a clock far ahead of the forge's (beyond the look-back)
    makes the listing miss, and the worst case is the old one: a duplicate comment.
    """
    before: set[int] | None = None
    maybe_posted = False

    def attempt() -> ForgeComment:
        nonlocal before, maybe_posted
        if before is None:
            before = {comment.id for comment in identical()}
        elif maybe_posted:
            new = [comment for comment in identical() if comment.id not in before]
            if new:
                ours = max(new, key=lambda comment: comment.id)  # forges number comments in order
                log.warning("%s: the forge made comment %s although it answered an error; not posting it again",
                            what, ours.id)
                return ours
        try:
            return post()
        except Exception as exc:
            transient = classify(exc)
            maybe_posted = maybe_posted or (transient is not None and transient.maybe_done)
            raise

    return attempt


def header(headers: Mapping[str, str] | None, name: str) -> str | None:
    """A response header by case-insensitive name."""
    if not headers:
        return None
    lowered = name.lower()
    return next((str(v) for k, v in headers.items() if k.lower() == lowered), None)


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """`Retry-After` as seconds from now: delta-seconds or an HTTP date; None if absent or unreadable."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - (time.time() if now is None else now)
    return max(0.0, seconds) if math.isfinite(seconds) else None


def reset_wait_seconds(value: str | None, now: float | None = None) -> float | None:
    """A rate-limit reset given as epoch seconds (`x-ratelimit-reset`, `RateLimit-Reset`), as seconds to wait."""
    if value is None:
        return None
    try:
        reset = float(value.strip())
    except ValueError:
        return None
    if not math.isfinite(reset):
        return None
    return max(0.0, reset - (time.time() if now is None else now)) + RATE_LIMIT_RESET_MARGIN


def transport_transient(exc: BaseException) -> Transient | None:
    """Connection failures and timeouts of requests (PyGithub, python-gitlab) and httpx."""
    name = type(exc).__name__
    if isinstance(exc, (requests.ConnectTimeout, httpx.ConnectTimeout, httpx.ConnectError)):
        return Transient(name)  # no connection, so nothing was sent
    if isinstance(exc, requests.ConnectionError):
        # Refused or unresolvable: never sent. Anything else (reset, closed mid-answer) may have arrived.
        return Transient(name, maybe_done=not _never_connected(exc))
    if isinstance(exc, (requests.Timeout, requests.exceptions.ChunkedEncodingError, httpx.TransportError)):
        return Transient(name, maybe_done=True)
    return None


def _never_connected(exc: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, urllib3.exceptions.NewConnectionError):
            return True
        reason = getattr(current, "reason", None)  # urllib3's MaxRetryError keeps its cause here
        if isinstance(reason, BaseException) and id(reason) not in seen:
            current = reason
            continue
        nested = current.args[0] if current.args and isinstance(current.args[0], BaseException) else None
        current = nested or current.__cause__ or current.__context__
    return False
