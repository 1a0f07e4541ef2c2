"""Trigger API caller authentication: OIDC tokens against a local issuer, HMAC-signed requests.

The OIDC issuer is a real HTTP server on 127.0.0.1 serving a discovery document and
a JWKS (counting requests), tokens are minted here with test RSA/EC keys, and the
replay store is a real `Store`.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import logging
import secrets
import textwrap
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from bot.ci.auth import (
    CallerAuthError,
    HmacVerifier,
    OidcVerifier,
    authenticate,
    hmac_signature,
    load_hmac_key,
    sha_claim_matches,
)
from bot.store import Store
from policies.callers import Caller
from policies.policy import load_policy

SHA = "9f3c2ab4d1e07c5f8a6b3e2d1c0f9e8d7c6b5a49"
AUDIENCE = "deploybot"


# --- a local OIDC issuer -------------------------------------------------------------


class FakeIssuer:
    """An OIDC issuer on 127.0.0.1: discovery document and JWKS, with request counts."""

    def __init__(self) -> None:
        self.jwks: list[dict[str, Any]] = []
        self.private: dict[str, Any] = {}  # kid -> private key
        self.requests: Counter[str] = Counter()
        self.fail = False
        self.advertised_issuer: str | None = None  # what the discovery document says; None: the URL
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                issuer.requests[self.path] += 1
                if issuer.fail:
                    self._send(500, {"error": "down"})
                elif self.path == "/.well-known/openid-configuration":
                    self._send(200, {"issuer": issuer.advertised_issuer or issuer.url, "jwks_uri": issuer.url + "/.well-known/jwks"})
                elif self.path == "/.well-known/jwks":
                    self._send(200, {"keys": issuer.jwks})
                else:
                    self._send(404, {"message": "Not Found"})

            def _send(self, status: int, data: Any) -> None:
                body = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def jwks_fetches(self) -> int:
        return self.requests["/.well-known/jwks"]

    def add_rsa_key(self, kid: str) -> Any:
        key = rsa_key(kid)
        self.private[kid] = key
        self.publish(kid, "RS256")
        return key

    def add_ec_key(self, kid: str) -> Any:
        key = ec.generate_private_key(ec.SECP256R1())
        self.private[kid] = key
        self.publish(kid, "ES256")
        return key

    def publish(self, kid: str, alg: str) -> None:
        public = self.private[kid].public_key()
        algo = jwt.algorithms.RSAAlgorithm if alg == "RS256" else jwt.algorithms.ECAlgorithm
        jwk = algo.to_jwk(public, as_dict=True)
        jwk.update(kid=kid, alg=alg, use="sig")
        self.jwks.append(jwk)

    def mint(self, claims: dict[str, Any], kid: str = "k1", alg: str = "RS256", key: Any = None) -> str:
        return jwt.encode(claims, key or self.private[kid], algorithm=alg, headers={"kid": kid})


@functools.cache
def rsa_key(name: str) -> rsa.RSAPrivateKey:
    """A test RSA key per name, made once per session (key generation is slow)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def github_claims(issuer: str, **overrides: Any) -> dict[str, Any]:
    """Claims shaped like a GitHub Actions OIDC token for a push to main."""
    now = int(time.time())
    claims = {
        "jti": str(uuid.uuid4()),
        "sub": "repo:acme/infrastructure-live:ref:refs/heads/main",
        "aud": AUDIENCE,
        "ref": "refs/heads/main",
        "sha": SHA,
        "repository": "acme/infrastructure-live",
        "repository_owner": "acme",
        "repository_owner_id": "1001",
        "run_id": "6527",
        "run_number": "12",
        "run_attempt": "1",
        "repository_visibility": "private",
        "repository_id": "123456",
        "actor_id": "2002",
        "actor": "alice",
        "workflow": "deploy",
        "head_ref": "",
        "base_ref": "",
        "event_name": "push",
        "ref_protected": "true",
        "ref_type": "branch",
        "workflow_ref": "acme/infrastructure-live/.github/workflows/deploy.yml@refs/heads/main",
        "workflow_sha": SHA,
        "job_workflow_ref": "acme/infrastructure-live/.github/workflows/deploy.yml@refs/heads/main",
        "job_workflow_sha": SHA,
        "runner_environment": "github-hosted",
        "iss": issuer,
        "nbf": now - 5,
        "exp": now + 300,
        "iat": now - 5,
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def gitlab_claims(issuer: str, **overrides: Any) -> dict[str, Any]:
    """Claims shaped like a GitLab CI `id_tokens` token on a protected branch."""
    now = int(time.time())
    claims = {
        "namespace_id": "72",
        "namespace_path": "acme",
        "project_id": "42",
        "project_path": "acme/infrastructure-live",
        "user_id": "17",
        "user_login": "bob",
        "user_email": "bob@example.com",
        "pipeline_id": "574",
        "pipeline_source": "push",
        "job_id": "302",
        "ref": "main",
        "ref_type": "branch",
        "ref_path": "refs/heads/main",
        "ref_protected": "true",
        "runner_id": "1",
        "runner_environment": "self-hosted",
        "sha": SHA,
        "project_visibility": "private",
        "ci_config_ref_uri": "gitlab.example.com/acme/infrastructure-live//.gitlab-ci.yml@refs/heads/main",
        "jti": str(uuid.uuid4()),
        "iss": issuer,
        "iat": now,
        "nbf": now - 5,
        "exp": now + 300,
        "sub": "project_path:acme/infrastructure-live:ref_type:branch:ref:main",
        "aud": AUDIENCE,
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def policy_callers(issuer_url: str) -> tuple[Caller, ...]:
    text = textwrap.dedent(
        f"""
        repos:
          acme/infrastructure-live:
            projects: [{{name: staging, dir: staging}}]
        callers:
          - name: github-actions-infra
            oidc:
              issuer: {issuer_url}
              audience: {AUDIENCE}
              claims:
                repository: acme/infrastructure-live
                repository_id: "123456"
                job_workflow_ref: acme/infrastructure-live/.github/workflows/deploy.yml@refs/heads/main
            repos:
              acme/infrastructure-live: {{projects: [staging], commands: [plan, apply], apply_refs: [refs/heads/main]}}
          - name: github-actions-prs
            oidc:
              issuer: {issuer_url}
              audience: deploybot-plan
              claims: {{repository: acme/infrastructure-live, repository_id: "123456"}}
            repos:
              acme/infrastructure-live: {{projects: [staging], commands: [plan]}}
          - name: gitlab-ci
            oidc:
              issuer: {issuer_url}
              audience: {AUDIENCE}
              claims: {{project_path: acme/infrastructure-live, project_id: "42", ref_protected: "true"}}
            repos:
              acme/infrastructure-live: {{projects: [staging], commands: [plan]}}
          - name: jenkins
            hmac: {{key_env: JENKINS_DEPLOYBOT_KEY}}
            repos:
              acme/infrastructure-live: {{projects: [staging], commands: [plan]}}
          - name: circleci
            hmac: {{key_file: /nonexistent/circleci-key}}
            repos:
              acme/infrastructure-live: {{projects: [staging], commands: [plan]}}
        """
    )
    return load_policy(text).callers


class FakeClock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def issuer() -> Iterator[FakeIssuer]:
    server = FakeIssuer()
    server.add_rsa_key("k1")
    yield server
    server.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "deploybot.sqlite3")
    yield s
    s.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def verifier(issuer: FakeIssuer, store: Store, clock: FakeClock) -> Iterator[OidcVerifier]:
    with httpx.Client(timeout=5) as http:
        yield OidcVerifier(policy_callers(issuer.url), store.first_use, http=http, clock=clock)


def refused(verifier: OidcVerifier, token: str) -> CallerAuthError:
    with pytest.raises(CallerAuthError) as info:
        verifier.verify(token)
    assert info.value.status == 401
    assert len(token) < 8 or token not in str(info.value)  # never echoes the token
    return info.value


# --- OIDC: accepted ---------------------------------------------------------------


def test_github_actions_token_is_accepted_and_mapped_to_its_caller(issuer: FakeIssuer, verifier: OidcVerifier):
    claims = github_claims(issuer.url)
    caller, verified = verifier.verify(issuer.mint(claims))
    assert caller.name == "github-actions-infra"
    assert verified["repository_id"] == "123456" and verified["sha"] == SHA
    assert verified["jti"] == claims["jti"]
    assert issuer.requests == {"/.well-known/openid-configuration": 1, "/.well-known/jwks": 1}


def test_keys_are_cached(issuer: FakeIssuer, verifier: OidcVerifier):
    for _ in range(3):
        verifier.verify(issuer.mint(github_claims(issuer.url)))
    assert issuer.jwks_fetches == 1


def test_keys_are_refetched_after_the_ttl(issuer: FakeIssuer, verifier: OidcVerifier, clock: FakeClock):
    verifier.verify(issuer.mint(github_claims(issuer.url)))
    clock.now += 3601
    verifier.verify(issuer.mint(github_claims(issuer.url)))
    assert issuer.requests == {"/.well-known/openid-configuration": 2, "/.well-known/jwks": 2}


def test_gitlab_token_maps_to_the_gitlab_caller(issuer: FakeIssuer, verifier: OidcVerifier):
    caller, claims = verifier.verify(issuer.mint(gitlab_claims(issuer.url)))
    assert caller.name == "gitlab-ci"
    assert claims["project_id"] == "42"


def test_audience_selects_among_callers_of_one_issuer(issuer: FakeIssuer, verifier: OidcVerifier):
    # Same repository, but minted for the plan-only audience: the plan-only caller, not the apply one.
    caller, _ = verifier.verify(issuer.mint(github_claims(issuer.url, aud="deploybot-plan")))
    assert caller.name == "github-actions-prs"
    caller, _ = verifier.verify(issuer.mint(github_claims(issuer.url, aud=["other", AUDIENCE])))
    assert caller.name == "github-actions-infra"


def test_first_matching_caller_wins(issuer: FakeIssuer, verifier: OidcVerifier):
    # Another workflow of the same repo misses the infra caller's job_workflow_ref pin
    # and falls through to no caller (the plan-only caller needs its own audience).
    other = "acme/infrastructure-live/.github/workflows/other.yml@refs/heads/main"
    error = refused(verifier, issuer.mint(github_claims(issuer.url, job_workflow_ref=other)))
    assert error.message == "token claims match no configured caller"


def test_es256_token_is_accepted(issuer: FakeIssuer, verifier: OidcVerifier):
    issuer.add_ec_key("ec1")
    caller, _ = verifier.verify(issuer.mint(github_claims(issuer.url), kid="ec1", alg="ES256"))
    assert caller.name == "github-actions-infra"


# --- OIDC: refused ------------------------------------------------------------------


def test_forged_signature_is_refused(issuer: FakeIssuer, verifier: OidcVerifier):
    other_key = rsa_key("attacker")
    token = issuer.mint(github_claims(issuer.url), kid="k1", key=other_key)
    assert refused(verifier, token).message == "token signature is invalid"


def test_tampered_payload_is_refused(issuer: FakeIssuer, verifier: OidcVerifier):
    header, payload, signature = issuer.mint(github_claims(issuer.url)).split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["repository"] = "evil/infrastructure-live"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    assert refused(verifier, f"{header}.{forged}.{signature}").message == "token signature is invalid"


def test_wrong_issuer_is_refused_without_fetching_from_it(issuer: FakeIssuer, verifier: OidcVerifier):
    evil = FakeIssuer()
    try:
        evil.add_rsa_key("evil")
        token = evil.mint(github_claims(evil.url), kid="evil")
        assert refused(verifier, token).message == "token issuer is not accepted"
        assert sum(evil.requests.values()) == 0
    finally:
        evil.close()
    token = issuer.mint(github_claims("https://token.actions.githubusercontent.com"))
    assert refused(verifier, token).message == "token issuer is not accepted"
    assert refused(verifier, issuer.mint(github_claims(issuer.url, iss=None))).message == "token issuer is not accepted"


def test_wrong_audience_is_refused(issuer: FakeIssuer, verifier: OidcVerifier):
    token = issuer.mint(github_claims(issuer.url, aud="https://github.com/acme"))
    assert refused(verifier, token).message == "token audience is not accepted"


def test_expired_token_is_refused(issuer: FakeIssuer, verifier: OidcVerifier):
    now = int(time.time())
    token = issuer.mint(github_claims(issuer.url, iat=now - 900, nbf=now - 900, exp=now - 120))
    assert refused(verifier, token).message == "token expired"


def test_token_within_leeway_is_accepted(issuer: FakeIssuer, verifier: OidcVerifier):
    now = int(time.time())
    caller, _ = verifier.verify(issuer.mint(github_claims(issuer.url, exp=now - 10)))
    assert caller.name == "github-actions-infra"


def test_not_yet_valid_token_is_refused(issuer: FakeIssuer, verifier: OidcVerifier):
    now = int(time.time())
    token = issuer.mint(github_claims(issuer.url, nbf=now + 600, exp=now + 900))
    assert refused(verifier, token).message == "token is not yet valid"
    token = issuer.mint(github_claims(issuer.url, iat=now + 600, nbf=None, exp=now + 900))
    assert refused(verifier, token).message == "token is not yet valid"


@pytest.mark.parametrize("claim", ["exp", "iat", "aud"])
def test_required_claims(issuer: FakeIssuer, verifier: OidcVerifier, claim: str):
    token = issuer.mint(github_claims(issuer.url, **{claim: None}))
    assert refused(verifier, token).message == f"token lacks the {claim} claim"


def test_token_without_jti_is_refused(issuer: FakeIssuer, verifier: OidcVerifier):
    assert refused(verifier, issuer.mint(github_claims(issuer.url, jti=None))).message == "token lacks the jti claim"


def test_alg_none_is_refused(issuer: FakeIssuer, verifier: OidcVerifier):
    token = jwt.encode(github_claims(issuer.url), None, algorithm="none", headers={"kid": "k1"})
    assert refused(verifier, token).message == "token algorithm is not accepted (only RS256, ES256)"
    assert issuer.jwks_fetches == 0


def test_hs256_is_refused_even_with_the_public_key_as_secret(issuer: FakeIssuer, verifier: OidcVerifier):
    token = jwt.encode(github_claims(issuer.url), "s" * 32, algorithm="HS256", headers={"kid": "k1"})
    assert refused(verifier, token).message == "token algorithm is not accepted (only RS256, ES256)"
    # The classic confusion: HMAC keyed with the issuer's public JWK modulus; hand-made, as PyJWT refuses.
    header = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT","kid":"k1"}').rstrip(b"=")
    payload = base64.urlsafe_b64encode(json.dumps(github_claims(issuer.url)).encode()).rstrip(b"=")
    mac = hmac.new(issuer.jwks[0]["n"].encode(), header + b"." + payload, hashlib.sha256).digest()
    token = b".".join([header, payload, base64.urlsafe_b64encode(mac).rstrip(b"=")]).decode()
    assert refused(verifier, token).message == "token algorithm is not accepted (only RS256, ES256)"


def test_alg_that_does_not_match_the_key_is_refused(issuer: FakeIssuer, verifier: OidcVerifier):
    ec_key = ec.generate_private_key(ec.SECP256R1())
    token = issuer.mint(github_claims(issuer.url), kid="k1", alg="ES256", key=ec_key)  # k1 is RSA
    assert refused(verifier, token).message == "token algorithm does not match its signing key"


def test_malformed_tokens_are_refused(verifier: OidcVerifier):
    for token in ("", "not-a-jwt", "a.b.c", "x" * 20000):
        assert refused(verifier, token).message == "token is malformed"


@pytest.mark.parametrize(
    "override",
    [
        {"repository": "acme/other"},
        {"repository": "ACME/infrastructure-live"},  # exact strings
        {"repository_id": "654321"},  # a re-registered repo with the same name
        {"repository_id": 123456},  # not a string
        {"job_workflow_ref": "acme/infrastructure-live/.github/workflows/deploy.yml@refs/heads/feature"},
        {"repository_id": None},  # pinned claim missing
    ],
)
def test_pinned_claim_mismatch_is_refused(issuer: FakeIssuer, verifier: OidcVerifier, override: dict[str, Any]):
    token = issuer.mint(github_claims(issuer.url, **override))
    assert refused(verifier, token).message == "token claims match no configured caller"


def test_gitlab_unprotected_ref_is_refused(issuer: FakeIssuer, verifier: OidcVerifier):
    token = issuer.mint(gitlab_claims(issuer.url, ref="feature", ref_protected="false"))
    assert refused(verifier, token).message == "token claims match no configured caller"


def test_replayed_jti_is_refused(issuer: FakeIssuer, verifier: OidcVerifier, store: Store):
    token = issuer.mint(github_claims(issuer.url))
    verifier.verify(token)
    assert refused(verifier, token).message == "token was already used"
    # The jti is remembered per issuer, in the real store (a restart keeps it).
    claims = jwt.decode(token, options={"verify_signature": False})
    assert store.first_use("jti:" + issuer.url, claims["jti"], claims["exp"]) is False


def test_refused_token_does_not_burn_its_jti(issuer: FakeIssuer, verifier: OidcVerifier, store: Store):
    claims = github_claims(issuer.url, repository="acme/other")
    refused(verifier, issuer.mint(claims))
    assert store.first_use("jti:" + issuer.url, claims["jti"], claims["exp"]) is True


# --- OIDC: key rotation ----------------------------------------------------------


def test_unknown_kid_refetches_the_jwks_once_and_a_rotated_key_verifies(
    issuer: FakeIssuer, verifier: OidcVerifier, clock: FakeClock
):
    verifier.verify(issuer.mint(github_claims(issuer.url)))
    assert issuer.jwks_fetches == 1

    clock.now += 120  # past the refetch rate limit, well within the cache TTL
    issuer.add_rsa_key("k2")  # the issuer rotates
    caller, _ = verifier.verify(issuer.mint(github_claims(issuer.url), kid="k2"))
    assert caller.name == "github-actions-infra"
    assert issuer.jwks_fetches == 2
    assert issuer.requests["/.well-known/openid-configuration"] == 1  # only the JWKS is refetched

    # Random kids right after: refused, and no more fetches.
    for i in range(5):
        forged = issuer.mint(github_claims(issuer.url), kid=f"random-{i}", key=issuer.private["k2"])
        assert refused(verifier, forged).message == "token signing key is unknown"
    assert issuer.jwks_fetches == 2
    verifier.verify(issuer.mint(github_claims(issuer.url), kid="k1"))  # known kids still verify from the cache
    assert issuer.jwks_fetches == 2

    clock.now += 61  # once the rate limit has passed, one more fetch for one more unknown kid
    forged = issuer.mint(github_claims(issuer.url), kid="nope", key=issuer.private["k2"])
    assert refused(verifier, forged).message == "token signing key is unknown"
    assert refused(verifier, forged).message == "token signing key is unknown"
    assert issuer.jwks_fetches == 3


def test_new_key_within_the_rate_limit_waits_for_the_next_window(
    issuer: FakeIssuer, verifier: OidcVerifier, clock: FakeClock
):
    verifier.verify(issuer.mint(github_claims(issuer.url)))
    issuer.add_rsa_key("k2")
    token = issuer.mint(github_claims(issuer.url), kid="k2")
    assert refused(verifier, token).message == "token signing key is unknown"
    assert issuer.jwks_fetches == 1
    clock.now += 60
    assert verifier.verify(token)[0].name == "github-actions-infra"
    assert issuer.jwks_fetches == 2


def test_removed_key_stops_verifying_after_the_ttl(issuer: FakeIssuer, verifier: OidcVerifier, clock: FakeClock):
    verifier.verify(issuer.mint(github_claims(issuer.url)))
    issuer.add_rsa_key("k2")
    issuer.jwks[:] = [k for k in issuer.jwks if k["kid"] != "k1"]
    clock.now += 3601
    assert refused(verifier, issuer.mint(github_claims(issuer.url))).message == "token signing key is unknown"
    assert verifier.verify(issuer.mint(github_claims(issuer.url), kid="k2"))[0].name == "github-actions-infra"


def test_unreachable_issuer_is_503_and_rate_limited(issuer: FakeIssuer, verifier: OidcVerifier, clock: FakeClock):
    issuer.fail = True
    token = issuer.mint(github_claims(issuer.url))
    for _ in range(3):
        with pytest.raises(CallerAuthError) as info:
            verifier.verify(token)
        assert info.value.status == 503
    assert issuer.requests["/.well-known/openid-configuration"] == 1
    issuer.fail = False
    clock.now += 60
    assert verifier.verify(token)[0].name == "github-actions-infra"


def test_last_good_keys_are_kept_while_the_issuer_is_down(
    issuer: FakeIssuer, verifier: OidcVerifier, clock: FakeClock
):
    verifier.verify(issuer.mint(github_claims(issuer.url)))
    issuer.fail = True
    clock.now += 3601
    assert verifier.verify(issuer.mint(github_claims(issuer.url)))[0].name == "github-actions-infra"
    assert issuer.requests["/.well-known/openid-configuration"] == 2


def test_discovery_document_naming_another_issuer_is_not_trusted(issuer: FakeIssuer, verifier: OidcVerifier):
    issuer.advertised_issuer = "https://token.actions.githubusercontent.com"
    with pytest.raises(CallerAuthError) as info:
        verifier.verify(issuer.mint(github_claims(issuer.url)))
    assert info.value.status == 503
    assert issuer.jwks_fetches == 0


def test_verifier_options_are_checked_at_construction(store: Store):
    with pytest.raises(ValueError, match="leeway"):
        OidcVerifier((), store.first_use, leeway=300)


# --- sha claim ----------------------------------------------------------------------


def test_sha_claim_matches():
    assert sha_claim_matches({"sha": SHA}, SHA)
    assert sha_claim_matches({"sha": SHA}, SHA.upper())
    assert not sha_claim_matches({"sha": SHA}, "0" * 40)
    assert not sha_claim_matches({"sha": SHA}, SHA[:12])
    assert not sha_claim_matches({"sha": SHA}, "")
    assert not sha_claim_matches({"sha": 5}, SHA)
    assert sha_claim_matches({}, SHA)  # HMAC callers and tokens without a sha


# --- HMAC -------------------------------------------------------------------------

KEY = b"k" * 16 + secrets.token_hex(16).encode()
BODY = b'{"repo": "acme/infrastructure-live", "ref": "refs/heads/main", "project": "staging", "command": "plan"}'
PATH = "/api/v1/runs"


def signed_headers(key: bytes = KEY, key_id: str = "jenkins", ts: float | None = None, nonce: str | None = None,
                   body: bytes = BODY, method: str = "POST", path: str = PATH) -> dict[str, str]:
    timestamp = str(int(time.time() if ts is None else ts))
    nonce = nonce or secrets.token_hex(16)
    return {
        "X-Deploybot-Key-Id": key_id,
        "X-Deploybot-Timestamp": timestamp,
        "X-Deploybot-Nonce": nonce,
        "X-Deploybot-Signature": hmac_signature(key, method, path, timestamp, nonce, body),
    }


@pytest.fixture
def hmac_verifier(store: Store, monkeypatch: pytest.MonkeyPatch) -> HmacVerifier:
    monkeypatch.setenv("JENKINS_DEPLOYBOT_KEY", KEY.decode() + "\n")
    return HmacVerifier(policy_callers("https://issuer.example"), store.first_use)


def hmac_refused(verifier: HmacVerifier, headers: dict[str, str], body: bytes = BODY, path: str = PATH,
                 method: str = "POST") -> str:
    with pytest.raises(CallerAuthError) as info:
        verifier.verify(method, path, headers, body)
    assert info.value.status == 401
    assert KEY.decode() not in info.value.message
    signature = headers.get("X-Deploybot-Signature", "")
    assert len(signature) < 8 or signature not in info.value.message
    return info.value.message


def test_good_signature_is_accepted(hmac_verifier: HmacVerifier):
    caller = hmac_verifier.verify("POST", PATH, signed_headers(), BODY)
    assert caller.name == "jenkins"
    lower = {k.lower(): v for k, v in signed_headers().items()}  # header names are case-insensitive
    assert hmac_verifier.verify("post", PATH, lower, BODY).name == "jenkins"


def test_wrong_key_is_refused(hmac_verifier: HmacVerifier):
    other = secrets.token_hex(32).encode()
    assert hmac_refused(hmac_verifier, signed_headers(key=other)) == "request signature is invalid"


@pytest.mark.parametrize("skew", [-301, 301, -100_000])
def test_stale_or_future_timestamp_is_refused(hmac_verifier: HmacVerifier, skew: int):
    headers = signed_headers(ts=time.time() + skew)
    assert hmac_refused(hmac_verifier, headers) == "request timestamp is outside the 5-minute window"


def test_timestamp_within_the_window_is_accepted(hmac_verifier: HmacVerifier):
    assert hmac_verifier.verify("POST", PATH, signed_headers(ts=time.time() - 290), BODY).name == "jenkins"


def test_window_follows_the_injected_clock(store: Store, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("JENKINS_DEPLOYBOT_KEY", KEY.decode())
    clock = FakeClock()
    verifier = HmacVerifier(policy_callers("https://issuer.example"), store.first_use, clock=clock)
    headers = signed_headers(ts=clock.now)
    clock.now += 301
    assert hmac_refused(verifier, headers) == "request timestamp is outside the 5-minute window"


def test_replayed_nonce_is_refused(hmac_verifier: HmacVerifier, store: Store):
    headers = signed_headers()
    hmac_verifier.verify("POST", PATH, headers, BODY)
    assert hmac_refused(hmac_verifier, headers) == "nonce was already used"
    # A fresh signature over the same nonce is a replay too.
    again = signed_headers(nonce=headers["X-Deploybot-Nonce"])
    assert hmac_refused(hmac_verifier, again) == "nonce was already used"
    assert store.first_use("nonce:jenkins", headers["X-Deploybot-Nonce"], time.time() + 600) is False


def test_unknown_key_id_is_refused(hmac_verifier: HmacVerifier):
    assert hmac_refused(hmac_verifier, signed_headers(key_id="nobody")) == "unknown key id"
    assert hmac_refused(hmac_verifier, signed_headers(key_id="Jenkins")) == "unknown key id"
    # An OIDC caller has no HMAC key, whatever is sent.
    assert hmac_refused(hmac_verifier, signed_headers(key_id="gitlab-ci")) == "unknown key id"


def test_caller_with_missing_key_is_disabled_not_a_crash(hmac_verifier: HmacVerifier):
    # circleci's key_file does not exist: disabled with a warning.
    assert hmac_verifier.enabled == ("jenkins",)
    assert hmac_refused(hmac_verifier, signed_headers(key_id="circleci")) == "unknown key id"


def test_missing_and_short_keys_are_logged(store: Store, monkeypatch: pytest.MonkeyPatch,
                                           caplog: pytest.LogCaptureFixture):
    monkeypatch.delenv("JENKINS_DEPLOYBOT_KEY", raising=False)
    with caplog.at_level(logging.WARNING, logger="bot.ci.auth"):
        verifier = HmacVerifier(policy_callers("https://issuer.example"), store.first_use)
    assert verifier.enabled == ()
    assert "caller jenkins disabled" in caplog.text and "caller circleci disabled" in caplog.text
    caplog.clear()
    monkeypatch.setenv("JENKINS_DEPLOYBOT_KEY", "tiny-key-value")
    with caplog.at_level(logging.WARNING, logger="bot.ci.auth"):
        verifier = HmacVerifier(policy_callers("https://issuer.example"), store.first_use)
    assert verifier.enabled == ()
    assert "shorter than 32 bytes" in caplog.text and "tiny-key-value" not in caplog.text


def test_key_file_is_read_and_stripped(tmp_path: Path):
    path = tmp_path / "key"
    path.write_bytes(KEY + b"\n")
    caller = Caller(name="c", oidc=None, hmac_key_file=str(path), hmac_key_env=None)
    assert load_hmac_key(caller) == KEY


def test_custom_key_loader(store: Store):
    loaded: list[str] = []

    def loader(caller: Caller) -> bytes:
        loaded.append(caller.name)
        return KEY

    verifier = HmacVerifier(policy_callers("https://issuer.example"), store.first_use, key_loader=loader)
    assert loaded == ["jenkins", "circleci"]
    assert verifier.verify("POST", PATH, signed_headers(key_id="circleci"), BODY).name == "circleci"


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("POST", PATH, BODY.replace(b"plan", b"apply")),  # tampered body
        ("POST", "/api/v1/runs/1/approve", BODY),  # tampered path
        ("PUT", PATH, BODY),  # other method
        ("POST", PATH + "?x=1", BODY),
    ],
)
def test_tampered_request_is_refused(hmac_verifier: HmacVerifier, method: str, path: str, body: bytes):
    headers = signed_headers()
    assert hmac_refused(hmac_verifier, headers, body=body, path=path, method=method) == "request signature is invalid"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"X-Deploybot-Nonce": None}, "HMAC requests need X-Deploybot-Key-Id"),
        ({"X-Deploybot-Timestamp": None}, "HMAC requests need X-Deploybot-Key-Id"),
        ({"X-Deploybot-Timestamp": "12.5"}, "X-Deploybot-Timestamp must be unix seconds"),
        ({"X-Deploybot-Timestamp": "-1"}, "X-Deploybot-Timestamp must be unix seconds"),
        ({"X-Deploybot-Nonce": "short"}, "X-Deploybot-Nonce must be 16-128"),
        ({"X-Deploybot-Nonce": "n" * 129}, "X-Deploybot-Nonce must be 16-128"),
        ({"X-Deploybot-Signature": "v1=" + "0" * 64}, "request signature is invalid"),
        ({"X-Deploybot-Signature": "\u00e9"}, "request signature is invalid"),
    ],
)
def test_bad_hmac_headers_are_refused(hmac_verifier: HmacVerifier, change: dict[str, str | None], message: str):
    headers = signed_headers()
    for name, value in change.items():
        if value is None:
            del headers[name]
        else:
            headers[name] = value
    assert hmac_refused(hmac_verifier, headers).startswith(message)


def test_repeated_header_is_refused(hmac_verifier: HmacVerifier):
    headers = list(signed_headers().items()) + [("x-deploybot-key-id", "circleci")]

    class Multi(dict):
        def items(self):  # what Starlette's Headers.items() gives: every raw pair
            return headers

    assert hmac_refused(hmac_verifier, Multi()) == "header x-deploybot-key-id is given more than once"


# --- authenticate --------------------------------------------------------------------


def test_authenticate_dispatches_on_the_credentials(
    issuer: FakeIssuer, verifier: OidcVerifier, hmac_verifier: HmacVerifier
):
    token = issuer.mint(github_claims(issuer.url))
    caller, claims = authenticate({"Authorization": f"Bearer {token}"}, "POST", PATH, BODY, verifier, hmac_verifier)
    assert caller.name == "github-actions-infra" and claims["sha"] == SHA

    caller, claims = authenticate(signed_headers(), "POST", PATH, BODY, verifier, hmac_verifier)
    assert caller.name == "jenkins" and claims == {}


def test_authenticate_with_starlette_headers(issuer: FakeIssuer, verifier: OidcVerifier, hmac_verifier: HmacVerifier):
    from starlette.datastructures import Headers

    token = issuer.mint(gitlab_claims(issuer.url))
    headers = Headers(raw=[(b"authorization", f"bearer {token}".encode())])
    assert authenticate(headers, "POST", PATH, BODY, verifier, hmac_verifier)[0].name == "gitlab-ci"
    headers = Headers(raw=[(k.lower().encode(), v.encode()) for k, v in signed_headers().items()])
    assert authenticate(headers, "POST", PATH, BODY, verifier, hmac_verifier)[0].name == "jenkins"


@pytest.mark.parametrize(
    "headers, message",
    [
        ({}, "no credentials"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "the Authorization header must be `Bearer <token>`"),
        ({"Authorization": "Bearer "}, "the Authorization header must be `Bearer <token>`"),
        ({"Authorization": "Bearer abc.def.ghi", "X-Deploybot-Signature": "v1=00"},
         "send either a bearer token or an HMAC signature, not both"),
        ({"Authorization": "Bearer abc"}, "token is malformed"),
        ({"X-Deploybot-Signature": "v1=00"}, "HMAC requests need"),
    ],
)
def test_authenticate_refusals(verifier: OidcVerifier, hmac_verifier: HmacVerifier, headers: dict[str, str],
                               message: str):
    with pytest.raises(CallerAuthError) as info:
        authenticate(headers, "POST", PATH, BODY, verifier, hmac_verifier)
    assert info.value.status == 401
    assert info.value.message.startswith(message)
    assert str(info.value) == info.value.message
