"""pretrain -> weights file, train -> checkpoint, run --model: formats, checksums, refusals."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors import safe_open

from semclip_batch.config import CheckpointRequest, ModelSpec, RunConfig, Thresholds
from semclip_batch.errors import ConfigError, WeightsError
from semclip_batch.fewshot.pretrain import PretrainConfig, kept_patches, pretrain
from semclip_batch.fewshot.train import TrainConfig, sample_shots, train
from semclip_batch.fewshot.trainset import IGNORE, half_stack
from semclip_batch.methods.checkpoint import load_checkpoint
from semclip_batch.methods.fitting import focal_dice
from semclip_batch.methods.region_attributes import N_ATTRIBUTES
from semclip_batch.methods.weights import load_backbone
from semclip_batch.model.region_classes import REGION_CLASSES
from semclip_batch.pipeline.driver import run


@pytest.fixture(scope="module")
def weights(synth_lot, tmp_path_factory):
    out = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    digest = pretrain(PretrainConfig(manifest=str(synth_lot / "manifest.csv"), out=str(out), steps=3, batch_size=4,
                                     model=ModelSpec(backbone="semclip-tiny"))).sha256
    return out, digest


@pytest.fixture(scope="module")
def checkpoint(weights, synth_lot, tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("ckpt") / "c1"
    meta = train(TrainConfig(support=str(synth_lot / "manifest.csv"), out=str(ckpt), epochs=2,
                             model=ModelSpec(backbone="semclip-tiny", pretrained=str(weights[0]), cls="fused")))
    return ckpt, meta


def test_pretrained_weights_file_records_backbone_and_checksum(weights):
    path, digest = weights
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["backbone"] == "semclip-tiny" and meta["sha256"] == digest
    loaded = load_backbone("semclip-tiny", str(path), expected_sha256=digest)
    assert loaded.sha256 == digest
    random = load_backbone("semclip-tiny", "none")
    assert random.sha256 != digest  # training changed the weights


def test_checkpoint_contents(checkpoint, weights):
    ckpt, _ = checkpoint
    body = json.loads((ckpt / "checkpoint.json").read_text())
    for key in ("method", "backbone", "weights", "classes", "prompts", "taps", "alpha", "temperature", "thresholds",
                "preprocessing", "training", "tensors_sha256"):
        assert key in body
    assert body["weights"] == {"source": str(weights[0]), "sha256": weights[1], "seed": 0}
    assert body["classes"][0] == "normal" and 0.0 <= body["alpha"] <= 1.0
    loaded = load_checkpoint(str(ckpt))
    assert all(k.startswith(("transform.", "head.", "memory.", "reference.", "grey_memory.", "region_classes.",
                             "text_embeddings", "alpha", "text_scale"))
               for k in loaded.tensors)
    # the region's classes (rule 22): always checked, stored with the checkpoint's defect classes where kept
    record = body["training"]["region_classes"]
    assert body["region_classes"] == record["kept"] == (f"{REGION_CLASSES}.weight" in loaded.tensors)
    if body["region_classes"]:
        assert loaded.tensors[f"{REGION_CLASSES}.weight"].shape == (N_ATTRIBUTES, len(body["classes"]) - 1)
        assert body["training"]["region_classes"]["kept"] and body["version"] == 6
    assert not any(k.startswith("visual.") for k in loaded.tensors)  # the frozen backbone is not copied
    # the default recipe: a memory of clean support patches, fused with a weight chosen on held-out frames
    assert (body["recipe"], body["memory"], body["region_head"]) == ("transfer", True, True)
    assert loaded.tensors["memory.bank0"].shape[0] > 0 and 0.0 <= float(loaded.tensors["memory.weight"]) <= 1.0
    assert body["training"]["rows_augmented"] == 4 * body["training"]["used"]
    # a library caller's defaults: no adaptation nor its check, no scale check (fit() fits the thresholds)
    steps = body["training"]["seconds_by_step"]
    assert list(steps) == ["support set", "backbone", "fit and thresholds", "grey-level memory", "region classes"]
    # and cell references (synth's line/space and contact frames repeat): the reference scorer's two scales
    assert body["self_reference"] and not body["use_reference"] and body["training"]["with_reference"] > 0
    assert float(loaded.tensors["reference.scale"]) > 0 and float(loaded.tensors["reference.pixel_scale"]) > 0


def test_tampered_checkpoint_refused(checkpoint, tmp_path):
    ckpt, _ = checkpoint
    bad = tmp_path / "bad"
    bad.mkdir()
    body = json.loads((ckpt / "checkpoint.json").read_text())
    body["tensors_sha256"] = "0" * 64
    (bad / "checkpoint.json").write_text(json.dumps(body))
    (bad / "model.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes())
    with pytest.raises(WeightsError, match="does not match"):
        load_checkpoint(str(bad))
    with pytest.raises(WeightsError, match="not a checkpoint folder"):
        load_checkpoint(str(tmp_path / "nothing"))


def test_a_checkpoint_whose_weights_are_gone_says_which_and_how_to_give_them(checkpoint, weights, synth_lot, tmp_path):
    """The weights file a checkpoint was trained on (a --pretrained path it records) moved away: ``run --model``
    names it as the checkpoint's weights and asks for --pretrained; a --pretrained path that is not there stays a
    --pretrained error."""
    from semclip_batch.pipeline.identity import identify_model

    ckpt, _ = checkpoint
    moved = tmp_path / "ck"
    moved.mkdir()
    body = json.loads((ckpt / "checkpoint.json").read_text())
    body["weights"]["source"] = str(tmp_path / "gone.safetensors")
    (moved / "checkpoint.json").write_text(json.dumps(body))
    (moved / "model.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes())
    cfg = RunConfig(input=str(synth_lot / "manifest.csv"), out=str(tmp_path / "o"), model=CheckpointRequest(url=str(moved)))
    with pytest.raises(WeightsError, match=r"^the weights the checkpoint was trained on, .*gone.safetensors, are not "
                                           r"there: give them with --pretrained"):
        identify_model(cfg)
    given = RunConfig(input=cfg.input, out=cfg.out, model=CheckpointRequest(url=str(moved), pretrained=str(weights[0])))
    assert identify_model(given)[2] is not None  # given where they are now: scored with them
    elsewhere = RunConfig(input=cfg.input, out=cfg.out,
                          model=CheckpointRequest(url=str(moved), pretrained=str(tmp_path / "neither.safetensors")))
    with pytest.raises(WeightsError, match=r"^--pretrained weights not found"):
        identify_model(elsewhere)


def test_a_checkpoint_runs_driver_reads_the_vision_tower_alone(checkpoint, weights, synth_lot, tmp_path):
    """A checkpoint brings its class embeddings, so identifying its run builds the backbone's vision tower alone,
    in a process that never imports open_clip; weights with another checksum are still named as such."""
    import subprocess
    import sys
    import textwrap

    from semclip_batch.pipeline.identity import identify_model

    ckpt, _ = checkpoint
    code = textwrap.dedent(f"""
        import sys
        from semclip_batch.config import CheckpointRequest, RunConfig
        from semclip_batch.pipeline.identity import identify_model
        _, spec, ident = identify_model(RunConfig(input={str(synth_lot / "manifest.csv")!r}, out={str(tmp_path / "o")!r},
                                                  model=CheckpointRequest(url={str(ckpt)!r})))
        print(ident.model_id, ident.weights_sha256, "open_clip" in sys.modules, "torchvision" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    here = identify_model(RunConfig(input=str(synth_lot / "manifest.csv"), out=str(tmp_path / "o"),
                                    model=CheckpointRequest(url=str(ckpt))))[2]
    assert out.stdout.split() == [here.model_id, weights[1], "False", "False"], out.stdout + out.stderr
    other = tmp_path / "other.safetensors"
    state = load_backbone("semclip-tiny", str(weights[0])).clip.state_dict()
    state["logit_scale"] = state["logit_scale"] + 1.0
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(other))
    with pytest.raises(WeightsError, match=r"^--pretrained .*other.safetensors has checksum \w{12}, but the checkpoint was "
                                           r"trained on " + weights[1][:12]):
        identify_model(RunConfig(input=str(synth_lot / "manifest.csv"), out=str(tmp_path / "o"),
                                 model=CheckpointRequest(url=str(ckpt), pretrained=str(other))))


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_run_with_checkpoint(ray_cluster, checkpoint, synth_lot, tmp_path, weights):
    ckpt, meta = checkpoint
    spec = CheckpointRequest(url=str(ckpt))
    flags = Thresholds(image=0.5, source={"image": "flag", "pixel": "default", "min_region_px": "default"})
    result = run(RunConfig(input=str(synth_lot / "manifest.csv"), out=str(tmp_path / "o"), model=spec, thresholds=flags))
    rec = result.record
    assert rec["mode"] == "checkpoint" and rec["model_id"].startswith("semclip:semclip-tiny:")
    assert rec["thresholds"]["image"] == 0.5 and rec["thresholds"]["source"]["image"] == "flag"
    assert rec["thresholds"]["pixel"] == meta.thresholds.pixel
    assert rec["thresholds"]["source"]["pixel"] == "checkpoint"
    assert rec["class_scores"] == "weighed"  # rule 29: the given image threshold weighs in the written class scores
    assert rec["counts"] == {"ok": 14}
    with pytest.raises(ConfigError, match="differs from the checkpoint"):
        run(RunConfig(input=str(synth_lot / "manifest.csv"), out=str(tmp_path / "o2"),
                      model=CheckpointRequest(url=str(ckpt), backbone="ViT-B-16-plus-240")))
    with pytest.raises(WeightsError, match="trained on"):
        run(RunConfig(input=str(synth_lot / "manifest.csv"), out=str(tmp_path / "o3"),
                      model=CheckpointRequest(url=str(ckpt), pretrained="none")))


def test_sample_shots_is_seeded_and_per_class():
    df = pd.DataFrame({"image_id": [f"{i:02d}" for i in range(30)], "label": ["a"] * 20 + ["b"] * 10})
    a, b = sample_shots(df, 5, 1), sample_shots(df, 5, 1)
    assert a.equals(b) and a["label"].value_counts().to_dict() == {"a": 5, "b": 5}
    assert len(sample_shots(df, None, 1)) == 30 and len(sample_shots(df, 15, 1)) == 25


def test_half_stack_equals_stacking_then_converting():
    rng = np.random.default_rng(0)
    views: list[np.ndarray | None] = [rng.normal(0, 3, (8, 8)).astype(np.float32) for _ in range(3)]
    views[1] = np.full((8, 8), 1e5, np.float32)  # beyond float16's range: inf either way
    views.append(None)
    expected = torch.from_numpy(np.stack([np.zeros((8, 8), np.float32) if v is None else v for v in views])).half()
    got = half_stack(views, 8)
    assert got.dtype == torch.float16 and torch.equal(got, expected)
    assert not got[3].any() and torch.isinf(got[1]).all()


def test_kept_patches_hold_every_defect_patch_first():
    targets = torch.zeros(3, 16, dtype=torch.long)
    targets[0, [2, 9]] = 4
    targets[0, 10] = IGNORE  # touches a defect: kept before clean patches
    targets[1] = IGNORE  # no mask: a random draw
    gen = torch.Generator().manual_seed(0)
    kept = kept_patches(targets, 0.25, gen)
    assert kept is not None and kept.shape == (3, 4)
    assert {2, 9, 10} <= set(kept[0].tolist())
    assert all(len(set(row.tolist())) == 4 and row.tolist() == sorted(row.tolist()) for row in kept)
    assert kept_patches(targets, 1.0, gen) is None


def test_alpha_weighs_the_scores_that_classify_held_out_frames():
    """The fusion weight follows whichever scores classify the frames it is chosen on; on a tie, the text."""
    from semclip_batch.methods.semclip_method import best_alpha

    labels = torch.tensor([0, 1, 2, 1])
    right = torch.nn.functional.one_hot(labels, 3).float() * 0.8 + 0.1 / 1.5
    wrong = torch.nn.functional.one_hot((labels + 1) % 3, 3).float() * 0.8 + 0.1 / 1.5
    assert best_alpha(right, wrong, labels) == 1.0
    assert best_alpha(wrong, right, labels) == 0.0
    assert best_alpha(right, right, labels) == 1.0


def test_focal_dice_prefers_the_right_map():
    target = torch.zeros(1, 8, 8)
    target[0, 2:5, 2:5] = 1
    assert focal_dice(target * 0.98 + 0.01, target) < focal_dice(torch.full_like(target, 0.5), target)


def test_checkpoint_meta_is_versioned_and_reads_unversioned_ones(checkpoint, tmp_path):
    import shutil

    from semclip_batch.errors import WeightsError
    from semclip_batch.methods.checkpoint import CHECKPOINT_VERSION

    ckpt, meta = checkpoint
    # a checkpoint that names weights outside its folder is written as version 4 (a release before 5 reads it);
    # with the region's classes in its tensors, 6 (a release before it would name the classes without them)
    written = json.loads((ckpt / "checkpoint.json").read_text())["version"]
    assert meta.version == written == (6 if meta.region_classes else 4) and CHECKPOINT_VERSION == 6
    assert load_checkpoint(str(ckpt)).meta.version == CHECKPOINT_VERSION  # read as this release's

    def variant(name: str, edit) -> str:
        folder = tmp_path / name
        shutil.copytree(ckpt, folder)
        body = json.loads((folder / "checkpoint.json").read_text())
        edit(body)
        (folder / "checkpoint.json").write_text(json.dumps(body))
        return str(folder)

    def as_v1(body: dict) -> None:  # what train wrote before the version field
        for key in ("version", "score_mode", "sigma"):
            body.pop(key)

    old = load_checkpoint(variant("v1", as_v1))
    assert old.meta == load_checkpoint(str(ckpt)).meta
    with pytest.raises(WeightsError, match=r"checkpoint version 99 is not one this release reads"):
        load_checkpoint(variant("v99", lambda b: b.update(version=99)))
    with pytest.raises(WeightsError, match=r"lacks or mangles 'thresholds'"):
        load_checkpoint(variant("no-thresholds", lambda b: b.pop("thresholds")))
    # a value of the wrong kind is named by its field, not by Python's conversion message
    for name, edit in (("thresholds.image", lambda b: b["thresholds"].update(image="abc")),
                       ("thresholds.pixel", lambda b: b["thresholds"].update(pixel=float("nan"))),
                       ("thresholds.min_region_px", lambda b: b["thresholds"].update(min_region_px=[3])),
                       ("scale_policy", lambda b: b.update(scale_policy="bogus")),
                       ("sigma", lambda b: b.update(sigma=True)), ("taps", lambda b: b.update(taps=["x"])),
                       ("taps", lambda b: b.update(taps=[b["taps"][0] + 0.5]))):
        with pytest.raises(WeightsError, match=rf"lacks or mangles '{name}'$"):
            load_checkpoint(variant(f"{name}-{id(edit)}", edit))
    # classes that do not match the tensors fitted on them: refused before any frame is scored
    for name, edit in (("fewer", lambda b: b.update(classes=b["classes"][:-1])),
                       ("more", lambda b: (b["classes"].append("void"), b["prompts"].update(void=["a void"])))):
        n = len(meta.classes) + (-1 if name == "fewer" else 1)
        with pytest.raises(WeightsError, match=rf"names {n} classes but its tensors were fitted on {len(meta.classes)}"):
            load_checkpoint(variant(name, edit))


def test_checkpoint_json_is_strict_where_the_training_summary_is_undefined(checkpoint, tmp_path):
    """An undefined figure (a held-out AUROC without a defect pixel is NaN) is written as null: NaN is not JSON,
    and other readers (jq, DuckDB's read_json) refuse it."""
    from dataclasses import replace

    from semclip_batch.methods.checkpoint import save_checkpoint

    ckpt, meta = checkpoint
    tensors = load_checkpoint(str(ckpt)).tensors
    odd = replace(meta, training={**meta.training, "val_pAUROC": float("nan"), "scores": {"a": [1.0, float("inf")]}})
    save_checkpoint(str(tmp_path / "odd"), tensors, odd)

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    body = json.loads((tmp_path / "odd" / "checkpoint.json").read_text(), parse_constant=refuse)
    assert body["training"]["val_pAUROC"] is None and body["training"]["scores"] == {"a": [1.0, None]}
    assert body["training"]["used"] == meta.training["used"]  # finite figures as they were
    assert load_checkpoint(str(tmp_path / "odd")).meta.training["val_pAUROC"] is None


def test_feature_cache_is_keyed_by_content_and_survives_damage(tmp_path):
    from semclip_batch.methods.feature_cache import cached_features, feature_key
    from semclip_batch.methods.features import Features
    from semclip_batch.methods.weights import preprocess_config
    from semclip_batch.model.encoder import EncoderOutput

    prep = preprocess_config("semclip-tiny", tile_above=1024)
    views = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    calls = []

    def compute() -> Features:
        calls.append(1)
        dual = EncoderOutput(pooled=torch.randn(3, 4), original=[torch.randn(3, 5, 6)], vv=[None])
        return Features(dual, (2,), [torch.randn(3, 2, 4)])

    key = feature_key("w" * 64, views, prep, (2,), 1, True)
    assert key != feature_key("w" * 64, views + 1e-3, prep, (2,), 1, True)
    assert key != feature_key("x" * 64, views, prep, (2,), 1, True)
    first = cached_features(str(tmp_path), key, compute)
    again = cached_features(str(tmp_path), key, compute)
    assert len(calls) == 1 and again.taps == (2,) and again.dual.vv == [None]
    assert torch.equal(first.dual.original[0], again.dual.original[0]) and first.windows is not None
    assert again.windows is not None and torch.equal(first.windows[0], again.windows[0])
    entry = tmp_path / "features" / f"{key}.safetensors"
    entry.write_bytes(entry.read_bytes()[:50])
    cached_features(str(tmp_path), key, compute)
    assert len(calls) == 2 and entry.stat().st_size > 50
    cached_features(None, key, compute)
    assert len(calls) == 3


def test_train_with_cache_dir_gives_the_same_checkpoint(synth_lot, tmp_path):
    def once(name: str):
        return train(TrainConfig(support=str(synth_lot / "manifest.csv"), out=str(tmp_path / name),
                                 cache_dir=str(tmp_path / "cache"),
                                 model=ModelSpec(backbone="semclip-tiny", pretrained="none", method="winclip",
                                                 cls="fused")))

    first, second = once("a"), once("b")
    assert first.tensors_sha256 == second.tensors_sha256 and first.thresholds == second.thresholds
    assert len(list((tmp_path / "cache" / "features").iterdir())) == 1


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_score_mode_and_sigma_travel_from_train_to_run(ray_cluster, synth_lot, tmp_path):
    import zarr

    from semclip_batch.analysis.results import read_predictions

    meta = train(TrainConfig(support=str(synth_lot / "manifest.csv"), out=str(tmp_path / "c"),
                             model=ModelSpec(backbone="semclip-tiny", pretrained="none", method="winclip",
                                             score_mode="max", sigma=2.0, cls="fused")))
    assert (meta.score_mode, meta.sigma) == ("max", 2.0)
    result = run(RunConfig(input=str(synth_lot / "manifest.csv"), out=str(tmp_path / "o"),
                           model=CheckpointRequest(url=str(tmp_path / "c"))))
    model = result.record["config"]["model"]
    assert (model["score_mode"], model["sigma"]) == ("max", 2.0)
    df = read_predictions(str(tmp_path / "o")).to_pandas()
    root = zarr.open_group(str(tmp_path / "o" / "masks.zarr"), mode="r")
    for row in df[df["status"] == "ok"].itertuples():  # max only: the score is the map's maximum
        peak = int(root[row.mask_path][int(row.mask_index)].max())
        assert abs(row.anomaly_score - peak / 255) <= 0.5 / 255 + 1e-6
    with pytest.raises(ConfigError, match="score mode"):
        TrainConfig(support="s.csv", out="c", model=ModelSpec(score_mode="median", cls="fused"))


def test_train_warns_where_no_support_frame_is_held_out(synth_lot, tmp_path, caplog):
    """Under 10 support frames nothing is held out to check SEM-CLIP's fit: train says so; not at 10 or more, and not
    for a baseline (it chooses nothing on held-out frames)."""
    manifest = str(synth_lot / "manifest.csv")
    spec = ModelSpec(backbone="semclip-tiny", pretrained="shipped", cls="fused")
    few = train(TrainConfig(support=manifest, out=str(tmp_path / "few"), model=spec, shots=1, epochs=1))
    used = few.training["used"]
    assert used < 10
    assert f"{used} support frames: under 10 none are held out, so nothing checks the fit" in caplog.text
    caplog.clear()
    whole = train(TrainConfig(support=manifest, out=str(tmp_path / "all"), model=spec, epochs=1))
    assert whole.training["used"] >= 10 and "none are held out" not in caplog.text
    assert "nothing is fitted on pixels" not in caplog.text  # its masks hold defect pixels
    assert "no usable support frame of class" not in caplog.text  # every class has frames
    train(TrainConfig(support=manifest, out=str(tmp_path / "winclip"), shots=1,
                      model=ModelSpec(backbone="semclip-tiny", pretrained="shipped", method="winclip", cls="fused")))
    assert "none are held out" not in caplog.text


def _support_copy(synth_lot, folder, mask=None) -> tuple[pd.DataFrame, str]:
    """``synth_lot``'s manifest written into ``folder`` with absolute paths; ``mask(row_index, size)``, where given,
    writes each defect row's mask anew (a PNG in ``folder``) and returns it. Returns the rows and the manifest."""
    from PIL import Image

    df = pd.read_csv(synth_lot / "manifest.csv", dtype=str, keep_default_na=False)
    for col in ("uri", "mask_uri", "reference_uri"):
        df[col] = [str(synth_lot / v) if v else "" for v in df[col]]
    if mask is not None:
        for i, row in df[df["label"] != "normal"].iterrows():
            path = folder / f"mask-{i}.png"
            mask(i, Image.open(row["uri"]).size).save(path)
            df.at[i, "mask_uri"] = str(path)
    df.to_csv(folder / "manifest.csv", index=False)
    return df, str(folder / "manifest.csv")


def test_support_masks_without_a_defect_pixel_are_said_and_not_ranked_on(synth_lot, tmp_path, caplog):
    """Every defect frame's mask empty: train warns that nothing is fitted on pixels, and the memory's weight is the
    default, not a choice ranked on a pixel AUROC that does not exist (it printed 0.000)."""
    from PIL import Image

    _, manifest = _support_copy(synth_lot, tmp_path, lambda i, size: Image.new("L", size))
    spec = ModelSpec(backbone="semclip-tiny", pretrained="shipped", cls="fused")
    meta = train(TrainConfig(support=manifest, out=str(tmp_path / "ck"), model=spec, epochs=1))
    assert "no support frame's mask holds a defect pixel (no mask_uri, or empty masks)" in caplog.text
    assert meta.training["memory_weight"] == 0.5 and meta.training["weights_choice"] == {}
    assert meta.thresholds.pixel == 0.5


def test_support_rows_whose_mask_or_labels_are_unusable_are_named(synth_lot, tmp_path, caplog):
    """A mask too small to decode as a frame is named as the row's mask (the row skipped); a manifest whose label
    column is missing (here misspelt ``Label``) is refused in one line that names the column."""
    from PIL import Image

    from semclip_batch.fewshot.trainset import load_trainset
    from semclip_batch.io.manifest import read_manifest
    from semclip_batch.methods.prompts import load_prompts
    from semclip_batch.methods.weights import preprocess_config

    first = None

    def tiny_first(i: int, size: tuple[int, int]) -> Image.Image:
        nonlocal first
        first = i if first is None else first
        return Image.new("L", (10, 10) if i == first else size)

    df, manifest = _support_copy(synth_lot, tmp_path, tiny_first)
    classes, prep = load_prompts(None).classes, preprocess_config("semclip-tiny", tile_above=10**9)
    data = load_trainset(read_manifest(manifest), classes, prep)
    assert data.skipped == 1
    assert f"skipping {df.at[first, 'uri']}: its mask is unusable: frame 10x10 is smaller than 16 px" in caplog.text
    df.rename(columns={"label": "Label"}).to_csv(tmp_path / "no-label.csv", index=False)
    with pytest.raises(ConfigError, match=r"^no support row has a label: train reads each frame's class from the "
                                          r"manifest's `label` column \(missing or empty here; one of: normal, "):
        load_trainset(read_manifest(str(tmp_path / "no-label.csv")), classes, prep)


def test_a_class_without_a_usable_support_frame_is_said(synth_lot, tmp_path, caplog):
    """Every `bridge` row broken (its frame unreadable) and no `scratch` row at all: the fit goes on and train names
    both classes, once (a support set with every class names none: the test above)."""
    df, _ = _support_copy(synth_lot, tmp_path)
    for i in df.index[df["label"] == "bridge"]:
        (tmp_path / f"broken-{i}.png").write_bytes(b"not a png")
        df.at[i, "uri"] = str(tmp_path / f"broken-{i}.png")
    df[df["label"] != "scratch"].to_csv(tmp_path / "gaps.csv", index=False)
    spec = ModelSpec(backbone="semclip-tiny", pretrained="shipped", cls="fused")
    meta = train(TrainConfig(support=str(tmp_path / "gaps.csv"), out=str(tmp_path / "ck"), model=spec, shots=1,
                             epochs=1))
    assert "bridge" in meta.classes and "scratch" in meta.classes  # still classes of the checkpoint
    said = [r.getMessage() for r in caplog.records if "no usable support frame of class" in r.getMessage()]
    assert len(said) == 1 and "class bridge, scratch (" in said[0]


def test_normal_is_present_through_the_clean_tiles_of_defect_frames():
    """A support set without normal frames whose defect frames are tiled: their clean tiles train `normal` as a
    normal frame does, so it is not named as absent; a class with no frame is."""
    from semclip_batch.fewshot.trainset import TrainSet

    labels = torch.tensor([1, 0, 1, 2, 2])  # frame 0: its whole view (bridge) and a clean tile; frames 1, 2
    frame = torch.tensor([0, 0, 0, 1, 2])
    data = TrainSet(torch.zeros(5, 4, 4), torch.zeros(5, 4, 4), labels, torch.ones(5, dtype=torch.bool), [""] * 5,
                    ("normal", "bridge", "hole", "scratch"), skipped=0, frame=frame)
    assert data.absent_classes() == ["scratch"]
    whole_only = TrainSet(torch.zeros(2, 4, 4), torch.zeros(2, 4, 4), torch.tensor([1, 2]),
                          torch.ones(2, dtype=torch.bool), ["", ""], ("normal", "bridge", "hole"), skipped=0)
    assert whole_only.absent_classes() == ["normal"]


def test_train_counts_each_steps_seconds_once_in_order():
    from semclip_batch.fewshot import train as train_module

    ticks = iter([10.0, 12.5, 13.0, 20.0, 20.04])
    clock = train_module.StepClock(now=lambda: next(ticks))  # started at 10.0
    for step in ("support set", "fit", "support set", "maps"):
        clock.lap(step)
    assert clock.steps == {"support set": 9.5, "fit": 0.5, "maps": 0.0}  # a step timed twice sums its laps
    assert train_module.step_time_line({"seconds_by_step": clock.steps}) == [
        "time by step: support set 9.5 s, fit 0.5 s, maps 0.0 s"]
    assert train_module.step_time_line({"seconds": 3.0}) == []  # a checkpoint from before the record had it
