"""DICOMweb (PS3.18): STOW-RS, QIDO-RS, WADO-RS retrieve and metadata, and DELETE.

Handlers only translate between HTTP and the archive: parse and check the request,
call :class:`~dicomshare.archive.Archive`, shape the answer. Pixel-level resources
(frames, rendered, thumbnail, bulk data) are in :mod:`dicomshare.web.pixels`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from dicomshare.access.policy import Action
from dicomshare.access.service import Access
from dicomshare.archive import Archive, StoreResult
from dicomshare.dicom import transfer
from dicomshare.dicom.attributes import Level, check_uid
from dicomshare.dicom.matching import parse_qido
from dicomshare.dicom.pixels import NotAcceptable as PixelNotAcceptable
from dicomshare.dicom.pixels import transcode
from dicomshare.errors import (
    InvalidInput,
    InvalidQuery,
    NotAcceptable,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from dicomshare.storage.base import StoredInstance
from dicomshare.web.accept import MediaRange, accept_from_request
from dicomshare.web.app import principal
from dicomshare.web.multipart import (
    MultipartError,
    MultipartReader,
    iter_multipart,
    multipart_content_type,
    new_boundary,
    parse_content_type,
)

router = APIRouter()
DICOM_JSON = "application/dicom+json"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
MAX_PARTS = 100_000
STORE_BATCH = 32  # parts per index transaction within one STOW request


def archive_of(request: Request) -> Archive:
    return request.app.state.archive


def access_of(request: Request) -> Access:
    return request.app.state.access


def root_url(request: Request) -> str:
    """The DICOMweb root as the client reached it, for RetrieveURL and BulkDataURI.

    ``public_url`` wins when set. Otherwise scheme and host come from the request; some
    clients (dicomweb-client) send a Host header without the port, so when no proxy is
    involved the port the server actually listens on is added back.
    """
    settings = request.app.state.settings
    # A share link's own root (web/share.py) when the request came in under one.
    prefix = getattr(request.state, "dicomweb_root", None) or settings.dicomweb_root
    if settings.public_url:
        return settings.public_url.rstrip("/") + prefix
    base = str(request.base_url).rstrip("/")
    host = request.headers.get("host", "")
    server = request.scope.get("server")
    proxied = any(h in request.headers for h in ("forwarded", "x-forwarded-host",
                                                  "x-forwarded-proto"))
    if host and ":" not in host.rsplit("]", 1)[-1] and server and not proxied \
            and server[1] not in (80, 443):
        base = f"{request.url.scheme}://{host}:{server[1]}"
    return base + prefix


def instance_url(root: str, inst: StoredInstance) -> str:
    return f"{root}/studies/{inst.study_uid}/series/{inst.series_uid}/instances/{inst.sop_uid}"


def accepted(request: Request) -> list[MediaRange]:
    try:
        return accept_from_request(request.headers.get("accept"),
                                   request.query_params.get("accept"))
    except ValueError as exc:
        raise InvalidQuery(f"invalid Accept: {exc}") from None


def uids(study: str, series: str | None = None, instance: str | None = None) -> None:
    check_uid(study, "StudyInstanceUID")
    if series is not None:
        check_uid(series, "SeriesInstanceUID")
    if instance is not None:
        check_uid(instance, "SOPInstanceUID")


def json_response(payload: Any, status: int = 200,
                  headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return Response(body, status_code=status, media_type=DICOM_JSON, headers=headers)


def wants_json(request: Request) -> None:
    for rng in accepted(request):
        if rng.type in ("*/*", "application/*", DICOM_JSON, "application/json"):
            return
    raise NotAcceptable("this resource is available as application/dicom+json only")


# -- STOW-RS ------------------------------------------------------------------------------
@router.post("/studies")
async def stow(request: Request) -> Response:
    return await _stow(request, None)


@router.post("/studies/{study}")
async def stow_study(request: Request, study: str) -> Response:
    uids(study)
    return await _stow(request, study)


async def _stow(request: Request, study: str | None) -> Response:
    who = principal(request)
    archive = archive_of(request)
    access = access_of(request)
    may_store = await run_in_threadpool(access.store_access, who)
    content_type = request.headers.get("content-type", "")
    try:
        media, params = parse_content_type(content_type)
    except ValueError as exc:
        raise UnsupportedMediaType(f"unreadable Content-Type: {exc}") from None
    if media != "multipart/related":
        raise UnsupportedMediaType(
            f"STOW-RS needs multipart/related; type=\"application/dicom\", not {media or 'none'}")
    root_type = params.get("type", "application/dicom").lower()
    if root_type != "application/dicom":
        raise UnsupportedMediaType(
            f"only application/dicom parts are supported (type={root_type}); "
            "send Part 10 files, not metadata and bulk data")
    if "boundary" not in params:
        raise InvalidInput("multipart Content-Type has no boundary parameter")
    limit = request.app.state.settings.max_stow_bytes
    declared = request.headers.get("content-length", "")
    if limit and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes is above the limit of {limit}")
    # Parts are stored in batches while the next ones arrive: memory stays bounded by the
    # batch, not the request, and the disk works while the network does.
    batch: list[Any] = []
    results: list[StoreResult] = []
    storing: asyncio.Future[list[StoreResult]] | None = None
    refused: list[tuple[int, StoreResult]] = []

    async def stored() -> list[StoreResult]:
        return await storing if storing is not None else []

    try:
        reader = MultipartReader(_limited(request, limit), params["boundary"])
        async for part in reader:
            if reader.parts_read > MAX_PARTS:
                raise InvalidInput(f"more than {MAX_PARTS} parts in one request")
            part_type = (part.content_type or root_type).split(";")[0].strip().lower()
            if part_type != "application/dicom":
                refused.append((part.index, StoreResult(error=UnsupportedMediaType(
                    f"part {part.index} has media type {part_type}, not application/dicom"))))
                continue
            temp = archive.new_temp()
            batch.append(temp)
            async for chunk in part:
                temp.write(chunk)
            if len(batch) >= STORE_BATCH:
                results += await stored()
                storing = asyncio.ensure_future(
                    run_in_threadpool(access.store, who, batch, study, None, may_store))
                batch = []
    except (MultipartError, InvalidInput, PayloadTooLarge) as exc:
        for temp in batch:
            archive.blobs.discard(temp)
        results += await stored()
        error = exc if isinstance(exc, PayloadTooLarge) else InvalidInput(
            "malformed multipart body: " + (exc.reason if isinstance(exc, InvalidInput)
                                            else str(exc)))
        if not any(r.ok for r in results):
            raise error from None
        # Complete parts before the break were stored: say so (202), and what went wrong.
        error.reason = f"after part {len(results)}: {error.reason}"
        results.append(StoreResult(error=error))
        return _stow_response(root_url(request), study, results)
    except BaseException:  # PayloadTooLarge, a client gone away, cancellation
        for temp in batch:
            archive.blobs.discard(temp)
        if storing is not None:
            await asyncio.shield(storing)
        raise
    results += await stored()
    if batch:
        results += await run_in_threadpool(access.store, who, batch, study, None, may_store)
    for index, result in refused:
        results.insert(index - 1, result)
    return _stow_response(root_url(request), study, results)


async def _limited(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The request body, cut off with 413 once it passes ``limit`` bytes (0: no limit)."""
    seen = 0
    async for chunk in request.stream():
        seen += len(chunk)
        if limit and seen > limit:
            raise PayloadTooLarge(f"request body is above the limit of {limit} bytes")
        yield chunk


def _stow_response(root: str, study: str | None, results: list[StoreResult]) -> Response:
    """PS3.18 10.5.3: 200 all stored, 202 some failed, 409/400 none stored."""
    referenced, failed = [], []
    studies = {r.study_uid for r in results if r.ok and r.study_uid}
    for r in results:
        item: dict[str, Any] = {}
        if r.sop_class_uid:
            item["00081150"] = {"vr": "UI", "Value": [r.sop_class_uid]}
        if r.sop_uid:
            item["00081155"] = {"vr": "UI", "Value": [r.sop_uid]}
        if r.ok:
            item["00081190"] = {"vr": "UR", "Value": [
                f"{root}/studies/{r.study_uid}/series/{r.series_uid}/instances/{r.sop_uid}"]}
            referenced.append(item)
        else:
            assert r.error is not None
            item["00081197"] = {"vr": "US", "Value": [r.error.failure_reason]}
            item["00000902"] = {"vr": "LO", "Value": [r.error.reason[:64]]}
            failed.append(item)
    body: dict[str, Any] = {}
    target = study or (next(iter(studies)) if len(studies) == 1 else None)
    if target:
        body["00081190"] = {"vr": "UR", "Value": [f"{root}/studies/{target}"]}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": failed}
    if referenced:
        body["00081199"] = {"vr": "SQ", "Value": referenced}
    headers = {}
    if failed:
        first = next(r.error for r in results if r.error is not None)
        headers["Warning"] = f'299 dicomshare "{len(failed)} of {len(results)} instances ' \
                             f'failed; first: {first.reason[:300]}"'
    if not failed:
        status = 200
    elif referenced:
        status = 202
    elif all(isinstance(r.error, InvalidInput | UnsupportedMediaType) for r in results):
        status = 400
    else:
        status = 409
    return json_response(body, status, headers)


# -- QIDO-RS ------------------------------------------------------------------------------
async def _qido(request: Request, level: Level, study: str | None = None,
                series: str | None = None) -> Response:
    who = principal(request)
    wants_json(request)
    if study:
        uids(study, series)
    query = parse_qido(level, list(request.query_params.multi_items()))
    matches = await run_in_threadpool(access_of(request).search, who, query, study, series)
    root = root_url(request)
    for ds in matches:
        st = ds["0020000D"]["Value"][0]
        url = f"{root}/studies/{st}"
        if level is not Level.STUDY:
            url += f"/series/{ds['0020000E']['Value'][0]}"
        if level is Level.IMAGE:
            url += f"/instances/{ds['00080018']['Value'][0]}"
        ds["00081190"] = {"vr": "UR", "Value": [url]}
    return json_response([dict(sorted(ds.items())) for ds in matches])


@router.get("/studies")
async def search_studies(request: Request) -> Response:
    return await _qido(request, Level.STUDY)


@router.get("/series")
async def search_series(request: Request) -> Response:
    return await _qido(request, Level.SERIES)


@router.get("/instances")
async def search_instances(request: Request) -> Response:
    return await _qido(request, Level.IMAGE)


@router.get("/studies/{study}/series")
async def search_study_series(request: Request, study: str) -> Response:
    return await _qido(request, Level.SERIES, study)


@router.get("/studies/{study}/instances")
async def search_study_instances(request: Request, study: str) -> Response:
    return await _qido(request, Level.IMAGE, study)


@router.get("/studies/{study}/series/{series}/instances")
async def search_series_instances(request: Request, study: str, series: str) -> Response:
    return await _qido(request, Level.IMAGE, study, series)


# -- WADO-RS: instances and metadata --------------------------------------------------------
def _choose_transfer_syntaxes(request: Request) -> list[str]:
    """Acceptable transfer syntaxes for application/dicom, best first ('*': as stored)."""
    choices: list[str] = []
    for rng in accepted(request):
        part_type = rng.type
        if rng.type == "multipart/related":
            part_type = rng.params.get("type", "application/dicom").lower()
        if part_type in ("application/dicom", "*/*", "application/*"):
            # No transfer-syntax parameter means Explicit VR Little Endian (PS3.18 8.7.3),
            # also for */*; a wildcard may still fall back to the stored syntax.
            ts = rng.params.get("transfer-syntax", EXPLICIT_LE)
            wildcard = part_type != "application/dicom" and "transfer-syntax" not in rng.params
            for choice in (ts, "*") if wildcard else (ts,):
                if choice not in choices:
                    choices.append(choice)
    if not choices:
        raise NotAcceptable("instances are available as multipart/related; "
                            "type=\"application/dicom\" only")
    return choices


def _pick(inst: StoredInstance, choices: list[str]) -> str:
    for ts in choices:
        if ts in ("*", inst.transfer_syntax_uid):
            return inst.transfer_syntax_uid
        if ts in (EXPLICIT_LE, IMPLICIT_LE) and (
                transfer.can_decompress(inst.transfer_syntax_uid)
                or transfer.is_native(inst.transfer_syntax_uid)):
            return ts
    raise NotAcceptable(
        f"instance {inst.sop_uid} is stored as {transfer.name(inst.transfer_syntax_uid)} and "
        f"cannot be sent in any accepted transfer syntax ({', '.join(choices)})")


async def _retrieve(request: Request, study: str, series: str | None = None,
                    instance: str | None = None) -> Response:
    who = principal(request)
    uids(study, series, instance)
    choices = _choose_transfer_syntaxes(request)
    archive = archive_of(request)
    found = await run_in_threadpool(access_of(request).locate, who, Action.DOWNLOAD, study,
                                    series, instance)
    plan = [(inst, _pick(inst, choices)) for inst, _ in found]
    root = root_url(request)

    def parts() -> Iterator[tuple[dict[str, str], Any]]:
        for inst, ts in plan:
            headers = {"Content-Type": f"application/dicom; transfer-syntax={ts}",
                       "Content-Location": instance_url(root, inst)}
            if ts == inst.transfer_syntax_uid:
                headers["Content-Length"] = str(inst.size)
                yield headers, archive.read_chunks(inst.blob_key)
            else:
                yield headers, _transcoded(archive, inst, ts)

    boundary = new_boundary()
    return StreamingResponse(
        iter_multipart(parts(), boundary),
        media_type=multipart_content_type(boundary, "application/dicom"))


def _transcoded(archive: Archive, inst: StoredInstance, ts: str) -> Iterator[bytes]:
    with archive.blobs.local_path(inst.blob_key) as path:
        try:
            yield transcode(path, ts)
        except PixelNotAcceptable as exc:  # found out too late for a 406: end the stream
            raise RuntimeError(f"transcoding {inst.sop_uid} failed: {exc.reason}") from exc


@router.get("/studies/{study}")
async def retrieve_study(request: Request, study: str) -> Response:
    return await _retrieve(request, study)


@router.get("/studies/{study}/series/{series}")
async def retrieve_series(request: Request, study: str, series: str) -> Response:
    return await _retrieve(request, study, series)


@router.get("/studies/{study}/series/{series}/instances/{instance}")
async def retrieve_instance(request: Request, study: str, series: str,
                            instance: str) -> Response:
    return await _retrieve(request, study, series, instance)


async def _metadata(request: Request, study: str, series: str | None = None,
                    instance: str | None = None) -> Response:
    who = principal(request)
    uids(study, series, instance)
    wants_json(request)
    found = await run_in_threadpool(access_of(request).locate, who, Action.VIEW, study,
                                    series, instance, True)
    root = root_url(request)

    def body() -> Iterator[bytes]:
        yield b"["
        for n, (inst, text) in enumerate(found):
            assert text is not None
            prefix = f'"BulkDataURI":"{instance_url(root, inst)}/bulk/'
            yield ((b"," if n else b"") +
                   text.replace('"BulkDataURI":"bulk/', prefix).encode())
        yield b"]"

    return StreamingResponse(body(), media_type=DICOM_JSON)


@router.get("/studies/{study}/metadata")
async def study_metadata(request: Request, study: str) -> Response:
    return await _metadata(request, study)


@router.get("/studies/{study}/series/{series}/metadata")
async def series_metadata(request: Request, study: str, series: str) -> Response:
    return await _metadata(request, study, series)


@router.get("/studies/{study}/series/{series}/instances/{instance}/metadata")
async def instance_metadata(request: Request, study: str, series: str,
                            instance: str) -> Response:
    return await _metadata(request, study, series, instance)


# -- DELETE -------------------------------------------------------------------------------
async def _delete(request: Request, study: str, series: str | None = None,
                  instance: str | None = None) -> Response:
    who = principal(request)
    uids(study, series, instance)
    gone = await run_in_threadpool(access_of(request).delete, who, study, series, instance)
    return json_response({"deleted": len(gone)}, 200)


@router.delete("/studies/{study}")
async def delete_study(request: Request, study: str) -> Response:
    return await _delete(request, study)


@router.delete("/studies/{study}/series/{series}")
async def delete_series(request: Request, study: str, series: str) -> Response:
    return await _delete(request, study, series)


@router.delete("/studies/{study}/series/{series}/instances/{instance}")
async def delete_instance(request: Request, study: str, series: str,
                          instance: str) -> Response:
    return await _delete(request, study, series, instance)


# Pixel-level resources register themselves on the same router.
from dicomshare.web import pixels as _pixels  # noqa: E402,F401
