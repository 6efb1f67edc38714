"""In-frame self-similarity (model.selfsim): the patch unlike the rest of its frame scores, its own neighbours do not
vouch for it, and the weight travels from the CLI through the checkpoint to run."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from benchmark_module import load_benchmark
from click.testing import CliRunner

from semclip_batch.analysis.metrics import PixelCounts
from semclip_batch.cli.commands import main
from semclip_batch.config import (
    DEFAULT_MAP_SHIFTS,
    DEFAULT_SELF_SIMILARITY,
    CheckpointRequest,
    ModelSpec,
    RunConfig,
    zero_shot_spec,
)
from semclip_batch.errors import ConfigError, WeightsError
from semclip_batch.fewshot.recipes import RECIPES, applied, with_self_similarity
from semclip_batch.fewshot.train import TrainConfig, train
from semclip_batch.fewshot.trainset import TrainSet, load_trainset
from semclip_batch.io.frames import load_frame
from semclip_batch.io.manifest import read_manifest
from semclip_batch.io.preprocess import maps_to_frame
from semclip_batch.methods.checkpoint import load_checkpoint
from semclip_batch.methods.features import Features, encode_views
from semclip_batch.methods.fitting import Support
from semclip_batch.methods.prompts import load_prompts, text_embeddings
from semclip_batch.methods.registry import new_model, score_features
from semclip_batch.methods.semclip_method import MEMORY_WEIGHTS, SELF_WEIGHTS, choose_memory_weight
from semclip_batch.methods.weight_choice import choice_evidence, describe_choice, one_se_choice
from semclip_batch.methods.weights import load_backbone, preprocess_config
from semclip_batch.model.encoder import EncoderOutput
from semclip_batch.model.selfsim import SCALE, self_distance, self_scores
from semclip_batch.model.semclip import SemClip, SemClipConfig
from semclip_batch.model.towers import vision_tower
from semclip_batch.pipeline.identity import identify_model


def _grating(grid: int, width: int = 16, seed: int = 0) -> torch.Tensor:
    """``(1, grid * grid, width)`` tokens of a pattern that repeats every 3 columns."""
    gen = torch.Generator().manual_seed(seed)
    period = torch.randn(3, width, generator=gen)
    cols = torch.arange(grid).repeat(grid) % 3
    return period[cols][None]


def test_the_one_unlike_patch_scores_and_its_neighbours_do_not_vouch_for_it():
    grid = 9
    tokens = _grating(grid)
    odd = torch.randn(tokens.shape[-1], generator=torch.Generator().manual_seed(5))
    tokens[0, 4 * grid + 4] = odd
    tokens[0, 4 * grid + 5] = odd  # a defect two patches long: each half matches only the other
    d = self_distance(tokens)
    assert d.shape == (1, grid * grid)
    assert set(d[0].topk(2).indices.tolist()) == {4 * grid + 4, 4 * grid + 5}
    normal = torch.ones(grid * grid, dtype=torch.bool)
    normal[[4 * grid + 4, 4 * grid + 5]] = False
    assert float(d[0, normal].max()) < 1e-5  # the pattern recurs away from every normal patch
    # with no exclusion the two halves would match each other
    assert float(self_distance(tokens, radius=0)[0, 4 * grid + 4]) < 1e-5


def test_tiny_grids_score_nothing_and_odd_token_counts_are_refused():
    assert torch.equal(self_distance(torch.randn(2, 9, 8)), torch.zeros(2, 9))  # 3 x 3: every patch is a neighbour
    with pytest.raises(ValueError, match="square grid"):
        self_distance(torch.randn(1, 10, 8))


def test_scores_are_relative_to_the_frame_and_scaled():
    d = torch.tensor([[0.3, 0.3, 0.3, 0.3 + SCALE, 0.3 + 5 * SCALE], [0.0, 0.0, 0.0, 0.0, 0.0]])
    s = self_scores(d)
    assert torch.allclose(s, torch.tensor([[0.0, 0.0, 0.0, 0.5, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0]]))


def _encoding(tokens: torch.Tensor) -> EncoderOutput:
    cls = torch.zeros(tokens.shape[0], 1, tokens.shape[-1])
    full = torch.cat([cls, tokens], dim=1)
    return EncoderOutput(pooled=torch.randn(tokens.shape[0], 64), original=[full] * 4, vv=[None] * 4)


def test_the_weight_mixes_the_map_linearly(tiny_clip):
    grid = 15
    tokens = _grating(grid, width=128)
    tokens[0, 2 * grid + 11] = torch.randn(128, generator=torch.Generator().manual_seed(3))
    enc = _encoding(tokens)
    maps = {}
    for w in (0.0, 0.5, 1.0):
        model = SemClip(tiny_clip.clip, SemClipConfig(taps=(1, 2, 3, 4), self_similarity=w), n_classes=3).eval()
        model.set_text_embeddings(F.normalize(torch.randn(3, 64, generator=torch.Generator().manual_seed(1)), dim=-1))
        with torch.no_grad():
            maps[w] = model.from_encoded(enc, (240, 240)).maps[0]
    y, x = divmod(int(maps[1.0].argmax()), 240)
    assert (y // 16, x // 16) == (2, 11)  # the map's maximum on the unlike patch
    assert torch.allclose(maps[0.5], 0.5 * maps[0.0] + 0.5 * maps[1.0], atol=1e-5)  # blur and mix commute
    with pytest.raises(ValueError, match="must lie in"):
        SemClip(tiny_clip.clip, SemClipConfig(taps=(4,), self_similarity=1.5), n_classes=3)


def test_zero_shot_maps_find_more_defect_pixels_with_self_similarity(synth_lot):
    """The shipped backbone on the session's synthetic lot: pixel AUROC rises with the default weight."""
    backbone = load_backbone("semclip-tiny", "shipped")
    prompts = load_prompts()
    prep = preprocess_config("semclip-tiny", tile_above=10**9)
    df = read_manifest(str(synth_lot / "manifest.csv"))
    data = load_trainset(df, prompts.classes, prep)
    feats = encode_views(vision_tower(backbone.clip), data.views, prep, (1, 2, 3, 4))
    text = torch.from_numpy(text_embeddings(backbone, prompts))
    truth = [load_frame(u) > 0 for u in df["mask_url"]]
    auroc = {}
    for w in (0.0, DEFAULT_SELF_SIMILARITY):
        model = new_model(ModelSpec(backbone="semclip-tiny", pretrained="shipped", self_similarity=w), backbone.clip,
                          text)
        with torch.no_grad():
            out = score_features(model, feats, (data.views.shape[-2], data.views.shape[-1]))
        counts = PixelCounts()
        for i, mask in enumerate(truth):
            frame = maps_to_frame(out.maps[i:i + 1], mask.shape[0], mask.shape[1], []).numpy()
            counts.add(np.round(frame * 255).astype(np.uint8), mask)
        auroc[w] = counts.auroc()
    assert auroc[DEFAULT_SELF_SIMILARITY] > auroc[0.0] + 0.01, auroc


def test_zero_shot_spec_is_zero_shot_runs_defaults_with_given_values_kept():
    spec = zero_shot_spec("semclip-tiny", "shipped", scale_policy=1.0, seed=3)
    assert (spec.self_similarity, spec.defect_view, spec.scale_policy, spec.seed) == (DEFAULT_SELF_SIMILARITY, True, 1.0, 3)
    assert ModelSpec(backbone="semclip-tiny", pretrained="shipped").self_similarity == 0.0  # the library's stays off
    given = zero_shot_spec("semclip-tiny", "none", self_similarity=0.0, defect_view=False, precision="bf16")
    assert (given.self_similarity, given.defect_view, given.precision) == (0.0, False, "bf16")
    # the CLI's zero-shot run builds exactly this spec, with its --map-shifts (zero_shot_spec leaves them to the caller)
    from semclip_batch.cli.options import run_config

    cfg = run_config(input="lot.csv", out="out", model=None, backbone="semclip-tiny", pretrained="shipped",
                     pretrained_sha256=None, scale_policy="native", self_similarity=None, defect_view=None, seed=0,
                     prompts=None, precision="fp32", storage_option=(), threshold=None, pixel_threshold=None,
                     min_region_px=None, batch_size=8, actors=1, num_gpus=0.0, shard_size=64, tile_above=1024,
                     pattern=None, address=None, overwrite=False)
    assert cfg.model == zero_shot_spec("semclip-tiny", "shipped", scale_policy=1.0, map_shifts=DEFAULT_MAP_SHIFTS)


def test_the_weight_is_recorded_and_refused_where_it_does_not_apply(synth_lot, tmp_path):
    support = str(synth_lot / "manifest.csv")
    spec = ModelSpec(backbone="semclip-tiny", pretrained="none", cls="fused")
    assert applied(RECIPES["transfer"], spec).self_similarity == DEFAULT_SELF_SIMILARITY
    assert applied(RECIPES["paper"], spec).self_similarity == 0.0  # the paper's recipe stays the paper's
    assert applied(RECIPES["transfer"], replace(spec, method="winclip")).self_similarity == 0.0
    custom = train(TrainConfig(support=support, out=str(tmp_path / "c"), epochs=1, model=spec,
                               recipe=with_self_similarity(RECIPES["transfer"], 0.3)))
    assert custom.self_similarity == 0.3 and custom.memory  # a weight given is used as given, not chosen
    _, resolved, _ = identify_model(RunConfig(input=support, out=str(tmp_path / "o"),
                                               model=CheckpointRequest(url=str(tmp_path / "c"))))
    assert resolved.self_similarity == 0.3  # run scores with the checkpoint's weight
    assert load_checkpoint(str(tmp_path / "c")).meta.self_similarity == 0.3
    with pytest.raises(ConfigError, match=r"self-similarity weight .* must be in \[0, 1\], got 2"):
        with_self_similarity(RECIPES["paper"], 2.0)
    # a checkpoint written before the field reads as without it; a mangled value is refused in one line
    body = json.loads((tmp_path / "c" / "checkpoint.json").read_text())
    body.pop("self_similarity")
    (tmp_path / "c" / "checkpoint.json").write_text(json.dumps(body))
    assert load_checkpoint(str(tmp_path / "c")).meta.self_similarity == 0.0
    body["self_similarity"] = 7
    (tmp_path / "c" / "checkpoint.json").write_text(json.dumps(body))
    with pytest.raises(WeightsError, match="lacks or mangles 'self_similarity'"):
        load_checkpoint(str(tmp_path / "c"))
    # zero-shot runs carry it in their run id; older run ids (weight 0) stay as they were
    assert ModelSpec(self_similarity=0.8).output_affecting()["self_similarity"] == 0.8
    assert "self_similarity" not in ModelSpec().output_affecting()
    runner = CliRunner()
    baseline = runner.invoke(main, ["train", "--adapt-steps", "0", support, "--out", str(tmp_path / "w"), "--pretrained", "none",
                                    "--backbone", "semclip-tiny", "--method", "winclip", "--self-similarity", "0"])
    assert baseline.exit_code != 0 and "--self-similarity is a SEM-CLIP option" in baseline.output
    with_model = runner.invoke(main, ["run", support, "--out", str(tmp_path / "out"), "--model", str(tmp_path / "c"),
                                      "--self-similarity", "0.5"])
    assert with_model.exit_code != 0 and "--self-similarity applies to zero-shot runs" in with_model.output
    bad = runner.invoke(main, ["run", support, "--out", str(tmp_path / "out"), "--pretrained", "none", "--self-similarity",
                               "1.5"])
    assert bad.exit_code != 0 and "must be in [0, 1], got 1.5" in bad.output
    assert not (tmp_path / "out").exists()


def _search_support(model: SemClip, scores: dict, calls: list, choose: bool) -> Support:
    """Ten 240 px frames with a defect patch each, their features, and a map AUROC that reads the model's weights
    (a stand-in for real maps: the search must find the best-scoring pair and leave it set)."""
    n, grid = 10, 15
    tokens = torch.cat([_grating(grid, width=128, seed=k) for k in range(n)])
    masks = torch.zeros(n, 240, 240)
    masks[:, 32:48, 64:80] = 1.0
    data = TrainSet(torch.zeros(n, 240, 240), masks, torch.ones(n, dtype=torch.long), torch.ones(n, dtype=torch.bool),
                    [""] * n, ("normal", "x", "y"), 0)
    cls = torch.zeros(n, 1, 128)
    full = torch.cat([cls, tokens], dim=1)
    feats = Features(EncoderOutput(pooled=torch.randn(n, 64), original=[full] * 4, vv=[None] * 4), (1, 2, 3, 4))

    def auroc(maps: torch.Tensor, masks: torch.Tensor, has_mask: torch.Tensor) -> float:
        assert model.memory is not None
        return scores[(float(model.memory.weight), model.cfg.self_similarity)]

    def fuse(maps: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        calls.append(rows)
        return maps

    return Support(data=data, feats=feats, clip=model.visual, clip_name="semclip-tiny", map_auroc=auroc,
                   fuse_reference=fuse, choose_self_similarity=choose)


def test_the_fit_chooses_the_self_similarity_weight_with_the_memorys(tiny_clip):
    model = SemClip(tiny_clip.clip, SemClipConfig(taps=(1, 2, 3, 4), memory=True, self_similarity=0.8), 3).eval()
    enc = _search_support(model, {}, [], True).feats.select((1, 2, 3, 4))
    grid = [(wm, ws) for wm in MEMORY_WEIGHTS for ws in (*SELF_WEIGHTS, 0.8)]
    scores = {(wm, ws): -(wm - 0.25) ** 2 - (ws - 0.5) ** 2 for wm, ws in grid}
    calls: list = []
    support = _search_support(model, scores, calls, True)
    choice = choose_memory_weight(model, enc, support)
    assert (choice.memory_weight, choice.self_similarity) == (0.25, 0.5)
    assert model.cfg.self_similarity == 0.5 and float(model.memory.weight) == 0.25  # left set for what follows
    assert len(calls) == len(grid) and all(torch.equal(c, torch.arange(10)) for c in calls)  # every map fused
    # the evidence the checkpoint records: every pair tried, the chosen one's and the zero-shot pair's AUROC
    assert choice.evidence["chosen"] == [0.25, 0.5] and len(choice.evidence["pairs"]) == len(grid)
    assert choice.evidence["pairs"]["0.25,0.5"] == 0.0 and choice.evidence["zero_shot_pAUROC"] == round(scores[0.0, 0.8], 4)
    # ties: the weight given wins
    flat = dict.fromkeys(scores, 0.0)
    model.cfg = replace(model.cfg, self_similarity=0.8)
    choice = choose_memory_weight(model, enc, _search_support(model, flat, [], True))
    assert (choice.memory_weight, choice.self_similarity) == (0.0, 0.8)
    # not asked to choose (train --self-similarity W): the weight given, whatever the maps say
    model.cfg = replace(model.cfg, self_similarity=0.3)
    scores.update({(wm, 0.3): -1.0 - (wm - 0.25) ** 2 for wm in MEMORY_WEIGHTS})  # worse than any chosen pair
    choice = choose_memory_weight(model, enc, _search_support(model, scores, [], False))
    assert (choice.memory_weight, choice.self_similarity) == (0.25, 0.3)


def test_the_searchs_smoothed_parts_joined_per_pair_give_the_maps_from_encoded_gives(tiny_clip):
    """The weight search smooths the map's parts once and joins them per pair: the same maps as scoring the model
    at each pair (join, then smooth), for every pair tried."""
    model = SemClip(tiny_clip.clip, SemClipConfig(taps=(1, 2, 3, 4), memory=True, self_similarity=0.8), 3).eval()
    model.set_text_embeddings(F.normalize(torch.randn(3, 64, generator=torch.Generator().manual_seed(2)), dim=-1))
    enc = _search_support(model, {}, [], True).feats.select((1, 2, 3, 4))
    assert model.memory is not None
    model.memory.set_banks([t[:3].flatten(0, 1) for t in model.memory.tokens(enc, model.cfg.taps)])
    model.memory.scale.fill_(0.05)
    with torch.no_grad():
        dist = model.memory_distance(enc)
        parts = model.map_parts(enc, (240, 240), dist, with_self=True).smoothed(model.cfg.sigma)
        for w, sw in [(0.0, 0.8), (0.25, 0.0), (0.75, 0.5), (1.0, 1.0)]:
            model.memory.weight.fill_(w)
            model.cfg = replace(model.cfg, self_similarity=sw)
            expected = model.from_encoded(enc, (240, 240), dist).maps
            assert expected.std() > 0
            assert torch.allclose(model.fused_map(parts).clamp(0.0, 1.0), expected, atol=1e-5)


def test_the_zero_shot_map_is_kept_unless_the_best_weights_beat_it_by_more_than_one_standard_error():
    anchor, best = (0.0, 0.8), (0.5, 0.25)
    steady = {anchor: (0.90, [0.90, 0.89, 0.91, 0.90, 0.90]), best: (0.93, [0.93, 0.92, 0.94, 0.93, 0.93]),
              (1.0, 0.8): (0.80, [0.80] * 5)}
    assert one_se_choice(steady, 0.8) == best  # +0.03 on every fold: the support's memory helps
    # the same +0.03 overall, from noisy folds: SE 0.033 (ddof 1) just above the gain, 0.029 with ddof 0
    noisy = {**steady, best: (0.93, [0.99, 0.84, 0.98, 0.85, 0.99])}
    assert one_se_choice(noisy, 0.8) == anchor
    assert one_se_choice({best: steady[best], (1.0, 0.8): steady[(1.0, 0.8)]}, 0.8) == best  # no zero-shot map tried
    assert one_se_choice({anchor: (0.9, [0.9]), best: (0.95, [0.95])}, 0.8) == best  # one fold: no standard error
    assert one_se_choice({anchor: (0.9, [0.9] * 5), (0.0, 0.5): (0.9, [0.9] * 5)}, 0.8) == anchor  # ties: the given


def test_the_choice_is_recorded_with_its_evidence_and_described_in_one_line():
    anchor, best = (0.0, 0.8), (0.5, 0.25)
    steady = {(1.0, 0.8): (float("nan"), [0.80] * 5), anchor: (0.90, [0.90, 0.89, 0.91, 0.90, 0.90]),
              best: (0.93, [0.93, 0.92, 0.94, 0.93, 0.93])}  # an undefined AUROC first: it never ranks best
    record = choice_evidence(steady, 0.8)
    assert record["chosen"] == [0.5, 0.25] and record["best"] == [0.5, 0.25] and record["zero_shot_pair"] == [0.0, 0.8]
    assert record["gain"] == 0.03 and record["folds"] == 5
    assert record["standard_error"] == 0.0 and record["gain_in_standard_errors"] is None  # +0.03 on every fold
    assert record["pairs"] == {"0,0.8": 0.9, "0.5,0.25": 0.93, "1,0.8": None}  # NaN (no AUROC) -> null in JSON
    json.dumps(record, allow_nan=False)  # the checkpoint's metadata is strict JSON
    line = describe_choice(record)
    assert line == ("memory weight 0.5, self-similarity 0.25: pixel AUROC 0.930 against 0.900 for the zero-shot pair "
                    "(0, 0.8) in the support folds: gain +0.030, no standard error")
    noisy = {**steady, best: (0.93, [0.99, 0.84, 0.98, 0.85, 0.99])}
    kept = choice_evidence(noisy, 0.8)
    assert kept["chosen"] == [0.0, 0.8] and kept["best"] == [0.5, 0.25] and kept["chosen_pAUROC"] == 0.9
    assert kept["standard_error"] == pytest.approx(0.033, abs=5e-4) and kept["gain_in_standard_errors"] == 0.9129
    line = describe_choice(kept)
    assert line is not None and line.startswith("memory weight 0, self-similarity 0.8 (the zero-shot pair, kept): "
                                                "the best, (0.5, 0.25), scored 0.930 against 0.900")
    assert line.endswith("gain +0.030, 0.9 standard errors, not more than one")
    only = {anchor: (0.9, [0.9] * 5), (1.0, 0.8): (0.8, [0.8] * 5)}
    line = describe_choice(choice_evidence(only, 0.8))
    assert line == "memory weight 0, self-similarity 0.8 (the zero-shot pair): the best in the support folds (pixel AUROC 0.900)"
    one_fold = {anchor: (0.9, [0.9]), best: (0.93, [0.93])}  # no standard error: the best is taken, and said so
    record = choice_evidence(one_fold, 0.8)
    assert record["chosen"] == [0.5, 0.25] and record["standard_error"] is None and record["gain_in_standard_errors"] is None
    assert describe_choice({}) is None  # nothing cross-validated (under 5 frames): no line


def test_grids_too_small_to_compare_leave_the_map_as_it_was(tiny_clip):
    """3 x 3 patches: every patch is in every other's neighbourhood; the map is not scaled down by the weight."""
    tokens = torch.randn(2, 9, 128)
    maps = []
    for w in (0.0, 0.8):
        model = SemClip(tiny_clip.clip, SemClipConfig(taps=(1, 2, 3, 4), self_similarity=w), n_classes=3).eval()
        model.set_text_embeddings(F.normalize(torch.randn(3, 64, generator=torch.Generator().manual_seed(1)), dim=-1))
        with torch.no_grad():
            maps.append(model.from_encoded(_encoding(tokens), (48, 48)).maps)
    assert torch.equal(maps[0], maps[1])


def test_the_weight_choice_benchmark_reads_each_rules_pair_off_the_record():
    """benchmarks/weight_choice.py: one-SE is the fit's own choice; two-SE keeps the zero-shot pair unless the best
    gained more than two standard errors; with no standard error every rule takes the best."""
    bench = load_benchmark("weight_choice")
    anchor, best = (0.0, 0.8), (0.5, 0.25)
    scores = {anchor: (0.90, [0.90, 0.89, 0.91, 0.90, 0.90]), best: (0.93, [0.95, 0.90, 0.96, 0.91, 0.93])}
    record = choice_evidence(scores, 0.8)  # +0.03, SE 0.0089: 3.4 standard errors
    assert bench.rule_choices(record) == {"one-SE": "0.5,0.25", "two-SE": "0.5,0.25", "zero-shot pair": "0,0.8"}
    scores[best] = (0.93, [0.97, 0.88, 0.97, 0.89, 0.94])  # +0.03, SE 0.0170: 1.8 standard errors
    record = choice_evidence(scores, 0.8)
    assert bench.rule_choices(record) == {"one-SE": "0.5,0.25", "two-SE": "0,0.8", "zero-shot pair": "0,0.8"}
    scores[best] = (0.93, [0.99, 0.84, 0.98, 0.85, 0.99])  # within one standard error: every rule keeps zero-shot
    record = choice_evidence(scores, 0.8)
    assert set(bench.rule_choices(record).values()) == {"0,0.8"}
    one_fold = {anchor: (0.9, [0.9]), best: (0.93, [0.93])}  # no standard error: the best, under every rule
    record = choice_evidence(one_fold, 0.8)
    assert record["gain_in_standard_errors"] is None and bench.rule_choices(record)["two-SE"] == "0.5,0.25"
    with pytest.raises(SystemExit, match="no weight choice"):
        bench.rule_choices({})  # under 5 support frames the fit records nothing to compare
