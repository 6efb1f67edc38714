"""The map over half-patch shifts (``run --map-shifts``, ``model.shifts``): the shifted views line up with the
view again, the scorer averages exactly those maps and keeps the view's class scores, and the setting reaches
the run id and the CLI's one-line errors."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from semclip_batch.cli import main
from semclip_batch.config import DEFAULT_MAP_SHIFTS, MAP_SHIFTS, CheckpointRequest, ModelSpec
from semclip_batch.errors import ConfigError
from semclip_batch.methods.prompts import load_prompts, text_embeddings
from semclip_batch.methods.scoring import build_model
from semclip_batch.methods.weights import load_backbone
from semclip_batch.model.shifts import half_patch_offsets, patch_size, shift_views, unshift_maps


def test_the_offsets_are_none_the_diagonal_or_every_half_patch_and_the_counts_agree_with_the_config():
    assert half_patch_offsets(1, 16) == ()
    assert half_patch_offsets(2, 16) == ((8, 8),)
    assert set(half_patch_offsets(4, 14)) == {(0, 7), (7, 0), (7, 7)}
    for shifts in MAP_SHIFTS:
        assert len(half_patch_offsets(shifts, 16)) == shifts - 1
    with pytest.raises(ValueError, match="one of 1, 2, 4"):
        half_patch_offsets(3, 16)


def test_a_shifted_view_moved_back_lines_up_with_the_view_and_the_uncovered_edge_repeats():
    views = torch.rand(2, 3, 32, 40)
    moved = shift_views(views, 8, 5)
    assert moved.shape == views.shape
    assert torch.equal(moved[..., 8:, 5:], views[..., :-8, :-5])  # content went down 8, right 5
    assert torch.equal(moved[..., :8, 5:], views[..., 1:9, :-5].flip(-2))  # reflected in at the top
    maps = moved[:, 0]  # a "map" that is the view's own grey: moved back it must be the view again
    back = unshift_maps(maps, 8, 5)
    assert torch.equal(back[:, :-8, :-5], views[:, 0, :-8, :-5])
    assert torch.equal(back[:, -8:, :-5], back[:, -9:-8, :-5].expand(-1, 8, -1))  # bottom rows repeat
    assert torch.equal(back[:, :-8, -5:], back[:, :-8, -6:-5].expand(-1, -1, 5))
    with pytest.raises(ValueError, match="does not fit"):
        shift_views(views, 32, 0)


@pytest.fixture(scope="module")
def tiny_text(tiny_clip):
    return text_embeddings(tiny_clip, load_prompts())


@pytest.mark.parametrize("method", ["semclip", "winclip"])
def test_the_scorer_averages_the_shifted_maps_moved_back_and_keeps_the_views_class_scores(tiny_clip, tiny_text,
                                                                                         method):
    spec = ModelSpec(backbone="semclip-tiny", method=method, self_similarity=0.8 if method == "semclip" else 0.0)
    single = build_model(spec, tiny_text, backbone=tiny_clip)
    shifted = build_model(ModelSpec(**{**spec.__dict__, "map_shifts": 4}), tiny_text, backbone=tiny_clip)
    patch = patch_size(tiny_clip.clip.visual.conv1)
    assert shifted.offsets == half_patch_offsets(4, patch) and single.offsets == ()
    x = torch.randn(3, 3, 240, 240)
    with torch.no_grad():
        one, four = single(x), shifted(x)
        expected = [one.maps] + [unshift_maps(single(shift_views(x, d, r)).maps, d, r) for d, r in shifted.offsets]
    assert torch.allclose(four.maps, torch.stack(expected).mean(0), atol=1e-6)
    assert not torch.allclose(four.maps, one.maps, atol=1e-3)  # the shifts do move the map
    assert float(four.maps.min()) >= 0.0 and float(four.maps.max()) <= 1.0
    assert torch.equal(four.class_probs, one.class_probs) and torch.equal(four.embeddings, one.embeddings)


@pytest.mark.parametrize("weight", [0.0, 0.3])
def test_shifted_passes_score_maps_only_the_same_maps_and_skip_a_weightless_memorys_distances(tiny_clip, tiny_text,
                                                                                            weight, monkeypatch):
    """SEM-CLIP with its memory and region head: the shifted passes leave the class scores (NaN, never read) and,
    where the memory's weight is 0, its distances; the maps, the view's class scores and embeddings are those of
    full passes to the bit."""
    spec = ModelSpec(backbone="semclip-tiny", memory=True, region_head=True, self_similarity=0.5, map_shifts=4)
    scoring = build_model(spec, tiny_text, backbone=tiny_clip)
    model = scoring.model
    gen = torch.Generator().manual_seed(3)
    model.memory.set_banks([torch.randn(64, bank.shape[1], generator=gen) for bank in model.memory.banks()])
    model.memory.weight.fill_(weight)
    x = torch.randn(2, 3, 240, 240, generator=gen)
    calls = []
    distance = type(model.memory).distance
    monkeypatch.setattr(type(model.memory), "distance", lambda self, *a: calls.append(1) or distance(self, *a))
    with torch.no_grad():
        fast = scoring(x)
        assert len(calls) == (4 if weight else 1)  # the view's pass always (its region head reads them)
        once = scoring._once
        scoring._once = lambda x_, refs, has_ref, maps_only=False: once(x_, refs, has_ref)  # every pass in full
        full = scoring(x)
        shifted = once(shift_views(x, *scoring.offsets[0]), None, None, maps_only=True)
    assert torch.equal(fast.maps, full.maps) and torch.equal(fast.class_probs, full.class_probs)
    assert torch.equal(fast.embeddings, full.embeddings)
    assert shifted.class_probs.isnan().all() and shifted.class_probs.shape == full.class_probs.shape


def test_bf16_views_shift_too_and_the_map_keeps_the_single_views_dtype(tiny_text):
    x = torch.randn(2, 3, 240, 240)

    def scored(shifts: int, dtype: torch.dtype) -> torch.Tensor:  # its own backbone: .to(bf16) casts in place
        scoring = build_model(ModelSpec(backbone="semclip-tiny", map_shifts=shifts), tiny_text,
                              backbone=load_backbone("semclip-tiny", "none", seed=0)).to(torch.device("cpu"), dtype)
        with torch.no_grad():
            return scoring(x.to(dtype)).maps

    one, two, two_fp32 = scored(1, torch.bfloat16), scored(2, torch.bfloat16), scored(2, torch.float32)
    assert two.dtype == one.dtype and two.shape == one.shape == (2, 240, 240)
    assert bool(torch.isfinite(two).all()) and float(two.min()) >= 0.0 and float(two.max()) <= 1.0
    assert float((two.float() - two_fp32.float()).abs().max()) < 0.05


@pytest.mark.parametrize("shifts", [2, 4])
def test_reference_frames_move_with_their_views(tiny_clip, tiny_text, shifts):
    """Each shifted view is compared with its reference moved the same way: a reference left in place would
    score every shifted view as half a patch off its die."""
    spec = ModelSpec(backbone="semclip-tiny", use_reference=True, register_reference=False, map_shifts=shifts)
    shifted = build_model(spec, tiny_text, backbone=tiny_clip)
    single = build_model(ModelSpec(**{**spec.__dict__, "map_shifts": 1}), tiny_text, backbone=tiny_clip)
    x = torch.randn(3, 3, 240, 240)
    refs = x + 0.1 * torch.randn_like(x)
    refs[1] = torch.randn(3, 240, 240)
    has_ref = torch.tensor([True, True, False])
    with torch.no_grad():
        got = shifted(x, refs, has_ref).maps
        maps = [single(x, refs, has_ref).maps]
        kept = list(maps)
        for d, r in shifted.offsets:
            maps.append(unshift_maps(single(shift_views(x, d, r), shift_views(refs, d, r), has_ref).maps, d, r))
            kept.append(unshift_maps(single(shift_views(x, d, r), refs, has_ref).maps, d, r))
    assert torch.allclose(got, torch.stack(maps).mean(0), atol=1e-6)
    assert not torch.allclose(got[0], torch.stack(kept).mean(0)[0], atol=1e-3)  # the reference left in place
    assert torch.allclose(got[2], torch.stack(kept).mean(0)[2], atol=1e-6)  # a row without one: no reference read


def test_the_setting_enters_the_run_id_only_where_it_shifts_and_unknown_counts_are_refused():
    assert "map_shifts" not in ModelSpec().output_affecting()  # run ids of runs without shifts stay as they were
    assert ModelSpec(map_shifts=2).output_affecting()["map_shifts"] == 2
    for bad in (0, 3, 8):
        with pytest.raises(ConfigError, match="--map-shifts must be one of 1, 2, 4"):
            ModelSpec(map_shifts=bad)
        with pytest.raises(ConfigError, match="--map-shifts"):
            CheckpointRequest(url="ckpt", map_shifts=bad)


def test_run_takes_the_default_for_zero_shot_and_checkpoint_runs_and_the_flag_wins():
    from semclip_batch.cli.options import run_config

    base = dict(input="lot.csv", out="out", model=None, backbone="semclip-tiny", pretrained="shipped",
                pretrained_sha256=None, scale_policy="whole", self_similarity=None, defect_view=None, seed=0,
                prompts=None, precision="fp32", storage_option=(), threshold=None, pixel_threshold=None,
                min_region_px=None, batch_size=8, actors=1, num_gpus=0.0, shard_size=64, tile_above=1024,
                pattern=None, address=None, overwrite=False)
    assert run_config(**base).model.map_shifts == DEFAULT_MAP_SHIFTS
    assert run_config(**base, map_shifts=1).model.map_shifts == 1
    assert run_config(**{**base, "model": "ckpt", "scale_policy": None}).model.map_shifts == DEFAULT_MAP_SHIFTS
    assert run_config(**{**base, "model": "ckpt", "scale_policy": None}, map_shifts=2).model.map_shifts == 2
    path = Path(__file__).resolve().parents[1] / "jobs" / "process_lots.py"
    spec = importlib.util.spec_from_file_location("semclip_process_lots_job", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for command in (main.commands["run"], module.main):  # the option's own default, in both entry points
        option = next(p for p in command.params if p.name == "map_shifts")
        assert option.default == DEFAULT_MAP_SHIFTS


def test_an_unknown_count_is_one_line_and_nothing_is_written(tmp_path):
    manifest = tmp_path / "lot.csv"
    manifest.write_text("image_id,lot_id,wafer_id,die_x,die_y,uri\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(manifest), "--out", str(out), "--pretrained", "none",
                                       "--map-shifts", "3"])
    assert result.exit_code != 0
    assert result.output.strip().splitlines() == ["Error: --map-shifts must be one of 1, 2, 4, got 3"]
    assert not out.exists()



@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_run_at_the_default_moves_the_maps_not_the_classes_and_names_another_run(tmp_path, synth_lot, ray_cluster):
    """Through the pipeline: the default run and ``--map-shifts 1`` score the same frames (under twice the model
    input: no defect view) with the same class scores and other maps; the run ids differ, the record says which,
    and an OUT of the one is refused to the other in one line."""
    import json

    from semclip_batch.analysis.results import read_predictions

    runner, found = CliRunner(), {}
    for name, flags in (("default", []), ("one", ["--map-shifts", "1"])):
        out = tmp_path / name
        res = runner.invoke(main, ["run", str(synth_lot / "manifest.csv"), "--out", str(out), "--backbone",
                                   "semclip-tiny", "--pretrained", "shipped", *flags])
        assert res.exit_code == 0, res.output
        record = json.loads(next((out / "runs").rglob("attempt-*.json")).read_text())
        table = read_predictions(str(out)).to_pandas().sort_values("image_id")
        assert set(table["status"]) == {"ok"}
        found[name] = (record, np.stack(table["class_scores"].to_list()), table["anomaly_score"].to_numpy())
    default, one = found["default"], found["one"]
    assert default[0]["config"]["model"]["map_shifts"] == DEFAULT_MAP_SHIFTS
    assert one[0]["config"]["model"]["map_shifts"] == 1  # the record shows it; the run id leaves 1 out
    assert default[0]["run_id"] != one[0]["run_id"]
    assert np.allclose(default[1], one[1], atol=1e-6)  # the classes: the view's own either way
    assert np.abs(default[2] - one[2]).max() > 1e-4  # the image score reads the map's maximum
    res = runner.invoke(main, ["run", str(synth_lot / "manifest.csv"), "--out", str(tmp_path / "one"), "--backbone",
                               "semclip-tiny", "--pretrained", "shipped"])
    assert res.exit_code != 0
    assert res.output.strip().splitlines()[-1].startswith(f"Error: {tmp_path / 'one'} holds run {one[0]['run_id']}")
