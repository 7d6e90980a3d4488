"""Crash safety: kill -9 the server in the middle of ingest, restart it, and check that
every acknowledged instance survived intact and that ``dicomshare check`` agrees."""

from __future__ import annotations

import hashlib
import io
import re
import threading
import time
from pathlib import Path

import pytest
import requests
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from conftest import Server, make_server

pytestmark = pytest.mark.slow
BOUNDARY = "crash-test-boundary-5f1c9e"
STOW_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


class Ingest(threading.Thread):
    """STOWs new instances one per request until told to stop or the server goes away."""

    def __init__(self, server: Server, study: str, series: list[str]) -> None:
        super().__init__(daemon=True)
        self.server, self.study, self.series = server, study, series
        self.template = dcmread(get_testdata_file("MR_small.dcm"))
        self.sent: dict[str, bytes] = {}  # every attempt, acknowledged or not
        self.acked: dict[str, bytes] = {}  # HTTP 200 only
        self.stop = threading.Event()

    def instance(self, number: int) -> tuple[str, bytes]:
        ds = self.template
        ds.StudyInstanceUID = self.study
        ds.SeriesInstanceUID = self.series[number % len(self.series)]
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = number
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        return ds.SOPInstanceUID, buffer.getvalue()

    def run(self) -> None:
        session = self.server.session()
        number = 0
        while not self.stop.is_set():
            number += 1
            sop, data = self.instance(number)
            self.sent[sop] = data
            body = (f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data
                    + f"\r\n--{BOUNDARY}--\r\n".encode())
            try:
                response = session.post(f"{self.server.dicomweb}/studies", data=body,
                                        headers={"Content-Type": STOW_TYPE}, timeout=30)
            except requests.RequestException:
                if self.stop.is_set():
                    return
                continue
            if response.status_code == 200:
                self.acked[sop] = data


def retrieve_study(server: Server, study: str) -> dict[str, bytes]:
    """Every instance of a study as stored bytes, keyed by SOP Instance UID."""
    response = server.session().get(
        f"{server.dicomweb}/studies/{study}",
        headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
        timeout=60)
    assert response.status_code == 200, response.text[:500]
    boundary = re.search(r'boundary="?([^";]+)"?', response.headers["Content-Type"]).group(1)  # type: ignore[union-attr]
    found = {}
    for part in response.content.split(f"--{boundary}".encode())[1:-1]:
        head, _, content = part.partition(b"\r\n\r\n")
        location = re.search(rb"Content-Location:\s*(\S+)", head, re.I)
        assert location, head
        sop = location.group(1).decode().rsplit("/", 1)[-1]
        found[sop] = content[:-2] if content.endswith(b"\r\n") else content
    return found


def check(server: Server, *flags: str) -> tuple[int, str]:
    result = server.cli("check", *flags, check=False)
    return result.returncode, result.stdout


def test_kill_during_ingest_loses_nothing_acknowledged(tmp_path: Path) -> None:
    server = make_server(tmp_path)
    study, series = generate_uid(), [generate_uid() for _ in range(3)]
    ingest = Ingest(server, study, series)
    try:
        ingest.start()
        deadline = time.monotonic() + 60
        started = time.monotonic()
        while time.monotonic() < deadline and (len(ingest.acked) < 10
                                               or time.monotonic() - started < 1.5):
            time.sleep(0.05)
        assert ingest.acked, "no instance was acknowledged before the kill"
        ingest.stop.set()
        server.stop(kill=True)  # SIGKILL, mid-request most of the time
        ingest.join(timeout=60)
        assert not ingest.is_alive()
        acked = dict(ingest.acked)
        print(f"sent {len(ingest.sent)}, acknowledged {len(acked)} before the kill")
        server.start()

        # Every acknowledged instance is retrievable, byte for byte, and found by QIDO.
        stored = retrieve_study(server, study)
        assert set(acked) <= set(stored)
        assert set(stored) <= set(ingest.sent)  # nothing that was never sent
        for sop, data in stored.items():  # acknowledged or not: intact
            assert data == ingest.sent[sop], sop
        found = server.session().get(f"{server.dicomweb}/studies/{study}/instances",
                                     timeout=30).json()
        visible = {d["00080018"]["Value"][0] for d in found}
        assert visible == set(stored)

        # check: nothing missing or corrupt; orphans only from unacknowledged uploads.
        code, report = check(server)
        assert "missing blob" not in report and "hash mismatch" not in report, report
        acked_keys = {hashlib.sha256(d).hexdigest() for d in acked.values()}
        orphans = re.findall(r"blob not in the index: (\w+)", report)
        assert not set(orphans) & acked_keys
        assert code == (1 if orphans else 0), report

        code, report = check(server, "--repair")
        assert code == 0, report
        code, report = check(server)
        assert code == 0 and "ok: index and blobs agree" in report, report

        # The index counts what is stored: one row per distinct instance, no more.
        after = retrieve_study(server, study)
        assert set(acked) <= set(after) <= set(ingest.sent)
        checked = int(re.search(r"checked (\d+) instances", report).group(1))  # type: ignore[union-attr]
        assert checked == len(after)
        [summary] = server.session().get(f"{server.dicomweb}/studies",
                                         params={"StudyInstanceUID": study}, timeout=30).json()
        assert summary["00201208"]["Value"] == [len(after)]
        assert summary["00201206"]["Value"] == [
            len({dcmread(io.BytesIO(d)).SeriesInstanceUID for d in after.values()})]
        blobs = {p.name for p in (server.data_dir / "blobs").glob("??/*")}
        assert blobs == {hashlib.sha256(d).hexdigest() for d in after.values()}
    finally:
        ingest.stop.set()
        server.stop()


CRASHING_DELETE = """
import os, pathlib, sys
from dicomshare.archive import Archive
from dicomshare.config import load_settings

archive = Archive.open(load_settings({"data_dir": pathlib.Path(sys.argv[1])}))
unlink = pathlib.Path.unlink


def power_cut(self, *args, **kwargs):  # the first blob removal never happens
    if self.parent.parent.name == "blobs":
        os._exit(137)
    return unlink(self, *args, **kwargs)


pathlib.Path.unlink = power_cut
archive.delete(sys.argv[2])
"""


def test_repair_finishes_an_interrupted_delete(tmp_path: Path) -> None:
    """The process dies after the delete's index commit, before its blobs are gone:
    ``check --repair`` removes the blobs instead of bringing the deleted study back."""
    import subprocess
    import sys

    from conftest import make_file
    from dicomshare.archive import Archive
    from dicomshare.config import load_settings

    data = tmp_path / "data"
    settings = load_settings({"data_dir": data})
    doomed, kept = generate_uid(), generate_uid()
    archive = Archive.open(settings)
    try:
        for study in (doomed, doomed, kept):
            assert archive.store_file(make_file(tmp_path / "in", study=study)).ok
    finally:
        archive.close()
    run = subprocess.run([sys.executable, "-c", CRASHING_DELETE, str(data), doomed],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 137, run.stderr
    archive = Archive.open(settings)
    try:
        report = archive.check()
        assert len(report.orphans) == 2 and not report.missing  # the index commit happened
        report = archive.check(repair=True)
        assert sum("of an interrupted delete" in x for x in report.repaired) == 2, \
            report.repaired
        after = archive.check()
        assert after.clean and after.checked == 1
        assert not archive.index.locate(doomed)
        assert len(archive.index.locate(kept)) == 1
    finally:
        archive.close()
