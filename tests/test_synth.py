"""The synthetic SEM generator's guarantees."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage

from semclip_batch.io.frames import load_frame
from semclip_batch.synth.generate import SynthConfig, make_site, synth
from semclip_batch.synth.render import banner_height


def digest_tree(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_byte_identical(tmp_path):
    cfg = SynthConfig(seed=5, lots=1, per_class=1)
    synth(str(tmp_path / "a"), cfg)
    synth(str(tmp_path / "b"), cfg)
    assert digest_tree(tmp_path / "a") == digest_tree(tmp_path / "b")
    synth(str(tmp_path / "c"), SynthConfig(seed=6, lots=1, per_class=1))
    assert digest_tree(tmp_path / "a") != digest_tree(tmp_path / "c")


def test_manifest_and_masks(synth_lot):
    m = pd.read_csv(synth_lot / "manifest.csv")
    assert set(m.columns) >= {"uri", "lot_id", "wafer_id", "label", "mask_uri", "reference_uri", "die_x", "die_y"}
    assert all("S11" in lot for lot in m["lot_id"])
    for row in m.itertuples():
        mask = np.asarray(Image.open(synth_lot / row.mask_uri)) > 0
        assert mask.any() == (row.label != "normal"), row.uri
        frame = load_frame(str(synth_lot / row.uri))
        assert frame.shape == mask.shape
        assert (synth_lot / row.reference_uri).exists()


def test_bit_depths_and_formats(synth_lot):
    m = pd.read_csv(synth_lot / "manifest.csv")
    assert {u.rsplit(".", 1)[1] for u in m["uri"]} == {"png", "tif"}
    depths = {np.asarray(Image.open(synth_lot / u)).dtype for u in m["uri"] if u.endswith(".png")}
    assert np.dtype(np.uint8) in depths and len(depths) == 2
    sixteen = [np.asarray(Image.open(synth_lot / u)) for u in m["uri"] if u.endswith(".png")]
    assert any(a.dtype == np.uint16 and a.max() >= 2048 for a in sixteen)  # >= 12 bits used


@pytest.mark.parametrize("seed", range(4))
def test_banner_never_overlaps_mask(seed):
    rng = np.random.default_rng(seed)
    for label in ("particle", "scratch", "copper_residue", "hole"):
        _, mask, _ = make_site(label, 256, 320, rng, banner="INFO")
        assert not mask[256 - banner_height(256):].any()
        assert mask.any()


def test_defect_shapes():
    rng = np.random.default_rng(3)
    # particle: round and bright
    img, mask, _ = make_site("particle", 256, 256, rng, None)
    _lab, n = ndimage.label(mask)
    ys, xs = np.nonzero(mask)
    assert n == 1 and abs(int(np.ptp(ys)) - int(np.ptp(xs))) <= 2
    assert img[mask].mean() > img[~mask].mean() + 0.2
    # scratch: elongated
    _, mask, _ = make_site("scratch", 256, 256, rng, None)
    ys, xs = np.nonzero(mask)
    cov = np.cov(np.stack([ys, xs]).astype(float))
    ev = np.linalg.eigvalsh(cov)
    assert ev[1] / max(ev[0], 1e-6) > 50
    # in-film: low contrast
    img, mask, _ref = make_site("infilm", 256, 256, rng, None)
    assert 0.0 < img[mask].mean() - img[~mask].mean() < 0.12


def test_bridge_joins_two_lines():
    from semclip_batch.synth.render import Layout, _bridge, pattern

    layout = Layout(kind="lines", pitch=20, width=9, phase=0)
    s = pattern(layout, 128, 128)
    mask = _bridge(s, layout, 64.0, 40.0, np.random.default_rng(0), 0.5)
    cols = np.nonzero(mask.any(axis=0))[0]
    row = s[64]
    assert row[cols.min() - 1] == 1.0 and row[cols.max() + 1] == 1.0  # a line on each side
    assert not row[cols].any()  # the bridge fills exactly the space between them
