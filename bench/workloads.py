"""The measured DICOMweb workloads: STOW-RS, QIDO-RS, WADO-RS and big-request memory.

Functions take an already running :class:`Server` and return raw numbers; the
caller decides ordering (interleaving servers limits drift) and reporting.
Nothing here asserts on timings.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import requests

from bench import datagen
from bench.procmem import RssSampler, rss_kib, tree
from bench.servers import Server

Log = Callable[[str], None]
JSON_ACCEPT = "application/dicom+json"
TIMEOUT = (10.0, 900.0)


def _stow_outcome(status: int, body: bytes, sent: int) -> tuple[int, str]:
    """Return (failed instances, error text) from a STOW-RS response."""
    if status not in (200, 202):
        return sent, f"HTTP {status}: {body[:200]!r}"
    try:
        js = json.loads(body) if body else {}
    except ValueError:
        return 0, ""
    if not isinstance(js, dict):
        return 0, ""
    failed = len((js.get("00081198") or {}).get("Value") or [])
    return failed, (f"{failed} instances in FailedSOPSequence" if failed else "")


@dataclass
class StowResult:
    instances: int = 0
    payload_bytes: int = 0
    requests: int = 0
    seconds: float = 0.0
    failed: int = 0
    errors: list[str] = field(default_factory=list)


def stow(server: Server, files: list[Path], clients: int, batch: int, slot: str) -> StowResult:
    """Send `files` with `clients` threads, `batch` instances per POST, one Session each."""
    res = StowResult()
    lock = threading.Lock()
    cursor = [0]
    url = f"{server.root}/studies"
    headers = {"Content-Type": datagen.STOW_CONTENT_TYPE, "Accept": JSON_ACCEPT}
    barrier = threading.Barrier(clients + 1)

    def worker() -> None:
        sess = server.session()
        barrier.wait()
        try:
            while True:
                with lock:
                    start = cursor[0]
                    cursor[0] += batch
                if start >= len(files):
                    return
                parts = [datagen.reslot(f.read_bytes(), slot) for f in files[start : start + batch]]
                r = sess.post(url, data=datagen.multipart(parts), headers=headers, timeout=TIMEOUT)
                failed, err = _stow_outcome(r.status_code, r.content, len(parts))
                with lock:
                    res.instances += len(parts)
                    res.payload_bytes += sum(len(p) for p in parts)
                    res.requests += 1
                    res.failed += failed
                    if err and len(res.errors) < 5:
                        res.errors.append(err)
        except Exception as exc:  # noqa: BLE001 - reported, never raised across threads
            with lock:
                res.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            sess.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    res.seconds = time.perf_counter() - t0
    return res


def upload(
    server: Server, files: list[Path], slot: str, batch: int, clients: int, log: Log, what: str
) -> None:
    """Untimed bulk load (QIDO corpus, WADO series); raises if anything was rejected."""
    t0 = time.perf_counter()
    res = stow(server, files, clients, batch, slot)
    if res.failed or res.errors or res.instances != len(files):
        raise RuntimeError(
            f"loading {what} into {server.name} failed: {res.failed} failed, "
            f"{res.instances}/{len(files)} sent; {res.errors[:3]}"
        )
    log(f"loaded {len(files)} {what} into {server.name} in {time.perf_counter() - t0:.1f}s")


# --- QIDO-RS -------------------------------------------------------------------------------


QUERY_KINDS = [
    "PatientID",
    "PatientName=ABC*",
    "StudyDate=<year>&limit=25",
    "limit=25&offset=<random>",
    "ModalitiesInStudy=<mod>&limit=25",
    "AccessionNumber",
]


def make_queries(n_studies: int, count: int, seed: int = 42) -> list[tuple[str, str]]:
    """(kind, relative URL) pairs mixing selective, wildcard, range and paging searches."""
    rng = random.Random(seed)
    prefixes = sorted({s[:3] for s in datagen.SURNAMES})
    modalities = list(datagen.MODALITY_WEIGHTS)  # CT first
    kinds = QUERY_KINDS
    out: list[tuple[str, str]] = []
    for i in range(count):
        kind = kinds[i % len(kinds)]
        a = datagen.study_attrs(rng.randrange(n_studies))
        if kind == "PatientID":
            q = f"PatientID={a.patient_id}"
        elif kind.startswith("PatientName"):
            q = f"PatientName={rng.choice(prefixes)}*"
        elif kind.startswith("StudyDate"):
            y = rng.randrange(2005, 2025)
            q = f"StudyDate={y}0101-{y}1231&limit=25"
        elif kind.startswith("limit"):
            q = f"limit=25&offset={rng.randrange(max(n_studies - 25, 1))}"
        elif kind.startswith("Modalities"):
            # No offset here: Orthanc 1.10 / DICOMweb 1.7 applies the offset before the
            # ModalitiesInStudy filter and returns too few studies, which is not comparable.
            q = f"ModalitiesInStudy={modalities[i // len(kinds) % len(modalities)]}&limit=25"
        else:
            q = f"AccessionNumber={a.accession}"
        out.append((kind, f"/studies?{q}"))
    return out


@dataclass
class QidoResult:
    latencies: dict[str, list[float]] = field(default_factory=dict)  # kind -> seconds
    counts: list[int] = field(default_factory=list)  # results per query, for cross-checks
    errors: list[str] = field(default_factory=list)

    def all(self) -> list[float]:
        return [x for v in self.latencies.values() for x in v]


def qido(
    servers: list[Server], queries: list[tuple[str, str]], warmup: int = 10
) -> dict[str, QidoResult]:
    """Run every query on every server back to back, alternating who goes first."""
    sessions = {s.name: s.session() for s in servers}
    results = {s.name: QidoResult() for s in servers}
    for i, (kind, rel) in enumerate(queries):  # the first `warmup` ones are not recorded
        order = servers if i % 2 == 0 else list(reversed(servers))
        for srv in order:
            t0 = time.perf_counter()
            try:
                r = sessions[srv.name].get(
                    srv.root + rel, headers={"Accept": JSON_ACCEPT}, timeout=TIMEOUT
                )
                body = r.content
                dt = time.perf_counter() - t0
            except requests.RequestException as exc:
                if i >= warmup:
                    results[srv.name].errors.append(f"{rel}: {exc}")
                    results[srv.name].counts.append(-1)
                continue
            if i < warmup:
                continue
            res = results[srv.name]
            if r.status_code not in (200, 204):
                if len(res.errors) < 5:
                    res.errors.append(f"{rel}: HTTP {r.status_code} {body[:120]!r}")
                res.counts.append(-1)
                continue
            res.latencies.setdefault(kind, []).append(dt)
            try:
                res.counts.append(len(r.json()) if body else 0)
            except ValueError:
                res.counts.append(-1)
    for sess in sessions.values():
        sess.close()
    return results


# --- WADO-RS -------------------------------------------------------------------------------

WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'


@dataclass
class WadoResult:
    bytes: int
    seconds: float
    content_type: str


def wado_series(server: Server, study: str, series: str, accept: str = WADO_ACCEPT) -> WadoResult:
    """Retrieve a whole series, streaming 1 MiB chunks to /dev/null."""
    sess = server.session()
    url = f"{server.root}/studies/{study}/series/{series}"
    total = 0
    try:
        t0 = time.perf_counter()
        with (
            sess.get(url, headers={"Accept": accept}, stream=True, timeout=TIMEOUT) as r,
            open(os.devnull, "wb") as sink,
        ):
            if r.status_code != 200:
                raise RuntimeError(f"WADO-RS HTTP {r.status_code}: {r.content[:200]!r}")
            for chunk in r.iter_content(chunk_size=datagen.MIB):
                sink.write(chunk)
                total += len(chunk)
            ctype = r.headers.get("Content-Type", "")
        return WadoResult(total, time.perf_counter() - t0, ctype)
    finally:
        sess.close()


# --- memory under one big STOW-RS request ----------------------------------------------------


@dataclass
class BigStowResult:
    mib: int
    body_bytes: int
    seconds: float
    rss_before_kib: int
    peak_sampled_kib: int
    peak_hwm_kib: int
    hwm_reset: bool
    rss_after_kib: int
    failed: int
    error: str


def big_stow(
    server: Server, body: datagen.BigBody, mib: int, slot: str, settle: float = 2.0
) -> BigStowResult:
    """Stream a multipart body from disk (never held in memory) while sampling server RSS."""
    u = urlsplit(server.root)
    pid = server.proc.pid
    rss_before = rss_kib(tree(pid))
    conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=TIMEOUT[1])
    status, data, error = 0, b"", ""
    with RssSampler(pid) as sampler:
        t0 = time.perf_counter()
        try:
            conn.connect()
            assert conn.sock is not None
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.putrequest("POST", f"{u.path}/studies", skip_accept_encoding=True)
            for k, v in server.headers.items():
                conn.putheader(k, v)
            conn.putheader("Content-Type", datagen.STOW_CONTENT_TYPE)
            conn.putheader("Content-Length", str(body.size))
            conn.putheader("Accept", JSON_ACCEPT)
            conn.endheaders()
            with body.path.open("rb") as f:
                for block in datagen.reslot_stream(f, slot):
                    conn.send(block)
        except OSError as exc:  # server may answer early (e.g. 413) and close
            error = f"{type(exc).__name__} while sending: {exc}"
        try:
            resp = conn.getresponse()
            status, data = resp.status, resp.read()
        except (OSError, http.client.HTTPException) as exc:
            error = error or f"{type(exc).__name__}: {exc}"
        seconds = time.perf_counter() - t0
    conn.close()
    peak = sampler.result()
    failed, err = _stow_outcome(status, data, body.instances) if status else (body.instances, "")
    time.sleep(settle)
    return BigStowResult(
        mib,
        body.size,
        seconds,
        rss_before,
        peak.sampled_kib,
        peak.hwm_kib,
        peak.hwm_reset,
        rss_kib(tree(pid)),
        failed,
        error or err,
    )
