"""``synth``: synthetic SEM lots with pixel masks, reference frames and a manifest (CSV + Parquet).

Same seed -> byte-identical files. Layout of OUT: ``images/``, ``masks/``, ``reference/``, ``manifest.csv``,
``manifest.parquet`` (uris relative to OUT). ``family`` picks the kind of data (layouts, defect scale, imaging;
see :mod:`semclip_batch.synth.families`); ``classic``, the default, writes exactly what it always wrote. Other
families add a ``family`` manifest column (for ``mixed``: the member drawn for that frame).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import tifffile
from PIL import Image

from semclip_batch.errors import ConfigError
from semclip_batch.io import storage, targets
from semclip_batch.synth.defects import add_scaled_defect
from semclip_batch.synth.families import Family, get_family
from semclip_batch.synth.layouts import draw, make_layout
from semclip_batch.synth.render import (
    CLASSES,
    add_defect,
    banner_height,
    draw_banner,
    pattern,
    random_layout,
    render,
    render_sem,
    scan_drift,
    shift_rows,
)


@dataclass(frozen=True)
class SynthConfig:
    seed: int = 0
    lots: int = 2
    wafers: int = 2
    dies: int = 4
    per_class: int = 2
    sizes: tuple[tuple[int, int], ...] | None = None  # None: the family's
    formats: tuple[str, ...] = ("png", "tif")
    bits: tuple[int, ...] | None = None  # None: the family's
    banner_frac: float | None = None  # None: the family's
    family: str = "classic"
    defect_px: tuple[float, float] | None = None  # None: the family's defect scale (px at frame resolution)

    def __post_init__(self) -> None:
        get_family(self.family)
        if self.defect_px is not None:
            lo, hi = self.defect_px
            if self.family == "classic":
                raise ConfigError("--defect-px applies to the non-classic families (classic draws its own sizes)")
            if not 1.0 <= lo <= hi < float("inf"):
                raise ConfigError(f"--defect-px must be LO-HI with 1 <= LO <= HI, got {lo:g}-{hi:g}")
        for name in ("lots", "wafers", "dies", "per_class"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        if not self.frame_sizes:
            raise ConfigError("--sizes: give at least one HxW such as 256x256")
        if any(min(s) < 64 for s in self.frame_sizes):
            raise ConfigError("--sizes: every side must be >= 64 px")
        if set(self.formats) - {"png", "tif"}:
            raise ConfigError(f"--formats: choose from png, tif (got {', '.join(self.formats)})")
        if set(self.bit_depths) - {8, 16}:
            raise ConfigError(f"--bits: choose from 8, 16 (got {', '.join(map(str, self.bit_depths))})")
        if not 0.0 <= self.banner_share <= 1.0:
            raise ConfigError("--banner-frac must be in [0, 1]")

    @property
    def frame_sizes(self) -> tuple[tuple[int, int], ...]:
        """``sizes``, or the family's default."""
        return get_family(self.family).sizes if self.sizes is None else self.sizes

    @property
    def bit_depths(self) -> tuple[int, ...]:
        """``bits``, or the family's default."""
        return get_family(self.family).bits if self.bits is None else self.bits

    @property
    def banner_share(self) -> float:
        """``banner_frac``, or the family's default."""
        return get_family(self.family).banner_frac if self.banner_frac is None else self.banner_frac


def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """``"256x256,240x320"`` -> ((256, 256), (240, 320)) as (H, W)."""
    try:
        return tuple((int(a), int(b)) for a, b in (s.lower().split("x") for s in text.split(",") if s))
    except ValueError:
        raise ConfigError(f"--sizes {text!r}: expected HxW[,HxW...] such as 256x256,240x320") from None


def parse_defect_px(text: str) -> tuple[float, float]:
    """``"3-10"`` -> (3.0, 10.0): a defect's size range in px at frame resolution."""
    lo, sep, hi = text.partition("-")
    try:
        return (float(lo), float(hi)) if sep else (float(lo), float(lo))
    except ValueError:
        raise ConfigError(f"--defect-px {text!r}: expected LO-HI in px such as 3-10") from None


def encode(img: np.ndarray, fmt: str, bits: int, window: tuple[float, float] = (0.0, 1.0)) -> bytes:
    """Quantise a [0, 1] frame: 8-bit, or 16-bit holding 12 significant bits, the signal spanning ``window``
    (fractions of 4095: offset and top); PNG or TIFF bytes."""
    if bits == 8:
        arr = np.rint(img * 255).astype(np.uint8)
    elif window == (0.0, 1.0):
        arr = np.rint(img * 4095).astype(np.uint16)
    else:
        arr = np.rint((window[0] + (window[1] - window[0]) * img) * 4095).astype(np.uint16)
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


def make_site(label: str, h: int, w: int, rng: np.random.Generator, banner: str | None,
              family: str | Family = "classic") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One site: (image, mask bool, reference image), all ``(H, W)``, of ``family`` (a mixed family draws one of
    its members from ``rng``)."""
    fam = pick_member(get_family(family) if isinstance(family, str) else family, rng)
    if fam.name != "classic":
        return family_site(label, h, w, rng, banner, fam)
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


def family_site(label: str, h: int, w: int, rng: np.random.Generator, banner: str | None,
                fam: Family) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A site of a non-classic family: its layout, a defect at its scale, its imaging with scan drift (the mask
    drifts with the frame), and a reference frame (same layout shifted a few px, own noise and drift)."""
    kinds, weights = zip(*fam.layouts, strict=True)
    kind = str(rng.choice(kinds, p=np.array(weights) / sum(weights)))
    layout = make_layout(kind, rng, h, w, fam.pitch)
    structure = draw(layout, h, w)
    usable_h = h - banner_height(h) if banner else h
    regime = fam.regime
    margin_x = int(np.ceil(regime.drift + 3 * regime.jitter)) + 2
    mask, extra = np.zeros((h, w), bool), np.zeros((h, w))
    if label != "normal":
        structure, extra, mask = add_scaled_defect(label, structure, layout, rng, usable_h, fam.defect_px, margin_x)
    gain, offset = rng.uniform(*regime.gain), rng.uniform(*regime.offset)
    dx = scan_drift(rng, h, regime)
    img = render_sem(shift_rows(structure, dx), rng, regime, shift_rows(extra, dx, 0.0), gain, offset)
    mask = shift_rows(mask, dx, False)
    shift = (int(rng.integers(-3, 4)), int(rng.integers(-3, 4)))
    ref = render_sem(shift_rows(draw(layout, h, w, shift), scan_drift(rng, h, regime)), rng, regime, None, gain, offset)
    if banner:
        img, ref = draw_banner(img, banner), draw_banner(ref, banner)
    return img, mask, ref


def pick_member(fam: Family, rng: np.random.Generator) -> Family:
    """``fam`` itself, or for a mixed family one of its members drawn from ``rng``."""
    return get_family(fam.members[int(rng.integers(len(fam.members)))]) if fam.members else fam


def synth(out: str, cfg: SynthConfig, storage_options: dict | None = None) -> pd.DataFrame:
    """Write a synthetic data set under ``out`` and return its manifest."""
    rows = []
    root = storage.normalize_root(out)
    targets.check_target(root, "folder", "OUT (the folder of the lot)", storage_options)
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
    h, w = cfg.frame_sizes[n % len(cfg.frame_sizes)]
    fmt = cfg.formats[n % len(cfg.formats)]
    bits = cfg.bit_depths[(n // len(cfg.formats)) % len(cfg.bit_depths)]
    banner = f"SEM HV 1.0kV MAG 100kx {lot} {wafer}" if rng.random() < cfg.banner_share else None
    fam = pick_member(get_family(cfg.family), rng)
    if cfg.defect_px is not None:
        fam = replace(fam, defect_px=cfg.defect_px)
    img, mask, ref = make_site(label, h, w, rng, banner, fam)
    window = (0.0, 1.0)
    if fam.name != "classic":
        lo = rng.uniform(*fam.regime.window_lo)
        window = (lo, min(1.0, lo + rng.uniform(*fam.regime.window_span)))
    name = f"{label}_{k:03d}"
    uri = f"images/{lot}/{wafer}/{name}.{fmt}"
    mask_uri = f"masks/{lot}/{wafer}/{name}.png"
    ref_uri = f"reference/{lot}/{wafer}/{name}_ref.{fmt}"
    storage.write_bytes(storage.join(root, uri), encode(img, fmt, bits, window), storage_options)
    storage.write_bytes(storage.join(root, mask_uri), _png(mask), storage_options)
    storage.write_bytes(storage.join(root, ref_uri), encode(ref, fmt, bits, window), storage_options)
    row: dict[str, object] = {"uri": uri, "lot_id": lot, "wafer_id": wafer, "die_x": die % 8, "die_y": die // 8,
                              "label": label, "mask_uri": mask_uri, "reference_uri": ref_uri,
                              "banner": int(banner is not None)}
    if cfg.family != "classic":
        row["family"] = fam.name
    return row
