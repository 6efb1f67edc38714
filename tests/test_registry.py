"""The method registry: a fourth method registered here, from the test, trains (``fewshot.train``) and scores
(``methods.scoring.build_model``, what ``run``'s actors build) with no other module changed; unknown names are
refused in one line."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from semclip_batch.config import ModelSpec
from semclip_batch.errors import ConfigError
from semclip_batch.fewshot.train import TrainConfig, fit, train
from semclip_batch.fewshot.trainset import TrainSet, load_trainset
from semclip_batch.io.manifest import read_manifest
from semclip_batch.io.preprocess import normalize
from semclip_batch.methods.checkpoint import load_checkpoint
from semclip_batch.methods.features import Features, encode_views
from semclip_batch.methods.fitting import Support, normal_rows
from semclip_batch.methods.prompts import load_prompts, text_embeddings
from semclip_batch.methods.registry import Method, depth_of, get_method, method_names, new_model, register, score_features
from semclip_batch.methods.scoring import build_model
from semclip_batch.methods.weights import LoadedBackbone, preprocess_config
from semclip_batch.model import SemClipOutput
from semclip_batch.model.encoder import EncoderOutput
from semclip_batch.model.scorer import Scorer
from semclip_batch.model.towers import vision_tower

ROOT = Path(__file__).resolve().parents[1]


class MeanDistance(Scorer):
    """Scores every patch by its distance to the mean normal patch token of the last block."""

    mean: torch.Tensor

    def __init__(self, clip: nn.Module, n_classes: int) -> None:
        super().__init__()
        self.visual = vision_tower(clip)
        self.tap = depth_of(clip)
        self.register_buffer("text_embeddings", torch.zeros(n_classes, self.visual.proj.shape[1]))
        self.register_buffer("text_scale", torch.tensor(10.0))
        self.register_buffer("mean", torch.zeros(self.visual.proj.shape[0]))

    def from_encoded(self, enc: EncoderOutput, size: tuple[int, int]) -> SemClipOutput:
        tokens = F.normalize(enc.original[0][:, 1:].float(), dim=-1)
        dist = (tokens - self.mean).norm(dim=-1).clamp(0, 1)
        grid = round(dist.shape[1] ** 0.5)
        maps = F.interpolate(dist.view(-1, 1, grid, grid), size=size, mode="bilinear")[:, 0]
        emb = F.normalize(enc.pooled.float(), dim=-1)
        return SemClipOutput(maps=maps, class_probs=(self.text_scale * emb @ self.text_embeddings.t()).softmax(-1),
                             embeddings=emb)


@register
class MeanDistanceMethod(Method[MeanDistance]):
    name = "mean-distance"

    def build(self, spec: ModelSpec, clip: nn.Module, text: torch.Tensor) -> MeanDistance:
        model = MeanDistance(clip, text.shape[0])
        model.set_text_embeddings(text)
        return model

    def taps(self, model: MeanDistance) -> tuple[int, ...]:
        return (model.tap,)

    def score(self, model: MeanDistance, feats: Features, size: tuple[int, int]) -> SemClipOutput:
        return model.from_encoded(feats.select((model.tap,), use_vv=False), size)

    def fit(self, model: MeanDistance, spec: ModelSpec, support: Support) -> dict[str, Any]:
        rows = normal_rows(support.data, self.name)
        tokens = support.feats.select((model.tap,), use_vv=False).original[0][rows, 1:]
        model.mean.copy_(F.normalize(tokens.float(), dim=-1).mean(dim=(0, 1)))
        return {"normal_images": int(rows.numel())}


def _support(backbone: LoadedBackbone, manifest: Path) -> tuple[TrainSet, Features, torch.Tensor]:
    prep = preprocess_config("semclip-tiny", tile_above=10**9)
    prompts = load_prompts()
    data = load_trainset(read_manifest(str(manifest)), prompts.classes, prep)
    feats = encode_views(vision_tower(backbone.clip), data.views, prep, (4,))
    return data, feats, torch.from_numpy(text_embeddings(backbone, prompts))


def test_a_method_registered_here_fits_and_scores_through_the_registry(tiny_clip, synth_lot, tmp_path):
    assert "mean-distance" in method_names() and method_names()[:3] == ("semclip", "winclip", "promptad")
    data, feats, text = _support(tiny_clip, synth_lot / "manifest.csv")
    fitted = fit(TrainConfig(support="", out="",
                             model=ModelSpec(backbone="semclip-tiny", method="mean-distance", cls="fused")), tiny_clip, text,
                 data, feats)
    model = fitted.model
    assert isinstance(model, MeanDistance) and fitted.summary == {"normal_images": int((data.labels == 0).sum())}
    normal_tokens = F.normalize(feats.dual.original[-1][data.labels == 0, 1:].float(), dim=-1)
    assert torch.allclose(model.mean, normal_tokens.mean(dim=(0, 1)), atol=1e-6)
    assert set(fitted.thresholds) == {"image", "pixel", "min_region_px"}

    # train() writes its checkpoint; the run's model stage rebuilds the method from it and scores raw views
    ckpt = tmp_path / "ckpt"
    train(TrainConfig(support=str(synth_lot / "manifest.csv"), out=str(ckpt),
                      model=ModelSpec(backbone="semclip-tiny", method="mean-distance", cls="fused")))
    tensors = load_checkpoint(str(ckpt)).tensors
    assert set(tensors) == {"text_embeddings", "text_scale", "mean"}
    assert torch.allclose(tensors["mean"], model.mean, atol=1e-6)
    spec = ModelSpec(backbone="semclip-tiny", method="mean-distance", checkpoint=str(ckpt))
    scoring = build_model(spec, tensors["text_embeddings"].numpy(), backbone=tiny_clip)
    assert (scoring.taps, scoring.vv_from, scoring.windows) == ((4,), None, False)
    prep = preprocess_config("semclip-tiny", tile_above=10**9)
    with torch.no_grad():
        out = scoring(normalize(data.views[:3], prep))
        want = score_features(model, feats.subset(torch.arange(3)), (240, 240))
    assert torch.allclose(out.maps, want.maps, atol=1e-5)
    assert torch.allclose(out.class_probs, want.class_probs, atol=1e-5)


def test_every_model_takes_class_text_through_one_method_into_a_buffer(tiny_clip):
    text = torch.randn(7, 64)
    for name in method_names():
        model = new_model(ModelSpec(backbone="semclip-tiny", method=name), tiny_clip.clip, text)
        assert model.method == name
        assert torch.allclose(model.state_dict()["text_embeddings"], F.normalize(text, dim=-1), atol=1e-6), name
        with pytest.raises(ValueError, match="text embeddings"):
            model.set_text_embeddings(torch.randn(3, 64))


def test_unknown_method_is_refused_in_one_line(tiny_clip):
    with pytest.raises(ConfigError, match=r"^--method must be one of semclip, winclip, promptad, .*got 'patchcore'$"):
        get_method("patchcore")
    with pytest.raises(ConfigError, match="--method must be one of"):
        TrainConfig(support="s", out="o", model=ModelSpec(method="patchcore", cls="fused"))
    with pytest.raises(ConfigError, match="--method must be one of"):
        build_model(ModelSpec(backbone="semclip-tiny", method="patchcore"), np.zeros((7, 64), np.float32),
                    backbone=tiny_clip)
    with pytest.raises(ConfigError, match="SEM-CLIP options"):
        TrainConfig(support="s", out="o", model=ModelSpec(method="mean-distance", use_vv=False, cls="fused"))

    class Other(MeanDistanceMethod):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register(Other)


def test_orchestration_never_branches_on_the_method():
    files = ["semclip_batch/pipeline/inference.py", "semclip_batch/methods/scoring.py", "semclip_batch/fewshot/train.py",
             "semclip_batch/fewshot/support_set.py", "semclip_batch/fewshot/maps_policy.py",
             "semclip_batch/fewshot/reference_fit.py", "semclip_batch/fewshot/support_maps.py",
             "semclip_batch/methods/features.py", "semclip_batch/methods/registry.py", "benchmarks/quality.py"]
    pattern = re.compile(r"method\s*[!=]=|isinstance\([^)]*(SemClip|WinClip|PromptAd)\b")
    hits = [f"{f}:{i}" for f in files for i, line in enumerate((ROOT / f).read_text().splitlines(), 1)
            if pattern.search(line)]
    assert not hits, hits
