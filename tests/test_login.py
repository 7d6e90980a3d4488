"""Browser login: sessions, CSRF, lockout and throttling, OpenID Connect.

Each test serves ``create_app`` in this process (uvicorn in a thread, a real socket) so
it can set the clock of a session in the database. Until web/app.py includes the login
router, the helper includes it and answers the probe route like principal() will; once
it is wired, the same tests run against the real wiring, and ``test_wired_server`` checks
the server process too.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
import requests
import uvicorn
from fastapi import FastAPI, Request
from sqlalchemy import select, update
from sqlalchemy.engine import Engine
from starlette.routing import NoMatchFound

from conftest import free_port, make_file, make_server
from dicomshare.access.identity import Identities
from dicomshare.access.sessions import LoginRefused, Sessions, TooManyAttempts
from dicomshare.config import Settings
from dicomshare.errors import Forbidden
from dicomshare.storage import make_engine, migrate
from dicomshare.storage import schema as s
from oidc_provider import TAMPERING, Provider

PASSWORD = "correct horse battery"


@dataclass
class Served:
    url: str
    app: FastAPI
    settings: Settings
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def engine(self) -> Engine:
        return self.app.state.archive.index.engine

    @property
    def identities(self) -> Identities:
        return self.app.state.identities

    def add_user(self, name: str, role: str = "clinician", password: str | None = PASSWORD,
                 organisation: str = "test") -> None:
        self.identities.create_user(name, organisation, role, password)

    def login(self, name: str, password: str = PASSWORD,
              http: requests.Session | None = None) -> requests.Response:
        return (http or requests.Session()).post(
            f"{self.url}/api/login", json={"username": name, "password": password},
            timeout=30)


def _wired(app: FastAPI) -> bool:
    """Whether create_app includes the login router (FastAPI may include routers lazily,
    so ask the router for a route by name rather than scan app.routes)."""
    try:
        return app.url_path_for("oidc_callback") == "/api/oidc/callback"
    except NoMatchFound:
        return False


def _probe_principal(request: Request) -> Any:
    """principal(request) as web/app.py has it, or as it will once sessions are wired."""
    from dicomshare.web import app as app_module
    from dicomshare.web import auth

    if request.app.state.login_included_by_test:
        return auth._caller(request)
    return app_module.principal(request)


def serve(tmp_path: Path, **overrides: Any) -> Served:
    from dicomshare.web import auth
    from dicomshare.web.app import create_app

    port = free_port()
    values: dict[str, Any] = {"data_dir": tmp_path / "data", "secure_cookies": False,
                              "fsync": False, "dicom_port": 0, **overrides}
    if values.get("oidc_issuer") and "public_url" not in values:
        values["public_url"] = f"http://127.0.0.1:{port}"
    settings = Settings(**values)
    app = create_app(settings)
    app.state.login_included_by_test = not _wired(app)
    if app.state.login_included_by_test:
        app.include_router(auth.router, prefix="/api")

    @app.api_route("/probe", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    def probe(request: Request) -> dict[str, str]:
        who = _probe_principal(request)
        return {"user": who.user, "kind": who.kind}

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "app did not start"
        time.sleep(0.02)
    return Served(f"http://127.0.0.1:{port}", app, settings, server, thread)


def stop(served: Served) -> None:
    served.server.should_exit = True
    served.thread.join(timeout=10)
    served.app.state.archive.close()


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Served]:
    served = serve(tmp_path, login_max_failures=3, login_max_failures_per_source=100)
    served.add_user("alice")
    served.add_user("bob")
    yield served
    stop(served)


def set_cookies(response: requests.Response) -> list[str]:
    return list(response.raw.headers.getlist("Set-Cookie"))


def cookie_header(response: requests.Response, name: str) -> str:
    found = [c for c in set_cookies(response) if c.startswith(f"{name}=")]
    assert len(found) == 1, set_cookies(response)
    return found[0]


def browser(site: Served, name: str = "alice") -> tuple[requests.Session, str]:
    """A logged-in browser and its CSRF token."""
    http = requests.Session()
    r = site.login(name, http=http)
    assert r.status_code == 200, r.text
    return http, r.json()["csrf_token"]


# -- password login and sessions -------------------------------------------------------------
def test_login_sets_a_strict_httponly_cookie(site: Served) -> None:
    http = requests.Session()
    r = site.login("alice", http=http)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["user"], body["organisation"], body["role"]) == ("alice", "test", "clinician")
    assert len(body["csrf_token"]) >= 40
    expires = datetime.fromisoformat(body["expires_at"])
    assert timedelta(hours=11) < expires - datetime.now(UTC) <= timedelta(hours=12)
    assert r.headers["Cache-Control"] == "no-store"

    cookie = cookie_header(r, "dicomshare_session")
    attrs = [a.strip().lower() for a in cookie.split(";")]
    assert "httponly" in attrs and "samesite=strict" in attrs and "path=/" in attrs
    assert "secure" not in attrs  # DICOMSHARE_SECURE_COOKIES=false
    assert any(a.startswith("max-age=") and 11 * 3600 < int(a[8:]) <= 12 * 3600 for a in attrs)
    csrf = cookie_header(r, "dicomshare_csrf")
    assert csrf.split(";")[0] == f"dicomshare_csrf={body['csrf_token']}"
    assert "httponly" not in csrf.lower()  # the front end reads it after a reload

    # Only digests are stored.
    secret = http.cookies["dicomshare_session"]
    with site.engine.connect() as conn:
        row = conn.execute(select(s.browser_session)).one()
    assert secret not in row.secret_hash and body["csrf_token"] not in row.csrf_hash
    assert row.source == "127.0.0.1"

    me = http.get(f"{site.url}/api/me", timeout=10)
    assert me.status_code == 200, me.text
    assert me.json()["user"] == "alice" and me.json()["kind"] == "session"
    assert me.json()["expires_at"] is not None


def test_secure_flag_when_secure_cookies(tmp_path: Path) -> None:
    served = serve(tmp_path, secure_cookies=True)
    try:
        served.add_user("alice")
        r = served.login("alice")
        assert r.status_code == 200
        for name in ("dicomshare_session", "dicomshare_csrf"):
            attrs = [a.strip().lower() for a in cookie_header(r, name).split(";")]
            assert "secure" in attrs and "samesite=strict" in attrs
    finally:
        stop(served)


def test_me_with_a_bearer_token(site: Served) -> None:
    _, token = site.identities.create_token("bob")
    r = requests.get(f"{site.url}/api/me", headers={"Authorization": f"Bearer {token}"},
                     timeout=10)
    assert r.status_code == 200, r.text
    assert r.json()["user"] == "bob" and r.json()["kind"] == "token"
    assert r.json()["expires_at"] is None
    assert requests.get(f"{site.url}/api/me", timeout=10).status_code == 401


def test_unsafe_methods_need_the_csrf_token(site: Served) -> None:
    http, csrf = browser(site)
    assert http.get(f"{site.url}/probe", timeout=10).json() == {"user": "alice",
                                                               "kind": "session"}
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        missing = http.request(method, f"{site.url}/probe", timeout=10)
        assert missing.status_code == 403, (method, missing.text)
        assert "CSRF" in missing.json()["error"]
        wrong = http.request(method, f"{site.url}/probe",
                             headers={"X-CSRF-Token": csrf[:-2] + "xx"}, timeout=10)
        assert wrong.status_code == 403
        right = http.request(method, f"{site.url}/probe", headers={"X-CSRF-Token": csrf},
                             timeout=10)
        assert right.status_code == 200, right.text
    # Another session's token does not do.
    _, other_csrf = browser(site, "bob")
    r = http.post(f"{site.url}/probe", headers={"X-CSRF-Token": other_csrf}, timeout=10)
    assert r.status_code == 403


def test_logout_revokes_the_session(site: Served) -> None:
    http, csrf = browser(site)
    stolen = str(http.cookies["dicomshare_session"])
    assert http.post(f"{site.url}/api/logout", timeout=10).status_code == 403
    r = http.post(f"{site.url}/api/logout", headers={"X-CSRF-Token": csrf}, timeout=10)
    assert r.status_code == 204
    cleared = cookie_header(r, "dicomshare_session").lower()
    assert "max-age=0" in cleared or "expires=thu, 01 jan 1970" in cleared
    assert "dicomshare_session" not in http.cookies
    # The old cookie, replayed, is dead.
    replay = requests.get(f"{site.url}/api/me", cookies={"dicomshare_session": stolen},
                          timeout=10)
    assert replay.status_code == 401
    with site.engine.connect() as conn:
        assert conn.execute(select(s.browser_session.c.revoked_at)).scalar() is not None
    # Logging out without a session at all is an error; of a dead one, a no-op.
    assert requests.post(f"{site.url}/api/logout", timeout=10).status_code == 401
    again = requests.post(f"{site.url}/api/logout", cookies={"dicomshare_session": stolen},
                          timeout=10)
    assert again.status_code == 204


def test_expired_session_is_refused(site: Served) -> None:
    http, _ = browser(site)
    assert http.get(f"{site.url}/api/me", timeout=10).status_code == 200
    with site.engine.begin() as conn:
        conn.execute(update(s.browser_session).values(
            expires_at=datetime.now(UTC) - timedelta(seconds=1)))
    assert http.get(f"{site.url}/api/me", timeout=10).status_code == 401
    assert http.get(f"{site.url}/probe", timeout=10).status_code == 401


def test_unknown_cookie_is_unauthenticated(site: Served) -> None:
    r = requests.get(f"{site.url}/api/me", cookies={"dicomshare_session": "x" * 43},
                     timeout=10)
    assert r.status_code == 401
    r = requests.post(f"{site.url}/probe", cookies={"dicomshare_session": "x" * 43},
                      timeout=10)
    assert r.status_code == 401  # not 403: there is no session to protect


def test_wrong_password_and_unknown_user_look_the_same(site: Served) -> None:
    wrong = site.login("alice", "not the password")
    unknown = site.login("nobody-here", "not the password")
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.content == unknown.content
    assert wrong.json()["error"] == "wrong user name or password"
    for r in (wrong, unknown):
        assert not set_cookies(r)
    with site.engine.connect() as conn:
        rows = conn.execute(select(s.login_failure.c.user_name, s.login_failure.c.source)
                            .order_by(s.login_failure.c.pk)).all()
    assert [tuple(r) for r in rows] == [("alice", "127.0.0.1"), ("nobody-here", "127.0.0.1")]


def test_disabled_user_cannot_log_in_and_loses_sessions(site: Served) -> None:
    http, _ = browser(site, "bob")
    site.identities.update_user("bob", disabled=True)
    assert http.get(f"{site.url}/api/me", timeout=10).status_code == 401
    r = site.login("bob")
    assert r.status_code == 401
    assert r.json()["error"] == "wrong user name or password"
    site.add_user("carol", password=None)  # no password: OpenID Connect only
    assert site.login("carol", "").status_code == 400
    assert site.login("carol", "anything at all").status_code == 401


def test_bad_login_bodies(site: Served) -> None:
    url = f"{site.url}/api/login"
    assert requests.post(url, data="username=alice&password=x", timeout=10,
                         headers={"Content-Type": "application/x-www-form-urlencoded"}
                         ).status_code == 415
    assert requests.post(url, data="{not json", timeout=10,
                         headers={"Content-Type": "application/json"}).status_code == 400
    assert requests.post(url, json={"username": "alice"}, timeout=10).status_code == 400
    assert requests.post(url, json=["alice", PASSWORD], timeout=10).status_code == 400
    assert requests.post(url, json={"username": "alice", "password": 12345678},
                         timeout=10).status_code == 400
    big = requests.post(url, json={"username": "alice", "password": "x" * 5000}, timeout=10)
    assert big.status_code == 413
    with site.engine.connect() as conn:  # none of these counted as a failed login
        assert conn.execute(select(s.login_failure)).first() is None


def test_lockout_after_failures(site: Served) -> None:
    for _ in range(3):
        assert site.login("alice", "wrong password").status_code == 401
    locked = site.login("alice")  # the right password, but locked
    assert locked.status_code == 429, locked.text
    retry = int(locked.headers["Retry-After"])
    assert 0 < retry <= 15 * 60
    assert "try again in" in locked.json()["error"]
    assert not set_cookies(locked)
    # Refusals while locked are not failures: they do not push the lock further out.
    with site.engine.connect() as conn:
        assert len(conn.execute(select(s.login_failure)).all()) == 3
    # Another user is not affected; an unknown name locks just the same.
    assert site.login("bob").status_code == 200
    for _ in range(3):
        assert site.login("ghost", "wrong password").status_code == 401
    assert site.login("ghost", "wrong password").status_code == 429
    # The lock ends when the failures leave the window.
    with site.engine.begin() as conn:
        conn.execute(update(s.login_failure).values(
            at=datetime.now(UTC) - timedelta(minutes=16)))
    assert site.login("alice").status_code == 200


def test_success_resets_the_user_count(site: Served) -> None:
    for _ in range(2):
        assert site.login("alice", "wrong password").status_code == 401
    assert site.login("alice").status_code == 200
    for _ in range(2):
        assert site.login("alice", "wrong password").status_code == 401
    assert site.login("alice").status_code == 200
    with site.engine.connect() as conn:  # the failures stay, as evidence
        assert len(conn.execute(select(s.login_failure)).all()) == 4


def test_source_throttling(tmp_path: Path) -> None:
    served = serve(tmp_path, login_max_failures=3, login_max_failures_per_source=4)
    try:
        served.add_user("alice")
        for name in ("u1", "u2", "u3", "alice"):
            assert served.login(name, "wrong password").status_code == 401
        throttled = served.login("alice")
        assert throttled.status_code == 429
        assert "address" in throttled.json()["error"]
        assert 0 < int(throttled.headers["Retry-After"]) <= 15 * 60
        assert served.login("fresh-name", "wrong password").status_code == 429
    finally:
        stop(served)


def test_logins_are_audited(site: Served) -> None:
    if getattr(site.app.state, "audit", None) is None:
        pytest.skip("the audit trail is not wired into create_app")
    assert site.login("alice", "wrong password").status_code == 401
    for _ in range(2):
        site.login("alice", "wrong password")
    assert site.login("alice").status_code == 429
    http, csrf = browser(site, "bob")
    assert http.post(f"{site.url}/api/logout", headers={"X-CSRF-Token": csrf},
                     timeout=10).status_code == 204
    with site.engine.connect() as conn:
        rows = conn.execute(select(s.audit_event.c.action, s.audit_event.c.outcome,
                                   s.audit_event.c.actor_user, s.audit_event.c.source)
                            .where(s.audit_event.c.action.in_(["login", "logout"]))
                            .order_by(s.audit_event.c.seq)).all()
    assert [tuple(r) for r in rows] == [
        *[("login", "failure", "alice", "127.0.0.1")] * 3,
        ("login", "denied", "alice", "127.0.0.1"),
        ("login", "success", "bob", "127.0.0.1"),
        ("logout", "success", "bob", "127.0.0.1")]


# -- the Sessions object on both databases -----------------------------------------------------
def test_sessions_directly(database_url: str) -> None:
    engine = make_engine(database_url, durable=False)
    migrate(engine)
    try:
        settings = Settings(login_max_failures=2, login_max_failures_per_source=50,
                            session_hours=1)
        identities = Identities(engine)
        identities.create_user("dora", "clinic", "clinician", PASSWORD)
        sessions = Sessions(engine, settings, identities)

        who, secret, csrf = sessions.login("dora", PASSWORD, "10.0.0.1")
        assert who.kind == "session" and who.user == "dora"
        assert sessions.authenticate(secret) == who.with_source(None)
        assert sessions.check_csrf(secret, csrf) and not sessions.check_csrf(secret, "x")
        assert not sessions.check_csrf(secret, None)
        assert sessions.authenticate(secret + "x") is None

        for _ in range(2):
            with pytest.raises(LoginRefused):
                sessions.login("dora", "wrong password", "10.0.0.2")
        with pytest.raises(TooManyAttempts) as locked:
            sessions.login("dora", PASSWORD, "10.0.0.3")
        assert locked.value.http_status == 429 and 0 < locked.value.retry_after <= 900

        assert sessions.revoke_all(who.user_pk or 0) == 1
        assert sessions.authenticate(secret) is None
        assert not sessions.logout(secret)

        # OpenID Connect linking
        identities.create_user("emil", "clinic", "clinician", None)
        emil, s1, _ = sessions.login_external("https://idp|e-1", "emil", None)
        assert emil.user == "emil" and sessions.authenticate(s1) is not None
        assert sessions.login_external("https://idp|e-1", "emil", None)[0].user == "emil"
        with pytest.raises(Forbidden):  # the account is linked to another identity
            sessions.login_external("https://idp|e-2", "emil", None)
        with pytest.raises(Forbidden):  # this identity is linked to another account
            sessions.login_external("https://idp|e-1", "dora", None)
        with pytest.raises(Forbidden):  # accounts are made by administrators
            sessions.login_external("https://idp|z-9", "zoe", None)
        identities.update_user("emil", disabled=True)
        with pytest.raises(Forbidden):
            sessions.login_external("https://idp|e-1", "emil", None)
        assert sessions.authenticate(s1) is None

        # Old failures are pruned.
        with engine.begin() as conn:
            conn.execute(update(s.login_failure).values(
                at=datetime.now(UTC) - timedelta(days=2)))
        sessions.prune()
        with engine.connect() as conn:
            assert conn.execute(select(s.login_failure)).first() is None
    finally:
        engine.dispose()


def test_parallel_guesses_stay_within_the_limit(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'index.db'}", durable=False)
    migrate(engine)
    try:
        settings = Settings(login_max_failures=3, login_max_failures_per_source=1000)
        identities = Identities(engine)
        identities.create_user("dora", "clinic", "clinician", PASSWORD)
        sessions = Sessions(engine, settings, identities)
        outcomes: list[str] = []

        def guess(i: int) -> None:
            try:
                sessions.login("dora", f"guess {i}", "10.0.0.9")
            except TooManyAttempts:
                outcomes.append("locked")
            except LoginRefused:
                outcomes.append("refused")

        threads = [threading.Thread(target=guess, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert outcomes.count("refused") <= 3 and len(outcomes) == 12
    finally:
        engine.dispose()


# -- OpenID Connect ----------------------------------------------------------------------------
@pytest.fixture
def provider() -> Iterator[Provider]:
    p = Provider(free_port()).start()
    yield p
    p.stop()


@pytest.fixture
def oidc_site(tmp_path: Path, provider: Provider) -> Iterator[Served]:
    served = serve(tmp_path, oidc_issuer=provider.url, oidc_client_id=provider.client_id,
                   oidc_client_secret=provider.client_secret)
    provider.redirect_uris.add(f"{served.url}/api/oidc/callback")
    served.add_user("alice", password=None)
    yield served
    stop(served)


def oidc_flow(site: Served, http: requests.Session,
              next_path: str | None = "/studies") -> tuple[requests.Response, str]:
    """Follow the redirects like a browser; (the callback's answer, the callback URL)."""
    params = {"next": next_path} if next_path is not None else {}
    start = http.get(f"{site.url}/api/oidc/login", params=params, allow_redirects=False,
                     timeout=10)
    assert start.status_code == 302, start.text
    login_cookie = cookie_header(start, "dicomshare_oidc").lower()
    assert "httponly" in login_cookie and "samesite=lax" in login_cookie
    assert "path=/api/oidc" in login_cookie
    authorize = start.headers["Location"]
    query = parse_qs(urlparse(authorize).query)
    assert query["code_challenge_method"] == ["S256"] and query["code_challenge"]
    assert query["redirect_uri"] == [f"{site.url}/api/oidc/callback"]
    for secret in ("state", "nonce"):  # the cookie is sealed: nothing in it is readable
        assert query[secret][0] not in login_cookie
    at_provider = http.get(authorize, allow_redirects=False, timeout=10)
    assert at_provider.status_code == 302, at_provider.text
    callback = at_provider.headers["Location"]
    assert callback.startswith(f"{site.url}/api/oidc/callback?")
    return http.get(callback, allow_redirects=False, timeout=10), callback


def test_oidc_login_end_to_end(oidc_site: Served, provider: Provider) -> None:
    http = requests.Session()
    done, _ = oidc_flow(oidc_site, http)
    assert done.status_code == 303, done.text
    assert done.headers["Location"] == "/studies"
    attrs = [a.strip().lower() for a in cookie_header(done, "dicomshare_session").split(";")]
    assert "httponly" in attrs and "samesite=strict" in attrs
    assert "dicomshare_oidc" not in http.cookies  # the login cookie is spent
    me = http.get(f"{oidc_site.url}/api/me", timeout=10)
    assert me.status_code == 200 and me.json()["user"] == "alice"
    assert provider.token_calls == ["client_secret_basic"]
    with oidc_site.engine.connect() as conn:
        linked = conn.execute(select(s.user.c.oidc_subject)
                              .where(s.user.c.name == "alice")).scalar()
    assert linked == f"{provider.url}|{provider.sub}"
    # CSRF works as for a password login, with the token from the cookie.
    csrf = str(http.cookies["dicomshare_csrf"])
    assert http.post(f"{oidc_site.url}/probe", timeout=10).status_code == 403
    assert http.post(f"{oidc_site.url}/probe", headers={"X-CSRF-Token": csrf},
                     timeout=10).status_code == 200

    # A second login of the same identity, after the provider rotated its key.
    provider.rotate_key()
    again, _ = oidc_flow(oidc_site, requests.Session(), next_path=None)
    assert again.status_code == 303 and again.headers["Location"] == "/"


def test_oidc_client_secret_post(tmp_path: Path) -> None:
    p = Provider(free_port(), auth_method="client_secret_post").start()
    served = serve(tmp_path, oidc_issuer=p.url, oidc_client_id=p.client_id,
                   oidc_client_secret=p.client_secret)
    try:
        p.redirect_uris.add(f"{served.url}/api/oidc/callback")
        served.add_user("alice")
        done, _ = oidc_flow(served, requests.Session())
        assert done.status_code == 303, done.text
        assert p.token_calls == ["client_secret_post"]
    finally:
        stop(served)
        p.stop()


@pytest.mark.parametrize("next_path", ["//evil.example/x", "https://evil.example/",
                                       "/\\evil.example", "relative"])
def test_oidc_next_stays_local(oidc_site: Served, next_path: str) -> None:
    done, _ = oidc_flow(oidc_site, requests.Session(), next_path=next_path)
    assert done.status_code == 303 and done.headers["Location"] == "/"


@pytest.mark.parametrize("tamper", TAMPERING)
def test_oidc_refuses_bad_id_tokens(oidc_site: Served, provider: Provider,
                                    tamper: str) -> None:
    provider.tamper = tamper
    http = requests.Session()
    done, _ = oidc_flow(oidc_site, http)
    assert done.status_code == 401, (tamper, done.text)
    assert "dicomshare_session" not in http.cookies
    assert not [c for c in set_cookies(done) if c.startswith("dicomshare_session=")]
    with oidc_site.engine.connect() as conn:
        assert conn.execute(select(s.browser_session)).first() is None
        assert conn.execute(select(s.user.c.oidc_subject)).scalar() is None


def test_oidc_state_must_match_this_browser(oidc_site: Served) -> None:
    """A callback started by someone else (login CSRF) does not fit this browser's login."""
    attacker = requests.Session()
    start = attacker.get(f"{oidc_site.url}/api/oidc/login", allow_redirects=False, timeout=10)
    callback = attacker.get(start.headers["Location"], allow_redirects=False,
                            timeout=10).headers["Location"]
    victim = requests.Session()
    mine = victim.get(f"{oidc_site.url}/api/oidc/login", allow_redirects=False, timeout=10)
    assert mine.status_code == 302
    r = victim.get(callback, allow_redirects=False, timeout=10)
    assert r.status_code == 400 and "state" in r.json()["error"]
    assert "dicomshare_session" not in victim.cookies


def test_oidc_replayed_state_is_refused(oidc_site: Served, provider: Provider) -> None:
    """The same callback, cookie and all, works once."""
    provider.single_use_codes = False  # so only our own state check can stop the replay
    http = requests.Session()
    start = http.get(f"{oidc_site.url}/api/oidc/login", allow_redirects=False, timeout=10)
    sealed = start.cookies["dicomshare_oidc"]
    callback = http.get(start.headers["Location"], allow_redirects=False,
                        timeout=10).headers["Location"]
    first = http.get(callback, allow_redirects=False, timeout=10)
    assert first.status_code == 303
    replay = requests.Session()
    replay.cookies.set("dicomshare_oidc", sealed, path="/api/oidc")
    second = replay.get(callback, allow_redirects=False, timeout=10)
    assert second.status_code == 400, second.text
    assert "finished already" in second.json()["error"]
    assert "dicomshare_session" not in replay.cookies


def test_oidc_forged_or_missing_login_cookie(oidc_site: Served) -> None:
    http = requests.Session()
    start = http.get(f"{oidc_site.url}/api/oidc/login", allow_redirects=False, timeout=10)
    callback = http.get(start.headers["Location"], allow_redirects=False,
                        timeout=10).headers["Location"]
    bare = requests.get(callback, allow_redirects=False, timeout=10)
    assert bare.status_code == 400 and "no login in progress" in bare.json()["error"]
    forged = requests.get(callback, allow_redirects=False, timeout=10,
                          cookies={"dicomshare_oidc": str(start.cookies["dicomshare_oidc"])[:-3]
                                   + "AAA"})
    assert forged.status_code == 400


def test_oidc_unknown_or_conflicting_user(oidc_site: Served, provider: Provider) -> None:
    provider.username = "mallory"  # no such local account
    http = requests.Session()
    done, _ = oidc_flow(oidc_site, http)
    assert done.status_code == 403 and "no local account" in done.json()["error"]
    assert "dicomshare_session" not in http.cookies

    # alice is linked to her subject; another subject claiming "alice" is refused.
    provider.username = "alice"
    assert oidc_flow(oidc_site, requests.Session())[0].status_code == 303
    provider.sub = "someone-else"
    done, _ = oidc_flow(oidc_site, requests.Session())
    assert done.status_code == 403 and "linked to another identity" in done.json()["error"]


def test_oidc_provider_denies(oidc_site: Served, provider: Provider) -> None:
    provider.deny = True
    done, _ = oidc_flow(oidc_site, requests.Session())
    assert done.status_code == 401 and "access_denied" in done.json()["error"]


def test_oidc_not_configured(site: Served) -> None:
    for path in ("/api/oidc/login", "/api/oidc/callback?state=x&code=y"):
        r = requests.get(f"{site.url}{path}", allow_redirects=False, timeout=10)
        assert r.status_code == 404
        assert r.json()["error"] == "OpenID Connect is not configured"


# -- the wired server process ------------------------------------------------------------------
def test_wired_server(tmp_path: Path) -> None:
    """The server process as `dicomshare serve` runs it (skips until app.py is wired)."""
    from dicomshare.web.app import create_app

    probe = create_app(Settings(data_dir=tmp_path / "probe", fsync=False))
    wired = _wired(probe)
    probe.state.archive.close()
    if not wired:
        pytest.skip("web/app.py does not include the login router yet")
    server = make_server(tmp_path, env={"DICOMSHARE_SECURE_COOKIES": "false",
                                        "DICOMSHARE_DICOM_PORT": "0"})
    try:
        http = requests.Session()
        r = http.post(f"{server.url}/api/login",
                      json={"username": "tester", "password": PASSWORD}, timeout=30)
        assert r.status_code == 200, r.text
        csrf = r.json()["csrf_token"]
        assert http.get(f"{server.url}/api/me", timeout=10).json()["kind"] == "session"
        assert http.get(f"{server.dicomweb}/studies", timeout=10).status_code in (200, 204)
        body = make_file(tmp_path / "in").read_bytes()
        boundary = "B0undary"
        payload = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + body
                   + f"\r\n--{boundary}--\r\n".encode())
        headers = {"Content-Type": f'multipart/related; type="application/dicom"; '
                                   f'boundary={boundary}'}
        no_csrf = http.post(f"{server.dicomweb}/studies", data=payload, headers=headers,
                            timeout=30)
        assert no_csrf.status_code == 403, no_csrf.text
        stored = http.post(f"{server.dicomweb}/studies", data=payload,
                           headers={**headers, "X-CSRF-Token": csrf}, timeout=30)
        assert stored.status_code == 200, stored.text
        out = http.post(f"{server.url}/api/logout", headers={"X-CSRF-Token": csrf}, timeout=10)
        assert out.status_code == 204
        assert requests.get(f"{server.url}/api/me", timeout=10,
                            cookies={"dicomshare_session": str(r.cookies["dicomshare_session"])}
                            ).status_code == 401
    finally:
        server.stop()
