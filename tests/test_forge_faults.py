"""The forge API misbehaves: 5xx, rate limits (429, GitHub's 403s), timeouts.

Client level, against each fake with fault injection (`LocalForge.inject_faults`): each
fault then success → the call succeeds after the expected attempts, waiting what the
headers ask; a comment is never posted twice; a failure that outlasts the retry budget
raises ForgeError. End to end (a World per forge, as in test_flow.py): the plan's comment
and statuses still arrive through transient faults, and a permanent failure to report is
logged and written to the audit log.

Retry policies here are fast (tens of milliseconds of backoff); the waits that are
measured are the ones the forge asks for (`Retry-After: 1` and the like).
"""

from __future__ import annotations

import copy
import email.utils
import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from bot.forges.github import client as github_client
from bot.forges.github.client import GitHubApp, GitHubClient
from bot.forges.gitlab import client as gitlab_client
from bot.forges.gitlab.client import GitLabClient
from bot.forges.retry import RetryPolicy, retry_after_seconds
from bot.forges.vcs import ForgeError
from bot.models import Repo
from bot.sandbox import github_fake, gitlab_fake
from bot.sandbox.forges import FORGES
from bot.sandbox.local_forge import Fault
from bot.sandbox.trial import REPO, wait_for
from tests.forge_support import make_repo_dirs
from tests.world import TEST_POLICY, World, staging_change

FAST = RetryPolicy(base=0.02, cap=0.2, budget=5.0)
GITHUB_REPO = "acme/infra"
GITLAB_PROJECT = "acme/platform/infra"  # nested: the fault patterns see it percent-encoded
APP_ID = 42
INSTALLATION = 7

PULL = r"/(pulls|merge_requests)/\d+$"
COMMENTS = r"/(issues/\d+/comments|merge_requests/\d+/notes)$"
STATUSES = r"/statuses/[0-9a-f]{40}$"


# -- one fake per forge (per module), a fresh pull request and clients per test -------------------


@dataclass
class Served:
    """A running fake forge with one repository, shared by this module's tests of that forge."""

    name: str
    fake: Any  # FakeGitHub | FakeGitLab
    repo: Repo
    token: Callable[[], str]  # GitHub: the App's installation token; GitLab: the bot's token
    secret: str  # what must never show up in an error


@dataclass
class Forge:
    """A test's view of a served fake: its own pull (merge) request, clients and request log."""

    served: Served
    number: int
    sha: str
    mark: int  # requests before this test's
    clients: list[Any] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.served.name

    @property
    def fake(self) -> Any:
        return self.served.fake

    @property
    def repo(self) -> str:
        return self.served.repo.full_name

    @property
    def secret(self) -> str:
        return self.served.secret

    def make_client(self, **kwargs: Any) -> Any:
        """A GitHubClient or GitLabClient of the repository, with FAST retries unless told otherwise."""
        kwargs.setdefault("retry", FAST)
        url = kwargs.pop("url", self.fake.url or "")
        if self.name == "github":
            made: Any = GitHubClient(url, self.served.repo, self.served.token, **kwargs)
        else:
            made = GitLabClient(url, self.served.token(), self.served.repo, **kwargs)
        self.clients.append(made)
        return made

    def server_error(self, status: int = 500, **fault: Any) -> Fault:
        return (github_fake if self.name == "github" else gitlab_fake).server_error(status, **fault)

    def rate_limited(self, retry_after: int) -> Fault:
        if self.name == "github":
            return github_fake.too_many_requests(retry_after)
        return gitlab_fake.rate_limited(retry_after)

    def answers(self, method: str, pattern: str) -> list[int]:
        """The statuses the fake answered to this test's matching requests, oldest first."""
        return [r.status for r in self.fake.requests[self.mark:] if r.method == method and re.search(pattern, r.path)]

    def comments(self) -> list[str]:
        return [c["body"] for c in self.fake.comments(self.repo, self.number)]

    def status(self, context: str) -> str | None:
        return self.fake.statuses(self.repo, self.sha).get(context, (None, ""))[0]


@pytest.fixture(scope="module")
def app_key() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


@pytest.fixture(scope="module", params=["github", "gitlab"])
def served(request: pytest.FixtureRequest, app_key: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    bare, _ = make_repo_dirs(tmp_path_factory.mktemp(f"faults-{request.param}"))
    if request.param == "github":
        fake: Any = github_fake.FakeGitHub(app_id=APP_ID, private_key_pem=app_key)
        fake.start()
        fake.add_repo(GITHUB_REPO, bare)
        fake.add_installation(INSTALLATION, [GITHUB_REPO])
        app = GitHubApp(fake.url or "", APP_ID, app_key, retry=FAST)
        repo = Repo("github", GITHUB_REPO, f"file://{bare}", "main", installation_id=INSTALLATION)
        yield Served("github", fake, repo, lambda: app.installation_token(INSTALLATION),
                     app.installation_token(INSTALLATION))
        app.close()
    else:
        fake = gitlab_fake.FakeGitLab()
        fake.start()
        fake.add_project(GITLAB_PROJECT, bare)
        repo = Repo("gitlab", GITLAB_PROJECT, f"file://{bare}", "main")
        yield Served("gitlab", fake, repo, lambda: fake.token, fake.token)
    fake.stop()


@pytest.fixture
def forge(served: Served) -> Iterator[Forge]:
    fake = served.fake
    if served.name == "github":
        number = fake.open_pull(GITHUB_REPO, "feature")
        sha = fake.pull(GITHUB_REPO, number)["head"]["sha"]
    else:
        number = fake.open_merge_request(GITLAB_PROJECT, "feature")
        sha = fake.mr(GITLAB_PROJECT, number)["sha"]
    view = Forge(served, number, sha, len(fake.requests))
    yield view
    fake.clear_faults()
    for made in view.clients:
        made.close()


def timed(call: Callable[[], Any]) -> tuple[Any, float]:
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


# -- retries of reads and writes ------------------------------------------------------------------


def test_server_errors_then_success(forge: Forge) -> None:
    forge.fake.inject_faults("GET", PULL, [forge.server_error(500), forge.server_error(502), forge.server_error(503)])
    pull = forge.make_client().get_pull_request(forge.number)
    assert pull.head_sha == forge.sha
    assert forge.answers("GET", PULL) == [500, 502, 503, 200]
    assert forge.fake.pending_faults == 0


def test_status_write_waits_out_a_429_retry_after(forge: Forge) -> None:
    forge.fake.inject_faults("POST", STATUSES, [forge.server_error(502), forge.rate_limited(retry_after=1)])
    _, elapsed = timed(lambda: forge.make_client().set_status(forge.sha, "faults/429", "success", "ok"))
    assert 1.0 <= elapsed < 3.0
    assert forge.answers("POST", STATUSES) == [502, 429, 201]
    assert forge.status("faults/429") == "success"


def test_retry_after_as_an_http_date(forge: Forge) -> None:
    when = email.utils.formatdate(time.time() + 1.5, usegmt=True)  # whole seconds: 0.5 to 1.5 s from now
    forge.fake.inject_faults("GET", PULL, [Fault(429, {"Retry-After": when}, {"message": "slow down"})])
    _, elapsed = timed(lambda: forge.make_client().get_pull_request(forge.number))
    assert 0.45 <= elapsed < 3.0
    assert forge.answers("GET", PULL) == [429, 200]


def test_a_wait_longer_than_the_budget_ends_the_call_at_once(forge: Forge) -> None:
    forge.fake.inject_faults("GET", PULL, [forge.rate_limited(retry_after=120)])
    with pytest.raises(ForgeError) as caught:
        timed(lambda: forge.make_client().get_pull_request(forge.number))
    assert caught.value.status == 429
    assert "asked to wait 120s" in str(caught.value)
    assert forge.answers("GET", PULL) == [429]


def test_timeouts_are_retried(forge: Forge) -> None:
    forge.fake.inject_faults("GET", PULL, [forge.server_error(504, delay=1.5)])
    pull, elapsed = timed(lambda: forge.make_client(timeout=1).get_pull_request(forge.number))
    assert pull.head_sha == forge.sha
    assert 1.0 <= elapsed < 3.0  # the client gave up on the slow answer and asked again
    wait_for(lambda: sorted(forge.answers("GET", PULL)) == [200, 504], 5, "the late answer to be logged")


def test_permanent_failure_raises_after_the_budget(forge: Forge) -> None:
    forge.fake.inject_faults("GET", PULL, [forge.server_error(500)] * 100)
    client = forge.make_client(retry=RetryPolicy(base=0.02, cap=0.2, budget=1.0))
    with pytest.raises(ForgeError) as caught:
        timed(lambda: client.get_pull_request(forge.number))
    error = caught.value
    assert error.status == 500
    assert "gave up after" in str(error) and forge.secret not in str(error)
    attempts = len(forge.answers("GET", PULL))
    assert 3 <= attempts < 100 and forge.fake.pending_faults == 100 - attempts
    assert f"gave up after {attempts} attempt(s)" in str(error)


def test_unreachable_forge_gives_up_without_a_status(forge: Forge) -> None:
    client = forge.make_client(url="http://127.0.0.1:9", retry=RetryPolicy(base=0.02, cap=0.1, budget=0.5))
    with pytest.raises(ForgeError) as caught:
        client.get_pull_request(forge.number)
    assert caught.value.status is None
    assert "could not reach" in str(caught.value) and "gave up after" in str(caught.value)


def test_non_transient_errors_are_not_retried(forge: Forge) -> None:
    forge.fake.inject_faults("GET", PULL, [Fault(404, {}, {"message": "Not Found"}), forge.server_error(500)])
    with pytest.raises(ForgeError) as caught:
        forge.make_client().get_pull_request(forge.number)
    assert caught.value.status == 404
    assert forge.answers("GET", PULL) == [404] and forge.fake.pending_faults == 1


# -- comments are not idempotent ------------------------------------------------------------------


def test_comment_lost_to_a_5xx_is_posted_again(forge: Forge) -> None:
    forge.fake.inject_faults("POST", COMMENTS, [forge.server_error(502)])
    comment = forge.make_client().create_comment(forge.number, "**deploybot plan** for `abc`")
    assert forge.comments() == ["**deploybot plan** for `abc`"]
    assert forge.answers("POST", COMMENTS) == [502, 201]
    assert forge.answers("GET", COMMENTS) == [200, 200]  # identical comments: before posting, and before again
    assert comment == forge.make_client().get_comment(forge.number, comment.id)


@pytest.mark.parametrize("fault", [
    pytest.param(dict(status=502), id="5xx-after-the-work"),
    pytest.param(dict(status=504, delay=1.5), id="timeout-after-the-work"),
])
def test_comment_made_despite_the_error_is_not_posted_twice(forge: Forge, fault: dict[str, Any]) -> None:
    forge.fake.inject_faults("POST", COMMENTS, [forge.server_error(**fault, handled=True)])
    comment = forge.make_client(timeout=1).create_comment(forge.number, "plan output")
    assert forge.comments() == ["plan output"]
    made = forge.fake.comments(forge.repo, forge.number)[0]
    assert made["id"] == comment.id
    assert forge.answers("GET", COMMENTS) == [200, 200]
    wait_for(lambda: forge.answers("POST", COMMENTS) == [fault["status"]], 5, "the late answer")
    # Taken from the listing, it is the comment as the forge has it: author and creation time too.
    assert comment == forge.make_client().get_comment(forge.number, comment.id)
    assert comment.created_at and comment.author == made["user"]


def test_rate_limited_comment_is_posted_again_without_looking(forge: Forge) -> None:
    forge.fake.inject_faults("POST", COMMENTS, [forge.rate_limited(retry_after=1)])
    _, elapsed = timed(lambda: forge.make_client().create_comment(forge.number, "hello"))
    assert elapsed >= 1.0
    assert forge.comments() == ["hello"]
    assert forge.answers("POST", COMMENTS) == [429, 201]
    assert forge.answers("GET", COMMENTS) == [200]  # the first look only: a rate limited post was not made


def test_an_identical_earlier_comment_is_not_taken_for_ours(forge: Forge) -> None:
    """A re-plan of the same commit says exactly what the last plan said: it is still posted."""
    client = forge.make_client()
    client.create_comment(forge.number, "**deploybot plan**: no changes")
    forge.fake.inject_faults("POST", COMMENTS, [forge.server_error(500), forge.server_error(502)])
    second = client.create_comment(forge.number, "**deploybot plan**: no changes")
    assert forge.comments() == ["**deploybot plan**: no changes"] * 2
    assert forge.fake.comments(forge.repo, forge.number)[1]["id"] == second.id


# -- the fakes: faults come after authentication -------------------------------------------------


def test_faults_come_after_authentication(forge: Forge) -> None:
    forge.fake.inject_faults("*", PULL, [forge.server_error(502)])
    if forge.name == "github":
        url = f"{forge.fake.url}/repos/{GITHUB_REPO}/pulls/{forge.number}"
        headers = {"Authorization": "token ghs_not-a-token"}
    else:
        url = f"{forge.fake.url}/api/v4/projects/{gitlab_fake.encoded_path(GITLAB_PROJECT)}/merge_requests/{forge.number}"
        headers = {"PRIVATE-TOKEN": "glpat-not-a-token"}
    assert httpx.get(url, headers=headers).status_code == 401
    assert forge.fake.pending_faults == 1
    assert forge.make_client().get_pull_request(forge.number).head_sha == forge.sha
    assert forge.answers("GET", PULL) == [401, 502, 200]


def test_fault_shapes_and_clear(forge: Forge) -> None:
    client = httpx.Client(base_url=forge.fake.url or "")
    if forge.name == "github":
        headers = {"Authorization": f"token {forge.secret}"}
        path = f"/repos/{GITHUB_REPO}/pulls/{forge.number}"
        limit = github_fake.secondary_rate_limit(retry_after=3)
        forge.fake.inject_faults("GET", PULL, [limit, forge.server_error(502)])
        limited = client.get(path, headers=headers)
        assert limited.status_code == 403 and limited.headers["retry-after"] == "3"
        assert limited.json()["message"].startswith("You have exceeded a secondary rate limit")
        assert client.get(path, headers=headers).json()["message"] == "Server Error"
    else:
        headers = {"PRIVATE-TOKEN": forge.fake.token}
        path = f"/api/v4/projects/{gitlab_fake.encoded_path(GITLAB_PROJECT)}/merge_requests/{forge.number}"
        forge.fake.inject_faults("GET", PULL, [gitlab_fake.rate_limited(retry_after=3), forge.server_error(502)])
        limited = client.get(path, headers=headers)
        assert limited.status_code == 429 and limited.text == "Retry later\n"
        assert limited.headers["retry-after"] == "3" and limited.headers["ratelimit-remaining"] == "0"
        assert int(limited.headers["ratelimit-reset"]) >= int(time.time()) + 1
        assert client.get(path, headers=headers).json() == {"message": "502 Bad Gateway"}
    forge.fake.inject_faults("GET", PULL, [forge.server_error(500)] * 3)
    assert forge.fake.pending_faults == 3
    forge.fake.clear_faults()
    assert client.get(path, headers=headers).status_code == 200
    client.close()


# -- GitHub only: its rate limits and the App's own calls --------------------------------------------


@pytest.mark.parametrize("served", ["github"], indirect=True)
def test_github_secondary_rate_limit_with_retry_after(forge: Forge) -> None:
    forge.fake.inject_faults("POST", STATUSES, [github_fake.secondary_rate_limit(retry_after=1)])
    _, elapsed = timed(lambda: forge.make_client().set_status(forge.sha, "faults/secondary", "pending", "wait"))
    assert 1.0 <= elapsed < 3.0
    assert forge.answers("POST", STATUSES) == [403, 201]


@pytest.mark.parametrize("served", ["github"], indirect=True)
def test_github_secondary_rate_limit_without_a_time_waits_a_minute(forge: Forge) -> None:
    """GitHub's advice is a minute; inside a 5 s budget that means giving up at once."""
    forge.fake.inject_faults("GET", PULL, [github_fake.secondary_rate_limit(retry_after=None)])
    with pytest.raises(ForgeError) as caught:
        forge.make_client().get_pull_request(forge.number)
    assert caught.value.status == 403 and "asked to wait 60s" in str(caught.value)
    assert forge.answers("GET", PULL) == [403]


@pytest.mark.parametrize("served", ["github"], indirect=True)
def test_github_primary_rate_limit_waits_for_the_reset(forge: Forge) -> None:
    started = time.time()
    fault = github_fake.primary_rate_limit(reset_in=1)
    reset = int(fault.headers["x-ratelimit-reset"])
    forge.fake.inject_faults("GET", PULL, [fault])
    forge.make_client().get_pull_request(forge.number)
    assert time.time() >= reset  # not before the reset GitHub named
    assert time.time() - started < 4.5
    assert forge.answers("GET", PULL) == [403, 200]


@pytest.mark.parametrize("served", ["github"], indirect=True)
def test_github_app_token_fetch_is_retried_and_readiness_is_not(forge: Forge, app_key: str) -> None:
    app = GitHubApp(forge.fake.url or "", APP_ID, app_key, retry=FAST)
    tokens = rf"/app/installations/{INSTALLATION}/access_tokens$"
    forge.fake.inject_faults("POST", tokens, [github_fake.server_error(502), github_fake.too_many_requests(1)])
    assert app.installation_token(INSTALLATION).startswith("ghs_")
    assert forge.answers("POST", tokens)[-3:] == [502, 429, 201]
    forge.fake.inject_faults("GET", r"^/app$", [github_fake.server_error(502)])
    with pytest.raises(ForgeError) as caught:
        app.check()  # /readyz must answer quickly: one attempt
    assert caught.value.status == 502 and forge.answers("GET", r"^/app$") == [502]
    app.close()


# -- GitLab only -------------------------------------------------------------------------------


@pytest.mark.parametrize("served", ["gitlab"], indirect=True)
def test_gitlab_429_with_only_ratelimit_reset(forge: Forge) -> None:
    started = time.time()
    reset = int(started) + 1
    forge.fake.inject_faults("GET", PULL, [Fault(429, {"RateLimit-Remaining": "0", "RateLimit-Reset": str(reset)},
                                                 "Retry later\n")])
    forge.make_client().get_pull_request(forge.number)
    assert time.time() >= reset
    assert forge.answers("GET", PULL) == [429, 200]


@pytest.mark.parametrize("served", ["gitlab"], indirect=True)
def test_gitlab_repeated_pending_status_after_a_lost_answer(forge: Forge) -> None:
    """A pending status that GitLab set although the answer was lost: the repeat's 400 counts as done."""
    forge.fake.inject_faults("POST", STATUSES, [forge.server_error(502, handled=True)])
    forge.make_client().set_status(forge.sha, "faults/lost-answer", "pending", "planning…")
    assert forge.status("faults/lost-answer") == "pending"
    assert forge.answers("POST", STATUSES) == [502, 400]


# -- the retry policy itself ---------------------------------------------------------------------


def test_retry_after_values() -> None:
    now = 1_700_000_000.0
    assert retry_after_seconds("3", now) == 3.0
    assert retry_after_seconds(" 0 ", now) == 0.0
    assert retry_after_seconds("-5", now) == 0.0
    assert retry_after_seconds(email.utils.formatdate(now + 30, usegmt=True), now) == 30.0
    assert retry_after_seconds(email.utils.formatdate(now - 30, usegmt=True), now) == 0.0
    for junk in (None, "", "soon", "nan", "inf"):
        assert retry_after_seconds(junk, now) is None


def test_full_jitter_stays_under_the_exponential_cap() -> None:
    policy = RetryPolicy(base=0.5, cap=30.0, budget=60.0)
    for retry in range(12):
        ceiling = min(30.0, 0.5 * 2**retry)
        waits = [policy.backoff(retry) for _ in range(200)]
        assert all(0.0 <= w <= ceiling for w in waits)
        assert max(waits) > ceiling / 2  # spread over the range, not pinned to one end
    with pytest.raises(ValueError):
        RetryPolicy(budget=-1)


# -- end to end: the plan still reports; a permanent failure is logged and audited -----------------


MakeWorld = Callable[..., World]


@pytest.fixture(params=sorted(FORGES))
def make_world(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MakeWorld]:
    """Worlds on each forge in turn (as in test_flow.py), their bot's clients retrying fast."""
    fast = RetryPolicy(base=0.05, cap=1.0, budget=3.0)
    monkeypatch.setattr(github_client, "DEFAULT_RETRY", fast)
    monkeypatch.setattr(gitlab_client, "DEFAULT_RETRY", fast)
    worlds: list[World] = []

    def make(policy_changes: dict | None = None, **kwargs: Any) -> World:
        policy = copy.deepcopy(TEST_POLICY)
        policy["repos"][REPO].update(policy_changes or {})
        world = World(tmp_path / f"world{len(worlds)}", policy, forge=request.param, **kwargs)
        worlds.append(world)
        return world

    yield make
    for world in worlds:
        world.forge.fake.clear_faults()
        world.stop()


def transient_faults(world: World) -> list[Fault]:
    fakes = github_fake if world.forge.name == "github" else gitlab_fake
    rate_limited = fakes.too_many_requests(1) if world.forge.name == "github" else fakes.rate_limited(1)
    return [fakes.server_error(502), rate_limited]


def test_plan_comment_and_statuses_arrive_through_transient_faults(make_world: MakeWorld) -> None:
    world = make_world()
    fake = world.forge.fake
    fake.inject_faults("POST", COMMENTS, transient_faults(world))
    fake.inject_faults("POST", STATUSES, transient_faults(world))

    number = world.open_pr("resize-staging", staging_change(world))
    comment = world.wait_comment(number, "**deploybot plan**", timeout=60)
    assert "`staging`: +2 ~0 -0" in comment
    assert world.wait_status(number, "deploybot/plan", "success") == "1 project(s) planned"
    world.wait_status(number, "deploybot/apply", "pending")
    assert world.wait_status(number, "deploybot/plan: staging", "success").startswith("+2 ~0 -0 (plan `")

    world.wait_idle()
    assert len([c for c in world.bot_comments(number) if "**deploybot plan**" in c]) == 1
    assert fake.pending_faults == 0
    comment_posts = [r.status for r in fake.requests if r.method == "POST" and _matches(COMMENTS, r.path)]
    assert comment_posts[:3] == [502, 429, 201]
    # Statuses come from the handler (the run's pending) and the worker (each project's), so the
    # faults land on either; GitLab answers a second pending with 400 (the client's "done").
    status_posts = [r.status for r in fake.requests if r.method == "POST" and _matches(STATUSES, r.path)]
    assert status_posts.count(502) == 1 and status_posts.count(429) == 1
    assert set(status_posts) <= {201, 400, 429, 502} and 201 in status_posts


def test_a_slow_pending_status_never_lands_after_the_plan_is_done(make_world: MakeWorld) -> None:
    world = make_world()
    fakes = github_fake if world.forge.name == "github" else gitlab_fake
    rate_limited = fakes.too_many_requests(2) if world.forge.name == "github" else fakes.rate_limited(2)
    # The first status of the pull request is held for two seconds: longer than its whole plan.
    world.forge.fake.inject_faults("POST", STATUSES, [rate_limited])
    number = world.open_pr("resize-staging", staging_change(world))
    world.wait_comment(number, "**deploybot plan**", timeout=60)
    world.wait_idle()  # the handler is done, its status call with it
    store = world.store()
    try:
        def reported() -> bool:
            with store._db() as db:
                return not db.execute("SELECT 1 FROM runs WHERE reported != 2").fetchone()

        wait_for(reported, 30, "the run's report, statuses included")
    finally:
        store.close()
    statuses = world.statuses(number)
    assert statuses["deploybot/plan"] == ("success", "1 project(s) planned")
    state, description = statuses["deploybot/plan: staging"]
    assert state == "success" and description.startswith("+2 ~0 -0 (plan `")


def test_permanent_failure_to_report_is_logged_and_audited(make_world: MakeWorld,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    world = make_world()
    fake = world.forge.fake
    number = world.open_pr("resize-staging", staging_change(world))
    world.wait_comment(number, "**deploybot plan**", timeout=60)
    world.wait_idle()

    fake.inject_faults("POST", COMMENTS, [github_fake.server_error(500) if world.forge.name == "github"
                                          else gitlab_fake.server_error(500)] * 20)
    world.comment(number, "alice", "deploybot plan")

    def reported() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "deploybot.worker" and "could not report run" in r.getMessage()]

    record = wait_for(reported, 60, "the bot to log that it could not report the run")[0]  # type: ignore[index]
    assert "500" in record.getMessage() and "gave up after" in record.getMessage()
    assert 0 < fake.pending_faults < 20  # the retry budget ran out, not the faults
    assert any(r.name == "deploybot.forge" and "giving up" in r.getMessage() for r in caplog.records)
    assert len([c for c in world.bot_comments(number) if "**deploybot plan**" in c]) == 1  # the first run's

    store = world.store()
    try:
        entries = store.audit_entries(200)
    finally:
        store.close()
    failures = [e for e in entries if e["outcome"] == "failed" and "report" in e["action"]]
    assert failures, f"no audit entry for the failed report among {[(e['action'], e['outcome']) for e in entries]}"
    assert failures[0]["repo"] == REPO and "500" in failures[0]["detail"]


def _matches(pattern: str, path: str) -> bool:
    return re.search(pattern, path) is not None
