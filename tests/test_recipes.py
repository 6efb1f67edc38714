"""train's recipes (paper / transfer), their parts (augmentation, normal-patch memory, region head) and the
pretraining that learns on new data (crops at native resolution, area-balanced draws, a held-out check)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from semclip_batch.cli.commands import main
from semclip_batch.cli.options import pretrain_steps
from semclip_batch.config import DEFAULT_PRETRAIN_STEPS, DEFAULT_SELF_SIMILARITY, ModelSpec
from semclip_batch.errors import ConfigError
from semclip_batch.fewshot.augment import TRANSFORMS, augment
from semclip_batch.fewshot.class_texts import text_separation
from semclip_batch.fewshot.heldout import heldout_split
from semclip_batch.fewshot.pretrain import (
    PretrainConfig,
    area_buckets,
    balanced_weights,
    budgeted_steps,
    pretrain,
    resumed_schedule,
)
from semclip_batch.fewshot.recipes import RECIPES, get_recipe
from semclip_batch.fewshot.train import TrainConfig, train
from semclip_batch.fewshot.trainset import TrainSet, crop_views, load_trainset
from semclip_batch.io.manifest import read_manifest
from semclip_batch.methods.checkpoint import load_checkpoint
from semclip_batch.methods.scoring import build_model
from semclip_batch.methods.semclip_method import MEMORY_WEIGHTS, SELF_WEIGHTS
from semclip_batch.methods.weights import preprocess_config
from semclip_batch.model.encoder import EncoderOutput
from semclip_batch.model.memory import MAX_MEMORY, PatchMemory
from semclip_batch.model.patchops import grid_to_image
from semclip_batch.model.semclip import MapParts, SemClip, SemClipConfig, join_parts


def _set(n: int = 3, size: int = 16) -> TrainSet:
    gen = torch.Generator().manual_seed(0)
    views = torch.rand(n, size, size, generator=gen).half()
    masks = torch.zeros(n, size, size, dtype=torch.float16)
    masks[:, 2:5, 9:14] = 1.0
    return TrainSet(views, masks, torch.arange(n), torch.ones(n, dtype=torch.bool), ["a", "b", "c"][:n],
                    ("normal", "x", "y"), 0, refs=views.clone(), has_ref=torch.ones(n, dtype=torch.bool))


def test_augment_is_copy_major_and_moves_masks_with_views():
    data = _set()
    aug = augment(data)
    n, k = len(data), len(TRANSFORMS)
    assert len(aug) == n * k and aug.captions == data.captions * k
    assert torch.equal(aug.labels, data.labels.repeat(k))
    assert torch.equal(aug.views[:n], data.views)  # copy 0 is the identity
    for c, f in enumerate(TRANSFORMS.values()):
        rows = slice(c * n, (c + 1) * n)
        assert torch.equal(aug.views[rows], f(data.views)) and torch.equal(aug.masks[rows], f(data.masks))
        assert aug.refs is not None and torch.equal(aug.refs[rows], f(data.views))
    # the defect pixels stay under the same image pixels in every copy
    for c in range(k):
        m = aug.masks[c * n] > 0
        assert torch.equal(aug.views[c * n][m].sort().values, data.views[0][data.masks[0] > 0].sort().values)


def _enc(tokens: torch.Tensor) -> EncoderOutput:
    """An encoding with the same ``(B, 1 + N, W)`` tokens at every tap."""
    return EncoderOutput(pooled=tokens[:, 0, :8], original=[tokens] * 4, vv=[None] * 4)


def test_memory_distance_scale_and_fusion():
    mem = PatchMemory(taps=(2, 3), width=4)
    assert mem.empty
    e = torch.eye(4)
    mem.set_banks([e[:2], e[:2]])
    tokens = torch.zeros(1, 1 + 4, 4)
    tokens[0, 1:] = torch.stack([e[0], e[1], e[2], -e[0]])
    d = mem.distance(_enc(tokens), (1, 2, 3, 4))
    assert torch.allclose(d, torch.tensor([[0.0, 0.0, 0.5, 0.5]]))  # in memory, orthogonal, opposite -> nearest e1
    mem.scale.fill_(0.25)
    assert torch.allclose(mem.patch_scores(d), torch.tensor([[0.0, 0.0, 1.0, 1.0]]))
    maps = torch.full((1, 8, 8), 0.3)
    parts = MapParts(maps, grid_to_image(mem.patch_scores(d), (8, 8)), None)
    assert torch.equal(join_parts(parts, 0.0, 0.8), maps)  # no self-similarity part: its weight is ignored
    fused = join_parts(parts, 1.0, 0.0)
    assert fused[0, 0, 0] < 0.01 and fused[0, -1, -1] > 0.99  # the grid's top-left patch is remembered
    half = join_parts(MapParts(maps, parts.memory, torch.ones(1, 8, 8)), 0.5, 0.5)
    assert torch.allclose(half, 0.5 * (0.5 * maps + 0.5 * parts.memory) + 0.5)


def test_memory_scores_are_relative_to_the_frame():
    """A frame unlike every support frame as a whole (all patches far) is not flagged everywhere; its outlier is."""
    mem = PatchMemory(taps=(1,), width=4)
    mem.scale.fill_(0.1)
    far = torch.full((2, 9), 0.3)
    far[1, 4] = 0.5  # one patch stands out in the second frame
    scores = mem.patch_scores(far)
    assert torch.equal(scores[0], torch.zeros(9))
    assert scores[1, 4] > 0.99 and int((scores[1] > 0).sum()) == 1


def test_memory_keeps_a_seeded_subset_beyond_its_cap():
    big = torch.randn(MAX_MEMORY + 100, 4)
    a, b = PatchMemory((1,), 4), PatchMemory((1,), 4)
    a.set_banks([big], seed=3)
    b.set_banks([big], seed=3)
    assert a.banks()[0].shape == (MAX_MEMORY, 4) and torch.equal(a.banks()[0], b.banks()[0])
    assert torch.allclose(a.banks()[0].norm(dim=-1), torch.ones(MAX_MEMORY))


def test_region_embedding_is_the_most_anomalous_patches(tiny_clip):
    model = SemClip(tiny_clip.clip, SemClipConfig(taps=(1, 2, 3, 4), region_head=True, region_share=0.0), n_classes=3)
    n = 225
    tokens = torch.randn(2, 1 + n, 128)
    logits = torch.zeros(2, n, 3)
    logits[0, 17, 0], logits[1, 200, 0] = -20.0, -20.0  # only these patches are not normal
    region = model.region_embedding(_enc(tokens), [logits], None)
    assert region is not None
    visual = model.visual
    for b, p in ((0, 17), (1, 200)):
        expected = torch.nn.functional.normalize(visual.ln_post(tokens[b, 1 + p]) @ visual.proj, dim=-1)
        assert torch.allclose(region[b], expected, atol=1e-5)
    assert SemClip(tiny_clip.clip, SemClipConfig(taps=(4,)), 3).region_embedding(_enc(tokens), [logits], None) is None


def test_recipes_and_their_record(synth_lot, tmp_path):
    with pytest.raises(ConfigError, match="--recipe must be one of paper, transfer"):
        get_recipe("magic")
    support = str(synth_lot / "manifest.csv")
    spec = ModelSpec(backbone="semclip-tiny", pretrained="none", cls="fused")
    paper = train(TrainConfig(support=support, out=str(tmp_path / "p"), epochs=1, recipe=RECIPES["paper"], model=spec))
    assert (paper.recipe, paper.memory, paper.region_head) == ("paper", False, False)
    assert not any(k.startswith("memory.") for k in load_checkpoint(str(tmp_path / "p")).tensors)
    winclip = train(TrainConfig(support=support, out=str(tmp_path / "w"), model=ModelSpec(
        backbone="semclip-tiny", pretrained="none", method="winclip", cls="fused")))
    assert (winclip.recipe, winclip.memory, winclip.training["rows_augmented"]) == ("winclip", False, 14)


def test_transfer_checkpoint_scores_as_fitted(synth_lot, tmp_path):
    """run rebuilds the memory (its size from the checkpoint), region head and weights: same maps and classes."""
    out = tmp_path / "t"
    meta = train(TrainConfig(support=str(synth_lot / "manifest.csv"), out=str(out), epochs=2,
                             model=ModelSpec(backbone="semclip-tiny", pretrained="none", cls="fused")))
    ckpt = load_checkpoint(str(out))
    assert meta.self_similarity == meta.training["self_similarity"]  # the weight the fit chose is the one recorded
    choice = ckpt.meta.training["weights_choice"]  # and the support folds' evidence for it, read back
    assert choice["chosen"] == [meta.training["memory_weight"], meta.self_similarity]
    assert len(choice["pairs"]) == len(MEMORY_WEIGHTS) * len({*SELF_WEIGHTS, DEFAULT_SELF_SIMILARITY})
    assert choice["zero_shot_pair"] == [0.0, DEFAULT_SELF_SIMILARITY]
    spec = ModelSpec(backbone="semclip-tiny", pretrained="none", taps=meta.taps, cls=meta.cls, memory=meta.memory,
                     region_head=meta.region_head, self_similarity=meta.self_similarity, checkpoint=str(out))
    scoring = build_model(spec, ckpt.tensors["text_embeddings"].numpy(), tensors=ckpt.tensors)
    model = scoring.model
    assert isinstance(model, SemClip) and model.memory is not None
    assert model.memory.banks()[0].shape == ckpt.tensors["memory.bank0"].shape
    assert float(model.memory.weight) == float(ckpt.tensors["memory.weight"])
    x = torch.randn(2, 3, 240, 240)
    with torch.no_grad():
        out1 = model(x)
        model.memory.weight.fill_(0.0)
        out0 = model(x)
    if float(ckpt.tensors["memory.weight"]) > 0:
        assert not torch.allclose(out1.maps, out0.maps)  # the memory takes part in the map
    # `run --precision bf16` holds the whole model, memory banks included, in bf16: it scores, close to fp32
    model.memory.weight.copy_(ckpt.tensors["memory.weight"])
    half = build_model(spec, ckpt.tensors["text_embeddings"].numpy(), tensors=ckpt.tensors).to(
        torch.device("cpu"), torch.bfloat16)
    with torch.inference_mode():
        out16 = half(x.to(torch.bfloat16))
    assert half.model.memory.banks()[0].dtype == torch.bfloat16
    assert float((out16.maps.float() - out1.maps).abs().max()) < 0.05
    assert float((out16.class_probs - out1.class_probs).abs().max()) < 0.05


def test_crop_views_show_small_defects_at_native_resolution():
    prep = preprocess_config("semclip-tiny", tile_above=10**9)
    gray = np.random.default_rng(0).random((1000, 800)).astype(np.float32)
    mask = np.zeros((1000, 800), bool)
    mask[700:706, 100:106] = True  # a 6 px defect
    crops = crop_views(gray, mask, prep, np.random.default_rng(1), count=2)
    assert len(crops) == 2  # 240 and 480 px windows, both smaller than the frame
    for view, crop_mask, _, clean in crops:
        assert view.shape == (240, 240) and crop_mask is not None and not clean
    native = crops[0][1]
    assert native is not None and native.sum() == pytest.approx(36, abs=0.5)  # 36 px, unresized
    assert not crop_views(gray[:200, :200], mask[:200, :200], prep, np.random.default_rng(1), 2)  # frame too small


def test_balanced_draws_and_heldout_frames():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    masks = torch.zeros(7, 10, 10, dtype=torch.float16)
    masks[4, :1, :1] = 1  # 1 % -> bucket 1... ; row 5 large
    masks[5, :5, :5] = 1
    masks[6, :5, :5] = 1
    data = TrainSet(torch.zeros(7, 10, 10), masks, labels, torch.ones(7, dtype=torch.bool), [""] * 7, ("n", "a", "b"), 0)
    w = balanced_weights(area_buckets(data))
    share = {int(k): float(w[area_buckets(data) == k].sum()) for k in area_buckets(data).unique()}
    assert len(set(round(v, 6) for v in share.values())) == 1  # every (class, area bucket) drawn equally
    frame = torch.arange(40).repeat_interleave(3)  # 40 frames, each a whole view and two crops
    big = TrainSet(torch.zeros(120, 2, 2), torch.zeros(120, 2, 2), torch.zeros(120, dtype=torch.long),
                   torch.ones(120, dtype=torch.bool), [""] * 120, ("n",), 0, frame=frame)
    held = heldout_split(big, 0.1, seed=0)
    assert len(held.whole) == 4 and torch.all(held.whole % 3 == 0)  # whole views of 4 frames
    assert len(held.crops) == 8 and set(frame[held.crops].tolist()) == set(frame[held.whole].tolist())
    assert not set(frame[held.train].tolist()) & set(frame[held.whole].tolist())


def test_pretrain_reports_a_heldout_check(tmp_path):
    from semclip_batch.synth.generate import SynthConfig, synth

    synth(str(tmp_path / "d"), SynthConfig(seed=5, lots=3, per_class=1, family="contacts", sizes=((300, 300),)))
    out = tmp_path / "w.safetensors"
    runner = CliRunner()
    result = runner.invoke(main, ["pretrain", str(tmp_path / "d" / "manifest.csv"), "--out", str(out),
                                  "--backbone", "semclip-tiny", "--steps", "4", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    assert "held-out check" in result.output and "patch AUROC particle" in result.output
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["crops"] == "2" and meta["steps"] == "4" and float(meta["heldout"]) == 0.1
    heldout = json.loads(meta["heldout_check"])
    assert set(heldout) == {"before", "after"} and "accuracy" in heldout["after"]
    assert "class-text cosine (mean)" in result.output and 0.5 < heldout["before"]["text_cosine"] < 1.0  # random: alike
    # the 2 held-out frames' crops are measured too (a class without a patch among them reads None)
    assert "patch AUROC particle (crops)" in result.output
    crops = {k for k in heldout["after"] if k.startswith("crop_patch_AUROC/")}
    assert len(crops) == 6 and crops == {k for k in heldout["before"] if k.startswith("crop_patch_AUROC/")}
    # 21 frames of 300 px: whole view + one native-resolution crop each, 2 frames held out
    data = load_trainset(read_manifest(str(tmp_path / "d" / "manifest.csv")), ("normal", "bridge", "copper_residue",
                         "hole", "infilm", "particle", "scratch"), preprocess_config("semclip-tiny", tile_above=10**9), crops=2)
    assert len(data) == 42
    # --heldout 0: every frame trains (a backbone adapted to a support set), and the weights say so
    every = runner.invoke(main, ["pretrain", str(tmp_path / "d" / "manifest.csv"), "--out", str(tmp_path / "w0.safetensors"),
                                 "--backbone", "semclip-tiny", "--steps", "2", "--batch-size", "4", "--heldout", "0"])
    assert every.exit_code == 0, every.output
    with safe_open(str(tmp_path / "w0.safetensors"), "pt") as f:
        assert float(f.metadata()["heldout"]) == 0.0
    res = pretrain(PretrainConfig(manifest=str(tmp_path / "d" / "manifest.csv"), out=str(tmp_path / "w2.safetensors"),
                                  steps=2, batch_size=2, model=ModelSpec(backbone="semclip-tiny")))
    assert res.sha256 and set(res.before) == set(res.after)


def test_budgeted_steps():
    assert budgeted_steps(1500, 20, 0.3, 600.0) == 1500  # 1,480 more at 0.3 s fit in 600 s
    assert budgeted_steps(1500, 20, 0.5, 600.0) == 1220  # 1,200 more fit
    assert budgeted_steps(1500, 20, 0.5, -5.0) == 20  # the budget is spent: no more, never fewer than done
    assert budgeted_steps(1500, 20, 0.1, 600.0, fill=True) == 6020  # --steps auto: the budget, not the plan
    assert budgeted_steps(1500, 20, 0.5, 600.0, fill=True) == 1220
    assert budgeted_steps(1500, 20, 0.5, -5.0, fill=True) == 20


def test_a_shortened_schedule_takes_over_where_the_long_one_stands_and_ends_at_its_floor():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=1e-3)
    cfg = PretrainConfig(manifest="", out="", lr=1e-3, warmup=0.1)
    sched, lrs = resumed_schedule(opt, cfg, 1500, 0), []
    for step in range(1, 401):
        opt.step()
        sched.step()
        if step == 20:
            sched = resumed_schedule(opt, cfg, 400, 20)  # cut to 400 steps in all
        lrs.append(opt.param_groups[0]["lr"])
    fresh_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    fresh, planned = resumed_schedule(fresh_opt, cfg, 400, 0), []
    for _ in range(400):
        fresh_opt.step()
        fresh.step()
        planned.append(fresh_opt.param_groups[0]["lr"])
    assert lrs[19] > lrs[18]  # the long schedule's warm-up until the cut
    assert lrs[20:] == pytest.approx(planned[20:], rel=1e-9)  # then the 400-step one-cycle, to its last step
    assert max(lrs) == pytest.approx(1e-3) and lrs[-1] < 1e-6


def test_text_separation_is_zero_for_orthogonal_classes_and_one_for_identical_ones(synth_lot, tmp_path):
    assert float(text_separation(torch.eye(3, 8))) == 0.0
    assert float(text_separation(torch.nn.functional.normalize(torch.ones(3, 8), dim=-1))) == pytest.approx(1.0)
    # a few steps with the term leave the class texts further apart than without it, and it is recorded
    cfg = PretrainConfig(manifest=str(synth_lot / "manifest.csv"), out=str(tmp_path / "sep.safetensors"), steps=12,
                         batch_size=2, separation=1.0, model=ModelSpec(backbone="semclip-tiny"))
    apart = pretrain(cfg)
    alike = pretrain(replace(cfg, out=str(tmp_path / "plain.safetensors"), separation=0.0))
    assert apart.before["text_cosine"] == alike.before["text_cosine"]
    # (the first steps draw every class text together, 0.90 -> 0.99 here; the term holds them apart: 0.988 vs 0.993)
    assert apart.after["text_cosine"] < alike.after["text_cosine"] - 0.003, (apart.after, alike.after)
    with safe_open(cfg.out, "pt") as f:
        assert f.metadata()["text_separation"] == "1.0"
    res = CliRunner().invoke(main, ["pretrain", str(synth_lot / "manifest.csv"), "--out", str(tmp_path / "x"),
                                    "--text-separation", "-1"])
    assert res.exit_code != 0 and "--text-separation must be a finite number >= 0" in res.output
    assert "Traceback" not in res.output


def test_pretrain_shortens_its_schedule_to_the_time_budget(synth_lot, tmp_path, monkeypatch, caplog):
    """A budget that leaves no time after the timed steps stops there and records the steps run and planned;
    a budget with room to spare changes nothing (the same weights as without one)."""
    import semclip_batch.fewshot.pretrain as module

    monkeypatch.setattr(module, "CALIBRATION_STEPS", 3)
    cfg = PretrainConfig(manifest=str(synth_lot / "manifest.csv"), out=str(tmp_path / "cut.safetensors"), steps=12,
                         batch_size=2, max_minutes=0.001, model=ModelSpec(backbone="semclip-tiny"))
    cut = pretrain(cfg, metadata={"steps": "12", "note": "kept"})  # a caller's record cannot hide the cut
    assert cut.steps == 3 and "leaves time for 3 of the 12 steps" in caplog.text
    assert "text embeddings are still alike" in caplog.text  # 3 steps from random weights: the hint is given
    assert "--text-separation 1 pushes them apart" in caplog.text  # pretrain's own option
    with safe_open(cfg.out, "pt") as f:
        meta = f.metadata()
    assert (meta["steps"], meta["planned_steps"], meta["max_minutes"], meta["note"]) == ("3", "12", "0.001", "kept")
    assert "text_separation" not in meta  # off unless asked
    free = pretrain(replace(cfg, out=str(tmp_path / "free.safetensors"), steps=5, max_minutes=0.0))
    roomy = pretrain(replace(cfg, out=str(tmp_path / "roomy.safetensors"), steps=5, max_minutes=60.0))
    assert free.steps == roomy.steps == 5 and free.sha256 == roomy.sha256 != cut.sha256
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ConfigError, match="--max-minutes must be a number >= 0"):
            replace(cfg, max_minutes=bad)


def test_pretrain_steps_auto_runs_the_steps_the_budget_allows(synth_lot, tmp_path, monkeypatch, caplog):
    """``--steps auto``: after the timed steps the schedule is as long as the budget allows, more than the first
    plan as readily as fewer; the weights record it; without a budget it is refused in one line; the command
    takes it by default where there is a budget."""
    import semclip_batch.fewshot.pretrain as module

    asked: list[tuple[int, int, bool]] = []

    def roomy(planned: int, done: int, per_step: float, seconds_left: float, fill: bool = False) -> int:
        asked.append((planned, done, fill))
        return 7  # as if the budget held 7 steps in all

    monkeypatch.setattr(module, "CALIBRATION_STEPS", 3)
    monkeypatch.setattr(module, "budgeted_steps", roomy)
    cfg = PretrainConfig(manifest=str(synth_lot / "manifest.csv"), out=str(tmp_path / "auto.safetensors"), steps=2,
                         batch_size=2, max_minutes=5.0, fill_budget=True, model=ModelSpec(backbone="semclip-tiny"))
    seen: list[tuple[int, int]] = []
    result = pretrain(cfg, progress=lambda step, total, loss: seen.append((step, total)))
    assert asked == [(4, 3, True)]  # a plan shorter than the timed steps is stretched past them first
    assert result.steps == 7 and seen[-1] == (7, 7)
    assert "--steps auto: 7 steps fit" in caplog.text and "too few to learn much" in caplog.text  # under 200: warned
    with safe_open(cfg.out, "pt") as f:
        meta = f.metadata()
    assert (meta["steps"], meta["planned_steps"], meta["max_minutes"]) == ("7", "auto", "5.0")
    assert meta["optimizer"] == module.OPTIMIZER == "adamw-fused"
    with pytest.raises(ConfigError, match="--steps auto fills the --max-minutes budget"):
        replace(cfg, max_minutes=0.0)

    # the command's default: the budget decides, or the fixed schedule where --max-minutes 0 leaves none
    assert pretrain_steps(None, 10.0) == (DEFAULT_PRETRAIN_STEPS, True)
    assert pretrain_steps(None, 0.0) == (DEFAULT_PRETRAIN_STEPS, False)
    assert pretrain_steps(" Auto ", 5.0) == (DEFAULT_PRETRAIN_STEPS, True) and pretrain_steps("300", 10.0) == (300, False)
    given: list[PretrainConfig] = []
    monkeypatch.setattr(module, "pretrain", lambda c, progress=None: given.append(c) or result)
    for flags in ([], ["--max-minutes", "0"], ["--steps", "40"]):
        res = CliRunner().invoke(main, ["pretrain", str(synth_lot / "manifest.csv"), "--out", str(tmp_path / "y"),
                                        "--backbone", "semclip-tiny", *flags])
        assert res.exit_code == 0 and res.output.strip().splitlines()[-1] == result.sha256, res.output
        assert ("7 steps (--steps auto), " in res.output) == (not flags), res.output
    assert [(c.steps, c.fill_budget, c.max_minutes) for c in given] == \
        [(DEFAULT_PRETRAIN_STEPS, True, 10.0), (DEFAULT_PRETRAIN_STEPS, False, 0.0), (40, False, 10.0)]
    for flags, message in ((["--steps", "auto", "--max-minutes", "0"], "--steps auto fills the --max-minutes budget"),
                           (["--steps", "many"], "--steps 'many': expected a whole number or 'auto'")):
        res = CliRunner().invoke(main, ["pretrain", str(synth_lot / "manifest.csv"), "--out", str(tmp_path / "x"),
                                        *flags])
        assert res.exit_code != 0 and message in res.output and "Traceback" not in res.output, res.output


def test_layers_of_the_last_epoch_when_validation_frames_hold_no_defect_pixel(tmp_path):
    """Early stopping ranks maps by the validation frames' pixel AUROC; with no defect pixel among them that is
    undefined, and the layers of the last epoch are kept (not the zero-shot ones of epoch 0)."""
    from PIL import Image

    rng = np.random.default_rng(2)
    rows = ["uri,lot_id,wafer_id,die_x,die_y,label,mask_uri"]
    for i in range(12):
        Image.fromarray((rng.random((64, 64)) * 200).astype(np.uint8)).save(tmp_path / f"f{i}.png")
        label = "normal" if i < 10 else "particle"  # the two particle frames have no mask
        rows.append(f"f{i}.png,L1,W1,{i},0,{label},")
    (tmp_path / "s.csv").write_text("\n".join(rows) + "\n")
    meta = train(TrainConfig(support=str(tmp_path / "s.csv"), out=str(tmp_path / "ck"), epochs=3,
                             model=ModelSpec(backbone="semclip-tiny", pretrained="shipped", cls="fused")))
    assert meta.training["map_epoch"] == 3
