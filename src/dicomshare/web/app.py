"""The HTTP application: authentication, CORS, error mapping, the DICOMweb routes and the
JSON API (``/api``, web/api.py).

Every request under the DICOMweb root and ``/api`` needs ``Authorization: Bearer <token>``;
the only open routes are ``/healthz`` (for load balancers and the test harness) and the
OpenAPI pages. Errors from the project's tree become a status, a JSON body with the
reason, and a ``Warning`` header (PS3.18 8.6.3), never a bare 500.
"""

from __future__ import annotations

import gc
import logging
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.staticfiles import StaticFiles

from dicomshare import __version__
from dicomshare.access.grants import Grants
from dicomshare.access.identity import Identities, Principal
from dicomshare.access.policy import Action, check
from dicomshare.access.service import Access
from dicomshare.access.sessions import Sessions
from dicomshare.archive import Archive
from dicomshare.config import Settings
from dicomshare.errors import DicomshareError, Forbidden, Unauthenticated
from dicomshare.research.exports import Exports
from dicomshare.research.projects import Projects

if TYPE_CHECKING:
    from dicomshare.access.audit import AuditLog

log = logging.getLogger(__name__)


def error_response(status: int, reason: str, headers: dict[str, str] | None = None) -> Response:
    safe = reason.replace("\r", " ").replace("\n", " ")[:500]
    all_headers = {"Warning": f'299 dicomshare "{safe}"', **(headers or {})}
    return JSONResponse({"error": reason, "status": status}, status_code=status,
                        headers=all_headers)


def create_app(settings: Settings, archive: Archive | None = None) -> FastAPI:
    # The event loop shares the GIL with ingest threads parsing headers; a shorter switch
    # interval (default 5 ms) lets it answer the network sooner.
    sys.setswitchinterval(0.0005)
    archive = archive or Archive.open(settings)
    identities = Identities(archive.index.engine)
    grants = Grants(archive.index.engine)
    audit = _open_audit(settings, archive)
    shutdown_hooks: list[Callable[[], None]] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from dicomshare.monitoring.worker import start_monitor
        from dicomshare.research.exports import ExportWorker
        from dicomshare.sharing.notify import start_mailer

        worker = ExportWorker(app.state.exports, identities, grants)
        worker.start()
        start_mailer(archive.index.engine, settings)  # e-mails queued notifications
        start_monitor(archive.index.engine, settings,  # webhooks and watchlists
                      app.state.access.audit_log)
        from dicomshare.dimse.scp import serve_in_worker

        dicom = await run_in_threadpool(serve_in_worker, settings, archive, app.state.access)
        from dicomshare.dimse.jobs import TransferWorker  # background send / retrieve

        transfers = app.state.transfers = TransferWorker(archive, app.state.access)
        transfers.start()  # after the SCP: a C-MOVE job needs it to receive
        # What exists now (modules, dictionaries, metadata: ~170,000 objects) lives as long
        # as the process: kept out of the collector, a full collection no longer walks it
        # (~75 ms with the GIL held, every association and request of the process waiting).
        gc.freeze()
        yield
        # Runs before uvicorn re-raises SIGTERM, so services beside the app stop cleanly.
        transfers.stop()
        if dicom is not None:
            dicom.stop()
        worker.stop()
        for hook in shutdown_hooks:
            hook()
        if audit is not None:
            audit.close()

    app = FastAPI(title="dicomshare", version=__version__, lifespan=lifespan,
                  description="Medical-imaging sharing server: DICOMweb (PS3.18) and more.")
    app.state.shutdown_hooks = shutdown_hooks
    app.state.settings = settings
    app.state.archive = archive
    app.state.identities = identities
    app.state.grants = grants
    app.state.sessions = Sessions(archive.index.engine, settings, identities)
    app.state.audit = audit
    app.state.access = Access(archive, grants, audit)
    app.state.exports = Exports(archive, app.state.access, Projects(archive.index.engine))

    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "Accept", "X-CSRF-Token"],
            expose_headers=["Content-Location", "Warning", "Content-Type"],
            allow_credentials=False,
            max_age=3600,
        )

    @app.exception_handler(DicomshareError)
    async def _project_error(_request: Request, exc: DicomshareError) -> Response:
        headers = {"WWW-Authenticate": 'Bearer realm="dicomshare"'} \
            if isinstance(exc, Unauthenticated) else {}
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            headers["Retry-After"] = str(int(retry_after))
        return error_response(exc.http_status, exc.reason, headers or None)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error_response(400, f"invalid request: {where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> Response:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error ({type(exc).__name__}); see the server log")

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "version": __version__}

    from dicomshare.web import (
        access_api,
        api,
        auth,
        consults_api,
        dicomweb,
        fhir_api,
        iid,
        jobs_api,
        links_api,
        monitoring_api,
        pages,
        patients_api,
        research_api,
        share,
        upload,
    )

    app.include_router(auth.router, prefix="/api")
    app.include_router(dicomweb.router, prefix=settings.dicomweb_root)
    app.include_router(api.router, prefix="/api")
    app.include_router(jobs_api.router, prefix="/api")  # /api/jobs: background transfers
    app.include_router(access_api.router, prefix="/api")
    app.include_router(research_api.router, prefix="/api")
    app.include_router(links_api.router, prefix="/api")
    app.include_router(consults_api.router, prefix="/api")
    app.include_router(monitoring_api.router, prefix="/api")
    app.include_router(patients_api.router, prefix="/api")  # docs/patients.md
    app.include_router(upload.router)  # /api/upload-links and the public /upload/{secret}
    app.include_router(share.router)  # the public /share/{secret}
    app.include_router(pages.router)  # the signed-in pages under /app (before /static)
    app.include_router(fhir_api.router, prefix="/fhir")  # FHIR R4 read (docs/fhir.md)
    app.include_router(iid.router)  # /IHEInvokeImageDisplay and /app/patients/{id}
    # Each share link is a DICOMweb root too, restricted to what the link covers.
    app.include_router(dicomweb.router, prefix="/share/{secret}/dicomweb",
                       dependencies=[Depends(share.link_dicomweb)], include_in_schema=False)
    # The pages' scripts and styles (the viewer, the upload page): public, no PHI.
    app.mount("/static", StaticFiles(directory=Path(__file__).parent / "static"),
              name="static")
    return app


def app_from_env() -> FastAPI:
    """Factory for worker processes (``serve --workers N``): settings come from the env."""
    from dicomshare.config import load_settings

    _die_with_parent()
    return create_app(load_settings())


def _die_with_parent() -> None:
    """A worker must not outlive its supervisor: it would keep the port and serve requests
    nobody supervises. The supervisor dying is a crash of the server, so the workers end
    like one (SIGKILL; every acknowledged instance is durable already). Linux only."""
    import ctypes
    import os
    import signal

    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the supervisor died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


def principal(request: Request) -> Principal:
    """The authenticated caller; raises Unauthenticated (401) otherwise."""
    cached = getattr(request.state, "principal", None)
    if cached is not None:
        return cached
    header = request.headers.get("authorization", "")
    if not header:
        from dicomshare.web.auth import session_principal  # lazy: auth imports this module

        by_session = session_principal(request)  # 403 if an unsafe method lacks X-CSRF-Token
        if by_session is not None:
            by_session = by_session.with_source(client_of(request))
            request.state.principal = by_session
            return by_session
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise Unauthenticated("log in, or send a bearer token (Authorization: Bearer <token>)")
    identities: Identities = request.app.state.identities
    found = identities.authenticate(secret.strip())
    if found is None:
        access: Access = request.app.state.access
        access.record("authenticate", None, "denied", user_name=None, details={
            "reason": "unknown, revoked or expired bearer token", "source": client_of(request),
            "path": request.url.path[:200]})
        raise Unauthenticated("the bearer token is unknown, revoked or expired")
    found = found.with_source(client_of(request))
    request.state.principal = found
    return found


def client_of(request: Request) -> str | None:
    return request.client.host if request.client else None


def require(request: Request, action: Action) -> Principal:
    """The caller, when its role and scopes allow ``action`` (refusals are audited)."""
    who = principal(request)
    try:
        check(who, action)
    except Forbidden as exc:
        access: Access = request.app.state.access
        access.record(str(action), who, "denied", details={"reason": exc.reason,
                                                           "path": request.url.path[:200]})
        raise
    return who


def requires(action: Action) -> Callable[[Request], Principal]:
    """A route dependency: the caller, when its role and scopes allow ``action``. Use as
    ``Annotated[Principal, Depends(requires(Action.SHARE))]``."""
    def dependency(request: Request) -> Principal:
        return require(request, action)

    dependency.__name__ = f"requires_{action.name.lower()}"
    return dependency


def _open_audit(settings: Settings, archive: Archive) -> AuditLog | None:
    from dicomshare.access.audit import AuditLog

    return AuditLog.open(settings, archive.index.engine)
