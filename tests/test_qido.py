"""QIDO-RS matching (PS3.4 C.2.2.2, PS3.18 8.3.4 and 10.6) against a fixed data set.

The same matching cases run through a real server (SQLite) and through the library on
each backend (SQLite and PostgreSQL): QIDO must answer identically everywhere.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from pydicom import config, dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from conftest import Server
from dicomshare.archive import Archive
from dicomshare.config import load_settings
from dicomshare.dicom.attributes import Level
from dicomshare.dicom.matching import parse_qido

US_CLASS = "1.2.840.10008.5.1.4.1.1.6.1"
# key: (PatientName, PatientID, StudyDate, StudyTime, StudyDescription,
#       [(Modality, instances) per series], SpecificCharacterSet, ProcedureCode)
STUDIES: dict[str, tuple[Any, ...]] = {
    "doe_john": ("DOE^JOHN", "P001", "20200115", "083000", "CHEST CT", [("CT", 2)], None, "ABC"),
    "doe_jane": ("DOE^JANE", "P002", "20200220", "141500", "BRAIN MR", [("MR", 2)], None, None),
    "roe_john": ("ROE^JOHN", "P003", "20200301", "090000", "ABDOMEN US", [("US", 1)], None, None),
    "mueller": ("Müller^Jürgen", "P004", "20210510", "101010", "HEAD",
                [("CT", 1), ("MR", 2)], "ISO_IR 192", None),
    "smith": ("smith^anna", "P005", "20190101", "235959", "KNEE MR", [("MR", 1)], None, None),
    "mcdonald": ("McDonald^Ronald", "P006", "20221231", "000000", "THYROID US", [("US", 1)],
                 None, None),
    "keller": ("Keller^Hans", "P007", "20210101", "120000", "SPINE CT", [("CT", 1)], None, "XYZ"),
    "doe_johnny": ("DOE^JOHNNY", "P008", "20230615", "070000", "CHEST CT", [("CT", 1)], None,
                   None),
    "moe_john": ("MOE^JOHN", "P009", "20200115", "160000", "PELVIS MR", [("MR", 1)], None, None),
    "gomez": ("GÓMEZ^JOSÉ", "P010", "20240101", "130000", "CHEST CT", [("CT", 2), ("CT", 1)],
              "ISO_IR 100", "XYZ"),
}
N_SERIES = sum(len(s[5]) for s in STUDIES.values())
N_INSTANCES = sum(n for s in STUDIES.values() for _, n in s[5])
ALL = set(STUDIES)


class DataSet:
    """The generated files and the UIDs behind each study key."""

    def __init__(self, folder: Path) -> None:
        self.files: list[Path] = []
        self.study: dict[str, str] = {}
        self.series: dict[str, list[str]] = {}
        self.key_of: dict[str, str] = {}
        for number, (key, spec) in enumerate(STUDIES.items()):
            name, pid, date, time, desc, series, charset, code = spec
            self.study[key] = generate_uid()
            self.key_of[self.study[key]] = key
            self.series[key] = []
            for snum, (modality, count) in enumerate(series, start=1):
                series_uid = generate_uid()
                self.series[key].append(series_uid)
                for inum in range(1, count + 1):
                    ds = dcmread(get_testdata_file(
                        "CT_small.dcm" if modality == "CT" else "MR_small.dcm"))
                    if "PatientAge" in ds:
                        del ds.PatientAge
                    if key == "doe_john":
                        ds.PatientAge = "045Y"
                    ds.SpecificCharacterSet = charset or "ISO_IR 100"
                    ds.PatientName, ds.PatientID = name, pid
                    ds.StudyDate, ds.StudyTime, ds.StudyDescription = date, time, desc
                    ds.AccessionNumber = f"A{number + 1:03d}"
                    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, snum, inum
                    if modality == "US":
                        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = US_CLASS
                    if code:
                        item = Dataset()
                        item.CodeValue, item.CodingSchemeDesignator = code, "99TEST"
                        item.CodeMeaning = f"procedure {code}"
                        ds.ProcedureCodeSequence = [item]
                    ds.StudyInstanceUID, ds.SeriesInstanceUID = self.study[key], series_uid
                    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
                    path = folder / f"{uuid.uuid4().hex}.dcm"
                    ds.save_as(path, enforce_file_format=True)
                    self.files.append(path)

    def keys(self, results: list[dict[str, Any]]) -> list[str]:
        return sorted(self.key_of[r["0020000D"]["Value"][0]] for r in results)

    def params(self, raw: dict[str, str]) -> dict[str, str]:
        """Fill in {study-key} placeholders with the real UIDs."""
        return {k: v.format(**self.study) for k, v in raw.items()}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> DataSet:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(config.settings, "writing_validation_mode", config.WARN)
        return DataSet(tmp_path_factory.mktemp("qido-data"))


@pytest.fixture(scope="module")
def loaded(server: Server, data: DataSet) -> Server:
    client = server.client()
    client.store_instances([dcmread(p) for p in data.files])
    assert len(client.search_for_instances()) == N_INSTANCES
    return server


def qido(server: Server, path: str, params: dict[str, str] | list[tuple[str, str]]
         ) -> requests.Response:
    return server.session().get(f"{server.dicomweb}{path}", params=params,
                                headers={"Accept": "application/dicom+json"}, timeout=30)


def value(ds: dict[str, Any], tag: str) -> Any:
    found = ds.get(tag, {}).get("Value", [])
    return found[0] if found else None


# -- study-level matching: (params, expected study keys) -----------------------------------
CASES: dict[str, tuple[dict[str, str], set[str]]] = {
    "single-id": ({"PatientID": "P003"}, {"roe_john"}),
    "single-accession": ({"AccessionNumber": "A007"}, {"keller"}),
    "single-description": ({"StudyDescription": "CHEST CT"}, {"doe_john", "doe_johnny", "gomez"}),
    "uid": ({"StudyInstanceUID": "{keller}"}, {"keller"}),
    "uid-list-backslash": ({"StudyInstanceUID": "{doe_john}\\{keller}"}, {"doe_john", "keller"}),
    "uid-list-comma": ({"StudyInstanceUID": "{smith},{gomez},{mueller}"},
                       {"smith", "gomez", "mueller"}),
    "pn-exact": ({"PatientName": "DOE^JOHN"}, {"doe_john"}),
    "pn-star": ({"PatientName": "DOE*"}, {"doe_john", "doe_jane", "doe_johnny"}),
    "pn-question": ({"PatientName": "?OE^JOHN"}, {"doe_john", "roe_john", "moe_john"}),
    "pn-inner": ({"PatientName": "*ller*"}, {"mueller", "keller"}),
    "pn-lowercase-query": ({"PatientName": "doe^john"}, {"doe_john"}),
    "pn-uppercase-query": ({"PatientName": "SMITH^ANNA"}, {"smith"}),
    "pn-mixed-wildcard": ({"PatientName": "mcdonald*"}, {"mcdonald"}),
    "pn-utf8": ({"PatientName": "Müller^Jürgen"}, {"mueller"}),
    "pn-utf8-case": ({"PatientName": "MÜLLER*"}, {"mueller"}),
    "pn-latin1-case": ({"PatientName": "gómez^josé"}, {"gomez"}),
    "wildcard-case-sensitive": ({"StudyDescription": "chest*"}, set()),
    "wildcard-description": ({"StudyDescription": "CHEST*"}, {"doe_john", "doe_johnny", "gomez"}),
    "wildcard-all": ({"PatientName": "*"}, ALL),
    "date-exact": ({"StudyDate": "20200115"}, {"doe_john", "moe_john"}),
    "date-range": ({"StudyDate": "20200101-20201231"},
                   {"doe_john", "doe_jane", "roe_john", "moe_john"}),
    "date-from": ({"StudyDate": "20210101-"},
                  {"mueller", "mcdonald", "keller", "doe_johnny", "gomez"}),
    "date-until": ({"StudyDate": "-20191231"}, {"smith"}),
    "time-range": ({"StudyTime": "080000-100000"}, {"doe_john", "roe_john"}),
    "time-until": ({"StudyTime": "-070000"}, {"mcdonald", "doe_johnny"}),
    "time-from": ({"StudyTime": "230000-"}, {"smith"}),
    "time-short-range": ({"StudyTime": "1200-1400"}, {"keller", "gomez"}),
    "modality": ({"ModalitiesInStudy": "CT"},
                 {"doe_john", "mueller", "keller", "doe_johnny", "gomez"}),
    "modality-us": ({"ModalitiesInStudy": "US"}, {"roe_john", "mcdonald"}),
    "modality-list-backslash": ({"ModalitiesInStudy": "US\\MR"},
                                {"roe_john", "mcdonald", "doe_jane", "mueller", "smith",
                                 "moe_john"}),
    "modality-list-comma": ({"ModalitiesInStudy": "US,CT"},
                            {"roe_john", "mcdonald", "doe_john", "mueller", "keller",
                             "doe_johnny", "gomez"}),
    "sequence-keyword": ({"ProcedureCodeSequence.CodeValue": "XYZ"}, {"keller", "gomez"}),
    "sequence-tags": ({"00081032.00080100": "XYZ"}, {"keller", "gomez"}),
    "sequence-wildcard": ({"ProcedureCodeSequence.CodeValue": "AB*"}, {"doe_john"}),
    "combined": ({"PatientName": "DOE*", "StudyDate": "20200101-20201231"},
                 {"doe_john", "doe_jane"}),
    "fuzzy": ({"PatientName": "joh", "fuzzymatching": "true"},
              {"doe_john", "roe_john", "doe_johnny", "moe_john"}),
    "fuzzy-off": ({"PatientName": "joh", "fuzzymatching": "false"}, set()),
    "fuzzy-non-ascii": ({"PatientName": "jür", "fuzzymatching": "true"}, {"mueller"}),
    "empty-is-universal": ({"PatientID": ""}, ALL),
}


@pytest.mark.parametrize("case", list(CASES))
def test_study_matching(loaded: Server, data: DataSet, case: str) -> None:
    params, expected = CASES[case]
    response = qido(loaded, "/studies", data.params(params))
    assert response.status_code == 200, response.text
    assert data.keys(response.json()) == sorted(expected)


def test_study_results_carry_required_attributes(loaded: Server, data: DataSet) -> None:
    results = qido(loaded, "/studies", {}).json()
    assert data.keys(results) == sorted(ALL)
    for ds in results:
        for tag in ("00080020", "00080030", "00080050", "00080061", "00100010", "00100020",
                    "0020000D", "00201206", "00201208", "00081190"):
            assert tag in ds, (tag, ds)
        uid = value(ds, "0020000D")
        assert value(ds, "00081190") == f"{loaded.dicomweb}/studies/{uid}"
        spec = STUDIES[data.key_of[uid]]
        assert value(ds, "00100010") == {"Alphabetic": spec[0]}
        assert value(ds, "00100020") == spec[1]
        assert (value(ds, "00080020"), value(ds, "00080030")) == (spec[2], spec[3])
        assert ds["00080061"]["Value"] == sorted({m for m, _ in spec[5]})
        assert value(ds, "00201206") == len(spec[5])
        assert value(ds, "00201208") == sum(n for _, n in spec[5])
        assert "00101010" not in ds  # PatientAge only on request


def test_includefield(loaded: Server, data: DataSet) -> None:
    some = {"StudyInstanceUID": data.study["doe_john"]}
    [plain] = qido(loaded, "/studies", some).json()
    assert "00101010" not in plain and "00080062" not in plain
    [chosen] = qido(loaded, "/studies", {**some, "includefield": "00081030,PatientAge"}).json()
    assert value(chosen, "00101010") == "045Y" and value(chosen, "00081030") == "CHEST CT"
    [repeated] = qido(loaded, "/studies", [*some.items(), ("includefield", "00081030"),
                                           ("includefield", "PatientAge")]).json()
    assert value(repeated, "00101010") == "045Y"
    [everything] = qido(loaded, "/studies", {**some, "includefield": "all"}).json()
    assert value(everything, "00101010") == "045Y"
    assert value(everything, "00081032")["00080100"]["Value"] == ["ABC"]
    assert everything["00080062"]["Value"] == ["1.2.840.10008.5.1.4.1.1.2"]
    assert set(chosen) < set(everything)


def test_paging_is_disjoint_and_complete(loaded: Server, data: DataSet) -> None:
    full = [value(d, "0020000D") for d in qido(loaded, "/studies", {}).json()]
    pages = [[value(d, "0020000D") for d in
              qido(loaded, "/studies", {"limit": "3", "offset": str(start)}).json()]
             for start in range(0, 12, 3)]
    assert [len(p) for p in pages] == [3, 3, 3, 1]
    assert [uid for page in pages for uid in page] == full
    assert len(set(full)) == len(STUDIES)
    # Paging also applies after matching that is not done in SQL (a sequence path).
    seq = {"ProcedureCodeSequence.CodeValue": "XYZ", "limit": "1"}
    paged = [data.keys(qido(loaded, "/studies", {**seq, "offset": str(i)}).json())
             for i in range(3)]
    assert sorted(paged[:2]) == [["gomez"], ["keller"]] and paged[2] == []
    instances = [value(d, "00080018") for start in range(0, N_INSTANCES, 5)
                 for d in qido(loaded, "/instances", {"limit": "5",
                                                      "offset": str(start)}).json()]
    assert len(instances) == len(set(instances)) == N_INSTANCES


def test_all_six_search_resources(loaded: Server, data: DataSet) -> None:
    st, (ct, mr) = data.study["mueller"], data.series["mueller"]
    series = qido(loaded, "/series", {}).json()
    assert len(series) == N_SERIES
    assert len(qido(loaded, "/series", {"Modality": "MR"}).json()) == 4
    assert len(qido(loaded, "/instances", {}).json()) == N_INSTANCES
    us = qido(loaded, "/instances", {"SOPClassUID": US_CLASS}).json()
    assert data.keys(us) == ["mcdonald", "roe_john"]
    assert len(qido(loaded, "/instances", {"PatientID": "P004"}).json()) == 3
    in_study = qido(loaded, f"/studies/{st}/series", {}).json()
    assert [value(d, "0020000E") for d in in_study] == [ct, mr]
    assert [value(d, "00201209") for d in in_study] == [1, 2]
    assert [value(d, "0020000E") for d in
            qido(loaded, f"/studies/{st}/series", {"Modality": "CT"}).json()] == [ct]
    assert len(qido(loaded, f"/studies/{st}/instances", {}).json()) == 3
    in_series = qido(loaded, f"/studies/{st}/series/{mr}/instances", {}).json()
    assert [value(d, "00200013") for d in in_series] == [1, 2]
    assert {value(d, "0020000E") for d in in_series} == {mr}
    one = value(in_series[0], "00080018")
    assert [value(d, "00080018") for d in qido(
        loaded, f"/studies/{st}/series/{mr}/instances", {"SOPInstanceUID": one}).json()] == [one]
    # A study or series that does not exist (or is elsewhere) has no matches.
    assert qido(loaded, f"/studies/{generate_uid()}/series", {}).json() == []
    assert qido(loaded, f"/studies/{data.study['smith']}/series/{mr}/instances",
                {}).json() == []


def test_series_and_instance_results_carry_required_attributes(loaded: Server,
                                                               data: DataSet) -> None:
    for ds in qido(loaded, "/series", {}).json():
        for tag in ("00080060", "0020000E", "00200011", "00201209", "00081190", "0020000D"):
            assert tag in ds, (tag, ds)
        assert value(ds, "00081190") == (f"{loaded.dicomweb}/studies/{value(ds, '0020000D')}"
                                         f"/series/{value(ds, '0020000E')}")
    for ds in qido(loaded, "/instances", {}).json():
        for tag in ("00080016", "00080018", "00200013", "00081190", "0020000D", "0020000E",
                    "00280010", "00280011", "00280100"):
            assert tag in ds, (tag, ds)
        assert value(ds, "00081190").endswith(
            f"/series/{value(ds, '0020000E')}/instances/{value(ds, '00080018')}")
    # The RetrieveURL of a match retrieves exactly that instance.
    [inst] = qido(loaded, "/instances", {"PatientID": "P003"}).json()
    response = loaded.session().get(value(inst, "00081190"),
                                     headers={"Accept": 'multipart/related; '
                                              'type="application/dicom"; transfer-syntax=*'},
                                     timeout=30)
    assert response.status_code == 200
    assert value(inst, "00080018").encode() in response.content


def test_higher_level_attributes_in_series_and_instance_results(loaded: Server,
                                                                 data: DataSet) -> None:
    for path in ("/series", "/instances"):
        for ds in qido(loaded, path, {"PatientID": "P001"}).json():
            assert value(ds, "00100010") == {"Alphabetic": "DOE^JOHN"}, path
            assert value(ds, "00080020") == "20200115", path
    for ds in qido(loaded, f"/studies/{data.study['doe_john']}/instances", {}).json():
        assert value(ds, "00080060") == "CT" and value(ds, "00200011") == 1


BAD = {
    "negative-limit": {"limit": "-1"},
    "huge-limit": {"limit": "100000"},
    "non-numeric-offset": {"offset": "abc"},
    "non-numeric-limit": {"limit": "ten"},
    "unknown-parameter": {"Foo": "bar"},
    "invalid-date": {"StudyDate": "2020-01-01"},
    "impossible-date": {"StudyDate": "2020"},
    "reversed-range": {"StudyDate": "20201231-20200101"},
    "invalid-time": {"StudyTime": "25:00"},
    "invalid-uid-in-list": {"StudyInstanceUID": "1.2.3\\not-a-uid"},
    "malformed-uid-in-list": {"StudyInstanceUID": "1.2.3,1..2"},
    "over-long-value": {"PatientID": "X" * 2000},
    "repeated-key": [("PatientID", "P001"), ("PatientID", "P002")],
    "unknown-includefield": {"includefield": "NotAnAttribute"},
    "bad-fuzzymatching": {"fuzzymatching": "maybe"},
    "match-on-count": {"NumberOfStudyRelatedInstances": "3"},
    "sequence-value": {"ProcedureCodeSequence": "XYZ"},
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_query_is_400_with_reason(loaded: Server, case: str) -> None:
    params = BAD[case]
    response = qido(loaded, "/studies", params)
    assert response.status_code == 400, response.text
    reason = response.json()["error"]
    assert reason and reason in response.headers["Warning"]
    assert qido(loaded, "/studies", {"PatientID": "P001"}).status_code == 200
    assert requests.get(f"{loaded.url}/healthz", timeout=5).status_code == 200


def test_bad_numeric_match_at_series_level_is_400(loaded: Server) -> None:
    for params in ({"SeriesNumber": "abc"}, {"SeriesNumber": "1*"}):
        response = qido(loaded, "/series", params)
        assert response.status_code == 400, (params, response.text)
    assert len(qido(loaded, "/series", {"SeriesNumber": "2"}).json()) == 2


# -- the library on each backend -----------------------------------------------------------
@pytest.fixture
def library(data: DataSet, tmp_path: Path, database_url: str) -> Iterator[Archive]:
    arc = Archive.open(load_settings({"data_dir": tmp_path / "data",
                                      "database_url": database_url, "fsync": False}))
    for path in data.files:
        assert arc.store_file(path).ok
    yield arc
    arc.close()


def run(archive: Archive, level: Level, params: dict[str, str] | list[tuple[str, str]],
        study: str | None = None, series: str | None = None) -> list[dict[str, Any]]:
    items = list(params.items()) if isinstance(params, dict) else params
    return archive.search(parse_qido(level, items), study, series)


def test_library_matching_is_the_same_on_every_backend(library: Archive, data: DataSet) -> None:
    wrong = {}
    for case, (params, expected) in CASES.items():
        got = data.keys(run(library, Level.STUDY, data.params(params)))
        if got != sorted(expected):
            wrong[case] = got
    assert wrong == {}
    paged = [data.keys(run(library, Level.STUDY, {"limit": "4", "offset": str(i)}))
             for i in (0, 4, 8)]
    assert sorted(k for page in paged for k in page) == sorted(ALL)
    assert len(run(library, Level.SERIES, {"Modality": "MR"})) == 4
    assert len(run(library, Level.IMAGE, {"PatientID": "P004"})) == 3
    assert len(run(library, Level.SERIES, {}, data.study["gomez"])) == 2


def test_library_bad_numeric_match_is_refused(library: Archive) -> None:
    from dicomshare.errors import InvalidQuery

    for params in ({"SeriesNumber": "abc"}, {"SeriesNumber": "1*"}):
        with pytest.raises(InvalidQuery):
            run(library, Level.SERIES, params)


def test_hostile_wildcards_answer_at_once(loaded: Server) -> None:
    """A pattern that makes a backtracking matcher explode (``*A*A*...B`` against a long run
    of A) is matched in the server's memory for sequence attributes: it must answer at once
    and correctly, not tie up a worker."""
    hostile = "*A" * 30 + "*B"
    started = time.monotonic()
    r = qido(loaded, "/studies", {"ProcedureCodeSequence.CodeValue": hostile})
    assert r.status_code == 200, r.text
    assert r.json() == [] if r.content else True
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("pattern,text,expected", [
    ("AB*", "ABC", True), ("*B*", "ABC", True), ("A?C", "ABC", True), ("A?C", "AC", False),
    ("*", "", True), ("", "", True), ("?", "", False), ("*C", "ABC", True), ("*C", "ABD", False),
    ("A**C", "AC", True), ("*A*A*B", "AAAAAAAB", True),
    ("*A" * 30 + "*B", "A" * 80, False), ("?*?", "AB", True), ("?*?", "A", False),
])
def test_wildcard_match(pattern: str, text: str, expected: bool) -> None:
    from dicomshare.dicom.matching import wildcard_match

    started = time.monotonic()
    assert wildcard_match(pattern, text) is expected
    assert wildcard_match(pattern.lower(), text, case_insensitive=True) is expected
    assert time.monotonic() - started < 1
    assert wildcard_match("a*c", "ABC") is False
    assert wildcard_match("a*c", "ABC", case_insensitive=True) is True
