"""Cell-to-cell references (``train --self-reference``): the period of a repeating pattern, a reference without
the defect, none for frames that do not repeat, and the flag carried from ``train`` to ``run``'s decode stage.

The frames here are drawn by this file (sinusoidal and square line gratings at non-integer pitches, a contact
array, blurred noise), not by ``semclip_batch.synth``."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from decoded_batch import input_batch
from PIL import Image
from scipy import ndimage

from semclip_batch.config import ModelSpec
from semclip_batch.errors import ConfigError
from semclip_batch.fewshot.recipes import RECIPES, applied, with_self_reference
from semclip_batch.fewshot.train import TrainConfig, train
from semclip_batch.io.cell_reference import cell_difference, cell_reference, frame_period
from semclip_batch.io.preprocess import unpack_views
from semclip_batch.io.schema import DECODED
from semclip_batch.methods.weights import preprocess_config
from semclip_batch.pipeline.reader import decode_batch


def grating(shape: tuple[int, int], pitch: float, axis: int, seed: int = 0, noise: float = 2.0) -> np.ndarray:
    """Lines of width ~pitch/2 across ``axis`` (1: vertical lines repeating along x), anti-aliased, with noise."""
    rng = np.random.default_rng(seed)
    coord = np.arange(shape[axis], dtype=np.float64)
    profile = 100.0 + 80.0 * np.clip(3.0 * np.sin(2 * np.pi * coord / pitch), -1.0, 1.0)
    img = np.broadcast_to(profile[None, :] if axis == 1 else profile[:, None], shape).astype(np.float32)
    return img + rng.normal(0, noise, shape).astype(np.float32)


def contacts(shape: tuple[int, int], pitch: tuple[float, float], seed: int = 0) -> np.ndarray:
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float64)
    holes = (np.cos(2 * np.pi * yy / pitch[0]) + np.cos(2 * np.pi * xx / pitch[1])) > 1.0
    img = np.where(holes, 40.0, 150.0) + np.random.default_rng(seed).normal(0, 3, shape)
    return ndimage.gaussian_filter(img, 1.0).astype(np.float32)


def particle(img: np.ndarray, at: tuple[int, int], radius: float = 2.5, level: float = 255.0) -> np.ndarray:
    yy, xx = np.mgrid[0:img.shape[0], 0:img.shape[1]]
    disk = (yy - at[0]) ** 2 + (xx - at[1]) ** 2 <= radius ** 2
    out = img.copy()
    out[disk] = level
    return out


@pytest.mark.parametrize(("pitch", "axis", "shape"), [(11.3, 1, (300, 420)), (17.6, 0, (512, 256)),
                                                      (7.25, 1, (128, 160))])
def test_period_of_a_grating_to_a_fraction_of_a_pixel(pitch, axis, shape):
    period = frame_period(grating(shape, pitch, axis))
    assert period is not None and period.axis == axis
    assert period.pixels == pytest.approx(pitch, abs=0.15)
    assert period.strength > 0.8


@pytest.mark.parametrize("at", [(150, 200), (5, 6), (290, 414)])  # inside, and at two corners
def test_the_difference_peaks_at_a_small_particle_and_stays_flat_elsewhere(at):
    clean = grating((300, 420), 11.3, 1, seed=1)
    frame = particle(clean, at)
    diff = cell_difference(frame)
    assert diff is not None
    peak = np.unravel_index(int(np.argmax(diff)), diff.shape)
    assert np.hypot(peak[0] - at[0], peak[1] - at[1]) <= 3
    # away from the particle, borders included, the frame matches its reference to the noise level
    far = np.hypot(*np.mgrid[0:300, 0:420] - np.array(at)[:, None, None]) > 30
    assert float(diff[far].max()) < 0.25 * float(diff.max())
    ref = cell_reference(frame)
    assert ref is not None and ref.shape == frame.shape and ref.dtype == np.float32
    assert abs(float(ref[at]) - float(clean[at])) < 25  # the particle is not in its reference


def test_a_contact_array_repeats_and_a_missing_contact_stands_out():
    frame = contacts((400, 400), (16.4, 21.7))
    period = frame_period(frame)
    assert period is not None
    assert period.pixels == pytest.approx(16.4 if period.axis == 0 else 21.7, abs=0.25)
    # a missing contact: fill one hole with the surrounding level
    yy, xx = np.mgrid[0:400, 0:400]
    hole = np.hypot(yy - 16.4 * 12, xx - 21.7 * 9) < 6
    diff = cell_difference(np.where(hole, 150.0, frame).astype(np.float32))
    assert diff is not None
    peak = np.unravel_index(int(np.argmax(diff)), diff.shape)
    assert np.hypot(peak[0] - 16.4 * 12, peak[1] - 21.7 * 9) <= 8


@pytest.mark.parametrize("kind", ["noise", "blobs", "flat", "tiny"])
def test_frames_that_do_not_repeat_get_no_cell_reference(kind):
    rng = np.random.default_rng(3)
    frame = {"noise": rng.normal(100, 10, (256, 256)),
             "blobs": ndimage.gaussian_filter(rng.normal(100, 40, (300, 300)), 6),
             "flat": np.full((128, 128), 7.0),
             "tiny": rng.normal(0, 1, (16, 20))}[kind].astype(np.float32)
    assert frame_period(frame) is None
    assert cell_reference(frame) is None and cell_difference(frame) is None


def test_cell_references_alone_bring_the_reference_scorer_and_a_new_run_id():
    cell = ModelSpec(self_reference=True)
    assert cell.reference_scorer and not cell.use_reference
    assert cell.output_affecting()["self_reference"] is True
    assert "self_reference" not in ModelSpec(use_reference=True).output_affecting()  # old run ids unchanged
    assert not ModelSpec().reference_scorer


def _lot(tmp_path, n: int = 4):
    """Gratings without reference frames; half of them with a particle (and its mask)."""
    rows = ["uri,lot_id,wafer_id,die_x,die_y,label,mask_uri,reference_uri"]
    for i in range(2 * n):
        img = grating((160, 200), 9.4 + 0.3 * i, 1, seed=i)
        mask = np.zeros(img.shape, np.uint8)
        label = "normal" if i < n else "particle"
        if label == "particle":
            img = particle(img, (40 + 10 * i, 60 + 7 * i), radius=3)
            mask = (particle(np.zeros(img.shape, np.float32), (40 + 10 * i, 60 + 7 * i), 3, 1.0) > 0)
            mask = mask.astype(np.uint8) * 255
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(tmp_path / f"f{i}.png")
        Image.fromarray(mask).save(tmp_path / f"m{i}.png")
        rows.append(f"f{i}.png,L1,W1,{i},0,{label},m{i}.png,")
    (tmp_path / "s.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "s.csv"


def test_train_fits_the_reference_on_cell_references_and_records_it(tmp_path):
    manifest = _lot(tmp_path)
    spec = ModelSpec(backbone="semclip-tiny", pretrained="shipped", cls="fused")
    cell = replace(spec, self_reference=True)
    meta = train(TrainConfig(support=str(manifest), out=str(tmp_path / "ck"), model=spec, epochs=1))
    assert meta.recipe == "transfer" and meta.self_reference and not meta.use_reference  # the recipe's default
    assert meta.training["with_reference"] == 8  # every frame repeats: every one took its cell reference
    assert meta.training["reference_pixel_scale"] > 0
    body = json.loads((tmp_path / "ck" / "checkpoint.json").read_text())
    assert body["self_reference"] is True
    # --no-self-reference: the recipe without them, and paper: none
    off = with_self_reference(RECIPES["transfer"], False)
    assert not train(TrainConfig(support=str(manifest), out=str(tmp_path / "ck2"), model=spec, epochs=1,
                                 recipe=off)).self_reference
    assert not applied(RECIPES["paper"], spec).self_reference and applied(RECIPES["paper"], cell).self_reference
    # with --use-reference and no reference_uri or cell reference, the same rows have nothing, and train says so
    with pytest.raises(ConfigError, match="reference_uri"):
        train(TrainConfig(support=str(manifest), out=str(tmp_path / "ck3"), epochs=1, recipe=off,
                          model=replace(spec, use_reference=True)))


def _views(packed: bytes, size: int) -> torch.Tensor:
    return unpack_views(torch.from_numpy(np.frombuffer(packed, np.uint16).reshape(-1, size, size).copy()))


def test_decode_stage_ships_a_cell_reference_only_where_asked_and_where_the_frame_repeats(tmp_path):
    grid = grating((200, 240), 12.7, 1, seed=4)
    blobs = ndimage.gaussian_filter(np.random.default_rng(0).normal(120, 40, (200, 240)), 6)
    for name, img in (("grid", grid), ("blobs", blobs)):
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(tmp_path / f"{name}.png")
    batch = input_batch([str(tmp_path / "grid.png"), str(tmp_path / "blobs.png")])
    prep = preprocess_config("semclip-tiny", tile_above=1024)
    on = decode_batch(dict(batch), prep=prep, references=True, self_reference=True)
    assert on.schema == DECODED
    rows = on.to_pylist()
    assert [r["status"] for r in rows] == ["ok", "ok"] and [r["has_ref"] for r in rows] == [True, False]
    assert [r["cell_ref"] for r in rows] == [True, False]  # counted in the run record
    ref, view = _views(rows[0]["ref_pixels"], prep.image_size), _views(rows[0]["pixels"], prep.image_size)
    assert ref.shape == view.shape and float((ref - view).abs().mean()) < 0.05  # a clean grating: its own pattern
    off = decode_batch(dict(batch), prep=prep, references=True).to_pylist()
    assert [r["has_ref"] for r in off] == [False, False] and [r["cell_ref"] for r in off] == [False, False]
    framed = dict(batch, reference_url=np.array([str(tmp_path / "grid.png")] * 2, dtype=object))
    rows = decode_batch(framed, prep=prep, references=True, self_reference=True).to_pylist()
    assert [r["has_ref"] for r in rows] == [True, True] and [r["cell_ref"] for r in rows] == [False, False]


def test_a_support_set_that_does_not_repeat_trains_without_cell_references(tmp_path, caplog):
    rows = ["uri,lot_id,wafer_id,die_x,die_y,label,mask_uri,reference_uri"]
    rng = np.random.default_rng(8)
    for i in range(4):
        img = ndimage.gaussian_filter(rng.normal(120, 40, (128, 128)), 5)
        label = "normal" if i < 2 else "particle"
        mask = np.zeros(img.shape, np.uint8)
        if label == "particle":
            img, mask[60:66, 60:66] = particle(img, (63, 63), 3), 255
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(tmp_path / f"f{i}.png")
        Image.fromarray(mask).save(tmp_path / f"m{i}.png")
        rows.append(f"f{i}.png,L1,W1,{i},0,{label},m{i}.png,")
    (tmp_path / "s.csv").write_text("\n".join(rows) + "\n")
    spec = ModelSpec(backbone="semclip-tiny", pretrained="shipped", cls="fused", self_reference=True)
    meta = train(TrainConfig(support=str(tmp_path / "s.csv"), out=str(tmp_path / "ck"), model=spec, epochs=1))
    assert not meta.self_reference and "reference_scale" not in meta.training
    assert "no normal support frame repeats its pattern" in caplog.text
