"""A synthetic PHI corpus for the de-identification tests, built from pydicom's sample files.

Every identifying value injected is a unique token ``PHI-<hex>`` (or a non-ASCII name), so
a test can look for it in the output *bytes*: if the token is there in any encoding, PHI
leaked. Tokens are grouped by what they are, because some options keep some groups
(Retain Device Identity keeps the device serial, for one).

Two patients: A (Müller^Zoë, UTF-8 character set) with two studies a known number of days
apart (CT slices referencing each other, an MR, an RT plan referencing its structure set);
B with one CT, an SR whose content items carry text, names and dates, and an age of 95.
Plus an ultrasound and a secondary capture (burned-in risk), overlays, curves, private
tags of a safe creator (Table E.3.10-1) and of an unknown one, and sequences three deep.
"""

from __future__ import annotations

import secrets
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's root: the corpus's original UIDs
STUDY_A1_DATE, STUDY_A2_DATE, STUDY_B_DATE = "20200115", "20210310", "20190704"
INTERVAL_A_DAYS = 420  # from STUDY_A1_DATE to STUDY_A2_DATE
SAFE_CREATOR, SAFE_GROUP, SAFE_ELEMENT = "GEMS_PARM_01", 0x0043, 0x27  # (0043,xx27) SH
SAFE_VALUE = "0.984:1"


@dataclass
class Instance:
    name: str  # file name in the corpus folder
    role: str  # ct_a1, ct_a2, mr_a, rtplan_a, rtstruct_a, ct_b, sr_b, us, sc
    patient: str  # "A", "B" or "C"
    study: str
    sop_uid: str
    path: Path = Path()


@dataclass
class Corpus:
    folder: Path
    instances: list[Instance] = field(default_factory=list)
    tokens: dict[str, list[str]] = field(default_factory=dict)  # category -> tokens
    names: list[str] = field(default_factory=list)  # non-ASCII PHI, checked in every encoding
    patient_ids: dict[str, str] = field(default_factory=dict)  # patient letter -> Patient ID
    issuers: dict[str, str] = field(default_factory=dict)  # patient letter -> its issuer

    def token(self, category: str) -> str:
        value = f"PHI-{secrets.token_hex(5)}"
        self.tokens.setdefault(category, []).append(value)
        return value

    def by_role(self, role: str) -> Instance:
        return next(i for i in self.instances if i.role == role)

    def all_tokens(self, except_categories: frozenset[str] = frozenset()) -> list[str]:
        return [t for c, ts in self.tokens.items() if c not in except_categories for t in ts]


def _uid(_corpus: Corpus) -> str:
    return UID_ROOT + str(int.from_bytes(secrets.token_bytes(12), "big"))


def _load(name: str) -> Dataset:
    path = get_testdata_file(name)
    assert path, f"pydicom test file {name} missing"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path, force=True)


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _patient(c: Corpus, ds: Dataset, patient: str) -> None:
    """Patient, study-level people and places, devices, free text: all tokens."""
    if patient == "A":
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName = "Müller^Zoë"
    else:
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName = f"{c.token('patient')}^{c.token('patient')}"
    ds.PatientID = c.patient_ids.setdefault(patient, f"PHI-{secrets.token_hex(5)}")
    c.tokens.setdefault("patient_id", [])
    if ds.PatientID not in c.tokens["patient_id"]:
        c.tokens["patient_id"].append(ds.PatientID)
    if patient not in c.issuers:
        c.issuers[patient] = c.token("patient")
    ds.IssuerOfPatientID = c.issuers[patient]
    ds.PatientBirthDate = "19280305" if patient == "B" else "19750612"
    ds.PatientAge = "095Y" if patient == "B" else "044Y"
    ds.PatientSex = "F"
    ds.PatientWeight = "61.5"
    ds.PatientAddress = c.token("patient")
    ds.PatientTelephoneNumbers = c.token("patient")
    ds.PatientMotherBirthName = c.token("patient")
    ds.OtherPatientIDsSequence = Sequence([Dataset()])
    ds.OtherPatientIDsSequence[0].PatientID = c.token("patient")
    ds.PatientComments = c.token("free_text")
    ds.AdditionalPatientHistory = c.token("free_text")
    ds.ReferringPhysicianName = c.token("people")
    ds.PerformingPhysicianName = c.token("people")
    ds.OperatorsName = c.token("people")
    ds.PhysiciansOfRecord = c.token("people")
    ds.AccessionNumber = c.token("study_ids")[:16]
    ds.StudyID = c.token("study_ids")[:16]
    ds.InstitutionName = c.token("institution")
    ds.InstitutionAddress = c.token("institution")
    ds.InstitutionalDepartmentName = c.token("institution")
    ds.StationName = c.token("device")[:16]
    ds.DeviceSerialNumber = c.token("device")
    ds.ImageComments = c.token("free_text")
    ds.StudyComments = c.token("free_text")
    ds.SeriesDescription = c.token("descriptor")
    ds.ProtocolName = c.token("descriptor")
    # A descriptor naming the patient: Clean Descriptors must cut the name, keep the rest.
    family = str(ds.PatientName).split("^")[0]
    ds.StudyDescription = f"CT HEAD {family} {c.token('descriptor')}"
    ds.RequestAttributesSequence = Sequence([Dataset()])
    ds.RequestAttributesSequence[0].RequestedProcedureID = c.token("study_ids")[:16]
    ds.RequestAttributesSequence[0].ScheduledProcedureStepDescription = c.token("descriptor")


def _private(c: Corpus, ds: Dataset) -> None:
    block = ds.private_block(SAFE_GROUP, SAFE_CREATOR, create=True)
    block.add_new(SAFE_ELEMENT, "SH", SAFE_VALUE)
    block.add_new(0x01, "LO", c.token("private_unsafe"))  # creator safe, element not listed
    other = ds.private_block(0x0045, "ACME PHI SYSTEMS 1.0", create=True)
    other.add_new(0x10, "LO", c.token("private_unsafe"))
    other.add_new(0x11, "UN", c.token("private_unsafe").encode() + b" ")


def _deep(c: Corpus, ds: Dataset, referenced_sop: str, referenced_study: str) -> None:
    """ReferencedImageSequence > item > PurposeOfReferenceCodeSequence > item >
    AnatomicRegionModifierSequence > item holding a name, an institution and a UID."""
    level3 = Dataset()
    level3.update(_code("T-D1100", "SRT", "Head"))
    level3.PatientName = c.token("patient")
    level3.InstitutionName = c.token("institution")
    level3.ReferencedSOPInstanceUID = referenced_sop
    level2 = _code("121311", "DCM", "Localizer")
    level2.AnatomicRegionModifierSequence = Sequence([level3])
    level1 = Dataset()
    level1.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    level1.ReferencedSOPInstanceUID = referenced_sop
    level1.PurposeOfReferenceCodeSequence = Sequence([level2])
    ds.ReferencedImageSequence = Sequence([level1])
    study = Dataset()
    study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    study.ReferencedSOPInstanceUID = referenced_study
    study.PatientName = c.token("patient")
    ds.ReferencedStudySequence = Sequence([study])


def _overlay_and_curve(c: Corpus, ds: Dataset) -> None:
    rows, cols = int(ds.Rows), int(ds.Columns)
    ds.add_new(0x60000010, "US", rows)
    ds.add_new(0x60000011, "US", cols)
    ds.add_new(0x60000022, "LO", c.token("graphics"))  # Overlay Description
    ds.add_new(0x60000040, "CS", "G")
    ds.add_new(0x60000050, "SS", [1, 1])
    ds.add_new(0x60000100, "US", 1)
    ds.add_new(0x60000102, "US", 0)
    ds.add_new(0x60003000, "OW", b"\x0f" * (rows * cols // 8))
    ds.add_new(0x60004000, "LT", c.token("graphics"))  # Overlay Comments
    ds.add_new(0x50002500, "LO", c.token("graphics"))  # Curve Label


def _save(c: Corpus, ds: Dataset, inst: Instance, implicit: bool = False) -> None:
    ds.SOPInstanceUID = inst.sop_uid
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = UID(inst.sop_uid)
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    meta.SourceApplicationEntityTitle = c.token("device")[:16]
    ds.file_meta = meta
    inst.path = c.folder / inst.name
    ds.save_as(inst.path, enforce_file_format=True, implicit_vr=implicit, little_endian=True)
    c.instances.append(inst)


def build(folder: Path) -> Corpus:
    """Write the corpus into ``folder`` (created) and describe it."""
    folder.mkdir(parents=True, exist_ok=True)
    c = Corpus(folder, names=["Müller", "Zoë"])
    study_a1, study_a2, study_b = _uid(c), _uid(c), _uid(c)
    series_a1, frame_a1 = _uid(c), _uid(c)
    uids = {role: _uid(c) for role in ("ct_a1", "ct_a1b", "ct_a2", "mr_a", "rtplan_a",
                                        "rtstruct_a", "ct_b", "sr_b", "us", "sc")}

    # Patient A, study 1: two CT slices of one series, the second referencing the first.
    for role, ref in (("ct_a1", uids["ct_a1b"]), ("ct_a1b", uids["ct_a1"])):
        ds = _load("CT_small.dcm")
        _patient(c, ds, "A")
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_a1, series_a1
        ds.FrameOfReferenceUID = frame_a1
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = STUDY_A1_DATE
        ds.AcquisitionDateTime = STUDY_A1_DATE + "101500.25"
        _deep(c, ds, ref, study_a2)
        _private(c, ds)
        _save(c, ds, Instance(f"{role}.dcm", role, "A", study_a1, uids[role]))
    # Patient A, study 1: an MR with an overlay and a curve.
    ds = _load("MR_small.dcm")
    _patient(c, ds, "A")
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_a1, _uid(c), \
        frame_a1
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = STUDY_A1_DATE
    _overlay_and_curve(c, ds)
    _save(c, ds, Instance("mr_a.dcm", "mr_a", "A", study_a1, uids["mr_a"]))
    # Patient A, study 2 (420 days later): a CT, an RT structure set and a plan using it.
    ds = _load("CT_small.dcm")
    _patient(c, ds, "A")
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_a2, _uid(c), \
        _uid(c)
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = STUDY_A2_DATE
    _save(c, ds, Instance("ct_a2.dcm", "ct_a2", "A", study_a2, uids["ct_a2"]))
    ds = _load("rtstruct.dcm")
    _patient(c, ds, "A")
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_a2, _uid(c)
    ds.StudyDate = ds.StructureSetDate = STUDY_A2_DATE
    ds.StructureSetLabel = c.token("descriptor")[:16]
    _save(c, ds, Instance("rtstruct_a.dcm", "rtstruct_a", "A", study_a2, uids["rtstruct_a"]))
    ds = _load("rtplan.dcm")
    _patient(c, ds, "A")
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_a2, _uid(c)
    ds.StudyDate = ds.RTPlanDate = STUDY_A2_DATE
    ds.RTPlanLabel = c.token("descriptor")[:16]
    ds.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID = uids["rtstruct_a"]
    _save(c, ds, Instance("rtplan_a.dcm", "rtplan_a", "A", study_a2, uids["rtplan_a"]),
          implicit=True)

    # Patient B: a CT and an SR with identifying content items.
    ds = _load("CT_small.dcm")
    _patient(c, ds, "B")
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_b, _uid(c), \
        _uid(c)
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = STUDY_B_DATE
    _save(c, ds, Instance("ct_b.dcm", "ct_b", "B", study_b, uids["ct_b"]))
    ds = _load("test-SR.dcm")
    _patient(c, ds, "B")
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_b, _uid(c)
    ds.StudyDate = ds.ContentDate = STUDY_B_DATE
    _sr_content(c, ds.ContentSequence)
    observer = Dataset()
    observer.RelationshipType, observer.ValueType = "HAS OBS CONTEXT", "PNAME"
    observer.ConceptNameCodeSequence = Sequence([_code("121008", "DCM", "Person Observer Name")])
    observer.PersonName = c.token("people")
    ds.ContentSequence.insert(0, observer)
    ds.VerifyingObserverSequence[0].VerifyingObserverName = c.token("people")
    ds.VerifyingObserverSequence[0].VerifyingOrganization = c.token("institution")
    _save(c, ds, Instance("sr_b.dcm", "sr_b", "B", study_b, uids["sr_b"]))

    # Patient C: images whose pixels commonly carry burned-in text.
    for role, sample in (("us", "US1_UNCR.dcm"), ("sc", "SC_rgb.dcm")):
        ds = _load(sample)
        _patient(c, ds, "C")
        ds.StudyInstanceUID, ds.SeriesInstanceUID = _uid(c), _uid(c)
        if role == "sc":
            ds.Modality = "OT"
        _save(c, ds, Instance(f"{role}.dcm", role, "C", str(ds.StudyInstanceUID), uids[role]))
    return c


def _sr_content(c: Corpus, items: Sequence) -> None:
    """Put PHI into every TEXT, PNAME and DATE content item, at every depth."""
    for item in items:
        kind = item.get("ValueType", "")
        if kind == "TEXT":
            item.TextValue = f"Patient seen by {c.token('sr_text')} on 2019-07-04"
        elif kind == "PNAME":
            item.PersonName = c.token("people")
        elif kind == "DATE":
            item.Date = STUDY_B_DATE
        if "ContentSequence" in item:
            _sr_content(c, item.ContentSequence)
