"""The weights shipped in the package (``--pretrained shipped``): pinned, made by today's pretrain defaults, learned."""

from __future__ import annotations

import json

import pytest
import torch

from semclip_batch.config import ModelSpec
from semclip_batch.errors import WeightsError
from semclip_batch.fewshot.pretrain import PretrainConfig
from semclip_batch.fewshot.support_maps import map_auroc
from semclip_batch.fewshot.train import TrainConfig, train
from semclip_batch.fewshot.trainset import load_trainset
from semclip_batch.io.manifest import read_manifest
from semclip_batch.io.preprocess import normalize
from semclip_batch.methods.prompts import load_prompts, text_embeddings
from semclip_batch.methods.registry import new_model
from semclip_batch.methods.shipped import WEIGHTS, recorded_metadata, shipped_path
from semclip_batch.methods.weights import load_backbone, preprocess_config


def test_shipped_weights_load_pinned_and_refuse_other_backbones():
    loaded = load_backbone("semclip-tiny", "shipped")
    assert loaded.source == "shipped" and loaded.sha256 == WEIGHTS["semclip-tiny"].sha256
    assert loaded.sha256 == load_backbone("semclip-tiny", shipped_path("semclip-tiny")).sha256
    with pytest.raises(WeightsError, match="no weights ship for backbone ViT-B-16"):
        load_backbone("ViT-B-16", "shipped")
    with pytest.raises(WeightsError, match="checksum mismatch"):
        load_backbone("semclip-tiny", "shipped", expected_sha256="0" * 64)


def test_shipped_weights_were_made_by_todays_pretrain_defaults():
    """Rebuild them (jobs/ship_weights.py) whenever pretrain's defaults change."""
    meta = recorded_metadata("semclip-tiny")
    assert {k: meta.get(k) for k in PretrainConfig(manifest="", out="").recipe()} == \
        PretrainConfig(manifest="", out="").recipe()
    assert PretrainConfig(manifest="", out="").separation == 0.0 and "text_separation" not in meta  # off in both
    assert meta["backbone"] == "semclip-tiny" and meta["stored"] == "fp16"
    assert json.loads(meta["synth"]) == WEIGHTS["semclip-tiny"].synth
    assert WEIGHTS["semclip-tiny"].synth["seed"] not in (7, 2000)  # the demo's test lots and support set
    after = json.loads(meta["heldout_check"])["after"]
    assert all(v is not None and v > 0.8 for k, v in after.items() if k.startswith("patch_AUROC/"))


def test_shipped_weights_segment_classic_lots_zero_shot(synth_lot):
    """Zero-shot SEM-CLIP on lots of other seeds: the weights learned (random weights are near 0.5)."""
    backbone = load_backbone("semclip-tiny", "shipped")
    prompts = load_prompts()
    model = new_model(ModelSpec(backbone="semclip-tiny", pretrained="shipped"), backbone.clip,
                      torch.from_numpy(text_embeddings(backbone, prompts)))
    prep = preprocess_config("semclip-tiny", tile_above=10**9)
    data = load_trainset(read_manifest(str(synth_lot / "manifest.csv")), prompts.classes, prep)
    with torch.no_grad():
        out = model(normalize(data.views, prep))
    assert map_auroc(out.maps, data.masks, data.has_mask) > 0.85


def test_checkpoints_on_shipped_weights_record_them(synth_lot, tmp_path):
    meta = train(TrainConfig(support=str(synth_lot / "manifest.csv"), out=str(tmp_path / "c"), epochs=1,
                             model=ModelSpec(backbone="semclip-tiny", pretrained="shipped", cls="fused")))
    assert meta.weights.source == "shipped" and meta.weights.pretrained == "shipped"
    assert meta.weights.sha256 == WEIGHTS["semclip-tiny"].sha256
