"""OpenID Connect login (authorization code flow with PKCE) against a hospital's provider.

The server is a confidential client: it authenticates to the token endpoint with its
client secret and validates the ID token itself (signature from the provider's JWKS,
``iss``, ``aud``/``azp``, ``exp``, ``nonce``, ``at_hash``). Which local account the
login opens is decided by :meth:`Sessions.login_external`, never by the provider alone.

What the callback must get back (``state``, ``nonce``, the PKCE verifier, where to go
next) travels in a short-lived cookie encrypted and authenticated with a key derived
from the client secret (JWE, ``dir`` + A256GCM). That keeps every worker process and
every server of a deployment able to finish a login another one started, without a
table, and the cookie's content unreadable and unforgeable by the browser. A state is
accepted once per process; across processes the provider refusing a second use of the
authorization code stops a replay.

JOSE comes from joserfc (what authlib itself uses since authlib.jose was deprecated);
PKCE, random tokens and the ID-token claim rules come from authlib.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote_plus, urlencode

import httpx
from authlib.common.security import generate_token
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from authlib.oidc.core import CodeIDToken
from joserfc import jwe, jwt
from joserfc.errors import InvalidKeyIdError, JoseError
from joserfc.jwk import KeySet, OctKey

from dicomshare.config import Settings
from dicomshare.errors import InvalidInput, NotFound, RemoteError, Unauthenticated

__all__ = ["LoginState", "OidcClient", "OidcIdentity", "safe_next"]

NOT_CONFIGURED = "OpenID Connect is not configured"
STATE_SECONDS = 600  # how long a started login may take at the provider
_METADATA_SECONDS = 3600.0
_LEEWAY = 60  # seconds of clock skew tolerated on exp / iat
_SIGNING = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512",
            "EdDSA")
_SEAL_ALGORITHMS = ["dir", "A256GCM"]


@dataclass(frozen=True)
class LoginState:
    """What the callback needs from the login that started it."""

    state: str
    nonce: str
    verifier: str
    redirect_uri: str
    next: str
    expires: int  # Unix time


@dataclass(frozen=True)
class OidcIdentity:
    """A validated login: ``subject`` is "issuer|sub", ``username`` the configured claim."""

    subject: str
    username: str
    next: str
    claims: dict[str, Any]


def safe_next(value: str | None) -> str:
    """A local path to go to after login, or "/": never another site (open redirect)."""
    if (not value or not value.startswith("/") or value.startswith("//")
            or "\\" in value or len(value) > 2000
            or any(ord(c) < 32 or ord(c) == 127 for c in value)):
        return "/"
    return value


class OidcClient:
    """One configured provider: discovery and keys cached, logins begun and finished."""

    def __init__(self, settings: Settings, http: httpx.Client | None = None) -> None:
        if not settings.oidc_issuer:
            raise NotFound(NOT_CONFIGURED)
        if not settings.oidc_client_id or not settings.oidc_client_secret:
            raise NotFound(f"{NOT_CONFIGURED} completely: DICOMSHARE_OIDC_CLIENT_ID and "
                           f"DICOMSHARE_OIDC_CLIENT_SECRET are required")
        self.issuer = settings.oidc_issuer.rstrip("/")
        self.client_id = settings.oidc_client_id
        self.client_secret = settings.oidc_client_secret
        self.username_claim = settings.oidc_username_claim or "preferred_username"
        self.http = http or httpx.Client(timeout=10.0, follow_redirects=False)
        key = hmac.new(self.client_secret.encode(), b"dicomshare oidc login state",
                       hashlib.sha256).digest()
        self._seal_key = OctKey.import_key(key)
        self._lock = threading.Lock()
        self._metadata: dict[str, Any] | None = None
        self._metadata_at = 0.0
        self._keys: KeySet | None = None
        self._used_states: dict[str, int] = {}

    # -- provider documents --------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        """The provider's discovery document, fetched once an hour."""
        with self._lock:
            if self._metadata is not None and \
                    time.monotonic() - self._metadata_at < _METADATA_SECONDS:
                return self._metadata
        doc = self._get_json(f"{self.issuer}/.well-known/openid-configuration")
        # OpenID Connect Discovery 4.3: the document must name the issuer we asked.
        if str(doc.get("issuer", "")).rstrip("/") != self.issuer:
            raise RemoteError(f"the identity provider's discovery document names issuer "
                              f"{doc.get('issuer')!r}, not {self.issuer!r}")
        for needed in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
            if not isinstance(doc.get(needed), str):
                raise RemoteError(f"the identity provider's discovery document has no "
                                  f"{needed}")
        with self._lock:
            self._metadata, self._metadata_at = doc, time.monotonic()
        return doc

    def keys(self, refresh: bool = False) -> KeySet:
        """The provider's signing keys; ``refresh`` after an unknown key id (rotation)."""
        # ID tokens reach us only from the token endpoint, over a connection we opened,
        # so an unknown key id means rotation, not an attacker: refetch every time.
        with self._lock:
            if self._keys is not None and not refresh:
                return self._keys
        doc = self._get_json(self.metadata()["jwks_uri"])
        try:
            keys = KeySet.import_key_set(doc)  # type: ignore[arg-type]
        except (JoseError, ValueError, TypeError, KeyError) as exc:
            raise RemoteError(f"the identity provider's JWKS is unusable: {exc}") from exc
        with self._lock:
            self._keys = keys
        return keys

    def _get_json(self, url: str) -> dict[str, Any]:
        try:
            response = self.http.get(url, headers={"Accept": "application/json"})
        except httpx.HTTPError as exc:
            raise RemoteError(f"cannot reach the identity provider at {url}: "
                              f"{type(exc).__name__}") from exc
        if response.status_code != 200:
            raise RemoteError(f"the identity provider answered {response.status_code} "
                              f"for {url}")
        try:
            doc = response.json()
        except ValueError as exc:
            raise RemoteError(f"the identity provider sent no JSON from {url}") from exc
        if not isinstance(doc, dict):
            raise RemoteError(f"the identity provider sent no JSON object from {url}")
        return doc

    # -- the flow ------------------------------------------------------------------------
    def begin(self, redirect_uri: str, next_path: str | None) -> tuple[str, str]:
        """(the provider's authorization URL to send the browser to, the sealed state for
        the login cookie)."""
        endpoint = self.metadata()["authorization_endpoint"]
        login = LoginState(state=generate_token(43), nonce=generate_token(43),
                           verifier=generate_token(64), redirect_uri=redirect_uri,
                           next=safe_next(next_path), expires=int(time.time()) + STATE_SECONDS)
        query = urlencode({
            "response_type": "code", "client_id": self.client_id,
            "redirect_uri": redirect_uri, "scope": "openid profile email",
            "state": login.state, "nonce": login.nonce,
            "code_challenge": create_s256_code_challenge(login.verifier),
            "code_challenge_method": "S256"})
        sep = "&" if "?" in endpoint else "?"
        return f"{endpoint}{sep}{query}", self.seal(login)

    def finish(self, sealed: str | None, state: str | None, code: str | None,
               error: str | None = None, error_description: str | None = None) -> OidcIdentity:
        """Check the callback against the login cookie, redeem the code, validate the ID
        token. Raises InvalidInput (400) for a broken or replayed callback and
        Unauthenticated (401) when the provider or its token says no."""
        login = self.unseal(sealed)
        if not state or not hmac.compare_digest(state.encode(), login.state.encode()):
            raise InvalidInput("the login's state does not match this browser's login; "
                               "start the login again")
        self._use_state(login)
        if error:
            raise Unauthenticated(f"the identity provider refused the login: {error[:100]}"
                                  + (f" ({error_description[:200]})" if error_description
                                     else ""))
        if not code:
            raise InvalidInput("the identity provider sent no authorization code")
        tokens = self._redeem(code, login)
        claims = self.validate_id_token(tokens.get("id_token"), login.nonce,
                                        tokens.get("access_token"))
        username = claims.get(self.username_claim)
        if not isinstance(username, str) or not username.strip():
            raise Unauthenticated(f"the identity provider's ID token has no "
                                  f"{self.username_claim!r} claim")
        return OidcIdentity(f"{claims['iss']}|{claims['sub']}", username.strip(), login.next,
                            claims)

    def seal(self, login: LoginState) -> str:
        payload = json.dumps(login.__dict__, separators=(",", ":")).encode()
        return jwe.encrypt_compact({"alg": "dir", "enc": "A256GCM"}, payload, self._seal_key,
                                   algorithms=_SEAL_ALGORITHMS)

    def unseal(self, sealed: str | None) -> LoginState:
        again = "start the login again"
        if not sealed or len(sealed) > 4096:
            raise InvalidInput(f"this browser has no login in progress (or its cookie "
                               f"expired); {again}")
        try:
            plain = jwe.decrypt_compact(sealed, self._seal_key,
                                        algorithms=_SEAL_ALGORITHMS).plaintext
            login = LoginState(**json.loads(plain or b""))
        except (JoseError, ValueError, TypeError) as exc:
            raise InvalidInput(f"the login cookie is not valid; {again}") from exc
        if login.expires < time.time():
            raise InvalidInput(f"the login took too long; {again}")
        return login

    def _use_state(self, login: LoginState) -> None:
        now = int(time.time())
        with self._lock:
            for old in [k for k, exp in self._used_states.items() if exp < now]:
                del self._used_states[old]
            if login.state in self._used_states:
                raise InvalidInput("this login was finished already; start the login again")
            self._used_states[login.state] = login.expires

    def _redeem(self, code: str, login: LoginState) -> dict[str, Any]:
        """Exchange the code at the token endpoint (client_secret_basic unless the
        provider supports only client_secret_post)."""
        meta = self.metadata()
        form = {"grant_type": "authorization_code", "code": code,
                "redirect_uri": login.redirect_uri, "code_verifier": login.verifier}
        headers = {"Accept": "application/json"}
        methods = meta.get("token_endpoint_auth_methods_supported") or ["client_secret_basic"]
        if "client_secret_basic" in methods or "client_secret_post" not in methods:
            # RFC 6749 2.3.1: both halves form-encoded before Basic encoding.
            pair = f"{quote_plus(self.client_id)}:{quote_plus(self.client_secret)}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        else:
            form |= {"client_id": self.client_id, "client_secret": self.client_secret}
        try:
            response = self.http.post(meta["token_endpoint"], data=form, headers=headers)
        except httpx.HTTPError as exc:
            raise RemoteError(f"cannot reach the identity provider's token endpoint: "
                              f"{type(exc).__name__}") from exc
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise RemoteError(f"the identity provider's token endpoint answered "
                              f"{response.status_code} without JSON")
        if response.status_code != 200 or "error" in body:
            if 400 <= response.status_code < 500 or "error" in body:
                raise Unauthenticated(f"the identity provider did not accept the login: "
                                      f"{str(body.get('error', response.status_code))[:100]}")
            raise RemoteError(f"the identity provider's token endpoint answered "
                              f"{response.status_code}")
        return body

    def validate_id_token(self, id_token: object, nonce: str,
                          access_token: object = None) -> dict[str, Any]:
        """The ID token's claims once signature, issuer, audience, expiry and nonce hold."""
        if not isinstance(id_token, str) or not id_token:
            raise Unauthenticated("the identity provider sent no ID token")
        meta = self.metadata()
        offered = meta.get("id_token_signing_alg_values_supported") or ["RS256"]
        algorithms = [a for a in offered if a in _SIGNING] or ["RS256"]
        try:
            try:
                token = jwt.decode(id_token, self.keys(), algorithms=algorithms)
            except InvalidKeyIdError:
                token = jwt.decode(id_token, self.keys(refresh=True), algorithms=algorithms)
            params: dict[str, Any] = {"nonce": nonce, "client_id": self.client_id}
            if isinstance(access_token, str):
                params["access_token"] = access_token
            claims = CodeIDToken(token.claims, token.header, {
                "iss": {"essential": True, "value": meta["issuer"]},
                "aud": {"essential": True, "value": self.client_id},
                "sub": {"essential": True},
            }, params)
            claims.validate(leeway=_LEEWAY)
        except JoseError as exc:
            why = f"{exc.error}: {exc.description}" if exc.description else exc.error
            raise Unauthenticated(f"the identity provider's ID token is not valid ({why})") \
                from exc
        except (ValueError, TypeError) as exc:
            raise Unauthenticated(f"the identity provider's ID token is not valid ({exc})") \
                from exc
        return dict(claims)
