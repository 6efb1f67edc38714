"""Bytes -> a float grey frame in [0, 1] (before the percentile stretch).

TIFF through tifffile (first page unless asked), everything else through Pillow. Integer samples are scaled by
their dtype's maximum, floats kept as they are (non-finite samples become the frame's finite minimum); colour
becomes luminance (ITU-R 601). Frame size is checked from the header before any pixel is decoded, so a huge or
tiny frame costs nothing. Every failure is an :class:`ImageError` whose message is one line of at most
:data:`~semclip_batch.errors.MAX_MESSAGE` characters, free of object reprs.
"""

from __future__ import annotations

import io
import math
import warnings
from collections import OrderedDict
from typing import BinaryIO

import numpy as np
import tifffile
from PIL import Image

from semclip_batch.errors import DECODE_ERROR, ImageError, shorten

MIN_SIDE = 16
MAX_PIXELS = 64 * 1024 * 1024
FLOAT_HEADROOM = 2.0 ** 120  # float samples past it are rescaled: float32 (to ~2**128) then holds the frame,
#                              its luminance and the stretch's span
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def decode_image(data: bytes, page: int = 0) -> np.ndarray:
    """Decode one image. Returns ``(H, W)`` float32 in [0, 1] (floats unscaled). Raises :class:`ImageError`.

    Args:
        data: the file's bytes.
        page: 0-based TIFF page; any other format has only page 0.
    """
    if not data:
        raise decode_error("empty file (0 bytes)")
    if data[:4] in _TIFF_MAGIC:
        raw = _decode_tiff(io.BytesIO(data), page)
    elif page != 0:
        raise decode_error(f"not a TIFF, no page {page} (only TIFF files have pages)")
    else:
        raw = _decode_pillow(data)
    return to_gray_float(raw)


def decode_file(fh: BinaryIO, page: int, name: str = "") -> np.ndarray:
    """:func:`decode_image` of an open, seekable binary file: a TIFF reads its headers and that page's pixels,
    not the other pages' (on object storage: ranged reads); any other format reads the file.

    With a ``name`` (the file's URL), the offsets of a multi-page TIFF's pages are kept for this process
    (:data:`PAGE_INDEX_FILES` files): its first row past page 0 walks the header chain once, every later row of
    that file jumps to its page. Rows of one wafer's review TIFF then cost about one header walk per worker, not
    one walk each. The offsets are keyed by URL and size: a file rewritten in place with the same size during a
    run is read at its old offsets (a broken header there is noticed and walked again).
    """
    magic = fh.read(4)
    fh.seek(0)
    if not magic:
        raise decode_error("empty file (0 bytes)")
    if magic in _TIFF_MAGIC:
        return to_gray_float(_decode_tiff(fh, page, (name, fh.seek(0, 2)) if name and page else None))
    fh.seek(0)
    return decode_image(fh.read(), page)


PAGE_INDEX_FILES = 64
_page_offsets: OrderedDict[tuple[str, int], list[int]] = OrderedDict()  # (url, size) -> page offsets


def _page_index(tif: tifffile.TiffFile, key: tuple[str, int]) -> list[int]:
    """The byte offsets of every page of ``tif`` (one pass over the header chain), kept for the
    :data:`PAGE_INDEX_FILES` files used last."""
    if key in _page_offsets:
        _page_offsets.move_to_end(key)
        return _page_offsets[key]
    tif.pages.cache = False
    offsets = [int(page.offset) for page in tif.pages]
    _page_offsets[key] = offsets
    if len(_page_offsets) > PAGE_INDEX_FILES:
        _page_offsets.popitem(last=False)
    return offsets


def decode_error(message: str) -> ImageError:
    """A ``decode_error`` whose message is one line of at most 500 characters, without object reprs."""
    return ImageError(DECODE_ERROR, shorten(message) or "unreadable image")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, Image.UnidentifiedImageError):
        return "cannot identify image file (unknown format or not an image)"
    return shorten(str(exc)) or type(exc).__name__


def check_size(height: int, width: int) -> None:
    if min(height, width) < MIN_SIDE:
        raise decode_error(f"frame {height}x{width} is smaller than {MIN_SIDE} px on a side")
    if height * width > MAX_PIXELS:
        raise decode_error(f"frame {height}x{width} exceeds 64 Mpx")


def _decode_tiff(fh: BinaryIO, index: int, key: tuple[str, int] | None = None) -> np.ndarray:
    try:
        fh.seek(0)
        with tifffile.TiffFile(fh) as tif:
            if index < 0:
                raise decode_error(f"TIFF has {len(tif.pages)} pages, no page {index}")
            page = _tiff_page(tif, index, key)
            shape = page.shape
            if len(shape) < 2:
                raise decode_error(f"TIFF page has shape {shape}, not an image")
            h, w = _tiff_size(shape)
            check_size(h, w)
            return page.asarray()
    except ImageError:
        raise
    except Exception as exc:
        raise decode_error(f"unreadable TIFF: {_reason(exc)}") from exc


def _tiff_size(shape: tuple[int, ...]) -> tuple[int, int]:
    """Height and width of a TIFF page's ``shape``: samples last (grey + alpha, RGB(A): up to 4), else planar samples
    first; any other layout (5 samples a pixel, a volume) is a decode error naming it (it read as a 240 x 5 frame)."""
    if len(shape) == 2:
        return int(shape[0]), int(shape[1])
    if len(shape) == 3 and shape[-1] <= 4:
        return int(shape[0]), int(shape[1])
    if len(shape) == 3 and shape[0] <= 4:
        return int(shape[1]), int(shape[2])
    raise decode_error(f"unsupported TIFF sample layout {tuple(shape)}: grey, grey + alpha, RGB or RGBA pixels only")


def _tiff_page(tif: tifffile.TiffFile, index: int, key: tuple[str, int] | None) -> tifffile.TiffPage | tifffile.TiffFrame:
    if index == 0:
        return tif.pages.first
    if key is None:
        try:  # through the headers before it only (len() would walk every page)
            return tif.pages[index]
        except IndexError:
            raise decode_error(f"TIFF has {len(tif.pages)} pages, no page {index}") from None
    offsets = _page_index(tif, key)
    if index >= len(offsets):
        raise decode_error(f"TIFF has {len(offsets)} pages, no page {index}")
    tif.filehandle.seek(offsets[index])
    try:
        return tifffile.TiffPage(tif, index=index)
    except tifffile.TiffFileError:  # the file changed under its name and size: forget it, walk again
        _page_offsets.pop(key, None)
        return _tiff_page(tif, index, None)


def _decode_pillow(data: bytes) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img: Image.Image = Image.open(io.BytesIO(data))  # an ImageFile; convert() below gives a plain Image
            check_size(img.height, img.width)
            img.load()
            if img.mode in ("P", "PA", "LA", "CMYK", "YCbCr", "LAB", "HSV", "1"):
                img = img.convert("RGBA" if "A" in img.mode or img.mode == "P" else "RGB")
            return np.asarray(img)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise decode_error(f"frame exceeds 64 Mpx: {_reason(exc)}") from exc
    except Exception as exc:
        raise decode_error(f"not a readable image: {_reason(exc)}") from exc


def to_gray_float(raw: np.ndarray) -> np.ndarray:
    """Scale by dtype and reduce colour to luminance. ``(H, W[, C])`` -> ``(H, W)`` float32."""
    arr = np.asarray(raw)
    if arr.ndim == 3 and arr.shape[0] in (2, 3, 4) and arr.shape[-1] > 4:  # planar (separate) grey + alpha, RGB(A)
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and not 1 <= arr.shape[-1] <= 4):
        raise decode_error(f"unsupported pixel layout {arr.shape}")
    check_size(arr.shape[0], arr.shape[1])
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf in the luminance, float64 -> float32 overflow
        if arr.ndim == 3 and arr.shape[-1] in (3, 4):
            gray = _scale(arr[..., :3]) @ LUMA
        elif arr.ndim == 3:
            gray = _scale(arr[..., 0])
        else:
            gray = _scale(arr)
        gray = gray.astype(np.float32, copy=False)
    return _fill_non_finite(gray)  # after the cast, which may itself overflow to inf


def _fill_non_finite(gray: np.ndarray) -> np.ndarray:
    """NaN and +-inf samples become the frame's finite minimum; a frame with none finite is a decode error."""
    finite = np.isfinite(gray)
    if finite.all():
        return gray
    if not finite.any():
        raise decode_error(f"frame {gray.shape[0]}x{gray.shape[1]} has no finite pixels (all NaN or inf)")
    return np.where(finite, gray, gray[finite].min())


def _within_float32(values: np.ndarray) -> np.ndarray:
    """Float samples as they are, unless a finite magnitude passes :data:`FLOAT_HEADROOM`: then divided by the power
    of two that brings their median magnitude near 1 (exact; the per-image stretch undoes any scale). A frame
    imaged at such a scale throughout was cast to inf, or overflowed the stretch's span, and was scored blank; a
    lone outlier (median near 1 already) still becomes inf and is filled as a non-finite sample."""
    with np.errstate(invalid="ignore"):
        finite = np.abs(values[np.isfinite(values)])
    if not finite.size or float(finite.max()) <= FLOAT_HEADROOM:
        return values
    nonzero = finite[finite > 0]  # a dark background of zeros would make the median 0: no rescale at all
    values *= 2.0 ** -math.frexp(float(np.median(nonzero)))[1]
    return values


def _scale(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.bool_:
        return arr.astype(np.float64)
    if np.issubdtype(arr.dtype, np.unsignedinteger):
        if arr.dtype.itemsize <= 2:  # exact in float32: no float64 copy of the frame
            out = arr.astype(np.float32)
            out /= np.float32(np.iinfo(arr.dtype).max)
            return out
        return arr.astype(np.float64) / float(np.iinfo(arr.dtype).max)
    if np.issubdtype(arr.dtype, np.signedinteger):  # by the type's maximum, sign kept: negatives stay apart (they
        # were clipped to 0) and zero stays 0 (a signed mask's background); the stretch after is offset-free
        return arr.astype(np.float64) / float(np.iinfo(arr.dtype).max)
    if np.issubdtype(arr.dtype, np.floating):
        return _within_float32(arr.astype(np.float64))
    raise decode_error(f"unsupported sample type {arr.dtype}")
