"""The defect classes from the region's attributes (``methods/region_attributes.py``, ``model/region_classes.py``,
``fewshot/region_fit.py``; docs/quality.md rule 22): the region at the map's maximum and its attributes, the
regression fitted on them, ``train``'s held-out check, the checkpoint's tensors, and ``run`` giving out the defect
classes' share of the scores with it."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from decoded_batch import decoded as decoded_frames

from semclip_batch.fewshot import region_fit
from semclip_batch.methods.decisions import with_region_classes
from semclip_batch.methods.region_attributes import N_ATTRIBUTES, attributes, frame_attributes, region_at_max
from semclip_batch.model.region_classes import REGION_CLASSES, RegionClasses


def test_the_region_is_the_component_holding_the_maximum():
    amap = np.zeros((40, 40), np.uint8)
    amap[5:9, 5:9] = 200  # above the share, but apart from the maximum
    amap[20:30, 20:23] = 220
    amap[25, 21] = 250
    region = region_at_max(amap, 0.8)
    assert region[25, 21] and region[20:30, 20:23].all()
    assert not region[5:9, 5:9].any()
    assert region.sum() == 30


def test_a_flat_map_gives_one_pixel():
    region = region_at_max(np.zeros((8, 8), np.uint8))
    assert region.sum() == 1 and region[0, 0]


def _frame_with(shape: str, level: float) -> tuple[np.ndarray, np.ndarray]:
    levels = np.full((64, 64), 0.5)
    region = np.zeros((64, 64), bool)
    if shape == "line":
        region[30:32, 8:56] = True
    else:
        yy, xx = np.mgrid[:64, :64]
        region = (yy - 32) ** 2 + (xx - 32) ** 2 <= 16
    levels[region] = level
    return levels, region


def test_attributes_tell_shape_and_contrast_apart():
    line = attributes(*_frame_with("line", 0.9))
    bright = attributes(*_frame_with("disc", 0.9))
    dark = attributes(*_frame_with("disc", 0.1))
    assert line.shape == (N_ATTRIBUTES,)
    assert line[1] > bright[1] + 3  # log elongation: a 2 x 48 line against a disc
    assert bright[2] == pytest.approx(0.4) and dark[2] == pytest.approx(-0.4)  # mean contrast to the ring
    assert bright[0] == pytest.approx(np.log(49))  # log area of the radius-4 disc
    assert np.isfinite(line).all()


def test_the_ring_taken_in_the_regions_box_is_the_ring_on_the_whole_frame():
    from scipy import ndimage

    rng = np.random.default_rng(0)
    for _ in range(100):
        h, w = (int(v) for v in rng.integers(5, 60, 2))
        mask = ndimage.uniform_filter((rng.random((h, w)) * 255).astype(np.uint8), 3)
        levels = rng.random((h, w))
        region = region_at_max(mask, float(rng.uniform(0.5, 1.0)))
        ring = ndimage.binary_dilation(region, structure=np.ones((3, 3), bool), iterations=4) & ~region
        got = attributes(levels, region)
        base = levels[ring].mean() if ring.any() else levels.mean()
        assert got[2] == pytest.approx(levels[region].mean() - base)
        assert got[7] == pytest.approx(levels[ring].std() if ring.any() else levels.std())


def test_a_frame_all_region_and_a_one_pixel_region_give_finite_attributes():
    levels = (np.random.default_rng(0).random((20, 20)) * 255).astype(np.uint8)
    assert np.isfinite(frame_attributes(levels, np.full((20, 20), 200, np.uint8))).all()  # no ring: the frame
    assert np.isfinite(frame_attributes(levels, np.zeros((20, 20), np.uint8))).all()  # one pixel


def test_the_blend_gives_out_the_defect_share_and_keeps_normal():
    scores = np.array([0.4, 0.3, 0.2, 0.1], np.float32)
    probs = np.array([0.0, 0.0, 1.0])
    out = with_region_classes(scores, probs, 0.5)
    assert out.dtype == np.float32 and out[0] == pytest.approx(0.4) and out.sum() == pytest.approx(1.0)
    assert out[1:] == pytest.approx([0.15, 0.1, 0.05 + 0.3])
    assert with_region_classes(scores, probs, 0.0) == pytest.approx(scores)
    assert with_region_classes(scores, probs, 1.0)[1:] == pytest.approx([0.0, 0.0, 0.6])
    assert np.array_equal(with_region_classes(scores, probs, 0.5, np.ones(3, bool)), out)  # all seen: the same


def test_a_class_the_regression_never_saw_keeps_its_score():
    scores = np.array([0.1, 0.3, 0.2, 0.4])
    probs = np.array([0.5, 0.5, 0.0])  # the third defect class: no support frame, probability ~0
    out = with_region_classes(scores, probs, 0.5, np.array([True, True, False]))
    assert out[0] == 0.1 and out[3] == 0.4  # normal and the unseen class untouched, not halved
    assert out[1:3] == pytest.approx([0.5 * 0.3 + 0.5 * 0.5 * 0.5, 0.5 * 0.2 + 0.5 * 0.5 * 0.5])
    assert out.sum() == pytest.approx(1.0)


def _clusters(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    centres = np.zeros((3, N_ATTRIBUTES))
    centres[0, 0], centres[1, 1], centres[2, 2] = 3.0, 3.0, 3.0
    return centres[labels] + rng.normal(0, 0.5, (n, N_ATTRIBUTES)), labels


def test_the_regression_classifies_points_it_did_not_see_and_a_class_never_seen_stays_finite():
    x, y = _clusters(300, 0)
    model = region_fit.fit_logistic(x[:200], y[:200], 4)  # class 3: no frame
    probs = model.probs(torch.from_numpy(x[200:])).numpy()
    assert probs.shape == (100, 4) and np.allclose(probs.sum(axis=1), 1.0)
    assert np.mean(probs.argmax(axis=1) == y[200:]) > 0.95
    assert probs[:, 3].max() < 0.01 and model.valid()
    assert model.seen().tolist() == [True, True, True, False]
    assert float(model.share) == 0.8 and float(model.blend) == 0.5


def test_one_frame_or_a_constant_attribute_fits_without_nan():
    x = np.ones((1, N_ATTRIBUTES))
    one = region_fit.fit_logistic(x, np.array([1]), 3)
    assert all(bool(torch.isfinite(t).all()) for t in (one.weight, one.bias))
    assert not one.valid()  # one class seen: nothing to tell apart
    x, y = _clusters(30, 1)
    x[:, 4] = 0.25  # the same on every frame: spread 0
    assert region_fit.fit_logistic(x, y, 3).valid()


def _items(x: np.ndarray, y: np.ndarray, model_right: bool) -> list[region_fit.RegionItem]:
    """Support defect frames whose attributes are ``x``; the model's whole-view probabilities name their class where
    ``model_right``, else the next one."""
    items = []
    for k, (a, label) in enumerate(zip(x, y, strict=True)):
        probs = np.full(4, 0.1)
        probs[1 + (label if model_right else (label + 1) % 3)] = 0.7
        items.append(region_fit.RegionItem(k, int(label), a, probs))
    return items


def test_the_held_out_check_keeps_attributes_that_name_more_and_drops_them_where_fewer():
    x, y = _clusters(60, 2)
    held = set(range(45, 60))
    kept = region_fit.check_on_held_out(_items(x, y, model_right=False), held, 3)
    assert kept["kept"] and kept["held_out"] == 15 and kept["fitted_on"] == 45
    assert kept["model_right"] == 0 and kept["blend_right"] == 15
    rng = np.random.default_rng(3)  # attributes that say nothing, a model that is always right
    noise = region_fit.check_on_held_out(_items(rng.normal(size=x.shape), y, model_right=True), held, 3)
    assert noise["model_right"] == 15 and noise["blend_right"] <= 15
    assert noise["kept"] == (noise["blend_right"] == 15)


def test_the_held_out_check_needs_held_out_defects_and_two_classes():
    x, y = _clusters(20, 4)
    assert region_fit.check_on_held_out(_items(x, y, True), set(), 3)["note"].startswith("no held-out")
    one = region_fit.check_on_held_out(_items(x, np.zeros(20, int), True), {0, 1}, 3)
    assert not one["kept"] and "fewer than two defect classes" in one["note"]


def test_train_prints_the_check():
    record = {"held_out": 12, "model_right": 3, "blend_right": 6, "kept": True, "frames": 60, "blend": 0.5}
    line, = region_fit.region_classes_lines({"region_classes": record})
    assert "kept (blend 0.5, fitted on 60 frames)" in line and "model names 3 right" in line and "attributes 6" in line
    line, = region_fit.region_classes_lines({"region_classes": {"kept": False, "note": "one defect class"}})
    assert line.endswith("not kept (one defect class)")
    line, = region_fit.region_classes_lines({"region_classes": {**record, "kept": False}})
    assert "not kept (the blend names fewer right)" in line
    assert region_fit.region_classes_lines({}) == []


def _regions(n_classes: int = 6) -> RegionClasses:
    x, y = _clusters(60, 5)
    return region_fit.fit_logistic(x, y, n_classes)


def test_a_checkpoints_regression_is_loaded_and_a_missing_or_broken_one_is_refused(tiny_clip):
    from semclip_batch.config import ModelSpec
    from semclip_batch.errors import WeightsError
    from semclip_batch.methods.checkpoint import BACKBONE_PREFIXES
    from semclip_batch.methods.registry import new_model
    from semclip_batch.methods.scoring import build_model

    text = torch.randn(7, 64)
    spec = ModelSpec(backbone="semclip-tiny", region_classes=True, checkpoint="ckpt")
    own = {k: v for k, v in new_model(spec, tiny_clip.clip, text).state_dict().items()
           if not k.startswith(BACKBONE_PREFIXES)}
    regions = _regions()
    stored = {**own, **{f"{REGION_CLASSES}.{k}": v for k, v in regions.state_dict().items()}}
    scoring = build_model(spec, text.numpy(), backbone=tiny_clip, tensors=stored)
    assert scoring.regions is not None and torch.equal(scoring.regions.weight, regions.weight)
    with pytest.raises(WeightsError, match=r"region_classes: Error"):
        build_model(spec, text.numpy(), backbone=tiny_clip, tensors=own)
    nan = {**stored, f"{REGION_CLASSES}.weight": torch.full_like(regions.weight, float("nan"))}
    with pytest.raises(WeightsError, match="region_classes: tensors not finite"):
        build_model(spec, text.numpy(), backbone=tiny_clip, tensors=nan)
    fewer = {**stored, f"{REGION_CLASSES}.bias": torch.zeros(5, dtype=torch.float64)}  # classes of another model
    with pytest.raises(WeightsError, match="region_classes: Error"):
        build_model(spec, text.numpy(), backbone=tiny_clip, tensors=fewer)
    assert build_model(replace(spec, region_classes=False), text.numpy(), backbone=tiny_clip,
                       tensors=stored).regions is None  # the tensors alone do nothing


def test_a_checkpoint_with_it_is_version_6_and_read_back(tmp_path):
    import json

    from semclip_batch.methods.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint

    body = json.loads((_a_checkpoint(tmp_path) / "checkpoint.json").read_text())
    meta = CheckpointMeta.from_json(body, "x")
    stored = save_checkpoint(str(tmp_path / "v6"), load_checkpoint(str(_a_checkpoint(tmp_path))).tensors,
                             replace(meta, region_classes=True))
    written = json.loads((tmp_path / "v6" / "checkpoint.json").read_text())
    assert stored.version == written["version"] == 6 and written["region_classes"] is True
    assert load_checkpoint(str(tmp_path / "v6")).meta.region_classes
    from semclip_batch.errors import WeightsError

    with pytest.raises(WeightsError, match="checkpoint version 7 is not one this release reads"):
        CheckpointMeta.from_json({**written, "version": 7}, "x")


def _a_checkpoint(tmp_path):
    """The smallest real checkpoint: ``train --recipe paper`` on a few synthetic frames (cached per test)."""
    ckpt = tmp_path / "paper"
    if ckpt.exists():
        return ckpt
    from click.testing import CliRunner

    from semclip_batch.cli import main

    runner = CliRunner()
    lot = tmp_path / "lot"
    assert runner.invoke(main, ["synth", str(lot), "--lots", "1", "--per-class", "2", "--seed", "3"]).exit_code == 0
    res = runner.invoke(main, ["train", str(lot / "manifest.csv"), "--out", str(ckpt), "--backbone", "semclip-tiny",
                               "--pretrained", "shipped", "--recipe", "paper", "--epochs", "1"])
    assert res.exit_code == 0, res.output
    return ckpt


def test_specs_without_it_keep_their_run_ids():
    from semclip_batch.config import ModelSpec

    assert "region_classes" not in ModelSpec().output_affecting()
    assert ModelSpec(region_classes=True).output_affecting()["region_classes"] is True


def test_run_gives_out_the_defect_share_from_the_region_at_the_stored_masks_maximum(tmp_path, monkeypatch, tiny_clip):
    """The model actor: a frame's levels are shipped, its stored mask is the map's, and its class scores are the
    model's with the defect classes' share given out by the regression read on the region at that mask's maximum."""
    from semclip_batch.config import ModelSpec
    from semclip_batch.io.preprocess import unpack_frame
    from semclip_batch.methods import scoring as scoring_module
    from semclip_batch.methods.prompts import load_prompts, text_embeddings
    from semclip_batch.methods.weights import preprocess_config
    from semclip_batch.pipeline import inference

    regions = _regions()
    spec = ModelSpec(backbone="semclip-tiny", region_classes=True)
    prep = preprocess_config(spec.backbone, tile_above=1024, frame_levels=True)
    text = text_embeddings(tiny_clip, load_prompts())

    def built(spec, text, sha=None, with_regions=True):
        scoring = scoring_module.build_model(replace(spec, region_classes=False), text, backbone=tiny_clip)
        scoring.regions = regions if with_regions else None
        return scoring

    monkeypatch.setattr(inference, "build_model", built)
    shapes = ((300, 260), (256, 256))
    decoded = decoded_frames(tmp_path, prep, shapes)
    setup = inference.PredictorSetup(spec=spec, prep=prep, text_embeddings=text, weights_sha256=tiny_clip.sha256,
                                     batch_size=4, threads=1, use_gpu=False)
    rows = inference.Predictor(setup)(decoded).to_pylist()
    monkeypatch.setattr(inference, "build_model", lambda *a, **k: built(*a, **k, with_regions=False))
    plain = inference.Predictor(setup)(decoded).to_pylist()
    for row, alone, (h, w), shipped in zip(rows, plain, shapes, decoded["frame_pixels"], strict=True):
        assert row["status"] == alone["status"] == "ok" and row["mask"] == alone["mask"]
        assert row["anomaly_score"] == alone["anomaly_score"]
        mask = np.frombuffer(row["mask"], np.uint8).reshape(h, w)
        levels = unpack_frame(shipped, h, w).numpy()
        probs = regions.probs(torch.from_numpy(frame_attributes(levels, mask)[None])).numpy()[0]
        seen = regions.seen().numpy()  # fitted on 3 of the 6 defect classes: the other 3 keep their scores
        expected = with_region_classes(np.asarray(alone["class_scores"], np.float32), probs, 0.5, seen)
        assert np.allclose(row["class_scores"], expected, atol=1e-6)
        assert np.allclose(np.asarray(row["class_scores"])[1:][~seen], np.asarray(alone["class_scores"])[1:][~seen])
        assert row["class_scores"][0] == pytest.approx(alone["class_scores"][0])
        assert not np.allclose(row["class_scores"], alone["class_scores"])
