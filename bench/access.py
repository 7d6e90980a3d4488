#!/usr/bin/env python3
"""Access checks must not make search slow: QIDO-RS study search as a clinician vs a superuser.

What it measures
    One dicomshare server holds ``--studies`` one-instance studies spread round-robin
    over ``--orgs`` organisations, each stored (STOW-RS, 50 instances per request) by
    that organisation's clinician, so the organisation owns them. Every organisation
    then opens 25 of its studies to 5 other organisations (5 studies each) and 2 of
    its patients to the next organisation (view grants).

    The same QIDO-RS study searches are then timed as the superuser (sees everything,
    no visibility predicate in the SQL) and as the clinician of one organisation (sees
    about 1/``--orgs`` of the studies plus what grants open to it), alternating who goes
    first, over one keep-alive ``requests.Session`` per user. Each query is repeated
    ``--repeat`` times after a few untimed warm-up rounds; the parameters (name prefix,
    year, patient, page) vary from one repetition to the next, identically for both.

    The goal of the issue is that the clinician's p50 stays within 1.5x of the
    superuser's for every query; the last line says whether it does. Before timing,
    the harness checks that the clinician sees exactly the studies it owns or was
    granted and the superuser all of them. Timings never change the exit status
    (like bench/run.py); a failed sanity check or request does (1).

How to run
    .venv/bin/python bench/access.py                      # 10,000 studies, 20 orgs
    .venv/bin/python bench/access.py --studies 2000 --repeat 20   # quick
    .venv/bin/python bench/access.py --database-url \\
        postgresql+psycopg://postgres@127.0.0.1:5432/test --pg-schema bench_access

    Populating takes a few minutes, so the populated data folder (and, with
    ``--pg-schema``, the PostgreSQL schema it goes with; its tables are ANALYZEd before
    each run, as autovacuum would) is kept under ``--keep``
    (default /tmp/dicomshare-bench-access), keyed by the parameters, and reused by the
    next run with the same parameters. ``--fresh`` repopulates; ``--no-keep`` uses a
    temporary folder (and drops the schema) instead. With ``--database-url`` but no
    ``--pg-schema`` the database must be empty for a fresh population.

    The progress log goes to stderr, the markdown report to stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import requests
from pydicom.uid import generate_uid

REPO_ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as `python bench/access.py`: import as the `bench` package
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        sys.path[0] = str(REPO_ROOT)
    else:
        sys.path.insert(0, str(REPO_ROOT))

from bench import datagen  # noqa: E402
from bench.report import percentile  # noqa: E402
from bench.run import header  # noqa: E402
from bench.servers import (  # noqa: E402
    DICOMSHARE,
    Server,
    _wait_ready,
    free_port,
    resolve_dicomshare,
)

GEN_VERSION = 1  # bump when population changes, to invalidate kept data folders
GOAL = 1.5  # clinician p50 / superuser p50
BATCH = 50  # instances per STOW-RS request while populating
STUDY_GRANTS = 25  # studies each organisation opens, to ...
GRANTEES = 5  # ... this many other organisations (STUDY_GRANTS / GRANTEES studies each)
PATIENT_GRANTS = 2  # patients each organisation opens to the next one
MODALITIES = ("CT", "MR", "US", "CR", "DX")
BODY_PARTS = ("HEAD", "CHEST", "ABDOMEN", "PELVIS", "SPINE", "KNEE")
FIRST_YEAR, YEARS = 2015, 10
JSON_ACCEPT = "application/dicom+json"
TIMEOUT = (10.0, 600.0)
SUPERUSER = "bench-superuser"
_T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# -- the data ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudySpec:
    """Everything about synthetic study ``index``; deterministic, so never stored."""

    index: int
    org: int
    study_uid: str
    patient_id: str
    patient_name: str
    study_date: str
    modality: str
    description: str


def org_name(k: int) -> str:
    return f"org-{k:02d}"


def clinician_name(k: int) -> str:
    return f"clin-{k:02d}"


def study_spec(i: int, orgs: int) -> StudySpec:
    """Study ``i`` belongs to organisation ``i % orgs``; each patient has two studies,
    both in that organisation (studies ``i`` and ``i + orgs``)."""
    org = i % orgs
    patient = (i // (2 * orgs)) * orgs + org
    prng = random.Random(f"access-patient-{patient}")
    rng = random.Random(f"access-study-{i}")
    day = date(FIRST_YEAR, 1, 1) + timedelta(days=rng.randrange(YEARS * 365))
    modality = rng.choice(MODALITIES)
    return StudySpec(
        index=i,
        org=org,
        study_uid=generate_uid(entropy_srcs=[f"dicomshare-bench-access-{GEN_VERSION}-{i}"]),
        patient_id=f"AP{patient:07d}",
        patient_name=f"{prng.choice(datagen.SURNAMES)}^{prng.choice(datagen.GIVEN)}",
        study_date=day.strftime("%Y%m%d"),
        modality=modality,
        description=f"{modality} {rng.choice(BODY_PARTS)}",
    )


def instance_bytes(spec: StudySpec) -> bytes:
    """One 64x64 16-bit instance of the study, as a Part 10 file."""
    ds = datagen._base(datagen.SOP_CLASSES[spec.modality], generate_uid())
    ds.PatientName, ds.PatientID = spec.patient_name, spec.patient_id
    ds.PatientBirthDate = f"19{40 + spec.index % 60:02d}0{1 + spec.index % 9}15"
    ds.PatientSex = "MF"[spec.index % 2]
    ds.StudyInstanceUID, ds.SeriesInstanceUID = spec.study_uid, generate_uid()
    ds.StudyDate = ds.SeriesDate = spec.study_date
    ds.StudyTime = f"{8 + spec.index % 10:02d}{spec.index % 60:02d}00"
    ds.AccessionNumber, ds.StudyID = f"AA{spec.index:08d}", str(spec.index % 100000)
    ds.ReferringPhysicianName = f"REF^{datagen.SURNAMES[spec.index % len(datagen.SURNAMES)]}"
    ds.StudyDescription = spec.description
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = spec.modality, 1, 1
    pixels = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * (1 + spec.index % 7)) % 4096
    datagen._set_pixels(ds, pixels, 12)
    return datagen._encode(ds)


@dataclass(frozen=True)
class GrantSpec:
    source: int  # granting organisation
    grantee: int
    study: int | None = None  # study index, or ...
    patient_id: str | None = None  # ... all the source's studies of this patient


def grant_specs(studies: int, orgs: int) -> list[GrantSpec]:
    """Organisation k opens STUDY_GRANTS of its studies to the GRANTEES organisations
    after it, and PATIENT_GRANTS of its patients (from its newest studies) to the next."""
    if orgs < 2:
        return []
    out: list[GrantSpec] = []
    grantees = min(GRANTEES, orgs - 1)
    for k in range(orgs):
        own = list(range(k, studies, orgs))
        for j, i in enumerate(own[:STUDY_GRANTS]):
            out.append(GrantSpec(k, (k + 1 + j % grantees) % orgs, study=i))
        patients = list(dict.fromkeys(study_spec(i, orgs).patient_id for i in reversed(own)))
        for pid in patients[:PATIENT_GRANTS]:
            out.append(GrantSpec(k, (k + 1) % orgs, patient_id=pid))
    return out


def visible_to(org: int, specs: list[StudySpec], grants: list[GrantSpec]) -> set[str]:
    """Study UIDs a clinician of ``org`` must see: owned, or opened by a grant."""
    seen = {s.study_uid for s in specs if s.org == org}
    for g in (g for g in grants if g.grantee == org):
        if g.study is not None:
            seen.add(specs[g.study].study_uid)
        else:
            seen |= {s.study_uid for s in specs
                     if s.org == g.source and s.patient_id == g.patient_id}
    return seen


# -- the server ----------------------------------------------------------------------------


@dataclass
class Setup:
    """Where a populated archive lives and how to reach its users."""

    folder: Path  # holds data/ (DICOMSHARE_DATA_DIR), state.json and server logs
    cmd: str
    database_url: str | None
    workers: int
    tokens: dict[str, str] = field(default_factory=dict)  # user -> bearer token

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ, DICOMSHARE_DATA_DIR=str(self.folder / "data"))
        if self.database_url:
            env["DICOMSHARE_DATABASE_URL"] = self.database_url
        return env

    def cli(self, *args: str) -> str:
        res = subprocess.run([self.cmd, *args], env=self.env, cwd=self.folder,
                             capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            raise RuntimeError(f"dicomshare {' '.join(args)} failed ({res.returncode}):\n"
                               f"{res.stdout[-2000:]}{res.stderr[-2000:]}")
        return res.stdout

    def start(self, fsync: bool = True) -> Server:
        """Serve the archive on a free port; its log goes to ``server.log``
        (``server-populate.log`` for the loading server, which runs with fsync off)."""
        port = free_port()
        log_path = self.folder / ("server.log" if fsync else "server-populate.log")
        env = self.env if fsync else dict(self.env, DICOMSHARE_FSYNC="false")
        serve = [self.cmd, "serve", "--http-host", "127.0.0.1", "--http-port", str(port),
                 "--dicom-port", "0", "--workers", str(self.workers)]
        with log_path.open("wb") as logf:
            proc = subprocess.Popen(serve, cwd=self.folder, env=env, stdout=logf,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        _wait_ready(f"{base}/healthz", proc, 90, log_path)
        version = subprocess.run([self.cmd, "--version"], env=self.env, capture_output=True,
                                 text=True, timeout=60).stdout.strip()
        log(f"dicomshare {version} pid {proc.pid} on {base}, {self.workers} worker(s)"
            f"{', fsync off' if not fsync else ''}")
        # keep=True: Server.stop() must not delete the (kept) folder
        return Server(DICOMSHARE, f"{base}/dicomweb", self.auth(SUPERUSER), proc,
                      self.folder, log_path, version or "dicomshare", keep=True)

    def auth(self, user: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[user]}"}

    def session(self, user: str) -> requests.Session:
        sess = requests.Session()
        sess.headers.update(self.auth(user))
        sess.headers["Accept-Encoding"] = "identity"
        return sess


def _api(sess: requests.Session, base: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = sess.post(f"{base}/api/{path}", json=body, timeout=TIMEOUT)
    if r.status_code != 201:
        raise RuntimeError(f"POST /api/{path} {body}: HTTP {r.status_code} {r.text[:300]}")
    out: dict[str, Any] = r.json()
    return out


def _stow(sess: requests.Session, root: str, parts: list[bytes]) -> None:
    r = sess.post(f"{root}/studies", data=datagen.multipart(parts), timeout=TIMEOUT,
                  headers={"Content-Type": datagen.STOW_CONTENT_TYPE, "Accept": JSON_ACCEPT})
    failed = (r.json().get("00081198") or {}).get("Value") if r.status_code == 200 else None
    if r.status_code != 200 or failed:
        raise RuntimeError(f"STOW-RS HTTP {r.status_code}: {r.text[:300]}")


def populate(setup: Setup, studies: int, orgs: int) -> None:
    """Superuser (CLI), organisations, clinicians and their tokens (API), studies
    (STOW-RS as each owner's clinician), grants (API as the granting clinician)."""
    setup.cli("users", "create", SUPERUSER, "--org", "bench-site", "--role", "admin",
              "--superuser", "--no-password")
    setup.tokens[SUPERUSER] = setup.cli("tokens", "create", SUPERUSER).strip().splitlines()[-1]
    srv = setup.start(fsync=False)  # durability does not matter while loading
    try:
        base = srv.root.rsplit("/", 1)[0]
        with setup.session(SUPERUSER) as su:
            for k in range(orgs):
                _api(su, base, "organisations", {"name": org_name(k)})
                _api(su, base, "users", {"name": clinician_name(k), "role": "clinician",
                                         "organisation": org_name(k)})
                created = _api(su, base, "tokens", {"user": clinician_name(k), "name": "bench"})
                setup.tokens[clinician_name(k)] = created["token"]
        log(f"created {orgs} organisations with one clinician each")

        specs = [study_spec(i, orgs) for i in range(studies)]
        batches = [own[start:start + BATCH]
                   for own in (specs[k::orgs] for k in range(orgs))
                   for start in range(0, len(own), BATCH)]
        lock = threading.Lock()
        done = [0]
        t0 = time.perf_counter()

        def send(batch: list[StudySpec]) -> None:
            parts = [instance_bytes(spec) for spec in batch]
            with setup.session(clinician_name(batch[0].org)) as sess:
                _stow(sess, srv.root, parts)
            with lock:
                done[0] += len(batch)
                if done[0] % 1000 < len(batch):
                    log(f"  stored {done[0]}/{studies}")

        with ThreadPoolExecutor(2) as pool:
            list(pool.map(send, batches))
        log(f"stored {studies} studies in {time.perf_counter() - t0:.0f}s")

        grants = grant_specs(studies, orgs)
        sessions = {k: setup.session(clinician_name(k)) for k in range(orgs)}
        for g in grants:
            body: dict[str, Any] = {"organisation": org_name(g.grantee), "permissions": ["view"]}
            if g.study is not None:
                body["study_uid"] = specs[g.study].study_uid
            else:
                body["patient_id"] = g.patient_id
            _api(sessions[g.source], base, "grants", body)
        for sess in sessions.values():
            sess.close()
        log(f"created {len(grants)} grants")
    finally:
        log(f"populating server: {srv.stop()}")


# -- PostgreSQL ----------------------------------------------------------------------------


def pg_schema(base: str, schema: str, recreate: bool) -> str:
    """A URL whose search_path is ``schema`` in ``base``'s database (made if missing;
    dropped and made again with ``recreate``), like tests/conftest.py does."""
    import psycopg

    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", schema):
        raise ValueError(f"--pg-schema {schema!r}: use lower-case letters, digits and _")
    plain = base.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain, autocommit=True) as conn:
        if recreate:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
    sep = "&" if "?" in base else "?"
    return f"{base}{sep}options=-csearch_path%3D{schema}"


def analyze_pg(url: str) -> None:
    """Give PostgreSQL's planner statistics, as autovacuum would on a live server (it may
    be off, or not have run yet, right after loading)."""
    import psycopg

    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"),
                         autocommit=True) as conn:
        for table in ("study", "series", "instance", "study_owner", "instance_owner",
                      "access_grant"):
            conn.execute(f"ANALYZE {table}")


def drop_pg_schema(base: str, schema: str) -> None:
    import psycopg

    with psycopg.connect(base.replace("postgresql+psycopg://", "postgresql://"),
                         autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


# -- the queries ---------------------------------------------------------------------------


@dataclass(frozen=True)
class QueryKind:
    label: str
    make: Callable[[random.Random], str]  # -> query string, parameters drawn from rng


def query_kinds(specs: list[StudySpec], org: int) -> list[QueryKind]:
    prefixes = sorted({s[:3] for s in datagen.SURNAMES})
    own_patients = sorted({s.patient_id for s in specs if s.org == org})

    def one_year(rng: random.Random) -> str:
        y = FIRST_YEAR + rng.randrange(YEARS)
        return f"StudyDate={y}0101-{y}1231&limit=100"

    return [
        QueryKind("all studies, limit=100", lambda rng: "limit=100"),
        QueryKind("all studies, page 3 (offset=200)", lambda rng: "limit=100&offset=200"),
        QueryKind("PatientName=ABC* (prefix)",
                  lambda rng: f"PatientName={rng.choice(prefixes)}*&limit=100"),
        QueryKind("StudyDate one year", one_year),
        QueryKind("ModalitiesInStudy=MR", lambda rng: "ModalitiesInStudy=MR&limit=100"),
        QueryKind("PatientID exact (own patient)",
                  lambda rng: f"PatientID={rng.choice(own_patients)}&limit=100"),
        QueryKind("StudyDescription=*PART*",
                  lambda rng: f"StudyDescription=*{rng.choice(BODY_PARTS)}*&limit=100"),
        QueryKind("StudyDate year + NumberOfStudyRelated*",
                  lambda rng: one_year(rng) + "&includefield=NumberOfStudyRelatedInstances"
                  "&includefield=NumberOfStudyRelatedSeries"),
    ]


@dataclass
class Timings:
    seconds: list[float] = field(default_factory=list)
    results: list[int] = field(default_factory=list)

    def ms(self, pct: float) -> float:
        return percentile([x * 1000 for x in self.seconds], pct)


def _get(sess: requests.Session, root: str, qs: str) -> tuple[float, list[Any]]:
    t0 = time.perf_counter()
    r = sess.get(f"{root}/studies?{qs}", headers={"Accept": JSON_ACCEPT}, timeout=TIMEOUT)
    body = r.content
    dt = time.perf_counter() - t0
    if r.status_code not in (200, 204):
        raise RuntimeError(f"QIDO {qs}: HTTP {r.status_code} {body[:300]!r}")
    return dt, (json.loads(body) if body else [])


def all_visible(sess: requests.Session, root: str) -> Iterator[str]:
    """Every StudyInstanceUID the session's user can find, paging 10,000 at a time."""
    offset = 0
    while True:
        _, page = _get(sess, root, f"limit=10000&offset={offset}")
        for item in page:
            yield item["0020000D"]["Value"][0]
        if len(page) < 10000:
            return
        offset += len(page)


def measure(sessions: dict[str, requests.Session], root: str, kinds: list[QueryKind],
            repeat: int, warmup: int, seed: int = 7) -> dict[str, dict[str, Timings]]:
    """Per query kind and user: latencies; rounds interleave kinds, users alternate first."""
    users = list(sessions)
    out = {k.label: {u: Timings() for u in users} for k in kinds}
    rng = random.Random(seed)
    for rnd in range(warmup + repeat):
        for ki, kind in enumerate(kinds):
            qs = kind.make(rng)
            for user in users if (rnd + ki) % 2 == 0 else reversed(users):
                dt, found = _get(sessions[user], root, qs)
                if rnd >= warmup:
                    out[kind.label][user].seconds.append(dt)
                    out[kind.label][user].results.append(len(found))
        if rnd + 1 == warmup:
            log(f"warm-up done ({warmup} rounds); timing {repeat} rounds")
        elif rnd >= warmup and (rnd - warmup + 1) % 10 == 0:
            log(f"  round {rnd - warmup + 1}/{repeat}")
    return out


def report(results: dict[str, dict[str, Timings]], su: str, clin: str) -> tuple[list[str], str]:
    lines = [
        "| Query | rows su / clin (mean) | superuser p50 (ms) | p95 | "
        "clinician p50 (ms) | p95 | clin/su p50 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    ratios: dict[str, float] = {}
    for label, by_user in results.items():
        a, b = by_user[su], by_user[clin]
        ratio = b.ms(50) / a.ms(50)
        ratios[label] = ratio
        rows = (f"{sum(a.results) / len(a.results):.0f} / "
                f"{sum(b.results) / len(b.results):.0f}")
        flag = "" if ratio <= GOAL else " **over**"
        lines.append(f"| {label} | {rows} | {a.ms(50):.1f} | {a.ms(95):.1f} | "
                     f"{b.ms(50):.1f} | {b.ms(95):.1f} | {ratio:.2f}x{flag} |")
    worst = max(ratios, key=lambda k: ratios[k])
    geo = float(np.exp(np.mean(np.log(list(ratios.values())))))
    over = [k for k, r in ratios.items() if r > GOAL]
    verdict = (
        f"Verdict: {'PASS' if not over else 'FAIL'}: clinician p50 "
        + ("within" if not over else f"above {GOAL}x for {len(over)} of {len(ratios)} queries;")
        + (f" {GOAL}x of the superuser's for all {len(ratios)} queries;" if not over else "")
        + f" worst {ratios[worst]:.2f}x ({worst}), geometric mean {geo:.2f}x"
    )
    return lines, verdict


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--studies", type=int, default=10000, help="one-instance studies")
    p.add_argument("--orgs", type=int, default=20, help="organisations owning them")
    p.add_argument("--repeat", type=int, default=50, help="timed rounds per query and user")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    p.add_argument("--as-org", type=int, default=0, help="whose clinician searches")
    p.add_argument("--database-url", default=None,
                   help="DICOMSHARE_DATABASE_URL, e.g. postgresql+psycopg://...; default: "
                        "SQLite in the data folder")
    p.add_argument("--pg-schema", default=None,
                   help="with --database-url: use (and make) this schema of that database")
    p.add_argument("--keep", type=Path, default=Path("/tmp/dicomshare-bench-access"),
                   help="folder where populated archives are kept, one per parameter set")
    p.add_argument("--no-keep", action="store_true",
                   help="populate a temporary archive and delete it (and the schema) after")
    p.add_argument("--fresh", action="store_true", help="repopulate a kept archive")
    p.add_argument("--workers", type=int, default=1, help="server HTTP worker processes")
    p.add_argument("--dicomshare-cmd", default=".venv/bin/dicomshare",
                   help="dicomshare executable (relative paths: to the repo root)")
    args = p.parse_args(argv)
    if args.pg_schema and not args.database_url:
        p.error("--pg-schema needs --database-url")
    if args.orgs < 2 or args.studies < 2 * args.orgs or not 0 <= args.as_org < args.orgs:
        p.error("need --orgs >= 2, --studies >= 2 * --orgs and 0 <= --as-org < --orgs")
    return args


def archive_folder(args: argparse.Namespace) -> Path:
    key = f"s{args.studies}-o{args.orgs}-v{GEN_VERSION}"
    if args.database_url:
        where = f"{args.database_url}|{args.pg_schema or ''}"
        key += "-db" + hashlib.sha256(where.encode()).hexdigest()[:10]
    return args.keep / key


def prepare(args: argparse.Namespace, cmd: str) -> Setup:
    """A populated archive: the kept one for these parameters, or a new one."""
    if args.no_keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="access-", dir=args.keep))
    else:
        folder = archive_folder(args)
    state_path = folder / "state.json"
    params = {"version": GEN_VERSION, "studies": args.studies, "orgs": args.orgs}
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    reuse = not args.fresh and state.get("params") == params and state.get("complete")
    url = args.database_url
    if url and args.pg_schema:
        url = pg_schema(url, args.pg_schema, recreate=not reuse)
    setup = Setup(folder, cmd, url, args.workers)
    if reuse:
        setup.tokens = state["tokens"]
        log(f"reusing the populated archive in {folder}")
        return setup
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "data").mkdir(parents=True)
    log(f"populating {folder}: {args.studies} studies, {args.orgs} organisations")
    t0 = time.perf_counter()
    populate(setup, args.studies, args.orgs)
    state_path.write_text(json.dumps({"params": params, "complete": True,
                                      "tokens": setup.tokens}, indent=1))
    log(f"populated in {time.perf_counter() - t0:.0f}s")
    return setup


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cmd = resolve_dicomshare(args.dicomshare_cmd, REPO_ROOT)
    setup = prepare(args, cmd)
    specs = [study_spec(i, args.orgs) for i in range(args.studies)]
    grants = grant_specs(args.studies, args.orgs)
    clin = clinician_name(args.as_org)
    if setup.database_url and setup.database_url.startswith("postgresql"):
        analyze_pg(setup.database_url)
    srv = setup.start()
    try:
        sessions = {SUPERUSER: setup.session(SUPERUSER), clin: setup.session(clin)}
        expected = visible_to(args.as_org, specs, grants)
        seen = {u: set(all_visible(s, srv.root)) for u, s in sessions.items()}
        log(f"visible studies: superuser {len(seen[SUPERUSER])}, {clin} {len(seen[clin])} "
            f"(expected {args.studies} and {len(expected)})")
        if seen[SUPERUSER] != {s.study_uid for s in specs} or seen[clin] != expected:
            log("sanity check failed: visible studies are not what was stored and granted")
            return 1
        kinds = query_kinds(specs, args.as_org)
        results = measure(sessions, srv.root, kinds, args.repeat, args.warmup)
        for sess in sessions.values():
            sess.close()
        version = srv.version
    finally:
        log(f"server: {srv.stop()}")
        if args.no_keep:
            shutil.rmtree(setup.folder, ignore_errors=True)
            if args.database_url and args.pg_schema:
                drop_pg_schema(args.database_url, args.pg_schema)
    backend = "PostgreSQL" if args.database_url else "SQLite"
    lines = header(args, {DICOMSHARE: version}, "Access-check search benchmark",
                   "bench/access.py")
    granted = len(expected) - sum(1 for s in specs if s.org == args.as_org)
    lines += [
        f"- Index: {backend}; {args.studies} one-instance studies over {args.orgs} "
        f"organisations, {len(grants)} view grants; server with {args.workers} worker(s)"
        + ("; tables ANALYZEd before the run" if args.database_url else ""),
        f"- Clinician `{clin}` sees {len(expected)} studies ({granted} of them through "
        f"grants); the superuser sees all {args.studies}",
        f"- {args.repeat} timed rounds per query and user after {args.warmup} warm-up rounds; "
        "users alternate who goes first; one keep-alive session each",
        "",
    ]
    table, verdict = report(results, SUPERUSER, clin)
    print("\n".join(lines + table + ["", verdict]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
