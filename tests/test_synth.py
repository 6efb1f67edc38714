"""The synthetic SEM generator's guarantees."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage

from semclip_batch.errors import ConfigError
from semclip_batch.io.frames import load_frame
from semclip_batch.synth.generate import SynthConfig, make_site, synth
from semclip_batch.synth.render import CLASSES, banner_height


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


# --- families -----------------------------------------------------------------------------------------------------

FAMILY_NAMES = ("logic", "contacts", "metal", "mixed")
# sha256 of `synth(out, SynthConfig(seed=3, lots=1, per_class=2))` (scheme of `classic_digest`), computed with the
# generator as it was before families existed: classic must keep writing exactly these bytes.
CLASSIC_DIGEST = "67e587c34b05af779d8c6f2f35175d5fe9bf20065e653401e7e126b517d7ff1c"


def classic_digest(root) -> str:
    """sha256 over every file written (path + bytes); the Parquet manifest by its table (its bytes also carry the
    pyarrow / pandas version)."""
    import pyarrow.parquet as pq

    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            data = p.read_bytes() if p.suffix != ".parquet" else pq.read_table(p).to_pandas().to_csv(index=False).encode()
            h.update(str(p.relative_to(root)).replace("\\", "/").encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()


def test_classic_family_byte_identical(tmp_path):
    synth(str(tmp_path / "a"), SynthConfig(seed=3, lots=1, per_class=2))
    assert classic_digest(tmp_path / "a") == CLASSIC_DIGEST
    synth(str(tmp_path / "b"), SynthConfig(seed=3, lots=1, per_class=2, family="classic",
                                           sizes=((256, 256), (240, 320), (300, 200)), bits=(8, 16), banner_frac=0.3))
    assert digest_tree(tmp_path / "a") == digest_tree(tmp_path / "b")
    assert "family" not in pd.read_csv(tmp_path / "a" / "manifest.csv").columns


def test_family_defaults_and_overrides():
    from semclip_batch.synth.families import FAMILIES

    classic = SynthConfig()
    assert (classic.frame_sizes, classic.bit_depths, classic.banner_share) == (
        ((256, 256), (240, 320), (300, 200)), (8, 16), 0.3)
    for name, fam in FAMILIES.items():
        cfg = SynthConfig(family=name)
        assert (cfg.frame_sizes, cfg.bit_depths, cfg.banner_share) == (fam.sizes, fam.bits, fam.banner_frac)
    cfg = SynthConfig(family="logic", sizes=((96, 128),), bits=(8,), banner_frac=0.0)
    assert (cfg.frame_sizes, cfg.bit_depths, cfg.banner_share) == (((96, 128),), (8,), 0.0)
    assert FAMILIES["contacts"].banner_frac == 0.0 and FAMILIES["metal"].banner_frac == 0.5
    for bad in ({"sizes": ((32, 256),)}, {"bits": (12,)}, {"banner_frac": 1.5}):
        with pytest.raises(ConfigError):
            SynthConfig(family="metal", **bad)


def test_unknown_family_is_one_line_config_error():
    from semclip_batch.synth.families import get_family

    for make in (lambda: SynthConfig(family="memory"), lambda: get_family("memory")):
        with pytest.raises(ConfigError) as info:
            make()
        msg = str(info.value)
        assert "\n" not in msg and "memory" in msg
        assert all(name in msg for name in ("classic", *FAMILY_NAMES))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_family_renders_every_class(family):
    from semclip_batch.synth.families import get_family

    h, w = min(get_family(family).sizes if family != "mixed" else ((320, 384),))
    for i, label in enumerate(CLASSES):
        for banner in (None, "SEM HV 1.0kV"):
            rng = np.random.default_rng([i, banner is None])
            img, mask, ref = make_site(label, h, w, rng, banner, family)
            assert img.shape == mask.shape == ref.shape == (h, w) and mask.dtype == bool
            assert 0.0 <= img.min() and img.max() <= 1.0 and img.std() > 0.02
            assert mask.any() == (label != "normal"), (family, label)
            if banner:
                assert not mask[h - banner_height(h):].any()
                assert (img[h - banner_height(h):] == ref[h - banner_height(h):]).all()  # the same info strip


def equivalent_diameters(family: str, label: str, n: int, size: tuple[int, int] = (320, 384)) -> np.ndarray:
    out = []
    for k in range(n):
        _, mask, _ = make_site(label, *size, np.random.default_rng([k, 77]), None, family)
        out.append(2 * np.sqrt(mask.sum() / np.pi))
    return np.array(out)


def test_defect_scales_follow_the_family():
    logic = equivalent_diameters("logic", "particle", 12)
    assert ((logic >= 3) & (logic <= 12)).all(), logic
    contacts, metal = equivalent_diameters("contacts", "particle", 8), equivalent_diameters("metal", "particle", 8)
    assert ((contacts >= 7) & (contacts <= 32)).all() and ((metal >= 18) & (metal <= 62)).all(), (contacts, metal)
    for label in ("hole", "copper_residue", "infilm", "bridge"):
        small, large = equivalent_diameters("logic", label, 6), equivalent_diameters("metal", label, 6)
        assert large.mean() > 3 * small.mean(), (label, small, large)
        assert small.max() <= 20, (label, small)


@pytest.mark.parametrize("family", ("logic", "contacts", "metal"))
def test_family_defects_keep_their_look(family):
    rng = np.random.default_rng(5)
    for _ in range(3):
        img, mask, _ = make_site("particle", 320, 384, rng, None, family)  # round and bright
        ring = ndimage.binary_dilation(mask, iterations=3) & ~ndimage.binary_dilation(mask)
        assert img[mask].mean() > img[ring].mean() + 0.1
        _, mask, _ = make_site("scratch", 320, 384, rng, None, family)  # long and thin
        ys, xs = np.nonzero(mask)
        ev = np.linalg.eigvalsh(np.cov(np.stack([ys, xs]).astype(float)))
        assert ev[1] / max(ev[0], 1e-6) > 25 and max(np.ptp(ys), np.ptp(xs)) >= 20
        img, mask, _ = make_site("infilm", 320, 384, rng, None, family)  # faint
        ring = ndimage.binary_dilation(mask, iterations=4) & ~ndimage.binary_dilation(mask, iterations=2)
        assert abs(img[mask].mean() - img[ring].mean()) < 0.2
    if family != "logic":  # holes big enough to tell the void from its rim
        img, mask, _ = make_site("hole", 320, 384, rng, None, family)
        void = ndimage.binary_erosion(mask, iterations=2)
        assert img[void].mean() < img[mask & ~void].mean() - 0.05


@pytest.mark.parametrize(("kind", "family"), [("routing", "logic"), ("holes", "contacts"), ("metal", "metal")])
def test_bridges_join_two_separate_conductors(kind, family):
    from semclip_batch.synth.defects import add_scaled_defect
    from semclip_batch.synth.families import get_family
    from semclip_batch.synth.layouts import draw, make_layout

    fam = get_family(family)
    for seed in range(6):
        rng = np.random.default_rng(seed)
        layout = make_layout(kind, rng, 384, 448, fam.pitch)
        before = draw(layout, 384, 448)
        after, _extra, mask = add_scaled_defect("bridge", before, layout, rng, 340, fam.defect_px)
        assert mask.any() and not mask[340:].any()
        assert (before[mask] < 0.5).all() and (after[mask] == 1.0).all()  # fills background only
        labels, _ = ndimage.label(before > 0.5)
        touched = set(np.unique(labels[ndimage.binary_dilation(mask) & ~mask]).tolist()) - {0}
        assert len(touched) == 2, (kind, seed, touched)  # exactly two conductors, not connected before
        assert ndimage.label(ndimage.binary_dilation(mask) & (before > 0.5) | mask)[1] == 1
        if kind == "routing":
            assert max(np.ptp(np.nonzero(mask)[0]), np.ptp(np.nonzero(mask)[1])) <= layout.pitch  # short


def test_routing_has_corners_tjunctions_and_vias():
    from semclip_batch.synth.families import get_family
    from semclip_batch.synth.layouts import VIA, draw, make_layout

    layout = make_layout("routing", np.random.default_rng(1), 512, 512, get_family("logic").pitch)
    s = draw(layout, 512, 512)
    conductor = s > 0.5
    assert 0.25 < conductor.mean() < 0.65 and (s == VIA).any()
    labels, n = ndimage.label(conductor)
    assert n > 40  # many separate nets, so many line ends
    # corners / T-junctions: nets bent into L, T or Z shapes (spanning 2+ pitches both ways, far from a box)
    bent = [sl for sl in ndimage.find_objects(labels)
            if min(sl[0].stop - sl[0].start, sl[1].stop - sl[1].start) > 2 * layout.pitch
            and conductor[sl].mean() < 0.6]
    assert len(bent) >= 5


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_family_deterministic(tmp_path, family):
    cfg = SynthConfig(seed=4, lots=1, per_class=1, family=family, sizes=((160, 192),))
    synth(str(tmp_path / "a"), cfg)
    synth(str(tmp_path / "b"), cfg)
    assert digest_tree(tmp_path / "a") == digest_tree(tmp_path / "b")
    synth(str(tmp_path / "c"), SynthConfig(seed=5, lots=1, per_class=1, family=family, sizes=((160, 192),)))
    assert digest_tree(tmp_path / "a") != digest_tree(tmp_path / "c")


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_family_frames_sizes_and_window(tmp_path, family):
    from semclip_batch.synth.families import get_family

    fam = get_family(family)
    m = synth(str(tmp_path), SynthConfig(seed=2, lots=1, per_class=1, family=family, formats=("tif",)))
    assert len(m) == 7 and set(m["label"]) == set(CLASSES)
    for n, row in enumerate(m.itertuples()):
        frame = load_frame(str(tmp_path / row.uri))
        mask = np.asarray(Image.open(tmp_path / row.mask_uri)) > 0
        assert frame.shape == mask.shape == fam.sizes[n % len(fam.sizes)]
        assert mask.any() == (row.label != "normal")
        if row.banner:
            assert not mask[frame.shape[0] - banner_height(frame.shape[0]):].any()
    if family == "mixed":
        assert set(m["family"]) <= set(fam.members) and m["family"].nunique() > 1
    else:
        assert set(m["family"]) == {family}
    if family == "logic":  # 16-bit only: the signal sits in a window of the 12-bit range, with an offset
        import tifffile

        for uri in m["uri"]:
            a = tifffile.imread(tmp_path / uri)
            assert a.dtype == np.uint16 and a.min() >= 0.07 * 4095 and a.max() <= 0.92 * 4095
            assert np.ptp(a) >= 0.25 * 4095


def test_cli_synth_family(tmp_path):
    import click
    from click.testing import CliRunner

    from semclip_batch.cli.commands import synth as synth_cmd
    from semclip_batch.synth.families import FAMILIES

    family = next(p for p in synth_cmd.params if p.name == "family")
    assert isinstance(family.type, click.Choice)
    assert list(family.type.choices) == list(FAMILIES)  # every registered family, nothing else
    runner = CliRunner()
    res = runner.invoke(synth_cmd, [str(tmp_path / "d"), "--family", "logic", "--lots", "1", "--per-class", "1",
                                    "--formats", "tif", "--seed", "1"])
    assert res.exit_code == 0, res.output
    m = pd.read_csv(tmp_path / "d" / "manifest.csv")
    assert len(m) == 7 and set(m["family"]) == {"logic"}
    shapes = {load_frame(str(tmp_path / "d" / u)).shape for u in m["uri"]}
    assert shapes <= set(FAMILIES["logic"].sizes) and len(shapes) == 4  # the family's default sizes
    res = runner.invoke(synth_cmd, [str(tmp_path / "c"), "--seed", "3", "--lots", "1", "--per-class", "2"])
    assert res.exit_code == 0 and classic_digest(tmp_path / "c") == CLASSIC_DIGEST  # the CLI's defaults: classic
    res = runner.invoke(synth_cmd, [str(tmp_path / "e"), "--family", "dram"])
    assert res.exit_code == 2 and "dram" in res.output
    res = runner.invoke(synth_cmd, [str(tmp_path / "e"), "--family", "metal", "--bits", "12"])
    assert res.exit_code == 1 and res.output.strip().count("\n") == 0 and "--bits" in res.output


def test_defect_px_sets_the_defect_scale_of_a_family(tmp_path):
    """``synth --defect-px``: contact arrays with logic-sized particles (a small-defect validation family); one
    line and exit 1 for classic (its own sizes) or a malformed range."""
    from click.testing import CliRunner

    from semclip_batch.cli.commands import synth as synth_cmd

    runner = CliRunner()
    res = runner.invoke(synth_cmd, [str(tmp_path / "s"), "--family", "contacts", "--lots", "1", "--per-class", "4",
                                    "--sizes", "512x512", "--defect-px", "3-6", "--seed", "2"])
    assert res.exit_code == 0, res.output
    m = pd.read_csv(tmp_path / "s" / "manifest.csv")
    sizes = []
    for uri in m.loc[m["label"] == "particle", "mask_uri"]:
        mask = np.asarray(Image.open(tmp_path / "s" / uri)) > 0
        sizes.append(2 * np.sqrt(mask.sum() / np.pi))
    assert len(sizes) == 4 and max(sizes) <= 7, sizes  # contacts' own are drawn at 8-30 px
    for args, flag in ((["--defect-px", "3-10"], "--defect-px"), (["--family", "logic", "--defect-px", "ten"], "ten"),
                       (["--family", "logic", "--defect-px", "9-3"], "9-3"),
                       (["--family", "metal", "--defect-px", "2-inf"], "2-inf")):
        res = runner.invoke(synth_cmd, [str(tmp_path / "e"), *args])
        assert res.exit_code == 1 and res.output.strip().count("\n") == 0 and flag in res.output, res.output
    res = runner.invoke(synth_cmd, [str(tmp_path / "m"), "--family", "mixed", "--lots", "1", "--per-class", "6",
                                    "--sizes", "512x512", "--defect-px", "3-5", "--seed", "4"])
    assert res.exit_code == 0, res.output
    m = pd.read_csv(tmp_path / "m" / "manifest.csv")
    particles = m[m["label"] == "particle"]
    assert particles["family"].nunique() >= 2  # members drawn, each at the range (metal's own: 20-60 px)
    for uri in particles["mask_uri"]:
        assert 2 * np.sqrt((np.asarray(Image.open(tmp_path / "m" / uri)) > 0).sum() / np.pi) <= 7
