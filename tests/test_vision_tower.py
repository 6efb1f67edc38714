"""The vision tower built in torch alone (``model/vit.py``) against open_clip's own, and the configs read as files."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from semclip_batch.config import ModelSpec
from semclip_batch.errors import WeightsError
from semclip_batch.methods import backbone_configs, weights
from semclip_batch.methods.backbone_configs import backbone_names, model_config, vision_config
from semclip_batch.methods.prompts import load_prompts, text_embeddings
from semclip_batch.methods.scoring import build_model
from semclip_batch.methods.weights import canonical_sha256, load_backbone, open_clip_module
from semclip_batch.model.encoder import encode_dual_path
from semclip_batch.model.vit import VisionBackbone, VisionConfig, VisionTransformer


def _tower_part(clip: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in clip.state_dict().items() if k.startswith(weights.BACKBONE_PREFIXES)}


def test_configs_read_as_files_are_open_clips():
    open_clip = open_clip_module()
    assert backbone_names() == tuple(sorted(open_clip.list_models()))
    assert "semclip-tiny" in backbone_names()
    for name in backbone_names():
        assert model_config(name) == open_clip.get_model_config(name), name
    assert model_config("no-such-backbone") is None


@pytest.mark.parametrize(("name", "expect"), [
    ("ViT-B-16", VisionConfig(224, 16, 768, 12, 12, 4.0, 512)),
    ("ViT-B-16-plus-240", VisionConfig(240, 16, 896, 12, 14, 4.0, 640)),
    ("ViT-B-32-quickgelu", VisionConfig(224, 32, 768, 12, 12, 4.0, 512, quick_gelu=True)),
    ("ViT-M-16-alt", VisionConfig(224, 16, 512, 12, 8, 4.0, 384, ls_init_value=1e-4)),
    ("RN50", None),  # a ResNet tower
    ("coca_ViT-B-32", None),  # attention pooling
    ("ViT-B-16-SigLIP", None),  # a timm tower
    ("ViT-L-14-CLIPA", None),  # another pooling
    ("no-such-backbone", None),
])
def test_vision_config_takes_the_plain_vit_only(name, expect):
    assert vision_config(name) == expect


def test_a_key_outside_the_plain_set_leaves_the_tower_to_open_clip(monkeypatch):
    base = model_config("semclip-tiny")
    for extra in ({"attentional_pool": True}, {"pool_type": "avg"}, {"some_future_option": 1}, {"image_size": [240, 200]},
                  {"layers": [3, 4, 6, 3]}):
        config = {**base, "vision_cfg": {**base["vision_cfg"], **extra}}
        monkeypatch.setattr(backbone_configs, "model_config", lambda name, c=config: c)
        assert vision_config("semclip-tiny") is None, extra
    for top in ({"nonscalar_logit_scale": True}, {"some_future_option": 1}):  # may change the tower or its logit scale
        config = {**base, **top}
        monkeypatch.setattr(backbone_configs, "model_config", lambda name, c=config: c)
        assert vision_config("semclip-tiny") is None, top


def test_a_config_registered_with_open_clip_at_run_time_is_known(monkeypatch):
    config = {**model_config("semclip-tiny"), "embed_dim": 32}
    # what open_clip.add_model_config does, undone after the test (the other tests compare open_clip's list to the files)
    monkeypatch.setitem(open_clip_module().factory._MODEL_CONFIGS, "semclip-tiny-registered-here", config)
    assert weights.check_backbone("semclip-tiny-registered-here")["embed_dim"] == 32
    assert weights.preprocess_config("semclip-tiny-registered-here", tile_above=1024).image_size == 240
    with pytest.raises(weights.ConfigError, match=r"^unknown backbone 'ViT-Nope' \(e\.g\. ViT-B-16-plus-240 or "
                                                 r"semclip-tiny; see open_clip\.list_models\(\)\)$"):
        weights.check_backbone("ViT-Nope")


@pytest.mark.parametrize("name", ["semclip-tiny", "ViT-M-16-alt", "ViT-B-32-quickgelu"])
def test_the_tower_computes_what_open_clips_computes(name):
    torch.manual_seed(0)
    clip = open_clip_module().create_model(name, pretrained=None).eval()
    cfg = vision_config(name)
    assert cfg is not None
    alone = VisionBackbone(cfg).eval()  # eval: nn.MultiheadAttention takes its fast path, as in open_clip.eval()
    alone.load_state_dict(_tower_part(clip))  # strict: the same names and shapes
    if cfg.ls_init_value is not None:  # LayerScale starts at 1e-4: make its branches count
        with torch.no_grad():
            for module in (clip.visual, alone.visual):
                for block in module.transformer.resblocks:
                    block.ls_1.gamma.fill_(0.7)
                    block.ls_2.gamma.fill_(1.3)
    x = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    with torch.inference_mode():
        assert torch.equal(clip.visual(x), alone.visual(x))
        ours = encode_dual_path(alone.visual, x, (2, cfg.layers), vv_from=2)
        theirs = encode_dual_path(clip.visual, x, (2, cfg.layers), vv_from=2)
    assert torch.equal(ours.pooled, theirs.pooled)
    for a, b in zip(ours.original + ours.vv, theirs.original + theirs.vv, strict=True):
        assert a is not None and b is not None and torch.equal(a, b)


def test_no_ln_pre_and_bf16_match_open_clips_tower():
    vit = pytest.importorskip("open_clip.transformer")
    torch.manual_seed(1)
    theirs = vit.VisionTransformer(image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp_ratio=2.0,
                                   no_ln_pre=True, output_dim=16).eval()
    ours = VisionTransformer(VisionConfig(32, 8, 64, 2, 4, 2.0, 16, ln_pre=False)).eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(theirs(x), ours(x))
        assert torch.equal(theirs.bfloat16()(x.bfloat16()), ours.bfloat16()(x.bfloat16()))


@pytest.fixture(scope="module")
def shipped_whole():
    return load_backbone("semclip-tiny", "shipped")


def test_vision_only_loads_the_checked_weights_tower_alone(shipped_whole):
    alone = load_backbone("semclip-tiny", "shipped", expected_sha256=shipped_whole.sha256, vision_only=True)
    assert isinstance(alone.clip, VisionBackbone)
    assert (alone.sha256, alone.source) == (shipped_whole.sha256, "shipped")
    want, got = _tower_part(shipped_whole.clip), alone.clip.state_dict()
    assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.parametrize("method", ["semclip", "winclip", "promptad"])
def test_scoring_models_on_the_tower_alone_score_as_on_the_whole_model(shipped_whole, method):
    spec = ModelSpec(backbone="semclip-tiny", pretrained="shipped", method=method, map_shifts=4)
    text = np.random.default_rng(3).normal(size=(4, 64)).astype(np.float32)
    whole = build_model(spec, text, backbone=shipped_whole)
    alone = build_model(spec, text, expected_sha256=shipped_whole.sha256)
    assert isinstance(alone.model.visual, VisionTransformer)
    x = torch.randn(2, 3, 240, 240)
    with torch.inference_mode():
        a, b = whole(x), alone(x)
    assert torch.equal(a.maps, b.maps) and torch.equal(a.class_probs, b.class_probs)


def test_vision_only_falls_back_to_the_whole_model(shipped_whole, monkeypatch):
    # random weights: open_clip's seeded init is the definition of them
    random = load_backbone("semclip-tiny", "none", seed=4, vision_only=True,
                           expected_sha256=load_backbone("semclip-tiny", "none", seed=4).sha256)
    assert not isinstance(random.clip, VisionBackbone) and hasattr(random.clip, "token_embedding")
    # no checksum to hold the file to: whole
    url = weights.shipped_path("semclip-tiny")
    assert not isinstance(load_backbone("semclip-tiny", url, vision_only=True).clip, VisionBackbone)
    # another tower
    monkeypatch.setattr(weights, "vision_config", lambda name: None)
    other = load_backbone("semclip-tiny", "shipped", expected_sha256=shipped_whole.sha256, vision_only=True)
    assert not isinstance(other.clip, VisionBackbone) and other.sha256 == shipped_whole.sha256


def test_vision_only_refuses_other_weights_as_the_whole_model_does(shipped_whole, tmp_path):
    changed = dict(shipped_whole.clip.state_dict())
    changed["transformer.resblocks.0.mlp.c_fc.bias"] = changed["transformer.resblocks.0.mlp.c_fc.bias"] + 1.0
    path = tmp_path / "text-changed.safetensors"
    save_file({k: v.contiguous() for k, v in changed.items()}, str(path))
    # only the text tower differs: the tower alone would be the same, but the weights are not the checked ones
    with pytest.raises(WeightsError, match="checksum mismatch"):
        load_backbone("semclip-tiny", str(path), expected_sha256=shipped_whole.sha256, vision_only=True)


def test_vision_only_refuses_a_pretrain_file_whose_header_records_another_checksum(shipped_whole, tmp_path):
    path = tmp_path / "damaged.safetensors"
    save_file({k: v.contiguous() for k, v in shipped_whole.clip.state_dict().items()}, str(path),
              metadata={"format": weights.PRETRAIN_FORMAT, "sha256": "0" * 64})
    for vision_only in (False, True):
        with pytest.raises(WeightsError, match="do not match the checksum they record"):
            load_backbone("semclip-tiny", str(path), expected_sha256=shipped_whole.sha256, vision_only=vision_only)


def test_the_tower_alone_holds_the_weights_and_nothing_on_the_meta_device(shipped_whole):
    loaded = load_backbone("semclip-tiny", "shipped", expected_sha256=shipped_whole.sha256, vision_only=True)
    alone = loaded.clip
    assert isinstance(alone, VisionBackbone)
    with pytest.raises(TypeError, match="no text tower"):  # the class texts need the whole model
        text_embeddings(loaded, load_prompts(None))
    assert not alone.training and all(t.device.type == "cpu" and t.dtype == torch.float32
                                      for t in [*alone.parameters(), *alone.buffers()])


def test_half_precision_files_hash_as_the_loaded_model_does(shipped_whole, tmp_path):
    path = tmp_path / "half.safetensors"
    save_file({k: v.half().contiguous() for k, v in shipped_whole.clip.state_dict().items()}, str(path))
    whole = load_backbone("semclip-tiny", str(path))
    alone = load_backbone("semclip-tiny", str(path), expected_sha256=whole.sha256, vision_only=True)
    assert isinstance(alone.clip, VisionBackbone) and alone.sha256 == whole.sha256
    assert whole.sha256 == canonical_sha256(whole.clip.state_dict())
    assert hashlib.sha256(path.read_bytes()).hexdigest() != whole.sha256


def test_the_model_actors_import_neither_open_clip_nor_torchvision(shipped_whole):
    code = textwrap.dedent(f"""
        import sys
        import numpy as np
        from semclip_batch.config import ModelSpec
        from semclip_batch.pipeline.inference import build_model
        spec = ModelSpec(backbone="semclip-tiny", pretrained="shipped")
        scoring = build_model(spec, np.zeros((3, 64), np.float32), "{shipped_whole.sha256}")
        print(type(scoring.model.visual).__module__)
        print(sorted({{m.split(".")[0] for m in sys.modules}} & {{"open_clip", "torchvision", "timm"}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split("\n")[:2] == ["semclip_batch.model.vit", "[]"], out.stdout + out.stderr
