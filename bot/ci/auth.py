"""Authentication of CI callers of the trigger API: OIDC tokens and HMAC-signed requests.

Which caller a request comes from is proved here, at the HTTP edge; what that caller
may do is decided by ``policies.callers.authorize_trigger``. Deny by default: a
request that proves no configured caller gets a :class:`CallerAuthError`.

- **OIDC** (GitHub Actions, GitLab CI ``id_tokens``): ``Authorization: Bearer <jwt>``.
  The token must be RS256 or ES256, signed by a key from its issuer's JWKS
  (discovered at ``{issuer}/.well-known/openid-configuration``), for a configured
  issuer and audience, within its ``exp``/``nbf``/``iat``, with every pinned claim
  of a caller, and with a ``jti`` never seen before.
- **HMAC** (Jenkins, CircleCI): ``X-Deploybot-Key-Id`` (the caller's name),
  ``X-Deploybot-Timestamp`` (unix seconds, within 5 minutes), ``X-Deploybot-Nonce``
  (16-128 characters, used once) and ``X-Deploybot-Signature``
  (:func:`hmac_signature` over method, path, timestamp, nonce and body).

Error messages are safe to send back to the client: they never contain a token, a
key or a signature; details go to the server log.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt

from policies.callers import Caller

HMAC_SCHEME = "v1"

log = logging.getLogger(__name__)

ALGORITHMS: tuple[str, ...] = ("RS256", "ES256")
KEY_ID_HEADER = "x-deploybot-key-id"
TIMESTAMP_HEADER = "x-deploybot-timestamp"
NONCE_HEADER = "x-deploybot-nonce"
SIGNATURE_HEADER = "x-deploybot-signature"
HMAC_WINDOW = 300  # seconds either side of the server's clock
MIN_HMAC_KEY_BYTES = 32
MAX_TOKEN_LENGTH = 16_384
MAX_DOCUMENT_BYTES = 1_000_000  # discovery document or JWKS

_NONCE = re.compile(r"[A-Za-z0-9._~+/=-]{16,128}")
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_KID = re.compile(r"[\x21-\x7e]{1,256}")


def hmac_signature(key: bytes, method: str, path: str, timestamp: str, nonce: str, body: bytes) -> str:
    """The `X-Deploybot-Signature` value: HMAC-SHA256 over method, path, timestamp, nonce and body."""
    message = "\n".join(
        [method.upper(), path, timestamp, nonce, hashlib.sha256(body).hexdigest()]
    ).encode()
    return f"{HMAC_SCHEME}=" + hmac.new(key, message, hashlib.sha256).hexdigest()


class CallerAuthError(Exception):
    """A trigger API request that proves no allowed caller.

    `status` is 401 for missing or bad credentials, 403 for a caller that is
    authenticated but not allowed, 503 when the token issuer's keys cannot be
    fetched (the client may retry). `message` is safe to return to the client.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _unauthorized(message: str) -> CallerAuthError:
    return CallerAuthError(401, message)


# --- OIDC ------------------------------------------------------------------------


@dataclass
class _IssuerKeys:
    """What is cached per issuer: the JWKS location and its keys by kid."""

    jwks_uri: str | None = None
    keys: dict[str, dict[str, Any]] = field(default_factory=dict)  # kid -> JWK
    fetched_at: float | None = None  # last successful JWKS fetch
    attempted_at: float | None = None  # last fetch attempt, successful or not


class OidcVerifier:
    """Verifies CI OIDC tokens against the OIDC callers of the policy.

    `replay(scope, value, expires_at)` records a one-time value and returns False
    if it was seen before (``Store.first_use``). `http` fetches discovery
    documents and JWKS (a client without redirects is made if None). `clock`
    drives the JWKS cache (`jwks_ttl`) and the rate limit on fetches
    (`refetch_interval`: an unknown ``kid`` makes at most one JWKS fetch per
    issuer per interval, so random kids cannot make us hammer the issuer);
    token times are checked by PyJWT with `leeway`.
    """

    def __init__(
        self,
        callers: Iterable[Caller],
        replay: Callable[[str, str, float], bool],
        http: httpx.Client | None = None,
        clock: Callable[[], float] = time.time,
        *,
        jwks_ttl: float = 3600.0,
        refetch_interval: float = 60.0,
        leeway: float = 30.0,
    ) -> None:
        if not 0 <= leeway <= 60:
            raise ValueError("leeway must be between 0 and 60 seconds")
        if jwks_ttl <= 0 or refetch_interval < 0:
            raise ValueError("jwks_ttl must be positive and refetch_interval not negative")
        self._callers = tuple(c for c in callers if c.oidc is not None)
        self._replay = replay
        self._own_http = http is None
        self._http = http if http is not None else httpx.Client(timeout=10.0, follow_redirects=False)
        self._clock = clock
        self._ttl = jwks_ttl
        self._refetch_interval = refetch_interval
        self._leeway = leeway
        self._cache: dict[str, _IssuerKeys] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the HTTP client if this verifier made it."""
        if self._own_http:
            self._http.close()

    def verify(self, token: str, once: bool = True) -> tuple[Caller, dict[str, Any]]:
        """The caller a bearer token identifies and the token's claims; raise CallerAuthError.

        With `once`, the token's `jti` is spent: a token starts one run. Reads
        (`once=False`) may reuse it until it expires, as CI jobs poll with one token.
        """
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_LENGTH:
            raise _unauthorized("token is malformed")
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.InvalidTokenError:
            raise _unauthorized("token is malformed") from None
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise _unauthorized(f"token algorithm is not accepted (only {', '.join(ALGORITHMS)})")
        kid = header.get("kid")
        if not isinstance(kid, str) or not _KID.fullmatch(kid):
            raise _unauthorized("token has no usable key id (kid)")
        issuer = unverified.get("iss")
        candidates = [c for c in self._callers if isinstance(issuer, str) and c.oidc.issuer == issuer]
        if not candidates:
            # Never fetch keys from an issuer the policy does not name.
            raise _unauthorized("token issuer is not accepted")

        key = self._signing_key(issuer, kid, alg)
        audiences = sorted({c.oidc.audience for c in candidates})
        try:
            claims = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                audience=audiences,
                issuer=issuer,
                leeway=self._leeway,
                options={"require": ["exp", "iat", "iss", "aud"], "verify_signature": True},
            )
        except jwt.InvalidSignatureError:
            raise _unauthorized("token signature is invalid") from None
        except jwt.ExpiredSignatureError:
            raise _unauthorized("token expired") from None
        except jwt.ImmatureSignatureError:
            raise _unauthorized("token is not yet valid") from None
        except jwt.InvalidAudienceError:
            raise _unauthorized("token audience is not accepted") from None
        except jwt.InvalidIssuerError:
            raise _unauthorized("token issuer is not accepted") from None
        except jwt.MissingRequiredClaimError as e:
            raise _unauthorized(f"token lacks the {e.claim} claim") from None
        except jwt.InvalidTokenError as e:
            log.info("OIDC token from %s refused: %s", issuer, e)
            raise _unauthorized("token is invalid") from None

        token_aud = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
        caller = next(
            (c for c in candidates if c.oidc.audience in token_aud and c.oidc.matches(claims)), None
        )
        if caller is None:
            log.info("OIDC token from %s matches no caller (sub=%r)", issuer, claims.get("sub"))
            raise _unauthorized("token claims match no configured caller")

        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti:
            # GitHub Actions and GitLab CI tokens carry one; without it a token could be replayed.
            raise _unauthorized("token lacks the jti claim")
        if once and not self._replay("jti:" + issuer, jti, float(claims["exp"])):
            raise _unauthorized("token was already used")
        return caller, claims

    # JWKS ---------------------------------------------------------------------

    def _signing_key(self, issuer: str, kid: str, alg: str) -> Any:
        """The public key for `kid` of `issuer`, fetching or refetching the JWKS as allowed."""
        with self._lock:
            state = self._cache.setdefault(issuer, _IssuerKeys())
            now = self._clock()
            stale = state.fetched_at is None or now - state.fetched_at >= self._ttl
            if stale or kid not in state.keys:
                if self._may_fetch(state, now):
                    # Past the TTL: rediscover. An unknown kid: the JWKS may have rotated.
                    self._fetch(issuer, state, now, rediscover=stale)
                elif stale and not state.keys:
                    raise CallerAuthError(503, "the token issuer's signing keys are unavailable; retry later")
            jwk = state.keys.get(kid)
        if jwk is None:
            raise _unauthorized("token signing key is unknown")
        return _public_key(jwk, alg)

    def _may_fetch(self, state: _IssuerKeys, now: float) -> bool:
        return state.attempted_at is None or now - state.attempted_at >= self._refetch_interval

    def _fetch(self, issuer: str, state: _IssuerKeys, now: float, rediscover: bool) -> None:
        state.attempted_at = now
        try:
            if rediscover or state.jwks_uri is None:
                config = self._get_json(issuer.rstrip("/") + "/.well-known/openid-configuration")
                if config.get("issuer") != issuer:
                    raise ValueError("the discovery document names another issuer")
                jwks_uri = config.get("jwks_uri")
                if not isinstance(jwks_uri, str) or not _same_scheme_ok(issuer, jwks_uri):
                    raise ValueError("the discovery document has no usable jwks_uri")
                state.jwks_uri = jwks_uri
            jwks = self._get_json(state.jwks_uri)
            keys = jwks.get("keys")
            if not isinstance(keys, list):
                raise ValueError("the JWKS has no keys list")
        except (httpx.HTTPError, ValueError) as e:
            log.warning("cannot fetch the signing keys of %s: %s", issuer, e)
            if state.keys and state.fetched_at is not None:
                return  # keep serving the last good keys until a fetch succeeds
            raise CallerAuthError(503, "the token issuer's signing keys are unavailable; retry later") from None
        state.keys = {
            k["kid"]: k
            for k in keys
            if isinstance(k, dict) and isinstance(k.get("kid"), str) and k.get("use", "sig") == "sig"
        }
        state.fetched_at = now
        log.info("fetched %d signing keys of %s", len(state.keys), issuer)

    def _get_json(self, url: str) -> dict[str, Any]:
        response = self._http.get(url, headers={"Accept": "application/json"})
        if response.status_code != 200:
            raise ValueError(f"GET {url}: HTTP {response.status_code}")
        if len(response.content) > MAX_DOCUMENT_BYTES:
            raise ValueError(f"GET {url}: response too large")
        data = json.loads(response.content)
        if not isinstance(data, dict):
            raise ValueError(f"GET {url}: not a JSON object")
        return data


def _same_scheme_ok(issuer: str, url: str) -> bool:
    """Keys come over https, or over http only when the issuer itself is (loopback, tests)."""
    return url.startswith("https://") or (issuer.startswith("http://") and url.startswith("http://"))


def _public_key(jwk: dict[str, Any], alg: str) -> Any:
    """The key object for a JWK, refusing one whose type or declared alg is not `alg`."""
    if jwk.get("alg", alg) != alg:
        raise _unauthorized("token algorithm does not match its signing key")
    try:
        return jwt.PyJWK(jwk, algorithm=alg).key
    except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError):
        raise _unauthorized("token algorithm does not match its signing key") from None


def sha_claim_matches(claims: Mapping[str, Any], sha: str) -> bool:
    """Whether the requested commit is the token's ``sha`` claim (True if it has none).

    GitHub Actions and GitLab CI tokens name the commit the job runs for; a token
    for one commit must not start a run of another. `sha` must be the full SHA.
    """
    if "sha" not in claims:
        return True
    token_sha = claims["sha"]
    return (
        isinstance(token_sha, str)
        and isinstance(sha, str)
        and bool(sha)
        and hmac.compare_digest(token_sha.lower().encode(), sha.lower().encode())
    )


# --- HMAC ------------------------------------------------------------------------


def load_hmac_key(caller: Caller) -> bytes:
    """A caller's HMAC key from its key_file or key_env (surrounding whitespace removed).

    Raises OSError, KeyError or ValueError when the key cannot be read.
    """
    if caller.hmac_key_file:
        with open(caller.hmac_key_file, "rb") as f:
            return f.read().strip()
    if caller.hmac_key_env:
        return os.environ[caller.hmac_key_env].strip().encode()
    raise ValueError("no key_file or key_env")


class HmacVerifier:
    """Verifies HMAC-signed trigger requests against the HMAC callers of the policy.

    Keys are loaded once, here, with `key_loader` (default :func:`load_hmac_key`);
    a caller whose key cannot be loaded or is shorter than 32 bytes is disabled
    with a logged warning, so a missing secret never stops the server.
    """

    def __init__(
        self,
        callers: Iterable[Caller],
        replay: Callable[[str, str, float], bool],
        clock: Callable[[], float] = time.time,
        key_loader: Callable[[Caller], bytes] = load_hmac_key,
    ) -> None:
        self._replay = replay
        self._clock = clock
        self._keys: dict[str, tuple[Caller, bytes]] = {}
        for caller in callers:
            if caller.oidc is not None or not (caller.hmac_key_file or caller.hmac_key_env):
                continue
            source = f"key_file {caller.hmac_key_file}" if caller.hmac_key_file else f"key_env {caller.hmac_key_env}"
            try:
                key = key_loader(caller)
            except (OSError, KeyError, ValueError) as e:
                log.warning("caller %s disabled: cannot read its HMAC key (%s): %s", caller.name, source,
                            type(e).__name__)
                continue
            if len(key) < MIN_HMAC_KEY_BYTES:
                log.warning("caller %s disabled: its HMAC key (%s) is shorter than %d bytes", caller.name,
                            source, MIN_HMAC_KEY_BYTES)
                continue
            self._keys[caller.name] = (caller, key)

    @property
    def enabled(self) -> tuple[str, ...]:
        """Names of the callers whose keys were loaded."""
        return tuple(self._keys)

    def secrets(self) -> list[str]:
        """The callers' keys as text, so that output shown to users can be redacted."""
        return [key.decode("utf-8", "replace") for _, key in self._keys.values()]

    def verify(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> Caller:
        """The caller that signed this request; raise CallerAuthError.

        `path` is what the client signed: the request path, plus ``?query`` if any.
        """
        key_id = _header(headers, KEY_ID_HEADER)
        timestamp = _header(headers, TIMESTAMP_HEADER)
        nonce = _header(headers, NONCE_HEADER)
        signature = _header(headers, SIGNATURE_HEADER)
        if key_id is None or timestamp is None or nonce is None or signature is None:
            raise _unauthorized(
                "HMAC requests need X-Deploybot-Key-Id, X-Deploybot-Timestamp, X-Deploybot-Nonce"
                " and X-Deploybot-Signature"
            )
        entry = self._keys.get(key_id)
        if entry is None:
            raise _unauthorized("unknown key id")
        caller, key = entry
        if not _TIMESTAMP.fullmatch(timestamp):
            raise _unauthorized("X-Deploybot-Timestamp must be unix seconds")
        ts = int(timestamp)
        if abs(self._clock() - ts) > HMAC_WINDOW:
            raise _unauthorized("request timestamp is outside the 5-minute window")
        if not _NONCE.fullmatch(nonce):
            raise _unauthorized("X-Deploybot-Nonce must be 16-128 letters, digits or ._~+/=-")
        expected = hmac_signature(key, method, path, timestamp, nonce, body)
        if not hmac.compare_digest(expected.encode(), signature.encode("utf-8", "replace")):
            raise _unauthorized("request signature is invalid")
        if not self._replay("nonce:" + caller.name, nonce, ts + 2 * HMAC_WINDOW):
            raise _unauthorized("nonce was already used")
        return caller


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """The one value of header `name` (case-insensitive); None if absent; 401 if repeated."""
    items = headers.items() if hasattr(headers, "items") else headers
    values = [v for k, v in items if k.lower() == name]
    if len(values) > 1:
        raise _unauthorized(f"header {name} is given more than once")
    return values[0] if values else None


# --- the edge ----------------------------------------------------------------------


def authenticate(
    headers: Mapping[str, str],
    method: str,
    path: str,
    body: bytes,
    oidc: OidcVerifier,
    hmac: HmacVerifier,
) -> tuple[Caller, dict[str, Any]]:
    """The caller of a trigger API request and its token claims ({} for HMAC).

    ``Authorization: Bearer <jwt>`` is verified as an OIDC token, an
    ``X-Deploybot-Signature`` as an HMAC request; both at once, or neither, is
    refused with 401.
    """
    authorization = _header(headers, "authorization")
    signature = _header(headers, SIGNATURE_HEADER)
    if authorization is not None and signature is not None:
        raise _unauthorized("send either a bearer token or an HMAC signature, not both")
    if authorization is not None:
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _unauthorized("the Authorization header must be `Bearer <token>`")
        # Only a request that starts something spends the token; status reads do not.
        return oidc.verify(token.strip(), once=method.upper() not in ("GET", "HEAD"))
    if signature is not None:
        return hmac.verify(method, path, headers, body), {}
    raise _unauthorized("no credentials")
