"""The audit trail against real SQLite and PostgreSQL databases: recording, queries, the
hash chain and what ``verify`` catches, appends from several threads and processes,
exports (JSON lines, DICOM audit messages), syslog forwarding to real sockets, the key
file, and the ``dicomshare audit`` commands.
"""

from __future__ import annotations

import base64
import json
import multiprocessing
import os
import re
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from dicomshare import cli_audit
from dicomshare.access import audit as audit_module
from dicomshare.access.audit import (
    GENESIS,
    AuditError,
    AuditEvent,
    AuditLog,
    AuditRecord,
    load_or_create_key,
    verify_chain,
)
from dicomshare.access.audit_export import from_json_line, to_dicom_xml, to_json_line
from dicomshare.access.policy import Principal
from dicomshare.config import Settings, load_settings
from dicomshare.storage import make_engine, migrate

KEY = b"test-key-0123456789abcdef-0123456789"
ROOT = Path(__file__).resolve().parent.parent


def who(user: str, org: int, kind: str = "token", source: str | None = None) -> Principal:
    return Principal(user=user, organisation=f"org{org}", role="clinician",
                     organisation_pk=org, kind=kind, source=source)


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    eng = make_engine(database_url)
    migrate(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def audit(engine: Engine) -> Iterator[AuditLog]:
    log = AuditLog(engine, KEY)
    yield log
    log.close()


def fill(log: AuditLog, n: int, action: str = "study.view") -> None:
    for i in range(n):
        log.record(AuditEvent(action, principal=who("alice", 1), patient_ids=(f"P{i}",),
                              study_uids=(f"1.2.{i}",), data_organisations=(1,),
                              details={"i": i}))
    log.flush()


def raw(engine: Engine, sql: str, **params: Any) -> Any:
    with engine.begin() as conn:
        return conn.execute(text(sql), params)


def hash_of(engine: Engine, seq: int) -> str:
    with engine.connect() as conn:
        return str(conn.execute(text("SELECT hash FROM audit_event WHERE seq = :s"),
                                {"s": seq}).scalar_one())


# -- recording and queries -----------------------------------------------------------------
def test_record_and_query_filters(audit: AuditLog) -> None:
    alice, bob = who("alice", 1, source="10.0.0.1"), who("bob", 2, kind="session")
    events = [
        AuditEvent("study.retrieve", principal=alice, patient_ids=("P1",), study_uids=("S1",),
                   data_organisations=(1,), details={"n": 1}),
        # bob (organisation 2) reads data of organisation 1
        AuditEvent("study.retrieve", principal=bob, source="10.0.0.2", patient_ids=("P2",),
                   study_uids=("S2",), data_organisations=(1,), details={"n": 2}),
        # several patients and studies: P1 and S1 are not the first
        AuditEvent("study.search", principal=bob, patient_ids=("P3", "P1"),
                   study_uids=("S3", "S1"), data_organisations=(2, 2), details={"n": 3}),
        AuditEvent("login", outcome="failure", user_name="mallory", source="192.0.2.7",
                   details={"n": 4, "reason": "bad password"}),
        # mentions P1 and S1 in its details, but is about other patients and studies
        AuditEvent("study.search", principal=bob, patient_ids=("P8", "P9"),
                   study_uids=("S8", "S9"), details={"n": 5, "query": "P1 S1"}),
    ]
    for event in events:
        audit.record(event)
    audit.flush()
    time.sleep(0.02)
    mid = datetime.now(UTC)
    time.sleep(0.02)
    audit.record(AuditEvent("study.delete", principal=alice, patient_ids=("P1",),
                            study_uids=("S1",), data_organisations=(1,), details={"n": 6}),
                 wait=True)

    def ns(**filters: Any) -> list[int]:
        return [r.details["n"] for r in audit.query(**filters)]

    assert ns() == [6, 5, 4, 3, 2, 1]  # newest first
    assert ns(user="alice") == [6, 1]
    assert ns(patient_id="P1") == [6, 3, 1]
    assert ns(study_uid="S1") == [6, 3, 1]
    assert ns(patient_id="P9") == [5]
    assert ns(patient_id="P1", study_uid="S3") == [3]
    assert ns(organisation=1) == [6, 2, 1]  # alice's, and bob's reading of org 1's data
    assert ns(organisation=2) == [5, 3, 2]
    assert ns(organisation=3) == []
    assert ns(action="login") == [4]
    assert ns(since=mid) == [6]
    assert ns(until=mid) == [5, 4, 3, 2, 1]
    assert ns(since=mid.replace(tzinfo=None)) == [6]  # naive means UTC
    assert ns(since=mid - timedelta(days=1), until=mid + timedelta(days=1),
              user="alice") == [6, 1]
    assert ns(limit=2) == [6, 5]
    assert ns(limit=2, offset=2) == [4, 3]
    assert ns(patient_id="P1", limit=1, offset=1) == [3]

    first, _, third, login, *_ = sorted(audit.query(), key=lambda r: r.seq)
    assert (first.actor_user, first.actor_organisation, first.actor_kind, first.source) == (
        "alice", 1, "token", "10.0.0.1")  # the principal's source when the event has none
    assert first.data_organisations == (1,) and first.at.tzinfo is not None
    assert (third.patient_id, third.study_uid) == ("P3", "S3")
    assert third.details["patient_ids"] == ["P3", "P1"]
    assert third.patient_ids == ("P3", "P1") and third.study_uids == ("S3", "S1")
    assert third.data_organisations == (2,) and third.actor_kind == "session"
    assert (login.actor_user, login.actor_organisation, login.actor_kind) == (
        "mallory", None, None)
    assert login.outcome == "failure" and login.source == "192.0.2.7"
    assert [r.seq for r in audit.query()] == [6, 5, 4, 3, 2, 1]


def test_details_are_stored_as_json_and_still_verify(audit: AuditLog) -> None:
    when = datetime(2024, 5, 1, 12, 30, tzinfo=UTC)
    details = {"when": when, "ids": (1, 2), "text": "Ünïcødé ✓", 7: "int key"}
    audit.record(AuditEvent("config.change", details=details), wait=True)
    details["ids"] = (9,)  # the caller's later changes do not reach the record
    (rec,) = audit.query()
    assert rec.details == {"when": str(when), "ids": [1, 2], "text": "Ünïcødé ✓",
                           "7": "int key"}
    assert audit.verify().ok


def test_odd_values_are_made_storable(audit: AuditLog) -> None:
    uid = "1." + "2" * 80  # longer than the column
    audit.record(AuditEvent("x" * 100, user_name="u" * 300, source="s" * 300,
                            patient_ids=("bad\udcff",), study_uids=(uid,)), wait=True)
    (rec,) = audit.query()
    assert (len(rec.action), len(rec.actor_user or ""), len(rec.source or "")) == (64, 200, 255)
    assert rec.patient_id == "bad?" and rec.study_uid == uid[:64]
    assert rec.study_uids == (uid,)  # whole, in details
    assert audit.verify().ok


def test_unknown_outcome_is_refused(audit: AuditLog) -> None:
    with pytest.raises(ValueError, match="outcome"):
        audit.record(AuditEvent("login", outcome="maybe"))


def test_wait_true_means_committed(audit: AuditLog, database_url: str) -> None:
    other = create_engine(database_url)  # another connection pool: sees only commits
    try:
        audit.record(AuditEvent("study.store", principal=who("alice", 1)), wait=True)
        with other.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM audit_event")).scalar_one() == 1
        for _ in range(20):
            audit.record(AuditEvent("study.view"))
        audit.flush()
        with other.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM audit_event")).scalar_one() == 21
    finally:
        other.dispose()


def test_queued_records_are_written_when_the_process_exits(engine: Engine,
                                                           database_url: str) -> None:
    script = (
        "import sys\n"
        "from dicomshare.storage import make_engine\n"
        "from dicomshare.access.audit import AuditLog, AuditEvent\n"
        "log = AuditLog(make_engine(sys.argv[1]), sys.argv[2].encode())\n"
        "for i in range(50):\n"
        "    log.record(AuditEvent('study.view', user_name=f'u{i}'))\n"
        # no flush, no close: the exit handler must write them
    )
    subprocess.run([sys.executable, "-c", script, database_url, KEY.decode()], check=True,
                   timeout=120)
    report = AuditLog(engine, KEY).verify()
    assert report.ok and report.checked == 50


def test_recording_after_close_starts_a_new_writer(audit: AuditLog) -> None:
    fill(audit, 3)
    audit.close()
    audit.record(AuditEvent("study.view"), wait=True)
    assert audit.verify().checked == 4


def test_a_record_that_cannot_be_written_raises_for_waiters(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit_module, "_RETRIES", (0.01,))
    unmigrated = make_engine(f"sqlite:///{tmp_path / 'empty.db'}")  # no audit_event table
    log = AuditLog(unmigrated, KEY)
    try:
        with pytest.raises(AuditError, match="could not be written"):
            log.record(AuditEvent("study.delete"), wait=True)
        log.record(AuditEvent("study.view"))  # without wait: logged, never raised
        log.flush()
    finally:
        log.close()
        unmigrated.dispose()


# -- the chain and verify -------------------------------------------------------------------
def test_verify_intact_chain(audit: AuditLog, engine: Engine) -> None:
    assert audit.verify().ok and audit.verify().checked == 0
    fill(audit, 30)
    report = audit.verify()
    assert report.ok, report.problems
    assert report.checked == 30 and report.last_seq == 30
    assert report.last_hash == hash_of(engine, 30)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT seq, prev_hash, hash FROM audit_event "
                                 "ORDER BY seq")).all()
    assert [r.seq for r in rows] == list(range(1, 31))
    assert rows[0].prev_hash == GENESIS
    assert all(rows[i].prev_hash == rows[i - 1].hash for i in range(1, 30))
    assert len({r.hash for r in rows}) == 30


def test_verify_detects_an_edited_record(audit: AuditLog, engine: Engine) -> None:
    fill(audit, 10)
    raw(engine, "UPDATE audit_event SET details = :d WHERE seq = 7", d='{"i":700}')
    report = audit.verify()
    assert not report.ok
    assert len(report.problems) == 1, report.problems
    assert report.problems[0].startswith("seq 7:") and "edited" in report.problems[0]


def test_verify_detects_an_edited_column(audit: AuditLog, engine: Engine) -> None:
    fill(audit, 5)
    raw(engine, "UPDATE audit_event SET actor_user = 'mallory' WHERE seq = 2")
    raw(engine, "UPDATE audit_event SET data_organisations = ',1,2,' WHERE seq = 4")
    problems = audit.verify().problems
    assert [p.split(":")[0] for p in problems] == ["seq 2", "seq 4"]


def test_verify_reports_garbage_instead_of_crashing(audit: AuditLog, engine: Engine) -> None:
    fill(audit, 6)
    raw(engine, "UPDATE audit_event SET details = 'not json' WHERE seq = 2")
    raw(engine, "UPDATE audit_event SET data_organisations = ',x,' WHERE seq = 3")
    raw(engine, "UPDATE audit_event SET hash = :h WHERE seq = 4", h="é" * 64)
    problems = audit.verify().problems
    assert {p.split(":")[0] for p in problems} == {"seq 2", "seq 3", "seq 4", "seq 5"}
    if engine.dialect.name == "sqlite":  # PostgreSQL refuses an invalid timestamp itself
        raw(engine, "UPDATE audit_event SET at = 'garbage' WHERE seq = 6")
        problems = audit.verify().problems
        assert {p.split(":")[0] for p in problems} == {"seq 2", "seq 3", "seq 4", "seq 5",
                                                       "seq 6"}
        assert [r.seq for r in audit.iter_records()] == [1, 2, 3, 4, 5, 6]


def test_verify_detects_a_deleted_middle_record(audit: AuditLog, engine: Engine) -> None:
    fill(audit, 10)
    raw(engine, "DELETE FROM audit_event WHERE seq = 5")
    report = audit.verify()
    assert not report.ok and report.checked == 9
    assert report.problems[0].startswith("seq 5:") and "deleted" in report.problems[0]
    assert any(p.startswith("seq 6:") and "prev_hash" in p for p in report.problems)
    assert not any(p.startswith(("seq 4:", "seq 7:")) for p in report.problems)


def test_verify_detects_a_forged_appended_record(audit: AuditLog, engine: Engine) -> None:
    fill(audit, 10)
    raw(engine, "INSERT INTO audit_event (seq, at, action, outcome, actor_user, details, "
        "prev_hash, hash) VALUES (11, :at, 'study.view', 'success', 'mallory', '{}', :prev, "
        ":hash)", at=datetime.now(UTC), prev=hash_of(engine, 10), hash="ab" * 32)
    report = audit.verify()
    assert len(report.problems) == 1, report.problems
    assert report.problems[0].startswith("seq 11:") and "forged" in report.problems[0]


def test_verify_detects_a_record_inserted_in_the_middle(audit: AuditLog,
                                                        engine: Engine) -> None:
    fill(audit, 10)
    # Make room at seq 5 (in two steps: seq is unique), then slip a record in.
    raw(engine, "UPDATE audit_event SET seq = seq + 1000000 WHERE seq >= 5")
    raw(engine, "UPDATE audit_event SET seq = seq - 999999 WHERE seq >= 1000000")
    raw(engine, "INSERT INTO audit_event (seq, at, action, outcome, actor_user, details, "
        "prev_hash, hash) VALUES (5, :at, 'study.view', 'success', 'mallory', '{}', :prev, "
        ":hash)", at=datetime.now(UTC), prev=hash_of(engine, 4), hash="cd" * 32)
    problems = audit.verify().problems
    assert any(p.startswith("seq 5:") and "forged" in p for p in problems), problems
    assert any(p.startswith("seq 5:") and "out of order" in p for p in problems), problems
    assert any(p.startswith("seq 6:") for p in problems), problems  # renumbered: edited
    assert not any(p.startswith(("seq 1:", "seq 2:", "seq 3:", "seq 4:")) for p in problems)


def test_deleting_the_newest_records_needs_an_anchor(audit: AuditLog, engine: Engine) -> None:
    fill(audit, 10)
    before = audit.verify()
    anchor = (before.last_seq, before.last_hash)
    assert audit.verify(anchors=[anchor]).ok
    raw(engine, "DELETE FROM audit_event WHERE seq >= 9")
    assert audit.verify().ok  # the documented limit: a shorter chain is still a chain
    problems = audit.verify(anchors=[anchor]).problems
    assert len(problems) == 1 and problems[0].startswith("seq 10:")
    assert "ends at seq 8" in problems[0]
    # an anchor whose record was rewritten (another key, a rebuilt chain)
    assert audit.verify(anchors=[(3, "00" * 32)]).problems[0].startswith("seq 3:")


def test_a_different_key_fails_verify(audit: AuditLog, engine: Engine) -> None:
    fill(audit, 4)
    report = AuditLog(engine, b"another key entirely, 32 bytes!!").verify()
    assert not report.ok
    assert [p.split(":")[0] for p in report.problems] == ["seq 1", "seq 2", "seq 3", "seq 4"]
    assert all("another key" in p for p in report.problems)


# -- concurrency ----------------------------------------------------------------------------
def _append_in_process(url: str, key: bytes, n: int, tag: str) -> None:
    """Runs in a spawned process: its own engine, its own log, the same chain."""
    eng = make_engine(url)
    log = AuditLog(eng, key)
    for i in range(n):
        log.record(AuditEvent("study.view", user_name=tag, details={"i": i}),
                   wait=(i % 50 == 0))
    log.close()
    eng.dispose()


def test_threads_and_processes_append_one_gapless_chain(engine: Engine,
                                                        database_url: str) -> None:
    per = 200
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_in_process, args=(database_url, KEY, per, f"proc{i}"))
             for i in range(2)]
    for p in procs:
        p.start()
    shared = AuditLog(engine, KEY)
    second = AuditLog(engine, KEY)  # another instance in this process, same chain

    def in_thread(log: AuditLog, tag: str) -> None:
        for i in range(per // 2):
            log.record(AuditEvent("study.search", user_name=tag, details={"i": i}),
                       wait=(i % 25 == 0))

    threads = [threading.Thread(target=in_thread, args=(shared if i % 2 else second,
                                                        f"thread{i}")) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    shared.close()
    second.close()
    for p in procs:
        p.join(180)
        assert p.exitcode == 0
    total = 2 * per + 4 * (per // 2)
    with engine.connect() as conn:
        seqs = [r[0] for r in conn.execute(text("SELECT seq FROM audit_event ORDER BY seq"))]
        users = dict(conn.execute(text("SELECT actor_user, count(*) FROM audit_event "
                                       "GROUP BY actor_user")).all())
    assert seqs == list(range(1, total + 1))
    assert users == {"proc0": per, "proc1": per, **{f"thread{i}": per // 2 for i in range(4)}}
    report = shared.verify()
    assert report.ok, report.problems[:5]
    assert report.checked == total


def test_a_forked_child_records_with_its_own_writer(audit: AuditLog, engine: Engine) -> None:
    if engine.dialect.name == "sqlite":
        pytest.skip("SQLite: a database open before fork() must not be used in the child")
    audit.record(AuditEvent("app.start"), wait=True)  # the parent's writer thread runs
    for i in range(2000):  # still queued at the fork: the parent's to write, not the child's
        audit.record(AuditEvent("study.search", user_name="parent", details={"i": i}))
    pid = os.fork()
    if pid == 0:  # the child: no writer thread yet, the parent's queue is not its own
        code = 1
        try:
            engine.dispose(close=False)  # SQLAlchemy: never share pooled connections
            for i in range(5):
                audit.record(AuditEvent("study.view", user_name="child", details={"i": i}))
            audit.record(AuditEvent("study.view", user_name="child"), wait=True)
            audit.close()
            code = 0
        finally:
            os._exit(code)
    audit.record(AuditEvent("study.view", user_name="parent"), wait=True)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    report = audit.verify()
    assert report.ok and report.checked == 2008
    assert len(audit.query(user="child")) == 6


# -- exports --------------------------------------------------------------------------------
def test_json_lines_round_trip_and_verify_offline(audit: AuditLog) -> None:
    fill(audit, 5)
    audit.record(AuditEvent("study.search", principal=who("bob", 2), patient_ids=("A", "B"),
                            details={"query": {"PatientName": "DOE^*"}}), wait=True)
    records = list(audit.iter_records())
    assert [r.seq for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r.seq for r in audit.iter_records(since_seq=4)] == [5, 6]
    lines = [to_json_line(r) for r in records]
    assert all("\n" not in line for line in lines)
    back = [from_json_line(line) for line in lines]
    assert back == records
    assert json.loads(lines[-1])["hash"] == records[-1].hash
    assert verify_chain([(None, r) for r in back], KEY).ok
    forged = json.loads(lines[2])
    forged["actor_user"] = "mallory"
    tampered = [back[0], back[1], AuditRecord.from_dict(forged), *back[3:]]
    problems = verify_chain([(None, r) for r in tampered], KEY).problems
    assert len(problems) == 1 and problems[0].startswith("seq 3:")


def _xml(rec: AuditRecord, names: dict[int, str] | None = None) -> ET.Element:
    text_ = to_dicom_xml(rec, names, audit_source_id="ARCHIVE")
    assert "\n" not in text_  # one message per line in exports
    return ET.fromstring(text_)


def _code(el: ET.Element | None) -> str | None:
    assert el is not None
    return el.get("csd-code")


def _objects(root: ET.Element) -> list[dict[str, Any]]:
    out = []
    for obj in root.findall("ParticipantObjectIdentification"):
        out.append({"id": obj.get("ParticipantObjectID"),
                    "type": obj.get("ParticipantObjectTypeCode"),
                    "role": obj.get("ParticipantObjectTypeCodeRole"),
                    "id_type": _code(obj.find("ParticipantObjectIDTypeCode")),
                    "query": obj.findtext("ParticipantObjectQuery")})
    return out


def test_dicom_audit_messages(audit: AuditLog) -> None:
    alice = who("alice", 1)
    audit.record(AuditEvent("study.search", principal=alice, source="10.1.2.3",
                            details={"query": {"PatientID": "P1", "StudyDate": "2024"}}))
    audit.record(AuditEvent("study.retrieve", principal=alice, source="10.1.2.3",
                            patient_ids=("P1",), study_uids=("1.2.3",),
                            data_organisations=(1,)))
    audit.record(AuditEvent("study.store", principal=who("MODALITY", 1, kind="ae"),
                            source="CT_SCANNER", patient_ids=("P1",), study_uids=("1.2.3",)))
    audit.record(AuditEvent("login", outcome="failure", user_name="mallory",
                            source="192.0.2.9", details={"reason": "bad\npassword"}))
    audit.record(AuditEvent("study.retrieve", outcome="denied", principal=alice,
                            study_uids=("9.9",), details={"reason": "not shared"}))
    audit.record(AuditEvent("grant.create", principal=alice, patient_ids=("P1",)))
    audit.record(AuditEvent("study.store", principal=who("root", 1, kind="cli"),
                            study_uids=("1.2.4",)))
    audit.flush()
    search, retrieve, store, login, denied, grant, imported = audit.iter_records()

    root = _xml(search, {1: "Hospital A"})
    assert root.tag == "AuditMessage"
    ident = root.find("EventIdentification")
    assert ident is not None
    assert (_code(ident.find("EventID")), ident.get("EventActionCode"),
            ident.get("EventOutcomeIndicator")) == ("110112", "E", "0")
    assert ident.get("EventDateTime", "").endswith("Z")
    requestor, archive = root.findall("ActiveParticipant")
    assert requestor.attrib.items() >= {"UserID": "alice", "UserIsRequestor": "true",
                                        "UserName": "alice@Hospital A",
                                        "NetworkAccessPointID": "10.1.2.3",
                                        "NetworkAccessPointTypeCode": "2"}.items()
    assert _code(requestor.find("RoleIDCode")) == "110153"
    assert (archive.get("UserID"), archive.get("UserIsRequestor")) == ("ARCHIVE", "false")
    assert _code(archive.find("RoleIDCode")) == "110152"
    source = root.find("AuditSourceIdentification")
    assert source is not None and source.get("AuditSourceID") == "ARCHIVE"
    (query,) = _objects(root)
    assert (query["type"], query["role"], query["id_type"]) == ("2", "3", "110181")
    assert json.loads(base64.b64decode(query["query"])) == {"PatientID": "P1",
                                                            "StudyDate": "2024"}

    root = _xml(retrieve)
    ident = root.find("EventIdentification")
    assert ident is not None
    assert (_code(ident.find("EventID")), ident.get("EventActionCode")) == ("110103", "R")
    objects = {o["id"]: o for o in _objects(root)}
    assert objects["1.2.3"].items() >= {"type": "2", "role": "3", "id_type": "110180"}.items()
    assert objects["P1"].items() >= {"type": "1", "role": "1", "id_type": "2"}.items()

    root = _xml(store)
    ident = root.find("EventIdentification")
    assert ident is not None
    assert (_code(ident.find("EventID")), ident.get("EventActionCode")) == ("110104", "C")
    requestor = root.findall("ActiveParticipant")[0]
    assert requestor.get("AlternativeUserID") == "AETITLE=CT_SCANNER"
    assert requestor.get("NetworkAccessPointTypeCode") == "1"
    assert {o["id"] for o in _objects(root)} == {"1.2.3", "P1"}

    root = _xml(login)
    ident = root.find("EventIdentification")
    assert ident is not None
    assert (_code(ident.find("EventID")), _code(ident.find("EventTypeCode")),
            ident.get("EventOutcomeIndicator")) == ("110114", "110122", "8")
    assert ident.findtext("EventOutcomeDescription") == "bad password"
    assert root.findall("ActiveParticipant")[0].get("UserID") == "mallory"
    assert _objects(root) == []

    root = _xml(denied)
    ident = root.find("EventIdentification")
    assert ident is not None
    assert (_code(ident.find("EventID")), _code(ident.find("EventTypeCode")),
            ident.get("EventOutcomeIndicator")) == ("110113", "110132", "4")
    objects = _objects(root)
    assert objects[0]["role"] == "13" and objects[0]["id"] == "urn:dicomshare:study.retrieve"
    assert objects[1]["id"] == "9.9" and objects[1]["id_type"] == "110180"

    ident = _xml(grant).find("EventIdentification")
    assert ident is not None
    assert (_code(ident.find("EventID")), _code(ident.find("EventTypeCode"))) == (
        "110113", "110135")
    ident = _xml(imported).find("EventIdentification")
    assert ident is not None
    assert _code(ident.find("EventID")) == "110107"
    for action, outcome, expected in [
            ("authenticate", "denied", ("110114", "110122", "4")),
            ("association", "denied", ("110113", "110126", "4")),
            ("logout", "success", ("110114", "110123", "0")),
            ("token.create", "success", ("110113", "110137", "0")),
            ("config.change", "success", ("110113", "110129", "0")),
            ("audit.export", "success", ("110101", None, "0"))]:
        audit.record(AuditEvent(action, outcome=outcome, user_name="x"), wait=True)
        ident = _xml(audit.query(limit=1)[0]).find("EventIdentification")
        assert ident is not None
        type_code = ident.find("EventTypeCode")
        assert (_code(ident.find("EventID")),
                type_code.get("csd-code") if type_code is not None else None,
                ident.get("EventOutcomeIndicator")) == expected, action


def test_dicom_xml_escapes_whatever_users_send(audit: AuditLog) -> None:
    nasty = 'x"><Evil/>&amp;\x00\x07\ud800]'
    audit.record(AuditEvent("study.search", user_name=nasty, source=nasty,
                            patient_ids=(nasty,), details={"query": nasty}), wait=True)
    (rec,) = audit.iter_records()
    root = _xml(rec)
    assert root.find(".//Evil") is None
    assert root.findall("ActiveParticipant")[0].get("UserID", "").startswith('x"><Evil/>&amp;')
    patient = [o for o in _objects(root) if o["type"] == "1"][0]
    assert patient["id"].startswith('x"><Evil/>')
    assert rec.actor_user == 'x"><Evil/>&amp;\ufffd\x07?]'  # NUL and lone surrogate replaced
    assert audit.verify().ok


# -- syslog forwarding ----------------------------------------------------------------------
_RFC5424 = re.compile(rb"<(\d+)>1 (\S+) (\S+) (\S+) (\S+) (\S+) (\[(?:[^\]\\]|\\.)*\]) "
                      rb"\xef\xbb\xbf(.*)", re.DOTALL)


def _check_syslog(message: bytes, records: dict[int, AuditRecord]) -> AuditRecord:
    m = _RFC5424.fullmatch(message)
    assert m, message[:200]
    pri, stamp, _host, app, procid, msgid, sd, body = m.groups()
    data = json.loads(body.decode("utf-8"))
    rec = records[data["seq"]]
    assert AuditRecord.from_dict(data) == rec
    assert int(pri) == 10 * 8 + (5 if rec.outcome == "success" else 4)
    assert datetime.strptime(stamp.decode(), "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=UTC) == rec.at
    assert (app, procid, msgid.decode()) == (b"dicomshare", str(os.getpid()).encode(),
                                             rec.action)
    assert sd.startswith(b"[dicomshare@32473 ")
    assert f'seq="{rec.seq}"'.encode() in sd and f'hash="{rec.hash}"'.encode() in sd
    return rec


def _syslog_events(log: AuditLog) -> None:
    log.record(AuditEvent("study.retrieve", principal=who('al"ice]', 1),
                          patient_ids=("P1",), study_uids=("1.2",)), wait=True)
    log.record(AuditEvent("login", outcome="denied", user_name="mallory"), wait=True)


def test_syslog_over_udp(engine: Engine) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(10)
        log = AuditLog(engine, KEY, syslog=f"udp://127.0.0.1:{sock.getsockname()[1]}")
        try:
            _syslog_events(log)
            received = [sock.recv(65535) for _ in range(2)]
        finally:
            log.close()
    records = {r.seq: r for r in log.iter_records()}
    seen = sorted(_check_syslog(msg, records).seq for msg in received)
    assert seen == [1, 2]


def test_syslog_over_tcp_with_octet_counting(engine: Engine) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(10)
    received = bytearray()

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.settimeout(10)
            while chunk := conn.recv(65536):
                received.extend(chunk)

    thread = threading.Thread(target=serve)
    thread.start()
    log = AuditLog(engine, KEY, syslog=f"tcp://127.0.0.1:{server.getsockname()[1]}")
    try:
        _syslog_events(log)
    finally:
        log.close()  # closes the connection: the server sees the end
        thread.join(15)
        server.close()
    frames, rest = [], bytes(received)
    while rest:
        length, sep, rest = rest.partition(b" ")
        assert sep and length.isdigit(), rest[:100]
        frames.append(rest[:int(length)])
        rest = rest[int(length):]
    records = {r.seq: r for r in log.iter_records()}
    assert [_check_syslog(f, records).seq for f in frames] == [1, 2]


def test_syslog_failures_never_break_recording(engine: Engine) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = AuditLog(engine, KEY, syslog=f"tcp://127.0.0.1:{port}")
    try:
        for _ in range(3):
            log.record(AuditEvent("study.view"), wait=True)
    finally:
        log.close()
    assert log.verify().checked == 3
    with pytest.raises(AuditError, match="udp://host:port"):
        AuditLog(engine, KEY, syslog="syslog.example.org:514")


# -- the key --------------------------------------------------------------------------------
def _settings(tmp_path: Path, database_url: str, **more: Any) -> Settings:
    return load_settings({"data_dir": tmp_path / "data", "database_url": database_url,
                          **more}, environ={})


def test_key_file_is_created_private_and_reused(tmp_path: Path, engine: Engine,
                                                database_url: str) -> None:
    settings = _settings(tmp_path, database_url)
    log = AuditLog.open(settings, engine)
    fill(log, 3)
    log.close()
    path = tmp_path / "data" / "secrets" / "audit.key"
    key = path.read_bytes()
    assert len(key) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    again = AuditLog.open(settings, engine)
    fill(again, 2)
    again.close()
    assert path.read_bytes() == key
    assert again.verify().ok and again.verify().checked == 5
    # a configured key wins (text, used as bytes) and does not match this chain
    configured = AuditLog.open(_settings(tmp_path, database_url, audit_key="s3cret"), engine)
    assert configured._key == b"s3cret"
    assert len(configured.verify().problems) == 5
    assert not list(tmp_path.glob("data/secrets/.audit.key.*"))  # no temporary files left


def test_processes_racing_to_create_the_key_agree(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "audit.key"
    keys: list[bytes] = []
    threads = [threading.Thread(target=lambda: keys.append(load_or_create_key(path)))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(keys) == 8 and len(set(keys)) == 1
    path.write_bytes(b"short")
    with pytest.raises(AuditError, match="too short"):
        load_or_create_key(path)


# -- dicomshare audit -----------------------------------------------------------------------
def test_cli_verify_export_list(tmp_path: Path, engine: Engine, database_url: str,
                                capsys: pytest.CaptureFixture[str]) -> None:
    settings = _settings(tmp_path, database_url)
    log = AuditLog.open(settings, engine)
    log.record(AuditEvent("study.retrieve", principal=who("alice", 1), patient_ids=("P1",),
                          study_uids=("1.2.3",)))
    log.record(AuditEvent("study.search", principal=who("bob", 2),
                          details={"query": {"PatientName": "DOE*"}}))
    log.record(AuditEvent("login", outcome="failure", user_name="mallory"), wait=True)
    log.close()

    assert cli_audit.main(["verify"], settings) == 0
    out = capsys.readouterr().out
    assert "checked 3 records" in out and "intact" in out
    assert f"last record: seq 3 hash {hash_of(engine, 3)}" in out

    export = tmp_path / "audit.jsonl"
    assert cli_audit.main(["export", "--output", str(export)], settings) == 0
    lines = export.read_text().splitlines()
    assert [from_json_line(line).seq for line in lines] == [1, 2, 3]
    assert cli_audit.main(["export", "--since-seq", "2", "--format", "dicom"], settings) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2  # seq 3, and seq 4: the first export, audited
    assert all(ET.fromstring(line).tag == "AuditMessage" for line in out)
    second, first = log.query(action="audit.export")
    assert (first.seq, first.actor_kind, first.details["records"]) == (4, "cli", 3)
    assert (second.seq, second.details["records"], second.details["format"]) == (5, 2, "dicom")

    assert cli_audit.main(["list", "--user", "alice"], settings) == 0
    (line,) = capsys.readouterr().out.splitlines()
    fields = line.split("\t")
    assert fields[0] == "1" and fields[2:5] == ["study.retrieve", "success", "alice"]
    assert fields[7:9] == ["P1", "1.2.3"]
    assert cli_audit.main(["list", "--action", "login", "--since", "2000-01-01"],
                          settings) == 0
    assert capsys.readouterr().out.split("\t")[4] == "mallory"
    assert cli_audit.main(["list", "--until", "2000-01-01"], settings) == 0
    assert capsys.readouterr().out == ""

    raw(engine, "UPDATE audit_event SET actor_user = 'eve' WHERE seq = 2")
    assert cli_audit.main(["verify"], settings) == 1
    out = capsys.readouterr().out
    assert "PROBLEM seq 2:" in out and "NOT intact" in out


def test_cli_verify_with_anchor_catches_truncation(tmp_path: Path, engine: Engine,
                                                   database_url: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    settings = _settings(tmp_path, database_url)
    log = AuditLog.open(settings, engine)
    fill(log, 6)
    log.close()
    anchor = f"6:{hash_of(engine, 6)}"
    assert cli_audit.main(["verify", "--anchor", anchor], settings) == 0
    raw(engine, "DELETE FROM audit_event WHERE seq = 6")
    assert cli_audit.main(["verify"], settings) == 0
    assert cli_audit.main(["verify", "--anchor", anchor], settings) == 1
    assert "PROBLEM seq 6: missing" in capsys.readouterr().out


def test_cli_is_reachable_through_a_parent_parser(tmp_path: Path, database_url: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="dicomshare")
    cli_audit.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["audit", "list", "--limit", "5"])
    assert (args.command, args.action, args.limit) == ("audit", "list", 5)
    assert cli_audit.run(_settings(tmp_path, database_url), args) == 0
    with pytest.raises(SystemExit):
        parser.parse_args(["audit", "verify", "--anchor", "nonsense"])
    capsys.readouterr()
