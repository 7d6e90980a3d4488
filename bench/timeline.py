#!/usr/bin/env python3
"""The timeline of one linked patient must stay fast in a large index.

What it measures
    An index of ``--studies`` studies (one series, one instance each) spread over
    ``--orgs`` organisations, among them ``--person`` studies of one person stored by
    every organisation under its own PatientID (T-1 ... T-5) with the same name, birth
    date and sex. The rows are written straight into the index (the timeline reads only
    study, series, instance and ownership rows, never DICOM bytes), then a real server is
    started on it. The person's records are linked through the API (the rule proposes the
    links, the superuser confirms them), and the first organisation's clinician receives
    patient grants from the other organisations for the person's IDs.

    ``GET /api/patients/{id}/timeline`` is then timed ``--repeat`` times (after warm-up)
    for the superuser and for the clinician (whose visibility predicate comes from five
    grants); both must list all ``--person`` studies. The goal of the issue is a p50
    under 100 ms with 100,000 studies. Timings never change the exit status; a failed
    sanity check does (1).

How to run
    .venv/bin/python bench/timeline.py                       # 100,000 studies
    .venv/bin/python bench/timeline.py --studies 10000 --repeat 20   # quick

    The report goes to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent
DICOMSHARE = [str(ROOT / ".venv" / "bin" / "dicomshare")]
NAME, BIRTH, SEX = "MÜLLER^Jörg", "19700101", "M"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cli(data: Path, *args: str, stdin: str | None = None) -> str:
    env = {**os.environ, "DICOMSHARE_DATA_DIR": str(data)}
    out = subprocess.run([*DICOMSHARE, *args], input=stdin, capture_output=True, text=True,
                         env=env, check=True)
    return out.stdout.strip()


def populate(data: Path, studies: int, orgs: int, person: int) -> None:
    from sqlalchemy import select

    from dicomshare.storage import make_engine
    from dicomshare.storage import schema as s

    engine = make_engine(f"sqlite:///{data / 'index.db'}", durable=False)
    rng = random.Random(7)
    now = datetime.now(UTC)
    with engine.begin() as conn:
        org_pks = [conn.execute(select(s.organisation.c.pk).where(
            s.organisation.c.name == f"org{k}")).scalar_one() for k in range(orgs)]
        chosen = set(rng.sample(range(studies), person))
        batch_st: list[dict[str, Any]] = []
        k_person = 0
        for i in range(studies):
            org = i % orgs
            if i in chosen:
                org = k_person % orgs
                k_person += 1
                pid, name, birth, sex = f"T-{org + 1}", NAME, BIRTH, SEX
            else:
                pid = f"P{rng.randrange(studies // 2)}"
                name = f"NAME{pid}^GIVEN"
                birth = f"{rng.randrange(1930, 2020)}{rng.randrange(1, 13):02d}01"
                sex = rng.choice("MF")
            batch_st.append({
                "pk": i + 1, "study_instance_uid": f"1.2.826.0.1.3680043.99.{i}",
                "patient_name": name, "patient_name_lc": name.lower(), "patient_id": pid,
                "patient_birth_date": birth, "patient_sex": sex,
                "study_date": f"{rng.randrange(2000, 2025)}{rng.randrange(1, 13):02d}15",
                "study_time": "120000", "study_description": f"study {i}",
                "attributes": "{}", "created_at": now, "updated_at": now,
                "_org": org_pks[org]})
            if len(batch_st) == 5000 or i == studies - 1:
                _flush(conn, s, batch_st, now, rng)
                batch_st = []
                log(f"  {i + 1} studies")
    engine.dispose()


def _flush(conn: Any, s: Any, rows: list[dict[str, Any]], now: datetime,
           rng: random.Random) -> None:
    from sqlalchemy import insert

    conn.execute(insert(s.study), [{k: v for k, v in r.items() if k != "_org"} for r in rows])
    conn.execute(insert(s.study_owner), [{"study_pk": r["pk"], "organisation_pk": r["_org"]}
                                         for r in rows])
    conn.execute(insert(s.series), [{
        "pk": r["pk"], "series_instance_uid": r["study_instance_uid"] + ".1",
        "study_pk": r["pk"], "modality": rng.choice(["CT", "MR", "CR", "US"]),
        "body_part_examined": rng.choice(["CHEST", "HEAD", "ABDOMEN"]),
        "attributes": "{}", "created_at": now} for r in rows])
    conn.execute(insert(s.instance), [{
        "pk": r["pk"], "sop_instance_uid": r["study_instance_uid"] + ".1.1",
        "series_pk": r["pk"], "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
        "transfer_syntax_uid": "1.2.840.10008.1.2.1", "blob_key": f"none/{r['pk']}",
        "size": 0, "sha256": "0" * 64, "metadata": "{}", "created_at": now} for r in rows])
    conn.execute(insert(s.instance_owner), [{"instance_pk": r["pk"],
                                             "organisation_pk": r["_org"]} for r in rows])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def timed(sess: requests.Session, url: str, repeat: int, expect: int) -> list[float]:
    for _ in range(3):
        r = sess.get(url, timeout=120)
        r.raise_for_status()
        got = len(r.json()["studies"])
        if got != expect:
            raise SystemExit(f"sanity: the timeline lists {got} studies, not {expect}")
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        r = sess.get(url, timeout=120)
        times.append((time.perf_counter() - start) * 1000)
        r.raise_for_status()
    return sorted(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--studies", type=int, default=100_000)
    ap.add_argument("--orgs", type=int, default=5)
    ap.add_argument("--person", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=50)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ds-bench-timeline-") as tmp:
        data = Path(tmp) / "data"
        cli(data, "users", "create", "root", "--org", "site", "--role", "admin",
            "--superuser", "--no-password")
        for k in range(args.orgs):
            cli(data, "users", "create", f"doc{k}", "--org", f"org{k}", "--role", "clinician",
                "--no-password")
        tokens = {u: cli(data, "tokens", "create", u)
                  for u in ["root", *(f"doc{k}" for k in range(args.orgs))]}
        log(f"populating {args.studies} studies")
        populate(data, args.studies, args.orgs, args.person)
        port = free_port()
        env = {**os.environ, "DICOMSHARE_DATA_DIR": str(data)}
        proc = subprocess.Popen([*DICOMSHARE, "serve", "--http-port", str(port),
                                 "--dicom-port", str(free_port())], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            base = f"http://127.0.0.1:{port}"
            for _ in range(600):
                try:
                    if requests.get(f"{base}/healthz", timeout=1).ok:
                        break
                except (requests.ConnectionError, requests.Timeout):
                    time.sleep(0.1)
            sess = {u: requests.Session() for u in tokens}
            for u, t in tokens.items():
                sess[u].headers["Authorization"] = f"Bearer {t}"
            start = time.perf_counter()
            found = sess["root"].get(f"{base}/api/patients", params={"patient_id": "T-1"})
            found.raise_for_status()
            log(f"first sync of {args.studies} studies: {time.perf_counter() - start:.1f} s")
            ref = found.json()[0]["id"]
            for p in sess["root"].get(f"{base}/api/patients/links",
                                      params={"state": "proposed"}).json():
                sess["root"].post(f"{base}/api/patients/links/{p['id']}/confirm")
            for k in range(1, args.orgs):
                r = sess[f"doc{k}"].post(f"{base}/api/grants", json={
                    "patient_id": f"T-{k + 1}", "user": "doc0", "permissions": ["view"]})
                r.raise_for_status()
            url = f"{base}/api/patients/{ref}/timeline"
            rows = []
            for who in ("root", "doc0"):
                t = timed(sess[who], url, args.repeat, args.person)
                rows.append((who, t[len(t) // 2], t[int(len(t) * 0.9)], t[-1]))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"## Timeline: {args.person} studies of one person over {args.orgs} organisations, "
          f"{args.studies} studies in the index (SQLite)\n")
    print("| caller | p50 ms | p90 ms | max ms |\n|---|---|---|---|")
    for who, p50, p90, worst in rows:
        print(f"| {'superuser' if who == 'root' else 'clinician with 4 grants'} | {p50:.1f} "
              f"| {p90:.1f} | {worst:.1f} |")
    ok = all(p50 < 100 for _, p50, _, _ in rows)
    print(f"\ngoal p50 < 100 ms: {'met' if ok else 'NOT met'}")
    print(json.dumps({"rows": rows}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
