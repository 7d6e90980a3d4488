"""Two dicomshare archives as each other's DICOM peers: a clinic and a hospital.

The clinic sends a study to the hospital, finds the patient's priors there, and pulls
them back by C-MOVE and by C-GET, all with the `dicomshare` command line. What arrives
is the stored data set, unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from conftest import Server, make_file, make_server, split_multipart

ANY_TS = 'multipart/related; type="application/dicom"; transfer-syntax=*'


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server]]:
    clinic = make_server(tmp_path_factory.mktemp("clinic"), ae_title="CLINIC")
    hospital = make_server(tmp_path_factory.mktemp("hospital"), ae_title="HOSPITAL")
    try:
        clinic.cli("ae", "add", "HOSPITAL", "--host", "127.0.0.1", "--port",
                   str(hospital.dicom_port))
        hospital.cli("ae", "add", "CLINIC", "--host", "127.0.0.1", "--port",
                     str(clinic.dicom_port))
        yield clinic, hospital
    finally:
        clinic.stop()
        hospital.stop()


def study_file(folder: Path, base: str, patient_id: str, study: str) -> Path:
    return make_file(folder, base, study=study, PatientID=patient_id,
                     PatientName="SHARED^PATIENT")


def stored_bytes(server: Server, study: str) -> dict[str, bytes]:
    """SOP Instance UID -> the data set bytes (after the file meta) as the archive holds it."""
    response = server.session().get(f"{server.dicomweb}/studies/{study}",
                                    headers={"Accept": ANY_TS}, timeout=60)
    assert response.status_code == 200, response.text
    out = {}
    for _, body in split_multipart(response):
        ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(body), stop_before_pixels=True)
        meta_end = body.index(b"DICM") + 4
        meta_len = int.from_bytes(body[meta_end + 8:meta_end + 12], "little")
        out[str(ds.SOPInstanceUID)] = body[meta_end + 12 + meta_len:]
    return out


def test_clinic_sends_a_study_to_the_hospital(sites: tuple[Server, Server],
                                              tmp_path: Path) -> None:
    clinic, hospital = sites
    study = generate_uid()
    files = [study_file(tmp_path, name, "CLIN-1", study)
             for name in ("CT_small.dcm", "MR_small_jp2klossless.dcm")]
    clinic.cli("import", "--quiet", *map(str, files))
    result = clinic.cli("send", "--to", "HOSPITAL", "--quiet", study)
    assert "sent: 2" in result.stdout and "failed: 0" in result.stdout, result.stdout
    assert stored_bytes(hospital, study) == stored_bytes(clinic, study)


def test_clinic_finds_and_pulls_priors_from_the_hospital(sites: tuple[Server, Server],
                                                         tmp_path: Path) -> None:
    clinic, hospital = sites
    priors = [generate_uid(), generate_uid()]
    hospital.cli("import", "--quiet", str(study_file(tmp_path / "a", "CT_small.dcm",
                                                     "HOSP-9", priors[0])),
                 str(study_file(tmp_path / "b", "MR_small_RLE.dcm", "HOSP-9", priors[1])))
    found = json.loads(clinic.cli("remote", "find", "HOSPITAL", "--patient-id", "HOSP-9",
                                  "--json").stdout)
    assert sorted(m["0020000D"]["Value"][0] for m in found) == sorted(priors)
    clinic.cli("remote", "retrieve", "HOSPITAL", priors[0], "--method", "move")
    clinic.cli("remote", "retrieve", "HOSPITAL", priors[1], "--method", "get")
    for study in priors:
        assert stored_bytes(clinic, study) == stored_bytes(hospital, study)
    assert clinic.cli("check").returncode == 0
