"""Transfer syntax knowledge needed by the DICOMweb bulk data and frame endpoints.

The media types and defaults follow PS3.18 Table 8.7.3-4 (uncompressed bulk data) and
Table 8.7.3-5 (compressed bulk data). Note that the REST default of a media type is not
the DIMSE default named in some transfer syntax names: for ``image/jpeg`` it is JPEG
Lossless SV1, not JPEG Baseline.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

OCTET_STREAM = "application/octet-stream"
DICOM = "application/dicom"

IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
ENCAPSULATED_UNCOMPRESSED_LE = "1.2.840.10008.1.2.1.98"
DEFLATED_EXPLICIT_VR_LE = "1.2.840.10008.1.2.1.99"
EXPLICIT_VR_BE = "1.2.840.10008.1.2.2"


@dataclass(frozen=True, slots=True)
class TransferSyntax:
    uid: str
    name: str
    is_encapsulated: bool
    is_lossy: bool
    # Media type of one frame (or of the whole stream for video); None when PS3.18
    # defines none, in which case frames can only be served decompressed.
    media_type: str | None
    is_video: bool = False


def _ts(
    uid: str, name: str, media: str | None, *, enc: bool = True, lossy: bool = False,
    video: bool = False,
) -> TransferSyntax:
    return TransferSyntax(uid, name, enc, lossy, media, video)


_MPEG = "video/mpeg"
_MP4 = "video/mp4"

TRANSFER_SYNTAXES: dict[str, TransferSyntax] = {
    ts.uid: ts
    for ts in (
        _ts(IMPLICIT_VR_LE, "Implicit VR Little Endian", OCTET_STREAM, enc=False),
        _ts(EXPLICIT_VR_LE, "Explicit VR Little Endian", OCTET_STREAM, enc=False),
        _ts(ENCAPSULATED_UNCOMPRESSED_LE, "Encapsulated Uncompressed Explicit VR Little Endian",
            OCTET_STREAM),
        _ts(DEFLATED_EXPLICIT_VR_LE, "Deflated Explicit VR Little Endian", OCTET_STREAM,
            enc=False),
        _ts(EXPLICIT_VR_BE, "Explicit VR Big Endian", OCTET_STREAM, enc=False),
        _ts("1.2.840.10008.1.2.4.50", "JPEG Baseline (Process 1)", "image/jpeg", lossy=True),
        _ts("1.2.840.10008.1.2.4.51", "JPEG Extended (Process 2 & 4)", "image/jpeg", lossy=True),
        _ts("1.2.840.10008.1.2.4.57", "JPEG Lossless, Non-Hierarchical (Process 14)",
            "image/jpeg"),
        _ts("1.2.840.10008.1.2.4.70", "JPEG Lossless, Non-Hierarchical, First-Order Prediction",
            "image/jpeg"),
        _ts("1.2.840.10008.1.2.4.80", "JPEG-LS Lossless", "image/jls"),
        _ts("1.2.840.10008.1.2.4.81", "JPEG-LS Near-Lossless", "image/jls", lossy=True),
        _ts("1.2.840.10008.1.2.4.90", "JPEG 2000 (Lossless Only)", "image/jp2"),
        _ts("1.2.840.10008.1.2.4.91", "JPEG 2000", "image/jp2", lossy=True),
        _ts("1.2.840.10008.1.2.4.92", "JPEG 2000 Part 2 Multi-component (Lossless Only)",
            "image/jpx"),
        _ts("1.2.840.10008.1.2.4.93", "JPEG 2000 Part 2 Multi-component", "image/jpx",
            lossy=True),
        _ts("1.2.840.10008.1.2.4.100", "MPEG2 Main Profile / Main Level", _MPEG, lossy=True,
            video=True),
        _ts("1.2.840.10008.1.2.4.100.1", "Fragmentable MPEG2 Main Profile / Main Level", _MPEG,
            lossy=True, video=True),
        _ts("1.2.840.10008.1.2.4.101", "MPEG2 Main Profile / High Level", _MPEG, lossy=True,
            video=True),
        _ts("1.2.840.10008.1.2.4.101.1", "Fragmentable MPEG2 Main Profile / High Level", _MPEG,
            lossy=True, video=True),
        *(
            _ts(uid, name, _MP4, lossy=True, video=True)
            for uid, name in (
                ("1.2.840.10008.1.2.4.102", "MPEG-4 AVC/H.264 High Profile / Level 4.1"),
                ("1.2.840.10008.1.2.4.102.1", "Fragmentable MPEG-4 AVC/H.264 HP / Level 4.1"),
                ("1.2.840.10008.1.2.4.103", "MPEG-4 AVC/H.264 BD-compatible HP / Level 4.1"),
                ("1.2.840.10008.1.2.4.103.1", "Fragmentable MPEG-4 AVC/H.264 BD-compatible"),
                ("1.2.840.10008.1.2.4.104", "MPEG-4 AVC/H.264 HP / Level 4.2 For 2D Video"),
                ("1.2.840.10008.1.2.4.104.1", "Fragmentable MPEG-4 AVC/H.264 HP 4.2 2D"),
                ("1.2.840.10008.1.2.4.105", "MPEG-4 AVC/H.264 HP / Level 4.2 For 3D Video"),
                ("1.2.840.10008.1.2.4.105.1", "Fragmentable MPEG-4 AVC/H.264 HP 4.2 3D"),
                ("1.2.840.10008.1.2.4.106", "MPEG-4 AVC/H.264 Stereo High Profile / Level 4.2"),
                ("1.2.840.10008.1.2.4.106.1", "Fragmentable MPEG-4 AVC/H.264 Stereo HP 4.2"),
                ("1.2.840.10008.1.2.4.107", "HEVC/H.265 Main Profile / Level 5.1"),
                ("1.2.840.10008.1.2.4.108", "HEVC/H.265 Main 10 Profile / Level 5.1"),
            )
        ),
        _ts("1.2.840.10008.1.2.4.110", "JPEG XL Lossless", "image/jxl"),
        _ts("1.2.840.10008.1.2.4.111", "JPEG XL JPEG Recompression", "image/jxl", lossy=True),
        _ts("1.2.840.10008.1.2.4.112", "JPEG XL", "image/jxl", lossy=True),
        _ts("1.2.840.10008.1.2.4.201", "High-Throughput JPEG 2000 (Lossless Only)",
            "image/jphc"),
        _ts("1.2.840.10008.1.2.4.202", "High-Throughput JPEG 2000 with RPCL Options "
            "(Lossless Only)", "image/jphc"),
        _ts("1.2.840.10008.1.2.4.203", "High-Throughput JPEG 2000", "image/jphc", lossy=True),
        _ts("1.2.840.10008.1.2.5", "RLE Lossless", "image/dicom-rle"),
        # PS3.18 names no frame media type for deflated frames; serve them decompressed.
        _ts("1.2.840.10008.1.2.8.1", "Deflated Image Frame Compression", None),
    )
}

# The "D" rows of PS3.18 Tables 8.7.3-4 and 8.7.3-5: used when the Accept header names a
# media type without a transfer-syntax parameter.
DEFAULT_TS_FOR_MEDIA_TYPE: dict[str, str] = {
    OCTET_STREAM: EXPLICIT_VR_LE,
    DICOM: EXPLICIT_VR_LE,
    "image/jpeg": "1.2.840.10008.1.2.4.70",
    "image/jls": "1.2.840.10008.1.2.4.80",
    "image/jp2": "1.2.840.10008.1.2.4.90",
    "image/jpx": "1.2.840.10008.1.2.4.92",
    "image/jphc": "1.2.840.10008.1.2.4.201",
    "image/jxl": "1.2.840.10008.1.2.4.110",
    "image/dicom-rle": "1.2.840.10008.1.2.5",
    _MPEG: "1.2.840.10008.1.2.4.100",
    _MP4: "1.2.840.10008.1.2.4.102",
}

# PS3.18 8.7.3: these two "shall not be used with Web Services".
_NOT_FOR_WEB = frozenset({IMPLICIT_VR_LE, EXPLICIT_VR_BE})


def lookup(ts_uid: str) -> TransferSyntax | None:
    return TRANSFER_SYNTAXES.get(ts_uid.strip())


def name(ts_uid: str) -> str:
    ts = lookup(ts_uid)
    return ts.name if ts else ts_uid


def is_encapsulated(ts_uid: str) -> bool:
    """Unknown UIDs are treated as encapsulated: PS3.5 A.4 makes that the rule for new ones."""
    ts = lookup(ts_uid)
    return True if ts is None else ts.is_encapsulated


def is_lossy(ts_uid: str) -> bool:
    """True when the syntax may carry irreversibly compressed data (conservative)."""
    ts = lookup(ts_uid)
    return False if ts is None else ts.is_lossy


def is_native(ts_uid: str) -> bool:
    ts = lookup(ts_uid)
    return ts is not None and not ts.is_encapsulated


def frame_media_type(ts_uid: str) -> str:
    """Media type of a frame stored in `ts_uid`, as served for ``Accept: */*``.

    Raises ValueError for syntaxes without a PS3.18 frame media type (unknown or
    private ones, deflated frames); such frames can only be served decompressed.
    """
    ts = lookup(ts_uid)
    if ts is None or ts.media_type is None:
        raise ValueError(f"no frame media type is defined for transfer syntax {ts_uid}")
    return ts.media_type


def ts_for_media_type(media_type: str, ts_param: str | None) -> str | None:
    """Transfer syntax selected by one Accept entry, or None if the pair is not valid.

    `ts_param` is the ``transfer-syntax`` parameter: absent means the PS3.18 default for
    the media type, ``*`` means any syntax (reported as the default here; the caller may
    prefer what is stored). ``application/dicom`` takes any registered non-video syntax
    except the two PS3.18 8.7.3 forbids on the web.
    """
    mt = media_type.strip().lower()
    default = DEFAULT_TS_FOR_MEDIA_TYPE.get(mt)
    if ts_param is None or ts_param.strip() in ("", "*"):
        return default
    uid = ts_param.strip().strip('"')
    ts = lookup(uid)
    if ts is None or uid in _NOT_FOR_WEB:
        return None
    if mt == DICOM:
        return None if ts.is_video else uid
    if mt == OCTET_STREAM:
        return uid if uid == EXPLICIT_VR_LE else None
    return uid if ts.media_type == mt else None


def media_type_matches(wanted: str, actual: str) -> bool:
    """Accept-style match of one media range against a concrete media type."""
    w = wanted.strip().lower()
    a = actual.lower()
    if w in ("*/*", a):
        return True
    return w.endswith("/*") and a.startswith(w[:-1])


@cache
def can_decompress(ts_uid: str) -> bool:
    """Whether pydicom with the installed plugins can decode pixel data in `ts_uid`.

    Native syntaxes count as decodable: their pixels need no codec.
    """
    from pydicom.pixels import get_decoder

    if is_native(ts_uid):
        return True
    try:
        return bool(get_decoder(ts_uid).is_available)
    except (NotImplementedError, ValueError):
        return False
