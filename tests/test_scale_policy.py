"""The scale policy: large frames' maps at a chosen fraction of native resolution through tiling, trained and
scored alike, recorded in the checkpoint and in run_id; support splits that keep a frame's tiles together."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

from semclip_batch.cli.commands import main
from semclip_batch.config import (
    SCALE_POLICY_OVERLAP,
    TILE_OVERLAP,
    ModelSpec,
    PreprocessConfig,
    parse_scale_policy,
    scale_policy_name,
    tile_overlap_for,
)
from semclip_batch.errors import ConfigError
from semclip_batch.fewshot.train import TrainConfig, train
from semclip_batch.fewshot.trainset import TrainSet, frame_views, load_trainset
from semclip_batch.io.manifest import read_manifest
from semclip_batch.io.preprocess import frame_tiles, model_inputs, normalize, resize
from semclip_batch.methods.checkpoint import load_checkpoint
from semclip_batch.methods.fitting import Support, frame_folds, support_split, validation_frames
from semclip_batch.methods.weights import preprocess_config

CLASSES = ("normal", "bridge", "copper_residue", "hole", "infilm", "particle", "scratch")


def _prep(policy: float | None, tile_above: int = 1024) -> PreprocessConfig:
    return PreprocessConfig(image_size=240, mean=(0.5,) * 3, std=(0.25,) * 3, tile_above=tile_above,
                            tile_overlap=tile_overlap_for(policy), scale_policy=policy)


def test_parse_scale_policy_names_and_refusals():
    assert parse_scale_policy("whole") is None
    assert parse_scale_policy("native") == 1.0
    assert parse_scale_policy("0.5") == 0.5
    for bad in ("0", "1.5", "-0.2", "half", ""):
        with pytest.raises(ConfigError, match="--scale-policy"):
            parse_scale_policy(bad)
    assert [scale_policy_name(p) for p in (None, 1.0, 0.5)] == ["whole", "native", "0.5"]
    with pytest.raises(ConfigError, match="--scale-policy"):
        ModelSpec(scale_policy=2.0)


def test_tile_side_follows_the_policy_and_never_exceeds_tile_above():
    assert _prep(None).tile_side == 1024
    assert _prep(1.0).tile_side == 240  # the model input covers 240 frame pixels at native resolution
    assert _prep(0.5).tile_side == 480
    # with a policy, --tile-above does not apply: train (which never caps) and run cut the same tiles
    assert _prep(0.2, tile_above=1024).tile_side == _prep(0.2, tile_above=10**9).tile_side == 1200
    assert frame_tiles(1100, 1100, _prep(0.2, tile_above=1024)) == []
    # whole policy: a 600 px frame is one view; native: 240 px tiles overlapping by >= 1/8 (3 x 3) + the whole view
    assert frame_tiles(600, 600, _prep(None)) == []
    tiles = frame_tiles(600, 600, _prep(1.0))
    assert len(tiles) == 9 and {t.height for t in tiles} == {240}
    assert max(t.y + t.height for t in tiles) == 600 and max(t.x + t.width for t in tiles) == 600
    assert model_inputs(np.random.default_rng(0).random((600, 600), np.float32), _prep(1.0)).shape == (10, 3, 240, 240)
    assert len(frame_tiles(1024, 1024, _prep(0.5))) == 9  # what the README's throughput figure pays for
    assert frame_tiles(240, 200, _prep(1.0)) == []  # frames the model input already covers stay whole


def test_policy_tiles_overlap_less_than_tile_above_tiles():
    """A policy's tiles overlap by at least 1/8 (the frame's slack spread evenly), --tile-above's by 1/4: a
    1024 px frame at native is 5 x 5 tiles overlapping by 44 px, not 25 %'s 6 x 6; the constructor run, train and
    eval share sets it from the policy, so the tiles trained on are the tiles scored."""
    assert preprocess_config("semclip-tiny", tile_above=1024, scale_policy=1.0).tile_overlap == SCALE_POLICY_OVERLAP
    assert preprocess_config("semclip-tiny", tile_above=1024).tile_overlap == TILE_OVERLAP == 0.25
    tiles = frame_tiles(1024, 1024, _prep(1.0))
    assert len(tiles) == 25 and {t.height for t in tiles} == {240}
    xs = sorted({t.x for t in tiles})
    assert xs == [0, 196, 392, 588, 784]  # seams of 240 - 196 = 44 px
    quarter = PreprocessConfig(image_size=240, mean=(0.5,) * 3, std=(0.25,) * 3, tile_overlap=0.25, scale_policy=1.0)
    assert len(frame_tiles(1024, 1024, quarter)) == 36  # what native cost before (README)
    # sizes whose slack already gave the overlap keep their tiles: 600 px 3 x 3, 768 px 4 x 4
    for side, count in ((600, 9), (768, 16)):
        assert len(frame_tiles(side, side, _prep(1.0))) == len(frame_tiles(side, side, quarter)) == count


def test_resizing_to_the_same_size_is_an_exact_copy():
    img = torch.rand(2, 1, 240, 240)
    same = resize(img, (240, 240))
    assert torch.equal(same, img) and same.data_ptr() != img.data_ptr()
    # what bilinear resampling at unit scale returns, antialiased or not: the shortcut changes no value
    for antialias in (False, True):
        assert torch.equal(same, F.interpolate(img, size=(240, 240), mode="bilinear", align_corners=False,
                                               antialias=antialias))
    smaller = resize(img, (120, 120))
    assert smaller.shape == (2, 1, 120, 120)


def test_tiles_as_support_views_take_their_own_labels():
    rng = np.random.default_rng(1)
    gray = rng.random((600, 600)).astype(np.float32)
    mask = np.zeros((600, 600), bool)
    mask[20:26, 30:36] = True  # a 6 px particle in the top-left corner: in the first tile only
    views = frame_views(gray, mask, None, _prep(1.0), normal=False)[1:]  # the tiles, after the whole view
    assert len(views) == 9
    assert [v.clean for v in views] == [False] + [True] * 8
    assert views[0].mask is not None and views[0].mask.max() == 1.0  # 6 px at native resolution fill pixels
    assert frame_views(gray, None, None, _prep(1.0), normal=False)[1:] == []  # a defect frame without mask: no tiles
    assert len(frame_views(gray, None, None, _prep(1.0), normal=True)[1:]) == 9  # a normal frame: all clean
    ref = gray + 0.1
    with_ref = frame_views(gray, mask, ref, _prep(1.0), normal=False)[1:]
    assert all(v.ref is not None and v.ref.shape == (240, 240) for v in with_ref)
    # train fits on exactly the views run scores
    fitted = torch.from_numpy(np.stack([v.view for v in frame_views(gray, mask, None, _prep(1.0), normal=False)]))
    np.testing.assert_allclose(normalize(fitted, _prep(1.0)).numpy(), model_inputs(gray, _prep(1.0)), atol=1e-6)


def _big_lot(tmp_path, n: int = 4):
    """n normal + n particle frames of 500 px (labels and masks), as a manifest."""
    rng = np.random.default_rng(3)
    rows = ["uri,lot_id,wafer_id,die_x,die_y,label,mask_uri"]
    for i in range(2 * n):
        img = (rng.random((500, 500)) * 60 + 80).astype(np.uint8)
        mask = np.zeros((500, 500), np.uint8)
        label = "normal" if i < n else "particle"
        if label == "particle":
            y, x = rng.integers(20, 480, size=2)
            img[y - 3:y + 3, x - 3:x + 3] = 250
            mask[y - 3:y + 3, x - 3:x + 3] = 255
        Image.fromarray(img).save(tmp_path / f"f{i}.png")
        Image.fromarray(mask).save(tmp_path / f"m{i}.png")
        rows.append(f"f{i}.png,L1,W1,{i},0,{label},m{i}.png")
    (tmp_path / "support.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "support.csv"


def test_trainset_under_a_policy_holds_every_tile_run_scores(tmp_path):
    manifest = _big_lot(tmp_path)
    prep = preprocess_config("semclip-tiny", tile_above=10**9, scale_policy=1.0)
    data = load_trainset(read_manifest(str(manifest)), CLASSES, prep)
    per_frame = 1 + len(frame_tiles(500, 500, prep))
    assert len(data) == 8 * per_frame
    assert data.frame is not None and data.frame.tolist() == [i for i in range(8) for _ in range(per_frame)]
    particle = data.labels[data.frame >= 4]
    # each particle frame: its whole view and the tiles holding the particle are "particle", the rest normal
    assert (particle == CLASSES.index("particle")).sum() >= 4 + 4
    assert (particle == 0).sum() >= 4 * (per_frame - 5)
    plain = load_trainset(read_manifest(str(manifest)), CLASSES, preprocess_config("semclip-tiny", tile_above=10**9))
    assert len(plain) == 8


def _support(frames: list[int], copies: int = 1) -> Support:
    n = len(frames)
    data = TrainSet(views=torch.zeros(n * copies, 4, 4), masks=torch.zeros(n * copies, 4, 4),
                    labels=torch.zeros(n * copies, dtype=torch.long), has_mask=torch.ones(n * copies, dtype=torch.bool),
                    captions=[""] * n * copies, classes=CLASSES, skipped=0, frame=torch.tensor(frames * copies))
    return Support(data=data, feats=None, clip=None, clip_name="", map_auroc=lambda *a: 0.0,  # type: ignore[arg-type]
                   copies=copies)


def test_splits_keep_a_frames_tiles_together():
    frames = [f for f in range(12) for _ in range(1 + f % 3)]  # 12 frames with 1-3 views each
    support = _support(frames, copies=2)
    groups = support.groups
    folds = frame_folds(support, 5, seed=0)
    assert sorted(torch.cat(folds).tolist()) == list(range(len(frames)))
    owner = {}
    for k, fold in enumerate(folds):
        for f in groups[fold].tolist():
            assert owner.setdefault(f, k) == k  # no frame in two folds
    fit, val = support_split(support)
    fit_frames = set(support.data.frame[fit].tolist())
    val_frames = set(support.data.frame[val].tolist())
    assert val_frames and not fit_frames & val_frames
    assert len(val) == sum(frames.count(f) for f in val_frames)  # first copy only
    assert len(fit) == 2 * sum(frames.count(f) for f in fit_frames)  # every copy
    # known before the fit (train --adapt-steps keeps them out of the backbone's adaptation)
    for seed in (0, 3):
        held = validation_frames(support.data.frame, seed)
        _, val = support_split(replace(support, seed=seed))
        assert sorted(held.tolist()) == sorted(set(support.data.frame[val].tolist()))


def test_splits_without_tiles_are_the_per_frame_splits_of_before():
    support = _support(list(range(20)))
    order = torch.randperm(20, generator=torch.Generator().manual_seed(0 + 7))
    fit, val = support_split(support)
    assert val.tolist() == order[:4].tolist() and fit.tolist() == order[4:].tolist()
    order = torch.randperm(20, generator=torch.Generator().manual_seed(3))
    assert [f.tolist() for f in frame_folds(support, 5, 3)] == [order[k::5].tolist() for k in range(5)]


@pytest.mark.timeout(600)
def test_train_records_the_policy_and_run_scores_with_it(tmp_path, ray_cluster):
    manifest = _big_lot(tmp_path, n=3)
    runner = CliRunner()
    ckpt = tmp_path / "ckpt"
    res = runner.invoke(main, ["train", "--adapt-steps", "0", str(manifest), "--out", str(ckpt), "--backbone", "semclip-tiny",
                               "--pretrained", "shipped", "--scale-policy", "native", "--epochs", "2"])
    assert res.exit_code == 0, res.output
    meta = load_checkpoint(str(ckpt)).meta
    assert meta.scale_policy == 1.0 and meta.training["used"] == 6 and meta.training["views"] == 6 * 10
    bad = runner.invoke(main, ["run", str(manifest), "--out", str(tmp_path / "o"), "--model", str(ckpt),
                               "--scale-policy", "whole"])
    assert bad.exit_code != 0 and "differs from the checkpoint's native" in bad.output
    assert "Traceback" not in bad.output
    ids = {}
    for name, args in (("policy", ["--model", str(ckpt)]),
                       ("zero-shot-whole", ["--backbone", "semclip-tiny", "--pretrained", "shipped"]),
                       ("zero-shot-native", ["--backbone", "semclip-tiny", "--pretrained", "shipped",
                                             "--scale-policy", "native"])):
        out = tmp_path / f"out-{name}"
        res = runner.invoke(main, ["run", str(manifest), "--out", str(out), *args])
        assert res.exit_code == 0, res.output
        record = json.loads(next((out / "runs").rglob("attempt-*.json")).read_text())
        ids[name] = record["run_id"]
        assert record["counts"] == {"ok": 6}
        assert record["preprocessing"].get("scale_policy") == (None if name == "zero-shot-whole" else 1.0)
        assert record["preprocessing"]["tile_overlap"] == (TILE_OVERLAP if name == "zero-shot-whole"
                                                           else SCALE_POLICY_OVERLAP)
    assert len(set(ids.values())) == 3  # the policy is part of run_id
    assert meta.preprocessing["tile_overlap"] == meta.tile_overlap == SCALE_POLICY_OVERLAP
    # train cuts the overlap a spec names, as run does (library callers; run passes a checkpoint's own)
    quarter = train(TrainConfig(support=str(manifest), out=str(tmp_path / "ckpt-quarter"), epochs=1,
                                model=ModelSpec(backbone="semclip-tiny", pretrained="shipped", scale_policy=1.0,
                                                tile_overlap=0.25)))
    assert quarter.preprocessing["tile_overlap"] == 0.25
    # a policy checkpoint trained before SCALE_POLICY_OVERLAP recorded 0.25: run cuts the tiles it trained on
    body = json.loads((ckpt / "checkpoint.json").read_text())
    body["preprocessing"]["tile_overlap"] = 0.25
    (ckpt / "checkpoint.json").write_text(json.dumps(body))
    out = tmp_path / "out-older"
    res = runner.invoke(main, ["run", str(manifest), "--out", str(out), "--model", str(ckpt)])
    assert res.exit_code == 0, res.output
    record = json.loads(next((out / "runs").rglob("attempt-*.json")).read_text())
    assert record["preprocessing"]["tile_overlap"] == 0.25 and record["run_id"] != ids["policy"]


def test_alpha_is_chosen_on_the_held_out_frames_whole_views():
    """alpha is fitted where run reads class scores: one whole-frame view per held-out frame, no tile."""
    from semclip_batch.methods.semclip_method import alpha_rows

    frames = [f for f in range(60) for _ in range(1 + f % 3)]  # 60 frames with 1-3 views each
    support = _support(frames, copies=2)
    _, val = support_split(support)
    rows = alpha_rows(support)
    assert len(rows) == 12 and set(support.data.frame[rows].tolist()) == set(support.data.frame[val].tolist())
    assert all(r == 0 or frames[r - 1] != frames[r] for r in rows.tolist())  # each frame's first view
