"""De-identified share links: what a link with ``deidentified: true`` serves.

Such a link never reaches the normal DICOMweb handlers (they would serve the originals):
web/share.py routes every request under its DICOMweb root here. Everything comes out of
the de-identification engine with the link's research project's key and options, and
the pixel cleaner of the project's exports (research/exports.py), so UIDs, patient
pseudonyms and date shifts are exactly those an export of the same project produces.

URLs carry pseudonymous UIDs. A :class:`LinkView` maps them back: it de-identifies the
header of every instance the link covers and keeps the de-identified DICOM JSON, for a
short time (``VIEW_TTL``) per link. A UID that is not the pseudonym of a covered,
releasable instance answers 404, an original UID included. Instances the engine holds
back (burned-in text risk and no pixel cleaner, or a cleaner that gives up) are absent
from every DICOMweb answer and listed as withheld in info.json. Whole instances, frames
and rendered images are made per request from a freshly de-identified file.

The read-only subset: QIDO-RS (matching on the UIDs and Modality only), WADO-RS
retrieve (study, series, instance), metadata, frames, pixel bulk data, rendered and
thumbnail. See docs/share-links.md.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydicom.datadict import tag_for_keyword
from pydicom.filereader import read_file_meta_info
from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError

from dicomshare import clock
from dicomshare.access.policy import Action, Principal
from dicomshare.deid.engine import Deidentifier, read_instance
from dicomshare.deid.masking import masking_hook
from dicomshare.deid.pixels import PIXEL_TAGS
from dicomshare.dicom import pixels, transfer
from dicomshare.dicom.attributes import (
    DEFAULT_RETURN,
    SERIES_EXTRA,
    STUDY_EXTRA,
    STUDY_GROUPS,
    Level,
    parse_tag,
)
from dicomshare.dicom.json import dataset_to_json
from dicomshare.dicom.matching import parse_qido
from dicomshare.dicom.pixels import NotAcceptable as PixelNotAcceptable
from dicomshare.dicom.pixels import transcode
from dicomshare.errors import InvalidQuery, NotAcceptable, NotFound
from dicomshare.storage import schema as s
from dicomshare.storage.base import StoredInstance
from dicomshare.web.dicomweb import (
    EXPLICIT_LE,
    IMPLICIT_LE,
    _choose_transfer_syntaxes,
    accepted,
    json_response,
    root_url,
    uids,
    wants_json,
)
from dicomshare.web.multipart import iter_multipart, multipart_content_type, new_boundary
from dicomshare.web.pixels import (
    OCTET,
    _element_bytes,
    _frame_list,
    _frame_wants,
    _image_type,
    _pixel_call,
    _render_params,
    render_path,
    rendered_response,
)

if TYPE_CHECKING:
    from dicomshare.access.service import Access
    from dicomshare.config import Settings
    from dicomshare.sharing.links import Link

log = logging.getLogger(__name__)
VIEW_TTL = 60.0  # seconds a link's map of pseudonyms is reused
VIEW_CACHE = 16  # links whose maps are kept
FLAG_CACHE = 4096  # secrets whose "de-identified or not" answer is kept
ITEM_CACHE = 8192  # de-identified headers kept across rebuilds of the maps (a few KB each)
BULK_THRESHOLD = 1024

STUDY_UID, SERIES_UID, SOP_UID = 0x0020000D, 0x0020000E, 0x00080018
MODALITY, MODALITIES_IN_STUDY = 0x00080060, 0x00080061
_MATCHABLE = {STUDY_UID: "study", SERIES_UID: "series", SOP_UID: "sop",
              MODALITY: "modality", MODALITIES_IN_STUDY: "modality"}
_CONTROL = {"includefield", "limit", "offset", "fuzzymatching", "accept", "charset"}


def _tags(level: Level) -> tuple[int, ...]:
    return tuple(t for t in (tag_for_keyword(k) for k in DEFAULT_RETURN[level]) if t)


_DEFAULT_TAGS = {level: _tags(level) for level in DEFAULT_RETURN}


@dataclass(frozen=True)
class Item:
    """One covered instance: its original, its pseudonymous UIDs and de-identified header."""

    original: StoredInstance
    study: str
    series: str
    sop: str
    held_back: str | None
    header: dict[str, Any]  # DICOM JSON without pixel data; {} when held back
    pixel_tags: tuple[int, ...]  # pixel data elements present (served as bulk data)

    def value(self, tag: int) -> Any:
        values = self.header.get(f"{tag:08X}", {}).get("Value") or []
        if not values:
            return None
        first = values[0]
        return first.get("Alphabetic") if isinstance(first, dict) else first

    def sort_key(self) -> tuple[Any, ...]:
        number = self.value(0x00200013)
        series_number = self.value(0x00200011)
        return (self.study, series_number is None, _num(series_number), self.series,
                number is None, _num(number), self.sop)


def _num(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


class LinkView:
    """The pseudonymous picture of one link, built at one time."""

    def __init__(self, link_id: int, project_id: int, deid: Deidentifier,
                 items: list[Item]) -> None:
        self.link_id = link_id
        self.project_id = project_id
        self.deid = deid
        self.built = time.monotonic()
        items = sorted(items, key=Item.sort_key)
        self.served = [i for i in items if i.held_back is None]
        self.withheld = [i for i in items if i.held_back is not None]
        self._by_sop = {i.sop: i for i in self.served}

    def find(self, study: str, series: str | None = None, sop: str | None = None
             ) -> list[Item]:
        """Served instances under a pseudonymous resource; NotFound when there are none
        (an unknown UID, an original UID, or only withheld instances)."""
        candidates = self.served if sop is None else \
            [i for i in (self._by_sop.get(sop),) if i is not None]
        found = [i for i in candidates if i.study == study
                 and (series is None or i.series == series) and (sop is None or i.sop == sop)]
        if not found:
            what = (f"instance {sop}" if sop else f"series {series}" if series
                    else f"study {study}")
            raise NotFound(f"{what} not found")
        return found


class DeidViews:
    """Maps of de-identified links, and de-identified files made on demand."""

    def __init__(self, access: Access, settings: Settings) -> None:
        self.access = access
        self.archive = access.archive
        self.engine = access.archive.index.engine
        self.settings = settings
        self._lock = threading.Lock()
        self._views: OrderedDict[tuple[int, int], LinkView] = OrderedDict()
        self._building: dict[tuple[int, int], threading.Lock] = {}
        self._flags: OrderedDict[str, bool] = OrderedDict()
        self._engines: dict[int, tuple[Deidentifier, str]] = {}
        self._items: OrderedDict[tuple[str, str, str], Item] = OrderedDict()

    # -- which links are de-identified ---------------------------------------------------------
    def is_deidentified(self, secret: str) -> bool:
        """Whether the link with this secret is de-identified (False when there is none).
        Kept per secret: the flag of a link never changes, and unknown secrets stay unknown."""
        from dicomshare.sharing.common import secret_digest

        if not 20 <= len(secret) <= 128:
            return False
        digest = secret_digest(secret)
        with self._lock:
            found = self._flags.get(digest)
            if found is not None:
                self._flags.move_to_end(digest)
                return found
        L = s.share_link
        with self.engine.connect() as conn:
            row = conn.execute(select(L.c.deidentified).where(L.c.secret_hash == digest)
                               ).first()
        flag = bool(row[0]) if row is not None else False
        with self._lock:
            self._flags[digest] = flag
            while len(self._flags) > FLAG_CACHE:
                self._flags.popitem(last=False)
        return flag

    # -- the map -------------------------------------------------------------------------------
    def view(self, link: Link, who: Principal) -> LinkView:
        """The link's map, built when missing or older than ``VIEW_TTL``."""
        if not link.deidentified or link.project_id is None:
            raise NotFound("this link is not de-identified")
        key = (link.id, link.project_id)
        with self._lock:
            found = self._views.get(key)
            if found is not None and time.monotonic() - found.built < VIEW_TTL:
                self._views.move_to_end(key)
                return found
            building = self._building.setdefault(key, threading.Lock())
        with building:  # one build per link at a time; the others wait and reuse it
            with self._lock:
                found = self._views.get(key)
                if found is not None and time.monotonic() - found.built < VIEW_TTL:
                    return found
            view = self._build(link, link.project_id, who)
            with self._lock:
                self._views[key] = view
                self._views.move_to_end(key)
                while len(self._views) > VIEW_CACHE:
                    self._views.popitem(last=False)
                self._building.pop(key, None)
        return view

    def deidentifier(self, project_id: int) -> tuple[Deidentifier, str]:
        """The engine as the project's exports run it: its key, options and pixel cleaner;
        and a name of that configuration (headers made with another are not reused)."""
        P = s.research_project
        with self.engine.connect() as conn:
            row = conn.execute(select(P.c.secret, P.c.options).where(P.c.pk == project_id)
                               ).first()
        if row is None:
            raise NotFound("this link's research project no longer exists")
        config = f"{project_id}|{row[1]}|{hashlib.sha256(row[0].encode()).hexdigest()}"
        with self._lock:
            found = self._engines.get(project_id)
        if found is not None and found[1] == config:
            return found
        options = tuple(o for o in row[1].split(",") if o)
        hook = masking_hook([Path(f) for f in self.settings.deid_mask_rules],
                            self.settings.deid_default_masks)
        made = (Deidentifier(options, bytes.fromhex(row[0]), pixel_hook=hook), config)
        with self._lock:
            self._engines[project_id] = made
        return made

    def _build(self, link: Link, project_id: int, who: Principal) -> LinkView:
        """List what the link covers now (through Access, audited); de-identify the headers
        not seen before (an instance's are kept while its bytes and the project's
        configuration stay the same)."""
        deid, config = self.deidentifier(project_id)
        instances: list[StoredInstance] = []
        for st in self.access.search(who, parse_qido(Level.STUDY, [])):
            uid = st["0020000D"]["Value"][0]
            instances += [inst for inst, _ in self.access.locate(who, Action.VIEW, uid)]
        items: list[Item] = []
        originals: list[tuple[str, str, str]] = []
        for inst in instances:
            key = (config, inst.sop_uid, inst.sha256)
            with self._lock:
                known = self._items.get(key)
                if known is not None:
                    self._items.move_to_end(key)
            if known is not None:
                items.append(replace(known, original=inst))
                continue
            item, patient = self._item(deid, inst)
            items.append(item)
            with self._lock:
                self._items[key] = item
                while len(self._items) > ITEM_CACHE:
                    self._items.popitem(last=False)
            if item.held_back is None and patient is not None:
                originals += [("patient", patient, str(item.value(0x00100020) or "")),
                              ("study", inst.study_uid, item.study),
                              ("series", inst.series_uid, item.series),
                              ("instance", inst.sop_uid, item.sop)]
        self._remember(project_id, originals)
        return LinkView(link.id, project_id, deid, items)

    def _item(self, deid: Deidentifier, inst: StoredInstance) -> tuple[Item, str | None]:
        """De-identify one header (pixel data is only read when a cleaner needs it)."""
        try:
            with self.archive.blobs.local_path(inst.blob_key) as path:
                ds = read_instance(path)
                patient = f"{ds.get('PatientID', '') or ''}|" \
                          f"{ds.get('IssuerOfPatientID', '') or ''}"
                ds, report = deid.deidentify(ds, "")
                uids = (str(ds.get("StudyInstanceUID", "")),
                        str(ds.get("SeriesInstanceUID", "")), str(ds.get("SOPInstanceUID", "")))
                if report.held_back is not None:  # the header is safe; only its modality
                    modality = str(ds.get("Modality", "") or "")
                    kept = {"00080060": {"vr": "CS", "Value": [modality]}} if modality else {}
                    return Item(inst, *uids, report.held_back, kept, ()), None
                pixel_tags = tuple(t for t in PIXEL_TAGS if t in ds)
                for t in pixel_tags:
                    del ds[t]
                header = dict(sorted(dataset_to_json(ds, BULK_THRESHOLD).items()))
        except Exception as exc:  # noqa: BLE001 - one bad instance is withheld, never shown
            log.warning("de-identified link: %s cannot be de-identified: %r", inst.sop_uid,
                        exc)
            d = deid.pseudonyms
            return Item(inst, d.uid(inst.study_uid), d.uid(inst.series_uid),
                        d.uid(inst.sop_uid), "cannot be de-identified", {}, ()), None
        return Item(inst, *uids, None, header, pixel_tags), patient

    def _remember(self, project_id: int, pairs: list[tuple[str, str, str]]) -> None:
        """Record what the link shows in the project's pseudonym map (``pseudonym``), as
        exports do, so the organisation's admins can answer "who was PAT-...?"."""
        p = s.pseudonym
        wanted = {(kind, original[:200]): alias[:200] for kind, original, alias in pairs
                  if original and alias}
        if not wanted:
            return
        try:
            with self.engine.begin() as conn:
                known: set[tuple[str, str]] = set()
                keys = list(wanted)
                for start in range(0, len(keys), 400):
                    chunk = keys[start:start + 400]
                    for kind in {k for k, _ in chunk}:
                        known |= {(kind, o) for o in conn.execute(select(p.c.original).where(
                            p.c.project_pk == project_id, p.c.kind == kind,
                            p.c.original.in_([o for k, o in chunk if k == kind]))).scalars()}
                now = clock.now()
                rows = [{"project_pk": project_id, "kind": k, "original": o, "pseudonym": a,
                         "created_at": now} for (k, o), a in wanted.items()
                        if (k, o) not in known]
                if rows:
                    conn.execute(insert(p), rows)
        except IntegrityError:  # an export recorded the same rows meanwhile
            log.info("pseudonym map of project %d changed meanwhile; next build adds the rest",
                     project_id)

    # -- de-identified files -------------------------------------------------------------------
    @contextmanager
    def file_of(self, view: LinkView, item: Item) -> Iterator[Path]:
        """The instance de-identified to a temporary file (as an export writes it)."""
        with tempfile.TemporaryDirectory(prefix="dicomshare-deid-") as tmp:
            out = Path(tmp) / "instance.dcm"
            with self.archive.blobs.local_path(item.original.blob_key) as src:
                report = view.deid.deidentify_file(src, out)
            if report.held_back is not None or not out.is_file() \
                    or report.output_sop_uid != item.sop:
                raise NotFound(f"instance {item.sop} not found")
            yield out


# -- QIDO-RS over a view ------------------------------------------------------------------------
@dataclass
class Qido:
    conditions: dict[str, set[str]]
    include: set[int]
    include_all: bool
    limit: int | None
    offset: int


def parse_query(params: list[tuple[str, str]]) -> Qido:
    """The query parameters a de-identified link understands; others are refused (400)."""
    q = Qido({}, set(), False, None, 0)
    for name, value in params:
        lname = name.lower()
        if lname in _CONTROL:
            if lname == "includefield":
                for part in value.split(","):
                    part = part.strip()
                    if part.lower() == "all":
                        q.include_all = True
                    elif part:
                        q.include.add(parse_tag(part))
            elif lname in ("limit", "offset"):
                if not value.isdigit() or len(value) > 7:
                    raise InvalidQuery(f"{lname} must be a whole number")
                if lname == "limit":
                    q.limit = int(value)
                else:
                    q.offset = int(value)
            continue
        tag = parse_tag(name)
        if value == "":
            continue  # universal matching: a return key
        kind = _MATCHABLE.get(tag)
        if kind is None:
            raise InvalidQuery(f"a de-identified link matches on StudyInstanceUID, "
                               f"SeriesInstanceUID, SOPInstanceUID and Modality only, not "
                               f"on {name[:40]}")
        values = {v.strip() for v in value.replace("\\", ",").split(",") if v.strip()}
        q.conditions[kind] = q.conditions.get(kind, values) & values
    return q


def _matches(item: Item, q: Qido) -> bool:
    for kind, values in q.conditions.items():
        have = str(item.value(MODALITY) or "") if kind == "modality" else getattr(item, kind)
        if have not in values:
            return False
    return True


def search(view: LinkView, level: Level, q: Qido, root: str, study: str | None = None,
           series: str | None = None) -> list[dict[str, Any]]:
    """QIDO-RS matches at ``level`` below an optional pseudonymous study or series."""
    items = [i for i in view.served if (study is None or i.study == study)
             and (series is None or i.series == series)]
    if (study or series) and not items:
        raise NotFound(f"{'series ' + series if series else 'study ' + str(study)} not found")
    selected = [i for i in items if _matches(i, q)]
    groups: OrderedDict[str, list[Item]] = OrderedDict()
    for item in selected:
        key = item.study if level is Level.STUDY else item.series \
            if level is Level.SERIES else item.sop
        groups.setdefault(key, []).append(item)
    out = []
    for members in groups.values():
        first = members[0]
        if level is Level.STUDY:
            related = [i for i in view.served if i.study == first.study]
            ds = _pick(first, level, q, lambda t: t >> 16 in STUDY_GROUPS or t in STUDY_EXTRA)
            modalities = sorted({str(i.value(MODALITY)) for i in related if i.value(MODALITY)})
            ds["00080061"] = {"vr": "CS", "Value": modalities} if modalities else {"vr": "CS"}
            ds["00201206"] = {"vr": "IS", "Value": [len({i.series for i in related})]}
            ds["00201208"] = {"vr": "IS", "Value": [len(related)]}
            url = f"{root}/studies/{first.study}"
        elif level is Level.SERIES:
            related = [i for i in view.served if i.series == first.series]
            ds = _pick(first, level, q, lambda t: t in SERIES_EXTRA)
            ds["00201209"] = {"vr": "IS", "Value": [len(related)]}
            url = f"{root}/studies/{first.study}/series/{first.series}"
        else:
            ds = _pick(first, level, q, lambda t: True)
            url = f"{root}/studies/{first.study}/series/{first.series}/instances/{first.sop}"
        ds["00080056"] = {"vr": "CS", "Value": ["ONLINE"]}
        ds["00081190"] = {"vr": "UR", "Value": [url]}
        out.append(dict(sorted(ds.items())))
    if level is Level.STUDY:
        out.sort(key=lambda d: (str((d.get("00080020", {}).get("Value") or [""])[0]),
                                d["0020000D"]["Value"][0]))
    end = None if q.limit is None or q.limit == 0 else q.offset + q.limit
    return out[q.offset:end]


def _pick(item: Item, level: Level, q: Qido, in_all: Any) -> dict[str, Any]:
    wanted = set(_DEFAULT_TAGS[level]) | q.include
    out = {}
    for key, elem in item.header.items():
        tag = int(key, 16)
        if tag in wanted or (q.include_all and in_all(tag)):
            out[key] = elem
    return out


def metadata(view: LinkView, items: list[Item], root: str) -> list[dict[str, Any]]:
    """The de-identified headers, pixel data as BulkDataURIs under the link's root."""
    out = []
    for item in items:
        ds = dict(item.header)
        url = f"{root}/studies/{item.study}/series/{item.series}/instances/{item.sop}"
        for tag in item.pixel_tags:
            vr = "OB" if tag == 0x7FE00010 else "OF" if tag == 0x7FE00008 else "OD"
            if tag == 0x7FE00010 and item.value(0x00280100) not in (None, 8):
                vr = "OW"
            ds[f"{tag:08X}"] = {"vr": vr, "BulkDataURI": f"{url}/bulk/{tag:08X}"}
        out.append(dict(sorted(ds.items())))
    return out


def summary(view: LinkView, root: str) -> dict[str, Any]:
    """info.json's studies and withheld instances, in pseudonymous form."""
    studies: OrderedDict[str, dict[str, Any]] = OrderedDict()
    for item in view.served:
        st = studies.get(item.study)
        if st is None:
            st = studies[item.study] = {
                "study_uid": item.study, "study_date": item.value(0x00080020),
                "study_description": item.value(0x00081030),
                "patient_name": item.value(0x00100010), "patient_id": item.value(0x00100020),
                "modalities": [], "series": []}
        series = next((se for se in st["series"] if se["series_uid"] == item.series), None)
        if series is None:
            series = {"series_uid": item.series, "modality": item.value(MODALITY),
                      "series_number": item.value(0x00200011),
                      "series_description": item.value(0x0008103E), "instances": 0,
                      "thumbnail_url": f"{root}/studies/{item.study}/series/{item.series}"
                                       "/thumbnail"}
            st["series"].append(series)
            if series["modality"] and series["modality"] not in st["modalities"]:
                st["modalities"].append(series["modality"])
        series["instances"] += 1
    withheld = [{"study_uid": i.study, "series_uid": i.series, "sop_uid": i.sop,
                 "modality": i.value(MODALITY), "reason": i.held_back}
                for i in view.withheld]
    ordered = sorted(studies.values(), key=lambda st: (st["study_date"] or "", st["study_uid"]))
    return {"studies": ordered, "withheld": withheld}


# -- HTTP: the DICOMweb subset of a de-identified link (called by web/share.py) -----------------
def serve(views: DeidViews, request: Request, link: Link, who: Principal,
          rest: str) -> Response:
    """Answer a GET under a de-identified link's DICOMweb root (``rest``: the path below
    it). The caller has authorized the link and refused other methods."""
    path = rest.strip("/")
    parts = path.split("/") if path else []
    view = views.view(link, who)
    root = root_url(request)
    if len(parts) == 1 and parts[0] in _LEVELS:
        wants_json(request)
        q = parse_query(list(request.query_params.multi_items()))
        return json_response(search(view, _LEVELS[parts[0]], q, root))
    if len(parts) < 2 or parts[0] != "studies":
        raise NotFound("no such resource under this link")
    study, series, instance, i = parts[1], None, None, 2
    if len(parts) > i + 1 and parts[i] == "series":
        series, i = parts[i + 1], i + 2
        if len(parts) > i + 1 and parts[i] == "instances":
            instance, i = parts[i + 1], i + 2
    tail = parts[i:]
    uids(study, series, instance)
    if tail in (["series"], ["instances"]) and instance is None \
            and not (tail == ["series"] and series is not None):
        wants_json(request)
        q = parse_query(list(request.query_params.multi_items()))
        level = Level.SERIES if tail == ["series"] else Level.IMAGE
        return json_response(search(view, level, q, root, study, series))
    items = view.find(study, series, instance)
    first = items[0].original
    orig = (first.study_uid, first.series_uid if series else None,
            first.sop_uid if instance else None)
    if not tail:
        views.access.locate(who, Action.DOWNLOAD, *orig)  # audited; 403 on a view-only link
        return _retrieve(views, request, view, items, root)
    views.access.locate(who, Action.VIEW, *orig)  # still covered now (and audited)
    if tail == ["metadata"]:
        wants_json(request)
        return json_response(metadata(view, items, root))
    if tail in (["rendered"], ["thumbnail"]):
        return _rendered(views, request, view, items, None, tail[0] == "thumbnail",
                         instance is not None)
    if instance is not None and len(tail) >= 2 and tail[0] == "frames":
        if len(tail) == 2:
            return _frames(views, request, view, items[0], _frame_list(tail[1]), root)
        if len(tail) == 3 and tail[2] in ("rendered", "thumbnail"):
            return _rendered(views, request, view, items, tail[1], tail[2] == "thumbnail",
                             True)
    if instance is not None and len(tail) == 2 and tail[0] == "bulk":
        return _bulk(views, view, items[0], tail[1])
    raise NotFound("no such resource under this link")


_LEVELS = {"studies": Level.STUDY, "series": Level.SERIES, "instances": Level.IMAGE}


def _instance_url(root: str, item: Item) -> str:
    return f"{root}/studies/{item.study}/series/{item.series}/instances/{item.sop}"


def _syntax(path: Path) -> str:
    return str(read_file_meta_info(path).get("TransferSyntaxUID", "") or EXPLICIT_LE)


def _pick_syntax(ts: str, choices: list[str], sop: str) -> str:
    for choice in choices:
        if choice in ("*", ts):
            return ts
        if choice in (EXPLICIT_LE, IMPLICIT_LE) and (
                transfer.can_decompress(ts) or transfer.is_native(ts)):
            return choice
    raise NotAcceptable(f"instance {sop} is {transfer.name(ts)} and cannot be sent in any "
                        f"accepted transfer syntax ({', '.join(choices)})")


def _retrieve(views: DeidViews, request: Request, view: LinkView, items: list[Item],
              root: str) -> Response:
    choices = _choose_transfer_syntaxes(request)

    def part(item: Item) -> tuple[dict[str, str], list[bytes]]:
        with views.file_of(view, item) as path:
            ts = _syntax(path)
            chosen = _pick_syntax(ts, choices, item.sop)
            try:
                data = path.read_bytes() if chosen == ts else transcode(path, chosen)
            except PixelNotAcceptable as exc:
                raise NotAcceptable(exc.reason) from None
        return {"Content-Type": f"application/dicom; transfer-syntax={chosen}",
                "Content-Location": _instance_url(root, item),
                "Content-Length": str(len(data))}, [data]

    head = part(items[0])  # before answering: a 406 is still possible here

    def parts() -> Iterator[tuple[dict[str, str], list[bytes]]]:
        yield head
        for item in items[1:]:
            yield part(item)

    boundary = new_boundary()
    return StreamingResponse(iter_multipart(parts(), boundary),
                             media_type=multipart_content_type(boundary, "application/dicom"))


def _frames(views: DeidViews, request: Request, view: LinkView, item: Item,
            numbers: list[int], root: str) -> Response:
    wants = _frame_wants(accepted(request))
    last: Exception | None = None
    with views.file_of(view, item) as path:
        for want, ts, multipart in wants:
            if not multipart and len(numbers) > 1:
                continue
            try:
                media, part_ts, chunks = _pixel_call(
                    pixels.frames, path, numbers, "*/*" if want in ("*/*", "*") else want,
                    transfer_syntax=ts)
                data = _pixel_call(list, chunks)
            except NotAcceptable as exc:
                last = exc
                continue
            part_type = media + (f"; transfer-syntax={part_ts}" if part_ts else "")
            if not multipart:
                return Response(b"".join(data), media_type=part_type)
            location = _instance_url(root, item) + "/frames/"
            boundary = new_boundary()
            parts = (({"Content-Type": part_type, "Content-Location": f"{location}{n}"},
                      [chunk]) for n, chunk in zip(numbers, data, strict=False))
            return StreamingResponse(iter_multipart(parts, boundary),
                                     media_type=multipart_content_type(boundary, media))
    raise NotAcceptable(getattr(last, "reason", "no acceptable representation of the frames"))


def _bulk(views: DeidViews, view: LinkView, item: Item, tag_text: str) -> Response:
    try:
        tag = parse_tag(tag_text)
    except InvalidQuery:
        raise NotFound(f"no bulk data {tag_text[:40]!r}") from None
    if tag not in item.pixel_tags:
        raise NotFound(f"no bulk data {tag_text[:40]!r}")
    with views.file_of(view, item) as path:
        if tag == 0x7FE00010:
            count = _pixel_call(pixels.number_of_frames, path)
            media, part_ts, chunks = _pixel_call(pixels.frames, path,
                                                 list(range(1, count + 1)), "*/*")
            data = _pixel_call(list, chunks)
        else:
            media, part_ts, data = OCTET, None, [_element_bytes(path, tag)]
    part_type = media + (f"; transfer-syntax={part_ts}" if part_ts else "")
    # Uncompressed: the whole value in one part (PS3.18 8.7.3.3); compressed: a frame each.
    parts: list[tuple[dict[str, str], list[bytes]]] = \
        [({"Content-Type": part_type}, data)] if media == OCTET else \
        [({"Content-Type": part_type}, [c]) for c in data]
    boundary = new_boundary()
    return StreamingResponse(iter_multipart(iter(parts), boundary),
                             media_type=multipart_content_type(boundary, media))


def _rendered(views: DeidViews, request: Request, view: LinkView, items: list[Item],
              frame_list: str | None, thumbnail: bool, instance_level: bool) -> Response:
    media = _image_type(request)
    params = _render_params(request)
    frames: list[int | None] = list(_frame_list(frame_list)) if frame_list else [None]

    def one(item: Item, frame: int | None) -> bytes:
        with views.file_of(view, item) as path:
            return render_path(path, frame, media, params, thumbnail)

    return rendered_response(list(items), frames, not instance_level, thumbnail, media, one)
