"""/api/webhooks and /api/watchlist (monitoring/): remote monitoring.

- webhooks: an organisation's admins (MANAGE_ORGANISATION) subscribe URLs to events,
  read each delivery and its attempts, and ask for a re-delivery;
- watchlist: a user who may search studies follows patients and is notified of their new
  studies (``GET /api/notifications?kind=watch-new-study``), or follows cohort queries
  (``/api/watchlist/cohorts``) and is notified of new matching studies it may see
  (``kind=watch-cohort-study``).

Another organisation's webhook, another user's watch: 404, exactly like a missing one.
Every change is audited.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from dicomshare.access.policy import Action, Principal
from dicomshare.access.service import Access
from dicomshare.errors import DicomshareError
from dicomshare.monitoring.cohort import CohortWatch, CohortWatchlist
from dicomshare.monitoring.events import EVENTS
from dicomshare.monitoring.watch import Watchlist
from dicomshare.monitoring.webhooks import Webhooks
from dicomshare.monitoring.worker import start_monitor
from dicomshare.sharing.common import app_service
from dicomshare.web.app import requires


def _start_monitor(request: Request) -> None:
    """The monitoring worker of this process (also started by the app's lifespan)."""
    start_monitor(request.app.state.archive.index.engine, request.app.state.settings,
                  request.app.state.access.audit_log)


router = APIRouter(dependencies=[Depends(_start_monitor)])
Admin = Annotated[Principal, Depends(requires(Action.MANAGE_ORGANISATION))]
Searcher = Annotated[Principal, Depends(requires(Action.SEARCH))]


def _webhooks(request: Request) -> Webhooks:
    state = request.app.state
    return app_service(state, "webhooks", lambda: Webhooks(state.archive.index.engine))


def _watchlist(request: Request) -> Watchlist:
    state = request.app.state
    return app_service(state, "watchlist", lambda: Watchlist(state.archive.index.engine))


def _cohorts(request: Request) -> CohortWatchlist:
    state = request.app.state
    return app_service(state, "cohort_watchlist",
                       lambda: CohortWatchlist(state.archive.index.engine))


async def _audit(request: Request, action: str, who: Principal, details: dict[str, Any],
                 outcome: str = "success", patient_ids: tuple[str, ...] = ()) -> None:
    access: Access = request.app.state.access
    await run_in_threadpool(lambda: access.record(action, who, outcome, wait=True,
                                                  patient_ids=patient_ids, details=details))


# -- webhooks ----------------------------------------------------------------------------
class WebhookCreate(BaseModel):
    url: str = Field(min_length=1, max_length=2000)
    events: list[Literal[EVENTS]] = Field(min_length=1, max_length=10)  # type: ignore[valid-type]
    secret: str | None = Field(None, max_length=200)


@router.post("/webhooks", status_code=201)
async def create_webhook(request: Request, body: WebhookCreate, who: Admin) -> dict[str, Any]:
    hooks = _webhooks(request)
    try:
        hook, secret = await run_in_threadpool(hooks.create, who, body.url, list(body.events),
                                               body.secret)
    except DicomshareError as exc:
        await _audit(request, "webhook.create", who, {"reason": exc.reason,
                                                      "url": body.url[:200]}, "denied")
        raise
    await _audit(request, "webhook.create", who, hook.as_json())
    return hook.as_json() | {"secret": secret}


@router.get("/webhooks")
async def list_webhooks(request: Request, who: Admin) -> list[dict[str, Any]]:
    return [h.as_json() for h in await run_in_threadpool(_webhooks(request).listing, who)]


@router.get("/webhooks/{webhook_id}")
async def get_webhook(request: Request, webhook_id: int, who: Admin) -> dict[str, Any]:
    return (await run_in_threadpool(_webhooks(request).get, who, webhook_id)).as_json()


@router.delete("/webhooks/{webhook_id}", status_code=204)
async def delete_webhook(request: Request, webhook_id: int, who: Admin) -> Response:
    hook = await run_in_threadpool(_webhooks(request).delete, who, webhook_id)
    await _audit(request, "webhook.delete", who, hook.as_json())
    return Response(status_code=204)


@router.get("/webhooks/{webhook_id}/deliveries")
async def list_deliveries(
        request: Request, webhook_id: int, who: Admin,
        state: Annotated[Literal["pending", "delivered", "failed"] | None, Query()] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 100) -> list[dict[str, Any]]:
    return await run_in_threadpool(_webhooks(request).deliveries, who, webhook_id, state,
                                   limit)


@router.get("/webhooks/{webhook_id}/deliveries/{delivery_id}")
async def get_delivery(request: Request, webhook_id: int, delivery_id: int,
                       who: Admin) -> dict[str, Any]:
    return await run_in_threadpool(_webhooks(request).delivery, who, webhook_id, delivery_id)


@router.post("/webhooks/{webhook_id}/deliveries/{delivery_id}/redeliver", status_code=202)
async def redeliver(request: Request, webhook_id: int, delivery_id: int,
                    who: Admin) -> dict[str, Any]:
    ids = {"webhook_id": webhook_id, "delivery_id": delivery_id}
    try:
        found = await run_in_threadpool(_webhooks(request).redeliver, who, webhook_id,
                                        delivery_id)
    except DicomshareError as exc:
        await _audit(request, "webhook.redeliver", who, ids | {"reason": exc.reason},
                     "denied")
        raise
    # The attempt itself is audited by the sender (webhook.delivered ...).
    await _audit(request, "webhook.redeliver", who, {"event": found["event"]} | ids)
    return found


# -- watchlist: cohort watches first (/watchlist/{watch_id} would take "cohorts") -------
class CohortWatchCreate(BaseModel):
    query: dict[str, Any] = Field(description="filters: Modality, BodyPartExamined, "
                                  "StudyDescription, PatientSex, min_age, max_age, "
                                  "organisation (docs/monitoring.md)")
    label: str | None = Field(None, max_length=200)


def _cohort_json(request: Request, watches: list[CohortWatch]) -> list[dict[str, Any]]:
    names = _cohorts(request).organisation_names() if any(
        x.query.cohort.organisations for x in watches) else {}
    return [x.as_json(names) for x in watches]


@router.post("/watchlist/cohorts", status_code=201)
async def follow_cohort(request: Request, body: CohortWatchCreate,
                        who: Searcher) -> dict[str, Any]:
    watch = await run_in_threadpool(_cohorts(request).follow, who, body.query, body.label)
    [found] = await run_in_threadpool(_cohort_json, request, [watch])
    await _audit(request, "watch.cohort.create", who, found)
    return found


@router.get("/watchlist/cohorts")
async def list_cohort_watches(request: Request, who: Searcher) -> list[dict[str, Any]]:
    watches = await run_in_threadpool(_cohorts(request).listing, who)
    return await run_in_threadpool(_cohort_json, request, watches)


@router.get("/watchlist/cohorts/{watch_id}")
async def get_cohort_watch(request: Request, watch_id: int, who: Searcher) -> dict[str, Any]:
    watch = await run_in_threadpool(_cohorts(request).get, who, watch_id)
    [found] = await run_in_threadpool(_cohort_json, request, [watch])
    return found


@router.delete("/watchlist/cohorts/{watch_id}", status_code=204)
async def unfollow_cohort(request: Request, watch_id: int, who: Searcher) -> Response:
    watch = await run_in_threadpool(_cohorts(request).unfollow, who, watch_id)
    [found] = await run_in_threadpool(_cohort_json, request, [watch])
    await _audit(request, "watch.cohort.delete", who, found)
    return Response(status_code=204)


# -- patient watches -----------------------------------------------------------------------
class WatchCreate(BaseModel):
    patient_id: str = Field(min_length=1, max_length=64)
    issuer: str = Field("", max_length=64)
    label: str | None = Field(None, max_length=200)


@router.post("/watchlist", status_code=201)
async def follow(request: Request, body: WatchCreate, who: Searcher) -> dict[str, Any]:
    watch = await run_in_threadpool(_watchlist(request).follow, who, body.patient_id,
                                    body.issuer, body.label)
    await _audit(request, "watch.create", who, watch.as_json(),
                 patient_ids=(watch.patient_id,))
    return watch.as_json()


@router.get("/watchlist")
async def list_watches(request: Request, who: Searcher) -> list[dict[str, Any]]:
    return [x.as_json() for x in await run_in_threadpool(_watchlist(request).listing, who)]


@router.get("/watchlist/{watch_id}")
async def get_watch(request: Request, watch_id: int, who: Searcher) -> dict[str, Any]:
    return (await run_in_threadpool(_watchlist(request).get, who, watch_id)).as_json()


@router.delete("/watchlist/{watch_id}", status_code=204)
async def unfollow(request: Request, watch_id: int, who: Searcher) -> Response:
    watch = await run_in_threadpool(_watchlist(request).unfollow, who, watch_id)
    await _audit(request, "watch.delete", who, watch.as_json(),
                 patient_ids=(watch.patient_id,))
    return Response(status_code=204)
