"""Frame retrieval and transcoding for the WADO-RS frames and instance endpoints.

Frames are read straight from the stored Part 10 file: the data set is parsed only up
to the Pixel Data element, and then only the bytes of the requested frames are read
(native data is sliced at computed offsets, encapsulated data is walked fragment by
fragment by pydicom). Decoding goes through ``pydicom.pixels.pixel_array(file,
index=...)`` / ``iter_pixels(file, indices=...)`` so that one frame is decoded at a
time. The one exception is the Deflated Explicit VR Little Endian syntax, where the data
set is one deflate stream and has to be inflated as a whole.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, BinaryIO

import numpy as np
from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.errors import InvalidDicomError
from pydicom.pixels import iter_pixels, pack_bits, pixel_array
from pydicom.uid import UID

from . import transfer
from .transfer import (
    DEFLATED_EXPLICIT_VR_LE,
    EXPLICIT_VR_BE,
    EXPLICIT_VR_LE,
    IMPLICIT_VR_LE,
    OCTET_STREAM,
)

PathLike = str | os.PathLike[str]

_PIXEL_TAGS = {0x7FE00010: "PixelData", 0x7FE00008: "FloatPixelData",
               0x7FE00009: "DoubleFloatPixelData"}
_LONG_VRS = {"OB", "OW", "OF", "OD", "OL", "OV", "UN", "SQ", "UC", "UR", "UT"}
_UNDEFINED = 0xFFFFFFFF
# Byte width of one value of the VRs whose raw bytes pydicom keeps as read.
_SWAP_UNIT = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}


class PixelError(Exception):
    """The pixel data cannot be served as asked; `reason` is safe to show to the client."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NotAcceptable(PixelError):
    """No representation the client accepts can be produced (HTTP 406)."""


def _int(ds: Dataset, keyword: str, default: int) -> int:
    """Tolerates the malformed values real archives receive (empty, '1A', ...)."""
    value = ds.get(keyword)
    if value in (None, ""):
        return default
    try:
        return int(float(str(value)))
    except (TypeError, ValueError):
        return default


class PixelSource:
    """Where the Pixel Data of one stored file lives, plus the attributes describing it.

    Construct with :func:`open_source`; nothing but the attributes preceding the Pixel
    Data is held in memory (except for deflated files).
    """

    def __init__(
        self, path: Path, meta: Dataset, ts: str, vr: str | None,
        offset: int, length: int, inline: bytes | None,
    ) -> None:
        self.path = path
        self.meta = meta
        self.ts = ts
        self.vr = vr
        self.offset = offset
        self.length = length
        self._inline = inline
        self.rows = _int(meta, "Rows", 0)
        self.columns = _int(meta, "Columns", 0)
        self.samples = _int(meta, "SamplesPerPixel", 1)
        self.bits_allocated = _int(meta, "BitsAllocated", 0)
        self.photometric = str(meta.get("PhotometricInterpretation", "")).strip().upper()
        self.number_of_frames = max(_int(meta, "NumberOfFrames", 1), 1)
        if self.rows <= 0 or self.columns <= 0 or self.bits_allocated <= 0:
            raise PixelError("the image pixel attributes (Rows, Columns, BitsAllocated) "
                             "are missing or invalid")

    @property
    def encapsulated(self) -> bool:
        return self.length == _UNDEFINED

    @property
    def little_endian(self) -> bool:
        return self.ts != EXPLICIT_VR_BE

    def open(self) -> IO[bytes]:
        return io.BytesIO(self._inline) if self._inline is not None else self.path.open("rb")

    def frame_index(self, frame_number: int) -> int:
        """1-based frame number to 0-based index, refusing anything out of range."""
        if isinstance(frame_number, bool) or not isinstance(frame_number, int):
            raise PixelError(f"invalid frame number {frame_number!r}")
        if not 1 <= frame_number <= self.number_of_frames:
            raise PixelError(f"frame {frame_number} is out of range: the instance has "
                             f"{self.number_of_frames} frame(s)")
        return frame_number - 1

    def _pydicom_source(self, f: IO[bytes] | None = None) -> Any:
        """A file lets pydicom read just the frame; a deflated file is decoded in memory."""
        if self._inline is not None:
            return self.meta
        return self.path if f is None else f

    def _decode_error(self, index: int, exc: Exception) -> PixelError:
        return PixelError(f"cannot decode frame {index + 1} ({transfer.name(self.ts)}): {exc}")

    def decode(self, index: int, *, raw: bool = False, f: IO[bytes] | None = None) -> np.ndarray:
        """One decoded frame as pydicom returns it (YBR converted to RGB unless `raw`)."""
        try:
            return pixel_array(self._pydicom_source(f), index=index, raw=raw)
        except MemoryError:
            raise
        except Exception as exc:  # codec failures come as many exception types
            raise self._decode_error(index, exc) from exc

    def iter_decoded(self, f: IO[bytes], indexes: list[int]) -> Iterator[bytes]:
        """Decompressed frames as native little endian bytes, pixel interleaved.

        One pydicom iterator serves all frames, so the header is parsed once. Colour is
        converted like ``Dataset.decompress()`` does, so the bytes match the instance
        transcoded to Explicit VR Little Endian.
        """
        arrays = iter_pixels(self._pydicom_source(f), indices=indexes)
        with f:
            for index in indexes:
                try:
                    arr = next(arrays)
                except MemoryError:
                    raise
                except Exception as exc:
                    raise self._decode_error(index, exc) from exc
                if self.bits_allocated == 1:
                    yield pack_bits(arr, pad=False)
                else:
                    yield np.ascontiguousarray(arr, arr.dtype.newbyteorder("<")).tobytes()

    # -- raw (stored) frames ------------------------------------------------------------

    def _native_frame_length(self) -> int:
        samples = 2 if self.photometric == "YBR_FULL_422" else self.samples
        return self.rows * self.columns * samples * self.bits_allocated // 8

    def _read(self, f: IO[bytes], start: int, size: int) -> bytes:
        if self.length != _UNDEFINED and start + size > self.length:
            raise PixelError("the pixel data is shorter than its attributes imply")
        f.seek(self.offset + start)
        data = f.read(size)
        if len(data) != size:
            raise PixelError("the pixel data is truncated")
        return data

    def native_frame(self, f: IO[bytes], index: int) -> bytes:
        """Stored frame in little endian byte order, keeping its planar configuration."""
        pixels = self.rows * self.columns * self.samples
        if self.bits_allocated == 1:
            if self.little_endian and pixels % 8 == 0:
                return self._read(f, index * pixels // 8, pixels // 8)
            # Frames start mid-byte (or big endian words): let pydicom unpack them.
            return pack_bits(self.decode(index, raw=True, f=f), pad=False)
        if self.bits_allocated % 8:
            raise PixelError(f"unsupported BitsAllocated {self.bits_allocated}")
        size = self._native_frame_length()
        start = index * size
        if self.little_endian or self.vr == "OB":
            return self._read(f, start, size)
        unit = 2 if self.bits_allocated == 8 else self.bits_allocated // 8
        # Swap whole words: an 8-bit frame in OW may begin or end inside a word.
        begin = start - start % unit
        end = start + size + (-(start + size)) % unit
        data = _swap(self._read(f, begin, end - begin), unit)
        return data[start - begin:start - begin + size]

    def encapsulated_frame(self, f: IO[bytes], index: int) -> bytes:
        table = self.meta.get("ExtendedOffsetTable")
        lengths = self.meta.get("ExtendedOffsetTableLengths")
        extended = (bytes(table), bytes(lengths)) if table and lengths else None
        f.seek(self.offset)
        try:
            return get_frame(f, index, extended_offsets=extended,
                             number_of_frames=self.number_of_frames)
        except Exception as exc:
            raise PixelError(f"cannot locate frame {index + 1} in the encapsulated "
                             f"pixel data: {exc}") from exc


def _swap(data: bytes, unit: int) -> bytes:
    if unit <= 1 or not data:
        return data
    return np.frombuffer(data, dtype=f">u{unit}").astype(f"<u{unit}").tobytes()


def _transfer_syntax(ds: Dataset) -> str:
    ts = str(ds.file_meta.get("TransferSyntaxUID", "") or "").strip()
    if ts:
        return ts
    implicit, little = ds.original_encoding
    if implicit:
        return IMPLICIT_VR_LE
    return EXPLICIT_VR_LE if little else EXPLICIT_VR_BE


def _read_dataset(path: Path, **kwargs: Any) -> Dataset:
    try:
        return dcmread(path, **kwargs)
    except FileNotFoundError as exc:
        raise PixelError("the stored object is missing") from exc
    except (InvalidDicomError, OSError, EOFError, ValueError, struct.error) as exc:
        raise PixelError(f"the stored object cannot be parsed: {exc}") from exc


def open_source(path: PathLike) -> PixelSource:
    """Locate the top-level Pixel Data of a stored file, reading nothing past its header."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            meta = dcmread(f, stop_before_pixels=True)
            ts = _transfer_syntax(meta)
            if ts != DEFLATED_EXPLICIT_VR_LE:
                position = f.tell()
                header = f.read(12)
                return _from_header(p, meta, ts, position, header)
    except FileNotFoundError as exc:
        raise PixelError("the stored object is missing") from exc
    except (InvalidDicomError, OSError, EOFError, ValueError, struct.error) as exc:
        raise PixelError(f"the stored object cannot be parsed: {exc}") from exc
    # Deflated: the whole data set is one deflate stream, so it is inflated in memory.
    ds = _read_dataset(p)
    for keyword in _PIXEL_TAGS.values():
        if keyword in ds:
            elem = ds[keyword]
            value = bytes(elem.value or b"")
            return PixelSource(p, ds, ts, elem.VR, 0, len(value), value)
    raise PixelError("the instance has no pixel data")


def _from_header(p: Path, meta: Dataset, ts: str, position: int, header: bytes) -> PixelSource:
    if len(header) < 8:
        raise PixelError("the instance has no pixel data")
    order = "<" if ts != EXPLICIT_VR_BE else ">"
    group, element = struct.unpack(f"{order}HH", header[:4])
    if (group << 16 | element) not in _PIXEL_TAGS:
        raise PixelError("the instance has no pixel data")
    vr: str | None
    if ts == IMPLICIT_VR_LE:
        vr, (length,), offset = None, struct.unpack("<L", header[4:8]), position + 8
    else:
        vr = header[4:6].decode("ascii", "replace")
        if vr in _LONG_VRS:
            (length,), offset = struct.unpack(f"{order}L", header[8:12]), position + 12
        else:
            (length,), offset = struct.unpack(f"{order}H", header[6:8]), position + 8
    source = PixelSource(p, meta, ts, vr, offset, length, None)
    if source.encapsulated == transfer.is_native(ts) and transfer.lookup(ts) is not None:
        raise PixelError("the pixel data encoding does not match the transfer syntax")
    return source


def number_of_frames(path: PathLike) -> int:
    """Frames in the instance; raises PixelError when it has no pixel data."""
    return open_source(path).number_of_frames


def frames(
    path: PathLike,
    frame_numbers: Sequence[int],
    want: str,
    *,
    transfer_syntax: str | None = None,
) -> tuple[str, str | None, Iterator[bytes]]:
    """Frames for WADO-RS ``.../frames/{list}``: (media type, part TS UID, frame bytes).

    `want` is the negotiated frame media type: ``*/*`` for what is stored,
    ``application/octet-stream`` for native little endian pixels, or a compressed type
    that is only served when the stored syntax already has it (no re-compression).
    `transfer_syntax` narrows a compressed type to one syntax; None or ``*`` accept any
    syntax of that media type. All checks happen before this returns, so the caller can
    still answer with an error status; the iterator only reads and decodes, from a file
    opened here (so a blob deleted meanwhile can still be streamed on POSIX).
    """
    src = open_source(path)
    if not frame_numbers:
        raise PixelError("no frame numbers were given")
    indexes = [src.frame_index(n) for n in frame_numbers]
    info = transfer.lookup(src.ts)
    if info is not None and info.is_video:
        raise NotAcceptable("video is only available as a whole (bulk data or rendered), "
                            "not as frames")
    ts_ok = {None, "", "*"}
    stored_type = info.media_type if info is not None else None

    if src.encapsulated and stored_type is not None and stored_type != OCTET_STREAM:
        if transfer.media_type_matches(want, stored_type) and transfer_syntax in ts_ok | {src.ts}:
            return stored_type, src.ts, _iter(src.open(), indexes, src.encapsulated_frame)

    if not transfer.media_type_matches(want, OCTET_STREAM) or (
        transfer_syntax not in ts_ok | {EXPLICIT_VR_LE}
    ):
        stored = transfer.name(src.ts)
        raise NotAcceptable(f"frames are stored as {stored}; they can be served as that "
                            f"or as {OCTET_STREAM}, not as {want}")
    if not src.encapsulated:
        return OCTET_STREAM, None, _iter(src.open(), indexes, src.native_frame)
    if stored_type == OCTET_STREAM:  # encapsulated uncompressed: fragments are native
        return OCTET_STREAM, None, _iter(src.open(), indexes, src.encapsulated_frame)
    if not transfer.can_decompress(src.ts):
        raise NotAcceptable(f"pixel data in {transfer.name(src.ts)} cannot be decompressed "
                            "by this server")
    return OCTET_STREAM, None, src.iter_decoded(src.open(), indexes)


def _iter(
    f: IO[bytes], indexes: list[int], read: Callable[[IO[bytes], int], bytes]
) -> Iterator[bytes]:
    with f:
        for index in indexes:
            yield read(f, index)


# -- whole-instance transcoding ----------------------------------------------------------

TRANSCODE_TARGETS = frozenset({EXPLICIT_VR_LE, IMPLICIT_VR_LE})


def transcode(path: PathLike, ts_uid: str) -> bytes:
    """The stored instance as a Part 10 file in `ts_uid` (see :func:`transcode_to`)."""
    out = io.BytesIO()
    transcode_to(path, ts_uid, out)
    return out.getvalue()


def transcode_to(path: PathLike, ts_uid: str, out: BinaryIO) -> None:
    """Write the stored instance to `out` as a Part 10 file in `ts_uid`.

    Same syntax: the stored bytes, untouched. Otherwise only decompression to native
    little endian is offered; re-compression is refused with NotAcceptable. The SOP
    Instance UID is kept: a change of transfer syntax is not a new instance.
    """
    p = Path(path)
    target = ts_uid.strip()
    meta = _read_dataset(p, stop_before_pixels=True)
    source_ts = _transfer_syntax(meta)
    if source_ts == target and meta.file_meta.get("TransferSyntaxUID"):
        with p.open("rb") as f:
            shutil.copyfileobj(f, out)
        return
    if target not in TRANSCODE_TARGETS:
        raise NotAcceptable(f"cannot convert {transfer.name(source_ts)} to "
                            f"{transfer.name(target)}")
    ds = _read_dataset(p)
    pixels = next((k for k in _PIXEL_TAGS.values() if k in ds), None)
    if pixels is None and _has_pixel_header(p):
        # pydicom drops a truncated last element with only a warning.
        raise PixelError("the stored pixel data is truncated")
    if pixels is not None and transfer.is_encapsulated(source_ts):
        _decompress(ds, source_ts)
    elif source_ts == EXPLICIT_VR_BE:
        _to_little_endian(ds)
    ds.file_meta.TransferSyntaxUID = UID(target)
    try:
        dcmwrite(out, ds, enforce_file_format=True)
    except (ValueError, TypeError, OverflowError, struct.error) as exc:
        raise PixelError(f"cannot encode the instance in {transfer.name(target)}: "
                         f"{exc}") from exc


def _has_pixel_header(path: Path) -> bool:
    try:
        open_source(path)
    except PixelError:
        return False
    return True


def _decompress(ds: Dataset, source_ts: str) -> None:
    if not transfer.can_decompress(source_ts):
        raise NotAcceptable(f"pixel data in {transfer.name(source_ts)} cannot be "
                            "decompressed by this server")
    frame_bytes = (_int(ds, "Rows", 0) * _int(ds, "Columns", 0)
                   * _int(ds, "SamplesPerPixel", 1) * _int(ds, "BitsAllocated", 0) / 8)
    if frame_bytes * max(_int(ds, "NumberOfFrames", 1), 1) > 0xFFFFFFFE:
        raise NotAcceptable("the decompressed pixel data would exceed the 4 GiB limit of "
                            "a native Pixel Data element")
    try:
        ds.decompress(generate_instance_uid=False)
    except Exception as exc:
        raise PixelError(f"cannot decompress {transfer.name(source_ts)}: {exc}") from exc
    # Offsets into fragments mean nothing once the data is native.
    for keyword in ("ExtendedOffsetTable", "ExtendedOffsetTableLengths"):
        if keyword in ds:
            del ds[keyword]


def _to_little_endian(ds: Dataset) -> None:
    """Byte-swap values pydicom keeps as raw bytes, which it would write unchanged.

    Numeric VRs (US, SS, FL, ...) are decoded on read and re-encoded correctly; OW/OF/OD
    /OL/OV values are not. Pixel Data words are as wide as BitsAllocated.
    """
    bits = _int(ds, "BitsAllocated", 16)
    for elem in ds.iterall():
        if not isinstance(elem.value, bytes | bytearray) or elem.VR not in _SWAP_UNIT:
            continue
        unit = _SWAP_UNIT[elem.VR]
        if elem.tag == 0x7FE00010 and elem.VR == "OW" and bits > 16:
            unit = bits // 8
        value = bytes(elem.value)
        elem.value = _swap(value[: len(value) - len(value) % unit], unit) + value[
            len(value) - len(value) % unit:
        ]
