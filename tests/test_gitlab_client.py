"""GitLabClient against the local fake GitLab, over real HTTP and real git, driven by python-gitlab."""

from __future__ import annotations

import base64
import json
import logging
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bot.forges.gitlab.client import NOTE_LIMIT, GitLabClient, approved_sha
from bot.forges.gitlab.webhook import delivery_id, parse_event, verify_signing_token, verify_token
from bot.forges.vcs import ForgeError
from bot.forges.webhook import InvalidSignature
from bot.models import CommentEvent, ForgeComment, PullRequestEvent, Repo, ReviewEvent
from bot.sandbox.gitlab_fake import DETAILED_MERGE_STATUSES, FakeGitLab, Fault
from policies.apply_requirements import PlanFacts, plan_approvers
from tests.forge_support import Received, commit, git, push_to_feature, webhook_receiver

PROJECT = "acme/platform/infra"  # nested: group/subgroup/project
ENCODED = "acme%2Fplatform%2Finfra"
FIXTURES = Path(__file__).parent / "fixtures" / "gitlab"


@pytest.fixture
def fake(repo_dirs: tuple[Path, Path]) -> Iterator[FakeGitLab]:
    with FakeGitLab() as gitlab:
        gitlab.add_project(PROJECT, repo_dirs[0])
        yield gitlab


def repo_model(repo_dirs: tuple[Path, Path], path: str = PROJECT) -> Repo:
    return Repo("gitlab", path, f"file://{repo_dirs[0]}", "main")


@pytest.fixture
def client(fake: FakeGitLab, repo_dirs: tuple[Path, Path]) -> Iterator[GitLabClient]:
    gitlab_client = GitLabClient(fake.url or "", fake.token, repo_model(repo_dirs), mergeable_retry_delay=0.01)
    yield gitlab_client
    gitlab_client.close()


def requests_to(fake: FakeGitLab, suffix: str) -> list[int]:
    return [r.status for r in fake.requests if r.path.endswith(suffix)]


# -- authentication and the fake's manners ------------------------------------------------------


def test_bad_token_is_a_401_forge_error(fake: FakeGitLab, repo_dirs: tuple[Path, Path]) -> None:
    fake.open_merge_request(PROJECT, "feature")
    stranger = GitLabClient(fake.url or "", "glpat-forged-token-value", repo_model(repo_dirs))
    with pytest.raises(ForgeError) as caught:
        stranger.get_pull_request(1)
    assert caught.value.status == 401
    assert "401 Unauthorized" in str(caught.value)
    assert "glpat-forged-token-value" not in str(caught.value)
    assert requests_to(fake, f"/projects/{ENCODED}/merge_requests/1") == [401]


def test_fake_answers_like_gitlab(fake: FakeGitLab) -> None:
    fake.open_merge_request(PROJECT, "feature")
    api = f"{fake.url}/api/v4"
    mr_path = f"{api}/projects/{ENCODED}/merge_requests/1"
    assert httpx.get(mr_path).json() == {"message": "401 Unauthorized"}
    assert httpx.get(mr_path, headers={"PRIVATE-TOKEN": "glpat-nope"}).status_code == 401
    assert httpx.get(mr_path, headers={"Authorization": f"Bearer {fake.token}"}).status_code == 200
    auth = {"PRIVATE-TOKEN": fake.token}
    by_path = httpx.get(mr_path, headers=auth).json()
    by_id = httpx.get(f"{api}/projects/{by_path['project_id']}/merge_requests/1", headers=auth).json()
    assert by_path == by_id and by_path["iid"] == 1 and by_path["references"]["full"] == f"{PROJECT}!1"
    # A nested path only works URL-encoded, as in GitLab.
    assert httpx.get(f"{api}/projects/{PROJECT}/merge_requests/1", headers=auth).status_code == 404
    missing = httpx.get(f"{api}/projects/acme%2Fnope/merge_requests/1", headers=auth)
    assert (missing.status_code, missing.json()) == (404, {"message": "404 Project Not Found"})
    assert httpx.get(f"{api}/projects/{ENCODED}/wiki", headers=auth).json() == {"error": "404 Not Found"}
    assert httpx.delete(mr_path, headers=auth).status_code == 405
    assert httpx.get(f"{api}/user", headers=auth).json()["username"] == "deploybot"
    assert fake.token.startswith("glpat-")


def test_secrets_stay_out_of_reprs_logs_and_errors(
    fake: FakeGitLab, client: GitLabClient, repo_dirs: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fake.open_merge_request(PROJECT, "feature")
    client.get_pull_request(1)
    with pytest.raises(ForgeError) as caught:
        client.create_comment(424242, "nope")
    assert caught.value.status == 404
    for text in (repr(client), str(caught.value), caplog.text, repr(fake)):
        assert fake.token not in text
    with pytest.raises(ValueError):
        GitLabClient(fake.url or "", "", repo_model(repo_dirs))
    with pytest.raises(ValueError) as bad_url:
        GitLabClient("gitlab.example.com", fake.token, repo_model(repo_dirs))
    assert fake.token not in str(bad_url.value)


# -- merge requests -------------------------------------------------------------------------------


def test_get_pull_request(fake: FakeGitLab, client: GitLabClient, repo_dirs: tuple[Path, Path]) -> None:
    head = git(repo_dirs[1], "rev-parse", "feature")
    iid = fake.open_merge_request(PROJECT, "feature", author="alice", title="Add prod")
    pull = client.get_pull_request(iid)
    assert (pull.number, pull.head_sha, pull.head_ref, pull.base_ref) == (1, head, "feature", "main")
    assert (pull.author, pull.is_fork, pull.state, pull.merged) == ("alice", False, "open", False)
    assert pull.url == f"{fake.url}/{PROJECT}/-/merge_requests/1"
    assert pull.repo.full_name == PROJECT
    assert git(repo_dirs[0], "rev-parse", "refs/merge-requests/1/head") == head

    fork = fake.open_merge_request(PROJECT, "feature", author="mallory", fork=True)
    assert client.get_pull_request(fork).is_fork is True
    assert fake.mr(PROJECT, fork)["source_project_id"] != fake.mr(PROJECT, fork)["target_project_id"]

    fake.merge(PROJECT, iid)
    merged = client.get_pull_request(iid)
    assert (merged.state, merged.merged) == ("closed", True)
    # The merge button made a real merge commit on main with the MR head as second parent.
    assert git(repo_dirs[0], "rev-parse", "main^2") == head
    assert fake.mr(PROJECT, iid)["merge_commit_sha"] == git(repo_dirs[0], "rev-parse", "main")

    closed = fake.open_merge_request(PROJECT, "feature")
    fake.close(PROJECT, closed)
    assert (client.get_pull_request(closed).state, client.get_pull_request(closed).merged) == ("closed", False)
    fake.reopen(PROJECT, closed)
    assert client.get_pull_request(closed).state == "open"


def test_missing_merge_request_is_a_404_forge_error(fake: FakeGitLab, client: GitLabClient) -> None:
    with pytest.raises(ForgeError) as caught:
        client.get_pull_request(99)
    assert caught.value.status == 404


def test_changed_files_list_both_sides_of_renames(fake: FakeGitLab, client: GitLabClient) -> None:
    iid = fake.open_merge_request(PROJECT, "feature")
    assert sorted(client.changed_files(iid)) == ["env/prod.tf", "main.tf", "new.tf", "old.tf"]
    diffs = {d["new_path"]: d for d in fake_diffs(fake, iid)}
    assert diffs["new.tf"]["renamed_file"] is True and diffs["new.tf"]["old_path"] == "old.tf"
    assert diffs["env/prod.tf"]["new_file"] is True and diffs["env/prod.tf"]["a_mode"] == "0"
    assert diffs["main.tf"]["diff"].startswith("@@ -1 +1 @@\n")
    assert '+resource "null_resource" "b" {}' in diffs["main.tf"]["diff"]


def fake_diffs(fake: FakeGitLab, iid: int) -> list[dict[str, Any]]:
    url = f"{fake.url}/api/v4/projects/{ENCODED}/merge_requests/{iid}/diffs"
    return httpx.get(url, headers={"PRIVATE-TOKEN": fake.token}).json()


def test_changed_files_follow_pagination(fake: FakeGitLab, client: GitLabClient, repo_dirs: tuple[Path, Path]) -> None:
    work = repo_dirs[1]
    git(work, "checkout", "-q", "-b", "many", "main")
    commit(work, {f"stacks/s{i:03}.tf": f"# {i}\n" for i in range(130)}, "many files")
    git(work, "push", "-q", "origin", "many")
    iid = fake.open_merge_request(PROJECT, "many")
    files = client.changed_files(iid)
    assert len(files) == 130 and files[0] == "stacks/s000.tf" and files[-1] == "stacks/s129.tf"
    assert requests_to(fake, f"/merge_requests/{iid}/diffs") == [200, 200]  # 100 per page
    page = httpx.get(
        f"{fake.url}/api/v4/projects/{ENCODED}/merge_requests/{iid}/diffs",
        headers={"PRIVATE-TOKEN": fake.token},
        params={"per_page": 50, "page": 2},
    )
    assert (page.headers["X-Total"], page.headers["X-Total-Pages"], page.headers["X-Next-Page"]) == ("130", "3", "3")
    assert 'rel="next"' in page.headers["Link"] and len(page.json()) == 50


def test_push_picks_up_new_commits(fake: FakeGitLab, client: GitLabClient, repo_dirs: tuple[Path, Path]) -> None:
    iid = fake.open_merge_request(PROJECT, "feature")
    assert fake.push(PROJECT, iid) is None  # nothing new: no event, no version
    new_head = push_to_feature(repo_dirs[1], {"env/stage.tf": "# stage\n"}, "stage")
    fake.push(PROJECT, iid)
    assert client.get_pull_request(iid).head_sha == new_head
    assert "env/stage.tf" in client.changed_files(iid)
    assert git(repo_dirs[0], "rev-parse", f"refs/merge-requests/{iid}/head") == new_head


def test_comments_are_created(fake: FakeGitLab, client: GitLabClient) -> None:
    iid = fake.open_merge_request(PROJECT, "feature")
    human = fake.comment(PROJECT, iid, "alice", "deploybot plan")
    made = client.create_comment(iid, "Plan running…")
    assert fake.comments(PROJECT, iid) == [
        {"id": human, "user": "alice", "body": "deploybot plan"},
        {"id": made.id, "user": "deploybot", "body": "Plan running…"},
    ]
    # The creation time is GitLab's own, exactly as its API writes it.
    newest = fake_notes(fake, iid)[0]
    assert made == ForgeComment(made.id, "deploybot", "Plan running…", newest["created_at"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", made.created_at)
    assert client.comment_limit == NOTE_LIMIT == 1_000_000
    with pytest.raises(ForgeError) as caught:
        client.create_comment(iid, "x" * (NOTE_LIMIT + 1))
    assert caught.value.status == 400 and "too long" in str(caught.value)
    assert len(fake.comments(PROJECT, iid)) == 2


def fake_notes(fake: FakeGitLab, iid: int) -> list[dict[str, Any]]:
    """The merge request's notes as GitLab's API lists them: newest first, system notes too."""
    url = f"{fake.url}/api/v4/projects/{ENCODED}/merge_requests/{iid}/notes"
    return httpx.get(url, headers={"PRIVATE-TOKEN": fake.token}).json()


def test_get_comment_of_this_merge_request_only(fake: FakeGitLab, client: GitLabClient) -> None:
    iid, other = fake.open_merge_request(PROJECT, "feature"), fake.open_merge_request(PROJECT, "feature")
    made = client.create_comment(iid, "Plan running…")
    human = fake.comment(PROJECT, iid, "alice", "deploybot apply")
    elsewhere = fake.comment(PROJECT, other, "alice", "deploybot apply")
    assert client.get_comment(iid, made.id) == made
    found = client.get_comment(iid, human)
    assert found is not None and (found.id, found.author, found.body) == (human, "alice", "deploybot apply")
    assert found.created_at > made.created_at
    assert client.get_comment(iid, elsewhere) is None  # a note of another merge request: GitLab answers 404
    assert client.get_comment(other, elsewhere) is not None
    assert client.get_comment(iid, 987654) is None
    assert client.get_comment(99, human) is None  # no such merge request

    fake.approve(PROJECT, iid, "bob")
    system = fake_notes(fake, iid)[0]
    assert (system["system"], system["body"]) == (True, "approved this merge request")
    assert client.get_comment(iid, system["id"]) is None  # GitLab's record of an event, nobody's comment


def test_get_comment_needs_the_token(fake: FakeGitLab, client: GitLabClient, repo_dirs: tuple[Path, Path]) -> None:
    iid = fake.open_merge_request(PROJECT, "feature")
    made = client.create_comment(iid, "Plan running…")
    url = f"{fake.url}/api/v4/projects/{ENCODED}/merge_requests/{iid}/notes/{made.id}"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"PRIVATE-TOKEN": "glpat-nope"}).status_code == 401
    assert httpx.get(url, headers={"Authorization": f"Bearer {fake.token}"}).json()["id"] == made.id
    stranger = GitLabClient(fake.url or "", "glpat-forged-token-value", repo_model(repo_dirs))
    with pytest.raises(ForgeError) as caught:
        stranger.get_comment(iid, made.id)
    assert caught.value.status == 401  # not taken for "no such note"


def test_commit_people_are_the_users_of_commit_emails(
    fake: FakeGitLab, client: GitLabClient, repo_dirs: tuple[Path, Path]
) -> None:
    work = repo_dirs[1]
    fake.set_user_email("bob", "bob@example.com")
    fake.set_user_email("carol", "carol@example.com")
    git(work, "checkout", "-q", "feature")  # its commit is test@example.com's: an email of no user
    git(work, "-c", "user.name=Carol", "-c", "user.email=carol@example.com", "commit", "-q", "--allow-empty",
        "--author=Bob <Bob@Example.com>", "-m", "written by bob, committed by carol")
    git(work, "push", "-q", "origin", "feature")
    iid = fake.open_merge_request(PROJECT, "feature")
    assert client.commit_people(iid) == {"bob", "carol"}

    query = f"""{{ project(fullPath: "{PROJECT}") {{ mergeRequest(iid: "{iid}") {{
        commits {{ nodes {{ authorEmail author {{ username }} }} }} committers {{ nodes {{ username }} }} }} }} }}"""
    answer = graphql(fake, {"query": query}).json()["data"]["project"]["mergeRequest"]
    assert answer["commits"]["nodes"] == [  # newest first, as GitLab lists them
        {"authorEmail": "Bob@Example.com", "author": {"username": "bob"}},
        {"authorEmail": "test@example.com", "author": None},
    ]
    assert answer["committers"]["nodes"] == [{"username": "carol"}]


def test_commit_people_follow_the_pages_of_commits(
    fake: FakeGitLab, client: GitLabClient, repo_dirs: tuple[Path, Path]
) -> None:
    work = repo_dirs[1]
    fake.set_user_email("bob", "bob@example.com")
    git(work, "checkout", "-q", "-b", "long", "main")
    git(work, "commit", "-q", "--allow-empty", "--author=Bob <bob@example.com>", "-m", "bob's, committed by test")
    for n in range(100):
        git(work, "commit", "-q", "--allow-empty", "-m", f"step {n}")
    git(work, "push", "-q", "origin", "long")
    iid = fake.open_merge_request(PROJECT, "long")
    assert client.commit_people(iid) == {"bob"}  # his commit is the oldest: on the second page of 100
    assert requests_to(fake, "/api/graphql") == [200, 200]


def test_commit_people_refuse_more_committers_than_gitlab_lists_at_once(
    fake: FakeGitLab, client: GitLabClient, repo_dirs: tuple[Path, Path]
) -> None:
    work = repo_dirs[1]
    git(work, "checkout", "-q", "-b", "crowd", "main")
    for n in range(101):
        fake.set_user_email(f"dev{n}", f"dev{n}@example.com")
        git(work, "-c", f"user.email=dev{n}@example.com", "commit", "-q", "--allow-empty", "-m", f"by dev{n}")
    git(work, "push", "-q", "origin", "crowd")
    iid = fake.open_merge_request(PROJECT, "crowd")
    with pytest.raises(ForgeError) as caught:
        client.commit_people(iid)
    assert caught.value.status == 422 and "more committers" in str(caught.value)


def graphql(fake: FakeGitLab, payload: dict[str, Any], headers: dict[str, str] | None = None) -> httpx.Response:
    auth = {"PRIVATE-TOKEN": fake.token} if headers is None else headers
    return httpx.post(f"{fake.url}/api/graphql", json=payload, headers=auth)


def test_graphql_answers_like_gitlab(fake: FakeGitLab, client: GitLabClient, repo_dirs: tuple[Path, Path]) -> None:
    iid = fake.open_merge_request(PROJECT, "feature")
    mine = {"query": "query($path: ID!) { project(fullPath: $path) { fullPath } }", "variables": {"path": PROJECT}}
    assert graphql(fake, mine).json() == {"data": {"project": {"fullPath": PROJECT}}}
    bearer = {"Authorization": f"Bearer {fake.token}"}
    assert graphql(fake, mine, bearer).json() == {"data": {"project": {"fullPath": PROJECT}}}
    assert graphql(fake, mine, {}).json() == {"data": {"project": None}}  # anonymous: a private project is hidden
    refused = graphql(fake, mine, {"PRIVATE-TOKEN": "glpat-nope"})
    assert (refused.status_code, refused.json()) == (401, {"errors": [{"message": "Invalid token"}]})
    unknown = graphql(fake, {"query": f'{{ project(fullPath: "{PROJECT}") {{ nope }} }}'})
    assert unknown.json() == {"errors": [{"message": "Field 'nope' doesn't exist on type 'Project'"}]}

    stranger = GitLabClient(fake.url or "", "glpat-forged-token-value", repo_model(repo_dirs))
    with pytest.raises(ForgeError) as refused_client:
        stranger.commit_people(iid)
    assert refused_client.value.status == 401
    with pytest.raises(ForgeError) as no_merge_request:
        client.commit_people(iid + 1)
    assert no_merge_request.value.status == 404
    elsewhere = GitLabClient(fake.url or "", fake.token, repo_model(repo_dirs, "acme/nope"))
    with pytest.raises(ForgeError) as no_project:
        elsewhere.commit_people(iid)
    assert no_project.value.status == 404


def test_set_status_maps_states_and_treats_a_repeat_as_done(
    fake: FakeGitLab, client: GitLabClient, repo_dirs: tuple[Path, Path]
) -> None:
    sha = git(repo_dirs[1], "rev-parse", "feature")
    client.set_status(sha, "deploybot/plan", "pending", "planning")
    client.set_status(sha, "deploybot/plan", "pending", "still planning")  # GitLab answers 400: same state
    client.set_status(sha, "deploybot/plan", "success", "x" * 300, target_url="https://bot.example/runs/1")
    client.set_status(sha, "deploybot/plan", "success", "planned again")  # a finished status is replaced
    client.set_status(sha, "deploybot/apply", "failure", "apply failed")
    client.set_status(sha, "deploybot/plan: staging", "error", "terraform crashed")
    posts = requests_to(fake, f"/statuses/{sha}")
    assert posts == [201, 400, 201, 201, 201, 201]
    statuses = fake.statuses(PROJECT, sha)
    assert statuses["deploybot/plan"] == ("success", "planned again")
    assert statuses["deploybot/apply"][0] == statuses["deploybot/plan: staging"][0] == "failed"
    history = [s for s in fake.status_history(PROJECT, sha) if s["name"] == "deploybot/plan"]
    assert [s["status"] for s in history] == ["success", "success"]  # the pending one moved on to success
    assert len(history[0]["description"]) == 255 and history[0]["target_url"] == "https://bot.example/runs/1"

    fake.set_commit_status(PROJECT, sha, "deploybot/apply", "running")  # someone else's running status
    with pytest.raises(ForgeError) as caught:
        client.set_status(sha, "deploybot/apply", "pending", "not a repeat: it is running")
    assert caught.value.status == 400 and "Cannot transition status via :enqueue from :running" in str(caught.value)

    with pytest.raises(ForgeError) as missing:
        client.set_status("0" * 40, "deploybot/plan", "success", "no such commit")
    assert missing.value.status == 404


# -- approvals ------------------------------------------------------------------------------------


def approvers_of(head: str, reviews: list) -> set[str]:
    """Who approves a plan of `head` shown long before every review (only the commit decides)."""
    return plan_approvers(PlanFacts(head, "0" * 64, "2000-01-01T00:00:00Z"), reviews, [], set())


@pytest.mark.parametrize("approved_at", [True, False], ids=["approved_at", "system-notes"])
def test_approvals_count_only_for_the_head_pushed_before_them(
    fake: FakeGitLab, client: GitLabClient, repo_dirs: tuple[Path, Path], approved_at: bool
) -> None:
    fake.report_approval_times = approved_at
    iid = fake.open_merge_request(PROJECT, "feature")
    first = client.get_pull_request(iid).head_sha
    fake.approve(PROJECT, iid, "bob")
    assert [(r.user, r.state, r.commit_sha) for r in client.reviews(iid)] == [("bob", "APPROVED", first)]

    # carol approves after the commit reached the branch but before GitLab registered the push.
    second = push_to_feature(repo_dirs[1], {"env/stage.tf": "# stage\n"}, "stage")
    fake.approve(PROJECT, iid, "carol")
    fake.push(PROJECT, iid)
    fake.approve(PROJECT, iid, "dave")
    reviews = client.reviews(iid)
    assert [(r.user, r.commit_sha) for r in reviews] == [("bob", first), ("carol", first), ("dave", second)]
    assert approvers_of(second, reviews) == {"dave"}
    assert all(r.submitted_at.endswith("Z") for r in reviews)
    assert reviews[0].submitted_at < reviews[1].submitted_at < reviews[2].submitted_at

    fake.unapprove(PROJECT, iid, "bob")
    fake.approve(PROJECT, iid, "bob")  # approving again after the push counts
    reviews = client.reviews(iid)
    # The withdrawal is there too, at its time, between bob's two approvals.
    assert [(r.user, r.state, r.commit_sha) for r in reviews] == [
        ("carol", "APPROVED", first), ("dave", "APPROVED", second), ("bob", "DISMISSED", ""),
        ("bob", "APPROVED", second)]
    assert approvers_of(second, reviews) == {"dave", "bob"}


def test_resetting_the_branch_to_an_old_head_does_not_revive_old_approvals(
    fake: FakeGitLab, client: GitLabClient, repo_dirs: tuple[Path, Path]
) -> None:
    iid = fake.open_merge_request(PROJECT, "feature")
    first = client.get_pull_request(iid).head_sha
    fake.approve(PROJECT, iid, "bob")
    push_to_feature(repo_dirs[1], {"env/stage.tf": "# stage\n"}, "stage")
    fake.push(PROJECT, iid)
    subprocess.run(["git", "--git-dir", str(repo_dirs[0]), "update-ref", "refs/heads/feature", first], check=True)
    fake.push(PROJECT, iid)  # the branch is back at the first head: a third version
    assert client.get_pull_request(iid).head_sha == first
    assert [(r.user, r.commit_sha) for r in client.reviews(iid)] == [("bob", "")]


def test_resetting_approvals_on_push_leaves_nobody(
    fake: FakeGitLab, client: GitLabClient, repo_dirs: tuple[Path, Path]
) -> None:
    fake.set_project_settings(PROJECT, reset_approvals_on_push=True)
    iid = fake.open_merge_request(PROJECT, "feature")
    fake.approve(PROJECT, iid, "bob")
    push_to_feature(repo_dirs[1], {"env/stage.tf": "# stage\n"}, "stage")
    fake.push(PROJECT, iid)
    assert client.reviews(iid) == []


def test_approval_sha_rule_without_times_counts_for_nothing() -> None:
    from datetime import UTC, datetime, timedelta

    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    versions = [("b" * 40, t0 + timedelta(seconds=10)), ("a" * 40, t0)]  # newest first, as GitLab lists them
    assert approved_sha(None, "b" * 40, t0 + timedelta(seconds=10), versions) == ""  # approval time unknown
    assert approved_sha(t0 + timedelta(seconds=20), "b" * 40, None, versions) == ""  # push time unknown
    assert approved_sha(t0 + timedelta(seconds=20), "b" * 40, t0 + timedelta(seconds=10), versions) == "b" * 40
    assert approved_sha(t0 + timedelta(seconds=5), "b" * 40, t0 + timedelta(seconds=10), versions) == "a" * 40
    assert approved_sha(t0 + timedelta(seconds=10), "b" * 40, t0 + timedelta(seconds=10), versions) == ""
    assert approved_sha(t0 - timedelta(seconds=1), "b" * 40, t0 + timedelta(seconds=10), versions) == ""


# -- people -----------------------------------------------------------------------------------------


def test_permission_maps_access_levels(fake: FakeGitLab, client: GitLabClient) -> None:
    levels = {"gus": 10, "pia": 15, "rex": 20, "dev": 30, "mia": 40, "ola": 50}
    for user, level in levels.items():
        fake.set_access_level(PROJECT, user, level)
    assert [client.permission(u) for u in levels] == ["read", "read", "triage", "write", "maintain", "admin"]
    fake.add_user("stranger")
    assert client.permission("stranger") == "none"  # a user, but no member: GitLab answers 404
    assert client.permission("nobody-at-all") == "none"  # no such user
    # Inherited: an Owner of the top group is an Owner of every project below it.
    fake.add_group_member("acme", "boss", 50)
    fake.set_access_level(PROJECT, "dev", 30)
    fake.add_group_member("acme/platform", "dev", 40)
    assert (client.permission("boss"), client.permission("dev")) == ("admin", "maintain")  # the higher wins


def test_group_membership(fake: FakeGitLab, client: GitLabClient) -> None:
    fake.add_group_member("acme/platform", "bob")
    fake.add_group_member("acme", "ann", level=10)
    fake.add_group_member("acme/platform", "ivy", state="awaiting")
    fake.add_group_member("other", "eve")
    assert client.is_team_member("bob", "acme/platform") is True
    assert client.is_team_member("bob", "acme") is False  # a subgroup's member is not the parent's
    assert client.is_team_member("ann", "acme/platform") is True  # inherited from the parent group
    assert client.is_team_member("ivy", "acme/platform") is False  # membership awaiting approval
    assert client.is_team_member("eve", "acme/platform") is False
    assert client.is_team_member("bob", "acme/nope") is False  # no such group: 404
    assert client.is_team_member("ghost", "acme/platform") is False  # no such user
    assert requests_to(fake, "/groups/acme%2Fplatform/members/all/" + str(fake.add_user("bob")))[-1] == 200
    for bad in ("", "/acme", "acme/", "acme//platform"):
        with pytest.raises(ValueError):
            client.is_team_member("bob", bad)


# -- merging ----------------------------------------------------------------------------------------


def test_mergeability_ignores_the_bots_own_status(
    fake: FakeGitLab, client: GitLabClient, repo_dirs: tuple[Path, Path]
) -> None:
    fake.set_project_settings(PROJECT, pipeline_must_succeed=True)
    iid = fake.open_merge_request(PROJECT, "feature")
    pull = client.get_pull_request(iid)
    assert fake.mr(PROJECT, iid)["detailed_merge_status"] == "ci_must_pass"  # no pipeline yet
    fake.set_commit_status(PROJECT, pull.head_sha, "test", "success")
    client.set_status(pull.head_sha, "deploybot/apply", "pending", "waiting for apply")
    assert fake.mr(PROJECT, iid)["detailed_merge_status"] == "ci_still_running"

    ignore = frozenset({"deploybot/apply"})
    assert client.mergeability(pull, ignore).mergeable is True
    strict = client.mergeability(pull, frozenset())
    assert strict.mergeable is False and "deploybot/apply" in strict.reason and "pending" in strict.reason

    fake.set_commit_status(PROJECT, pull.head_sha, "test", "failed")
    failing = client.mergeability(pull, ignore)
    assert failing.mergeable is False and "'test'" in failing.reason and "failed" in failing.reason


@pytest.mark.parametrize(
    "status, words",
    [
        ("conflict", "conflicts"),
        ("draft_status", "draft"),
        ("not_approved", "approvals"),
        ("discussions_not_resolved", "threads"),
        ("need_rebase", "rebase"),
        ("not_open", "not open"),
        ("security_policy_violations", "security_policy_violations"),
    ],
)
def test_mergeability_names_what_blocks(fake: FakeGitLab, client: GitLabClient, status: str, words: str) -> None:
    iid = fake.open_merge_request(PROJECT, "feature")
    pull = client.get_pull_request(iid)
    assert client.mergeability(pull, frozenset()).mergeable is True  # computed: mergeable
    fake.set_detailed_merge_status(PROJECT, iid, status)
    result = client.mergeability(pull, frozenset())
    assert result.mergeable is False and words in result.reason


def test_mergeability_waits_for_gitlab_to_check(fake: FakeGitLab, client: GitLabClient) -> None:
    iid = fake.open_merge_request(PROJECT, "feature")
    fake.set_detailed_merge_status(PROJECT, iid, "checking")
    before = len(requests_to(fake, f"/projects/{ENCODED}/merge_requests/{iid}"))
    pending = client.mergeability(client.get_pull_request(iid), frozenset())
    after = len(requests_to(fake, f"/projects/{ENCODED}/merge_requests/{iid}"))
    assert pending.mergeable is False and "not checked" in pending.reason
    assert after - before == 1 + 4  # the get_pull_request, then asked four times before giving up


def test_real_drafts_conflicts_and_required_approvals(
    fake: FakeGitLab, client: GitLabClient, repo_dirs: tuple[Path, Path]
) -> None:
    draft = fake.open_merge_request(PROJECT, "feature", draft=True)
    assert "draft" in client.mergeability(client.get_pull_request(draft), frozenset()).reason

    fake.set_project_settings(PROJECT, approvals_required=1)
    needs = fake.open_merge_request(PROJECT, "feature", author="alice")
    assert "approvals" in client.mergeability(client.get_pull_request(needs), frozenset()).reason
    fake.approve(PROJECT, needs, "bob")
    assert client.mergeability(client.get_pull_request(needs), frozenset()).mergeable is True

    commit(repo_dirs[1], {"main.tf": 'resource "null_resource" "c" {}\n'}, "conflicting change on main")
    git(repo_dirs[1], "push", "-q", "origin", "main")
    result = client.mergeability(client.get_pull_request(needs), frozenset())
    assert result.mergeable is False and "conflict" in result.reason
    assert fake.mr(PROJECT, needs)["has_conflicts"] is True


def test_is_behind_base(fake: FakeGitLab, client: GitLabClient, repo_dirs: tuple[Path, Path]) -> None:
    iid = fake.open_merge_request(PROJECT, "feature")
    pull = client.get_pull_request(iid)
    assert client.is_behind_base(pull) is False
    commit(repo_dirs[1], {"README.md": "hello\n"}, "docs on main")
    git(repo_dirs[1], "push", "-q", "origin", "main")
    assert client.is_behind_base(pull) is True
    detail = httpx.get(
        f"{fake.url}/api/v4/projects/{ENCODED}/merge_requests/{iid}",
        headers={"PRIVATE-TOKEN": fake.token},
        params={"include_diverged_commits_count": "true"},
    ).json()
    assert detail["diverged_commits_count"] == 1


# -- mergeability: only "mergeable" merges ----------------------------------------------------------

UNSETTLED = ("unchecked", "checking", "preparing", "approvals_syncing")  # GitLab is still checking
OWN = frozenset({"deploybot/apply"})  # the bot's own apply status, which mergeability may ignore


@pytest.mark.parametrize("status", sorted(DETAILED_MERGE_STATUSES - {"mergeable", "ci_must_pass", "ci_still_running"}))
def test_every_other_merge_status_blocks_with_its_name(fake: FakeGitLab, client: GitLabClient, status: str) -> None:
    iid = fake.open_merge_request(PROJECT, "feature")
    pull = client.get_pull_request(iid)
    client.set_status(pull.head_sha, "deploybot/apply", "pending", "waiting for apply")
    fake.set_detailed_merge_status(PROJECT, iid, status)
    result = client.mergeability(pull, OWN)
    assert result.mergeable is False
    if status in UNSETTLED:  # asked again, then given up on
        assert result.reason == f"GitLab has not checked mergeability yet ({status})"
    elif status == "conflict":
        assert result.reason == "it has conflicts with main (GitLab: conflict)"
    else:
        assert result.reason.endswith(f"(GitLab: {status})") and "GitLab would not merge it" not in result.reason


def test_an_unknown_merge_status_blocks(fake: FakeGitLab, client: GitLabClient) -> None:
    """A status GitLab adds later is not "mergeable": it blocks, naming it."""
    iid = fake.open_merge_request(PROJECT, "feature")
    fake.set_detailed_merge_status(PROJECT, iid, "mergeable")
    pull = client.get_pull_request(iid)
    fake.inject_faults("GET", rf"/merge_requests/{iid}$", [Fault(200, body={
        **fake.mr(PROJECT, iid), "detailed_merge_status": "some_new_check"})])
    result = client.mergeability(pull, OWN)
    assert result.mergeable is False and result.reason == "GitLab would not merge it (GitLab: some_new_check)"


def test_pipeline_blocks_unless_only_our_status_is_missing(fake: FakeGitLab, client: GitLabClient) -> None:
    fake.set_project_settings(PROJECT, pipeline_must_succeed=True, approvals_required=1)
    iid = fake.open_merge_request(PROJECT, "feature", author="alice")
    pull = client.get_pull_request(iid)
    fake.set_commit_status(PROJECT, pull.head_sha, "test", "success")
    client.set_status(pull.head_sha, "deploybot/apply", "pending", "waiting for apply")
    # GitLab names the pipeline only once every other check passed: approvals come first.
    assert fake.mr(PROJECT, iid)["detailed_merge_status"] == "not_approved"
    blocked = client.mergeability(pull, OWN)
    assert blocked.mergeable is False and "approvals" in blocked.reason
    fake.approve(PROJECT, iid, "bob")
    assert fake.mr(PROJECT, iid)["detailed_merge_status"] == "ci_still_running"
    assert client.mergeability(pull, OWN).mergeable is True


def test_merge_status_alone_is_not_enough(fake: FakeGitLab, client: GitLabClient) -> None:
    """GitLab before 15.6 sends only `merge_status`, which says nothing of approvals, threads or pipelines."""
    fake.report_detailed_merge_status = False
    fake.set_project_settings(PROJECT, approvals_required=1)
    iid = fake.open_merge_request(PROJECT, "feature", author="alice")
    pull = client.get_pull_request(iid)
    assert "detailed_merge_status" not in fake.mr(PROJECT, iid)
    assert fake.mr(PROJECT, iid)["merge_status"] == "can_be_merged"  # although an approval is missing
    result = client.mergeability(pull, OWN)
    assert result.mergeable is False and "before 15.6" in result.reason and "(GitLab: can_be_merged)" in result.reason

    fake.set_detailed_merge_status(PROJECT, iid, "conflict")
    assert fake.mr(PROJECT, iid)["merge_status"] == "cannot_be_merged"
    assert "conflicts with main" in client.mergeability(pull, OWN).reason
    fake.set_detailed_merge_status(PROJECT, iid, "checking")
    assert fake.mr(PROJECT, iid)["merge_status"] == "checking"
    assert "not checked" in client.mergeability(pull, OWN).reason


# -- repository -------------------------------------------------------------------------------------


def test_read_file_at_a_ref(client: GitLabClient, repo_dirs: tuple[Path, Path]) -> None:
    assert client.read_file("feature", "main.tf") == 'resource "null_resource" "b" {}\n'
    assert client.read_file("main", "main.tf") == 'resource "null_resource" "a" {}\n'
    assert client.read_file(git(repo_dirs[1], "rev-parse", "main"), "old.tf") == "# old\n" * 20
    assert client.read_file("feature", "old.tf") is None  # renamed away on the branch
    assert client.read_file("main", "modules/net") is None  # a directory, not a file
    assert client.read_file("main", "modules/net/main.tf") == "# net\n"  # path sent as modules%2Fnet%2Fmain.tf
    assert client.read_file("no-such-branch", "main.tf") is None


def test_git_auth_header_carries_a_working_token(fake: FakeGitLab, client: GitLabClient) -> None:
    scheme, _, encoded = client.git_auth_header().partition(" ")
    user, _, token = base64.b64decode(encoded).decode().partition(":")
    assert (scheme, user, token) == ("Basic", "oauth2", fake.token)
    assert httpx.get(f"{fake.url}/api/v4/user", headers={"PRIVATE-TOKEN": token}).status_code == 200


def test_nested_project_addressed_by_numeric_id(fake: FakeGitLab, repo_dirs: tuple[Path, Path]) -> None:
    project_id = fake.add_project("solo", repo_dirs[0])  # a project right under a user namespace
    iid = fake.open_merge_request("solo", "feature")
    by_id = GitLabClient(fake.url or "", fake.token, repo_model(repo_dirs, str(project_id)))
    assert by_id.get_pull_request(iid).head_ref == "feature"
    assert requests_to(fake, f"/projects/{project_id}/merge_requests/{iid}") == [200]


# -- webhooks -------------------------------------------------------------------------------------


@pytest.fixture
def receiver() -> Iterator[tuple[str, Received]]:
    with webhook_receiver("/webhooks/gitlab") as served:
        yield served


def keys(name: str, *path: str) -> set[str]:
    data = json.loads((FIXTURES / name).read_text())
    for key in path:
        data = data[key]
    return set(data)


SIGNING = "whsec_" + base64.b64encode(b"k" * 32).decode()


def test_webhooks_are_authenticated_and_shaped_like_gitlabs(
    fake: FakeGitLab, receiver: tuple[str, list[tuple[dict[str, str], bytes]]], repo_dirs: tuple[Path, Path]
) -> None:
    url, received = receiver
    fake.set_webhook(url, "s3cret", signing_token=SIGNING)
    iid = fake.open_merge_request(PROJECT, "feature", author="alice")
    headers, body = received[-1]
    verify_token(headers["x-gitlab-token"], b"s3cret")
    verify_signing_token(headers, body, SIGNING, now=time.time())
    assert headers["x-gitlab-event"] == "Merge Request Hook" and headers["user-agent"].startswith("GitLab/")
    assert headers["idempotency-key"] == headers["webhook-id"] == delivery_id(headers)
    assert headers["x-gitlab-event-uuid"] and headers["x-gitlab-webhook-uuid"]
    opened = json.loads(body)
    # GitLab adds `assignees` and `reviewers` only when there are some.
    assert set(opened) == keys("merge_request.open.json") - {"assignees", "reviewers"}
    assert set(opened["object_attributes"]) == keys("merge_request.open.json", "object_attributes")
    assert set(opened["project"]) == keys("merge_request.open.json", "project")
    event = parse_event(headers["x-gitlab-event"], opened)
    assert isinstance(event, PullRequestEvent) and event.action == "opened"
    assert event.pull.repo.full_name == PROJECT and event.pull.repo.clone_url == f"file://{repo_dirs[0].resolve()}"
    assert event.pull.head_sha == git(repo_dirs[1], "rev-parse", "feature")
    assert (event.pull.author, event.sender, event.pull.is_fork) == ("alice", "alice", False)

    note_id = fake.comment(PROJECT, iid, "bob", "deploybot plan")
    headers, body = received[-1]
    comment = json.loads(body)
    assert headers["x-gitlab-event"] == "Note Hook"
    assert set(comment) == keys("note.merge_request.json")
    assert set(comment["merge_request"]) == keys("note.merge_request.json", "merge_request")
    assert parse_event("Note Hook", comment) == CommentEvent(event.pull.repo, iid, note_id, "bob", "deploybot plan")
    fake.edit_comment(PROJECT, note_id, "deploybot apply")
    assert json.loads(received[-1][1])["object_attributes"]["action"] == "update"
    assert parse_event("Note Hook", json.loads(received[-1][1])) is None

    new_head = push_to_feature(repo_dirs[1], {"env/stage.tf": "# stage\n"}, "stage")
    fake.push(PROJECT, iid)
    updated = parse_event("Merge Request Hook", json.loads(received[-1][1]))
    assert isinstance(updated, PullRequestEvent) and updated.action == "updated"
    assert updated.pull.head_sha == new_head
    assert json.loads(received[-1][1])["object_attributes"]["oldrev"] == event.pull.head_sha

    fake.set_project_settings(PROJECT, approvals_required=2)
    fake.approve(PROJECT, iid, "bob")
    fake.approve(PROJECT, iid, "carol")
    fake.unapprove(PROJECT, iid, "carol")
    fake.unapprove(PROJECT, iid, "bob")
    actions = [json.loads(b)["object_attributes"]["action"] for _, b in received[-4:]]
    assert actions == ["approval", "approved", "unapproved", "unapproval"]
    review = parse_event("Merge Request Hook", json.loads(received[-4][1]))
    assert isinstance(review, ReviewEvent) and (review.action, review.reviewer) == ("submitted", "bob")

    fake.close(PROJECT, iid)
    fake.reopen(PROJECT, iid)
    fake.merge(PROJECT, iid)
    merged = parse_event("Merge Request Hook", json.loads(received[-1][1]))
    assert [json.loads(b)["object_attributes"]["action"] for _, b in received[-3:]] == ["close", "reopen", "merge"]
    assert isinstance(merged, PullRequestEvent) and merged.pull.merged and merged.pull.state == "closed"

    fake.open_merge_request(PROJECT, "feature", author="mallory", fork=True)
    fork = parse_event("Merge Request Hook", json.loads(received[-1][1]))
    assert fork.pull.is_fork is True
    assert json.loads(received[-1][1])["object_attributes"]["source"]["path_with_namespace"] == "mallory/infra"

    assert [d.status for d in fake.deliveries] == [202] * len(received)
    first = fake.deliveries[0]
    assert fake.redeliver(first.delivery_id) == 202
    again, body = received[-1]
    assert body == first.body and again["idempotency-key"] == first.delivery_id == delivery_id(again)
    assert again["x-gitlab-event-uuid"] != received[0][0]["x-gitlab-event-uuid"]  # new per execution
    verify_signing_token(again, body, SIGNING, now=time.time())
    assert fake.deliveries[-1].redelivery is True


def test_webhooks_without_a_secret_carry_no_token(
    fake: FakeGitLab, receiver: tuple[str, list[tuple[dict[str, str], bytes]]]
) -> None:
    url, received = receiver
    fake.set_webhook(url, "")
    fake.open_merge_request(PROJECT, "feature")
    headers, _ = received[-1]
    assert "x-gitlab-token" not in headers and "webhook-signature" not in headers
    with pytest.raises(InvalidSignature):
        verify_token(headers.get("x-gitlab-token"), b"s3cret")
