"""`deploybot github-app create` and app-manifest.yml: GitHub's manifest flow over real HTTP.

The setup server runs on loopback; GitHub's half is played by hand (the form's target is
only inspected: no browser posts it) and by the local FakeGitHub, which converts codes
at `POST /app-manifests/{code}/conversions` the way GitHub does.
"""

from __future__ import annotations

import json
import socket
import stat
import threading
import time
import urllib.parse
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
import yaml

from bot.cli import main
from bot.config import load_config
from bot.forges.github.app_setup import (
    CONFIG_FILE,
    PRIVATE_KEY_FILE,
    WEBHOOK_SECRET_FILE,
    GitHubAppSetup,
    SetupError,
    load_manifest,
)
from bot.forges.github.client import GitHubApp
from bot.sandbox.github_fake import FakeGitHub

MANIFEST = Path(__file__).resolve().parent.parent / "app-manifest.yml"
GITHUB_WEB = "https://github.example.test"
WEBHOOK_URL = "https://deploybot.acme.test/webhooks/github"

# What the App may do. A change here is a change of what a stolen installation token can do:
# make it on purpose, with the reason in app-manifest.yml's comment for that permission.
EXPECTED_EVENTS = ["pull_request", "issue_comment", "pull_request_review", "push"]
EXPECTED_PERMISSIONS = {
    "metadata": "read",
    "pull_requests": "read",
    "issues": "write",
    "statuses": "write",
    "contents": "read",
    "checks": "read",
    "administration": "read",
    "members": "read",
}


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeGitHub]:
    with FakeGitHub() as github:
        yield github


@pytest.fixture
def setup(fake: FakeGitHub, tmp_path: Path) -> Iterator[GitHubAppSetup]:
    app_setup = GitHubAppSetup(load_manifest(MANIFEST), tmp_path / "out", github_url=GITHUB_WEB,
                               api_url=fake.url, webhook_url=WEBHOOK_URL)
    app_setup.start()
    yield app_setup
    app_setup.stop()


class _Forms(HTMLParser):
    """The forms of a page: action, method and their inputs' name -> value."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[dict] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "form":
            self.forms.append({"action": values.get("action"), "method": values.get("method"), "inputs": {}})
        elif tag == "input" and self.forms:
            self.forms[-1]["inputs"][values.get("name")] = values.get("value")


def _form(page: str) -> dict:
    parser = _Forms()
    parser.feed(page)
    assert len(parser.forms) == 1
    return parser.forms[0]


def _conversions(fake: FakeGitHub) -> list:
    return [r for r in fake.requests if r.path.startswith("/app-manifests/")]


# -- the manifest ----------------------------------------------------------------------------


def test_manifest_asks_for_exactly_the_expected_events_and_permissions() -> None:
    manifest = load_manifest(MANIFEST)
    assert manifest["default_events"] == EXPECTED_EVENTS
    assert manifest["default_permissions"] == EXPECTED_PERMISSIONS
    assert manifest["public"] is False
    assert manifest["hook_attributes"] == {"url": "https://deploybot.example.com/webhooks/github", "active": True}


def test_every_permission_says_why_in_a_comment() -> None:
    lines = MANIFEST.read_text().splitlines()
    start = lines.index("default_permissions:")
    for i, line in enumerate(lines[start + 1 :], start + 1):
        if line.strip() and not line.lstrip().startswith("#"):
            assert lines[i - 1].lstrip().startswith("#"), f"no comment above {line.strip()!r}"


def test_manifest_with_an_unknown_field_is_refused(tmp_path: Path) -> None:
    data = yaml.safe_load(MANIFEST.read_text()) | {"default_permission": {"contents": "write"}}
    path = tmp_path / "manifest.yml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SetupError, match="unknown manifest field.*default_permission"):
        load_manifest(path)


# -- the flow --------------------------------------------------------------------------------


def test_page_posts_the_manifest_to_github_with_the_state(setup: GitHubAppSetup) -> None:
    response = httpx.get(f"{setup.url}/")
    assert response.status_code == 200
    assert "form-action https://github.example.test" in response.headers["content-security-policy"]
    form = _form(response.text)
    assert form["method"] == "post"
    action = urllib.parse.urlsplit(form["action"])
    assert f"{action.scheme}://{action.netloc}{action.path}" == f"{GITHUB_WEB}/settings/apps/new"
    assert urllib.parse.parse_qs(action.query) == {"state": [setup.state]}
    assert len(setup.state) >= 40
    posted = json.loads(form["inputs"]["manifest"])
    assert posted["redirect_url"] == f"{setup.url}/callback"
    assert posted["hook_attributes"]["url"] == WEBHOOK_URL
    assert posted["default_events"] == EXPECTED_EVENTS
    assert posted["default_permissions"] == EXPECTED_PERMISSIONS
    assert posted["public"] is False


def test_org_app_is_created_on_the_organization(fake: FakeGitHub, tmp_path: Path) -> None:
    with GitHubAppSetup(load_manifest(MANIFEST), tmp_path, github_url=GITHUB_WEB + "/", api_url=fake.url,
                        org="acme") as app_setup:
        form = _form(httpx.get(f"{app_setup.start()}/").text)
    assert form["action"] == f"{GITHUB_WEB}/organizations/acme/settings/apps/new?state={app_setup.state}"


def test_callback_exchanges_the_code_and_writes_the_credentials(setup: GitHubAppSetup, fake: FakeGitHub) -> None:
    manifest = json.loads(_form(httpx.get(f"{setup.url}/").text)["inputs"]["manifest"])
    conversion = fake.add_manifest_code("c0de-1", manifest)
    before = len(_conversions(fake))

    response = httpx.get(f"{setup.url}/callback", params={"code": "c0de-1", "state": setup.state})

    assert response.status_code == 200, response.text
    assert f"{conversion['html_url']}/installations/new" in response.text
    created = setup.wait(timeout=5)
    assert created is not None and created.app_id == conversion["id"]
    assert _conversions(fake)[before:] == [("POST", "/app-manifests/c0de-1/conversions", 201)]
    out = setup.out_dir
    key, secret, snippet = out / PRIVATE_KEY_FILE, out / WEBHOOK_SECRET_FILE, out / CONFIG_FILE
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert key.read_text().strip() == conversion["pem"].strip()
    assert secret.read_text().strip() == conversion["webhook_secret"]
    # Neither secret is in the snippet or on the page.
    for text in (snippet.read_text(), response.text):
        assert conversion["webhook_secret"] not in text
        assert "PRIVATE KEY" not in text
        assert conversion["client_secret"] not in text

    config = load_config(snippet, environ={})
    assert config.github.api_url == fake.url
    assert config.github.app_id == conversion["id"]
    assert config.github.private_key.reveal() == conversion["pem"].strip()
    assert config.github.webhook_secret.reveal() == conversion["webhook_secret"]
    assert config.github.bot_login == f"{conversion['slug']}[bot]"
    assert config.github.enabled
    GitHubApp(config.github.api_url, config.github.app_id, config.github.private_key.reveal()).jwt()

    # Done: a second callback exchanges nothing more.
    again = httpx.get(f"{setup.url}/callback", params={"code": "c0de-2", "state": setup.state})
    assert again.status_code == 409
    assert _conversions(fake)[before:] == [("POST", "/app-manifests/c0de-1/conversions", 201)]


@pytest.mark.parametrize("state", ["", "not-the-state", "x" * 43])
def test_callback_with_a_wrong_state_is_refused_and_exchanges_nothing(
    setup: GitHubAppSetup, fake: FakeGitHub, state: str
) -> None:
    fake.add_manifest_code("code-csrf")
    before = len(_conversions(fake))

    response = httpx.get(f"{setup.url}/callback", params={"code": "code-csrf", "state": state})

    assert response.status_code == 400
    assert "Nothing was exchanged" in response.text
    assert len(_conversions(fake)) == before
    assert setup.wait(timeout=0) is None
    assert not any(setup.out_dir.iterdir())
    # The code is still unused: the real redirect goes through.
    ok = httpx.get(f"{setup.url}/callback", params={"code": "code-csrf", "state": setup.state})
    assert ok.status_code == 200


def test_a_used_code_fails_cleanly(setup: GitHubAppSetup, fake: FakeGitHub) -> None:
    fake.add_manifest_code("used-once")
    first = httpx.post(f"{fake.url}/app-manifests/used-once/conversions")
    assert first.status_code == 201
    second = httpx.post(f"{fake.url}/app-manifests/used-once/conversions")
    assert (second.status_code, second.json()["message"]) == (404, "Not Found")

    response = httpx.get(f"{setup.url}/callback", params={"code": "used-once", "state": setup.state})

    assert response.status_code == 502
    assert "404 Not Found" in response.text and "used already" in response.text
    assert setup.wait(timeout=0) is None
    assert not any(setup.out_dir.iterdir())
    # The server is still there for a fresh code.
    fake.add_manifest_code("fresh")
    assert httpx.get(f"{setup.url}/callback", params={"code": "fresh", "state": setup.state}).status_code == 200


def test_unknown_code_is_not_found_on_the_fake(fake: FakeGitHub) -> None:
    response = httpx.post(f"{fake.url}/app-manifests/never-issued/conversions")
    assert response.status_code == 404
    assert response.json()["message"] == "Not Found"


def test_requests_for_another_host_are_refused(setup: GitHubAppSetup, fake: FakeGitHub) -> None:
    fake.add_manifest_code("rebound")
    # A page of another site that rebinds its name to 127.0.0.1 still sends its own Host.
    page = httpx.get(f"{setup.url}/", headers={"Host": "attacker.example"})
    assert page.status_code == 400 and setup.state not in page.text
    callback = httpx.get(f"{setup.url}/callback", params={"code": "rebound", "state": setup.state},
                         headers={"Host": "attacker.example"})
    assert callback.status_code == 400
    assert setup.wait(timeout=0) is None


def test_existing_credentials_are_never_overwritten(fake: FakeGitHub, tmp_path: Path) -> None:
    (tmp_path / PRIVATE_KEY_FILE).write_text("an older key\n")
    app_setup = GitHubAppSetup(load_manifest(MANIFEST), tmp_path, api_url=fake.url)
    with pytest.raises(SetupError, match="exists already"):
        app_setup.start()
    assert (tmp_path / PRIVATE_KEY_FILE).read_text() == "an older key\n"


# -- the command -----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_command_runs_the_flow_and_never_prints_a_secret(
    fake: FakeGitHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = _free_port()
    out_dir = tmp_path / "creds"
    argv = ["github-app", "create", "--manifest", str(MANIFEST), "--out-dir", str(out_dir),
            "--github-url", GITHUB_WEB, "--api-url", fake.url, "--port", str(port), "--timeout", "30",
            "--name", "deploybot-acme", "--webhook-url", WEBHOOK_URL]
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(main(argv)))
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while True:
        try:
            page = httpx.get(f"{url}/")
            break
        except httpx.TransportError:
            assert time.monotonic() < deadline and thread.is_alive(), "the setup server did not start"
            time.sleep(0.05)
    form = _form(page.text)
    state = urllib.parse.parse_qs(urllib.parse.urlsplit(form["action"]).query)["state"][0]
    manifest = json.loads(form["inputs"]["manifest"])
    assert manifest["name"] == "deploybot-acme"
    conversion = fake.add_manifest_code("cli-code", manifest)

    assert httpx.get(f"{url}/callback", params={"code": "cli-code", "state": state}).status_code == 200
    thread.join(timeout=15)

    assert result == [0]
    out, err = capsys.readouterr()
    assert f"Open {url}/" in out
    assert f"(id {conversion['id']})" in out and str(out_dir / CONFIG_FILE) in out
    for secret in (conversion["webhook_secret"], conversion["client_secret"], *conversion["pem"].splitlines()[1:-1]):
        assert secret not in out + err
    assert load_config(out_dir / CONFIG_FILE, environ={}).github.bot_login == "deploybot-acme[bot]"
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/", timeout=2)  # the server stopped after the one exchange


def test_command_gives_up_after_the_timeout(fake: FakeGitHub, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["github-app", "create", "--manifest", str(MANIFEST), "--out-dir", str(tmp_path),
                 "--api-url", fake.url, "--timeout", "0.2"])
    assert code == 1
    assert "no App was created" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
