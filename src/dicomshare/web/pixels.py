"""WADO-RS pixel resources: frames, bulk data, rendered images and thumbnails (PS3.18 8.7).

Decoding and rendering live in :mod:`dicomshare.dicom`; this module negotiates the
representation, answers 406 before anything is streamed when none fits, and maps
``PixelError`` (no pixel data, frame out of range) to a 4xx with its reason.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pydicom
from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from dicomshare.access.policy import Action
from dicomshare.dicom import pixels, render
from dicomshare.dicom.attributes import parse_tag
from dicomshare.errors import InvalidInput, InvalidQuery, NotAcceptable, NotFound
from dicomshare.storage.base import StoredInstance
from dicomshare.web.accept import MediaRange
from dicomshare.web.app import principal
from dicomshare.web.dicomweb import (
    accepted,
    access_of,
    archive_of,
    instance_url,
    root_url,
    router,
    uids,
)
from dicomshare.web.multipart import iter_multipart, multipart_content_type, new_boundary

OCTET = "application/octet-stream"
T = TypeVar("T")
IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif")
_FRAMES = re.compile(r"^\d{1,9}(,\d{1,9})*$")


def _frame_list(text: str) -> list[int]:
    if not _FRAMES.match(text):
        raise InvalidQuery(f"frame list must be comma-separated numbers, got {text[:40]!r}")
    numbers = [int(n) for n in text.split(",")]
    if any(n < 1 for n in numbers):
        raise InvalidQuery("frame numbers start at 1")
    if len(numbers) > 10_000:
        raise InvalidQuery("too many frames in one request")
    return numbers


def _frame_wants(ranges: list[MediaRange]) -> list[tuple[str, str | None, bool]]:
    """(frame media type, transfer-syntax param, multipart?) in preference order."""
    wants = []
    for rng in ranges:
        if rng.type == "multipart/related":
            wants.append((rng.params.get("type", OCTET).lower(),
                          rng.params.get("transfer-syntax"), True))
        elif rng.type in ("*/*", OCTET) or rng.type.startswith("image/") or \
                rng.type.startswith("video/"):
            wants.append((rng.type, rng.params.get("transfer-syntax"), False))
    return wants


async def _one(request: Request, study: str, series: str, instance: str) -> StoredInstance:
    found = await run_in_threadpool(access_of(request).locate, principal(request), Action.VIEW,
                                    study, series, instance)
    return found[0][0]


def _pixel_call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a dicom.pixels / dicom.render call, translating its errors to the tree."""
    try:
        return fn(*args, **kwargs)
    except pixels.NotAcceptable as exc:
        raise NotAcceptable(exc.reason) from None
    except pixels.PixelError as exc:
        raise InvalidInput(exc.reason) from None


@router.get("/studies/{study}/series/{series}/instances/{instance}/frames/{frame_list}")
async def retrieve_frames(request: Request, study: str, series: str, instance: str,
                          frame_list: str) -> Response:
    principal(request)
    uids(study, series, instance)
    numbers = _frame_list(frame_list)
    archive = archive_of(request)
    inst = await _one(request, study, series, instance)
    wants = _frame_wants(accepted(request))  # none: nothing acceptable, 406 below
    last: Exception | None = None
    for want, ts, multipart in wants:
        if not multipart and len(numbers) > 1:
            continue
        try:
            with archive.blobs.local_path(inst.blob_key) as path:
                media, part_ts, chunks = await run_in_threadpool(
                    _pixel_call, pixels.frames, path, numbers,
                    "*/*" if want in ("*/*", "*") else want,
                    transfer_syntax=ts)
        except NotAcceptable as exc:
            last = exc
            continue
        location = instance_url(root_url(request), inst) + "/frames/"
        part_type = media + (f"; transfer-syntax={part_ts}" if part_ts else "")
        if not multipart:
            body = await run_in_threadpool(b"".join, chunks)
            return Response(body, media_type=part_type)
        boundary = new_boundary()
        parts = ((
            {"Content-Type": part_type, "Content-Location": f"{location}{n}"}, [chunk])
            for n, chunk in zip(numbers, chunks, strict=False))
        return StreamingResponse(iter_multipart(parts, boundary),
                                 media_type=multipart_content_type(boundary, media))
    raise NotAcceptable(getattr(last, "reason", "no acceptable representation of the frames"))


@router.get("/studies/{study}/series/{series}/instances/{instance}/bulk/{tag_path}")
async def retrieve_bulk(request: Request, study: str, series: str, instance: str,
                        tag_path: str) -> Response:
    """The value of a bulk data element; pixel data as its frames, in stored form."""
    principal(request)
    uids(study, series, instance)
    try:
        tag = parse_tag(tag_path)
    except InvalidQuery:
        raise NotFound(f"no bulk data {tag_path[:40]!r}") from None
    archive = archive_of(request)
    inst = await _one(request, study, series, instance)
    if tag == 0x7FE00010:
        with archive.blobs.local_path(inst.blob_key) as path:
            count = await run_in_threadpool(_pixel_call, pixels.number_of_frames, path)
            media, part_ts, chunks = await run_in_threadpool(
                _pixel_call, pixels.frames, path, list(range(1, count + 1)), "*/*")
        part_type = media + (f"; transfer-syntax={part_ts}" if part_ts else "")
        # Uncompressed: the whole value in one part (PS3.18 8.7.3.3); compressed: a frame each.
        parts: Iterator[tuple[dict[str, str], Any]] = iter(
            [({"Content-Type": part_type}, chunks)]) if media == OCTET else (
            ({"Content-Type": part_type}, [c]) for c in chunks)
    else:
        with archive.blobs.local_path(inst.blob_key) as path:
            value = await run_in_threadpool(_element_bytes, path, tag)
        parts = iter([({"Content-Type": OCTET}, [value])])
        part_type = OCTET
    boundary = new_boundary()
    return StreamingResponse(iter_multipart(parts, boundary),
                             media_type=multipart_content_type(boundary, part_type.split(";")[0]))


def _element_bytes(path: Any, tag: int) -> bytes:
    ds = pydicom.dcmread(path, specific_tags=[tag])
    if tag not in ds:
        raise NotFound(f"the instance has no element {tag:08X}")
    value = ds[tag].value
    if not isinstance(value, bytes):
        raise NotFound(f"element {tag:08X} is not bulk data")
    return value


# -- rendered and thumbnail -----------------------------------------------------------------
def _image_type(request: Request) -> str:
    for rng in accepted(request):
        if rng.type in IMAGE_TYPES:
            return rng.type
        if rng.type in ("*/*", "image/*"):
            return "image/jpeg"
        if rng.type == "multipart/related" and rng.params.get("type") in IMAGE_TYPES:
            return rng.params["type"]
    raise NotAcceptable("rendered images are available as image/jpeg, image/png or image/gif")


def _render_params(request: Request) -> dict[str, Any]:
    q = request.query_params
    out: dict[str, Any] = {}
    try:
        if "window" in q:
            parts = q["window"].split(",")
            if len(parts) not in (2, 3):
                raise ValueError("window is center,width[,function]")
            function = parts[2].strip().lower() if len(parts) == 3 else "linear"
            if function not in ("linear", "linear-exact", "sigmoid"):
                raise ValueError(f"unknown VOI function {function!r}")
            width = float(parts[1])
            if width <= 0:
                raise ValueError("window width must be positive")
            out["window"] = (float(parts[0]), width, function)
        if "viewport" in q:
            parts = q["viewport"].split(",")
            if len(parts) not in (2, 6):
                raise ValueError("viewport is vw,vh[,sx,sy,sw,sh]")
            vw, vh = int(parts[0]), int(parts[1])
            if not (0 < vw <= 8192 and 0 < vh <= 8192):
                raise ValueError("viewport sizes must be between 1 and 8192")
            out["viewport"] = (vw, vh)
        if "quality" in q:
            quality = int(q["quality"])
            if not 1 <= quality <= 100:
                raise ValueError("quality must be between 1 and 100")
            out["quality"] = quality
    except ValueError as exc:
        raise InvalidQuery(str(exc)) from None
    return out


async def _rendered(request: Request, study: str, series: str | None, instance: str | None,
                    frame_list: str | None, thumbnail: bool) -> Response:
    principal(request)
    uids(study, series, instance)
    media = _image_type(request)
    params = _render_params(request)
    archive = archive_of(request)
    found = [inst for inst, _ in await run_in_threadpool(
        access_of(request).locate, principal(request), Action.VIEW, study, series, instance)]
    frames: list[int | None] = list(_frame_list(frame_list)) if frame_list else [None]

    def one(inst: StoredInstance, frame: int | None) -> bytes:
        with archive.blobs.local_path(inst.blob_key) as path:
            return render_path(path, frame, media, params, thumbnail)

    return await run_in_threadpool(rendered_response, found, frames, instance is None,
                                   thumbnail, media, one)


def render_path(path: Path, frame: int | None, media: str, params: dict[str, Any],
                thumbnail: bool) -> bytes:
    """One rendered image (or thumbnail) of the file at ``path``."""
    if thumbnail and not params.get("viewport"):
        return bytes(_pixel_call(render.thumbnail, path, media_type=media))
    return bytes(_pixel_call(render.render, path, frame, media_type=media, **params))


def rendered_response(found: list[T], frames: list[int | None], whole: bool, thumbnail: bool,
                      media: str, one: Callable[[T, int | None], bytes]) -> Response:
    """The rendered (or thumbnail) answer for instances ``found``: one image, or a multipart
    of each instance's frames. ``whole``: the request named a study or series, whose
    thumbnail is the single image nearest its middle. Used by DICOMweb and share links."""
    single = len(found) == 1 or (thumbnail and whole)
    if thumbnail and whole:  # the image nearest the middle represents them all
        middle = len(found) // 2
        found = [found[i] for i in sorted(range(len(found)), key=lambda i: abs(i - middle))]
    jobs = [(inst, frame) for inst in found for frame in frames]
    single = single and len(frames) == 1
    # Render the first image before answering, so that a resource with nothing to render
    # (reports, RT plans) gets a 4xx with the reason, not a 200 and a broken stream.
    first, n = b"", 0
    for n, (inst, frame) in enumerate(jobs):
        try:
            first = one(inst, frame)
            break
        except (InvalidInput, NotAcceptable):
            if n == len(jobs) - 1:
                raise
    if single:
        return Response(first, media_type=media)
    rest = jobs[n + 1:]

    def parts() -> Iterator[tuple[dict[str, str], list[bytes]]]:
        yield {"Content-Type": media}, [first]
        for inst, frame in rest:
            try:
                yield {"Content-Type": media}, [one(inst, frame)]
            except (InvalidInput, NotAcceptable):
                continue  # non-image objects (SR, RT plans) have no rendering

    boundary = new_boundary()
    return StreamingResponse(iter_multipart(parts(), boundary),
                             media_type=multipart_content_type(boundary, media))


def _routes() -> None:
    base = "/studies/{study}"
    levels = {
        "study": base,
        "series": base + "/series/{series}",
        "instance": base + "/series/{series}/instances/{instance}",
        "frames": base + "/series/{series}/instances/{instance}/frames/{frame_list}",
    }
    for level, path in levels.items():
        for kind in ("rendered", "thumbnail"):
            router.add_api_route(f"{path}/{kind}", _endpoint(kind == "thumbnail"),
                                 methods=["GET"], name=f"{kind}_{level}")


def _endpoint(thumbnail: bool) -> Any:
    async def endpoint(request: Request) -> Response:
        p = request.path_params
        return await _rendered(request, p["study"], p.get("series"), p.get("instance"),
                               p.get("frame_list"), thumbnail)

    return endpoint


_routes()
