"""Every kind of bad frame: a one-line ``decode_error`` naming the reason, or an ok frame with bounded views."""

from __future__ import annotations

import io
import struct
import time
import tracemalloc
import warnings
import zlib
from collections.abc import Callable

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image, ImageFile

from semclip_batch.config import PreprocessConfig
from semclip_batch.errors import DECODE_ERROR, MAX_MESSAGE, ImageError
from semclip_batch.io import decode
from semclip_batch.io.decode import decode_image
from semclip_batch.io.preprocess import MAX_TILES, maps_to_frame, model_inputs, tile_grid

CFG = PreprocessConfig(image_size=64, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
HUGE = 60_000


def _noise(shape: tuple[int, ...], dtype: type = np.uint8, seed: int = 0) -> np.ndarray:
    info = np.iinfo(dtype)
    return np.random.default_rng(seed).integers(0, info.max, shape, dtype=dtype, endpoint=True)


def _pil(img: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png(arr: np.ndarray) -> bytes:
    return _pil(Image.fromarray(arr))


def _tif(arr: np.ndarray, **kw: object) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, **kw)
    return buf.getvalue()


def _multipage_tif(pages: list[np.ndarray]) -> bytes:
    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as w:
        for page in pages:
            w.write(page)
    return buf.getvalue()


def _half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _huge_png() -> bytes:
    """A valid 16x16 PNG whose IHDR (with a correct CRC) claims 60,000 x 60,000."""
    data = bytearray(_png(_noise((16, 16))))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", HUGE, HUGE)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _huge_tiff() -> bytes:
    """A valid 16x16 TIFF whose ImageWidth/ImageLength tags claim 60,000 x 60,000."""
    data = bytearray(_tif(_noise((16, 16))))
    with tifffile.TiffFile(io.BytesIO(bytes(data))) as tif:
        tags = tif.pages.first.tags
        patches = [(tags[name].valueoffset, tags[name].dtype) for name in ("ImageWidth", "ImageLength")]
    for offset, dtype in patches:
        fmt = "<I" if dtype == tifffile.DATATYPE.LONG else "<H"
        data[offset:offset + struct.calcsize(fmt)] = struct.pack(fmt, HUGE)
    return bytes(data)


def _expect_decode_error(data: bytes, match: str, page: int = 0) -> ImageError:
    with pytest.raises(ImageError, match=match) as info:
        decode_image(data, page=page)
    assert info.value.kind == DECODE_ERROR
    return info.value


def _assert_clean(message: str) -> None:
    assert "\n" not in message and "\r" not in message
    assert 0 < len(message) <= MAX_MESSAGE
    assert " at 0x" not in message and "object at" not in message


BAD_INPUTS: dict[str, tuple[Callable[[], bytes], str]] = {
    "empty": (lambda: b"", r"empty file \(0 bytes\)"),
    "truncated_png": (lambda: _half(_png(_noise((64, 64)))), "not a readable image"),
    "truncated_tiff": (lambda: _half(_tif(_noise((64, 64)))), "unreadable TIFF"),
    "truncated_tiff_header": (lambda: _tif(_noise((64, 64)))[:9], "unreadable TIFF"),
    "truncated_compressed_tiff": (lambda: _half(_tif(_noise((64, 64)), compression="zlib")), "unreadable TIFF"),
    "truncated_jpeg": (lambda: _half(_pil(Image.fromarray(_noise((64, 64))), "JPEG")), "not a readable image"),
    "text": (lambda: b"hello, this is a text file and not an image\n" * 4, "cannot identify image file"),
    "1x1": (lambda: _png(np.zeros((1, 1), np.uint8)), "frame 1x1 is smaller than 16"),
    "15x15": (lambda: _png(np.zeros((15, 15), np.uint8)), "frame 15x15 is smaller than 16"),
    "15x15_tiff": (lambda: _tif(np.zeros((15, 15), np.uint16)), "frame 15x15 is smaller than 16"),
    "huge_png": (_huge_png, "64 Mpx"),
    "huge_tiff": (_huge_tiff, "frame 60000x60000 exceeds 64 Mpx"),
    "all_nan_float": (lambda: _tif(np.full((20, 20), np.nan, np.float32)), "no finite pixels"),
    "all_inf_float": (lambda: _tif(np.full((20, 20), np.inf, np.float32)), "no finite pixels"),
    "five_samples": (lambda: _tif(np.zeros((200, 240, 5), np.uint8), photometric="minisblack", planarconfig="contig"),
                     r"unsupported TIFF sample layout \(200, 240, 5\)"),  # it read as a 240x5 frame
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_is_a_clean_one_line_decode_error(name: str) -> None:
    make, match = BAD_INPUTS[name]
    _assert_clean(str(_expect_decode_error(make(), match)))


def test_16x16_is_the_smallest_ok_frame() -> None:
    assert decode_image(_png(np.zeros((16, 16), np.uint8))).shape == (16, 16)
    assert decode_image(_tif(np.zeros((16, 16), np.uint16))).shape == (16, 16)


def test_size_error_names_both_sides() -> None:
    _expect_decode_error(_png(np.zeros((15, 40), np.uint8)), "frame 15x40 ")
    _expect_decode_error(_tif(np.zeros((40, 15), np.uint8)), "frame 40x15 ")


def test_mid_sized_header_over_64_mpx_names_its_size() -> None:
    """Between 64 Mpx and Pillow's own bomb limit the size check itself refuses the frame."""
    data = bytearray(_png(_noise((16, 16))))
    data[16:24] = struct.pack(">II", 10_000, 10_000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    _expect_decode_error(bytes(data), "frame 10000x10000 exceeds 64 Mpx")


@pytest.mark.parametrize("make", [_huge_png, _huge_tiff], ids=["png", "tiff"])
def test_huge_header_refused_before_any_pixel(make: Callable[[], bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    data = make()

    def no_pixels(*_args: object, **_kw: object) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(Image.Image, "load", no_pixels)
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_pixels)
    monkeypatch.setattr(tifffile.TiffPage, "asarray", no_pixels)
    tracemalloc.start()
    try:
        start = time.perf_counter()
        with pytest.raises(ImageError, match="64 Mpx") as info:
            decode_image(data)
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.kind == DECODE_ERROR
    assert elapsed < 2.0
    assert peak < 50 * 1024 * 1024


def test_pillow_object_repr_is_removed() -> None:
    """Pillow names the file object (``<_io.BytesIO object at 0x...>``); the message must not."""
    with pytest.raises(Image.UnidentifiedImageError, match="at 0x"):
        Image.open(io.BytesIO(b"not an image"))
    err = _expect_decode_error(b"not an image", "cannot identify image file")
    _assert_clean(str(err))


def test_long_multiline_reason_is_folded_and_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    def noisy_open(*_args: object, **_kw: object) -> None:
        raise OSError("first line\nsecond <Foo object at 0xDEADBEEF> line\n" + "x" * 2000)

    monkeypatch.setattr(decode.Image, "open", noisy_open)
    err = _expect_decode_error(b"\x89PNG whatever", "not a readable image: first line second line x")
    _assert_clean(str(err))
    assert str(err).endswith("characters)")


@pytest.mark.parametrize("shape", [(16, 100_000), (100_000, 16)], ids=["wide", "tall"])
def test_extreme_aspect_ratio_is_ok_with_at_most_64_views(shape: tuple[int, int]) -> None:
    arr = np.zeros(shape, np.uint8)
    arr[..., ::7] = 200
    gray = decode_image(_png(arr))
    assert gray.shape == shape
    x = model_inputs(gray, CFG)
    assert x.shape[1:] == (3, CFG.image_size, CFG.image_size)
    assert 2 <= x.shape[0] <= 64 == 1 + MAX_TILES
    assert np.isfinite(x).all()
    tiles = tile_grid(*shape, CFG.tile_above, CFG.tile_overlap)
    assert x.shape[0] == 1 + len(tiles)
    assert all(min(t.height, t.width) == 16 for t in tiles)
    maps = torch.full((x.shape[0], CFG.image_size, CFG.image_size), 0.5)
    frame = maps_to_frame(maps, *shape, tiles)
    assert frame.shape == shape
    assert torch.allclose(frame, torch.full_like(frame, 0.5), atol=1e-6)


def test_constant_16_bit_frame_is_ok_without_nan_or_warning() -> None:
    data = _tif(np.full((40, 50), 1234, np.uint16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gray = decode_image(data)
        x = model_inputs(gray, CFG)
    assert np.allclose(gray, 1234 / 65535)
    assert np.isfinite(x).all()
    assert np.allclose(x, (0.0 - 0.5) / 0.25)  # the stretch of a constant frame is all zeros


def test_palette_png_is_ok() -> None:
    img = Image.fromarray(_noise((24, 20))).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    data = _pil(img)
    assert Image.open(io.BytesIO(data)).mode == "P"
    expected = np.asarray(img.convert("RGB"), np.float64) / 255.0 @ np.array([0.299, 0.587, 0.114])
    assert np.allclose(decode_image(data), expected, atol=1e-6)


def test_cmyk_jpeg_is_ok() -> None:
    data = _pil(Image.new("CMYK", (32, 24), (0, 0, 0, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    gray = decode_image(data)
    assert gray.shape == (24, 32) and np.isfinite(gray).all()
    assert gray.mean() > 0.9  # no ink is white


def test_multipage_tiff_uses_page_0_and_page_selects() -> None:
    pages = [_noise((20, 24), np.uint16, seed=k) for k in range(3)]
    data = _multipage_tif(pages)
    for k, page in enumerate(pages):
        expected = (page / 65535.0).astype(np.float32)
        assert np.array_equal(decode_image(data, page=k), expected)
    assert np.array_equal(decode_image(data), (pages[0] / 65535.0).astype(np.float32))


@pytest.mark.parametrize("page", [3, 7, -1])
def test_tiff_page_out_of_range_is_decode_error(page: int) -> None:
    data = _multipage_tif([np.zeros((20, 20), np.uint8)] * 3)
    _assert_clean(str(_expect_decode_error(data, f"TIFF has 3 pages, no page {page}", page=page)))


def test_page_of_a_non_tiff_is_decode_error() -> None:
    data = _png(np.zeros((20, 20), np.uint8))
    assert decode_image(data, page=0).shape == (20, 20)
    _assert_clean(str(_expect_decode_error(data, "not a TIFF, no page 1", page=1)))


def test_non_finite_float_pixels_become_the_finite_minimum() -> None:
    arr = np.linspace(-0.25, 2.0, 20 * 24, dtype=np.float32).reshape(20, 24)
    arr[0, 0], arr[5, 5], arr[-1, -1] = np.nan, np.inf, -np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gray = decode_image(_tif(arr))
        x = model_inputs(gray, CFG)
    finite_min = np.nanmin(np.where(np.isfinite(arr), arr, np.nan))
    assert np.isfinite(gray).all() and np.isfinite(x).all()
    assert gray[0, 0] == gray[5, 5] == gray[-1, -1] == finite_min
    mask = np.isfinite(arr)
    assert np.array_equal(gray[mask], arr[mask])


def test_non_finite_float64_and_rgb_float_are_filled() -> None:
    arr = np.full((20, 20), 0.5)
    arr[3, 4] = 1e300  # finite in float64, inf once cast to float32
    arr[0, 0] = 0.25
    assert decode_image(_tif(arr))[3, 4] == np.float32(0.25)
    rgb = np.full((20, 20, 3), 0.5, np.float32)
    rgb[2, 2] = (np.inf, -np.inf, np.nan)
    gray = decode_image(_tif(rgb, photometric="rgb"))
    assert np.isfinite(gray).all() and gray[2, 2] == pytest.approx(0.5)


@pytest.mark.parametrize(("scale", "dark"), [(1e300, 0), (3e38, 0), (-1e200, 0), (1e300, 14)])
def test_a_float_frame_imaged_past_float32s_range_keeps_its_content(scale: float, dark: int) -> None:
    """Every sample finite but huge (a float64 frame at 1e300, float32 near its limit): the cast made them inf, or
    the stretch's span overflowed, and the frame was scored blank, status ok. ``dark``: rows of zero background
    (more than half the frame: the median magnitude is then 0)."""
    base = np.linspace(-1.0, 1.0, 20 * 24).reshape(20, 24)  # a span of twice the scale
    base[5:9, 5:9] = 0.0
    base[:dark] = 0.0
    arr = (base * scale).astype(np.float32 if abs(scale) < 3.4e38 else np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = model_inputs(decode_image(_tif(arr)), CFG)
        expected = model_inputs(decode_image(_tif((base * np.sign(scale)).astype(np.float32))), CFG)
    assert np.isfinite(x).all() and np.allclose(x, expected, atol=1e-4)


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: _pil(Image.fromarray(np.tile([True, False], (20, 10)))), np.tile([1.0, 0.0], (20, 10))),
        (lambda: _pil(Image.fromarray(np.full((20, 20, 2), (51, 10), np.uint8), mode="LA")), np.full((20, 20), 0.2)),
        (lambda: _png(np.full((20, 20), 13107, np.uint16)), np.full((20, 20), 0.2)),
    ],
    ids=["1-bit", "LA", "I;16"],
)
def test_1bit_la_and_16bit_png_are_ok(make: Callable[[], bytes], expected: np.ndarray) -> None:
    assert np.allclose(decode_image(make()), expected, atol=1e-6)
