"""Bytes -> a float grey frame in [0, 1] (before the percentile stretch).

TIFF through tifffile (first page), everything else through Pillow. Integer samples are scaled by their
dtype's maximum, floats kept as they are; colour becomes luminance (ITU-R 601). Frame size is checked from
the header before any pixel is decoded, so a huge or tiny frame costs nothing.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import tifffile
from PIL import Image

from .errors import DECODE_ERROR, ImageError

MIN_SIDE = 16
MAX_PIXELS = 64 * 1024 * 1024
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def decode_image(data: bytes) -> np.ndarray:
    """Decode one image. Returns ``(H, W)`` float32 in [0, 1] (floats unscaled). Raises :class:`ImageError`."""
    if not data:
        raise ImageError(DECODE_ERROR, "empty file (0 bytes)")
    if data[:4] in _TIFF_MAGIC:
        raw = _decode_tiff(data)
    else:
        raw = _decode_pillow(data)
    return to_gray_float(raw)


def check_size(height: int, width: int) -> None:
    if min(height, width) < MIN_SIDE:
        raise ImageError(DECODE_ERROR, f"frame {height}x{width} is smaller than {MIN_SIDE} px on a side")
    if height * width > MAX_PIXELS:
        raise ImageError(DECODE_ERROR, f"frame {height}x{width} exceeds 64 Mpx")


def _decode_tiff(data: bytes) -> np.ndarray:
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            if not tif.pages:
                raise ImageError(DECODE_ERROR, "TIFF holds no pages")
            page = tif.pages.first
            shape = page.shape
            if len(shape) < 2:
                raise ImageError(DECODE_ERROR, f"TIFF page has shape {shape}, not an image")
            h, w = (shape[0], shape[1]) if len(shape) == 2 or shape[-1] in (3, 4) else shape[-2:]
            check_size(int(h), int(w))
            return page.asarray()
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError(DECODE_ERROR, f"unreadable TIFF: {' '.join(str(exc).split()) or type(exc).__name__}") from exc


def _decode_pillow(data: bytes) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            check_size(img.height, img.width)
            img.load()
            if img.mode in ("P", "PA", "LA", "CMYK", "YCbCr", "LAB", "HSV", "1"):
                img = img.convert("RGBA" if "A" in img.mode or img.mode == "P" else "RGB")
            return np.asarray(img)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(DECODE_ERROR, f"frame too large: {exc}") from exc
    except Exception as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ImageError(DECODE_ERROR, f"not a readable image: {reason}") from exc


def to_gray_float(raw: np.ndarray) -> np.ndarray:
    """Scale by dtype and reduce colour to luminance. ``(H, W[, C])`` -> ``(H, W)`` float32."""
    arr = np.asarray(raw)
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] > 4:  # planar (separate) RGB(A) TIFF
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        gray = _scale(arr[..., :3]) @ LUMA
    elif arr.ndim == 3 and arr.shape[-1] in (1, 2):
        gray = _scale(arr[..., 0])
    elif arr.ndim == 2:
        gray = _scale(arr)
    else:
        raise ImageError(DECODE_ERROR, f"unsupported pixel layout {arr.shape}")
    check_size(*gray.shape)
    if not np.isfinite(gray).all():
        gray = np.nan_to_num(gray, nan=0.0, posinf=0.0, neginf=0.0)
    return gray.astype(np.float32, copy=False)


def _scale(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.bool_:
        return arr.astype(np.float64)
    if np.issubdtype(arr.dtype, np.unsignedinteger):
        return arr.astype(np.float64) / float(np.iinfo(arr.dtype).max)
    if np.issubdtype(arr.dtype, np.signedinteger):
        info = np.iinfo(arr.dtype)
        return np.clip(arr.astype(np.float64), 0, None) / float(info.max)
    if np.issubdtype(arr.dtype, np.floating):
        return arr.astype(np.float64)
    raise ImageError(DECODE_ERROR, f"unsupported sample type {arr.dtype}")
