"""Burned-in text: which instances need their pixels cleaned, and the hook that does it.

The engine de-identifies headers only. Cleaning pixels (masking rectangles per
manufacturer, model and image size) plugs in as a :data:`PixelHook`; an instance that
needs it and finds no hook, or whose hook raises :class:`HoldBack`, is held back (not
written, listed in the report with the reason), never passed through.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from dicomshare.deid.profile import read_table


class HoldBack(Exception):
    """Raised by a pixel hook that cannot clean an instance; the reason goes in the report."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# Called with the header-de-identified dataset and the reason it needs cleaning; returns
# the dataset with clean pixels (it may be the same object) or raises HoldBack. With
# Clean Graphics it is also responsible for overlay data, which is otherwise removed.
# It must be a module-level function to be used with several processes (--jobs).
PixelHook = Callable[[Dataset, str], Dataset]

PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # Pixel Data, Float, Double Float

# Modalities whose images are screens or photographs: a NO in BurnedInAnnotation is not
# trusted for them (scanner-written ultrasound headers commonly say NO and show the name).
ALWAYS_RISKY = {
    "US": "ultrasound", "SC": "secondary capture", "OT": "other (often screen captures)",
    "XC": "external-camera photography", "ES": "endoscopy", "GM": "general microscopy",
    "DOC": "document", "VIDEO": "video",
}
# Projection radiography: burned-in text is common on older devices; trusted only when the
# header says BurnedInAnnotation NO.
PROJECTION = frozenset({"XA", "RF", "DX", "CR", "MG", "PX", "IO"})
# Storage SOP classes (PS3.4 Table B.5-1) whose IOD name marks them as captures or photos.
_RISKY_IOD_WORDS = ("Secondary Capture", "Ultrasound", "Photograph", "Video", "Endoscopic",
                    "Dermoscopic")
_WHOLE_SLIDE = "1.2.840.10008.5.1.4.1.1.77.1.6"


@cache
def risky_sop_classes() -> dict[str, str]:
    """SOP Class UID to name, for the storage classes that commonly carry burned-in text."""
    rows = read_table("ps3.4-table-b-5-1.json")["rows"]
    return {r["uid"]: r["name"] for r in rows
            if any(word in r["iod"] for word in _RISKY_IOD_WORDS)}


def has_pixels(ds: Dataset) -> bool:
    return any(tag in ds for tag in PIXEL_TAGS)


def burned_in_risk(ds: Dataset) -> str | None:
    """Why this instance's pixels may show identifying text or features; None if no reason.

    In order: no pixels (never at risk); BurnedInAnnotation or RecognizableVisualFeatures
    YES; a SOP class of captures, ultrasound, photographs or video; a modality in
    ``ALWAYS_RISKY``; a whole-slide label or overview image; a projection modality
    (``PROJECTION``) that does not state BurnedInAnnotation NO.
    """
    def get(keyword: str) -> list[str]:
        value = ds.get(keyword)
        if value is None:
            return []
        return [str(v) for v in value] if isinstance(value, MultiValue) else [str(value)]
    return risk(get, has_pixels(ds))


def risk(get: Callable[[str], list[str]], pixels: bool) -> str | None:
    """:func:`burned_in_risk` over any source of values (``get(keyword)``)."""
    if not pixels:
        return None

    def upper(keyword: str) -> list[str]:
        return [v.strip().upper() for v in get(keyword)]

    burned = (upper("BurnedInAnnotation") or [""])[0]
    if burned == "YES":
        return "BurnedInAnnotation is YES"
    if (upper("RecognizableVisualFeatures") or [""])[0] == "YES":
        return "RecognizableVisualFeatures is YES"
    sop_class = (get("SOPClassUID") or [""])[0].strip()
    name = risky_sop_classes().get(sop_class)
    if name:
        return f"{name}: commonly carries burned-in text"
    modality = (upper("Modality") or [""])[0]
    if modality in ALWAYS_RISKY:
        return f"modality {modality} ({ALWAYS_RISKY[modality]}): commonly carries burned-in text"
    if sop_class == _WHOLE_SLIDE and {"LABEL", "OVERVIEW"} & set(upper("ImageType")):
        return "slide label or overview image"
    if modality in PROJECTION and burned != "NO":
        return f"modality {modality} without BurnedInAnnotation NO"
    return None
