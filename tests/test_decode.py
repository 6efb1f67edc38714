"""Decoding: bit depths, formats, colour, and every kind of broken file as an ImageError."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tifffile
from PIL import Image

from semclip_batch.errors import DECODE_ERROR, ImageError
from semclip_batch.io.decode import decode_image


def png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG") if mode else Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def tif(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, **kw)
    return buf.getvalue()


def test_uint8_png_scaled_by_255():
    arr = np.full((20, 30), 51, np.uint8)
    out = decode_image(png(arr))
    assert out.shape == (20, 30) and out.dtype == np.float32
    assert np.allclose(out, 0.2)


def test_uint16_tiff_scaled_by_65535():
    arr = np.full((40, 24), 4095, np.uint16)
    assert np.allclose(decode_image(tif(arr)), 4095 / 65535)


@pytest.mark.parametrize("compression", [None, "zlib", "lzw", "packbits", "zstd"])
def test_compressed_tiffs_as_archives_hold_them_decode_exactly(compression):
    arr = (np.arange(64 * 48, dtype=np.uint16).reshape(64, 48) * 7) % 4096  # 12 bits inside 16
    assert np.array_equal(decode_image(tif(arr, compression=compression)), arr.astype(np.float32) / np.float32(65535))


def test_jpeg_compressed_tiff_decodes():
    arr = np.tile(np.linspace(40, 200, 64, dtype=np.uint8), (48, 1))
    assert np.abs(decode_image(tif(arr, compression="jpeg")) * 255 - arr).max() < 8  # lossy


def test_uint16_png():
    arr = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60
    out = decode_image(png(arr))
    assert np.allclose(out, arr / 65535.0, atol=1e-6)


def test_float_tiff_kept_as_is():
    arr = np.linspace(-0.5, 2.0, 32 * 32, dtype=np.float32).reshape(32, 32)
    assert np.allclose(decode_image(tif(arr)), arr)


def test_rgb_becomes_luminance():
    arr = np.zeros((16, 16, 3), np.uint8)
    arr[..., 0] = 255
    assert np.allclose(decode_image(png(arr)), 0.299, atol=1e-6)
    rgba = np.dstack([arr, np.full((16, 16), 128, np.uint8)])
    assert np.allclose(decode_image(png(rgba)), 0.299, atol=1e-6)


def test_planar_rgb_tiff_becomes_luminance():
    arr = np.zeros((3, 20, 24), np.uint16)
    arr[1] = 65535
    assert np.allclose(decode_image(tif(arr, planarconfig="separate", photometric="rgb")), 0.587, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.int64])
def test_signed_tiff_keeps_its_levels(dtype):
    """A signed frame is scaled by its type's maximum with its sign: negative levels stay apart and in order (they
    were all clipped to 0), 12-bit levels in 32 or 64 bits stay apart, 0 stays 0, and the same frame shifted by a
    constant stretches to the same levels."""
    from semclip_batch.io.levels import stretch

    arr = ((np.arange(64 * 64).reshape(64, 64) - 500) * 3 % 4096 - 300).astype(dtype)
    out = decode_image(tif(arr))
    assert len(np.unique(out)) == len(np.unique(arr)) and (np.sign(out) == np.sign(arr)).all()
    shifted = decode_image(tif((arr + 1400).astype(dtype)))
    assert np.allclose(stretch(out, 0.5, 99.5), stretch(shifted, 0.5, 99.5), atol=1e-4)


@pytest.mark.parametrize("planar", [False, True])
def test_grey_and_alpha_tiff_reads_the_grey(planar):
    """A grey + alpha (extra sample) TIFF, samples last or planar: its grey channel, not a 256 x 2 frame."""
    grey = np.tile(np.arange(256, dtype=np.uint16)[None, :] * 257, (40, 1))
    alpha = np.full_like(grey, 65535)
    arr = np.stack([grey, alpha]) if planar else np.dstack([grey, alpha])
    data = tif(arr, photometric="minisblack", extrasamples=["unassalpha"],
               planarconfig="separate" if planar else "contig")
    out = decode_image(data)
    assert out.shape == (40, 256) and np.allclose(out, grey / 65535, atol=1e-6)


def test_palette_becomes_luminance():
    img = Image.new("P", (20, 20))
    img.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    img.paste(1, (0, 0, 20, 20))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    assert np.allclose(decode_image(buf.getvalue()), 0.587, atol=1e-6)


def test_tiff_first_page_only():
    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as w:
        w.write(np.full((20, 20), 255, np.uint8))
        w.write(np.zeros((20, 20), np.uint8))
    assert np.allclose(decode_image(buf.getvalue()), 1.0)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"hello, not an image at all", "not a readable image"),
        (png(np.zeros((8, 64), np.uint8)), "smaller than 16"),
        (tif(np.zeros((12, 40), np.uint16)), "smaller than 16"),
    ],
)
def test_bad_inputs_are_decode_errors(data, reason):
    with pytest.raises(ImageError, match=reason) as info:
        decode_image(data)
    assert info.value.kind == DECODE_ERROR
    assert "\n" not in str(info.value)


def test_truncated_png_is_decode_error():
    data = png(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
    with pytest.raises(ImageError) as info:
        decode_image(data[: len(data) // 2])
    assert info.value.kind == DECODE_ERROR


def test_over_64_mpx_refused_from_header():
    big = tif(np.zeros((8200, 8200), np.uint8), compression="zlib")
    with pytest.raises(ImageError, match="64 Mpx"):
        decode_image(big)


class _CountingReader(io.BytesIO):
    """A seekable file that counts the reads and bytes read from it."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.bytes_read = self.reads = 0

    def read(self, size: int | None = -1) -> bytes:
        out = super().read(size)
        self.bytes_read += len(out)
        self.reads += 1
        return out

    def readinto(self, buffer) -> int:  # type: ignore[override]
        n = super().readinto(buffer)
        self.bytes_read += n
        self.reads += 1
        return n


def test_a_page_of_a_multi_page_tiff_reads_only_that_page(tmp_path):
    from semclip_batch.io.decode import decode_file
    from semclip_batch.io.frames import load_frame

    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as writer:
        for k in range(12):
            writer.write(np.full((256 + 8 * k, 256), 20 * k, np.uint8))
    data = buf.getvalue()
    fh = _CountingReader(data)
    page = decode_file(fh, 7)
    assert page.shape == (312, 256) and np.allclose(page, 140 / 255)
    assert fh.bytes_read < len(data) / 4  # headers on the way and one page of twelve
    (tmp_path / "lot.tif").write_bytes(data)
    assert load_frame(str(tmp_path / "lot.tif"), page=11).shape == (344, 256)
    assert load_frame(str(tmp_path / "lot.tif"), page=0).shape == load_frame(str(tmp_path / "lot.tif")).shape
    with pytest.raises(ImageError, match="TIFF has 12 pages, no page 12") as err:
        load_frame(str(tmp_path / "lot.tif"), page=12)
    assert err.value.kind == DECODE_ERROR
    (tmp_path / "one.png").write_bytes(png(np.zeros((20, 20), np.uint8)))
    assert load_frame(str(tmp_path / "one.png"), page=0).shape == (20, 20)
    with pytest.raises(ImageError, match="not a TIFF, no page 1"):
        load_frame(str(tmp_path / "one.png"), page=1)
    with pytest.raises(ImageError, match="not found") as missing_err:
        load_frame(str(tmp_path / "gone.tif"), page=3)
    assert missing_err.value.kind == "read_error"


def test_later_rows_of_one_multi_page_tiff_jump_to_their_page():
    from semclip_batch.io.decode import decode_file

    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as writer:
        for k in range(60):
            writer.write(np.full((32 + k % 3, 40), 4 * k, np.uint8))
    first, later = _CountingReader(buf.getvalue()), _CountingReader(buf.getvalue())
    assert np.allclose(decode_file(first, 50, "mem://lot.tif"), 200 / 255)
    page = decode_file(later, 41, "mem://lot.tif")
    assert page.shape == (34, 40) and np.allclose(page, 164 / 255)
    assert first.reads >= 60 and later.reads * 10 < first.reads  # one header walk, then a jump to the page
    with pytest.raises(ImageError, match="TIFF has 60 pages, no page 60"):
        decode_file(_CountingReader(buf.getvalue()), 60, "mem://lot.tif")
    from semclip_batch.io import decode

    stale = len(buf.getvalue()) - 3  # as if the file had changed: no header there
    decode._page_offsets[("mem://lot.tif", len(buf.getvalue()))] = [stale] * 60
    assert np.allclose(decode_file(_CountingReader(buf.getvalue()), 41, "mem://lot.tif"), 164 / 255)
