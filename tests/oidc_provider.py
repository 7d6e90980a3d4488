"""A small, real OpenID Connect provider for the login tests.

It speaks the authorization code flow with PKCE over HTTP like a hospital's provider
would: discovery, JWKS (an RSA key made at start), ``/authorize`` (approves the
configured user at once and redirects back with a code) and ``/token`` (checks the code,
the redirect URI, the PKCE verifier and the client's credentials, then signs an ID token).
``tamper`` makes it misbehave in one way, so the tests can see the client refuse it.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote_plus, urlencode

import uvicorn
from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

TAMPERING = ("signature", "audience", "nonce", "no-nonce", "issuer", "expired", "at-hash",
             "no-username")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _new_key() -> RSAKey:
    return RSAKey.generate_key(2048, parameters={"kid": secrets.token_hex(4), "use": "sig",
                                                 "alg": "RS256"})


@dataclass
class Provider:
    """Start with :meth:`start`; ``url`` is the issuer."""

    port: int
    client_id: str = "dicomshare"
    client_secret: str = "provider-secret"
    username: str = "alice"
    sub: str = "alice-0001"
    auth_method: str = "client_secret_basic"  # or client_secret_post
    redirect_uris: set[str] = field(default_factory=set)
    tamper: str | None = None  # one of TAMPERING
    deny: bool = False  # answer /authorize with error=access_denied
    single_use_codes: bool = True
    key: RSAKey = field(default_factory=_new_key)
    codes: dict[str, dict[str, Any]] = field(default_factory=dict)
    token_calls: list[str] = field(default_factory=list)  # auth method of each /token call
    _server: uvicorn.Server | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rotate_key(self) -> None:
        self.key = _new_key()

    # -- endpoints -----------------------------------------------------------------------
    async def discovery(self, _request: Request) -> Response:
        return JSONResponse({
            "issuer": self.url,
            "authorization_endpoint": f"{self.url}/authorize",
            "token_endpoint": f"{self.url}/token",
            "jwks_uri": f"{self.url}/jwks",
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "token_endpoint_auth_methods_supported": [self.auth_method],
            "code_challenge_methods_supported": ["S256"],
            "scopes_supported": ["openid", "profile", "email"],
        })

    async def jwks(self, _request: Request) -> Response:
        return JSONResponse(KeySet([self.key]).as_dict(private=False))

    async def authorize(self, request: Request) -> Response:
        q = request.query_params
        if q.get("client_id") != self.client_id:
            return PlainTextResponse("unknown client", status_code=400)
        redirect_uri = q.get("redirect_uri", "")
        if redirect_uri not in self.redirect_uris:
            return PlainTextResponse(f"unregistered redirect_uri {redirect_uri}", 400)
        state = q.get("state", "")
        if self.deny:
            return self._back(redirect_uri, error="access_denied", state=state)
        problems = []
        if q.get("response_type") != "code":
            problems.append("response_type")
        if "openid" not in q.get("scope", "").split():
            problems.append("scope")
        if q.get("code_challenge_method") != "S256" or not q.get("code_challenge"):
            problems.append("pkce")
        if problems:
            return self._back(redirect_uri, error="invalid_request",
                              error_description=",".join(problems), state=state)
        code = secrets.token_urlsafe(24)
        self.codes[code] = {"redirect_uri": redirect_uri, "nonce": q.get("nonce"),
                            "challenge": q["code_challenge"], "used": False,
                            "username": self.username, "sub": self.sub}
        return self._back(redirect_uri, code=code, state=state)

    @staticmethod
    def _back(redirect_uri: str, **params: str) -> Response:
        return RedirectResponse(f"{redirect_uri}?{urlencode(params)}", status_code=302)

    async def token(self, request: Request) -> Response:
        # Parsed by hand: starlette's form parser needs python-multipart.
        form = {k: v[0] for k, v in parse_qs((await request.body()).decode()).items()}
        header = request.headers.get("authorization", "")
        if header.lower().startswith("basic "):
            method = "client_secret_basic"
            pair = base64.b64decode(header[6:]).decode()
            client_id, _, secret = pair.partition(":")
            client_id, secret = unquote_plus(client_id), unquote_plus(secret)
        else:
            method = "client_secret_post"
            client_id, secret = str(form.get("client_id", "")), str(form.get("client_secret", ""))
        self.token_calls.append(method)
        if method != self.auth_method or client_id != self.client_id \
                or not secrets.compare_digest(secret, self.client_secret):
            return JSONResponse({"error": "invalid_client"}, status_code=401)
        grant = self.codes.get(str(form.get("code", "")))
        if form.get("grant_type") != "authorization_code" or grant is None \
                or (grant["used"] and self.single_use_codes) \
                or form.get("redirect_uri") != grant["redirect_uri"]:
            return JSONResponse({"error": "invalid_grant"}, status_code=400)
        verifier = str(form.get("code_verifier", ""))
        if _b64(hashlib.sha256(verifier.encode()).digest()) != grant["challenge"]:
            return JSONResponse({"error": "invalid_grant",
                                 "error_description": "PKCE verifier"}, status_code=400)
        grant["used"] = True
        access_token = secrets.token_urlsafe(32)
        return JSONResponse({"access_token": access_token, "token_type": "Bearer",
                             "expires_in": 300, "id_token": self.id_token(grant, access_token)},
                            headers={"Cache-Control": "no-store"})

    def id_token(self, grant: dict[str, Any], access_token: str) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.url, "sub": grant["sub"], "aud": self.client_id, "exp": now + 300,
            "iat": now, "nonce": grant["nonce"], "preferred_username": grant["username"],
            "at_hash": _b64(hashlib.sha256(access_token.encode()).digest()[:16])}
        key = self.key
        if self.tamper == "signature":  # same key id, someone else's key
            key = RSAKey.generate_key(2048, parameters={"kid": str(self.key.kid)})
        elif self.tamper == "audience":
            claims["aud"] = "some-other-client"
        elif self.tamper == "nonce":
            claims["nonce"] = "not-the-nonce-we-were-given"
        elif self.tamper == "no-nonce":
            del claims["nonce"]
        elif self.tamper == "at-hash":  # a token that belongs to another access token
            claims["at_hash"] = _b64(hashlib.sha256(b"another token").digest()[:16])
        elif self.tamper == "issuer":
            claims["iss"] = "http://evil.example"
        elif self.tamper == "expired":
            claims["exp"] = now - 3600
            claims["iat"] = now - 7200
        elif self.tamper == "no-username":
            del claims["preferred_username"]
        return jwt.encode({"alg": "RS256", "kid": self.key.kid}, claims, key)

    # -- running -------------------------------------------------------------------------
    def start(self) -> Provider:
        app = Starlette(routes=[
            Route("/.well-known/openid-configuration", self.discovery),
            Route("/jwks", self.jwks),
            Route("/authorize", self.authorize),
            Route("/token", self.token, methods=["POST"]),
        ])
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                     log_level="warning", lifespan="off"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the test OpenID provider did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
