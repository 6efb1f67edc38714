"""``train``'s support maps (``fewshot.support_maps.support_output``): scored in blocks of views, tiles for their maps
alone, they are the maps and whole views' class scores of one pass over every row, with and without a reference."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from semclip_batch.config import ModelSpec
from semclip_batch.fewshot.support_maps import VIEWS_A_BLOCK, support_output
from semclip_batch.fewshot.trainset import TrainSet
from semclip_batch.methods.features import encode_views
from semclip_batch.methods.prompts import load_prompts, text_embeddings
from semclip_batch.methods.registry import depth_of, get_method, new_model, score_features
from semclip_batch.methods.weights import preprocess_config
from semclip_batch.model.reference import ReferenceScorer, reference_taps
from semclip_batch.model.towers import vision_tower


@pytest.mark.parametrize("weight", [0.0, 0.3])
def test_blocks_of_views_with_tiles_scored_for_maps_alone_give_one_passs_maps_and_class_scores(tiny_clip, weight):
    gen = torch.Generator().manual_seed(5)
    # frame 0: whole view and 3 tiles; frame 1: whole view alone; frame 2: whole view and tiles past one block
    frame = torch.tensor([0] * 4 + [1] + [2] * (VIEWS_A_BLOCK + 4))
    n = len(frame)
    views = torch.rand(n, 240, 240, generator=gen)
    refs = (views + 0.05 * torch.randn(n, 240, 240, generator=gen)).clamp(0, 1)
    has_ref = torch.rand(n, generator=gen) > 0.3
    data = TrainSet(views=views.half(), masks=torch.zeros(n, 240, 240, dtype=torch.float16),
                    labels=torch.zeros(n, dtype=torch.long), has_mask=torch.ones(n, dtype=torch.bool), captions=[""] * n,
                    classes=("normal",), skipped=0, refs=refs.half(), has_ref=has_ref, frame=frame)
    spec = ModelSpec(backbone="semclip-tiny", memory=True, region_head=True, self_similarity=0.5)
    model = new_model(spec, tiny_clip.clip, torch.from_numpy(text_embeddings(tiny_clip, load_prompts()))).eval()
    model.memory.set_banks([torch.randn(64, bank.shape[1], generator=gen) for bank in model.memory.banks()])
    model.memory.weight.fill_(weight)
    prep = preprocess_config("semclip-tiny", tile_above=10**9)
    visual, depth = vision_tower(tiny_clip.clip), depth_of(tiny_clip.clip)
    feats = encode_views(visual, data.views, prep, get_method(spec.method).taps(model))
    reference = ReferenceScorer(reference_taps(depth), weight=0.5)
    reference.pixel_scale.fill_(0.2)
    ref_feats = encode_views(visual, data.refs, prep, reference_taps(depth), vv_from=None, pooled=False)
    pixels = torch.rand(n, 240, 240, generator=gen)
    whole = data.first_views()
    for ref, rfeats, pix in ((None, None, None), (reference, ref_feats, pixels)):
        with torch.no_grad():
            got = support_output(model, feats, data, ref, rfeats, pix)
            one_pass = score_features(model, feats, (240, 240), ref, rfeats, has_ref, pix)
        assert torch.allclose(got.maps, one_pass.maps, atol=1e-6)
        assert torch.allclose(got.class_probs[whole], one_pass.class_probs[whole], atol=1e-6)
        assert got.class_probs[~whole].isnan().all()  # never read: a tile's class scores are not taken
        assert torch.allclose(got.embeddings, one_pass.embeddings, atol=1e-6)
    assert not torch.allclose(got.maps, support_output(model, feats, data, None, None, None).maps, atol=1e-3)
    alone = TrainSet(views=data.views, masks=data.masks, labels=data.labels, has_mask=data.has_mask,
                     captions=data.captions, classes=data.classes, skipped=0, frame=torch.arange(n))
    with torch.no_grad():  # every view a frame's whole view: one pass a block, every class score taken
        got = support_output(model, feats, alone, None, None, None)
        one_pass = score_features(model, feats, (240, 240))
    assert torch.allclose(got.class_probs, one_pass.class_probs, atol=1e-6) and not got.class_probs.isnan().any()


def test_a_method_that_leaves_nothing_out_of_its_maps_only_scoring_is_scored_in_one_pass(tiny_clip, monkeypatch):
    """WinCLIP+'s ``score_maps`` is its ``score``: a block with tiles is not scored twice, and every class score is
    taken; a method that overrides ``without_memory`` and not ``memory_in_maps`` is taken to need its memory left
    out."""
    from semclip_batch.methods.registry import Method

    spec = ModelSpec(backbone="semclip-tiny", method="winclip")
    model = new_model(spec, tiny_clip.clip, torch.from_numpy(text_embeddings(tiny_clip, load_prompts()))).eval()
    method = get_method("winclip")
    assert not method.skips_in_maps_only() and get_method("semclip").skips_in_maps_only()
    assert not method.memory_in_maps(model)
    n = 6
    frame = torch.tensor([0, 0, 0, 1, 1, 1])
    data = TrainSet(views=torch.rand(n, 240, 240).half(), masks=torch.zeros(n, 240, 240, dtype=torch.float16),
                    labels=torch.zeros(n, dtype=torch.long), has_mask=torch.ones(n, dtype=torch.bool), captions=[""] * n,
                    classes=("normal",), skipped=0, frame=frame)
    feats = encode_views(vision_tower(tiny_clip.clip), data.views, preprocess_config("semclip-tiny", tile_above=10**9),
                         method.taps(model), windows=method.windows)
    calls: list[int] = []
    score = type(method).score
    monkeypatch.setattr(type(method), "score",
                        lambda self, m, f, size: calls.append(len(f.dual.pooled)) or score(self, m, f, size))
    with torch.no_grad():
        got = support_output(model, feats, data, None, None, None)
    assert calls == [n] and not got.class_probs.isnan().any()

    class Keeps(type(method)):  # type: ignore[misc]
        def without_memory(self, model):
            return super().without_memory(model)

    assert Keeps().memory_in_maps(model) and not Method.memory_in_maps(method, model)


def test_the_grey_memory_reads_held_out_maps_from_the_support_maps_where_the_memory_is_not_in_them(tiny_clip,
                                                                                                  monkeypatch):
    """``grey_memory_step``'s held-out maps: taken from the support maps already scored at the policy, in the held
    rows' order, where SEM-CLIP's memory is empty, left out or weighed 0; scored again (memory left out) otherwise."""
    from semclip_batch.fewshot import grey_memory_fit
    from semclip_batch.fewshot.grey_memory_fit import NativeFrame, _held_out_maps
    from semclip_batch.fewshot.support_maps import SupportMaps
    from semclip_batch.fewshot.support_set import Fitted

    spec = ModelSpec(backbone="semclip-tiny", memory=True)
    model = new_model(spec, tiny_clip.clip, torch.from_numpy(text_embeddings(tiny_clip, load_prompts()))).eval()
    method = get_method(spec.method)
    assert not method.memory_in_maps(model)  # empty
    model.memory.set_banks([torch.randn(8, bank.shape[1]) for bank in model.memory.banks()])
    model.memory.weight.fill_(0.0)
    assert not method.memory_in_maps(model)
    with method.without_memory(model):
        assert not method.memory_in_maps(model)
    model.memory.weight.fill_(0.25)
    assert method.memory_in_maps(model)

    prep = preprocess_config("semclip-tiny", tile_above=10**9)
    maps = torch.rand(4, 240, 240)
    scored = SupportMaps(frame=torch.arange(4), labels=torch.tensor([0, 1, 0, 1]), maps=maps,
                         class_probs=torch.rand(4, 7), prep=prep)
    frames = {p: NativeFrame(torch.randint(0, 255, (240, 240), dtype=torch.uint8).numpy(), None, True) for p in range(4)}
    rescored: list[int] = []
    monkeypatch.setattr(grey_memory_fit, "support_maps_at",
                        lambda *a, **k: rescored.append(1) or (_ for _ in ()).throw(RuntimeError("scored again")))
    fitted = Fitted(model, None, {}, {})
    cfg = type("Cfg", (), {"model": spec})()
    with pytest.raises(RuntimeError, match="scored again"):  # the memory is weighed in the maps: scored again
        _held_out_maps(cfg, pd.DataFrame({"uri": list("abcd")}), [3, 1], frames, (), tiny_clip, fitted, scored)  # type: ignore[arg-type]
    model.memory.weight.fill_(0.0)
    held = _held_out_maps(cfg, pd.DataFrame({"uri": list("abcd")}), [3, 1], frames, (), tiny_clip, fitted, scored)  # type: ignore[arg-type]
    assert [item.position for item in held] == [3, 1] and len(rescored) == 1
    assert torch.equal(held[0].map, maps[3]) and torch.equal(held[1].map, maps[1])
    assert held[1].defect and held[1].p_normal == pytest.approx(float(scored.class_probs[1][0]))
