"""GitHubApp and GitHubClient against the local fake GitHub, over real HTTP and real git."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from bot.forges.github.client import GitHubApp, GitHubClient
from bot.forges.vcs import ForgeError
from bot.models import ForgeComment, Repo
from bot.sandbox.github_fake import FakeGitHub, Fault
from tests.forge_support import Received, commit, git, push_to_feature, webhook_receiver

APP_ID = 42
INSTALLATION = 7
REPO = "acme/infra"
FIXTURES = Path(__file__).parent / "fixtures" / "github"


def _pem() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


@pytest.fixture(scope="module")
def app_key() -> str:
    return _pem()


@pytest.fixture
def fake(app_key: str, repo_dirs: tuple[Path, Path]) -> Iterator[FakeGitHub]:
    with FakeGitHub(app_id=APP_ID, private_key_pem=app_key) as github:
        github.add_repo(REPO, repo_dirs[0])
        github.add_installation(INSTALLATION, [REPO])
        yield github


@pytest.fixture
def app(fake: FakeGitHub) -> Iterator[GitHubApp]:
    github_app = GitHubApp(fake.url or "", APP_ID, fake.private_key_pem)
    yield github_app
    github_app.close()


def repo_model(repo_dirs: tuple[Path, Path], full_name: str = REPO, installation: int = INSTALLATION) -> Repo:
    return Repo("github", full_name, f"file://{repo_dirs[0]}", "main", installation_id=installation)


@pytest.fixture
def client(app: GitHubApp, repo_dirs: tuple[Path, Path]) -> Iterator[GitHubClient]:
    github_client = app.client(repo_model(repo_dirs))
    yield github_client
    github_client.close()


def token_requests(fake: FakeGitHub) -> list[int]:
    return [r.status for r in fake.requests if r.path == f"/app/installations/{INSTALLATION}/access_tokens"]


# -- App authentication ----------------------------------------------------------------------


def test_jwt_signed_with_another_key_is_rejected(fake: FakeGitHub) -> None:
    other_key = _pem()
    stranger = GitHubApp(fake.url or "", APP_ID, other_key)
    with pytest.raises(ForgeError) as caught:
        stranger.installation_token(INSTALLATION)
    stranger.close()
    assert caught.value.status == 401
    assert "JSON web token" in str(caught.value)
    assert "PRIVATE KEY" not in str(caught.value) and other_key[40:80] not in str(caught.value)
    assert token_requests(fake) == [401]


def test_fake_rejects_wrong_issuer_and_overlong_jwt(fake: FakeGitHub) -> None:
    now = int(time.time())
    url = f"{fake.url}/app/installations/{INSTALLATION}/access_tokens"
    for claims in (
        {"iat": now - 60, "exp": now + 540, "iss": "999"},  # another app
        {"iat": now - 60, "exp": now + 900, "iss": str(APP_ID)},  # lives over 10 minutes
    ):
        token = jwt.encode(claims, fake.private_key_pem, algorithm="RS256")
        response = httpx.post(url, headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 401, claims
        assert response.json()["documentation_url"].startswith("https://docs.github.com")
    good = jwt.encode({"iat": now - 60, "exp": now + 540, "iss": str(APP_ID)}, fake.private_key_pem, algorithm="RS256")
    assert httpx.post(url, headers={"Authorization": f"Bearer {good}"}).status_code == 201


def test_installation_token_is_cached_then_refreshed_near_expiry(fake: FakeGitHub, app: GitHubApp) -> None:
    fake.token_lifetime = 200  # under the five-minute margin: the next call must fetch a new one
    short = app.installation_token(INSTALLATION)
    assert short.startswith("ghs_")
    assert app.installation_token(INSTALLATION) != short
    assert token_requests(fake) == [201, 201]

    fake.token_lifetime = 3600
    long = app.installation_token(INSTALLATION)  # replaces the short-lived one...
    assert app.installation_token(INSTALLATION) == long  # ...and is then reused
    assert app.installation_token(INSTALLATION) == long
    assert token_requests(fake) == [201, 201, 201]


def test_installation_token_is_fetched_once_under_concurrency(fake: FakeGitHub, app: GitHubApp) -> None:
    tokens: list[str] = []
    threads = [threading.Thread(target=lambda: tokens.append(app.installation_token(INSTALLATION))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(tokens)) == 1 and len(tokens) == 8
    assert token_requests(fake) == [201]


def test_expired_token_is_refused(fake: FakeGitHub, client: GitHubClient) -> None:
    fake.open_pull(REPO, "feature")
    fake.token_lifetime = -1  # tokens are born expired
    with pytest.raises(ForgeError) as caught:
        client.get_pull_request(1)
    assert caught.value.status == 401
    assert "Bad credentials" in str(caught.value)


def test_token_does_not_reach_repositories_outside_the_installation(
    fake: FakeGitHub, app: GitHubApp, repo_dirs: tuple[Path, Path]
) -> None:
    fake.add_repo("acme/secrets", repo_dirs[0])
    fake.add_installation(8, ["acme/secrets"])
    fake.open_pull("acme/secrets", "feature")
    wrong = app.client(repo_model(repo_dirs, "acme/secrets", installation=INSTALLATION))
    with pytest.raises(ForgeError) as caught:
        wrong.get_pull_request(1)
    assert caught.value.status == 404
    right = app.client(repo_model(repo_dirs, "acme/secrets", installation=8))
    assert right.get_pull_request(1).number == 1


def test_secrets_stay_out_of_reprs_logs_and_errors(
    fake: FakeGitHub, app: GitHubApp, client: GitHubClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fake.open_pull(REPO, "feature")
    client.get_pull_request(1)
    with pytest.raises(ForgeError) as caught:
        client.create_comment(123456, "nope")
    token = app.installation_token(INSTALLATION)
    assert caught.value.status == 404
    for text in (repr(app), repr(client), str(caught.value), caplog.text):
        assert token not in text
        assert "PRIVATE KEY" not in text
    with pytest.raises(ValueError) as bad_key:
        GitHubApp(fake.url or "", APP_ID, "-----BEGIN RSA PRIVATE KEY-----\nnot-a-key\n")
    assert "not-a-key" not in str(bad_key.value)


# -- VCSClient methods -------------------------------------------------------------------------


def test_get_pull_request(fake: FakeGitHub, client: GitHubClient, repo_dirs: tuple[Path, Path]) -> None:
    head = git(repo_dirs[1], "rev-parse", "feature")
    number = fake.open_pull(REPO, "feature", author="alice", title="Add prod")
    pull = client.get_pull_request(number)
    assert (pull.number, pull.head_sha, pull.head_ref, pull.base_ref) == (1, head, "feature", "main")
    assert (pull.author, pull.is_fork, pull.state, pull.merged) == ("alice", False, "open", False)
    assert pull.url == f"{fake.url}/{REPO}/pull/1"
    assert git(repo_dirs[0], "rev-parse", "refs/pull/1/head") == head

    fork = fake.open_pull(REPO, "feature", author="mallory", fork=True)
    assert client.get_pull_request(fork).is_fork is True

    # The default branch is GitHub's now, whatever the client was made from.
    assert client.get_pull_request(number).repo.default_branch == "main"
    fake.set_default_branch(REPO, "trunk")
    assert client.get_pull_request(number).repo.default_branch == "trunk"
    fake.set_default_branch(REPO, "main")

    fake.merge(REPO, number)
    merged = client.get_pull_request(number)
    assert (merged.state, merged.merged) == ("closed", True)
    # The merge button made a real merge commit on main with the PR head as second parent.
    assert git(repo_dirs[0], "rev-parse", "main^2") == head


def test_missing_pull_request_is_a_404_forge_error(fake: FakeGitHub, client: GitHubClient) -> None:
    with pytest.raises(ForgeError) as caught:
        client.get_pull_request(99)
    assert caught.value.status == 404


def test_changed_files_list_both_sides_of_renames(fake: FakeGitHub, client: GitHubClient) -> None:
    number = fake.open_pull(REPO, "feature")
    assert sorted(client.changed_files(number)) == ["env/prod.tf", "main.tf", "new.tf", "old.tf"]


def test_changed_files_follow_pagination(fake: FakeGitHub, client: GitHubClient, repo_dirs: tuple[Path, Path]) -> None:
    work = repo_dirs[1]
    git(work, "checkout", "-q", "-b", "many", "main")
    commit(work, {f"stacks/s{i:03}.tf": f"# {i}\n" for i in range(130)}, "many files")
    git(work, "push", "-q", "origin", "many")
    number = fake.open_pull(REPO, "many")
    files = client.changed_files(number)
    assert len(files) == 130 and files[0] == "stacks/s000.tf" and files[-1] == "stacks/s129.tf"
    pages = [r for r in fake.requests if r.path == f"/repos/{REPO}/pulls/{number}/files"]
    assert len(pages) == 2  # 100 per page


def test_synchronize_picks_up_new_commits(fake: FakeGitHub, client: GitHubClient, repo_dirs: tuple[Path, Path]) -> None:
    number = fake.open_pull(REPO, "feature")
    new_head = push_to_feature(repo_dirs[1], {"env/stage.tf": "# stage\n"}, "stage")
    fake.synchronize(REPO, number)
    assert client.get_pull_request(number).head_sha == new_head
    assert "env/stage.tf" in client.changed_files(number)


def test_comments_are_created(fake: FakeGitHub, app: GitHubApp, client: GitHubClient) -> None:
    number = fake.open_pull(REPO, "feature")
    human = fake.comment(REPO, number, "alice", "deploybot plan")
    made = client.create_comment(number, "Plan running…")
    assert fake.comments(REPO, number) == [
        {"id": human, "user": "alice", "body": "deploybot plan"},
        {"id": made.id, "user": "deploybot[bot]", "body": "Plan running…"},
    ]
    # The creation time is GitHub's own, exactly as its API writes it.
    auth = {"Authorization": f"token {app.installation_token(INSTALLATION)}"}
    listed = httpx.get(f"{fake.url}/repos/{REPO}/issues/{number}/comments", headers=auth).json()
    assert made == ForgeComment(made.id, "deploybot[bot]", "Plan running…", listed[-1]["created_at"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", made.created_at)
    with pytest.raises(ForgeError):
        client.create_comment(number, "x" * 70000)  # over GitHub's 65536-character limit


def test_get_comment_of_this_pull_request_only(fake: FakeGitHub, client: GitHubClient) -> None:
    number, other = fake.open_pull(REPO, "feature"), fake.open_pull(REPO, "feature")
    made = client.create_comment(number, "Plan running…")
    human = fake.comment(REPO, number, "alice", "deploybot apply")
    elsewhere = fake.comment(REPO, other, "alice", "deploybot apply")
    assert client.get_comment(number, made.id) == made
    found = client.get_comment(number, human)
    assert found is not None and (found.id, found.author, found.body) == (human, "alice", "deploybot apply")
    assert found.created_at >= made.created_at
    assert client.get_comment(number, elsewhere) is None  # GitHub finds it, but on another pull request
    assert client.get_comment(other, elsewhere) is not None
    assert client.get_comment(number, 987654) is None  # GitHub: 404
    fake.delete_comment(REPO, human)
    assert client.get_comment(number, human) is None


def test_get_comment_needs_the_installation_token(fake: FakeGitHub, client: GitHubClient) -> None:
    number = fake.open_pull(REPO, "feature")
    made = client.create_comment(number, "Plan running…")
    url = f"{fake.url}/repos/{REPO}/issues/comments/{made.id}"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"Authorization": "token ghs_forged"}).json()["message"] == "Bad credentials"
    assert httpx.get(url, headers={"Authorization": f"token {client._token()}"}).json()["id"] == made.id
    stranger = GitHubClient(fake.url or "", client.repo, lambda: "ghs_forged")
    with pytest.raises(ForgeError) as caught:
        stranger.get_comment(number, made.id)
    assert caught.value.status == 401  # not taken for "no such comment"


def test_commit_people_are_the_accounts_of_commit_emails(
    fake: FakeGitHub, client: GitHubClient, repo_dirs: tuple[Path, Path]
) -> None:
    work = repo_dirs[1]
    fake.set_user_email("bob", "bob@example.com")
    fake.set_user_email("carol", "carol@example.com")
    fake.set_user_email("dave", "dave@example.com")
    git(work, "checkout", "-q", "feature")  # its commit is test@example.com's: an email of no account
    git(work, "-c", "user.name=Carol", "-c", "user.email=carol@example.com", "commit", "-q", "--allow-empty",
        "--author=Bob <bob@example.com>", "-m", "written by bob, committed by carol")
    # What GitHub's "Update branch" button or a web edit makes: committed by GitHub itself.
    git(work, "-c", "user.name=GitHub", "-c", "user.email=noreply@github.com", "commit", "-q", "--allow-empty",
        "--author=Dave <dave@example.com>", "-m", "edited on the web by dave")
    git(work, "push", "-q", "origin", "feature")
    number = fake.open_pull(REPO, "feature")
    assert client.commit_people(number) == {"bob", "carol", "dave"}

    auth = {"Authorization": f"token {client._token()}"}
    listed = httpx.get(f"{fake.url}/repos/{REPO}/pulls/{number}/commits", headers=auth).json()
    people = [(c["author"] and c["author"]["login"], c["committer"] and c["committer"]["login"]) for c in listed]
    assert people == [(None, None), ("bob", "carol"), ("dave", "web-flow")]  # oldest first, as GitHub lists them


def test_commit_people_of_a_pull_request_longer_than_github_lists(
    fake: FakeGitHub, client: GitHubClient, repo_dirs: tuple[Path, Path]
) -> None:
    work = repo_dirs[1]
    git(work, "checkout", "-q", "-b", "long", "main")
    for n in range(250):
        git(work, "commit", "-q", "--allow-empty", "-m", f"step {n}")
    git(work, "push", "-q", "origin", "long")
    number = fake.open_pull(REPO, "long")
    assert client.commit_people(number) == set()  # 250 commits: GitHub lists them all

    git(work, "commit", "-q", "--allow-empty", "-m", "one more")
    git(work, "push", "-q", "origin", "long")
    fake.synchronize(REPO, number)
    with pytest.raises(ForgeError) as caught:
        client.commit_people(number)  # GitHub would list 250 of 251: people might be missing
    assert caught.value.status == 422 and "251 commits" in str(caught.value)


def test_set_status_truncates_long_descriptions(
    fake: FakeGitHub, client: GitHubClient, repo_dirs: tuple[Path, Path]
) -> None:
    sha = git(repo_dirs[1], "rev-parse", "feature")
    client.set_status(sha, "deploybot/plan", "pending", "planning")
    client.set_status(sha, "deploybot/plan", "success", "x" * 300, target_url="https://bot.example/runs/1")
    state, description = fake.statuses(REPO, sha)["deploybot/plan"]
    assert state == "success" and len(description) == 140 and description.endswith("…")
    history = fake.status_history(REPO, sha)
    assert [s["state"] for s in history] == ["pending", "success"]
    assert history[-1]["target_url"] == "https://bot.example/runs/1"
    with pytest.raises(ForgeError) as caught:
        client.set_status("0" * 40, "deploybot/plan", "success", "no such commit")
    assert caught.value.status == 422


def test_reviews_oldest_first(fake: FakeGitHub, client: GitHubClient, repo_dirs: tuple[Path, Path]) -> None:
    number = fake.open_pull(REPO, "feature")
    head, old = git(repo_dirs[1], "rev-parse", "feature"), git(repo_dirs[1], "rev-parse", "main")
    fake.review(REPO, number, "bob", "CHANGES_REQUESTED", commit_id=old)
    approval = fake.review(REPO, number, "carol", "APPROVED")
    fake.dismiss_review(REPO, number, approval)
    fake.review(REPO, number, "dave", "APPROVED")
    reviews = client.reviews(number)
    assert [(r.user, r.state, r.commit_sha) for r in reviews] == [
        ("bob", "CHANGES_REQUESTED", old),
        ("carol", "DISMISSED", head),
        ("dave", "APPROVED", head),
    ]
    assert reviews[0].submitted_at.endswith("Z") and reviews[0].submitted_at.startswith("20")


def test_permission_prefers_role_name(fake: FakeGitHub, client: GitHubClient) -> None:
    for user, level in (("mia", "maintain"), ("tom", "triage"), ("ada", "admin"), ("wes", "write"), ("rae", "read")):
        fake.set_permission(REPO, user, level)
    # The legacy `permission` field would say write for maintain and read for triage.
    assert [client.permission(u) for u in ("mia", "tom", "ada", "wes", "rae")] == [
        "maintain",
        "triage",
        "admin",
        "write",
        "read",
    ]
    assert client.permission("nobody") == "none"


def test_team_membership(fake: FakeGitHub, client: GitHubClient) -> None:
    fake.add_team_member("acme/platform", "bob")
    fake.add_team_member("acme/platform", "ivy", state="pending")
    fake.add_team_member("other/platform", "eve")
    assert client.is_team_member("bob", "acme/platform") is True
    assert client.is_team_member("ivy", "acme/platform") is False  # invitation not accepted
    assert client.is_team_member("carol", "acme/platform") is False
    assert client.is_team_member("eve", "other/platform") is False  # not the installation's org
    with pytest.raises(ValueError):
        client.is_team_member("bob", "platform")


def test_mergeability_ignores_the_bots_own_required_context(
    fake: FakeGitHub, client: GitHubClient, repo_dirs: tuple[Path, Path]
) -> None:
    number = fake.open_pull(REPO, "feature")
    pull = client.get_pull_request(number)
    fake.set_required_contexts(REPO, "main", ["ci/test", "deploybot/apply"])
    fake.set_status(REPO, pull.head_sha, "ci/test", "success")
    client.set_status(pull.head_sha, "deploybot/apply", "pending", "waiting for apply")
    assert fake.pull(REPO, number)["mergeable_state"] == "blocked"

    ignore = frozenset({"deploybot/apply"})
    assert client.mergeability(pull, ignore).mergeable is True
    strict = client.mergeability(pull, frozenset())
    assert strict.mergeable is False and "deploybot/apply" in strict.reason

    fake.set_status(REPO, pull.head_sha, "ci/test", "failure")
    failing = client.mergeability(pull, ignore)
    assert failing.mergeable is False and "ci/test" in failing.reason and "failure" in failing.reason


def test_mergeability_counts_check_runs(fake: FakeGitHub, client: GitHubClient) -> None:
    number = fake.open_pull(REPO, "feature")
    pull = client.get_pull_request(number)
    fake.set_required_contexts(REPO, "main", ["build"])
    assert client.mergeability(pull, frozenset()).mergeable is False  # not reported yet
    fake.set_check_run(REPO, pull.head_sha, "build", "success")
    assert client.mergeability(pull, frozenset()).mergeable is True


def test_mergeability_states(fake: FakeGitHub, client: GitHubClient, repo_dirs: tuple[Path, Path]) -> None:
    number = fake.open_pull(REPO, "feature")
    pull = client.get_pull_request(number)
    assert client.mergeability(pull, frozenset()).mergeable is True  # computed "clean"

    fake.set_mergeable_state(REPO, number, "behind")
    behind = client.mergeability(pull, frozenset())
    assert behind.mergeable is False and "behind" in behind.reason

    fake.set_mergeable_state(REPO, number, "dirty", mergeable=False)
    assert "conflicts with main" in client.mergeability(pull, frozenset()).reason

    fake.set_mergeable_state(REPO, number, "unknown", mergeable=None)
    patient = GitHubClient(fake.url or "", repo_model(repo_dirs), client._token, mergeable_retry_delay=0.01)
    before = len([r for r in fake.requests if r.path == f"/repos/{REPO}/pulls/{number}"])
    pending = patient.mergeability(pull, frozenset())
    after = len([r for r in fake.requests if r.path == f"/repos/{REPO}/pulls/{number}"])
    assert pending.mergeable is False and "not computed" in pending.reason
    assert after - before == 4  # asked again a few times before giving up

    draft = fake.open_pull(REPO, "feature", draft=True)
    assert "draft" in client.mergeability(client.get_pull_request(draft), frozenset()).reason


def test_real_conflict_is_not_mergeable(fake: FakeGitHub, client: GitHubClient, repo_dirs: tuple[Path, Path]) -> None:
    work = repo_dirs[1]
    commit(work, {"main.tf": 'resource "null_resource" "c" {}\n'}, "conflicting change on main")
    git(work, "push", "-q", "origin", "main")
    number = fake.open_pull(REPO, "feature")
    result = client.mergeability(client.get_pull_request(number), frozenset())
    assert result.mergeable is False and "conflict" in result.reason


def test_is_behind_base(fake: FakeGitHub, client: GitHubClient, repo_dirs: tuple[Path, Path]) -> None:
    number = fake.open_pull(REPO, "feature")
    pull = client.get_pull_request(number)
    assert client.is_behind_base(pull) is False
    work = repo_dirs[1]
    commit(work, {"README.md": "hello\n"}, "docs on main")
    git(work, "push", "-q", "origin", "main")
    assert client.is_behind_base(pull) is True


def test_read_file_at_a_ref(client: GitHubClient, repo_dirs: tuple[Path, Path]) -> None:
    assert client.read_file("feature", "main.tf") == 'resource "null_resource" "b" {}\n'
    assert client.read_file("main", "main.tf") == 'resource "null_resource" "a" {}\n'
    assert client.read_file(git(repo_dirs[1], "rev-parse", "main"), "old.tf") == "# old\n" * 20
    assert client.read_file("feature", "old.tf") is None  # renamed away on the branch
    assert client.read_file("main", "modules/net") is None  # a directory, not a file
    assert client.read_file("main", "modules/net/main.tf") == "# net\n"


def test_git_auth_header_carries_a_working_installation_token(fake: FakeGitHub, client: GitHubClient) -> None:
    scheme, _, encoded = client.git_auth_header().partition(" ")
    user, _, token = base64.b64decode(encoded).decode().partition(":")
    assert (scheme, user) == ("Basic", "x-access-token") and token.startswith("ghs_")
    fake.open_pull(REPO, "feature")
    response = httpx.get(f"{fake.url}/repos/{REPO}/pulls/1", headers={"Authorization": f"token {token}"})
    assert response.status_code == 200


def test_fake_answers_like_github_to_bad_requests(fake: FakeGitHub, app: GitHubApp) -> None:
    fake.open_pull(REPO, "feature")
    token = app.installation_token(INSTALLATION)
    auth = {"Authorization": f"Bearer {token}"}
    assert httpx.get(f"{fake.url}/repos/{REPO}/pulls/1").status_code == 401
    assert httpx.get(f"{fake.url}/repos/{REPO}/pulls/1", headers={"Authorization": "token ghs_forged"}).json() == {
        "message": "Bad credentials",
        "documentation_url": "https://docs.github.com/rest",
    }
    unknown = httpx.get(f"{fake.url}/repos/{REPO}/wiki", headers=auth)
    assert unknown.status_code == 404 and unknown.json()["message"] == "Not Found"
    assert httpx.delete(f"{fake.url}/repos/{REPO}/pulls/1", headers=auth).status_code == 404


# -- mergeability: GitHub's states, branch protection and rulesets ------------------------------

OWN = frozenset({"deploybot/apply"})  # the bot's own apply status, which mergeability may ignore


def protection_answers(fake: FakeGitHub) -> list[int]:
    return [r.status for r in fake.requests if r.path == f"/repos/{REPO}/branches/main/protection"]


@pytest.mark.parametrize(
    "state, mergeable, expected, words",
    [
        ("clean", True, True, ""),
        ("unstable", True, True, ""),  # only checks that are not required fail
        ("has_hooks", True, True, ""),
        ("dirty", False, False, "conflicts with main"),
        ("behind", True, False, "behind main"),
        ("draft", True, False, "draft"),
        ("unknown", None, False, "not computed"),
        ("blocked", True, False, "blocked by main's protection (missing required reviews or checks)"),
        ("some_new_state", True, False, "'some_new_state'"),
    ],
)
def test_mergeable_states_each_with_a_reason(
    fake: FakeGitHub, client: GitHubClient, repo_dirs: tuple[Path, Path],
    state: str, mergeable: bool | None, expected: bool, words: str,
) -> None:
    number = fake.open_pull(REPO, "feature")
    fake.set_mergeable_state(REPO, number, state, mergeable=mergeable)
    patient = GitHubClient(fake.url or "", repo_model(repo_dirs), client._token, mergeable_retry_delay=0.01)
    result = patient.mergeability(client.get_pull_request(number), OWN)
    assert result.mergeable is expected and words in result.reason


def test_blocked_base_without_classic_protection_is_no_error(fake: FakeGitHub, client: GitHubClient) -> None:
    """GitHub's 404 "Branch not protected" means no classic requirements, not a failure."""
    number = fake.open_pull(REPO, "feature")
    pull = client.get_pull_request(number)
    client.set_status(pull.head_sha, "deploybot/apply", "pending", "waiting for apply")
    fake.set_mergeable_state(REPO, number, "blocked")  # blocked by something the bot cannot see
    result = client.mergeability(pull, OWN)
    assert result.mergeable is False and "blocked by main's protection" in result.reason
    assert protection_answers(fake) == [404]
    answer = httpx.get(f"{fake.url}/repos/{REPO}/branches/main/protection",
                       headers={"Authorization": f"token {client._token()}"})
    assert answer.json()["message"] == "Branch not protected"


def test_required_reviews_block_although_every_check_but_ours_passed(fake: FakeGitHub, client: GitHubClient) -> None:
    fake.set_permission(REPO, "bob", "write")
    fake.set_permission(REPO, "eve", "read")
    number = fake.open_pull(REPO, "feature")
    pull = client.get_pull_request(number)
    fake.set_required_contexts(REPO, "main", ["ci/test", "deploybot/apply"])
    fake.set_required_reviews(REPO, "main", 1)
    fake.set_status(REPO, pull.head_sha, "ci/test", "success")
    client.set_status(pull.head_sha, "deploybot/apply", "pending", "waiting for apply")
    assert fake.pull(REPO, number)["mergeable_state"] == "blocked"
    missing = client.mergeability(pull, OWN)
    assert missing.mergeable is False and "lacks the approving reviews main requires" in missing.reason

    fake.review(REPO, number, "eve", "APPROVED")  # no write access: GitHub does not count it
    assert client.mergeability(pull, OWN).mergeable is False
    approval = fake.review(REPO, number, "bob", "APPROVED")
    assert client.mergeability(pull, OWN).mergeable is True  # only our own status is missing now
    assert client.mergeability(pull, frozenset()).mergeable is False

    fake.review(REPO, number, "bob", "CHANGES_REQUESTED")
    changes = client.mergeability(pull, OWN)
    assert changes.mergeable is False and "requested changes" in changes.reason
    fake.dismiss_review(REPO, number, approval)
    assert "requested changes" in client.mergeability(pull, OWN).reason


def test_blocked_with_our_status_passed_is_not_mergeable(fake: FakeGitHub, client: GitHubClient) -> None:
    """Once our own required status succeeded, it cannot be why GitHub blocks."""
    number = fake.open_pull(REPO, "feature")
    pull = client.get_pull_request(number)
    fake.set_required_contexts(REPO, "main", ["deploybot/apply"])
    client.set_status(pull.head_sha, "deploybot/apply", "success", "applied")
    fake.set_mergeable_state(REPO, number, "blocked")
    result = client.mergeability(pull, OWN)
    assert result.mergeable is False and "missing required reviews or checks" in result.reason


def test_rulesets_count_on_a_base_without_classic_protection(fake: FakeGitHub, client: GitHubClient) -> None:
    fake.set_permission(REPO, "bob", "write")
    number = fake.open_pull(REPO, "feature")
    pull = client.get_pull_request(number)
    fake.set_branch_rules(REPO, "main", [
        {"type": "deletion"},
        {"type": "required_status_checks", "parameters": {
            "strict_required_status_checks_policy": False,
            "required_status_checks": [{"context": "deploybot/apply"}, {"context": "ci/test"}],
        }},
        {"type": "pull_request", "parameters": {
            "required_approving_review_count": 1, "dismiss_stale_reviews_on_push": False,
            "require_code_owner_review": False, "require_last_push_approval": False,
            "required_review_thread_resolution": False,
        }},
    ])
    client.set_status(pull.head_sha, "deploybot/apply", "pending", "waiting for apply")
    fake.set_status(REPO, pull.head_sha, "ci/test", "failure")
    failing = client.mergeability(pull, OWN)
    assert failing.mergeable is False and "'ci/test' is failure" in failing.reason
    fake.set_status(REPO, pull.head_sha, "ci/test", "success")
    assert "approving reviews" in client.mergeability(pull, OWN).reason
    fake.review(REPO, number, "bob", "APPROVED")
    assert fake.pull(REPO, number)["mergeable_state"] == "blocked"
    assert client.mergeability(pull, OWN).mergeable is True
    assert set(protection_answers(fake)) == {404}


@pytest.mark.parametrize(
    "protect, words",
    [
        (lambda fake: fake.set_protection_setting(REPO, "main", "required_signatures", True), "signed commits"),
        (lambda fake: fake.set_protection_setting(REPO, "main", "required_conversation_resolution", True),
         "resolved conversations"),
        (lambda fake: fake.set_branch_rules(REPO, "main", [{"type": "required_deployments", "parameters": {
            "required_deployment_environments": ["staging"]}}]), "the ruleset rule 'required_deployments'"),
        (lambda fake: fake.set_branch_rules(REPO, "main", [{"type": "pull_request", "parameters": {
            "required_approving_review_count": 0, "required_review_thread_resolution": True}}]),
         "resolved conversations"),
    ],
)
def test_requirements_the_bot_cannot_check_keep_it_blocked(
    fake: FakeGitHub, client: GitHubClient, protect: Callable[[FakeGitHub], None], words: str
) -> None:
    """Our pending status would explain the block, but so might a rule the bot cannot check: deny."""
    number = fake.open_pull(REPO, "feature")
    pull = client.get_pull_request(number)
    fake.set_required_contexts(REPO, "main", ["deploybot/apply"])
    client.set_status(pull.head_sha, "deploybot/apply", "pending", "waiting for apply")
    assert client.mergeability(pull, OWN).mergeable is True  # our own status alone: mergeable
    protect(fake)
    assert fake.pull(REPO, number)["mergeable_state"] == "blocked"
    result = client.mergeability(pull, OWN)
    assert result.mergeable is False and words in result.reason and "cannot check" in result.reason


def test_other_protection_errors_are_forge_errors(fake: FakeGitHub, client: GitHubClient) -> None:
    """Only "Branch not protected" means no protection; any other answer fails the check."""
    number = fake.open_pull(REPO, "feature")
    fake.set_mergeable_state(REPO, number, "blocked")
    fake.inject_faults("GET", r"/branches/main/protection$", [Fault(403, body={
        "message": "Resource not accessible by integration", "documentation_url": "https://docs.github.com/rest"})])
    with pytest.raises(ForgeError) as caught:
        client.mergeability(client.get_pull_request(number), OWN)
    assert caught.value.status == 403 and "Resource not accessible by integration" in str(caught.value)


# -- webhooks ----------------------------------------------------------------------------------


@pytest.fixture
def receiver() -> Iterator[tuple[str, Received]]:
    with webhook_receiver("/webhooks/github") as served:
        yield served


def fixture_keys(name: str) -> set[str]:
    return set(json.loads((FIXTURES / name).read_text()))


def test_webhooks_are_signed_and_shaped_like_githubs(
    fake: FakeGitHub, receiver: tuple[str, list[tuple[dict[str, str], bytes]]], repo_dirs: tuple[Path, Path]
) -> None:
    url, received = receiver
    fake.set_webhook(url, "s3cret")
    number = fake.open_pull(REPO, "feature", author="alice")
    headers, body = received[-1]
    expected = "sha256=" + hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["x-hub-signature-256"], expected)
    assert headers["x-github-event"] == "pull_request" and headers["user-agent"].startswith("GitHub-Hookshot/")
    opened = json.loads(body)
    assert set(opened) == fixture_keys("pull_request.opened.4.json")
    assert opened["action"] == "opened" and opened["installation"]["id"] == INSTALLATION
    assert opened["repository"]["clone_url"] == f"file://{repo_dirs[0].resolve()}"
    assert opened["pull_request"]["head"]["sha"] == git(repo_dirs[1], "rev-parse", "feature")
    assert opened["pull_request"]["user"]["login"] == opened["sender"]["login"] == "alice"

    fake.comment(REPO, number, "bob", "deploybot plan")
    comment = json.loads(received[-1][1])
    assert received[-1][0]["x-github-event"] == "issue_comment"
    assert set(comment) == fixture_keys("issue_comment.created.4.json")
    assert comment["issue"]["number"] == number and comment["issue"]["pull_request"]["url"].endswith("/pulls/1")
    assert (comment["comment"]["body"], comment["comment"]["user"]["login"]) == ("deploybot plan", "bob")

    fake.review(REPO, number, "carol", "APPROVED")
    review = json.loads(received[-1][1])
    assert set(review) == fixture_keys("pull_request_review.submitted.3.json")
    assert (review["review"]["state"], review["review"]["user"]["login"]) == ("approved", "carol")

    fake.synchronize(REPO, number)
    assert set(json.loads(received[-1][1])) == fixture_keys("pull_request.synchronize.1.json") | {"organization"}

    fork = fake.open_pull(REPO, "feature", author="mallory", fork=True)
    fork_payload = json.loads(received[-1][1])["pull_request"]
    assert fork_payload["number"] == fork
    assert fork_payload["head"]["repo"]["full_name"] == "mallory/infra" != fork_payload["base"]["repo"]["full_name"]

    assert [d.status for d in fake.deliveries] == [202] * 5
    first = fake.deliveries[0]
    assert fake.redeliver(first.delivery_id) == 202
    assert received[-1][0]["x-github-delivery"] == first.delivery_id and received[-1][1] == first.body
    assert fake.deliveries[-1].redelivery is True
