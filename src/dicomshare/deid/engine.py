"""The de-identifier: one walk over a dataset, one dict lookup per element.

:class:`Deidentifier` applies a :class:`~dicomshare.deid.profile.Profile` to every element
at every depth of sequences. The walk runs over a :class:`~dicomshare.deid.nodes.Node`:
``deidentify_file`` parses the file into records pointing at its bytes
(``rawdicom.py``) and writes kept elements (always the pixel data) back as they were,
without building pydicom objects; ``deidentify`` works on a pydicom ``Dataset``, which is
also what a pixel hook gets. Both give the same result.

``deidentify`` works **in place**: the dataset given is modified and returned (copy it
first to keep the original). Instances that need pixel cleaning go to the pixel hook or
are held back (``pixels.py``). The semantics of every action are in
docs/deidentification.md.
"""

from __future__ import annotations

import io
import os
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pydicom import dcmread
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import UID

from dicomshare import __version__
from dicomshare.deid import rawdicom
from dicomshare.deid.nodes import DatasetNode, Node, getter
from dicomshare.deid.pixels import PIXEL_TAGS, HoldBack, PixelHook, risk
from dicomshare.deid.profile import C, D, K, Profile, Rule, U, X, Z, read_table
from dicomshare.deid.pseudonyms import Pseudonyms, shift_da, shift_dt
from dicomshare.deid.report import InstanceReport
from dicomshare.deid.values import Scrubber, cap_age, dummy, empty, identifying_terms
from dicomshare.deid.writer import encode_items, encode_meta, write_atomic, write_file
from dicomshare.errors import InvalidDicom

# Our ImplementationClassUID: a fixed UUID-derived UID (PS3.5 B.2), the same in every run.
IMPLEMENTATION_UID = UID(f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, 'urn:dicomshare:deid').int}")
IMPLEMENTATION_VERSION = f"DICOMSHARE{__version__}"[:16]
IN_MEMORY = 256 << 20  # larger files are read by pydicom, values left on disk until written
DEFER_SIZE = 64 * 1024

PATIENT_NAME, PATIENT_ID, ISSUER = 0x00100010, 0x00100020, 0x00100021
BIRTH_DATE, STUDY_UID, SERIES_UID = 0x00100030, 0x0020000D, 0x0020000E
SOP_CLASS, SOP_INSTANCE = 0x00080016, 0x00080018
_CONTRIBUTING_EQUIPMENT = 0x0018A001
_TIMEZONE = 0x00080201  # TimezoneOffsetFromUTC
_OVERLAY_DATA_MASK, _OVERLAY_DATA = 0xFF01FFFF, 0x60003000
_CURVE_GROUPS = 0x50  # (50xx,xxxx): tag >> 24
_FREE_TEXT = frozenset({"LT", "ST", "UT", "UR", "PN"})
_SHORT_TEXT = frozenset({"LO", "SH", "UC", "CS"})
_BYTES = frozenset({"OB", "OW", "OD", "OF", "OL", "OV", "UN"})
_NAMES: dict[int, str] = {}
_META_KEPT = frozenset({0x00020000, 0x00020001, 0x00020002, 0x00020003, 0x00020010,
                        0x00020012, 0x00020013})

Source = str | os.PathLike[str] | bytes | IO[bytes]
Destination = str | os.PathLike[str] | Callable[[Dataset], Path]


def _name(tag: int) -> str:
    """Keyword of a tag for the report, ``(gggg,eeee)`` when it has none."""
    found = _NAMES.get(tag)
    if found is None:
        found = keyword_for_tag(tag) or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
        _NAMES[tag] = found
    return found


@dataclass
class _State:
    """What one instance's walk needs and finds."""

    patient_key: bytes
    pseudonym: str
    scrub: Scrubber | None
    offset: int | None = None
    overlays_for_hook: bool = False
    removed: dict[str, None] = field(default_factory=dict)
    replaced: dict[str, None] = field(default_factory=dict)
    emptied: dict[str, None] = field(default_factory=dict)
    cleaned: dict[str, None] = field(default_factory=dict)
    kept: dict[str, None] = field(default_factory=dict)
    notes: dict[str, None] = field(default_factory=dict)

    def fill(self, report: InstanceReport) -> None:
        report.removed, report.replaced = list(self.removed), list(self.replaced)
        report.emptied, report.cleaned = list(self.emptied), list(self.cleaned)
        report.kept_by_option, report.notes = list(self.kept), list(self.notes)


class Deidentifier:
    """PS3.15 de-identification with one project's keys.

    ``options``: names from ``profile.OPTIONS`` (the Basic Profile always applies).
    ``project_key``: the secret behind pseudonyms and date shifts (at least 16 bytes).
    ``pixel_hook``: cleans pixels of instances at risk of burned-in text; without one they
    are held back.
    """

    def __init__(self, options: Iterable[str] = (), project_key: bytes = b"",
                 pixel_hook: PixelHook | None = None) -> None:
        self.profile = Profile(options)
        self.pseudonyms = Pseudonyms(project_key)
        self.pixel_hook = pixel_hook
        self._cleans_pixels = "clean_pixel_data" in self.profile.options
        self._hook_overlays = pixel_hook is not None and \
            self.profile.rule(_OVERLAY_DATA, "OW").action == C
        self._added: dict[tuple[bool, bool, bool], list[tuple[int, str, bytes]]] = {}

    # -- public API -----------------------------------------------------------------------
    def deidentify(self, ds: Dataset, source: str = "") -> tuple[Dataset, InstanceReport]:
        """De-identify ``ds`` in place; returns it (or the hook's result) and the report.

        When the report says ``held_back``, the returned dataset has a de-identified header
        but pixels that may show identifying text: it must not be released.
        """
        node = DatasetNode(ds)
        report = InstanceReport(source=source, input_sop_uid=node.first(SOP_INSTANCE, "UI"))
        reason = self._pixel_reason(node)
        st = self._state(node)
        self._walk(node, st, False, "", True)
        self._file_meta(ds, st)
        if st.overlays_for_hook and reason is None:
            reason = "overlay data (Clean Graphics Option)"
        cleaned = False
        if reason is not None:
            if self.pixel_hook is None:
                report.held_back = f"{reason}; no pixel cleaner configured"
            else:
                try:
                    ds = self.pixel_hook(ds, reason)
                    cleaned = True
                    applied = getattr(self.pixel_hook, "last", None)  # e.g. the masking rule
                    if applied is not None and hasattr(applied, "note"):
                        report.notes.append(applied.note())
                except HoldBack as exc:
                    report.held_back = exc.reason
                except Exception as exc:  # a failing cleaner must not let pixels through
                    report.held_back = f"pixel cleaner failed: {exc!r}"
        self._identify_method(ds, cleaned)
        report.pixels_cleaned = cleaned
        if report.held_back is None:
            report.output_sop_uid = _text(ds.get("SOPInstanceUID")) or None
        st.fill(report)
        return ds, report

    def deidentify_file(self, src: Source, dst: Destination,
                        source: str = "") -> InstanceReport:
        """Read, de-identify and write one instance; held-back instances are not written.

        ``src``: a path, the file's bytes or a binary stream. ``dst``: the output path, or
        a function of the de-identified dataset (with the new Patient ID and UIDs) that
        returns it, e.g. a folder layout. Raises :class:`~dicomshare.errors.InvalidDicom`
        when ``src`` is not a readable DICOM instance.
        """
        name = source or (str(src) if isinstance(src, str | os.PathLike) else "<stream>")
        data = _load(src)
        if data is not None:
            try:
                report = self._fast(data, dst, name)
            except (InvalidDicom, OSError):
                raise
            except Exception:  # Unsupported, or a value it cannot decode: pydicom decides
                report = None
            if report is not None:
                return report
        ds = read_instance(data if data is not None else src)
        try:
            ds, report = self.deidentify(ds, name)
        except InvalidDicom:
            raise
        except Exception as exc:  # pydicom cannot decode an element it had to change
            raise InvalidDicom(f"cannot de-identify: {exc}") from exc
        if report.held_back is not None:
            return report
        path = dst(ds) if callable(dst) else Path(dst)
        write_atomic(path, lambda tmp: write_file(ds, tmp))
        report.output_path = str(path)
        return report

    # -- the fast path ------------------------------------------------------------------------
    def _fast(self, data: bytes, dst: Destination, name: str) -> InstanceReport | None:
        """De-identify a file as bytes; None when it needs pydicom (the pixel hook)."""
        meta, node, syntax = rawdicom.parse_file(data)
        missing = [_name(t) for t in (SOP_CLASS, SOP_INSTANCE) if not node.has(t)]
        if missing:
            raise InvalidDicom(f"not a DICOM instance: no {' or '.join(missing)}")
        reason = self._pixel_reason(node)
        if self.pixel_hook is not None and (reason is not None or self._hook_overlays and any(
                t & _OVERLAY_DATA_MASK == _OVERLAY_DATA for t in node.tags())):
            return None  # the hook works on a pydicom dataset
        report = InstanceReport(source=name, input_sop_uid=node.first(SOP_INSTANCE, "UI"))
        st = self._state(node)
        self._walk(node, st, False, "", True)
        for tag in meta.tags():
            if tag not in _META_KEPT:
                st.removed[_name(tag)] = None
        if reason is not None:
            report.held_back = f"{reason}; no pixel cleaner configured"
            st.fill(report)
            return report
        for tag, vr, value in self._added_raw(False, node.implicit, node.little):
            if tag == _CONTRIBUTING_EQUIPMENT and node.has(tag) and node.is_sequence(tag):
                node.append_item(tag, value)
            else:
                node.put(tag, vr, value)
        sop = node.first(SOP_INSTANCE, "UI")
        head = FileMetaDataset()
        head.FileMetaInformationVersion = b"\x00\x01"
        head.MediaStorageSOPClassUID = UID(node.first(SOP_CLASS, "UI"))
        head.MediaStorageSOPInstanceUID = UID(sop)
        head.TransferSyntaxUID = UID(syntax)
        head.ImplementationClassUID = IMPLEMENTATION_UID
        head.ImplementationVersionName = IMPLEMENTATION_VERSION
        chunks: list[Any] = [b"\x00" * 128 + b"DICM", encode_meta(head)]
        rawdicom.serialize(node, chunks)
        if callable(dst):
            layout = Dataset()
            layout.PatientID = node.first(PATIENT_ID, "LO")
            layout.StudyInstanceUID = node.first(STUDY_UID, "UI")
            layout.SeriesInstanceUID = node.first(SERIES_UID, "UI")
            layout.SOPInstanceUID = sop
            path = dst(layout)
        else:
            path = Path(dst)
        write_atomic(path, chunks)
        report.output_sop_uid, report.output_path = sop or None, str(path)
        st.fill(report)
        return report

    # -- the walk ---------------------------------------------------------------------------
    def _pixel_reason(self, node: Node) -> str | None:
        pixels = any(node.has(t) for t in PIXEL_TAGS)
        reason = risk(getter(node), pixels)
        if reason is None and self._cleans_pixels and pixels:
            reason = "Clean Pixel Data Option"
        return reason

    def _state(self, node: Node) -> _State:
        pid, issuer = node.first(PATIENT_ID, "LO"), node.first(ISSUER, "LO")
        fallback = ""
        if not pid.strip():
            name = node.first(PATIENT_NAME, "PN").strip()
            fallback = (f"name\x00{name}\x00{node.first(BIRTH_DATE, 'DA')}" if name
                        else f"study\x00{node.first(STUDY_UID, 'UI')}")
        key = self.pseudonyms.patient_key(pid, issuer, fallback)
        scrub = Scrubber(identifying_terms(getter(node))) if self.profile.cleans_text else None
        return _State(key, self.pseudonyms.patient(key), scrub)

    def _walk(self, node: Any, st: _State, dummy_ctx: bool, prefix: str, top: bool) -> None:
        """Apply the rules to every element of ``node`` and, through sequences, below it."""
        profile = self.profile
        memo = profile.memo(dummy_ctx)
        private: list[int] = []
        overlay_groups: list[int] = []
        for t in node.tags():
            if t & 0x10000:
                private.append(t)
                continue
            rule = memo.get(t)
            if rule is None:
                rule = profile.rule(t, node.vr(t), dummy_ctx)
            if rule.action == K and rule.source == "default" and rule.vr not in ("SQ", "AS"):
                continue  # the common case: kept untouched, never decoded
            if t & _OVERLAY_DATA_MASK == _OVERLAY_DATA:
                if rule.action == C and self.pixel_hook is not None:
                    st.overlays_for_hook = True
                    continue
                if rule.action == C:
                    st.notes["overlay data removed: no pixel cleaner for Clean Graphics"] = None
                overlay_groups.append(t >> 16)
                continue
            self._apply(node, t, rule, st, dummy_ctx, prefix, top)
        if private:
            self._private(node, private, st, prefix)
        if overlay_groups:  # an overlay without its data is invalid: the group goes whole
            for t in node.tags():
                if t >> 16 in overlay_groups:
                    node.delete(t)
            for group in overlay_groups:
                st.removed[f"{prefix}Overlay group {group:04X}"] = None

    def _apply(self, node: Any, t: int, rule: Rule, st: _State, dummy_ctx: bool,
               prefix: str, top: bool) -> None:
        action = rule.action
        path = prefix + _name(t)
        if action == X:
            node.delete(t)
            st.removed[path] = None
            return
        vr = rule.vr if rule.vr and " or " not in rule.vr else (node.vr(t) or "UN")
        if top and (t == PATIENT_ID or t == PATIENT_NAME) and action != K:
            node.put(t, vr, st.pseudonym)
            st.replaced[path] = None
            return
        if vr == "SQ":
            # Table rules set the context of their items; defaults inherit it. Z and D keep
            # the items with dummy values: an empty sequence is invalid where the module
            # asks for one or more items (Type 3), a removed one where it is Type 2.
            inner = dummy_ctx if rule.source == "default" else action in (Z, D)
            for item in node.items(t):
                self._walk(item, st, inner, path + "/", False)
            if rule.by_option:
                (st.cleaned if action == C else st.kept)[path] = None
            return
        if node.is_empty(t):
            return  # nothing to hide in an empty value
        if action == K:
            if vr == "AS":
                _map(node, t, vr, cap_age)
            if rule.by_option:
                st.kept[path] = None
        elif action == Z:
            node.put(t, vr, empty(vr))
            st.emptied[path] = None
        elif action == U or (action == D and vr == "UI"):
            _map(node, t, vr, self.pseudonyms.uid)
            st.replaced[path] = None
        elif action == D:
            node.put(t, vr, dummy(vr))
            st.replaced[path] = None
        elif action == C:
            self._clean(node, t, vr, st, path)

    def _clean(self, node: Any, t: int, vr: str, st: _State, path: str) -> None:
        """Action C: replace with a value of similar meaning that identifies no one."""
        if vr in ("DA", "DT"):
            if st.offset is None:
                st.offset = self.pseudonyms.date_offset(st.patient_key)
            days, shift = st.offset, shift_da if vr == "DA" else shift_dt
            if _map(node, t, vr, lambda v: shift(v, days) or "\x00"):
                node.delete(t)  # a value that is not a date cannot be shifted: drop it
                st.removed[path] = None
            else:
                st.cleaned[path] = None
        elif vr == "TM" or t == _TIMEZONE:  # no one is identified by a time of day or a
            st.kept[path] = None  # time zone once the dates are shifted
        elif vr == "AE":
            _map(node, t, vr, self.pseudonyms.ae)
            st.cleaned[path] = None
        elif vr in _SHORT_TEXT and st.scrub is not None:
            scrub = st.scrub
            _map(node, t, vr, lambda v: scrub(v) or dummy(vr))
            st.cleaned[path] = None
        elif vr in _FREE_TEXT or vr in _SHORT_TEXT:
            node.put(t, vr, dummy(vr))
            st.cleaned[path] = None
        elif vr == "UI":
            _map(node, t, vr, self.pseudonyms.uid)
            st.replaced[path] = None
        elif vr == "AS":
            _map(node, t, vr, cap_age)
            st.kept[path] = None
        elif vr in _BYTES and t >> 24 != _CURVE_GROUPS:
            node.delete(t)  # opaque bytes (maker notes, settings) cannot be cleaned
            st.removed[path] = None
        else:
            st.kept[path] = None  # numbers, curve samples: nothing identifying

    def _private(self, node: Any, tags: list[int], st: _State, prefix: str) -> None:
        """Remove private elements, or keep those in Table E.3.10-1 (Retain Safe Private)."""
        safe = self.profile.safe_private
        creators: list[int] = []
        used: set[int] = set()
        for t in tags:
            group, element = t >> 16, t & 0xFFFF
            if 0x10 <= element <= 0xFF and group > 0x0008:
                creators.append(t)
                continue
            keep = False
            if safe and element > 0xFF and 0x0008 < group < 0xFFFF:
                creator_tag = (group << 16) | (element >> 8)
                creator = node.creator(creator_tag)
                keep = creator is not None and (group, creator, element & 0xFF) in safe
                if keep:
                    used.add(creator_tag)
                    if node.is_sequence(t):
                        for item in node.items(t):
                            self._walk(item, st, False, f"{prefix}{_name(t)}/", False)
                    st.kept[f"{prefix}{_name(t)} {creator}"] = None
            if not keep:
                node.delete(t)
                st.removed[prefix + _name(t)] = None
        for t in creators:
            if t not in used:
                node.delete(t)
                st.removed[prefix + _name(t)] = None

    # -- what the new object says about itself ------------------------------------------------
    def _file_meta(self, ds: Dataset, st: _State) -> None:
        """File meta information is the writer's: rebuilt, following the new SOP UIDs."""
        old = getattr(ds, "file_meta", None) or FileMetaDataset()
        meta = FileMetaDataset()
        meta.FileMetaInformationVersion = b"\x00\x01"
        meta.MediaStorageSOPClassUID = ds.get("SOPClassUID") or old.get("MediaStorageSOPClassUID")
        meta.MediaStorageSOPInstanceUID = UID(_text(ds.get("SOPInstanceUID")) or self.pseudonyms
                                              .uid(_text(old.get("MediaStorageSOPInstanceUID"))))
        meta.TransferSyntaxUID = old.get("TransferSyntaxUID") or _syntax_of(ds)
        meta.ImplementationClassUID = IMPLEMENTATION_UID
        meta.ImplementationVersionName = IMPLEMENTATION_VERSION
        for tag in old.keys():
            if int(tag) not in _META_KEPT:
                st.removed[_name(int(tag))] = None
        ds.file_meta = meta
        ds.preamble = b"\x00" * 128  # a preamble can carry anything (TIFF headers)

    def _added_raw(self, pixels_cleaned: bool, implicit: bool,
                   little: bool) -> list[tuple[int, str, bytes]]:
        """The added attributes, encoded once per encoding: every output has the same."""
        key = (pixels_cleaned, implicit, little)
        cached = self._added.get(key)
        if cached is None:
            cached = []
            for elem in self._method_elements(pixels_cleaned):
                value = elem.value
                if elem.VR == "SQ":
                    data = encode_items(list(value), implicit, little)
                else:
                    text = "\\".join(value) if isinstance(value, MultiValue | list) else value
                    data = text.encode("ascii")
                    data += b" " * (len(data) % 2)
                cached.append((int(elem.tag), elem.VR, data))
            self._added[key] = cached
        return cached

    def _identify_method(self, ds: Dataset, pixels_cleaned: bool) -> None:
        """PatientIdentityRemoved, the method and its CID 7050 codes, and the equipment."""
        encoding = getattr(ds, "original_encoding", (None, None))
        if None in encoding or "ContributingEquipmentSequence" in ds:
            for elem in self._method_elements(pixels_cleaned):
                if elem.tag == _CONTRIBUTING_EQUIPMENT and elem.tag in ds:
                    ds.ContributingEquipmentSequence.extend(elem.value)
                else:
                    ds[elem.tag] = elem
            return
        implicit, little = bool(encoding[0]), bool(encoding[1])
        for tag, vr, data in self._added_raw(pixels_cleaned, implicit, little):
            ds[tag] = RawDataElement(BaseTag(tag), vr, len(data), data, 0, implicit, little)

    def _method_elements(self, pixels_cleaned: bool) -> list[DataElement]:
        profile = self.profile
        codes = Sequence([_code(*c) for c in profile.method_codes(pixels_cleaned)])
        item = Dataset()
        item.PurposeOfReferenceCodeSequence = Sequence([_code(*_DEIDENTIFYING_EQUIPMENT)])
        item.Manufacturer = "dicomshare"
        item.SoftwareVersions = __version__
        return [DataElement(0x00120062, "CS", "YES"),  # PatientIdentityRemoved
                DataElement(0x00120063, "LO", profile.method_text(pixels_cleaned, __version__)),
                DataElement(0x00120064, "SQ", codes),  # DeidentificationMethodCodeSequence
                DataElement(_CONTRIBUTING_EQUIPMENT, "SQ", Sequence([item])),
                DataElement(0x00280303, "CS", profile.longitudinal)]


def _deidentifying_equipment() -> tuple[str, str, str]:
    for row in read_table("ps3.16-cid-7005.json")["rows"]:
        if row["code_value"] == "109104":
            return row["scheme_designator"], row["code_value"], row["code_meaning"]
    raise RuntimeError("CID 7005 has no 109104 (De-identifying Equipment)")


_DEIDENTIFYING_EQUIPMENT = _deidentifying_equipment()


def _code(scheme: str, value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _map(node: Any, t: int, vr: str, fn: Callable[[str], str]) -> bool:
    """Replace each value with ``fn(value)``; True (and nothing changed) if any became
    ``"\\x00"``, fn's way of saying a value cannot be kept."""
    values = node.strings(t, vr)
    mapped = [fn(v) for v in values]
    if "\x00" in mapped:
        return True
    if mapped != values:
        node.put(t, vr, mapped if len(mapped) > 1 else mapped[0])
    return False


def _syntax_of(ds: Dataset) -> UID:
    implicit, little = ds.original_encoding
    if implicit:
        return UID("1.2.840.10008.1.2")
    return UID("1.2.840.10008.1.2.1") if little is not False else UID("1.2.840.10008.1.2.2")


# -- reading and writing --------------------------------------------------------------------
def _load(src: Source) -> bytes | None:
    """The file's bytes, or None for a file too large to hold (read by pydicom instead)."""
    if isinstance(src, bytes):
        return src
    if isinstance(src, str | os.PathLike):
        try:
            if os.path.getsize(src) > IN_MEMORY:
                return None
            with open(src, "rb") as f:
                return f.read()
        except OSError as exc:
            raise InvalidDicom(f"cannot read: {exc}") from exc
    return src.read()


def read_instance(src: Source) -> Dataset:
    """Parse an instance without decoding its values; InvalidDicom if it is not one."""
    try:
        if isinstance(src, bytes):
            ds = dcmread(io.BytesIO(src), force=True)
        elif isinstance(src, str | os.PathLike):
            ds = dcmread(src, defer_size=DEFER_SIZE, force=True)
        else:
            ds = dcmread(src, force=True)
        missing = [k for k in ("SOPClassUID", "SOPInstanceUID") if k not in ds]
    except Exception as exc:  # pydicom raises many kinds on a damaged file
        raise InvalidDicom(f"not a readable DICOM file: {exc}") from exc
    if missing:
        raise InvalidDicom(f"not a DICOM instance: no {' or '.join(missing)}")
    return ds


def write_instance(ds: Dataset, path: Path) -> None:
    """Write ``ds`` as a DICOM file (PS3.10), atomically."""
    write_atomic(path, lambda tmp: write_file(ds, tmp))
