"""The defect view: large frames' class scores also read a native-resolution crop at the anomaly map's maximum
(``io.preprocess.defect_view``, shipped by the decode stage, scored in the model actor)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest
import torch
from decoded_batch import decoded as decoded_frames
from decoded_batch import input_batch, write_frames

from semclip_batch.config import DEFAULT_SELF_SIMILARITY, ModelSpec, PreprocessConfig
from semclip_batch.fewshot.recipes import RECIPES, applied
from semclip_batch.io.preprocess import (
    DEFECT_VIEW_ABOVE,
    FRAME_LEVELS,
    decoded_views,
    defect_view,
    needs_defect_view,
    pack_frame,
    packed_views,
    resize,
    stretch,
)
from semclip_batch.io.schema import DECODED

CFG = PreprocessConfig(image_size=240, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), defect_view=True)


def test_only_frames_of_at_least_twice_the_model_input_and_at_most_16_mpx_get_one():
    side = DEFECT_VIEW_ABOVE * CFG.image_size
    assert needs_defect_view(side, 100, CFG) and needs_defect_view(100, side, CFG)
    assert not needs_defect_view(side - 1, side - 1, CFG)
    assert needs_defect_view(4096, 4096, CFG) and not needs_defect_view(4097, 4096, CFG)  # 16 MB at most
    assert not needs_defect_view(4096, 4096, replace(CFG, defect_view=False))


def test_decoded_views_ship_the_stretched_frame_in_uint8_next_to_the_same_views():
    rng = np.random.default_rng(0)
    gray = rng.random((600, 800), dtype=np.float32)
    views, frame = decoded_views(gray, CFG)
    assert np.array_equal(views, packed_views(gray, CFG))  # the model views are unchanged
    assert frame is not None and frame.dtype == np.uint8 and frame.shape == gray.shape
    assert np.abs(frame / FRAME_LEVELS - stretch(gray, 0.5, 99.5)).max() <= 0.5 / FRAME_LEVELS + 1e-6
    assert decoded_views(gray[:300, :300], CFG)[1] is None
    assert decoded_views(gray, replace(CFG, defect_view=False))[1] is None


@pytest.mark.parametrize(("peak", "corner"), [((300, 400), (180, 280)), ((5, 7), (0, 0)), ((599, 799), (360, 560))])
def test_the_window_is_native_centred_on_the_maximum_and_kept_inside(peak, corner):
    levels = np.random.default_rng(1).integers(0, 256, (600, 800), dtype=np.uint8)
    heat = torch.zeros(600, 800)
    heat[peak] = 1.0
    view = defect_view(torch.from_numpy(levels), heat, 240)
    y, x = corner
    assert view.shape == (240, 240) and view.dtype == torch.float32
    assert torch.equal(view, torch.from_numpy(levels[y:y + 240, x:x + 240]).float() / FRAME_LEVELS)


def test_a_frame_shorter_than_the_input_gives_a_square_of_its_short_side_resized():
    levels = np.tile(np.arange(900) % 256, (100, 1)).astype(np.uint8)  # each column its own level
    heat = torch.zeros(100, 900)
    heat[50, 450] = 1.0
    view = defect_view(torch.from_numpy(levels), heat, 240)
    expected = resize(torch.from_numpy(levels[:, 400:500]).float()[None, None] / FRAME_LEVELS, (240, 240))[0, 0]
    assert view.shape == (240, 240) and torch.allclose(view, expected)


@pytest.mark.parametrize("fill", [0.0, float("nan")])
def test_a_flat_or_broken_map_gives_the_frames_centre(fill):
    levels = np.random.default_rng(5).integers(0, 256, (600, 800), dtype=np.uint8)
    heat = torch.full((600, 800), fill)
    heat[0, 0] = 1.0 if fill != fill else 0.0  # NaN maps: one finite pixel does not rescue them
    view = defect_view(torch.from_numpy(levels), heat, 240)
    assert torch.equal(view, torch.from_numpy(levels[180:420, 280:520]).float() / FRAME_LEVELS)


def test_pack_frame_clips_and_rounds():
    assert pack_frame(np.array([[-0.1, 0.0, 0.5, 1.0, 1.2]], np.float32)).tolist() == [[0, 0, 128, 255, 255]]


def test_the_transfer_recipe_turns_it_on_and_the_paper_recipe_keeps_it_off():
    spec = ModelSpec(backbone="semclip-tiny")
    assert applied(RECIPES["transfer"], spec).defect_view
    assert not applied(RECIPES["paper"], spec).defect_view
    assert "defect_view" not in spec.output_affecting()  # run ids of runs without it stay as they were
    assert applied(RECIPES["transfer"], spec).output_affecting()["defect_view"] is True


def test_decode_stage_ships_frames_only_where_a_defect_view_is_taken(tmp_path):
    from semclip_batch.pipeline.reader import decode_batch

    urls = [*write_frames(tmp_path, ((640, 700), (256, 256)), seed=2), str(tmp_path / "none.tif")]  # a big, a small, none
    table: pa.Table = decode_batch(input_batch(urls), prep=CFG)
    assert table.schema == DECODED
    rows = table.to_pylist()
    assert [r["status"] for r in rows] == ["ok", "ok", "read_error"]
    assert len(rows[0]["frame_pixels"]) == 640 * 700 and rows[1]["frame_pixels"] == b"" == rows[2]["frame_pixels"]


@pytest.mark.parametrize(("precision", "atol"), [("fp32", 1e-5), ("bf16", 1e-3)])
def test_a_large_frames_class_scores_are_the_mean_of_its_whole_and_defect_views(tmp_path, precision, atol):
    """The model actor: the defect view is cut at the maximum of the frame's own map (the one stored as its
    mask) and scored by the same model; a small frame keeps its whole view's scores; the image score reads the
    whole view's p(normal), the one train calibrates the image threshold on."""
    from semclip_batch.io.preprocess import frame_tiles, maps_to_frame, normalize, unpack_views
    from semclip_batch.methods.decisions import anomaly_score
    from semclip_batch.methods.prompts import load_prompts, text_embeddings
    from semclip_batch.methods.scoring import build_model
    from semclip_batch.methods.weights import load_backbone, preprocess_config
    from semclip_batch.pipeline.inference import Predictor, PredictorSetup

    spec = ModelSpec(backbone="semclip-tiny", defect_view=True, precision=precision)
    prep = preprocess_config(spec.backbone, tile_above=1024, defect_view=True)
    backbone = load_backbone(spec.backbone, spec.pretrained, seed=spec.seed)
    text = text_embeddings(backbone, load_prompts())
    shapes = ((700, 1100), (256, 256))
    decoded = decoded_frames(tmp_path, prep, shapes)
    setup = PredictorSetup(spec=spec, prep=prep, text_embeddings=text, weights_sha256=backbone.sha256,
                           batch_size=4, threads=1, use_gpu=False)
    rows = Predictor(setup)(decoded).to_pylist()

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    scoring = build_model(spec, text, backbone=backbone).to(torch.device("cpu"), dtype)
    with torch.no_grad():
        for row, shape, packed, levels in zip(rows, shapes, decoded["pixels"], decoded["frame_pixels"], strict=True):
            views = unpack_views(torch.from_numpy(np.frombuffer(packed, np.uint16).reshape(-1, 240, 240).copy()))
            out = scoring(normalize(views, prep).to(dtype))
            whole = out.class_probs[0].float()
            frame_map = maps_to_frame(out.maps, *shape, frame_tiles(*shape, prep))
            expected = whole
            if levels:
                frame = torch.from_numpy(np.frombuffer(levels, np.uint8).reshape(shape).copy())
                crop = scoring(normalize(defect_view(frame, frame_map, 240)[None], prep).to(dtype)).class_probs[0]
                expected = 0.5 * (whole + crop.float())
                assert not torch.allclose(expected, whole, atol=1e-3)  # the view changes the scores
            assert np.allclose(row["class_scores"], expected.numpy(), atol=atol)
            assert row["anomaly_score"] == pytest.approx(anomaly_score(float(whole[0]), float(frame_map.max())),
                                                         abs=atol)


def test_zero_shot_run_takes_it_on_unless_told_and_a_checkpoint_run_follows_the_flag_if_given():
    from semclip_batch.cli.options import run_config

    base = dict(input="lot.csv", out="out", model=None, backbone="semclip-tiny", pretrained="shipped",
                pretrained_sha256=None, scale_policy=None, self_similarity=None, seed=0, prompts=None, precision="fp32",
                storage_option=(),
                threshold=None, pixel_threshold=None, min_region_px=None, batch_size=8, actors=1, num_gpus=0.0,
                shard_size=64, tile_above=1024, pattern=None, address=None, overwrite=False)
    assert run_config(**base, defect_view=None).model.defect_view is True
    assert run_config(**base, defect_view=False).model.defect_view is False
    for given in (None, True, False):  # None: the checkpoint's choice, resolved by the driver
        assert run_config(**{**base, "model": "ckpt"}, defect_view=given).model.defect_view is given


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_transfer_checkpoint_takes_it_and_no_defect_view_turns_it_off(tmp_path, ray_cluster):
    import json

    from click.testing import CliRunner
    from PIL import Image

    from semclip_batch.analysis.results import read_predictions
    from semclip_batch.cli import main
    from semclip_batch.methods.checkpoint import load_checkpoint

    rng = np.random.default_rng(4)
    rows = ["uri,lot_id,wafer_id,die_x,die_y,label,mask_uri"]
    for i in range(6):  # 520 px: at least twice the 240 px input
        img = (rng.random((520, 520)) * 60 + 80).astype(np.uint8)
        mask = np.zeros((520, 520), np.uint8)
        label = "normal" if i < 3 else "particle"
        if label == "particle":
            y, x = rng.integers(20, 500, size=2)
            img[y - 4:y + 4, x - 4:x + 4], mask[y - 4:y + 4, x - 4:x + 4] = 250, 255
        Image.fromarray(img).save(tmp_path / f"f{i}.png")
        Image.fromarray(mask).save(tmp_path / f"m{i}.png")
        rows.append(f"f{i}.png,L1,W1,{i},0,{label},m{i}.png")
    manifest = tmp_path / "lot.csv"
    manifest.write_text("\n".join(rows) + "\n")
    runner = CliRunner()
    ckpt = tmp_path / "ckpt"
    res = runner.invoke(main, ["train", "--adapt-steps", "0", str(manifest), "--out", str(ckpt), "--backbone", "semclip-tiny",
                               "--pretrained", "shipped", "--epochs", "2"])
    assert res.exit_code == 0, res.output
    meta = load_checkpoint(str(ckpt)).meta
    assert meta.defect_view  # the default recipe, transfer
    w, sw = meta.training["weights_choice"]["chosen"]  # the fit's weights, and the line that reports their evidence
    assert f"memory weight {w:g}, self-similarity {sw:g}" in res.output
    assert f"zero-shot pair (0, {DEFAULT_SELF_SIMILARITY:g})" in res.output
    assert sw == meta.self_similarity
    found = {}
    for name, flags in (("on", []), ("off", ["--no-defect-view"])):
        out = tmp_path / f"out-{name}"
        res = runner.invoke(main, ["run", str(manifest), "--out", str(out), "--model", str(ckpt), *flags])
        assert res.exit_code == 0, res.output
        record = json.loads(next((out / "runs").rglob("attempt-*.json")).read_text())
        assert record["counts"] == {"ok": 6}
        assert record["preprocessing"].get("defect_view", False) == (name == "on")
        table = read_predictions(str(out)).to_pandas().sort_values("image_id")
        found[name] = (record["run_id"], np.stack(table["class_scores"].to_list()), table["anomaly_score"].to_numpy())
    assert found["on"][0] != found["off"][0]
    assert (np.abs(found["on"][1] - found["off"][1]).max(axis=1) > 1e-4).all()  # every (520 px) frame's classes
    assert np.allclose(found["on"][2], found["off"][2])  # image scores read the whole view either way
