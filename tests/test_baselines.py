"""WinCLIP+, PromptAD and reference frames: their building blocks, training, checkpoints and runs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from semclip_batch.analysis.results import read_predictions
from semclip_batch.config import CheckpointRequest, ModelSpec, RunConfig
from semclip_batch.errors import REFERENCE_ERROR, ConfigError
from semclip_batch.fewshot.train import TrainConfig, train
from semclip_batch.fewshot.trainset import TrainSet
from semclip_batch.methods.checkpoint import load_checkpoint
from semclip_batch.methods.features import encode_views
from semclip_batch.methods.fitting import normal_rows
from semclip_batch.methods.promptad_method import fit_promptad
from semclip_batch.methods.prompts import load_prompts
from semclip_batch.methods.registry import new_model
from semclip_batch.methods.scoring import build_model
from semclip_batch.methods.shipped import shipped_weights
from semclip_batch.methods.weights import open_clip_module
from semclip_batch.model.encoder import embed_patches
from semclip_batch.model.patchops import harmonic_to_patches, nearest_distance, neighbourhood_distance, window_index
from semclip_batch.model.promptad import PromptLearner
from semclip_batch.model.reference import ReferenceScorer
from semclip_batch.model.winclip import WinClip, encode_windows
from semclip_batch.pipeline.driver import run


def test_windows_cover_the_grid_and_aggregate_harmonically():
    w = window_index(5, 3)
    assert w.shape == (9, 9) and w.min() == 0 and w.max() == 24
    scores = torch.rand(2, 9) + 0.05
    out = harmonic_to_patches(scores, w, 25)
    for p in (0, 7, 12, 24):
        cover = [i for i in range(9) if p in w[i]]
        expected = len(cover) / sum(1.0 / float(scores[1, i]) for i in cover)
        assert float(out[1, p]) == pytest.approx(expected, rel=1e-5)


def test_nearest_and_neighbourhood_distances():
    feats = F.normalize(torch.randn(1, 16, 8), dim=-1)
    assert nearest_distance(feats, feats[0]).abs().max() < 1e-6  # every feature is in the memory
    assert nearest_distance(feats, -feats[0, :1]).max() <= 1.0 + 1e-6  # a feature against its own negative: 1
    grid = feats.view(1, 4, 4, 8)
    shifted = torch.roll(grid, shifts=1, dims=2).reshape(1, 16, 8)  # the reference moved one patch right
    inner = torch.tensor([p for p in range(16) if p % 4 not in (0, 3)])
    assert neighbourhood_distance(feats, shifted, radius=1)[0, inner].abs().max() < 1e-6
    assert neighbourhood_distance(feats, shifted, radius=0)[0, inner].min() > 1e-3


def test_neighbourhood_distance_is_the_nearest_reference_patch_within_the_radius():
    """Against a loop over every patch and its clamped neighbours (the replicated border), in uneven blocks of
    views, at radius 1 and 2; no view, no distance."""
    torch.manual_seed(3)
    feats, ref = (F.normalize(torch.randn(5, 25, 6), dim=-1) for _ in range(2))
    for radius in (1, 2):
        expected = torch.empty(5, 25)
        for v in range(5):
            for p in range(25):
                y, x = divmod(p, 5)
                near = [min(max(y + dy, 0), 4) * 5 + min(max(x + dx, 0), 4)
                        for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)]
                expected[v, p] = (1.0 - (ref[v, near] @ feats[v, p]).max()) / 2.0
        for views in (2, 64):
            got = neighbourhood_distance(feats, ref, radius, views=views)
            assert torch.allclose(got, expected, atol=1e-6)
    assert neighbourhood_distance(feats[:0], ref[:0], 1).shape == (0, 25)
    assert torch.allclose(neighbourhood_distance(feats, ref, 0), (1.0 - (feats * ref).sum(-1)) / 2.0, atol=1e-6)
    with pytest.raises(ValueError, match="square patch grid"):
        neighbourhood_distance(feats[:, :24], ref[:, :24], 1)


def test_nearest_distance_block_by_block_is_the_whole_matrix_maximum():
    """Blocks of features against blocks of the memory, uneven at both ends: each feature's distance is that of
    its most similar memory entry, as one matrix of every product gives it; shapes kept, no feature no distance."""
    gen = torch.Generator().manual_seed(5)
    feats = F.normalize(torch.randn(2, 700, 32, generator=gen), dim=-1)
    memory = F.normalize(torch.randn(2500, 32, generator=gen), dim=-1)
    whole = (1.0 - (feats @ memory.t()).amax(dim=-1)) / 2.0
    for rows, columns in ((1024, 2048), (97, 333), (1400, 2500)):
        got = nearest_distance(feats, memory, rows=rows, columns=columns)
        assert got.shape == whole.shape
        torch.testing.assert_close(got, whole, rtol=0, atol=1e-6)
    small = nearest_distance(feats[:, :5], memory[:30], rows=1, columns=1)  # a block a product
    torch.testing.assert_close(small, (1.0 - (feats[:, :5] @ memory[:30].t()).amax(dim=-1)) / 2.0, rtol=0, atol=1e-6)
    assert nearest_distance(feats[:, :0], memory).shape == (2, 0)


def test_window_embeddings_see_only_their_window(tiny_clip):
    visual = tiny_clip.clip.visual
    x = torch.randn(1, 3, 240, 240)
    with torch.no_grad():
        base = encode_windows(visual, x, 2)
        y = x.clone()
        y[..., 200:, 200:] += 3.0  # pixels far from window 0 (patches 0, 1, 15, 16)
        assert torch.allclose(encode_windows(visual, y, 2)[0, 0], base[0, 0], atol=1e-5)
        y = x.clone()
        y[..., :16, :16] += 3.0  # inside window 0
        assert not torch.allclose(encode_windows(visual, y, 2)[0, 0], base[0, 0], atol=1e-3)
        # the class token plus the window's tokens, run by hand through the blocks
        tokens = embed_patches(visual, x)
        seq = tokens[:, [0, 1, 2, 16, 17]]
        for block in visual.transformer.resblocks:
            seq = block(seq)
        manual = F.normalize(visual.ln_post(seq[:, 0]) @ visual.proj, dim=-1)
    assert torch.allclose(manual[0], base[0, 0], atol=1e-5)


def test_prompt_learner_matches_the_text_tower(tiny_clip):
    clip = tiny_clip.clip
    tok = open_clip_module().get_tokenizer("semclip-tiny")
    normal = tok(["X X X X wafer pattern."])
    manual = tok(["X X X X wafer pattern with scratch."])
    learned = tok(["X X X X wafer pattern with Y."])
    head = tok(["X X X X wafer pattern with"])[0]
    learner = PromptLearner(clip, normal, manual, learned, n_ctx=4, n_ab=1, ab_start=int((head != 0).sum()) - 1, seed=0)
    real = tok(["a sem image of wafer pattern with scratch."])
    with torch.no_grad():
        learner.ctx.copy_(clip.token_embedding(real)[:, 1:5])
        learner.ab_ctx.copy_(clip.token_embedding(tok(["scratch"]))[:, 1:2])
        n, m, lrn = learner()
        want = F.normalize(clip.encode_text(real), dim=-1)
        assert torch.allclose(m, want, atol=1e-5)  # the manual suffix prompt with that context
        assert torch.allclose(lrn, want, atol=1e-5)  # the learnable suffix set to "scratch"
        assert torch.allclose(n, F.normalize(clip.encode_text(tok(["a sem image of wafer pattern."])), dim=-1), atol=1e-5)


def _support(tiny_clip, synth_lot) -> tuple[TrainSet, object]:
    from semclip_batch.fewshot.trainset import load_trainset
    from semclip_batch.io.manifest import read_manifest
    from semclip_batch.methods.weights import preprocess_config

    prep = preprocess_config("semclip-tiny", tile_above=10**9)
    data = load_trainset(read_manifest(str(synth_lot / "manifest.csv")), load_prompts().classes, prep)
    return data, encode_views(tiny_clip.clip.visual, data.views, prep, (1, 2, 3, 4), windows=True)


def test_winclip_memory_makes_support_normals_score_low(tiny_clip, synth_lot):
    data, feats = _support(tiny_clip, synth_lot)
    model = new_model(ModelSpec(backbone="semclip-tiny", method="winclip"), tiny_clip.clip, torch.randn(7, 64))
    assert isinstance(model, WinClip)
    wf = feats.window_features(4)
    zero = model.patch_scores(wf)
    normal = normal_rows(data, "winclip")
    model.set_memory(wf.patches[normal].reshape(-1, 128), [w[normal].reshape(-1, 64) for w in wf.windows])
    few = model.patch_scores(wf)
    # normal images are in the memory: their few-shot distances are 0, so the map halves the zero-shot map
    assert torch.allclose(few[normal], 0.5 * zero[normal], atol=1e-5)
    assert (few[data.labels > 0] > 0.5 * zero[data.labels > 0] + 1e-6).any()


def test_promptad_learns_to_call_normal_features_normal(tiny_clip, synth_lot):
    data, feats = _support(tiny_clip, synth_lot)
    model = new_model(ModelSpec(backbone="semclip-tiny", method="promptad"), tiny_clip.clip, torch.randn(7, 64))
    losses = []
    summary = fit_promptad(model, tiny_clip.clip, "semclip-tiny", feats, data, seed=0,
                           progress=lambda e, n, loss: losses.append(loss))
    assert losses[-1] < losses[0] and summary["epochs"] == 100
    normal = normal_rows(data, "promptad")
    pooled = F.normalize(feats.dual.pooled[normal], dim=-1)
    assert float(model.state_probability(pooled).mean()) < 0.5
    assert len(model.memories()) == 4 and model.memories()[0].shape == (len(normal) * 225, 128)


@pytest.fixture(scope="module")
def baseline_checkpoints(synth_lot, tmp_path_factory):
    root = tmp_path_factory.mktemp("baselines")
    out = {}
    for method in ("winclip", "promptad"):
        meta = train(TrainConfig(support=str(synth_lot / "manifest.csv"), out=str(root / method), epochs=5,
                                 model=ModelSpec(backbone="semclip-tiny", pretrained="none", method=method,
                                                 cls="fused")))
        out[method] = (root / method, meta)
    return out


def test_baseline_checkpoints_record_their_method(baseline_checkpoints):
    for method, (ckpt, meta) in baseline_checkpoints.items():
        body = json.loads((ckpt / "checkpoint.json").read_text())
        assert body["method"] == method == meta.method
        tensors = load_checkpoint(str(ckpt)).tensors
        assert not any(k.startswith("visual.") for k in tensors)
        assert any(k.startswith("memory") for k in tensors) and "states" in tensors


@pytest.mark.ray
def test_run_uses_the_checkpoint_method(ray_cluster, baseline_checkpoints, synth_lot, tmp_path):
    for method, (ckpt, _) in baseline_checkpoints.items():
        result = run(RunConfig(input=str(synth_lot / "manifest.csv"), out=str(tmp_path / method),
                               model=CheckpointRequest(url=str(ckpt))))
        assert result.record["model_id"].startswith(f"{method}:semclip-tiny:")
        assert result.record["counts"] == {"ok": 14}
        preds = read_predictions(str(tmp_path / method)).to_pandas()
        assert preds["anomaly_score"].between(0, 1).all()


def test_method_options_and_missing_normals_are_refused(synth_lot, tmp_path):
    with pytest.raises(ConfigError, match="SEM-CLIP options"):
        TrainConfig(support="s", out="o", model=ModelSpec(method="winclip", use_vv=False, cls="fused"))
    with pytest.raises(ConfigError, match="--method must be one of"):
        TrainConfig(support="s", out="o", model=ModelSpec(method="patchcore", cls="fused"))
    df = pd.read_csv(synth_lot / "manifest.csv")
    df = df[df["label"] != "normal"]
    df["uri"] = [str(synth_lot / u) for u in df["uri"]]
    df["mask_uri"] = [str(synth_lot / u) for u in df["mask_uri"]]
    df["reference_uri"] = [str(synth_lot / u) for u in df["reference_uri"]]
    df.to_csv(tmp_path / "defects.csv", index=False)
    with pytest.raises(ConfigError, match="support set has none"):
        train(TrainConfig(support=str(tmp_path / "defects.csv"), out=str(tmp_path / "c"),
                          model=ModelSpec(backbone="semclip-tiny", method="promptad", cls="fused")))


def test_reference_scorer_fuses_only_rows_with_a_reference():
    scorer = ReferenceScorer((1,), weight=0.5, sigma=0.0)
    scorer.scale.fill_(0.1)
    maps = torch.full((2, 8, 8), 0.4)
    dist = torch.stack([torch.zeros(4), torch.full((4,), 0.1)])
    fused = scorer.fuse(maps, dist, torch.tensor([True, True]))
    assert torch.allclose(fused[0], torch.full((8, 8), 0.2)) and torch.allclose(fused[1], torch.full((8, 8), 0.45))
    kept = scorer.fuse(maps, dist, torch.tensor([False, True]))
    assert torch.equal(kept[0], maps[0])


@pytest.mark.ray
def test_reference_checkpoint_run_counts_missing_and_broken_references(ray_cluster, synth_lot, tmp_path):
    ckpt = tmp_path / "ref"
    meta = train(TrainConfig(support=str(synth_lot / "manifest.csv"), out=str(ckpt), epochs=2,
                             model=ModelSpec(backbone="semclip-tiny", pretrained="none", use_reference=True,
                                             cls="fused")))
    assert meta.use_reference and meta.training["with_reference"] == 14
    assert meta.training["reference_scale"] > 0
    lot = tmp_path / "lot"
    shutil.copytree(synth_lot, lot)
    df = pd.read_csv(lot / "manifest.csv").head(4)
    df.loc[1, "reference_uri"] = ""
    (lot / df.loc[2, "reference_uri"]).write_bytes(b"not an image")
    df.to_csv(lot / "manifest.csv", index=False)
    result = run(RunConfig(input=str(lot / "manifest.csv"), out=str(tmp_path / "o"),
                           model=CheckpointRequest(url=str(ckpt))))
    rec = result.record
    assert rec["rows"]["without_reference"] == 1 and rec["counts"] == {"ok": 3, REFERENCE_ERROR: 1}
    preds = read_predictions(str(tmp_path / "o")).to_pandas().set_index("uri")
    broken = preds.loc[df.loc[2, "uri"]]
    assert broken["status"] == REFERENCE_ERROR and "reference" in broken["error"] and np.isnan(broken["anomaly_score"])


@pytest.mark.parametrize("method", ["winclip", "promptad"])
def test_the_baselines_score_held_in_bf16_as_in_float32(method):
    """``run --precision bf16``: the baselines' class scores are taken in float32 from the pooled embedding, as
    SEM-CLIP's are (their states and class texts were left in bf16 beside it: every row a model_error). Built as
    ``run``'s actors build them: the vision tower alone, from the driver's checksum."""
    spec = ModelSpec(backbone="semclip-tiny", pretrained="shipped", method=method)
    text = np.random.default_rng(5).normal(size=(4, 64)).astype(np.float32)
    x = torch.randn(2, 3, 240, 240, generator=torch.Generator().manual_seed(6))
    sha = shipped_weights("semclip-tiny").sha256
    with torch.inference_mode():
        full = build_model(spec, text, sha)(x)
        half = build_model(spec, text, sha).to(torch.device("cpu"), torch.bfloat16)(x.bfloat16())
    assert torch.isfinite(half.maps).all() and torch.isfinite(half.class_probs).all()
    assert torch.allclose(half.maps.float(), full.maps, atol=0.05)
    assert torch.allclose(half.class_probs, full.class_probs, atol=0.05)
