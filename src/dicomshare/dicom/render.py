"""Rendered images and thumbnails for WADO-RS (PS3.18 8.3.5.1 and 8.3.5.2).

The grayscale pipeline is the one of PS3.4 N.2: Modality LUT (or rescale), then a VOI
transform, then MONOCHROME1 inversion; colour images are brought to 8-bit RGB. The
pydicom processing functions do the arithmetic; this module picks the inputs (request
parameters, per-frame functional groups, the file's own VOI) and maps the result to 8
bits. Only the requested frame is ever decoded.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, apply_windowing

from . import transfer
from .pixels import NotAcceptable, PathLike, PixelError, PixelSource, open_source

DEFAULT_QUALITY = 90
_FORMATS = {"image/jpeg": "JPEG", "image/png": "PNG", "image/gif": "GIF"}
_FUNCTIONS = {"linear": "LINEAR", "linear-exact": "LINEAR_EXACT", "sigmoid": "SIGMOID"}
# Attributes the grayscale pipeline reads; copied so per-frame values can override them.
_PIPELINE_KEYWORDS = (
    "PhotometricInterpretation", "BitsAllocated", "BitsStored", "PixelRepresentation",
    "RescaleSlope", "RescaleIntercept", "RescaleType", "ModalityLUTSequence",
    "WindowCenter", "WindowWidth", "VOILUTFunction", "VOILUTSequence",
)
_FRAME_GROUPS = ("PixelValueTransformationSequence", "FrameVOILUTSequence")

RENDERED_MEDIA_TYPES = tuple(_FORMATS)
# Upscaling is allowed, within reason: a huge viewport would be a memory bomb.
MAX_VIEWPORT_SIDE = 16384


def render(
    path: PathLike,
    frame: int | None = None,
    *,
    media_type: str = "image/jpeg",
    window: tuple[float, float, str] | None = None,
    viewport: tuple[int, int] | None = None,
    quality: int | None = None,
) -> bytes:
    """One frame (1-based, default the first) rendered as a consumer image.

    `window` is the PS3.18 ``window`` parameter (center, width, function); without it
    the instance's own VOI is used. `viewport` (width, height) scales the image to fit
    inside that box, keeping its aspect ratio.
    """
    fmt = _FORMATS.get(media_type.strip().lower())
    if fmt is None:
        raise NotAcceptable(f"cannot render to {media_type}; supported: "
                            f"{', '.join(_FORMATS)}")
    if quality is not None and not 1 <= quality <= 100:
        raise PixelError("quality must be between 1 and 100")
    src = open_source(path)
    index = src.frame_index(1 if frame is None else frame)
    info = transfer.lookup(src.ts)
    if (info is not None and info.is_video) or not transfer.can_decompress(src.ts):
        raise NotAcceptable(f"pixel data in {transfer.name(src.ts)} cannot be rendered "
                            "by this server")
    image = Image.fromarray(_display_pixels(src, index, window))
    if viewport is not None:
        image = _fit(image, viewport)
    return _encode(image, fmt, DEFAULT_QUALITY if quality is None else quality)


def thumbnail(path: PathLike, *, media_type: str = "image/jpeg", size: int = 128) -> bytes:
    """The middle frame, scaled to fit a `size` x `size` box: representative for cine."""
    if not 0 < size <= MAX_VIEWPORT_SIDE:
        raise PixelError(f"thumbnail size must be between 1 and {MAX_VIEWPORT_SIDE}")
    middle = open_source(path).number_of_frames // 2 + 1
    return render(path, middle, media_type=media_type, viewport=(size, size))


def _display_pixels(
    src: PixelSource, index: int, window: tuple[float, float, str] | None
) -> np.ndarray:
    arr = src.decode(index)
    if arr.ndim == 3:  # pydicom hands colour back as RGB, YBR already converted
        return _colour_to_uint8(arr, _bits_stored(src.meta, arr))
    if src.photometric == "PALETTE COLOR":
        try:
            rgb = apply_color_lut(arr, src.meta)
        except Exception as exc:
            raise PixelError(f"cannot apply the palette colour lookup table: {exc}") from exc
        return _colour_to_uint8(rgb, 8 * rgb.dtype.itemsize)
    if src.photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise NotAcceptable(f"cannot render photometric interpretation {src.photometric!r}")
    ds = _frame_attributes(src.meta, index)
    try:
        values = apply_modality_lut(arr, ds) if arr.dtype.kind in "iu" else arr
        out = _voi(values, ds, window)
    except (ValueError, NotImplementedError, IndexError, KeyError, TypeError) as exc:
        raise PixelError(f"cannot apply the VOI transformation: {exc}") from exc
    grey = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return 255 - grey if src.photometric == "MONOCHROME1" else grey


def _bits_stored(meta: Dataset, arr: np.ndarray) -> int:
    bits = meta.get("BitsStored")
    try:
        return int(bits) if bits else 8 * arr.dtype.itemsize
    except (TypeError, ValueError):
        return 8 * arr.dtype.itemsize


def _colour_to_uint8(arr: np.ndarray, bits: int) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype.kind == "f":
        lo, hi = float(arr.min()), float(arr.max())
        return _stretch(arr, lo, hi)
    shift = max(bits - 8, 0)
    return np.clip(arr.astype(np.int64) >> shift, 0, 255).astype(np.uint8)


def _frame_attributes(meta: Dataset, index: int) -> Dataset:
    """Image-level attributes overlaid with the frame's functional groups (enhanced IODs)."""
    ds = Dataset()
    ds.file_meta = meta.file_meta  # pydicom reads OW LUT Data with its endianness
    for keyword in _PIPELINE_KEYWORDS:
        if keyword in meta:
            ds[keyword] = meta[keyword]
    groups: list[Any] = []
    if shared := meta.get("SharedFunctionalGroupsSequence"):
        groups.append(shared[0])
    per_frame = meta.get("PerFrameFunctionalGroupsSequence")
    if per_frame and index < len(per_frame):
        groups.append(per_frame[index])
    for group in groups:
        for name in _FRAME_GROUPS:
            if items := group.get(name):
                for elem in items[0]:
                    ds[elem.tag] = elem
    return ds


def _first(value: Any) -> float:
    """WindowCenter/WindowWidth may hold several alternative views; PS3.18 uses the first."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        value = value[0]
    return float(value)


def _voi(values: np.ndarray, ds: Dataset, window: tuple[float, float, str] | None) -> Any:
    """The VOI output scaled to 0..255 (PS3.18 8.3.5.1.3 order of preference)."""
    if window is not None:
        center, width, function = window
        name = _FUNCTIONS.get(function.strip().lower().replace("_", "-"))
        if name is None:
            raise PixelError(f"unknown window function {function!r}")
        return _windowed(values, float(center), float(width), name)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        try:
            center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        except (TypeError, ValueError, IndexError):
            center = width = float("nan")
        if np.isfinite(center) and np.isfinite(width) and width > 0:
            function = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
            if function not in _FUNCTIONS.values():
                function = "LINEAR"
            return _windowed(values, center, max(width, 1.0) if function == "LINEAR"
                             else width, function)
    if ds.get("VOILUTSequence"):
        return _voi_lut(values, ds)
    finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values
    if finite.size == 0:
        return np.zeros(values.shape)
    return _stretch(values, float(finite.min()), float(finite.max()))


def _windowed(values: np.ndarray, center: float, width: float, function: str) -> Any:
    """pydicom's windowing, asked for an unsigned 8-bit output range (0..255)."""
    if function == "LINEAR" and width < 1:
        raise PixelError("window width must be at least 1 for the linear function")
    if width <= 0:
        raise PixelError("window width must be positive")
    ds = Dataset()
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsStored = 8
    ds.PixelRepresentation = 0
    ds.add_new(0x00281050, "FD", center)  # FD keeps full precision (DS is 16 chars)
    ds.add_new(0x00281051, "FD", width)
    ds.VOILUTFunction = function
    return apply_windowing(values, ds)


def _voi_lut(values: np.ndarray, ds: Dataset) -> Any:
    item = ds.VOILUTSequence[0]
    entries, first = int(item.LUTDescriptor[0]) or 65536, int(item.LUTDescriptor[1])
    indexes = np.rint(values).astype(np.int64)
    lut_max = int(apply_voi(np.arange(first, first + entries, dtype=np.int64), ds).max())
    # The output bit depth is often declared 16 while the data is 12 bits: scale to
    # what the table actually reaches.
    scale = (1 << max(lut_max.bit_length(), 1)) - 1
    return apply_voi(indexes, ds).astype(np.float64) * (255.0 / scale)


def _stretch(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values.astype(np.float64) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(np.nan_to_num(scaled)), 0, 255).astype(np.uint8)


def _fit(image: Image.Image, viewport: tuple[int, int]) -> Image.Image:
    vw, vh = viewport
    if not (0 < vw <= MAX_VIEWPORT_SIDE and 0 < vh <= MAX_VIEWPORT_SIDE):
        raise PixelError(f"viewport width and height must be between 1 and "
                         f"{MAX_VIEWPORT_SIDE}")
    scale = min(vw / image.width, vh / image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    if size == image.size:
        return image
    method = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
    return image.resize(size, method)


def _encode(image: Image.Image, fmt: str, quality: int) -> bytes:
    out = io.BytesIO()
    if fmt == "JPEG":
        image.save(out, "JPEG", quality=quality)
    elif fmt == "GIF" and image.mode == "RGB":
        image.quantize(256).save(out, "GIF")
    else:
        image.save(out, fmt)
    return out.getvalue()
