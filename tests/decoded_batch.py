"""Decode-stage input batches for tests that feed ``pipeline.reader.decode_batch`` directly (the defect view's and
the grey-level memory's): random 16-bit TIFF frames of given shapes, and a batch of input rows naming them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tifffile

from semclip_batch.config import PreprocessConfig
from semclip_batch.io.schema import INPUT_COLUMNS


def write_frames(folder: Path, shapes: Sequence[tuple[int, int]], seed: int) -> list[str]:
    """One random uint16 TIFF per shape under ``folder`` (``0.tif``, ``1.tif``, ...); their paths."""
    rng = np.random.default_rng(seed)
    paths = []
    for k, shape in enumerate(shapes):
        paths.append(str(folder / f"{k}.tif"))
        tifffile.imwrite(paths[-1], (rng.random(shape) * 65535).astype(np.uint16))
    return paths


def input_batch(urls: Sequence[str]) -> dict[str, np.ndarray]:
    """A decode-stage input batch of one row per url (placeholder ids, no reference frame, no page)."""
    n = len(urls)
    batch = {c: np.array([f"{c}{i}" for i in range(n)], dtype=object) for c in INPUT_COLUMNS}
    batch.update(url=np.array(urls, dtype=object), reference_url=np.full(n, None, dtype=object),
                 die_x=np.zeros(n, np.int64), die_y=np.zeros(n, np.int64), page=np.full(n, None, dtype=object))
    return batch


def decoded(folder: Path, prep: PreprocessConfig, shapes: Sequence[tuple[int, int]], seed: int = 3) -> dict[str, np.ndarray]:
    """``decode_batch`` of random frames of ``shapes`` at ``prep``, as the model actor receives it (columns of
    objects)."""
    from semclip_batch.pipeline.reader import decode_batch

    table = decode_batch(input_batch(write_frames(folder, shapes, seed)), prep=prep)
    return {k: np.array(v, dtype=object) for k, v in table.to_pydict().items()}
