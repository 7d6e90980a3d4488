"""Burned-in annotation masking: black out known text regions, per device and image size.

Ultrasound scanners, screen captures and some projection devices draw the patient's name,
ID, dates and institution into the pixels. Their layouts are fixed per manufacturer,
model and image size, so a site can describe them once as rectangles and have every
instance of that layout cleaned. :class:`MaskingHook` is the engine's pixel hook
(:data:`dicomshare.deid.pixels.PixelHook`): it finds the first matching rule, sets its
rectangles to a flat value in every frame (and in overlay planes), and marks the instance
``BurnedInAnnotation NO``; with no matching rule, or pixels it cannot decode, it raises
:class:`~dicomshare.deid.pixels.HoldBack`, so the instance is listed for review rather
than passed through.

Rules file (JSON, shown with explanatory comments JSON does not allow; ``data/masks.json``
is the packaged default)::

    {"rules": [
      {"name": "ge-logiq-700-640x480",
       "Manufacturer": {"regex": "G\\\\.?E\\\\.? Medical Systems"},   # or "exact", or a list
       "ManufacturerModelName": "LOGIQ 700",
       "Rows": 480, "Columns": 640,                                # required
       "Modality": "US",                                           # optional
       "SOPClassUID": ["1.2.840.10008.5.1.4.1.1.6.1"],            # optional
       "rectangles": [[0, 0, 640, 106], {"x": -200, "y": -40, "width": 200, "height": 40}]}
    ]}

Text matchers are an exact string (compared after stripping DICOM padding), a list of
exact strings, or ``{"regex": "..."}`` (``re.fullmatch``); an absent matcher matches
anything. Rectangles are ``x, y, width, height`` in pixels; a negative ``x`` (``y``)
counts from the right (bottom) edge, so ``-200`` starts 200 columns from the right. Each
must lie inside ``Columns x Rows``; the file is checked when loaded, and unknown keys are
errors (a misspelt key must not silently widen a rule). Site rules come before the
packaged ones and the first match wins, so put specific rules before generic ones.

The packaged rules are examples: one measured layout (GE LOGIQ 700, 640x480) and generic
top bands for ultrasound at common screen sizes, which only cover the usual header banner.
Every site must check its devices' layouts and add its own rules.

Pixels: native (uncompressed) pixel data is edited in place, so every byte outside the
rectangles is unchanged and the transfer syntax is kept. Encapsulated (compressed) pixel
data is decoded with pydicom's decoders (pylibjpeg, numpy), YCbCr converted to RGB, and
written back as Explicit VR Little Endian; LossyImageCompression history is kept (and set
when the input transfer syntax was lossy). Masked samples are 0, except YBR_FULL data,
which gets black (Y 0, Cb and Cr mid-range) so the region is not tinted.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID, ExplicitVRBigEndian

from dicomshare.deid.pixels import HoldBack

DEFAULT_RULES = Path(__file__).with_name("data") / "masks.json"

_MATCH_KEYS = ("Manufacturer", "ManufacturerModelName", "Modality", "SOPClassUID")
_RULE_KEYS = frozenset({"name", "description", "Rows", "Columns", "rectangles", *_MATCH_KEYS})
# Transfer syntaxes that are always lossy, and the LossyImageCompressionMethod they imply.
_LOSSY_METHOD = {
    "1.2.840.10008.1.2.4.50": "ISO_10918_1", "1.2.840.10008.1.2.4.51": "ISO_10918_1",
    "1.2.840.10008.1.2.4.100": "ISO_13818_2", "1.2.840.10008.1.2.4.101": "ISO_13818_2",
    "1.2.840.10008.1.2.4.102": "ISO_14496_10", "1.2.840.10008.1.2.4.103": "ISO_14496_10",
    "1.2.840.10008.1.2.4.104": "ISO_14496_10", "1.2.840.10008.1.2.4.105": "ISO_14496_10",
    "1.2.840.10008.1.2.4.106": "ISO_14496_10", "1.2.840.10008.1.2.4.107": "ISO_23008_2",
    "1.2.840.10008.1.2.4.108": "ISO_23008_2",
}
_OFFSET_TABLES = (0x7FE00001, 0x7FE00002)  # Extended Offset Table (Lengths): encapsulated only


class RulesError(ValueError):
    """A rules file that cannot be used; the message names the file and the rule."""


@dataclass(frozen=True, slots=True)
class Matcher:
    """One header value test: any of ``exact`` values, or a regex (full match)."""

    exact: frozenset[str] = frozenset()
    regex: re.Pattern[str] | None = None

    def __call__(self, value: str) -> bool:
        if self.regex is not None:
            return self.regex.fullmatch(value) is not None
        return value in self.exact

    def describe(self) -> str:
        return f"/{self.regex.pattern}/" if self.regex is not None else "|".join(
            sorted(self.exact))


@dataclass(frozen=True, slots=True)
class Rect:
    """A rectangle as written in the rules (x, y may be negative: from the right/bottom)."""

    x: int
    y: int
    width: int
    height: int

    def resolve(self, rows: int, columns: int) -> tuple[int, int, int, int]:
        """Absolute (x, y, width, height) in an image of ``columns x rows``."""
        x = self.x + columns if self.x < 0 else self.x
        y = self.y + rows if self.y < 0 else self.y
        return x, y, self.width, self.height


@dataclass(frozen=True, slots=True)
class MaskRule:
    """One known layout: what it matches and the rectangles that hold text."""

    name: str
    rows: int
    columns: int
    rectangles: tuple[Rect, ...]
    match: tuple[tuple[str, Matcher], ...] = ()
    source: str = ""  # file the rule came from, for the report
    description: str = ""

    def matches(self, ds: Dataset) -> bool:
        if _int(ds, "Rows") != self.rows or _int(ds, "Columns") != self.columns:
            return False
        return all(any(m(v) for v in _strings(ds, keyword)) for keyword, m in self.match)

    def boxes(self) -> list[tuple[int, int, int, int]]:
        return [r.resolve(self.rows, self.columns) for r in self.rectangles]


@dataclass
class MaskResult:
    """What masking did to one instance, for the de-identification report."""

    rule: str
    source: str
    rectangles: list[tuple[int, int, int, int]]  # absolute x, y, width, height
    frames: int
    decompressed_from: str | None = None  # transfer syntax name, when it was encapsulated
    overlays: list[str] = field(default_factory=list)  # overlay groups masked, e.g. "6000"

    def note(self) -> str:
        """One line for ``InstanceReport.notes``."""
        boxes = ", ".join(f"[{x},{y},{w},{h}]" for x, y, w, h in self.rectangles)
        text = (f"pixels masked by rule {self.rule!r} ({self.source}): x,y,w,h {boxes} "
                f"in {self.frames} frame(s)")
        if self.overlays:
            text += f", overlays {','.join(self.overlays)}"
        if self.decompressed_from:
            text += f"; decompressed from {self.decompressed_from} to Explicit VR Little Endian"
        return text


# -- rules files -----------------------------------------------------------------------------
def _matcher(value: Any, where: str) -> Matcher:
    if isinstance(value, str):
        return Matcher(exact=frozenset({value.strip()}))
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return Matcher(exact=frozenset(v.strip() for v in value))
    if isinstance(value, dict) and set(value) == {"regex"} and isinstance(value["regex"], str):
        try:
            return Matcher(regex=re.compile(value["regex"]))
        except re.error as exc:
            raise RulesError(f"{where}: bad regex {value['regex']!r}: {exc}") from exc
    raise RulesError(f"{where}: expected a string, a list of strings or {{\"regex\": ...}}, "
                     f"got {value!r}")


def _rect(value: Any, where: str) -> Rect:
    if isinstance(value, dict):
        if set(value) != {"x", "y", "width", "height"}:
            raise RulesError(f"{where}: a rectangle needs exactly x, y, width, height")
        value = [value["x"], value["y"], value["width"], value["height"]]
    if not (isinstance(value, list) and len(value) == 4
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise RulesError(f"{where}: a rectangle is [x, y, width, height] in whole pixels")
    return Rect(*value)


def parse_rules(doc: Any, source: str) -> list[MaskRule]:
    """Rules from a parsed JSON document, checked (RulesError says what and where)."""
    items = doc.get("rules") if isinstance(doc, dict) else None
    if not isinstance(items, list):
        raise RulesError(f"{source}: expected an object with a \"rules\" list")
    rules: list[MaskRule] = []
    for i, item in enumerate(items):
        where = f"{source}: rule {i + 1}"
        if not isinstance(item, dict):
            raise RulesError(f"{where}: expected an object")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise RulesError(f"{where}: needs a \"name\"")
        where = f"{source}: rule {name!r}"
        unknown = set(item) - _RULE_KEYS
        if unknown:
            raise RulesError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} "
                             f"(known: {', '.join(sorted(_RULE_KEYS))})")
        rows, columns = item.get("Rows"), item.get("Columns")
        if not (isinstance(rows, int) and isinstance(columns, int) and rows > 0 and columns > 0):
            raise RulesError(f"{where}: Rows and Columns must be positive integers")
        raw_rects = item.get("rectangles")
        if not isinstance(raw_rects, list) or not raw_rects:
            raise RulesError(f"{where}: needs a non-empty \"rectangles\" list")
        rects = tuple(_rect(r, f"{where}, rectangle {j + 1}") for j, r in enumerate(raw_rects))
        for j, rect in enumerate(rects):
            x, y, w, h = rect.resolve(rows, columns)
            if w <= 0 or h <= 0 or x < 0 or y < 0 or x + w > columns or y + h > rows:
                raise RulesError(f"{where}, rectangle {j + 1} "
                                 f"{[rect.x, rect.y, rect.width, rect.height]}: "
                                 f"not inside {columns}x{rows} (columns x rows)")
        match = tuple((k, _matcher(item[k], f"{where}, {k}")) for k in _MATCH_KEYS if k in item)
        description = item.get("description", "")
        rules.append(MaskRule(name, rows, columns, rects, match, source,
                              description if isinstance(description, str) else ""))
    return rules


def load_rules(path: str | Path) -> list[MaskRule]:
    """Rules from a JSON file (RulesError if it is unreadable or invalid)."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RulesError(f"{p}: cannot read masking rules: {exc}") from exc
    return parse_rules(doc, p.name if p == DEFAULT_RULES else str(p))


def default_rules() -> list[MaskRule]:
    """The packaged examples (``data/masks.json``)."""
    return load_rules(DEFAULT_RULES)


# -- the hook --------------------------------------------------------------------------------
class MaskingHook:
    """The engine's pixel hook: mask by the first matching rule, else hold the instance back.

    Picklable (plain data), so it can be passed to worker processes with ``--jobs``. The
    result of the last call is kept in :attr:`last` for callers that report per instance.
    """

    def __init__(self, rules: Iterable[MaskRule] = (), *, defaults: bool = True) -> None:
        self.rules: list[MaskRule] = list(rules) + (default_rules() if defaults else [])
        self.last: MaskResult | None = None

    @classmethod
    def from_files(cls, paths: Sequence[str | Path] = (), *, defaults: bool = True
                   ) -> MaskingHook:
        """Site rules files (in order, before the packaged ones)."""
        return cls([r for p in paths for r in load_rules(p)], defaults=defaults)

    def find(self, ds: Dataset) -> MaskRule | None:
        return next((r for r in self.rules if r.matches(ds)), None)

    def __call__(self, ds: Dataset, reason: str = "") -> Dataset:
        self.last = None
        self.last = self.mask(ds)
        return ds

    def mask(self, ds: Dataset) -> MaskResult:
        """Mask ``ds`` in place; HoldBack when no rule matches or the pixels cannot be read."""
        rule = self.find(ds)
        if rule is None:
            raise HoldBack(f"burned-in text risk (Modality {_first(ds, 'Modality') or '?'}) "
                           f"and no masking rule for {_first(ds, 'Manufacturer') or '?'}/"
                           f"{_first(ds, 'ManufacturerModelName') or '?'} "
                           f"{_int(ds, 'Rows')}x{_int(ds, 'Columns')}")
        if 0x7FE00008 in ds or 0x7FE00009 in ds:
            raise HoldBack("masking: float pixel data is not supported")
        boxes = rule.boxes()
        result = MaskResult(rule.name, rule.source, boxes, 0)
        if "PixelData" in ds:
            result.decompressed_from = _decompress(ds)
            result.frames = _mask_native(ds, boxes)
        result.overlays = _mask_overlays(ds, boxes)
        ds.BurnedInAnnotation = "NO"
        return result


# -- pixel data ------------------------------------------------------------------------------
def _transfer_syntax(ds: Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    tsyntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if not tsyntax:
        raise HoldBack("masking: no Transfer Syntax UID in the file meta")
    return UID(str(tsyntax))


def _decompress(ds: Dataset) -> str | None:
    """Decode encapsulated pixel data to native Explicit VR Little Endian, in place."""
    tsyntax = _transfer_syntax(ds)
    if not tsyntax.is_encapsulated:
        return None
    lossy_method = _LOSSY_METHOD.get(str(tsyntax))
    try:
        # Keep the SOP Instance UID: the engine maps UIDs with keyed pseudonyms.
        ds.decompress(as_rgb=True, generate_instance_uid=False)
    except Exception as exc:  # every decoder failure means the same: cannot clean it
        raise HoldBack(f"masking: cannot decode {tsyntax.name} pixel data: "
                       f"{type(exc).__name__}: {exc}") from exc
    for tag in _OFFSET_TABLES:
        if tag in ds:
            del ds[tag]
    if lossy_method is not None:  # history that must survive decompression (PS3.3 C.7.6.1.1.5)
        ds.LossyImageCompression = "01"
        if "LossyImageCompressionMethod" not in ds:
            ds.LossyImageCompressionMethod = lossy_method
    return str(tsyntax.name)


def _mask_native(ds: Dataset, boxes: list[tuple[int, int, int, int]]) -> int:
    """Set the boxes in every frame of native pixel data; returns the number of frames."""
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        spp = int(ds.get("SamplesPerPixel", 1))
        bits = int(ds.BitsAllocated)
        stored = int(ds.get("BitsStored", bits))
        frames = int(ds.get("NumberOfFrames") or 1)
        planar = int(ds.get("PlanarConfiguration") or 0) if spp > 1 else 0
        photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    except (AttributeError, TypeError, ValueError) as exc:
        raise HoldBack(f"masking: incomplete Image Pixel module: {exc}") from exc
    if photometric == "YBR_FULL_422" and bits in (8, 16):  # native 4:2:2: expand to YBR_FULL
        from pydicom.pixels.utils import expand_ybr422

        ds.PixelData = _even(expand_ybr422(ds.PixelData, bits))
        ds.PhotometricInterpretation = photometric = "YBR_FULL"
    elif photometric.startswith("YBR") and photometric != "YBR_FULL":
        raise HoldBack(f"masking: native {photometric} pixel data is not supported")
    buf = bytearray(ds.PixelData)
    if bits == 1:
        _mask_bits(buf, frames, rows, cols, boxes)
    elif bits in (8, 16, 32, 64):
        count = frames * rows * cols * spp
        if len(buf) * 8 < count * bits:
            raise HoldBack(f"masking: pixel data has {len(buf)} bytes, fewer than "
                           f"{frames} frame(s) of {rows}x{cols}x{spp}x{bits} bits")
        order = ">" if _transfer_syntax(ds) == ExplicitVRBigEndian else "<"
        arr = np.frombuffer(buf, np.dtype(f"{order}u{bits // 8}"), count=count)
        fill = [0] * spp
        if photometric == "YBR_FULL":
            fill = [0] + [1 << (stored - 1)] * (spp - 1)
        if planar:
            planes = arr.reshape(frames, spp, rows, cols)
            for x, y, w, h in boxes:
                for s in range(spp):
                    planes[:, s, y:y + h, x:x + w] = fill[s]
        else:
            pixels = arr.reshape(frames, rows, cols, spp)
            for x, y, w, h in boxes:
                pixels[:, y:y + h, x:x + w, :] = fill
    else:
        raise HoldBack(f"masking: BitsAllocated {bits} is not supported")
    ds.PixelData = bytes(buf)
    if spp == 1:  # keep the optional extremes true now that the image holds 0
        smallest, largest = ds.get("SmallestImagePixelValue"), ds.get("LargestImagePixelValue")
        if isinstance(smallest, int) and smallest > 0:
            ds.SmallestImagePixelValue = 0
        if isinstance(largest, int) and largest < 0:
            ds.LargestImagePixelValue = 0
    return frames


def _mask_bits(buf: bytearray, frames: int, rows: int, cols: int,
               boxes: list[tuple[int, int, int, int]], offset: tuple[int, int] = (0, 0)) -> None:
    """Clear the boxes in bit-packed frames (Bits Allocated 1, little-endian bit order).

    ``offset`` is the image position of the plane's first pixel (overlays have an origin).
    """
    count = frames * rows * cols
    if len(buf) * 8 < count:
        raise HoldBack(f"masking: {len(buf)} bytes of 1-bit data, fewer than "
                       f"{frames} frame(s) of {rows}x{cols}")
    bits = np.unpackbits(np.frombuffer(buf, np.uint8), bitorder="little")
    planes = bits[:count].reshape(frames, rows, cols)
    oy, ox = offset
    for x, y, w, h in boxes:
        x0, y0 = max(x - ox, 0), max(y - oy, 0)
        x1, y1 = min(x + w - ox, cols), min(y + h - oy, rows)
        if x0 < x1 and y0 < y1:
            planes[:, y0:y1, x0:x1] = 0
    packed = np.packbits(bits, bitorder="little")
    buf[:len(packed)] = packed.tobytes()


def _mask_overlays(ds: Dataset, boxes: list[tuple[int, int, int, int]]) -> list[str]:
    """Clear the boxes in overlay planes (60xx,3000) too: they can carry the same text."""
    done = []
    for group in range(0x6000, 0x6020, 2):
        elem = ds.get((group, 0x3000))
        if elem is None or not elem.value:
            continue
        try:
            rows = int(ds[group, 0x0010].value)
            cols = int(ds[group, 0x0011].value)
            origin = ds.get((group, 0x0050))
            oy, ox = (int(v) - 1 for v in origin.value) if origin is not None else (0, 0)
            frames = int(ds[group, 0x0015].value) if (group, 0x0015) in ds else 1
        except (KeyError, TypeError, ValueError) as exc:
            raise HoldBack(f"masking: overlay group {group:04X} unreadable: {exc}") from exc
        buf = bytearray(elem.value)
        _mask_bits(buf, frames, rows, cols, boxes, (oy, ox))
        elem.value = bytes(buf)
        done.append(f"{group:04X}")
    return done


# -- small helpers ---------------------------------------------------------------------------
def _strings(ds: Dataset, keyword: str) -> list[str]:
    value = ds.get(keyword)
    if value is None:
        return [""]
    values = value if isinstance(value, MultiValue) else [value]
    return [str(v).strip() for v in values] or [""]


def _first(ds: Dataset, keyword: str) -> str:
    return _strings(ds, keyword)[0]


def _int(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _even(data: bytes) -> bytes:
    return data + b"\x00" if len(data) % 2 else data


def masking_hook(rule_files: Sequence[str | Path], defaults: bool) -> MaskingHook | None:
    """The pixel cleaner for these rule files and the shipped defaults (None when there is
    neither: instances at risk of burned-in text are then held back)."""
    if not rule_files and not defaults:
        return None
    return MaskingHook.from_files(rule_files, defaults=defaults)
