"""Synthetic DICOM test data, cached on disk so that reruns skip generation.

Every UID written here starts with ``PYDICOM_ROOT_UID + SLOT + "."`` where SLOT
is four digits ("1000" in the cache).  :func:`reslot` swaps that prefix for one
of the same length, which turns cached files into brand-new instances without
re-encoding them (element lengths do not change).  Each upload therefore gets
fresh UIDs, so no server silently skips duplicates (Orthanc does) and a
persistent PostgreSQL database can be reused across runs.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_ROOT_UID, UID, ExplicitVRLittleEndian, generate_uid

GEN_VERSION = 1  # bump when the content changes, to invalidate caches
CACHE_SLOT = "1000"
MIB = 1024 * 1024
BOUNDARY = "dicomshare-bench-7e3f0c1a9b"
STOW_CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
_PART_HEAD = f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
_CLOSE = f"--{BOUNDARY}--\r\n".encode()

Log = Callable[[str], None]

SOP_CLASSES = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "CR": "1.2.840.10008.5.1.4.1.1.1",
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",
    "US": "1.2.840.10008.5.1.4.1.1.6.1",
    "MG": "1.2.840.10008.5.1.4.1.1.1.2",
    "PT": "1.2.840.10008.5.1.4.1.1.128",
    "NM": "1.2.840.10008.5.1.4.1.1.20",
}
MODALITY_WEIGHTS = {"CT": 30, "MR": 20, "CR": 15, "DX": 12, "US": 10, "MG": 6, "PT": 4, "NM": 3}
SURNAMES = [
    "ADAMS",
    "BAKER",
    "BROWN",
    "CARTER",
    "CLARK",
    "DAVIS",
    "EVANS",
    "FISCHER",
    "GARCIA",
    "HARRIS",
    "HUGHES",
    "JACKSON",
    "JOHNSON",
    "KING",
    "LEWIS",
    "LOPEZ",
    "MARTIN",
    "MILLER",
    "MOORE",
    "MUELLER",
    "NGUYEN",
    "OLSEN",
    "PARKER",
    "PEREZ",
    "QUINN",
    "ROBERTS",
    "ROSSI",
    "SCHMIDT",
    "SMITH",
    "TAYLOR",
    "THOMAS",
    "TURNER",
    "VOGEL",
    "WALKER",
    "WHITE",
    "WILSON",
    "WRIGHT",
    "YOUNG",
    "ZHANG",
    "DUPONT",
]
GIVEN = [
    "ANNA",
    "BEN",
    "CLARA",
    "DAVID",
    "EMMA",
    "FELIX",
    "GRACE",
    "HUGO",
    "IDA",
    "JONAS",
    "LEA",
    "MARC",
    "NORA",
    "OSCAR",
    "PAULA",
    "SAM",
]


def _prefix(slot: str) -> str:
    return f"{PYDICOM_ROOT_UID}{slot}."


def new_uid(slot: str = CACHE_SLOT) -> str:
    return generate_uid(prefix=_prefix(slot))


def reslot(data: bytes, slot: str) -> bytes:
    """Give cached instance bytes fresh UIDs (same length, so still valid DICOM)."""
    return data.replace(_prefix(CACHE_SLOT).encode(), _prefix(slot).encode())


def reslot_uid(uid: str, slot: str) -> str:
    return uid.replace(_prefix(CACHE_SLOT), _prefix(slot), 1)


def reslot_stream(f: BinaryIO, slot: str, block: int = MIB) -> Iterator[bytes]:
    """Stream a cached file with fresh UIDs; keeps a tail so split prefixes are caught."""
    old, new = _prefix(CACHE_SLOT).encode(), _prefix(slot).encode()
    keep = len(old) - 1
    carry = b""
    while True:
        chunk = f.read(block)
        if not chunk:
            if carry:
                yield carry
            return
        buf = (carry + chunk).replace(old, new)
        carry, out = buf[-keep:], buf[:-keep]
        if out:
            yield out


class SlotAllocator:
    """Distinct slots per upload; random start so reruns on one database differ too."""

    def __init__(self) -> None:
        self._next = random.randint(1001, 9000)

    def take(self) -> str:
        slot = self._next
        self._next = 1001 if slot >= 9999 else slot + 1
        return str(slot)


def multipart(parts: Iterable[bytes]) -> bytes:
    """PS3.18 STOW-RS body, built in memory (only used for small requests)."""
    out = bytearray()
    for part in parts:
        out += _PART_HEAD
        out += part
        out += b"\r\n"
    out += _CLOSE
    return bytes(out)


def _encode(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    if int(pydicom.__version__.split(".")[0]) >= 3:
        ds.save_as(buf, enforce_file_format=True)
    else:  # pydicom 2.x
        ds.is_little_endian = True
        ds.is_implicit_VR = False
        ds.save_as(buf, write_like_original=False)
    return buf.getvalue()


def _base(sop_class: str, sop_uid: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.SpecificCharacterSet = "ISO_IR 100"
    return ds


def _set_pixels(ds: Dataset, pixels: np.ndarray, bits_stored: int) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype("<u2").tobytes()


_GRID: np.ndarray | None = None  # (y, x) coordinate planes in [-1, 1]


def phantom(z: float, rng: np.random.Generator) -> np.ndarray:
    """512x512 CT-like slice (stored value = HU + 1024) at z in [-1, 1].

    Smooth anatomy plus mild noise compresses like a real CT (roughly 2-3x
    lossless), unlike pure noise or flat images which would flatter or
    penalise whichever server compresses or hashes data.
    """
    global _GRID
    if _GRID is None:
        _GRID = np.mgrid[-1:1:512j, -1:1:512j].astype(np.float32)
    y, x = _GRID[0], _GRID[1]
    taper = 1.0 - 0.25 * z * z
    hu = np.full((512, 512), -1000.0, dtype=np.float32)
    body = (x / (0.85 * taper)) ** 2 + (y / (0.62 * taper)) ** 2 <= 1.0
    hu[body] = 30.0 + 25.0 * x[body]
    for cx in (-0.36, 0.36):
        lung = ((x - cx) / (0.24 * taper)) ** 2 + ((y + 0.05) / (0.36 * taper)) ** 2 <= 1.0
        hu[lung] = -850.0 + 60.0 * y[lung]
    heart = ((x - 0.08 - 0.05 * math.sin(3 * z)) / 0.17) ** 2 + ((y + 0.02) / 0.15) ** 2 <= taper
    hu[heart] = 55.0
    r2 = x**2 + (y - 0.42) ** 2
    hu[r2 <= 0.09**2] = 700.0
    hu[r2 <= 0.05**2] = 280.0
    hu += rng.normal(0.0, 12.0, size=hu.shape).astype(np.float32)
    stored: np.ndarray = np.clip(hu + 1024.0, 0, 4095).astype(np.uint16)
    return stored


def ct_instance(
    pixels: np.ndarray,
    *,
    study_uid: str,
    series_uid: str,
    frame_uid: str,
    series_number: int,
    instance_number: int,
    z_mm: float,
    slot: str = CACHE_SLOT,
    patient_id: str = "BENCHCT001",
    patient_name: str = "BENCH^CT",
) -> bytes:
    sop_uid = new_uid(slot)
    ds = _base(SOP_CLASSES["CT"], sop_uid)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PatientName, ds.PatientID = patient_name, patient_id
    ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = (
        study_uid,
        series_uid,
        frame_uid,
    )
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240115"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101500"
    ds.StudyID, ds.AccessionNumber = "1", "BENCHCT001"
    ds.ReferringPhysicianName = "REF^BENCH"
    ds.StudyDescription = "Synthetic CT chest"
    ds.Modality, ds.SeriesNumber = "CT", series_number
    ds.SeriesDescription = f"Axial recon {series_number}"
    ds.Manufacturer = "dicomshare-bench"
    ds.BodyPartExamined = "CHEST"
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [-250.0, -250.0, round(z_mm, 3)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.SliceLocation = round(z_mm, 3)
    ds.SliceThickness, ds.PixelSpacing = 1.0, [0.9765625, 0.9765625]
    ds.KVP, ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 120, -1024, 1, "HU"
    ds.WindowCenter, ds.WindowWidth = 40, 400
    _set_pixels(ds, pixels, 12)
    return _encode(ds)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _load_meta(folder: Path, expect: dict[str, object]) -> dict[str, object] | None:
    """Return cached metadata if compatible, else wipe the folder."""
    meta_path = folder / "meta.json"
    if meta_path.exists():
        meta: dict[str, object] = json.loads(meta_path.read_text())
        if all(meta.get(k) == v for k, v in expect.items()):
            return meta
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return None


@dataclass
class CtData:
    files: list[Path]
    study_uid: str
    series_uids: list[str]
    series_size: int

    def series_files(self, index: int) -> list[Path]:
        return self.files[index * self.series_size : (index + 1) * self.series_size]


def ensure_ct(data_dir: Path, slices: int, series_size: int, log: Log) -> CtData:
    """One CT study of `slices` 512x512 images split into series of `series_size`."""
    folder = data_dir / "ct"
    expect: dict[str, object] = {"version": GEN_VERSION, "series_size": series_size}
    meta = _load_meta(folder, expect) or {
        **expect,
        "study_uid": new_uid(),
        "frame_uid": new_uid(),
        "series_uids": [],
        "count": 0,
    }
    count = int(meta["count"])  # type: ignore[call-overload]
    series_uids: list[str] = list(meta["series_uids"])  # type: ignore[call-overload]
    if count < slices:
        log(f"generating CT slices {count}..{slices - 1} in {folder}")
        rng = np.random.default_rng(count)
        for i in range(count, slices):
            s, k = divmod(i, series_size)
            while len(series_uids) <= s:
                series_uids.append(new_uid())
            z = -1.0 + 2.0 * k / max(series_size - 1, 1)
            data = ct_instance(
                phantom(z, rng),
                study_uid=str(meta["study_uid"]),
                series_uid=series_uids[s],
                frame_uid=str(meta["frame_uid"]),
                series_number=s + 1,
                instance_number=k + 1,
                z_mm=k * 1.0,
            )
            _write_atomic(folder / f"ct-{i:06d}.dcm", data)
            if (i + 1) % 250 == 0:
                log(f"  {i + 1}/{slices}")
        meta.update(series_uids=series_uids, count=slices)
        _write_atomic(folder / "meta.json", json.dumps(meta).encode())
    files = [folder / f"ct-{i:06d}.dcm" for i in range(slices)]
    nseries = math.ceil(slices / series_size)
    return CtData(files, str(meta["study_uid"]), series_uids[:nseries], series_size)


@dataclass(frozen=True)
class StudyAttrs:
    patient_id: str
    patient_name: str
    study_date: str
    modality: str
    accession: str


def study_attrs(i: int) -> StudyAttrs:
    """Deterministic attributes of small study i (queries are derived from them)."""
    rng = random.Random(f"study-{i}")
    patient = i // 2  # two studies per patient on average
    prng = random.Random(f"patient-{patient}")
    name = f"{prng.choice(SURNAMES)}^{prng.choice(GIVEN)}"
    day = date(2005, 1, 1) + timedelta(days=rng.randrange(20 * 365))
    modality = rng.choices(list(MODALITY_WEIGHTS), weights=list(MODALITY_WEIGHTS.values()))[0]
    return StudyAttrs(f"BP{patient:07d}", name, day.strftime("%Y%m%d"), modality, f"AC{i:08d}")


def small_instance(i: int) -> bytes:
    a = study_attrs(i)
    ds = _base(SOP_CLASSES[a.modality], new_uid())
    ds.PatientName, ds.PatientID = a.patient_name, a.patient_id
    ds.PatientBirthDate = f"19{40 + i % 60:02d}0{1 + i % 9}15"
    ds.PatientSex = "MF"[i % 2]
    ds.StudyInstanceUID, ds.SeriesInstanceUID = new_uid(), new_uid()
    ds.StudyDate = ds.SeriesDate = a.study_date
    ds.StudyTime = f"{8 + i % 10:02d}{i % 60:02d}00"
    ds.AccessionNumber, ds.StudyID = a.accession, str(i % 100000)
    ds.ReferringPhysicianName = f"REF^{SURNAMES[i % len(SURNAMES)]}"
    ds.StudyDescription = f"{a.modality} study {i}"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = a.modality, 1, 1
    _set_pixels(ds, np.arange(64, dtype=np.uint16).reshape(8, 8) * (1 + i % 7), 12)
    return _encode(ds)


def ensure_small(data_dir: Path, count: int, log: Log) -> list[Path]:
    """`count` one-instance studies with tiny 8x8 images, for QIDO."""
    folder = data_dir / "small"
    expect: dict[str, object] = {"version": GEN_VERSION}
    meta = _load_meta(folder, expect) or {**expect, "count": 0}
    have = int(meta["count"])  # type: ignore[call-overload]
    if have < count:
        log(f"generating small studies {have}..{count - 1} in {folder}")
        for i in range(have, count):
            _write_atomic(folder / f"s-{i:06d}.dcm", small_instance(i))
        meta["count"] = count
        _write_atomic(folder / "meta.json", json.dumps(meta).encode())
    return [folder / f"s-{i:06d}.dcm" for i in range(count)]


@dataclass
class BigBody:
    path: Path
    instances: int
    size: int  # bytes of the whole multipart body


def ensure_big_body(data_dir: Path, mib: int, log: Log) -> BigBody:
    """A ~`mib` MiB STOW-RS multipart body on disk (one study), streamed when sent."""
    folder = data_dir / "big"
    folder.mkdir(parents=True, exist_ok=True)
    path, meta_path = folder / f"stow-{mib}MiB.multipart", folder / f"stow-{mib}MiB.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if (
            meta.get("version") == GEN_VERSION
            and path.exists()
            and path.stat().st_size == meta["size"]
        ):
            return BigBody(path, int(meta["instances"]), int(meta["size"]))
    log(f"generating {mib} MiB STOW body {path}")
    rng = np.random.default_rng(mib)
    study, series, frame = new_uid(), new_uid(), new_uid()
    n = max(1, math.ceil(mib * MIB / (512 * 512 * 2 + 1500)))
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as f:
        for k in range(n):
            f.write(_PART_HEAD)
            f.write(
                ct_instance(
                    phantom(-1.0 + 2.0 * k / max(n - 1, 1), rng),
                    study_uid=study,
                    series_uid=series,
                    frame_uid=frame,
                    series_number=1,
                    instance_number=k + 1,
                    z_mm=float(k),
                    patient_id="BENCHBIG",
                    patient_name="BENCH^BIG",
                )
            )
            f.write(b"\r\n")
        f.write(_CLOSE)
    os.replace(tmp, path)
    size = path.stat().st_size
    meta_path.write_text(json.dumps({"version": GEN_VERSION, "instances": n, "size": size}))
    return BigBody(path, n, size)


def warm_page_cache(files: Iterable[Path]) -> int:
    """Read files once so the first server measured does not pay for cold disk reads."""
    total = 0
    for p in files:
        total += len(p.read_bytes())
    return total
