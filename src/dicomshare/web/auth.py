"""Browser login under ``/api``: password login, logout, who-am-I, OpenID Connect.

A login sets two cookies, both ``SameSite=Strict`` (and ``Secure`` unless
``DICOMSHARE_SECURE_COOKIES=false``):

* ``dicomshare_session``: the session secret, ``HttpOnly`` so no script can read it;
* ``dicomshare_csrf``: the CSRF token, readable by the front end, which sends it back
  in ``X-CSRF-Token`` on every POST, PUT, PATCH and DELETE. The login's JSON answer
  carries it too; the cookie is how a reloaded page (or one reached through OpenID
  Connect) finds it again.

``session_principal`` is what ``principal(request)`` in web/app.py asks when a request
has no ``Authorization`` header. See docs/login.md.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import threading
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from dicomshare.access.oidc import STATE_SECONDS, OidcClient, OidcIdentity
from dicomshare.access.policy import Principal
from dicomshare.access.sessions import LoginRefused, SessionInfo, Sessions, TooManyAttempts
from dicomshare.config import Settings
from dicomshare.errors import (
    DicomshareError,
    Forbidden,
    InvalidInput,
    PayloadTooLarge,
    Unauthenticated,
    UnsupportedMediaType,
)

__all__ = ["CSRF_COOKIE", "CSRF_HEADER", "SESSION_COOKIE", "router", "session_principal",
           "sessions_of"]

router = APIRouter(tags=["login"])

SESSION_COOKIE = "dicomshare_session"
CSRF_COOKIE = "dicomshare_csrf"
CSRF_HEADER = "X-CSRF-Token"
OIDC_COOKIE = "dicomshare_oidc"
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
MAX_LOGIN_BODY = 4096
_state_lock = threading.Lock()


# -- shared pieces ---------------------------------------------------------------------------
def sessions_of(app: FastAPI) -> Sessions:
    """The app's Sessions (made by create_app)."""
    sessions: Sessions = app.state.sessions
    return sessions


def oidc_of(app: FastAPI) -> OidcClient:
    """The configured provider's client; NotFound (404) when OpenID Connect is off."""
    found = getattr(app.state, "oidc", None)
    if found is not None:
        return found
    with _state_lock:
        found = getattr(app.state, "oidc", None)
        if found is None:
            found = OidcClient(app.state.settings)  # raises NotFound when not configured
            app.state.oidc = found
            hooks = getattr(app.state, "shutdown_hooks", None)
            if hooks is not None:
                hooks.append(found.http.close)
    return found


def client_source(request: Request) -> str | None:
    """The client's address (uvicorn applies X-Forwarded-For from trusted proxies)."""
    return request.client.host if request.client else None


def session_principal(request: Request) -> Principal | None:
    """The caller a ``dicomshare_session`` cookie stands for, or None (no cookie, or an
    unknown, expired or revoked session, or a disabled user).

    A cookie is sent by the browser whoever made the page that sends the request, so an
    unsafe method also needs the session's CSRF token in ``X-CSRF-Token``: Forbidden
    otherwise. Bearer tokens need no such check; call this only without one.
    """
    secret = request.cookies.get(SESSION_COOKIE)
    if not secret:
        return None
    sessions = sessions_of(request.app)
    if request.method.upper() in UNSAFE_METHODS:
        who, csrf_ok = sessions.authenticate_with_csrf(secret, request.headers.get(CSRF_HEADER))
        if who is not None and not csrf_ok:
            raise Forbidden("missing or wrong CSRF token")
    else:
        who = sessions.authenticate(secret)
    return None if who is None else who.with_source(client_source(request))


def _caller(request: Request) -> Principal:
    """Bearer token or session: what principal() does once web/app.py asks sessions."""
    from dicomshare.web.app import principal

    if not request.headers.get("authorization"):
        who = session_principal(request)
        if who is not None:
            return who
    return principal(request)


def _audit(request: Request, action: str, outcome: str, *, principal: Principal | None = None,
           user_name: str | None = None, source: str | None = None, **details: Any) -> None:
    """Record an audit event once access/audit.py is wired in (app.state.audit); until
    then, nothing. Blocks until the record is durable."""
    audit = getattr(request.app.state, "audit", None)
    if audit is None or importlib.util.find_spec("dicomshare.access.audit") is None:
        return
    event_cls = importlib.import_module("dicomshare.access.audit").AuditEvent
    kwargs: dict[str, Any] = {"action": action, "outcome": outcome, "principal": principal,
                              "user_name": user_name, "source": source}
    if details and "details" in inspect.signature(event_cls).parameters:
        kwargs["details"] = details
    audit.record(event_cls(**kwargs), wait=True)


def _error(status: int, reason: str, headers: dict[str, str] | None = None) -> Response:
    from dicomshare.web.app import error_response

    return error_response(status, reason, headers)


def _set_session_cookies(response: Response, settings: Settings, info: SessionInfo) -> None:
    max_age = max(0, int((info.expires_at - datetime.now(UTC)).total_seconds()))
    response.set_cookie(SESSION_COOKIE, info.secret, max_age=max_age, path="/",
                        secure=settings.secure_cookies, httponly=True, samesite="strict")
    response.set_cookie(CSRF_COOKIE, info.csrf_token, max_age=max_age, path="/",
                        secure=settings.secure_cookies, httponly=False, samesite="strict")
    response.headers["Cache-Control"] = "no-store"


def _clear_session_cookies(response: Response, settings: Settings) -> None:
    response.delete_cookie(SESSION_COOKIE, path="/", secure=settings.secure_cookies,
                           httponly=True, samesite="strict")
    response.delete_cookie(CSRF_COOKIE, path="/", secure=settings.secure_cookies,
                           httponly=False, samesite="strict")


# -- password login --------------------------------------------------------------------------
class LoginRequest(BaseModel):
    username: str = Field(min_length=1, max_length=200)
    password: str = Field(min_length=1, max_length=1000)


class LoginResponse(BaseModel):
    user: str
    organisation: str
    role: str
    superuser: bool
    csrf_token: str = Field(description=f"send it back in {CSRF_HEADER} on unsafe requests")
    expires_at: datetime


class MeResponse(BaseModel):
    user: str
    organisation: str
    role: str
    superuser: bool
    kind: str = Field(description="token or session")
    scopes: list[str]
    expires_at: datetime | None = Field(None, description="when the session ends")


async def _read_login(request: Request) -> tuple[str, str]:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        # Also what keeps a cross-site HTML form from logging a browser in (login CSRF).
        raise UnsupportedMediaType("send the login as application/json")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_LOGIN_BODY:
            raise PayloadTooLarge(f"a login body has at most {MAX_LOGIN_BODY} bytes")
    try:
        data = json.loads(body)
    except ValueError:
        raise InvalidInput("the login body is not valid JSON") from None
    try:
        login = LoginRequest.model_validate(data)
    except ValueError:
        raise InvalidInput('the login body must be {"username": "...", "password": "..."} '
                           'with a name of at most 200 and a password of at most 1000 '
                           'characters') from None
    return login.username, login.password


@router.post("/login", response_model=LoginResponse, openapi_extra={"requestBody": {
    "required": True,
    "content": {"application/json": {"schema": LoginRequest.model_json_schema()}}}},
    responses={401: {"description": "wrong user name or password"},
               429: {"description": "user name locked or address throttled; see Retry-After"}})
async def login(request: Request) -> Response:
    """Log in with a password: sets the session and CSRF cookies."""
    settings: Settings = request.app.state.settings
    name, password = await _read_login(request)
    source = client_source(request)
    sessions = sessions_of(request.app)
    try:
        info = await run_in_threadpool(sessions.login_info, name, password, source)
    except TooManyAttempts as exc:
        await run_in_threadpool(_audit, request, "login", "denied", user_name=name,
                                source=source, reason=exc.reason)
        return _error(exc.http_status, exc.reason, {"Retry-After": str(exc.retry_after)})
    except LoginRefused as exc:
        await run_in_threadpool(_audit, request, "login", "failure", user_name=name,
                                source=source)
        return _error(exc.http_status, exc.reason,
                      {"WWW-Authenticate": 'Bearer realm="dicomshare"'})
    await run_in_threadpool(_audit, request, "login", "success", principal=info.principal,
                            user_name=info.principal.user, source=source, method="password")
    who = info.principal
    response = JSONResponse(LoginResponse(
        user=who.user, organisation=who.organisation, role=who.role, superuser=who.superuser,
        csrf_token=info.csrf_token, expires_at=info.expires_at).model_dump(mode="json"))
    _set_session_cookies(response, settings, info)
    return response


@router.post("/logout", status_code=204, response_class=Response,
             responses={403: {"description": "missing or wrong CSRF token"}})
def logout(request: Request) -> Response:
    """End this browser's session (needs the session cookie and X-CSRF-Token)."""
    settings: Settings = request.app.state.settings
    secret = request.cookies.get(SESSION_COOKIE)
    if not secret:
        raise Unauthenticated("there is no session to log out of")
    sessions = sessions_of(request.app)
    who, csrf_ok = sessions.authenticate_with_csrf(secret, request.headers.get(CSRF_HEADER))
    if who is not None:  # a dead session needs no CSRF check: there is nothing to end
        if not csrf_ok:
            raise Forbidden("missing or wrong CSRF token")
        sessions.logout(secret)
        _audit(request, "logout", "success", principal=who, user_name=who.user,
               source=client_source(request))
    response = Response(status_code=204)
    _clear_session_cookies(response, settings)
    return response


@router.get("/me", response_model=MeResponse)
def me(request: Request) -> MeResponse:
    """Who the caller is, by bearer token or session."""
    who = _caller(request)
    expires = None
    if who.kind == "session":
        expires = sessions_of(request.app).expires_at(request.cookies.get(SESSION_COOKIE, ""))
    return MeResponse(user=who.user, organisation=who.organisation, role=who.role,
                      superuser=who.superuser, kind=who.kind, scopes=sorted(who.scopes),
                      expires_at=expires)


# -- OpenID Connect --------------------------------------------------------------------------
NextPath = Annotated[str | None, Query(description="local path to go to after login")]


def _redirect_uri(request: Request) -> str:
    """``<public_url>/api/oidc/callback``, or from the request when public_url is unset."""
    url = request.url_for("oidc_callback")
    public = request.app.state.settings.public_url.rstrip("/")
    return f"{public}{url.path}" if public else str(url)


def _oidc_cookie_path(request: Request) -> str:
    return request.url_for("oidc_callback").path.rsplit("/", 1)[0] or "/"


@router.get("/oidc/login", status_code=302, response_class=RedirectResponse,
            responses={404: {"description": "OpenID Connect is not configured"}})
def oidc_login(request: Request, next: NextPath = None) -> Response:
    """Send the browser to the identity provider (authorization code flow with PKCE)."""
    settings: Settings = request.app.state.settings
    url, sealed = oidc_of(request.app).begin(_redirect_uri(request), next)
    response = RedirectResponse(url, status_code=302, headers={"Cache-Control": "no-store"})
    # Lax, not Strict: the callback arrives as a navigation from the provider's site.
    response.set_cookie(OIDC_COOKIE, sealed, max_age=STATE_SECONDS,
                        path=_oidc_cookie_path(request), secure=settings.secure_cookies,
                        httponly=True, samesite="lax")
    return response


@router.get("/oidc/callback", name="oidc_callback", status_code=303,
            response_class=RedirectResponse,
            responses={404: {"description": "OpenID Connect is not configured"}})
def oidc_callback(request: Request, state: str | None = None, code: str | None = None,
                  error: str | None = None, error_description: str | None = None) -> Response:
    """Where the provider sends the browser back: sets the session and CSRF cookies and
    redirects to the page the login started from."""
    settings: Settings = request.app.state.settings
    client = oidc_of(request.app)
    source = client_source(request)
    identity: OidcIdentity | None = None
    try:
        identity = client.finish(request.cookies.get(OIDC_COOKIE), state, code, error,
                                 error_description)
        info = sessions_of(request.app).login_external_info(identity.subject,
                                                            identity.username, source)
    except DicomshareError as exc:
        _audit(request, "login", "denied" if isinstance(exc, Forbidden) else "failure",
               user_name=identity.username if identity else None, source=source,
               method="oidc", reason=exc.reason)
        failed = _error(exc.http_status, exc.reason)
        failed.delete_cookie(OIDC_COOKIE, path=_oidc_cookie_path(request),
                             secure=settings.secure_cookies, httponly=True, samesite="lax")
        return failed
    _audit(request, "login", "success", principal=info.principal,
           user_name=info.principal.user, source=source, method="oidc",
           subject=identity.subject)
    response = RedirectResponse(identity.next, status_code=303)
    _set_session_cookies(response, settings, info)
    response.delete_cookie(OIDC_COOKIE, path=_oidc_cookie_path(request),
                           secure=settings.secure_cookies, httponly=True, samesite="lax")
    return response
