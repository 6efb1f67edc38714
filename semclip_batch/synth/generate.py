"""``synth``: synthetic SEM lots with pixel masks, reference frames and a manifest (CSV + Parquet).

Same seed -> byte-identical files. Layout of OUT: ``images/``, ``masks/``, ``reference/``, ``manifest.csv``,
``manifest.parquet`` (uris relative to OUT).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import tifffile
from PIL import Image

from semclip_batch.errors import ConfigError
from semclip_batch.io import storage
from semclip_batch.synth.render import CLASSES, add_defect, banner_height, draw_banner, pattern, random_layout, render


@dataclass(frozen=True)
class SynthConfig:
    seed: int = 0
    lots: int = 2
    wafers: int = 2
    dies: int = 4
    per_class: int = 2
    sizes: tuple[tuple[int, int], ...] = ((256, 256), (240, 320), (300, 200))
    formats: tuple[str, ...] = ("png", "tif")
    bits: tuple[int, ...] = (8, 16)
    banner_frac: float = 0.3

    def __post_init__(self) -> None:
        for name in ("lots", "wafers", "dies", "per_class"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        if any(min(s) < 64 for s in self.sizes):
            raise ConfigError("--sizes: every side must be >= 64 px")
        if set(self.formats) - {"png", "tif"}:
            raise ConfigError(f"--formats: choose from png, tif (got {', '.join(self.formats)})")
        if set(self.bits) - {8, 16}:
            raise ConfigError(f"--bits: choose from 8, 16 (got {', '.join(map(str, self.bits))})")
        if not 0.0 <= self.banner_frac <= 1.0:
            raise ConfigError("--banner-frac must be in [0, 1]")


def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """``"256x256,240x320"`` -> ((256, 256), (240, 320)) as (H, W)."""
    try:
        return tuple((int(a), int(b)) for a, b in (s.lower().split("x") for s in text.split(",") if s))
    except ValueError:
        raise ConfigError(f"--sizes {text!r}: expected HxW[,HxW...] such as 256x256,240x320") from None


def encode(img: np.ndarray, fmt: str, bits: int) -> bytes:
    """Quantise a [0, 1] frame: 8-bit, or 16-bit holding 12 significant bits; PNG or TIFF bytes."""
    arr = np.rint(img * 255).astype(np.uint8) if bits == 8 else np.rint(img * 4095).astype(np.uint16)
    buf = io.BytesIO()
    if fmt == "tif":
        tifffile.imwrite(buf, arr, photometric="minisblack", metadata=None)
    else:
        Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _png(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buf, format="PNG")
    return buf.getvalue()


def make_site(label: str, h: int, w: int, rng: np.random.Generator,
              banner: str | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One site: (image, mask bool, reference image), all ``(H, W)``."""
    layout = random_layout(rng, label)
    structure = pattern(layout, h, w)
    usable_h = h - banner_height(h) if banner else h
    mask = np.zeros((h, w), bool)
    extra = None
    if label != "normal":
        structure, extra, mask = add_defect(label, structure, layout, rng, usable_h)
    img = render(structure, rng, extra)
    shift = (int(rng.integers(-3, 4)), int(rng.integers(-3, 4)))
    ref = render(pattern(layout, h, w, shift), rng)
    if banner:
        img, ref = draw_banner(img, banner), draw_banner(ref, banner)
    return img, mask, ref


def synth(out: str, cfg: SynthConfig, storage_options: dict | None = None) -> pd.DataFrame:
    """Write a synthetic data set under ``out`` and return its manifest."""
    rows = []
    root = storage.normalize_root(out)
    for lot_index in range(cfg.lots):
        lot = f"LOT-S{cfg.seed}-{lot_index:02d}"
        n = 0
        for label in CLASSES:
            for k in range(cfg.per_class):
                rng = np.random.default_rng([cfg.seed, lot_index, CLASSES.index(label), k])
                rows.append(_write_site(root, lot, n, label, k, rng, cfg, storage_options))
                n += 1
    manifest = pd.DataFrame(rows)
    storage.write_bytes(storage.join(root, "manifest.csv"), manifest.to_csv(index=False).encode(), storage_options)
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(manifest.astype(str), preserve_index=False), sink)
    storage.write_bytes(storage.join(root, "manifest.parquet"), sink.getvalue(), storage_options)
    return manifest


def _write_site(root: str, lot: str, n: int, label: str, k: int, rng: np.random.Generator, cfg: SynthConfig,
                storage_options: dict | None) -> dict[str, object]:
    wafer = f"W{n % cfg.wafers + 1:02d}"
    die = (n // cfg.wafers) % cfg.dies
    h, w = cfg.sizes[n % len(cfg.sizes)]
    fmt = cfg.formats[n % len(cfg.formats)]
    bits = cfg.bits[(n // len(cfg.formats)) % len(cfg.bits)]
    banner = f"SEM HV 1.0kV MAG 100kx {lot} {wafer}" if rng.random() < cfg.banner_frac else None
    img, mask, ref = make_site(label, h, w, rng, banner)
    name = f"{label}_{k:03d}"
    uri = f"images/{lot}/{wafer}/{name}.{fmt}"
    mask_uri = f"masks/{lot}/{wafer}/{name}.png"
    ref_uri = f"reference/{lot}/{wafer}/{name}_ref.{fmt}"
    storage.write_bytes(storage.join(root, uri), encode(img, fmt, bits), storage_options)
    storage.write_bytes(storage.join(root, mask_uri), _png(mask), storage_options)
    storage.write_bytes(storage.join(root, ref_uri), encode(ref, fmt, bits), storage_options)
    return {"uri": uri, "lot_id": lot, "wafer_id": wafer, "die_x": die % 8, "die_y": die // 8, "label": label,
            "mask_uri": mask_uri, "reference_uri": ref_uri, "banner": int(banner is not None)}
