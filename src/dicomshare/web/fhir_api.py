"""FHIR R4 read and search under ``/fhir``: ImagingStudy, Patient, Endpoint, metadata.

Every search goes through :meth:`Access.search` with the caller's principal (bearer token
or session), at study, series and instance level, so a resource shows only what the
caller may see, and one it may not see answers 404 exactly like a missing one. Errors are
``OperationOutcome`` resources with the matching status. See docs/fhir.md.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlencode

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from dicomshare.access.policy import Principal, Visibility
from dicomshare.access.service import Access
from dicomshare.dicom.attributes import Level, is_valid_uid
from dicomshare.dicom.json import values
from dicomshare.dicom.matching import int_param, parse_qido
from dicomshare.errors import (
    DicomshareError,
    InvalidQuery,
    NotAcceptable,
    NotFound,
    Unauthenticated,
)
from dicomshare.fhir import resources as res
from dicomshare.fhir.ids import (
    PatientIds,
    PatientKey,
    patient_ids_of,
    record_patient_keys,
    study_patient_key,
)
from dicomshare.patients.identity import Patients, Record
from dicomshare.sharing.common import app_service
from dicomshare.storage import schema
from dicomshare.web.app import principal
from dicomshare.web.dicomweb import root_url

log = logging.getLogger(__name__)
router = APIRouter(include_in_schema=False)
FHIR_JSON = "application/fhir+json"
MAX_MATCHES = 10_000  # studies considered by one search (the index's QIDO limit)
DEFAULT_COUNT = 20
MAX_COUNT = 100
STUDY_FIELDS = "IssuerOfPatientID,StudyDescription,TimezoneOffsetFromUTC,AccessionNumber"
_CODES = {400: "invalid", 401: "login", 403: "forbidden", 404: "not-found",
          405: "not-supported", 406: "not-supported", 410: "deleted", 413: "too-costly",
          429: "throttled"}
_JSON_TYPES = {"*/*", "application/*", FHIR_JSON, "application/json", "application/json+fhir"}
_FORMATS = {"json", FHIR_JSON, "application/json"}
# When one Patient is reached several ways, the most specific relation wins.
_LINK_RANK = {"replaced-by": 0, "replaces": 1, "seealso": 2}


class MethodNotAllowed(DicomshareError):
    http_status = 405


def fhir_response(payload: Any, status: int = 200,
                  headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return Response(body, status_code=status, media_type=FHIR_JSON,
                    headers={"Cache-Control": "no-store", **(headers or {})})


def outcome_response(exc: DicomshareError) -> Response:
    headers = {"WWW-Authenticate": 'Bearer realm="dicomshare"'} \
        if isinstance(exc, Unauthenticated) else {}
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        headers["Retry-After"] = str(int(retry_after))
    code = _CODES.get(exc.http_status, "exception")
    return fhir_response(res.operation_outcome(code, exc.reason), exc.http_status, headers)


def _check_format(request: Request) -> None:
    fmt = request.query_params.get("_format")
    if fmt is not None and fmt.split(";")[0].strip().lower() not in _FORMATS:
        raise NotAcceptable(f"_format {fmt[:60]!r} is not supported; this server speaks JSON")
    accept = request.headers.get("accept")
    if fmt is None and accept:
        kinds = {part.split(";")[0].strip().lower() for part in accept.split(",")}
        if not kinds & _JSON_TYPES:
            raise NotAcceptable(f"the resources are available as {FHIR_JSON} only")


async def _answer(request: Request, work: Callable[[Fhir], Any], auth: bool = True
                  ) -> Response:
    """Authenticate, check the format, run ``work`` in a thread; errors as outcomes."""
    try:
        who = principal(request) if auth else None
        _check_format(request)
        ctx = Fhir(request, who)
        return fhir_response(await run_in_threadpool(work, ctx))
    except DicomshareError as exc:
        return outcome_response(exc)
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return fhir_response(res.operation_outcome(
            "exception", "internal error; see the server log"), 500)


class Fhir:
    """One request's view: the caller, the services, and the URLs to link to."""

    def __init__(self, request: Request, who: Principal | None) -> None:
        self.request = request
        self._who = who
        self.access: Access = request.app.state.access
        self.ids: PatientIds = patient_ids_of(request.app)
        self.dicomweb = root_url(request)
        prefix = request.app.state.settings.dicomweb_root
        site = self.dicomweb[:-len(prefix)] if prefix and self.dicomweb.endswith(prefix) \
            else self.dicomweb
        self.base = site.rstrip("/") + "/fhir"
        self._org_names: dict[int, str | None] = {}
        self._patients: Patients | None = None
        self._visibility: Visibility | None = None

    @property
    def who(self) -> Principal:
        assert self._who is not None
        return self._who

    # -- patients ------------------------------------------------------------------------
    def patient_key(self, study: dict[str, Any]) -> PatientKey:
        return study_patient_key(study, self.access.archive.index)

    def org_name(self, pk: int | None) -> str | None:
        if pk is None:
            return None
        if pk not in self._org_names:
            with self.access.archive.index.engine.connect() as conn:
                self._org_names[pk] = conn.execute(select(schema.organisation.c.name).where(
                    schema.organisation.c.pk == pk)).scalar()
        return self._org_names[pk]

    def studies(self, params: list[tuple[str, str]]) -> list[dict[str, Any]]:
        query = parse_qido(Level.STUDY, [("includefield", STUDY_FIELDS),
                                         ("limit", str(MAX_MATCHES)), *params])
        return self.access.search(self.who, query)

    def patient_studies(self, fhir_id: str) -> list[tuple[PatientKey, dict[str, Any]]]:
        """The visible studies of the patient ``fhir_id`` (empty when unknown)."""
        lookup = self.ids.decode(fhir_id)
        if lookup is None:
            return []
        if lookup.exact:
            params = [("PatientID", lookup.patient_id)] if lookup.patient_id else []
        else:
            params = [("PatientID", lookup.patient_id + "*")]
        found = []
        for study in self.studies(params):
            key = self.patient_key(study)
            if self.ids.encode(key) == fhir_id:
                found.append((key, study))
        return found

    def patient(self, key: PatientKey, studies: list[dict[str, Any]],
                linked: bool = True) -> dict[str, Any]:
        """The Patient; ``linked`` adds the person view (a search filters and sorts
        without it and adds it to the page's entries only)."""
        latest = max(studies, key=lambda st: (res.value(st, "00080020") or "",
                                              res.value(st, "0020000D")))
        links, active = self.person_links(key) if linked else (None, None)
        return res.patient(self.ids.encode(key), key, latest,
                           self.org_name(key.organisation_pk), links, active)

    # -- the person: patient records joined by links and merges ---------------------------
    @property
    def patients(self) -> Patients:
        """The app's patient records service, synced once per request (as /api/patients
        does), so a study stored a moment ago already has its record."""
        if self._patients is None:
            state = self.request.app.state
            found = app_service(state, "patients", lambda: Patients(
                state.archive.index.engine, state.access))
            found.sync()
            self._patients = found
        return self._patients

    @property
    def visibility(self) -> Visibility:
        """What the caller may search, read once per request."""
        if self._visibility is None:
            self._visibility = self.patients.visibility(self.who)
        return self._visibility

    def person_links(self, key: PatientKey) -> tuple[list[tuple[str, str]], bool]:
        """(Patient id, link type) to the other Patients of this one's person that the
        caller sees, and whether this Patient is active (False when every record of it
        is merged into another).

        The Patient's own records are the visible records that appear as it (an
        organisation's record can appear as several Patients, see
        :func:`record_patient_keys`); its person is the union of theirs. A record merged
        into one of ours ``replaces``, the record one of ours is merged into is
        ``replaced-by``, anything else (confirmed links, the same record under another
        Patient) is ``seealso``. Records the caller does not see never show."""
        if not key.patient_id:
            return [], True  # an empty PatientID has no record
        patients = self.patients
        vis = self.visibility
        own_id = self.ids.encode(key)
        links: dict[str, str] = {}

        def add(keys: set[PatientKey], kind: str) -> None:
            for other in keys:
                fhir_id = self.ids.encode(other)
                known = links.get(fhir_id)
                if fhir_id != own_id and (known is None
                                          or _LINK_RANK[kind] < _LINK_RANK[known]):
                    links[fhir_id] = kind

        candidates = [x for x in patients.find(self.who, key.patient_id, key.issuer, vis=vis)
                      if (x.issuer or None) == key.issuer]
        with patients.engine.connect() as conn:
            own: list[Record] = []
            for rec in candidates:
                keys = record_patient_keys(conn, rec, vis)
                if key in keys:
                    own.append(rec)
                    add(keys, "seealso")  # the same record under another Patient
            person: dict[int, Record] = {}
            for rec in own:
                person.update((x.pk, x) for x in patients.person_records(conn, rec))
            merged = patients.merged_into(conn, person)
            ours = {rec.pk for rec in own}
            shown = {pk for pk, rec in person.items()
                     if pk not in ours and patients.visible(conn, rec, vis)}
            for pk in sorted(shown):
                kind = "replaces" if merged.get(pk) in ours else \
                    "replaced-by" if any(merged.get(o) == pk for o in ours) else "seealso"
                add(record_patient_keys(conn, person[pk], vis), kind)
        # Inactive only with a forward pointer: a merge into a record the caller does not
        # see is not revealed, not even as "inactive".
        active = not own or not all(merged.get(pk) in shown for pk in ours)
        return sorted(links.items(), key=lambda item: (_LINK_RANK[item[1]], item[0])), active

    # -- studies -------------------------------------------------------------------------
    def imaging_study(self, study: dict[str, Any]) -> dict[str, Any]:
        uid = res.value(study, "0020000D")
        series = self.access.search(self.who, parse_qido(Level.SERIES, []), study_uid=uid,
                                    audit=False)
        instances = self.access.search(self.who, parse_qido(Level.IMAGE, []), study_uid=uid,
                                       audit=False)
        ref = f"Patient/{self.ids.encode(self.patient_key(study))}"
        return res.imaging_study(study, series, instances, ref)

    def bundle(self, kind: str, matches: list[Any], build: Callable[[Any], dict[str, Any]],
               paging: Paging) -> dict[str, Any]:
        count, offset = paging.count, paging.offset
        page = matches[offset:offset + count]
        params = [(k, v) for k, v in self.request.query_params.multi_items()
                  if k not in ("_count", "_offset")]

        def url(at: int) -> str:
            return f"{self.base}/{kind}?" + urlencode(
                [*params, ("_count", str(count)), ("_offset", str(at))])

        links = {"self": url(offset)}
        if offset + count < len(matches):
            links["next"] = url(offset + count)
        if offset > 0:
            links["previous"] = url(max(0, offset - count))
        return res.bundle(self.base, [build(m) for m in page], len(matches), links)


# -- search parameters ------------------------------------------------------------------------
_DATE = re.compile(r"^(?P<prefix>eq|ne|gt|lt|ge|le|sa|eb|ap)?(?P<y>\d{4})(-(?P<m>\d{2})"
                   r"(-(?P<d>\d{2}))?)?(T[0-9:.]+(Z|[+-]\d{2}:\d{2})?)?$")


def date_bounds(name: str, raw: str) -> tuple[dt.date | None, dt.date | None]:
    """A FHIR date search value (day precision) as inclusive bounds."""
    match = _DATE.match(raw.strip())
    if not match:
        raise InvalidQuery(f"{name}: {raw[:40]!r} is not a date (YYYY, YYYY-MM or "
                           "YYYY-MM-DD, optionally after ge, le, gt, lt or eq)")
    prefix = match.group("prefix") or "eq"
    if prefix not in ("eq", "gt", "lt", "ge", "le"):
        raise InvalidQuery(f"{name}: the prefix {prefix!r} is not supported")
    try:
        year, month, day = int(match.group("y")), match.group("m"), match.group("d")
        if day:
            start = end = dt.date(year, int(month), int(day))
        elif month:
            start = dt.date(year, int(month), 1)
            end = (start.replace(day=28) + dt.timedelta(days=4)).replace(day=1) \
                - dt.timedelta(days=1)
        else:
            start, end = dt.date(year, 1, 1), dt.date(year, 12, 31)
    except ValueError:
        raise InvalidQuery(f"{name}: {raw[:40]!r} is not a valid date") from None
    one = dt.timedelta(days=1)
    return {"eq": (start, end), "ge": (start, None), "gt": (end + one, None),
            "le": (None, end), "lt": (None, start - one)}[prefix]


class Paging:
    """The result parameters every search takes: _count, _offset, _format."""

    def __init__(self) -> None:
        self.count, self.offset = DEFAULT_COUNT, 0

    def take(self, name: str, raw: str) -> bool:
        """Whether ``name`` was one of them (and is now read)."""
        if name == "_count":
            self.count = int_param(name, raw, 0, MAX_COUNT)
        elif name == "_offset":
            self.offset = int_param(name, raw, 0, MAX_MATCHES)
        elif name != "_format":
            return False
        return True


class DateRange:
    """The intersection of several date conditions, as a DICOM DA range."""

    def __init__(self) -> None:
        self.low: dt.date | None = None
        self.high: dt.date | None = None
        self.used = False

    def add(self, name: str, raw: str) -> None:
        low, high = date_bounds(name, raw)
        self.used = True
        if low and (self.low is None or low > self.low):
            self.low = low
        if high and (self.high is None or high < self.high):
            self.high = high

    @property
    def empty(self) -> bool:
        return self.low is not None and self.high is not None and self.low > self.high

    def qido(self) -> str:
        return "-".join(d.strftime("%Y%m%d") if d else "" for d in (self.low, self.high))


def _tokens(name: str, raw: str) -> list[tuple[str | None, str]]:
    """``[system|]code`` values separated by commas (OR)."""
    out = []
    for item in raw.split(","):
        system, bar, code = item.partition("|")
        out.append((system if bar else None, code if bar else item))
        if not out[-1][1]:
            raise InvalidQuery(f"{name}: an empty value")
    return out


def _reference_id(name: str, raw: str) -> str:
    ref = raw.strip().rstrip("/")
    match = re.fullmatch(r"(?:.*/)?(?:Patient/)?([A-Za-z0-9\-.]{1,64})", ref)
    if not match or ("/" in ref and "/Patient/" not in f"/{ref}"):
        raise InvalidQuery(f"{name}: {raw[:80]!r} is not a Patient reference")
    return match.group(1)


# -- ImagingStudy -----------------------------------------------------------------------------
@router.get("/ImagingStudy/{study_id}")
async def read_study(request: Request, study_id: str) -> Response:
    def work(ctx: Fhir) -> dict[str, Any]:
        if not is_valid_uid(study_id):
            raise NotFound(f"ImagingStudy/{study_id[:80]} not found")
        found = ctx.studies([("StudyInstanceUID", study_id)])
        if not found:
            raise NotFound(f"ImagingStudy/{study_id} not found")
        return ctx.imaging_study(found[0])

    return await _answer(request, work)


@router.get("/ImagingStudy")
async def search_studies(request: Request) -> Response:
    def work(ctx: Fhir) -> dict[str, Any]:
        paging = Paging()
        uid_sets: list[set[str]] = []
        patient: str | None = None
        dates = DateRange()
        qido: list[tuple[str, str]] = []
        for name, raw in request.query_params.multi_items():
            if paging.take(name, raw):
                continue
            if name in ("_id", "identifier"):
                uids = set()
                for system, code in _tokens(name, raw):
                    if name == "identifier" and system not in (None, "", "urn:dicom:uid"):
                        raise InvalidQuery(f"identifier: the system {system[:80]!r} is not "
                                           "supported; use urn:dicom:uid")
                    uid = code[8:] if code.startswith("urn:oid:") else code
                    if not is_valid_uid(uid):
                        raise InvalidQuery(f"{name}: {code[:80]!r} is not a study UID "
                                           "(urn:oid:<StudyInstanceUID>)")
                    uids.add(uid)
                uid_sets.append(uids)
            elif name in ("patient", "subject"):
                if patient is not None:
                    raise InvalidQuery("patient is given more than once")
                patient = _reference_id(name, raw)
            elif name == "started":
                dates.add(name, raw)
            elif name == "modality":
                codes = []
                for system, code in _tokens(name, raw):
                    if system not in (None, "", res.DCM):
                        raise InvalidQuery(f"modality: the system must be {res.DCM}")
                    if not re.fullmatch(r"[A-Z0-9_ ]{1,16}", code):
                        raise InvalidQuery(f"modality: {code[:40]!r} is not a modality code")
                    codes.append(code)
                if any(k == "ModalitiesInStudy" for k, _ in qido):
                    raise InvalidQuery("modality is given more than once")
                qido.append(("ModalitiesInStudy", ",".join(codes)))
            else:
                raise InvalidQuery(f"unknown search parameter {name[:60]!r} for ImagingStudy")
        uids_wanted = set.intersection(*uid_sets) if uid_sets else None
        if uids_wanted is not None:
            qido.append(("StudyInstanceUID", ",".join(sorted(uids_wanted))))
        if dates.used:
            qido.append(("StudyDate", dates.qido()))
        studies: list[dict[str, Any]] = []
        if not dates.empty and uids_wanted != set():
            if patient is not None:
                studies = [st for _, st in ctx.patient_studies(patient)
                           if _study_matches(st, qido)]
            else:
                studies = ctx.studies(qido)
        studies.sort(key=lambda st: (res.value(st, "00080020") or "",
                                     res.value(st, "0020000D")), reverse=True)
        return ctx.bundle("ImagingStudy", studies, ctx.imaging_study, paging)

    return await _answer(request, work)


def _study_matches(study: dict[str, Any], qido: list[tuple[str, str]]) -> bool:
    """The other conditions, for a patient's studies (already found by PatientID)."""
    from dicomshare.dicom.matching import matches_json

    query = parse_qido(Level.STUDY, qido)
    for cond in query.conditions:
        if cond.keyword == "ModalitiesInStudy":
            have = set(values(study, "00080061"))
            wanted = set(cond.value) if isinstance(cond.value, tuple) else {cond.value}
            if not have & wanted:
                return False
        elif not matches_json(cond, study):
            return False
    return True


# -- Patient ----------------------------------------------------------------------------------
@router.get("/Patient/{patient_id}")
async def read_patient(request: Request, patient_id: str) -> Response:
    def work(ctx: Fhir) -> dict[str, Any]:
        found = ctx.patient_studies(patient_id)
        if not found:
            raise NotFound(f"Patient/{patient_id[:80]} not found")
        return ctx.patient(found[0][0], [st for _, st in found])

    return await _answer(request, work)


@router.get("/Patient")
async def search_patients(request: Request) -> Response:
    def work(ctx: Fhir) -> dict[str, Any]:
        paging = Paging()
        qido: list[tuple[str, str]] = []
        wanted_id: str | None = None
        identifier: tuple[str | None, str] | None = None
        gender: set[str] | None = None
        dates = DateRange()
        seen: set[str] = set()
        for name, raw in request.query_params.multi_items():
            if name in ("_id", "identifier", "name", "gender") and name in seen:
                raise InvalidQuery(f"{name} is given more than once")
            seen.add(name)
            if paging.take(name, raw):
                continue
            if name == "_id":
                wanted_id = raw.strip()
            elif name == "identifier":
                tokens = _tokens(name, raw)
                if len(tokens) != 1:
                    raise InvalidQuery("identifier: give one system|value")
                identifier = tokens[0]
                qido.append(("PatientID", identifier[1]))
                issuer = _issuer_of(identifier[0])
                if issuer:
                    qido.append(("IssuerOfPatientID", issuer))
            elif name == "name":
                text = raw.strip()
                if not text or re.search(r"[*?\\]", text):
                    raise InvalidQuery("name: give the start of a name part, without "
                                       "wildcards")
                qido += [("PatientName", text), ("fuzzymatching", "true")]
            elif name == "birthdate":
                dates.add(name, raw)
            elif name == "gender":
                gender = {g.strip() for g in raw.split(",")}
                if not gender <= {"male", "female", "other", "unknown"}:
                    raise InvalidQuery("gender: male, female, other or unknown")
            else:
                raise InvalidQuery(f"unknown search parameter {name[:60]!r} for Patient")
        if wanted_id is not None:
            lookup = ctx.ids.decode(wanted_id)
            if lookup is None:
                return ctx.bundle("Patient", [], lambda p: p, paging)
            if lookup.patient_id and not any(k == "PatientID" for k, _ in qido):
                qido.append(("PatientID", lookup.patient_id + ("" if lookup.exact else "*")))
        if dates.used:
            if dates.empty:
                return ctx.bundle("Patient", [], lambda p: p, paging)
            qido.append(("PatientBirthDate", dates.qido()))
        groups: dict[PatientKey, list[dict[str, Any]]] = {}
        for study in ctx.studies(qido):
            groups.setdefault(ctx.patient_key(study), []).append(study)
        plain = [(ctx.patient(key, studies, linked=False), key, studies)
                 for key, studies in groups.items()]
        matches = [(p, key, studies) for p, key, studies in plain
                   if (wanted_id is None or p["id"] == wanted_id)
                   and (gender is None or p["gender"] in gender)
                   and (identifier is None or _has_identifier(p, identifier))]
        matches.sort(key=lambda m: (m[0].get("name", [{}])[0].get("text", ""), m[0]["id"]))
        return ctx.bundle("Patient", matches, lambda m: ctx.patient(m[1], m[2]), paging)

    return await _answer(request, work)


def _issuer_of(system: str | None) -> str | None:
    if system and system.startswith("urn:oid:"):
        return system[8:]
    if system and system.startswith("urn:dicomshare:issuer:"):
        return unquote(system[len("urn:dicomshare:issuer:"):])
    return None


def _has_identifier(patient: dict[str, Any], token: tuple[str | None, str]) -> bool:
    system, code = token
    for ident in patient.get("identifier", []):
        if ident.get("value") == code and (system is None or ident.get("system") == system
                                           or (system == "" and "system" not in ident)):
            return True
    return False


# -- Endpoint, metadata, everything else ------------------------------------------------------
@router.get("/Endpoint/{endpoint_id}")
async def read_endpoint(request: Request, endpoint_id: str) -> Response:
    def work(ctx: Fhir) -> dict[str, Any]:
        if endpoint_id != res.ENDPOINT_ID:
            raise NotFound(f"Endpoint/{endpoint_id[:80]} not found")
        return res.endpoint(ctx.dicomweb)

    return await _answer(request, work)


@router.get("/metadata")
async def metadata(request: Request) -> Response:
    """The CapabilityStatement: open, like the OpenAPI pages (it holds no patient data)."""
    def work(ctx: Fhir) -> dict[str, Any]:
        return res.capability_statement(ctx.base, dt.date.today().isoformat())

    return await _answer(request, work, auth=False)


@router.api_route("/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
async def unsupported(request: Request, rest: str) -> Response:
    """Anything else: an OperationOutcome, never the generic JSON error."""
    def work(_ctx: Fhir) -> dict[str, Any]:
        if request.method != "GET":
            raise MethodNotAllowed("this FHIR server is read-only")
        raise NotFound(f"{rest[:80]!r} is not a supported FHIR resource or interaction; "
                       "see /fhir/metadata")

    return await _answer(request, work)
