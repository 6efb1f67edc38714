"""train --adapt-steps: the backbone adapted on the support frames, its weights carried in the checkpoint folder,
run finding them wherever the folder is copied; refusals."""

from __future__ import annotations

import json
import math
import shutil

import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

import semclip_batch.fewshot.adapt as adapt_module
from semclip_batch.cli import main
from semclip_batch.config import DEFAULT_ADAPT_BELOW, CheckpointRequest, ModelSpec, RunConfig
from semclip_batch.errors import ConfigError, WeightsError
from semclip_batch.fewshot.adapt import ADAPTED_BACKBONE, ADAPTED_SOURCE, adaptation_rows
from semclip_batch.fewshot.train import TrainConfig, train
from semclip_batch.io.manifest import read_manifest
from semclip_batch.methods.checkpoint import WeightsRef, load_checkpoint
from semclip_batch.methods.fitting import validation_frames
from semclip_batch.methods.prompts import load_prompts, text_embeddings
from semclip_batch.methods.registry import new_model
from semclip_batch.methods.weights import load_backbone
from semclip_batch.pipeline.driver import run

STEPS = 3


@pytest.fixture(scope="module")
def adapted(synth_lot, tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("adapted") / "c"
    meta = train(TrainConfig(support=str(synth_lot / "manifest.csv"), out=str(ckpt), epochs=1, adapt_steps=STEPS,
                             model=ModelSpec(backbone="semclip-tiny", pretrained="shipped", cls="fused")))
    return ckpt, meta


def test_adapted_weights_live_in_the_checkpoint_folder(adapted):
    ckpt, meta = adapted
    assert sorted(p.name for p in ckpt.iterdir()) == [ADAPTED_BACKBONE, "checkpoint.json", "model.safetensors"]
    body = json.loads((ckpt / "checkpoint.json").read_text())
    assert body["weights"]["source"] == ADAPTED_SOURCE == meta.weights.source
    assert body["version"] == (6 if body["region_classes"] else 5)  # 6: the region's classes (rule 22) in its tensors
    shipped = load_backbone("semclip-tiny", "shipped")
    weights = load_backbone("semclip-tiny", str(ckpt / ADAPTED_BACKBONE), expected_sha256=meta.weights.sha256)
    record = body["training"]["adapted_backbone"]
    # 14 frames: the 2 the fit holds out for early stopping (int(0.2 * 14)) are not adapted on
    assert (record["steps"], record["frames"], record["held_out_frames"], record["from"]) == (STEPS, 12, 2, "shipped")
    assert record["from_sha256"] == shipped.sha256 != weights.sha256 == record["sha256"]  # the steps changed them
    with safe_open(str(ckpt / ADAPTED_BACKBONE), "pt") as f:
        assert f.metadata()["adapted_from"] == "shipped" and f.metadata()["heldout"] == "0.0"
    # the class texts the checkpoint scores with are the adapted text tower's, not the shipped one's
    stored = load_checkpoint(str(ckpt)).tensors["text_embeddings"]
    prompts = load_prompts()
    assert torch.allclose(stored, torch.from_numpy(text_embeddings(weights, prompts)), atol=1e-5)
    assert not torch.allclose(stored, torch.from_numpy(text_embeddings(shipped, prompts)), atol=1e-5)


def test_adaptation_warnings_name_options_train_users_have(synth_lot, tmp_path, caplog):
    """From random weights a few steps leave the class texts alike: the warning points to pretrain's option, not
    to one train does not have."""
    frames = read_manifest(str(synth_lot / "manifest.csv")).head(6)
    adapt_module.adapt_backbone(ModelSpec(backbone="semclip-tiny", pretrained="none"), str(synth_lot / "manifest.csv"),
                                frames, str(tmp_path), 2, 3e-4)
    assert "text embeddings are still alike" in caplog.text
    assert "train's adaptation: the classes' text embeddings are still alike" in caplog.text
    assert "pretrain --text-separation 1" in caplog.text and "--text-separation 1 pushes them apart" not in caplog.text


def test_the_maps_keep_the_adapted_backbones_own_layers(adapted):
    """The adaptation trained the backbone's projection for dense alignment on these frames; the fit's
    Transformation Layers, trained again on the same few frames, cost pixel AUROC on the validation family
    (README), so the maps keep the zero-shot layers of the adapted backbone."""
    ckpt, meta = adapted
    weights = load_backbone("semclip-tiny", str(ckpt / ADAPTED_BACKBONE))
    text = torch.from_numpy(text_embeddings(weights, load_prompts()))
    start = new_model(ModelSpec(backbone="semclip-tiny", pretrained="shipped", taps=meta.taps), weights.clip, text)
    stored = load_checkpoint(str(ckpt)).tensors
    layers = {k: v for k, v in start.state_dict().items() if k.startswith("transform.")}
    assert layers and all(torch.equal(stored[k], v) for k, v in layers.items())
    assert meta.training["map_epoch"] == 0


def test_weights_ref_resolves_a_file_in_the_checkpoint_folder():
    assert WeightsRef(ADAPTED_SOURCE, "x").resolved("s3://b/ckpt/") == f"s3://b/ckpt/{ADAPTED_BACKBONE}"
    assert WeightsRef("/w/tiny.safetensors", "x").resolved("s3://b/ckpt") == "/w/tiny.safetensors"
    assert WeightsRef("random:seed=0", "x").resolved("/ckpt") == "none"


def test_adaptation_leaves_out_the_frames_the_fit_validates_on():
    df = pd.DataFrame({"image_id": [f"f{i:02d}" for i in range(20)], "label": ["normal"] * 20}, index=range(100, 120))
    frame = torch.tensor([f for f in range(20) for _ in range(2)])  # two views a frame (a tile each), as positions
    rows, held = adaptation_rows(df, frame, seed=0)
    val = set(validation_frames(frame, 0).tolist())
    assert held == len(val) == 4 and len(rows) == 16
    assert set(rows["image_id"]) == {f"f{i:02d}" for i in range(20) if i not in val}
    small, none = adaptation_rows(df.iloc[:8], torch.arange(8), seed=0)  # under 10 frames the fit holds none out
    assert none == 0 and len(small) == 8
    decoded = torch.tensor([f for f in range(20) if f != 5])  # row 5 did not decode: not adapted on either
    rows, held = adaptation_rows(df, decoded, seed=0)
    assert "f05" not in set(rows["image_id"]) and len(rows) == 19 - held


def test_a_folder_trained_again_keeps_only_what_its_checkpoint_names(adapted, synth_lot, tmp_path):
    """Retrained frozen into a folder that held an adapted checkpoint: the old weights go (nothing names them)."""
    ckpt, _ = adapted
    again = tmp_path / "again"
    shutil.copytree(ckpt, again)
    meta = train(TrainConfig(support=str(synth_lot / "manifest.csv"), out=str(again), epochs=1,
                             model=ModelSpec(backbone="semclip-tiny", pretrained="shipped", cls="fused")))
    assert meta.weights.source == "shipped" and not (again / ADAPTED_BACKBONE).exists()


def test_adapt_settings_are_checked():
    for bad in ({"adapt_steps": -1}, {"adapt_steps": 5, "adapt_lr": 0.0}, {"adapt_steps": 5, "adapt_lr": math.inf},
                {"adapt_steps": 5, "adapt_lr": math.nan}):
        with pytest.raises(ConfigError, match=r"--adapt-steps must be >= 0 .* and --adapt-lr a finite number > 0"):
            TrainConfig(support="s.csv", out="o", **bad)
    for lr in (0.0, math.inf, math.nan):
        with pytest.raises(ConfigError, match="--lr must be a finite number > 0"):
            TrainConfig(support="s.csv", out="o", lr=lr)


def test_cli_adapts_and_says_so(synth_lot, tmp_path, monkeypatch):
    base = ["train", str(synth_lot / "manifest.csv"), "--backbone", "semclip-tiny", "--pretrained", "shipped",
            "--epochs", "1"]
    result = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "bad"), "--adapt-steps", "-2"])
    errors = [ln for ln in result.output.splitlines() if ln.startswith("Error")]
    assert result.exit_code != 0 and "Traceback" not in result.output and len(errors) == 1
    assert "--adapt-steps must be >= 0" in errors[0] and not (tmp_path / "bad").exists()
    result = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "c"), "--adapt-steps", "2", "--adapt-lr", "1e-3"])
    assert result.exit_code == 0, result.output
    assert load_checkpoint(str(tmp_path / "c")).meta.training["adapted_backbone"]["lr"] == 1e-3
    assert "backbone adapted on 12 support frames first (2 held out for the fit's checks): 2 steps" in result.output
    assert "adaptation step 2/2  loss " in result.output  # the adaptation's progress (plain form: not a terminal)
    assert (tmp_path / "c" / ADAPTED_BACKBONE).exists()
    monkeypatch.setattr(adapt_module, "DEFAULT_ADAPT_STEPS", 4)  # the default's count, shorter here
    # the default with SEM-CLIP's transfer recipe: adapted where the weights do not know the frames (random weights
    # classify about one in seven right zero-shot), kept frozen where they do (the shipped weights, on frames of
    # the family they were pretrained on)
    result = CliRunner().invoke(main, [*base[:-4], "--pretrained", "none", "--epochs", "1", "--out", str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    training = load_checkpoint(str(tmp_path / "d")).meta.training
    assert training["adapted_backbone"]["steps"] == 4 and training["adapt_check"]["adapted"]
    assert training["adapt_check"]["zero_shot_accuracy"] < DEFAULT_ADAPT_BELOW == training["adapt_check"]["adapt_below"]
    assert "it is adapted first: adapted" in result.output and "backbone adapted on 12 support frames" in result.output
    result = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "known")])
    assert result.exit_code == 0, result.output
    meta = load_checkpoint(str(tmp_path / "known")).meta
    assert meta.training["adapt_check"]["zero_shot_accuracy"] >= DEFAULT_ADAPT_BELOW
    assert "adapted_backbone" not in meta.training and meta.weights.source == "shipped"
    assert meta.training["config"]["adapt_steps"] == 4  # the config as asked; adapt_check says why not adapted
    assert "kept frozen (--adapt-steps N adapts it anyway)" in result.output
    assert not (tmp_path / "known" / ADAPTED_BACKBONE).exists()
    for nothing in (["--adapt-steps", "0"], ["--method", "winclip"], ["--recipe", "paper"]):
        result = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "lr"), "--adapt-lr", "1e-3", *nothing])
        errors = [ln for ln in result.output.splitlines() if ln.startswith("Error")]
        assert result.exit_code != 0 and "Traceback" not in result.output and len(errors) == 1, result.output
        assert "--adapt-lr" in errors[0] and f"with {' '.join(nothing)}" in errors[0] and "nothing adapts" in errors[0]
    for other in (["--recipe", "paper"], ["--method", "winclip"]):
        result = CliRunner().invoke(main, [*base, "--out", str(tmp_path / other[1]), *other])
        assert result.exit_code == 0, result.output
        meta = load_checkpoint(str(tmp_path / other[1])).meta
        assert "adapted_backbone" not in meta.training and meta.weights.source == "shipped"
        assert not (tmp_path / other[1] / ADAPTED_BACKBONE).exists() and "backbone adapted" not in result.output


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_run_finds_the_adapted_weights_wherever_the_folder_is_copied(ray_cluster, adapted, synth_lot, tmp_path):
    ckpt, _ = adapted
    moved = tmp_path / "elsewhere" / "ckpt"
    shutil.copytree(ckpt, moved)
    result = run(RunConfig(input=str(synth_lot / "manifest.csv"), out=str(tmp_path / "o"),
                           model=CheckpointRequest(url=str(moved))))
    assert result.record["counts"] == {"ok": 14} and result.record["mode"] == "checkpoint"
    # a damaged weights file beside the checkpoint is refused before any frame is scored, not scored with
    path = str(moved / ADAPTED_BACKBONE)
    with safe_open(path, "pt") as f:
        state, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    first = next(iter(state))
    state[first] = state[first] + 1.0
    save_file(state, path, metadata=metadata)
    with pytest.raises(WeightsError, match="damaged or was replaced"):
        run(RunConfig(input=str(synth_lot / "manifest.csv"), out=str(tmp_path / "o2"),
                      model=CheckpointRequest(url=str(moved))))
    assert not (tmp_path / "o2" / "predictions").exists()
    # the folder copied without its weights file: named as the checkpoint's own file, not as a --pretrained
    (moved / ADAPTED_BACKBONE).unlink()
    with pytest.raises(WeightsError, match=r"the checkpoint's own backbone weights .* are missing: copy the whole"):
        run(RunConfig(input=str(synth_lot / "manifest.csv"), out=str(tmp_path / "o3"),
                      model=CheckpointRequest(url=str(moved))))
    assert not (tmp_path / "o3" / "predictions").exists()
