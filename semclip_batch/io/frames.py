"""One frame from a URL: read through storage, decode, check (what every stage that opens frames calls)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from semclip_batch.errors import READ_ERROR, REFERENCE_ERROR, ImageError, one_line
from semclip_batch.io.decode import decode_file, decode_image
from semclip_batch.io.register import register_reference
from semclip_batch.io.storage import filesystem, read_bytes, read_with, redact


def load_frame(url: str, storage_options: Mapping[str, Any] | None = None, page: int | None = None) -> np.ndarray:
    """Read and decode one frame. Returns ``(H, W)`` float32. Raises :class:`ImageError`.

    ``page`` (a manifest's 0-based TIFF page): None reads the whole file and decodes its first page; a number
    reads the file's headers and that page's pixels (:func:`~semclip_batch.io.decode.decode_file`, with the
    page offsets of recent files kept), so N defects on pages of one multi-page TIFF do not read it N times.
    """
    if url.endswith("/"):  # the store strips the "/" and would read another object, or a local file, by the name
        raise ImageError(READ_ERROR, f"is a folder, not a file (ends in '/'): {redact(url)}")
    try:
        if page is not None:
            return read_with(url, storage_options, lambda fh: decode_file(fh, page, url))
        data = read_bytes(url, storage_options)
    except ImageError:
        raise
    except FileNotFoundError:
        what = "is a folder, not a file" if _is_folder(url, storage_options) else "not found"
        raise ImageError(READ_ERROR, f"{what}: {redact(url)}") from None
    except IsADirectoryError:
        raise ImageError(READ_ERROR, f"is a folder, not a file: {redact(url)}") from None
    except Exception as exc:  # noqa: BLE001 - any storage failure is this row's read error
        raise ImageError(READ_ERROR, f"cannot read {redact(url)}: {one_line(exc)}") from None
    return decode_image(data)


def _is_folder(url: str, storage_options: Mapping[str, Any] | None) -> bool:
    """Whether a URL that read as missing names a folder (an object store's prefix); False when that cannot be
    told."""
    try:
        fs, path = filesystem(url, storage_options)
        return bool(fs.isdir(path))
    except Exception:  # noqa: BLE001 - only the message depends on it
        return False


def load_reference(url: str, frame: np.ndarray, storage_options: Mapping[str, Any] | None,
                   register: bool = True) -> np.ndarray:
    """A row's reference frame, which must have the image's shape; with ``register``, shifted and intensity-matched
    onto ``frame`` (:func:`semclip_batch.io.register.register_reference`). Raises ``ImageError(reference_error)``."""
    shape = frame.shape
    try:
        ref = load_frame(url, storage_options)
    except ImageError as exc:
        raise ImageError(REFERENCE_ERROR, f"reference: {exc}") from None
    if ref.shape != shape:
        raise ImageError(REFERENCE_ERROR, f"reference {redact(url)} is {ref.shape[0]}x{ref.shape[1]}, "
                                          f"the image {shape[0]}x{shape[1]}")
    if not register:
        return ref
    try:
        aligned, _ = register_reference(frame, ref)
    except Exception as exc:  # noqa: BLE001 - a reference that cannot be aligned is this row's reference error
        raise ImageError(REFERENCE_ERROR, f"reference {redact(url)} could not be registered: {one_line(exc)}") from None
    return aligned
