"""De-identification (``dicomshare.deid``) checked in both directions on a synthetic corpus.

``deid_corpus.py`` injects unique PHI tokens everywhere PS3.15 says identity can hide; the
tests scan the output *bytes* for every token (and the non-ASCII name in UTF-8 and
Latin-1), check that what the options keep is kept, that pixel data is untouched, that
UIDs and dates stay consistent within a project and differ between projects, that the
output declares how it was de-identified, that burned-in risks are held back, that
``dciodvfy`` finds no new error, and run the command line over a folder and a zip.
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import stat
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from deid_corpus import (
    INTERVAL_A_DAYS,
    SAFE_CREATOR,
    SAFE_ELEMENT,
    SAFE_GROUP,
    SAFE_VALUE,
    STUDY_A1_DATE,
    STUDY_B_DATE,
    UID_ROOT,
    Corpus,
    build,
)
from dicomshare.deid import (
    Deidentifier,
    HoldBack,
    Profile,
    Pseudonyms,
    batch,
    burned_in_risk,
    rawdicom,
)
from dicomshare.deid.engine import read_instance, write_instance
from dicomshare.deid.profile import OPTIONS, method_codes, read_table
from dicomshare.deid.pseudonyms import SHIFT_DAYS, shift_da, shift_dt
from dicomshare.deid.values import cap_age
from dicomshare.deid.vocab import CLASS_UIDS, SAFE_TEXT

ROOT = Path(__file__).resolve().parent.parent
KEY, OTHER_KEY = b"project-key-0123456789abcdef0123", b"another-key-0123456789abcdef0123"
CLEANING = ("clean_descriptors", "clean_structured_content", "clean_graphics",
            "retain_longitudinal_modified_dates", "retain_patient_characteristics",
            "retain_safe_private")
KEEPING = ("retain_uids", "retain_device_identity", "retain_institution_identity",
           "retain_longitudinal_full_dates")
# Token groups an option set may keep (Clean Descriptors and Clean Graphics keep the text,
# cut of the instance's own identifiers; random tokens are not recognisable as such).
ALLOWED = {(): set(), CLEANING: {"descriptor", "graphics"}, KEEPING: {"device", "institution"}}


@dataclass
class Out:
    report: object
    path: Path | None
    data: bytes
    ds: Dataset | None


Run = dict[str, Out]  # by corpus role


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return build(tmp_path_factory.mktemp("corpus") / "in")


@pytest.fixture(scope="module")
def run(corpus: Corpus, tmp_path_factory: pytest.TempPathFactory
        ) -> Callable[..., Run]:
    """``run(options, key=KEY, hook=None)``: the corpus de-identified (cached per args)."""
    cache: dict[tuple[object, ...], Run] = {}

    def go(options: tuple[str, ...] = (), key: bytes = KEY,
           hook: Callable[[Dataset, str], Dataset] | None = None) -> Run:
        ident = (options, key, hook)
        if ident not in cache:
            out = tmp_path_factory.mktemp("out")
            deid = Deidentifier(options, key, hook)
            result: Run = {}
            for inst in corpus.instances:
                report = deid.deidentify_file(inst.path, batch.layout(out))
                path = Path(report.output_path) if report.output_path else None
                data = path.read_bytes() if path else b""
                result[inst.role] = Out(report, path, data, pydicom.dcmread(path) if path
                                        else None)
            cache[ident] = result
        return cache[ident]
    return go


def written(result: Run) -> dict[str, Out]:
    return {role: o for role, o in result.items() if o.path is not None}


# -- the profile --------------------------------------------------------------------------
def test_every_row_of_the_table_resolves_for_every_option() -> None:
    rows = read_table("ps3.15-table-e1-1.json")["rows"]
    for option in [None, *OPTIONS]:
        profile = Profile([option] if option else [])
        for row in rows:
            if "odd" in row["tag"]:
                continue
            tag = int(row["tag"][1:5].replace("x", "0") + row["tag"][6:10].replace("x", "0"),
                      16)
            assert profile.rule(tag, None).action in "XZDKCU", row


def test_precedence_and_combined_codes() -> None:
    basic, device = Profile(), Profile(["retain_device_identity"])
    both = Profile(["retain_device_identity", "retain_longitudinal_modified_dates"])
    calibration = 0x0018700C  # Date of Last Detector Calibration: X/D, device K, dates K/C
    assert basic.rule(calibration, None).action == "D"
    assert device.rule(calibration, None).action == "K"
    assert both.rule(calibration, None).action == "C"  # clean beats keep
    assert both.rule(calibration, None).source == "retain_longitudinal_modified_dates"
    assert basic.rule(0x00081110, None).action == "Z"  # ReferencedStudySequence X/Z
    assert basic.rule(0x00080021, None).action == "D"  # SeriesDate X/D
    assert basic.rule(0x00080080, None).action == "D"  # InstitutionName X/Z/D
    assert basic.rule(0x00080023, None).action == "D"  # ContentDate Z/D
    assert basic.rule(0x00081140, None).action == "U"  # ReferencedImageSequence X/Z/U*
    assert Profile(["retain_uids"]).rule(0x00080018, None).action == "K"
    with pytest.raises(ValueError, match="exclude each other"):
        Profile(["retain_longitudinal_full_dates", "retain_longitudinal_modified_dates"])
    with pytest.raises(ValueError, match="unknown"):
        Profile(["retain_everything"])


def test_patterns_and_attributes_not_in_the_table() -> None:
    basic, graphics = Profile(), Profile(["clean_graphics"])
    assert basic.rule(0x50020010, "US").action == "X"  # (50xx,xxxx) curves
    assert graphics.rule(0x501E2500, "LO").action == "C"
    assert basic.rule(0x60023000, "OW").action == "X"  # (60xx,3000) overlay data
    assert basic.rule(0x601E4000, "LT").action == "X"  # (60xx,4000) overlay comments
    assert basic.private_rule.action == "X"
    assert Profile(["retain_safe_private"]).private_rule.action == "C"
    assert basic.rule(0x00080016, None).action == "K"  # SOP Class UID
    concatenation = pydicom.datadict.tag_for_keyword("SOPInstanceUIDOfConcatenationSource")
    assert concatenation is not None and concatenation != 0x00209161
    assert basic.rule(concatenation, None).action == "U"  # not in the table: instance UID
    assert basic.rule(0x00080070, None).action == "K"  # Manufacturer: technical text
    assert basic.rule(0x00080060, None).action == "K"  # Modality: CS
    assert basic.rule(0x00280010, None).action == "K"  # Rows: numbers
    assert basic.rule(0x00080070, None, dummy=True).action == "D"  # inside D sequences
    assert basic.rule(0x0040A160, None).action == "D"  # TextValue: free text
    assert Profile(["clean_descriptors"]).rule(0x0040A160, None).action == "C"
    for keyword in SAFE_TEXT | CLASS_UIDS:
        assert pydicom.datadict.tag_for_keyword(keyword) is not None, keyword


# -- pseudonyms -------------------------------------------------------------------------
def test_uid_pseudonyms() -> None:
    p, q = Pseudonyms(KEY), Pseudonyms(OTHER_KEY)
    uid = p.uid("1.2.3.4.5")
    assert uid == Pseudonyms(KEY).uid("1.2.3.4.5") and uid != q.uid("1.2.3.4.5")
    assert uid != p.uid("1.2.3.4.6")
    assert re.fullmatch(r"2\.25\.[1-9][0-9]{0,38}", uid) and len(uid) <= 44
    n = int(uid[5:])
    assert n < 2**128 and (n >> 76) & 0xF == 8 and (n >> 62) & 0x3 == 2  # UUID v8, RFC 9562
    assert p.uid("1.2.840.10008.5.1.4.1.1.2") == "1.2.840.10008.5.1.4.1.1.2"
    with pytest.raises(ValueError):
        Pseudonyms(b"short")


def test_patient_pseudonyms_and_date_offsets() -> None:
    p = Pseudonyms(KEY)
    a = p.patient_key("12345", "HOSP")
    assert p.patient(a) == p.patient(p.patient_key(" 12345 ", "HOSP"))
    assert p.patient(a) != p.patient(p.patient_key("12345", "OTHER"))
    assert re.fullmatch(r"PAT-[A-Z2-7]{16}", p.patient(a))
    offsets = [p.date_offset(p.patient_key(str(i), "")) for i in range(300)]
    assert all(-SHIFT_DAYS <= o <= -1 for o in offsets)
    assert len(set(offsets)) > 250  # patients move by different offsets


def test_date_shift_and_ages() -> None:
    assert shift_da("20200115", -15) == "20191231"
    assert shift_da("2020.01.15", 1) == "20200116"
    assert shift_da("20200101-20200201", -1) == "20191231-20200131"
    assert shift_da("2020", -1) is None and shift_da("notadate", 1) is None
    assert shift_dt("20200115101500.25+0100", -15) == "20191231101500.25+0100"
    assert shift_dt("2020", -400) == "2018"
    assert shift_dt("202003", -1) == "202002"
    assert cap_age("095Y") == "090Y" and cap_age("089Y") == "089Y" and cap_age("999M") == "999M"


# -- PHI gone, in every encoding ------------------------------------------------------------
@pytest.mark.parametrize("options", [(), CLEANING, KEEPING], ids=["basic", "cleaning", "keeping"])
def test_no_injected_phi_in_the_output_bytes(corpus: Corpus, run: Callable[..., Run],
                                             options: tuple[str, ...]) -> None:
    outputs = written(run(options))
    assert len(outputs) == 8
    tokens = corpus.all_tokens(frozenset(ALLOWED[options]))
    needles = [t.encode() for t in tokens]
    for name in corpus.names:
        needles += [name.encode("utf-8"), name.encode("latin-1"), name.upper().encode()]
    if "retain_uids" not in options:
        needles.append(UID_ROOT.encode())
    if "retain_longitudinal_full_dates" not in options:
        needles += [STUDY_A1_DATE.encode(), STUDY_B_DATE.encode(), b"19750612", b"19280305"]
    for role, out in outputs.items():
        leaks = [n for n in needles if n in out.data]
        assert not leaks, f"{role}: {leaks[:5]}"


def test_both_paths_give_the_same_dataset(corpus: Corpus, tmp_path: Path) -> None:
    """The byte-level fast path and the pydicom path apply the same rules."""
    for options in ((), CLEANING, KEEPING):
        deid = Deidentifier(options, KEY)
        for inst in corpus.instances:
            fast = deid.deidentify_file(inst.path, tmp_path / "fast.dcm")
            ds, slow = deid.deidentify(read_instance(inst.path))
            assert (fast.held_back is None) == (slow.held_back is None)
            assert fast.removed == slow.removed and fast.replaced == slow.replaced
            assert fast.cleaned == slow.cleaned and fast.emptied == slow.emptied
            if fast.held_back:
                continue
            write_instance(ds, tmp_path / "slow.dcm")
            a, b = pydicom.dcmread(tmp_path / "fast.dcm"), pydicom.dcmread(tmp_path / "slow.dcm")
            assert _flat(a) == _flat(b), (options, inst.role)
            assert _flat(a.file_meta) == _flat(b.file_meta)


def _flat(ds: Dataset, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for elem in ds:
        key = f"{prefix}{elem.tag}"
        if elem.VR == "SQ":
            out[key] = len(elem.value)
            for i, item in enumerate(elem.value):
                out.update(_flat(item, f"{key}[{i}]."))
        else:
            out[key] = (elem.VR, elem.value)
    return out


def test_unchanged_bytes_round_trip(corpus: Corpus) -> None:
    """With nothing changed, the raw writer reproduces the dataset byte for byte."""
    for inst in corpus.instances:
        data = inst.path.read_bytes()
        meta, node, _ = rawdicom.parse_file(data)
        chunks: list[object] = []
        rawdicom.serialize(node, chunks)
        body = b"".join(bytes(c) for c in chunks)  # type: ignore[call-overload]
        start = max(e.end for e in meta.elems.values())
        assert body == data[start:], inst.role


# -- what options keep, is kept -------------------------------------------------------------
def test_basic_profile_keeps_no_private_and_no_identity(corpus: Corpus,
                                                        run: Callable[..., Run]) -> None:
    for role, out in written(run()).items():
        ds = out.ds
        assert ds is not None
        assert not [e for e in ds.iterall() if e.tag.is_private], role
        assert ds.PatientName == ds.PatientID and str(ds.PatientID).startswith("PAT-")
        assert "OtherPatientIDsSequence" not in ds and "PatientAddress" not in ds
        assert ds.get("InstitutionName") in (None, "DEIDENTIFIED")
    ct = run()["ct_a1"].ds
    assert ct is not None and ct.PatientBirthDate == "" and "PatientAge" not in ct
    assert ct.StudyDate == "" and ct.AccessionNumber == ""


def test_options_keep_what_they_say(corpus: Corpus, run: Callable[..., Run]) -> None:
    original = pydicom.dcmread(corpus.by_role("ct_a1").path)
    kept = run(KEEPING)["ct_a1"].ds
    assert kept is not None
    assert kept.DeviceSerialNumber == original.DeviceSerialNumber
    assert kept.StationName == original.StationName
    assert kept.InstitutionName == original.InstitutionName
    assert kept.SOPInstanceUID == original.SOPInstanceUID
    assert kept.StudyDate == original.StudyDate
    assert kept.LongitudinalTemporalInformationModified == "UNMODIFIED"

    cleaned = run(CLEANING)
    ct = cleaned["ct_a1"].ds
    assert ct is not None
    block = ct.private_block(SAFE_GROUP, SAFE_CREATOR)
    assert block[SAFE_ELEMENT].value == SAFE_VALUE  # Table E.3.10-1
    assert 0x01 not in block  # same creator, element not listed
    assert not [e for e in ct if e.tag.group == 0x0045]  # unknown creator
    assert ct.PatientSex == "F" and float(ct.PatientWeight) == 61.5
    assert cleaned["ct_b"].ds.PatientAge == "090Y"  # type: ignore[union-attr]
    assert ct.PatientAge == "044Y"
    assert ct.StudyDescription.startswith("CT HEAD") and "ller" not in ct.StudyDescription
    sr = cleaned["sr_b"].ds
    assert sr is not None
    meanings = {str(e.value) for e in sr.iterall() if e.keyword == "CodeMeaning"}
    assert "Text Code" in meanings  # structured content kept, its text cleaned
    assert {str(e.value) for e in sr.iterall() if e.keyword == "TextValue"} == {"DEIDENTIFIED"}
    basic_sr = run()["sr_b"].ds
    assert basic_sr is not None  # Basic Profile: Content Sequence D, all dummy
    assert "Text Code" not in {str(e.value) for e in basic_sr.iterall()
                               if e.keyword == "CodeMeaning"}


def test_clean_pixel_data_is_byte_identical(corpus: Corpus, run: Callable[..., Run]) -> None:
    for role in ("ct_a1", "ct_a2", "mr_a", "ct_b"):
        original = pydicom.dcmread(corpus.by_role(role).path)
        for options in ((), CLEANING):
            out = run(options)[role].ds
            assert out is not None and out.PixelData == original.PixelData, role


def test_overlays_and_curves(run: Callable[..., Run]) -> None:
    for options in ((), CLEANING):  # Clean Graphics without a pixel cleaner: removed too
        mr = run(options)["mr_a"]
        assert mr.ds is not None and not [e for e in mr.ds if e.tag.group == 0x6000]
    assert "Overlay group 6000" in run()["mr_a"].report.removed  # type: ignore[attr-defined]
    assert not [e for e in run()["mr_a"].ds if e.tag.group == 0x5000]  # type: ignore[union-attr]


# -- consistency: UIDs and dates ------------------------------------------------------------
def test_uids_consistent_within_a_project(corpus: Corpus, run: Callable[..., Run]) -> None:
    result = run()
    a1, a1b, mr = (result[r].ds for r in ("ct_a1", "ct_a1b", "mr_a"))
    assert a1 is not None and a1b is not None and mr is not None
    assert a1.StudyInstanceUID == a1b.StudyInstanceUID == mr.StudyInstanceUID
    assert a1.SeriesInstanceUID == a1b.SeriesInstanceUID != mr.SeriesInstanceUID
    assert a1.FrameOfReferenceUID == a1b.FrameOfReferenceUID == mr.FrameOfReferenceUID
    reference = a1b.ReferencedImageSequence[0]
    assert reference.ReferencedSOPInstanceUID == a1.SOPInstanceUID
    deep = reference.PurposeOfReferenceCodeSequence[0].AnatomicRegionModifierSequence[0]
    assert deep.ReferencedSOPInstanceUID == a1.SOPInstanceUID and deep.PatientName == ""
    assert a1.ReferencedImageSequence[0].ReferencedSOPInstanceUID == a1b.SOPInstanceUID
    assert a1.ReferencedStudySequence[0].ReferencedSOPInstanceUID == \
        result["ct_a2"].ds.StudyInstanceUID  # type: ignore[union-attr]
    plan, struct = result["rtplan_a"].ds, result["rtstruct_a"].ds
    assert plan is not None and struct is not None
    assert plan.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID == \
        struct.SOPInstanceUID
    for out in written(result).values():
        assert out.ds is not None
        assert out.ds.file_meta.MediaStorageSOPInstanceUID == out.ds.SOPInstanceUID
        assert out.ds.SOPInstanceUID.startswith("2.25.")
        assert out.path is not None and out.path.stem == out.ds.SOPInstanceUID
    assert a1.PatientID == mr.PatientID != result["ct_b"].ds.PatientID  # type: ignore[union-attr]


def test_uids_same_across_runs_and_different_across_projects(corpus: Corpus, tmp_path: Path,
                                                              run: Callable[..., Run]) -> None:
    again = Deidentifier((), KEY)
    other = run((), OTHER_KEY)
    for role, out in written(run()).items():
        report = again.deidentify_file(corpus.by_role(role).path, tmp_path / f"{role}.dcm")
        assert report.output_sop_uid == out.report.output_sop_uid  # type: ignore[attr-defined]
        assert other[role].report.output_sop_uid != report.output_sop_uid  # type: ignore
        assert other[role].ds.PatientID != out.ds.PatientID  # type: ignore[union-attr]


def test_dates_shifted_per_patient(corpus: Corpus, run: Callable[..., Run]) -> None:
    def day(value: str) -> date:
        return date(int(value[:4]), int(value[4:6]), int(value[6:8]))

    offsets = {}
    for key in (KEY, OTHER_KEY, b"a-third-key-for-the-date-test-000"):
        result = run(("retain_longitudinal_modified_dates",), key)
        a1, a2, b = (result[r].ds for r in ("ct_a1", "ct_a2", "ct_b"))
        assert a1 is not None and a2 is not None and b is not None
        assert (day(a2.StudyDate) - day(a1.StudyDate)).days == INTERVAL_A_DAYS
        shift_a = (day(a1.StudyDate) - day(STUDY_A1_DATE)).days
        shift_b = (day(b.StudyDate) - day(STUDY_B_DATE)).days
        assert -SHIFT_DAYS <= shift_a <= -1 and -SHIFT_DAYS <= shift_b <= -1
        assert shift_a != shift_b  # two patients, two offsets
        assert a1.AcquisitionDateTime[8:] == "101500.25"  # time of day kept
        assert a1.ContentDate == a1.StudyDate and a1.StudyTime  # TM untouched
        assert a1.LongitudinalTemporalInformationModified == "MODIFIED"
        assert a1.PatientBirthDate == ""  # Table E.1-1: Z, no option keeps it
        offsets[key] = (shift_a, shift_b)
    assert len(set(offsets.values())) == 3  # and each project its own
    basic = run()["ct_a1"].ds
    assert basic is not None and basic.LongitudinalTemporalInformationModified == "REMOVED"
    assert basic.AcquisitionDateTime == "19000101000000"  # X/Z/D: a dummy


def test_output_says_how_it_was_deidentified(run: Callable[..., Run]) -> None:
    table = method_codes()
    for options in ((), CLEANING, KEEPING):
        ds = run(options)["ct_a1"].ds
        assert ds is not None and ds.PatientIdentityRemoved == "YES"
        codes = [(c.CodingSchemeDesignator, c.CodeValue, c.CodeMeaning)
                 for c in ds.DeidentificationMethodCodeSequence]
        expected = {"113100"} | {Profile([o]).method_codes(False)[1][1] for o in options}
        assert {c[1] for c in codes} == expected
        assert all(table[c[1]] == c for c in codes)
        assert "2026d" in ds.DeidentificationMethod[0]
        equipment = ds.ContributingEquipmentSequence[-1]
        assert equipment.PurposeOfReferenceCodeSequence[0].CodeValue == "109104"


def test_report_lists_what_changed(run: Callable[..., Run]) -> None:
    report = run()["ct_a1"].report
    assert "PatientName" in report.replaced and "SOPInstanceUID" in report.replaced  # type: ignore
    assert "StudyDate" in report.emptied and "ImageComments" in report.removed  # type: ignore
    assert "SourceApplicationEntityTitle" in report.removed  # type: ignore[attr-defined]
    assert "ReferencedImageSequence/PurposeOfReferenceCodeSequence/" \
        "AnatomicRegionModifierSequence/PatientName" in report.emptied  # type: ignore
    kept = run(KEEPING)["ct_a1"].report
    assert "DeviceSerialNumber" in kept.kept_by_option  # type: ignore[attr-defined]


# -- burned-in text -----------------------------------------------------------------------
def test_burned_in_risk_rule() -> None:
    ds = Dataset()
    ds.PixelData = b"\x00\x00"
    ds.Modality, ds.SOPClassUID = "CT", "1.2.840.10008.5.1.4.1.1.2"
    assert burned_in_risk(ds) is None
    ds.BurnedInAnnotation = "YES"
    assert burned_in_risk(ds) == "BurnedInAnnotation is YES"
    ds.BurnedInAnnotation, ds.Modality = "NO", "US"
    assert "US" in (burned_in_risk(ds) or "")  # NO is not trusted for ultrasound
    ds.Modality, ds.SOPClassUID = "DX", "1.2.840.10008.5.1.4.1.1.1.1"
    assert burned_in_risk(ds) is None
    del ds.BurnedInAnnotation
    assert "DX" in (burned_in_risk(ds) or "")
    del ds.PixelData
    assert burned_in_risk(ds) is None


def test_risky_instances_are_held_back_without_a_cleaner(corpus: Corpus,
                                                         run: Callable[..., Run]) -> None:
    for role in ("us", "sc"):
        out = run()[role]
        assert out.path is None and out.report.output_sop_uid is None  # type: ignore
        assert "no pixel cleaner" in out.report.held_back  # type: ignore[attr-defined]
    assert "Ultrasound" in run()["us"].report.held_back  # type: ignore[attr-defined]


def passthrough(ds: Dataset, reason: str) -> Dataset:
    """A pixel 'cleaner' for tests: declares the pixels clean."""
    ds.BurnedInAnnotation = "NO"
    return ds


def refuse(ds: Dataset, reason: str) -> Dataset:
    raise HoldBack(f"no masking rule ({reason})")


def test_pixel_hook_cleans_or_holds_back(corpus: Corpus, run: Callable[..., Run]) -> None:
    cleaned = run((), KEY, passthrough)
    for role in ("us", "sc"):
        out = cleaned[role]
        assert out.ds is not None and out.report.pixels_cleaned  # type: ignore[attr-defined]
        assert "113101" in {c.CodeValue for c in out.ds.DeidentificationMethodCodeSequence}
        assert not [t for t in corpus.all_tokens() if t.encode() in out.data], role
    assert not cleaned["ct_a1"].report.pixels_cleaned  # type: ignore[attr-defined]
    refused = run((), KEY, refuse)["us"]
    assert refused.path is None and refused.report.held_back.startswith("no masking rule")  # type: ignore


# -- validity ------------------------------------------------------------------------------
def _errors(path: Path) -> set[str]:
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True,
                            timeout=60)
    lines = (result.stdout + result.stderr).splitlines()
    # Values (UIDs, numbers, quoted strings) change by design; the finding must not.
    return {re.sub(r'"[^"]*"|<[^>]*>|[0-9][0-9.]{5,}', "_", line)
            for line in lines if line.startswith("Error")}


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) missing")
@pytest.mark.parametrize("options", [(), CLEANING, KEEPING], ids=["basic", "cleaning", "keeping"])
def test_dciodvfy_finds_no_new_error(corpus: Corpus, run: Callable[..., Run],
                                     options: tuple[str, ...]) -> None:
    outputs = run(options, KEY, passthrough)
    assert len(written(outputs)) == 10
    for role, out in written(outputs).items():
        assert out.path is not None
        new = _errors(out.path) - _errors(corpus.by_role(role).path)
        assert not new, f"{role}: {sorted(new)}"


# -- the command line -------------------------------------------------------------------------
LAUNCHER = """
import sys
from pathlib import Path
import argparse
from dicomshare import cli_deid
from dicomshare.config import load_settings
parser = argparse.ArgumentParser(prog="dicomshare")
sub = parser.add_subparsers(dest="command", required=True)
cli_deid.add_parser(sub)
args = parser.parse_args(sys.argv[2:])
sys.exit(cli_deid.run(load_settings({"data_dir": Path(sys.argv[1])}), args))
"""


def deidentify(data_dir: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """``dicomshare deidentify ...`` (through cli_deid, as cli.py wires it)."""
    return subprocess.run([sys.executable, "-c", LAUNCHER, str(data_dir), "deidentify",
                           *map(str, args)], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)


def test_cli_over_a_folder_and_a_zip_with_two_jobs(corpus: Corpus, tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    shutil.copytree(corpus.folder, folder)
    archive = tmp_path / "more.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for inst in corpus.instances[:4]:
            z.write(inst.path, f"nested/{inst.name}")
    out, report, data = tmp_path / "out", tmp_path / "report.json", tmp_path / "data"
    result = deidentify(data, folder, archive, out, "--project", "trial-1", "--jobs", "2",
                        "--report", report, "--quiet")
    assert result.returncode == 0, result.stderr + result.stdout
    assert "de-identified: 12  held back: 2  rejected: 0" in result.stdout
    assert "held back" in result.stdout and "us.dcm" in result.stdout
    # The key is the research project's, kept in the archive's database.
    with sqlite3.connect(data / "index.db") as db:
        assert db.execute("SELECT name, length(secret) FROM research_project").fetchall() \
            == [("trial-1", 64)]
    doc = json.loads(report.read_text())
    assert doc["totals"] == {"written": 12, "held_back": 2, "rejected": 0}
    files = sorted(out.rglob("*.dcm"))
    assert len(files) == 8  # the zip repeats four instances: same UIDs, same files
    for f in files:
        patient, study, series = f.relative_to(out).parts[:3]
        ds = pydicom.dcmread(f)
        assert (patient, study, series, f.stem) == (ds.PatientID, ds.StudyInstanceUID,
                                                    ds.SeriesInstanceUID, ds.SOPInstanceUID)
    names = {f.name for f in files}

    # The same project again: the same files; --strict makes held-back instances fail.
    again = deidentify(data, folder, tmp_path / "out2", "--project", "trial-1", "--quiet",
                       "--strict")
    assert again.returncode == 1
    assert {f.name for f in (tmp_path / "out2").rglob("*.dcm")} == names

    # An unreadable input is rejected (exit 1); a key file is created 0600.
    (folder / "notes.txt").write_text("not DICOM")
    keyfile = tmp_path / "keys" / "p.key"
    bad = deidentify(data, folder, tmp_path / "out3", "--project-key-file", keyfile,
                     "--quiet", "--report", tmp_path / "r.csv")
    assert bad.returncode == 1 and "rejected" in bad.stdout and "notes.txt" in bad.stdout
    assert stat.S_IMODE(keyfile.stat().st_mode) == 0o600
    assert "rejected" in (tmp_path / "r.csv").read_text()
    assert {f.name for f in (tmp_path / "out3").rglob("*.dcm")}.isdisjoint(names)

    usage = deidentify(data, folder, tmp_path / "out4")
    assert usage.returncode == 2 and "project key" in usage.stderr


def test_update_tables_script(tmp_path: Path) -> None:
    data = ROOT / "src" / "dicomshare" / "deid" / "data"
    source = tmp_path / "published"
    shutil.copytree(data, source)
    script = [sys.executable, str(ROOT / "scripts" / "update_deid_tables.py")]
    ok = subprocess.run([*script, str(source), "--check"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    table = source / "ps3.15-table-e1-1.json"
    table.write_text(table.read_text().replace('"basic_profile": "Z"', '"basic_profile": "K"',
                                               1))
    bad = subprocess.run([*script, str(source), "--check"], capture_output=True, text=True)
    assert bad.returncode == 1 and "content_sha256" in bad.stderr


def test_throughput(corpus: Corpus, tmp_path: Path) -> None:
    """Prints instances/s over the corpus (Basic Profile); never fails on timing."""
    deid = Deidentifier((), KEY)
    files = [i.path for i in corpus.instances if i.role not in ("us", "sc")] * 10
    started = time.perf_counter()
    for n, path in enumerate(files):
        deid.deidentify_file(path, tmp_path / f"{n}.dcm")
    rate = len(files) / (time.perf_counter() - started)
    print(f"\nde-identification: {rate:.0f} instances/s ({len(files)} instances, 1 process)")
