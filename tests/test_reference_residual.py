"""Rule 27's die-to-die residual in the grey-level memory's map: each frame against its registered reference frame at
the frame's own resolution, its scale, its choice on the held-out support frames, how a checkpoint stores it, and
how ``run``'s decode and model stages ship and fuse it."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from decoded_batch import input_batch, write_frames

from semclip_batch.fewshot import grey_memory_fit as fit
from semclip_batch.fewshot import residual_fit
from semclip_batch.methods.scoring import grey_memory_from, reads_references
from semclip_batch.model.grey_memory import GREY_MEMORY, MIN_SCALE, OUTSIDE_BARS, REFERENCE_PLAIN, GreyMemory
from semclip_batch.model.line_residual import smoothed


def _layout(rng: np.random.Generator, size: int = 96) -> np.ndarray:
    """Irregular blocks of conductor on a dark field with shot noise (no two frames alike); levels in [0, 1]."""
    frame = np.full((size, size), 0.2, np.float32)
    for _ in range(12):
        y, x = rng.integers(0, size - 12, 2)
        h, w = rng.integers(4, 12, 2)
        frame[y:y + h, x:x + w] = 0.8
    return frame


def _noisy(frame: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.clip(frame + rng.normal(0, 0.02, frame.shape), 0, 1).astype(np.float32)


def _memory(seed: int = 0) -> GreyMemory:
    rng = np.random.default_rng(seed)
    return fit.fit_grey_memory([(torch.from_numpy(_noisy(_layout(rng), rng)), None) for _ in range(6)], seed=0,
                               entries=64)


def test_the_reference_map_is_the_smoothed_difference_over_twice_its_scale_and_joins_the_mean_of_the_parts():
    rng = np.random.default_rng(1)
    clean = _layout(rng)
    frame = clean.copy()
    frame[40:44, 50:54] = 1.0  # a 4-px particle the reference lacks
    levels, reference = torch.from_numpy(_noisy(frame, rng)), torch.from_numpy(_noisy(clean, rng))
    memory = _memory()
    memory.reference_scale.fill_(0.05)
    residual = memory.reference_residual(levels, reference)
    assert torch.allclose(residual, smoothed((levels - reference).abs()))
    expected = torch.clamp(residual / 0.1, 0, 1)
    assert torch.equal(memory.reference_map(levels, reference), expected)
    assert divmod(int(expected.argmax()), 96) in {(y, x) for y in range(39, 45) for x in range(49, 55)}
    plain = memory.neighbourhood_map(levels)
    assert torch.equal(memory.frame_map(levels, reference), plain)  # reference 0: not kept, the map as it was
    memory.reference.fill_(1)
    assert torch.allclose(memory.frame_map(levels, reference), 0.5 * (plain + expected))
    assert torch.equal(memory.frame_map(levels), plain)  # a row without a reference keeps its map
    memory.lines.fill_(15)
    memory.line_scale.fill_(0.1)
    three = (plain + memory.line_map(levels) + expected) / 3
    assert torch.allclose(memory.frame_map(levels, reference), three)
    memory.weight.fill_(0.5)
    assert torch.allclose(memory.fuse(torch.zeros(96, 96), levels, reference), 0.5 * three)


def test_the_scale_reads_clean_pixels_only():
    rng = np.random.default_rng(2)
    frames = []
    for _ in range(4):
        clean = _layout(rng)
        frame = clean.copy()
        frame[30:36, 30:36] = 1.0
        mask = np.zeros(frame.shape, bool)
        mask[30:36, 30:36] = True
        frames.append((torch.from_numpy(_noisy(frame, rng)), torch.from_numpy(_noisy(clean, rng)), mask))
    masked = residual_fit.fit_reference_scale(frames)
    unmasked = residual_fit.fit_reference_scale([(f, r, None) for f, r, _ in frames])
    assert 0 < masked < unmasked  # the defects' own differences would have set it
    assert residual_fit.fit_reference_scale([]) == pytest.approx(MIN_SCALE)  # nothing to read: the floor


def _held_out(shows_defect: bool, n: int = 4, seed: int = 3):
    """``n`` defect frames whose model maps say nothing (flat), their native frames and references: with
    ``shows_defect`` each reference lacks the frame's 5-px particle, else it holds it too (a reference of no use)."""
    rng = np.random.default_rng(seed)
    maps, frames, refs = [], {}, {}
    for p in range(n):
        clean = _layout(rng)
        frame = clean.copy()
        y, x = 20 + 10 * p, 30
        frame[y:y + 5, x:x + 5] = 1.0
        mask = np.zeros(frame.shape, bool)
        mask[y:y + 5, x:x + 5] = True
        other = clean if shows_defect else frame
        frames[p] = fit.NativeFrame(np.rint(_noisy(frame, rng) * 255).astype(np.uint8), mask, normal=False)
        refs[p] = np.rint(_noisy(other, rng) * 255).astype(np.uint8)
        maps.append(fit.FrameMap(p, torch.full(frame.shape, 0.3), 0.5, True))
    for q in range(10, 13):  # normal fitting frames and their references: the same layout, their own noise
        clean = _layout(rng)
        frames[q] = fit.NativeFrame(np.rint(_noisy(clean, rng) * 255).astype(np.uint8), None, normal=True)
        refs[q] = np.rint(_noisy(clean, rng) * 255).astype(np.uint8)
    return maps, frames, refs


@pytest.mark.parametrize("shows_defect", [True, False])
def test_train_keeps_the_residual_only_where_the_held_out_frames_find_more_defect_pixels(shows_defect):
    memory = _memory()
    maps, frames, refs = _held_out(shows_defect)
    grey = fit.memory_maps(memory, frames, refs)
    record = fit.choose_reference(memory, maps, frames, grey, refs, fitting=[10, 11, 12])
    assert record["held_out_with_reference"] == 4 and set(record["figures"]) == {"without", "with"}
    gain = record["figures"]["with"]["F1max"] - record["figures"]["without"]["F1max"]
    assert record["kept"] is shows_defect and (gain >= fit.RESIDUAL_MIN_GAIN) is shows_defect
    assert int(memory.reference) == (OUTSIDE_BARS if shows_defect else 0)  # rule 30's residual where kept
    assert float(memory.reference_scale) == (pytest.approx(record["scale"], rel=1e-4) if shows_defect else 1.0)
    stored = {"reference", "reference_scale"} & set(memory.checkpoint_tensors())
    assert stored == ({"reference", "reference_scale"} if shows_defect else set())


def test_too_few_held_out_frames_with_a_reference_weigh_nothing():
    memory = _memory()
    maps, frames, refs = _held_out(True)
    some = {p: r for p, r in refs.items() if p not in (0, 1)}  # 2 of 4 held-out frames list one
    record = fit.choose_reference(memory, maps, frames, fit.memory_maps(memory, frames, some), some, [10, 11, 12])
    assert record == {"held_out_with_reference": 2, "held_out_with_data_bar": 0, "kept": False,
                      "note": "2 held-out support frames list a reference_uri that reads (needs 3)"}
    assert int(memory.reference) == 0
    line = fit.grey_memory_lines({"grey_memory": {"entries": 64, "fitted_on": 3, "weight": 0.0, "reference": record,
                                                  "figures": {"0": {"pAUROC": 0.9, "F1max": 0.1}}}})
    assert line[-1] == ("die-to-die residual (2 held-out frames with a reference, 0 with a data bar (its rows left out)): "
                        "not kept (2 held-out support frames list a reference_uri that reads (needs 3))")
    del record["held_out_with_data_bar"]  # a record written before rule 30
    line = fit.grey_memory_lines({"grey_memory": {"entries": 64, "fitted_on": 3, "weight": 0.0, "reference": record,
                                                  "figures": {"0": {"pAUROC": 0.9, "F1max": 0.1}}}})
    assert line[-1].startswith("die-to-die residual (2 held-out frames with a reference): not kept")


def test_each_frames_maps_with_and_without_the_reference_are_computed_once(monkeypatch):
    memory = _memory()
    _, frames, refs = _held_out(True)
    calls = []
    real = memory.neighbourhood_map
    monkeypatch.setattr(memory, "neighbourhood_map", lambda levels: calls.append(1) or real(levels))
    grey = fit.memory_maps(memory, frames, refs)
    plain = grey(0)
    memory.reference.fill_(1)
    memory.reference_scale.fill_(0.05)
    with_ref = grey(0)
    assert grey(0) is with_ref and not torch.equal(plain, with_ref) and len(calls) == 1
    memory.reference.fill_(0)
    assert grey(0) is plain


def _tensors(memory: GreyMemory) -> dict[str, torch.Tensor]:
    memory.weight.fill_(0.5)
    return {f"{GREY_MEMORY}.{k}": v for k, v in memory.checkpoint_tensors().items()}


def test_a_checkpoint_stores_the_residual_only_where_kept_and_refuses_half_of_it():
    memory = _memory()
    without = _tensors(memory)
    assert not reads_references(without) and f"{GREY_MEMORY}.reference" not in without
    loaded = grey_memory_from(without, [])
    assert loaded is not None and int(loaded.reference) == 0  # written before rule 27: no residual
    for value in (REFERENCE_PLAIN, OUTSIDE_BARS):  # rule 27's residual (older checkpoints) and rule 30's
        memory.reference.fill_(value)
        memory.reference_scale.fill_(0.04)
        kept = _tensors(memory)
        assert reads_references(kept)
        loaded = grey_memory_from(kept, [])
        assert loaded is not None and int(loaded.reference) == value
        assert float(loaded.reference_scale) == pytest.approx(0.04)
    for dropped in ("reference", "reference_scale"):
        problems: list[str] = []
        assert grey_memory_from({k: v for k, v in kept.items() if k != f"{GREY_MEMORY}.{dropped}"}, problems) is None
        assert "reference and reference_scale are stored together" in problems[0]
    for damaged in (float("nan"), 1.7, 2.5):  # a damaged value reads no references (build_model then refuses it)
        assert not reads_references(kept | {f"{GREY_MEMORY}.reference": torch.tensor(damaged)})
    for field, bad in (("reference", torch.tensor(3)), ("reference", torch.tensor(-1)), ("reference_scale", torch.tensor(0.0)),
                       ("reference_scale", torch.tensor(float("inf")))):
        problems = []
        assert not reads_references(kept | {f"{GREY_MEMORY}.{field}": bad}) or field == "reference_scale"
        assert grey_memory_from(kept | {f"{GREY_MEMORY}.{field}": bad}, problems) is None
        assert "needs reference 0, 1 or 2 with a finite scale above 0" in problems[0]


def _frame_and_reference(tmp_path, shift: int = 0):
    """A 16-bit frame with a bright particle and its reference (the frame without it, moved ``shift`` px)."""
    rng = np.random.default_rng(5)
    clean = _layout(rng, 128)
    frame = clean.copy()
    frame[60:65, 60:65] = 1.0
    paths = []
    for name, image in (("frame", frame), ("ref", np.roll(clean, shift, axis=1))):
        paths.append(str(tmp_path / f"{name}.tif"))
        tifffile.imwrite(paths[-1], (_noisy(image, rng) * 60000).astype(np.uint16))
    return paths


def test_the_decode_stage_ships_a_registered_references_levels_where_asked(tmp_path):
    from semclip_batch.io.levels import stretch
    from semclip_batch.io.preprocess import pack_frame
    from semclip_batch.methods.weights import preprocess_config
    from semclip_batch.pipeline.reader import decode_batch

    prep = preprocess_config("semclip-tiny", tile_above=1024, frame_levels=True)
    frame, ref = _frame_and_reference(tmp_path, shift=3)
    plain = write_frames(tmp_path, [(128, 128)], seed=1)[0]
    batch = input_batch([frame, plain, frame])
    batch["reference_url"] = np.array([ref, None, str(tmp_path / "missing.tif")], dtype=object)
    rows = decode_batch(batch, prep=prep, reference_levels=True).to_pylist()
    assert [r["status"] for r in rows] == ["ok", "ok", "reference_error"]
    assert rows[1]["ref_frame_pixels"] == b"" and "missing.tif" in rows[2]["error"]
    levels = np.frombuffer(rows[0]["frame_pixels"], np.uint8).reshape(128, 128).astype(int)
    shipped = np.frombuffer(rows[0]["ref_frame_pixels"], np.uint8).reshape(128, 128).astype(int)
    diff = np.abs(levels - shipped)[8:-8, 8:-8]
    raw = pack_frame(stretch(tifffile.imread(ref), 0.5, 99.5)).astype(int)
    assert diff.mean() < 0.7 * np.abs(levels - raw)[8:-8, 8:-8].mean()  # registered: the 3-px shift taken out
    assert diff[52:57, 52:57].max() > 100  # and the particle left
    assert not rows[0]["has_ref"]  # the model's own reference scorer is untouched by it
    unasked = decode_batch(batch, prep=prep).to_pylist()
    assert [r["status"] for r in unasked] == ["ok", "ok", "ok"] and all(r["ref_frame_pixels"] == b"" for r in unasked)
    from semclip_batch.fewshot.residual_fit import reference_levels
    df = pd.DataFrame({"url": [frame], "mask_url": [""], "page": [None], "reference_url": [ref]})
    assert reference_levels(df, {0}, None, (prep.percentile_low, prep.percentile_high))[0].tobytes() == \
        rows[0]["ref_frame_pixels"]  # train reads a support frame's reference as run ships it
    no_levels = decode_batch(batch, prep=replace(prep, frame_levels=False), reference_levels=True).to_pylist()
    assert [r["status"] for r in no_levels] == ["ok", "ok", "ok"]  # no levels shipped: no reference read
    for register in (True, False):  # --use-reference's own reference views are untouched by it
        plain = decode_batch(batch, prep=prep, references=True, register=register).to_pylist()
        both = decode_batch(batch, prep=prep, references=True, register=register, reference_levels=True).to_pylist()
        assert [r["ref_pixels"] for r in plain[:2]] == [r["ref_pixels"] for r in both[:2]]
        assert both[0]["has_ref"] and both[0]["ref_frame_pixels"] == rows[0]["ref_frame_pixels"]


def test_train_reads_the_support_frames_references_as_run_ships_them(tmp_path):
    from semclip_batch.fewshot.residual_fit import reference_levels
    from semclip_batch.io.levels import stretch
    from semclip_batch.io.preprocess import pack_frame
    from semclip_batch.io.register import register_reference

    frame, ref = _frame_and_reference(tmp_path, shift=2)
    df = pd.DataFrame({"url": [frame, frame, frame], "mask_url": ["", "", ""], "page": [None] * 3,
                       "reference_url": [ref, "", str(tmp_path / "gone.tif")]})
    got = reference_levels(df, {0, 1, 2}, None, (0.5, 99.5))
    assert set(got) == {0}  # no reference listed, and one unreadable (warned): left out
    gray, reference = tifffile.imread(frame), tifffile.imread(ref)
    expected = pack_frame(stretch(register_reference(gray, reference)[0], 0.5, 99.5))
    assert np.array_equal(got[0], expected)
    assert reference_levels(df, {1, 2}, None, (0.5, 99.5)) == {}


def test_the_model_stage_fuses_each_rows_shipped_reference_into_its_memory_map(tmp_path, monkeypatch, tiny_clip):
    from test_grey_memory import _actors_build_with

    from semclip_batch.config import ModelSpec
    from semclip_batch.io.preprocess import frame_tiles, maps_to_frame, normalize, unpack_frame, unpack_views
    from semclip_batch.methods.decisions import to_mask
    from semclip_batch.methods.prompts import load_prompts, text_embeddings
    from semclip_batch.methods.weights import preprocess_config
    from semclip_batch.pipeline import inference
    from semclip_batch.pipeline.reader import decode_batch

    spec = ModelSpec(backbone="semclip-tiny", grey_memory=True, reference_levels=True)
    prep = preprocess_config(spec.backbone, tile_above=1024, frame_levels=True)
    memory = _memory()
    memory.weight.fill_(0.5)
    memory.reference.fill_(1)
    memory.reference_scale.fill_(0.05)
    built = _actors_build_with(monkeypatch, tiny_clip, memory)
    frame, ref = _frame_and_reference(tmp_path, shift=2)
    batch = input_batch([frame, frame])
    batch["reference_url"] = np.array([ref, None], dtype=object)  # the second row lists none
    decoded = {k: np.array(v, dtype=object) for k, v in
               decode_batch(batch, prep=prep, reference_levels=True).to_pydict().items()}
    text = text_embeddings(tiny_clip, load_prompts())
    setup = inference.PredictorSetup(spec=spec, prep=prep, text_embeddings=text, weights_sha256=tiny_clip.sha256,
                                     batch_size=4, threads=1, use_gpu=False)
    rows = inference.Predictor(setup)(decoded).to_pylist()
    assert [r["status"] for r in rows] == ["ok", "ok"]
    plain = built(spec, text)
    with torch.no_grad():
        views = unpack_views(torch.from_numpy(np.frombuffer(decoded["pixels"][0], np.uint16).reshape(-1, 240, 240)
                                              .copy()))
        frame_map = maps_to_frame(plain(normalize(views, prep)).maps, 128, 128, frame_tiles(128, 128, prep))
    levels = unpack_frame(decoded["frame_pixels"][0], 128, 128).float() / 255
    reference = unpack_frame(decoded["ref_frame_pixels"][0], 128, 128).float() / 255
    for row, expected in zip(rows, (memory.fuse(frame_map, levels, reference), memory.fuse(frame_map, levels)),
                             strict=True):
        stored = np.frombuffer(row["mask"], np.uint8).reshape(128, 128).astype(int)
        assert np.abs(stored - to_mask(expected.numpy()).astype(int)).max() <= 1
    assert not np.array_equal(rows[0]["mask"], rows[1]["mask"])


def test_no_fitting_frame_with_a_reference_weighs_nothing_and_a_frame_without_one_keeps_its_cached_map():
    memory = _memory()
    maps, frames, refs = _held_out(True)
    held_only = {p: r for p, r in refs.items() if p < 10}
    record = fit.choose_reference(memory, maps, frames, fit.memory_maps(memory, frames, held_only), held_only,
                                  [10, 11, 12])
    assert not record["kept"] and "no fitting support frame lists a readable reference" in record["note"]
    memory.lines.fill_(15)
    memory.line_scale.fill_(0.1)
    grey = fit.memory_maps(memory, frames, held_only)
    alone = grey(10)  # lines kept, no reference for this frame: switching the reference on changes nothing for it
    memory.reference.fill_(1)
    memory.reference_scale.fill_(0.05)
    assert grey(10) is alone and grey(0) is not alone


def test_a_model_stage_given_no_reference_levels_for_a_row_that_lists_one_makes_model_errors(tmp_path, monkeypatch,
                                                                                             tiny_clip):
    from test_grey_memory import _actors_build_with

    from semclip_batch.config import ModelSpec
    from semclip_batch.methods.prompts import load_prompts, text_embeddings
    from semclip_batch.methods.weights import preprocess_config
    from semclip_batch.pipeline import inference
    from semclip_batch.pipeline.reader import decode_batch

    spec = ModelSpec(backbone="semclip-tiny", grey_memory=True, reference_levels=True)
    prep = preprocess_config(spec.backbone, tile_above=1024, frame_levels=True)
    memory = _memory()
    memory.weight.fill_(0.5)
    memory.reference.fill_(1)
    _actors_build_with(monkeypatch, tiny_clip, memory)
    frame, ref = _frame_and_reference(tmp_path)
    batch = input_batch([frame])
    batch["reference_url"] = np.array([ref], dtype=object)
    decoded = {k: np.array(v, dtype=object) for k, v in decode_batch(batch, prep=prep).to_pydict().items()}
    setup = inference.PredictorSetup(spec=spec, prep=prep, text_embeddings=text_embeddings(tiny_clip, load_prompts()),
                                     weights_sha256=tiny_clip.sha256, batch_size=4, threads=1, use_gpu=False)
    row = inference.Predictor(setup)(decoded).to_pylist()[0]
    assert row["status"] == "model_error" and "shipped none for a row that lists one" in row["error"]
