"""The reference map: token distances and the registered pair's pixel difference, both relative to the
support set's normal scales, fused with the method's map; checkpoints record registration, weight and scales."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from semclip_batch.config import DEFAULT_REFERENCE_FUSION, DEFAULT_REFERENCE_WEIGHT, ModelSpec
from semclip_batch.errors import ConfigError, WeightsError
from semclip_batch.fewshot.train import TrainConfig, train
from semclip_batch.methods.checkpoint import load_checkpoint
from semclip_batch.methods.scoring import build_model
from semclip_batch.model.reference import ReferenceScorer, pixel_difference


def test_pixel_difference_finds_a_small_particle_that_tokens_dilute():
    gen = torch.Generator().manual_seed(0)
    ref = torch.rand(1, 64, 64, generator=gen) * 0.1
    view = ref + torch.randn(1, 64, 64, generator=gen) * 0.02
    view[0, 40:44, 20:24] += 1.0  # a 4 px particle
    diff = pixel_difference(view, ref)
    y, x = np.unravel_index(int(diff[0].argmax()), (64, 64))
    assert 40 <= y < 44 and 20 <= x < 24
    scorer = ReferenceScorer((1,), weight=1.0, sigma=0.0)
    scorer.scale.fill_(1.0)
    scorer.pixel_scale.fill_(float(torch.quantile(diff[0, :30].flatten(), 0.99)))
    tokens = torch.zeros(1, 16)  # no token distance anywhere (a 4 x 4 patch grid)
    fused = scorer.fuse(torch.zeros(1, 64, 64), tokens, torch.tensor([True]), diff)
    y, x = np.unravel_index(int(fused[0].argmax()), (64, 64))
    assert 40 <= y < 44 and 20 <= x < 24 and 0.4 < float(fused.max()) < 0.5  # mean of 0 and d / (d + s) < 1
    # without a pixel scale (checkpoints written before), tokens alone as before: clamp(d / (2 scale)), flat here
    scorer.pixel_scale.fill_(0.0)
    assert float(scorer.fuse(torch.zeros(1, 64, 64), tokens, torch.tensor([True]), diff).max()) == 0.0
    legacy = scorer.fuse(torch.zeros(1, 64, 64), torch.full((1, 16), 5.0), torch.tensor([True]), diff)
    assert torch.allclose(legacy, torch.ones(1, 64, 64))  # 5 / (2 x 1) clamped to 1, weight 1
    # rows without a reference keep the method's map
    method = torch.rand(1, 64, 64)
    assert torch.equal(scorer.fuse(method, tokens, torch.tensor([False]), diff), method)


def test_max_join_keeps_what_one_term_alone_sees():
    """A particle only the pixel term sees and a pattern change only the tokens see: ``mean`` halves each and
    lets a place where both are mildly raised (an edge) outrank both; ``max`` keeps each at its own score."""
    tokens = torch.zeros(1, 16)  # a 4 x 4 patch grid over 64 x 64 px
    tokens[0, 0] = 3.0  # a pattern change in the top-left patch: relative 0.75
    tokens[0, 15] = 1.0  # a mild mismatch in the bottom-right patch: relative 0.5
    pixels = torch.zeros(1, 64, 64)
    pixels[0, 36:40, 4:8] = 3.0  # a particle in the bottom-left patch: 0.75
    pixels[0, 48:64, 48:64] = 1.0  # and the mild mismatch's pixels: 0.5
    at = {"tokens": (4, 4), "particle": (38, 6), "edge": (60, 60)}  # bilinear upsampling: exact in the corners
    scores = {}
    for fusion in ("mean", "max"):
        scorer = ReferenceScorer((1,), weight=1.0, sigma=0.0, fusion=fusion)
        scorer.scale.fill_(1.0)
        scorer.pixel_scale.fill_(1.0)
        fused = scorer.fuse(torch.zeros(1, 64, 64), tokens, torch.tensor([True]), pixels)[0]
        scores[fusion] = {k: float(fused[y, x]) for k, (y, x) in at.items()}
    assert scores["mean"]["edge"] > max(scores["mean"]["tokens"], scores["mean"]["particle"])
    assert scores["max"] == pytest.approx({"tokens": 0.75, "particle": 0.75, "edge": 0.5})
    with pytest.raises(ValueError, match="fusion"):
        ReferenceScorer((1,), fusion="sum")
    with pytest.raises(ConfigError, match="reference fusion"):
        ModelSpec(reference_fusion="sum")
    # run ids of runs whose join did not change stay as they were
    assert "reference_fusion" not in ModelSpec(use_reference=True, reference_fusion="mean").output_affecting()
    assert ModelSpec(use_reference=True, reference_fusion="max").output_affecting()["reference_fusion"] == "max"


def test_relative_distances_rank_without_saturating():
    scorer = ReferenceScorer((1,))
    scorer.scale.fill_(0.01)
    rel = scorer.relative(torch.tensor([0.0, 0.01, 0.02, 0.1, 1.0]))
    assert rel[0] == 0 and rel[1] == pytest.approx(0.5)
    assert bool((rel[1:] > rel[:-1]).all()) and float(rel.max()) < 1.0  # 2x and 100x the scale stay apart


def _lot(tmp_path, n: int = 4, defects: int | None = None):
    """n normal frames, then ``defects`` (default n) with a particle, 96 px, each with its reference frame."""
    rng = np.random.default_rng(5)
    rows = ["uri,lot_id,wafer_id,die_x,die_y,label,mask_uri,reference_uri"]
    for i in range(n + (n if defects is None else defects)):
        base = (rng.random((96, 96)) * 40 + 60).astype(np.float32)
        base[:, 40:52] += 100
        img, ref = base + rng.normal(0, 3, base.shape), np.roll(base, (2, -3), axis=(0, 1))
        mask = np.zeros((96, 96), np.uint8)
        label = "normal" if i < n else "particle"
        if label == "particle":
            img[60:65, 20:25] = 250
            mask[60:65, 20:25] = 255
        for name, a in ((f"f{i}", img), (f"r{i}", ref), (f"m{i}", mask)):
            Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(tmp_path / f"{name}.png")
        rows.append(f"f{i}.png,L1,W1,{i},0,{label},m{i}.png,r{i}.png")
    (tmp_path / "s.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "s.csv"


def test_checkpoint_records_registration_weight_and_both_scales(tmp_path):
    manifest = _lot(tmp_path)
    spec = ModelSpec(backbone="semclip-tiny", pretrained="shipped", cls="fused", use_reference=True)
    meta = train(TrainConfig(support=str(manifest), out=str(tmp_path / "ck"), model=spec, epochs=1))
    assert meta.register_reference and meta.reference_weight == DEFAULT_REFERENCE_WEIGHT
    assert meta.training["reference_pixel_scale"] > 0 and meta.training["reference_scale"] > 0
    ckpt = load_checkpoint(str(tmp_path / "ck"))
    assert float(ckpt.tensors["reference.pixel_scale"]) == pytest.approx(meta.training["reference_pixel_scale"])
    built = build_model(ModelSpec(backbone="semclip-tiny", pretrained="shipped", cls="fused", use_reference=True,
                                  memory=meta.memory, region_head=meta.region_head, checkpoint=str(tmp_path / "ck")),
                        ckpt.tensors["text_embeddings"].numpy())
    assert built.reference is not None and float(built.reference.pixel_scale) > 0
    assert built.reference.weight == DEFAULT_REFERENCE_WEIGHT
    assert meta.reference_fusion == built.reference.fusion == DEFAULT_REFERENCE_FUSION
    # a checkpoint written before registration existed reads as unregistered, weight 0.5, tokens only
    body = json.loads((tmp_path / "ck" / "checkpoint.json").read_text())
    for key in ("register_reference", "reference_weight", "reference_fusion", "scale_policy"):
        body.pop(key)
    (tmp_path / "ck" / "checkpoint.json").write_text(json.dumps(body))
    old = load_checkpoint(str(tmp_path / "ck")).meta
    assert not old.register_reference and old.reference_weight == 0.5 and old.scale_policy is None
    assert old.reference_fusion == "mean"
    body["reference_fusion"] = "sum"  # a join this release does not know: refused in one line, as other fields
    (tmp_path / "ck" / "checkpoint.json").write_text(json.dumps(body))
    with pytest.raises(WeightsError, match="reference_fusion"):
        load_checkpoint(str(tmp_path / "ck"))
    no_reg = train(TrainConfig(support=str(manifest), out=str(tmp_path / "ck2"), epochs=1,
                               model=ModelSpec(backbone="semclip-tiny", pretrained="shipped", cls="fused",
                                               use_reference=True, register_reference=False)))
    # unregistered references (2, -3 px off) differ along every edge: a larger normal pixel scale
    assert not no_reg.register_reference
    assert no_reg.training["reference_pixel_scale"] > meta.training["reference_pixel_scale"]


def test_train_reference_weight_flag_is_stored_and_checked(tmp_path):
    """``train --reference-weight``: the fused map's reference share as the user sets it, in the checkpoint (which
    ``run --model`` reads it from, as every reference field); outside [0, 1] one line and exit 1 before anything
    is trained."""
    from click.testing import CliRunner

    from semclip_batch.cli import main

    manifest = _lot(tmp_path)
    base = ["train", "--adapt-steps", "0", str(manifest),
            "--backbone", "semclip-tiny", "--pretrained", "shipped", "--use-reference",
            "--epochs", "1"]
    runner = CliRunner()
    for bad in ("-0.1", "1.5"):
        res = runner.invoke(main, [*base, "--out", str(tmp_path / "bad"), "--reference-weight", bad])
        assert res.exit_code == 1 and res.output.strip().count("\n") == 0 and "--reference-weight" in res.output
        assert not (tmp_path / "bad").exists()
    res = runner.invoke(main, [*base, "--out", str(tmp_path / "ck"), "--reference-weight", "0.9"])
    assert res.exit_code == 0, res.output
    assert load_checkpoint(str(tmp_path / "ck")).meta.reference_weight == 0.9  # run --model scores with it
    assert ModelSpec(reference_weight=0.0).reference_weight == 0.0 and ModelSpec(reference_weight=1.0).reference_weight == 1.0


@pytest.mark.parametrize(("flags", "message"), [
    (["--recipe", "paper", "--reference-weight", "0.9"], "without references the model ignores --reference-weight:"),
    (["--no-self-reference", "--reference-fusion", "max", "--reference-weight", "0.5"],
     "without references the model ignores --reference-weight and --reference-fusion:"),
    (["--method", "winclip", "--reference-weight", "0.75"],  # the default value, but given
     "without references the model ignores --reference-weight:"),
    (["--no-register"], "--no-register applies to reference frames only"),  # cell references by default
])
def test_reference_options_without_references_are_refused(tmp_path, flags, message):
    """A reference option the model would store and ignore is refused in one line (naming what was given)
    before anything is read or trained. The transfer recipe's cell references count as references for the
    weight and the fusion; registration applies to reference frames only."""
    from click.testing import CliRunner

    from semclip_batch.cli import main

    res = CliRunner().invoke(main, ["train", "--adapt-steps", "0", str(tmp_path / "absent.csv"), "--out", str(tmp_path / "ck"),
                                    "--backbone", "semclip-tiny", "--pretrained", "shipped", *flags])
    assert res.exit_code == 1 and res.output.strip().count("\n") == 0, res.output
    assert res.output.startswith(f"Error: {message}") and "--use-reference" in res.output, res.output


@pytest.mark.parametrize("flags", [
    ["--reference-weight", "0.9", "--reference-fusion", "max"],  # cell references (recipe transfer's default)
    ["--method", "winclip", "--self-reference", "--reference-weight", "0.5"],
    ["--recipe", "paper", "--use-reference", "--no-register", "--reference-weight", "0.5"],
])
def test_reference_options_with_references_pass_the_check(tmp_path, flags):
    """Where the model has a reference scorer, the options pass on to reading the support set (absent here)."""
    from click.testing import CliRunner

    from semclip_batch.cli import main

    res = CliRunner().invoke(main, ["train", "--adapt-steps", "0", str(tmp_path / "absent.csv"), "--out", str(tmp_path / "ck"),
                                    "--backbone", "semclip-tiny", "--pretrained", "shipped", *flags])
    assert res.exit_code == 1 and "absent.csv" in res.output and "ignores" not in res.output, res.output


def _particles(n: int = 4, size: int = 64) -> torch.Tensor:
    """Truth masks: a 6 px square in each frame but the last (a normal frame)."""
    masks = torch.zeros(n, size, size)
    for i in range(n - 1):
        masks[i, 10 + 12 * i:16 + 12 * i, 30:36] = 1.0
    return masks


def test_auto_weight_follows_the_map_that_finds_the_defects():
    """``--reference-weight auto``'s rule on maps with known answers: where only the reference sees the
    particles the whole weight goes to it; where only the method does, the weight falls, to the largest one that
    still ranks every particle pixel first (ties go to the weight nearest the one given)."""
    from semclip_batch.fewshot.reference_fit import REFERENCE_WEIGHTS, choose_reference_weight

    gen = torch.Generator().manual_seed(3)
    masks = _particles()
    has_ref, has_mask, tokens = torch.ones(4, dtype=torch.bool), torch.ones(4, dtype=torch.bool), torch.zeros(4, 16)
    scorer = ReferenceScorer((1,), weight=DEFAULT_REFERENCE_WEIGHT, sigma=0.0, fusion="max")
    scorer.scale.fill_(1.0)
    scorer.pixel_scale.fill_(1.0)

    noise = torch.rand(4, 64, 64, generator=gen)
    # pixel differences: 0.5 on particles, up to 0.4 elsewhere; under w < 1 the method's noise mixes them up
    seen = masks + (1 - masks) * torch.rand(4, 64, 64, generator=gen) * (2 / 3)
    choice = choose_reference_weight(scorer, noise, tokens, has_ref, seen, masks, has_mask)
    assert choice["weight"] == scorer.weight == 1.0
    assert set(choice["pAUROC"]) == {str(w) for w in REFERENCE_WEIGHTS} and choice["pAUROC"]["1.0"] > 0.99
    assert choice["pAUROC"]["0.0"] < 0.6  # the method's noise alone

    found = masks * 0.9 + 0.05  # the method's map: 0.95 on particles, 0.05 elsewhere
    blind = torch.rand(4, 64, 64, generator=gen) * 3.0  # pixel differences everywhere alike: up to 0.75
    choice = choose_reference_weight(scorer, found, tokens, has_ref, blind, masks, has_mask)
    # w 0 / 0.25 / 0.5 rank every particle pixel first (0.95 (1 - w) > 0.05 (1 - w) + 0.75 w); 0.75 does not
    assert choice["F1max"]["0.5"] == 1.0 and choice["F1max"]["0.75"] < 1.0
    assert choice["weight"] == scorer.weight == 0.5


def test_auto_weight_ranks_by_pixel_auroc_before_f1max():
    """The rule's band: a weight whose F1max is best but whose pixel AUROC is more than 0.01 below the best is
    not chosen. The method finds two of three particles (F1max 0.8 at w <= 0.5, AUROC 2/3 alone); the
    reference ranks all three above most of the background, with a hot spot on the normal frame that outranks
    the particles from w 0.75 on (F1max 0.38), where the AUROC peaks (0.93 against 0.91 at w 0.5)."""
    from semclip_batch.fewshot.reference_fit import choose_reference_weight

    gen = torch.Generator().manual_seed(4)
    masks = _particles()
    method = 0.05 + 0.05 * torch.rand(4, 64, 64, generator=gen)
    method[:2][masks[:2] > 0] = 0.95
    method[2][masks[2] > 0] = 0.0
    rel = 0.7 * torch.rand(4, 64, 64, generator=gen)  # the reference map: particles 0.6, background up to 0.7
    rel[masks > 0] = 0.6
    rel[3, 40:54, 40:54] = 0.95
    scorer = ReferenceScorer((1,), weight=0.0, sigma=0.0, fusion="max")
    scorer.scale.fill_(1.0)
    scorer.pixel_scale.fill_(1.0)
    choice = choose_reference_weight(scorer, method, torch.zeros(4, 16), torch.ones(4, dtype=torch.bool),
                                     rel / (1 - rel), masks, torch.ones(4, dtype=torch.bool))  # d / (d + 1) = rel
    auroc, f1 = choice["pAUROC"], choice["F1max"]
    assert f1["0.5"] > f1["0.75"] + 0.3 and auroc["0.75"] - auroc["0.5"] > 0.01  # the case the band decides
    assert choice["weight"] == scorer.weight == 0.75


def test_train_auto_reference_weight_is_chosen_stored_and_scored_with(tmp_path):
    """``train --reference-weight auto`` on 20 support frames with references: the checkpoint holds the weight
    chosen on the 4 frames early stopping held out (recorded with every weight's figures), ``run --model`` builds
    its reference scorer with it, and every tensor is what the same training with a fixed weight writes (the
    choice leaves the fitted model as it was). With no held-out frames (under 10 support frames) the given weight
    is kept, saying why; a word other than 'auto' is refused in one line."""
    from click.testing import CliRunner

    from semclip_batch.cli import main
    from semclip_batch.fewshot.reference_fit import MIN_WEIGHT_FRAMES, REFERENCE_WEIGHTS

    manifest = _lot(tmp_path, n=4, defects=16)
    base = ["train", "--adapt-steps", "0", str(manifest),
            "--backbone", "semclip-tiny", "--pretrained", "shipped", "--use-reference",
            "--epochs", "2"]
    runner = CliRunner()
    res = runner.invoke(main, [*base, "--out", str(tmp_path / "bad"), "--reference-weight", "heavy"])
    assert res.exit_code == 1 and res.output.strip().count("\n") == 0 and "'auto'" in res.output, res.output
    res = runner.invoke(main, [*base, "--out", str(tmp_path / "ck"), "--reference-weight", " Auto "])
    assert res.exit_code == 0, res.output
    ckpt = load_checkpoint(str(tmp_path / "ck"))
    meta = ckpt.meta
    choice = meta.training["reference_weight_choice"]
    assert f"reference weight {choice['weight']:g} (auto)" in res.output
    assert "kept" not in choice, choice
    assert choice["frames"] == choice["views"] == 4 and choice["defect_frames_with_reference"] >= MIN_WEIGHT_FRAMES
    assert set(choice["pAUROC"]) == set(choice["F1max"]) == {str(w) for w in REFERENCE_WEIGHTS}
    assert meta.reference_weight == choice["weight"] and meta.training["config"]["choose_reference_weight"] is True
    built = build_model(ModelSpec(backbone="semclip-tiny", pretrained="shipped", cls="fused", use_reference=True,
                                  memory=meta.memory, region_head=meta.region_head,
                                  reference_weight=meta.reference_weight, checkpoint=str(tmp_path / "ck")),
                        ckpt.tensors["text_embeddings"].numpy())
    assert built.reference is not None and built.reference.weight == choice["weight"]
    res = runner.invoke(main, [*base, "--out", str(tmp_path / "fixed"), "--reference-weight", str(choice["weight"])])
    assert res.exit_code == 0, res.output
    fixed = load_checkpoint(str(tmp_path / "fixed")).tensors
    assert fixed.keys() == ckpt.tensors.keys() and any(k.startswith("memory.") for k in fixed)
    assert all(torch.equal(fixed[k], ckpt.tensors[k]) for k in fixed)

    (tmp_path / "few").mkdir()
    few = _lot(tmp_path / "few", n=4)
    res = runner.invoke(main, ["train", "--adapt-steps", "0", str(few),
                               "--out", str(tmp_path / "ck-few"), "--backbone", "semclip-tiny",
                               "--pretrained", "shipped", "--use-reference", "--epochs", "1", "--reference-weight", "auto"])
    assert res.exit_code == 0, res.output
    few_meta = load_checkpoint(str(tmp_path / "ck-few")).meta
    assert few_meta.reference_weight == DEFAULT_REFERENCE_WEIGHT
    assert "holds no support frames out" in few_meta.training["reference_weight_choice"]["kept"]


def test_auto_weight_reads_the_maps_run_writes():
    """A tiled frame's whole view gives class scores only (run writes its tiles' maps); an untiled frame's whole
    view is its map. Augmented copies repeat the frames and do not make an untiled frame look tiled."""
    from semclip_batch.fewshot.support_maps import emitted_views
    from semclip_batch.fewshot.trainset import TrainSet

    frame = torch.tensor([3, 5, 5, 5, 8] * 2)  # frame 5: whole view + 2 tiles; two copies
    n = len(frame)
    data = TrainSet(views=torch.zeros(n, 4, 4), masks=torch.zeros(n, 4, 4), labels=torch.zeros(n, dtype=torch.long),
                    has_mask=torch.ones(n, dtype=torch.bool), captions=[""] * n, classes=("normal",), skipped=0,
                    frame=frame)
    assert emitted_views(data, torch.arange(5)).tolist() == [True, False, True, True, True]
    assert emitted_views(data, torch.tensor([0, 4])).tolist() == [True, True]
    assert emitted_views(replace(data, frame=None), torch.arange(3)).tolist() == [True, True, True]


def test_auto_weight_is_kept_with_too_few_held_out_defect_frames_with_a_reference():
    """Held-out frames whose defects have no reference, and normal frames that have one, rank no weight: the
    given weight is kept and the record says why, before any feature is read."""
    from semclip_batch.fewshot.reference_fit import MIN_WEIGHT_FRAMES, held_out_reference_weight
    from semclip_batch.fewshot.trainset import TrainSet
    from semclip_batch.methods.fitting import HeldOutMaps

    n = 8
    masks = _particles(n, size=96)  # frames 0-6 with a particle, 7 normal
    has_ref = torch.zeros(n, dtype=torch.bool)
    has_ref[[0, 7]] = True  # one defect frame and the normal frame have a reference
    data = TrainSet(views=torch.zeros(n, 96, 96), masks=masks, labels=(masks.flatten(1).amax(1) > 0).long(),
                    has_mask=torch.ones(n, dtype=torch.bool), captions=[""] * n, classes=("normal", "particle"),
                    skipped=0, refs=torch.zeros(n, 96, 96), has_ref=has_ref, frame=torch.arange(n))
    scorer = ReferenceScorer((1,), weight=0.6)
    held = HeldOutMaps(rows=torch.arange(n), maps=torch.zeros(n, 96, 96), fitted=torch.zeros(0, dtype=torch.long))
    choice = held_out_reference_weight(scorer, held, None, None, data, None)
    assert int(data.labels.sum()) == 7 and MIN_WEIGHT_FRAMES > 1 and choice["defect_frames_with_reference"] == 1
    assert choice["weight"] == scorer.weight == 0.6 and choice["kept"].startswith(f"fewer than {MIN_WEIGHT_FRAMES}")
    assert choice["frames"] == choice["views"] == n


def test_the_support_fuser_keeps_the_reference_map_and_fuses_as_fuse_does():
    """train fuses one set of rows once per weight pair: the reference's own map is computed once for them, and the
    result is fuse's to the bit; other rows (same count), other scales and another weight are not served stale."""
    from types import SimpleNamespace

    from semclip_batch.fewshot.reference_fit import support_reference_fuser
    from semclip_batch.model.encoder import EncoderOutput

    gen = torch.Generator().manual_seed(2)
    tokens = lambda: EncoderOutput(pooled=torch.zeros(6, 8), original=[torch.randn(6, 17, 8, generator=gen)],  # noqa: E731
                                   vv=[None])
    image, reference = tokens(), tokens()
    has_ref = torch.tensor([True, False, True, True, False, True])
    pixels = torch.rand(6, 64, 64, generator=gen)
    scorer = ReferenceScorer((1,), weight=0.6, sigma=2.0)
    scorer.scale.fill_(0.3)
    scorer.pixel_scale.fill_(0.2)
    fuse = support_reference_fuser(scorer, SimpleNamespace(dual=image, taps=(1,)),  # type: ignore[arg-type]
                                   SimpleNamespace(dual=reference, taps=(1,)),  # type: ignore[arg-type]
                                   SimpleNamespace(has_ref=has_ref), pixels)  # type: ignore[arg-type]
    dist = scorer.distance(image, (1,), reference, (1,))
    calls = []
    real = scorer.reference_map
    scorer.reference_map = lambda *a, **k: calls.append(1) or real(*a, **k)  # type: ignore[method-assign]

    def check(maps: torch.Tensor, rows: torch.Tensor) -> None:
        expected = ReferenceScorer.fuse(scorer, maps, dist[rows], has_ref[rows], pixels[rows])
        assert torch.equal(fuse(maps, rows), expected)

    rows = torch.arange(6)
    for _ in range(3):  # the same rows, other maps: one reference map
        check(torch.rand(6, 64, 64, generator=gen), rows)
    assert len(calls) == 1 + 3  # the fuser's once, fuse's own three
    maps = torch.rand(6, 64, 64, generator=gen)
    check(maps, rows.flip(0))  # other rows, as many
    scorer.pixel_scale.fill_(0.05)  # another pixel scale alone
    check(maps, rows.flip(0))
    scorer.scale.fill_(0.9)  # another token scale alone
    check(maps, rows.flip(0))
    calls.clear()
    scorer.weight = 0.2  # another weight: read at every join, the kept map still serves
    check(maps, rows.flip(0))
    assert len(calls) == 1  # fuse's own only
    scorer.pixel_scale.fill_(0.0)  # the legacy form (tokens alone, clamped) through the fuser too
    check(maps, rows.flip(0))
    assert not torch.equal(fuse(maps, rows), maps)  # rows with a reference moved
