"""pretrain's scale check: its held-out frames scored zero-shot as ``run`` scores them at each scale policy; the
cheapest policy within 0.01 pixel AUROC of the best is recorded in the weights file and becomes ``run``'s and
``train``'s ``--scale-policy`` when none is given."""

from __future__ import annotations

import json
from dataclasses import replace

import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from semclip_batch.cli.commands import main
from semclip_batch.cli.options import run_config
from semclip_batch.config import SCALE_CHECK_POLICIES, SCALE_POLICY_KEY, ModelSpec, parse_scale_policy
from semclip_batch.fewshot import trainset
from semclip_batch.fewshot.fit_memory import BASE_BYTES, BYTES_PER_ROW, available_bytes, coarser, needed_bytes, too_large
from semclip_batch.fewshot.heldout import held_frames, heldout_split
from semclip_batch.fewshot.maps_policy import held_out_localisation, weak_localisation_warning
from semclip_batch.fewshot.scale_check import (
    FITTED,
    check_frames,
    check_rows,
    policy_auroc,
    recommend,
    scale_check,
    support_check_lines,
)
from semclip_batch.fewshot.trainset import TrainSet
from semclip_batch.io.manifest import read_manifest
from semclip_batch.io.preprocess import frame_tiles
from semclip_batch.methods import semclip_method
from semclip_batch.methods.checkpoint import load_checkpoint
from semclip_batch.methods.fitting import validation_frames
from semclip_batch.methods.prompts import clip_text_embeddings, load_prompts
from semclip_batch.methods.registry import new_model
from semclip_batch.methods.shipped import shipped_path
from semclip_batch.methods.weights import load_backbone, preprocess_config, recommended_scale_policy, weights_metadata
from semclip_batch.synth.generate import SynthConfig, synth


@pytest.fixture(scope="module")
def logic_lot(tmp_path_factory):
    """7 frames of 512 px of the `logic` family (3-10 px defects), one per class."""
    root = tmp_path_factory.mktemp("logic")
    synth(str(root), SynthConfig(seed=41, lots=1, per_class=1, family="logic", sizes=((512, 512),)))
    return root / "manifest.csv"


def test_recommend_takes_the_cheapest_policy_near_the_best():
    check = {"whole": {"pAUROC": 0.893, "views": 203}, "0.5": {"pAUROC": 0.929, "views": 831},
             "0.75": {"pAUROC": 0.944, "views": 1737}, "native": {"pAUROC": 0.939, "views": 2781}}
    assert recommend(check) == "0.75"  # native is within 0.01 but dearer; 0.5 is 0.015 short
    assert recommend(check, tolerance=0.02) == "0.5"
    assert recommend(check, tolerance=0.06) == "whole"
    # frames no policy tiles: every policy is the whole view (same figure, same views): whole
    assert recommend({n: {"pAUROC": 0.9, "views": 10} for n in SCALE_CHECK_POLICIES}) == "whole"
    # no defect pixel among the frames: nothing measured, nothing recommended
    assert recommend({n: {"pAUROC": None, "views": 10} for n in SCALE_CHECK_POLICIES}) is None


def test_the_check_scores_as_run_and_eval_do(tmp_path, logic_lot, ray_cluster):
    frames = check_frames(read_manifest(str(logic_lot)), None)
    assert len(frames) == 7 and sum(bool(f.truth.any()) for f in frames) == 6
    backbone = load_backbone("semclip-tiny", "shipped")
    text = clip_text_embeddings(backbone.clip, "semclip-tiny", load_prompts(None))
    runner = CliRunner()
    for name, policy in (("native", 1.0), ("whole", None)):
        out = tmp_path / f"out-{name}"
        res = runner.invoke(main, ["run", str(logic_lot), "--out", str(out), "--backbone", "semclip-tiny",
                                   "--pretrained", "shipped", "--scale-policy", name,
                                   "--map-shifts", "1"])  # the check scores each view once
        assert res.exit_code == 0, res.output
        res = runner.invoke(main, ["eval", str(out), "--truth", str(logic_lot)])
        assert res.exit_code == 0, res.output
        measured = json.loads((out / "metrics.json").read_text())["pAUROC"]
        auroc, views = policy_auroc(backbone.clip, "semclip-tiny", text, frames, policy)
        assert auroc == pytest.approx(measured, abs=1e-6)  # a pixel or two may round the other way
        assert views == 7 * (1 if policy is None else 1 + 9)  # 512 px at native: 3 x 3 tiles of 240 px
    check = scale_check(backbone.clip, "semclip-tiny", text, frames)
    assert list(check) == list(SCALE_CHECK_POLICIES)
    assert [row["views"] for row in check.values()] == [7, 7 * 5, 7 * 5, 7 * 10]  # 512 px: 2 x 2 tiles at 0.5, 0.75


def test_pretrain_records_the_check_and_its_recommendation(tmp_path):
    synth(str(tmp_path / "d"), SynthConfig(seed=5, lots=3, per_class=2, family="logic", sizes=((512, 512),)))
    out = tmp_path / "w.safetensors"
    runner = CliRunner()
    res = runner.invoke(main, ["pretrain", str(tmp_path / "d" / "manifest.csv"), "--out", str(out),
                               "--backbone", "semclip-tiny", "--steps", "3", "--batch-size", "4"])
    assert res.exit_code == 0, res.output
    assert "scale check (4 held-out frames" in res.output
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    check = json.loads(meta["scale_check"])
    assert list(check) == list(SCALE_CHECK_POLICIES)  # 4 of 42 frames held out, each scored at every policy
    assert [row["views"] for row in check.values()] == [4, 4 * 5, 4 * 5, 4 * 10]
    best = max(row["pAUROC"] for row in check.values())
    chosen = check[meta[SCALE_POLICY_KEY]]
    assert chosen["pAUROC"] >= best - 0.01 and all(row["views"] >= chosen["views"] for row in check.values()
                                                   if row["pAUROC"] >= best - 0.01)
    assert f"{meta[SCALE_POLICY_KEY]:<8}" in res.output
    assert weights_metadata("semclip-tiny", str(out))[SCALE_POLICY_KEY] == meta[SCALE_POLICY_KEY]
    quiet = tmp_path / "q.safetensors"
    res = runner.invoke(main, ["pretrain", str(tmp_path / "d" / "manifest.csv"), "--out", str(quiet),
                               "--backbone", "semclip-tiny", "--steps", "2", "--batch-size", "4", "--no-scale-check"])
    assert res.exit_code == 0, res.output
    assert "scale check" not in res.output and SCALE_POLICY_KEY not in weights_metadata("semclip-tiny", str(quiet))


def _weights_recommending(tmp_path, policy: str) -> str:
    """The shipped semclip-tiny weights, as a file whose scale check recommended ``policy``."""
    with safe_open(shipped_path("semclip-tiny"), "pt") as f:
        state = {k: f.get_tensor(k).float() for k in f.keys()}
        meta = dict(f.metadata() or {})
    path = str(tmp_path / f"rec-{policy}.safetensors")
    save_file(state, path, metadata={**meta, SCALE_POLICY_KEY: policy})
    return path


def _run_spec(weights: str, scale_policy: str | None) -> ModelSpec:
    cfg = run_config(input="m.csv", out="o", model=None, backbone="semclip-tiny", pretrained=weights,
                     pretrained_sha256=None, scale_policy=scale_policy, self_similarity=None, defect_view=None, seed=0,
                     prompts=None, precision="fp32", storage_option=(), threshold=None, pixel_threshold=None,
                     min_region_px=None, batch_size=16, actors=1, num_gpus=0.0, shard_size=256, tile_above=1024,
                     pattern=None, address=None, overwrite=False)
    assert isinstance(cfg.model, ModelSpec)
    return cfg.model


def test_run_and_train_take_the_recommended_policy_unless_given(tmp_path, logic_lot):
    weights = _weights_recommending(tmp_path, "0.5")
    assert recommended_scale_policy("semclip-tiny", weights) == "0.5"
    assert _run_spec(weights, None).scale_policy == 0.5
    assert _run_spec(weights, "whole").scale_policy is None  # a given policy wins
    assert _run_spec(weights, "native").scale_policy == 1.0
    assert _run_spec("shipped", None).scale_policy is None  # no check recorded: the whole frame, as before
    runner = CliRunner()
    res = runner.invoke(main, ["train", "--adapt-steps", "0", str(logic_lot),
                               "--out", str(tmp_path / "ck"), "--backbone", "semclip-tiny",
                               "--pretrained", weights, "--epochs", "1"])
    assert res.exit_code == 0, res.output
    assert "--scale-policy 0.5: recommended by the weights' scale check" in res.output
    assert load_checkpoint(str(tmp_path / "ck")).meta.scale_policy == 0.5
    res = runner.invoke(main, ["train", "--adapt-steps", "0", str(logic_lot), "--out", str(tmp_path / "ck-whole"), "--backbone",
                               "semclip-tiny", "--pretrained", weights, "--epochs", "1", "--scale-policy", "whole"])
    assert res.exit_code == 0, res.output
    assert load_checkpoint(str(tmp_path / "ck-whole")).meta.scale_policy is None


def test_weights_without_a_readable_record_recommend_nothing(tmp_path):
    pt = tmp_path / "w.pt"
    torch.save({"a": torch.zeros(1)}, pt)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\xff" * 16)
    for weights in ("none", str(pt), str(broken), str(tmp_path / "missing.safetensors")):
        assert weights_metadata("semclip-tiny", weights) == {}
        assert recommended_scale_policy("semclip-tiny", weights) is None
    odd = _weights_recommending(tmp_path, "sideways")
    assert recommended_scale_policy("semclip-tiny", odd) is None  # an unknown name is warned about and ignored


def test_fit_memory_estimate_and_the_coarser_policies(tmp_path):
    assert [coarser(p) for p in (1.0, 0.75, 0.6, 0.5, None)] == [0.75, 0.5, 0.5, None, None]
    assert needed_bytes(100) == BASE_BYTES + 100 * BYTES_PER_ROW
    assert too_large(100, 1.0, None) is None  # memory unknown: no refusal
    assert too_large(100, 1.0, needed_bytes(100)) is None
    why = too_large(2352, 0.75, 8_000_000_000)
    assert why is not None and "2352 support rows at --scale-policy 0.75 need ~15.1 GB, 8.0 GB are available" in why
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:  1000 kB\nMemAvailable:   20000000 kB\n")
    assert available_bytes(meminfo) == 20_000_000 * 1024
    assert available_bytes(tmp_path / "absent") is None


def test_train_steps_down_from_a_recommended_policy_that_does_not_fit(tmp_path, logic_lot, monkeypatch, caplog):
    import semclip_batch.fewshot.support_set as support_set

    weights = _weights_recommending(tmp_path, "native")
    runner = CliRunner()

    def train_with(memory_rows: int, name: str, *args: str):
        monkeypatch.setattr(support_set, "available_bytes", lambda: needed_bytes(memory_rows))
        caplog.clear()
        return runner.invoke(main, ["train", "--adapt-steps", "0", str(logic_lot), "--out", str(tmp_path / name), "--backbone",
                                    "semclip-tiny", "--pretrained", weights, "--epochs", "1", *args])

    # 7 frames of 512 px: native 7 x 10 views, 0.75 7 x 5, whole 7 in 4 orientations (28 rows); a scale policy's
    # tiles are its extra views, the recipe's orientations apply at whole only (recipes.for_policy)
    res = train_with(100, "ck-native")
    assert res.exit_code == 0, res.output
    meta = load_checkpoint(str(tmp_path / "ck-native")).meta
    assert meta.scale_policy == 1.0 and meta.training["rows_augmented"] == 70 and "support rows" not in caplog.text
    res = train_with(50, "ck")  # native does not fit: the next coarser policy
    assert res.exit_code == 0, res.output
    assert "70 support rows at --scale-policy native need" in caplog.text
    assert "trained at --scale-policy 0.75 instead of the weights' recommendation (native)" in caplog.text
    meta = load_checkpoint(str(tmp_path / "ck")).meta
    assert meta.scale_policy == 0.75 and meta.training["rows_augmented"] == 35
    res = train_with(30, "ck-down")  # down to whole, where the recipe's 4 orientations apply again
    assert res.exit_code == 0, res.output
    assert "trained at --scale-policy whole instead of the weights' recommendation (native)" in caplog.text
    meta = load_checkpoint(str(tmp_path / "ck-down")).meta
    assert meta.scale_policy is None and meta.training["rows_augmented"] == 28
    # a policy the user gave is refused in one line instead
    res = train_with(50, "ck2", "--scale-policy", "native")
    assert res.exit_code != 0 and "Traceback" not in res.output
    assert "70 support rows at --scale-policy native need" in res.output and "--shots" in res.output
    assert not (tmp_path / "ck2").exists()
    res = train_with(20, "ck-whole", "--scale-policy", "whole")  # whole fits without its 4 orientations
    assert res.exit_code == 0, res.output
    assert "trained without the recipe's augmentation (7 rows, not 28)" in caplog.text
    assert load_checkpoint(str(tmp_path / "ck-whole")).meta.training["rows_augmented"] == 7
    res = train_with(5, "ck3", "--scale-policy", "whole")  # at whole, only fewer frames help
    assert res.exit_code != 0 and "(--shots)" in res.output and "coarser" not in res.output


def test_check_rows_are_held_out_manifest_rows_with_truth():
    import pandas as pd

    n = 24
    labels = ["normal" if i % 3 == 0 else "hole" for i in range(n)]
    masks = ["" if i % 3 == 0 or i % 4 == 0 else f"m{i}.png" for i in range(n)]  # some holes have no mask
    df = pd.DataFrame({"uri": [f"f{i}.png" for i in range(n)], "label": labels, "mask_url": masks},
                      index=range(100, 100 + n))  # an index that is not 0..n-1
    kept = [i for i in range(n) if i != 1]  # row 1 was unreadable; each other frame: a whole view and a crop
    frame = torch.tensor(kept).repeat_interleave(2)
    data = TrainSet(torch.zeros(len(frame), 2, 2), torch.zeros(len(frame), 2, 2),
                    torch.zeros(len(frame), dtype=torch.long), torch.ones(len(frame), dtype=torch.bool),
                    [""] * len(frame), ("normal",), 1, frame=frame)
    positions = held_frames(data, heldout_split(data, 0.45, seed=0))
    assert len(positions) == 10 and set(positions.tolist()) <= set(kept)
    rows = check_rows(df, positions)
    truth = {f"f{i}.png" for i in positions.tolist() if labels[i] == "normal" or masks[i]}
    assert set(rows["uri"]) == truth and 0 < len(truth) < 10
    assert check_rows(df, torch.tensor([4])).empty  # a hole without a mask has no pixel truth


def test_an_archive_without_held_out_frames_says_why_it_has_no_check(tmp_path, logic_lot):
    out = tmp_path / "w.safetensors"
    res = CliRunner().invoke(main, ["pretrain", str(logic_lot), "--out", str(out), "--backbone", "semclip-tiny",
                                    "--steps", "2", "--batch-size", "4"])
    assert res.exit_code == 0, res.output
    assert "scale check: no held-out frame with a pixel truth (archives under 20 frames hold none out" in res.output
    assert SCALE_POLICY_KEY not in weights_metadata("semclip-tiny", str(out))


@pytest.fixture(scope="module")
def logic_lot14(tmp_path_factory):
    """14 frames of the `logic` family (3-10 px defects), two per class, 512 or 768 x 640 px: the fit holds 2 out."""
    root = tmp_path_factory.mktemp("logic14")
    synth(str(root), SynthConfig(seed=41, lots=1, per_class=2, family="logic", sizes=((512, 512), (768, 640))))
    return root / "manifest.csv"


def test_train_checks_the_maps_policy_on_the_frames_the_fit_held_out(tmp_path, logic_lot14, monkeypatch):
    """``train`` with no options (SEM-CLIP's ``transfer`` recipe, no policy from the weights) fits at whole, then
    scores the support frames the fit held out with the fitted model, its memory left out, at every candidate
    policy; the cheapest near the best is the maps' policy, recorded with the figures in the checkpoint."""
    import semclip_batch.fewshot.maps_policy as maps_policy
    import semclip_batch.fewshot.train as train_module

    loads: list[list[str]] = []
    calls: list[tuple[int, float]] = []
    real_load, real_score = train_module.support_that_fits, maps_policy.support_output

    def load_spy(cfg, df, *args, **kwargs):
        loads.append(sorted(df["uri"]))
        return real_load(cfg, df, *args, **kwargs)

    def score_spy(model, feats, *args):
        calls.append((feats.dual.pooled.shape[0], float(model.memory.weight)))
        return real_score(model, feats, *args)

    def weight_half(model, *args):  # the fit's choice, its memory's weight made 0.5: something to leave out
        choice = real_choice(model, *args)
        model.memory.weight.fill_(0.5)
        return replace(choice, memory_weight=0.5)

    real_choice = semclip_method.choose_memory_weight
    monkeypatch.setattr(semclip_method, "choose_memory_weight", weight_half)
    def decode_spy(url, *args, **kwargs):
        decoded.append(url)
        return real_decode(url, *args, **kwargs)

    decoded: list[str] = []
    real_decode = trainset.load_frame
    monkeypatch.setattr(trainset, "load_frame", decode_spy)
    monkeypatch.setattr(train_module, "support_that_fits", load_spy)  # the fit's load
    monkeypatch.setattr(maps_policy, "support_that_fits", load_spy)  # the check's
    monkeypatch.setattr(maps_policy, "support_output", score_spy)
    res = CliRunner().invoke(main, ["train", "--adapt-steps", "0", str(logic_lot14), "--out", str(tmp_path / "ck"),
                                    "--backbone", "semclip-tiny", "--pretrained", "shipped", "--epochs", "1"])
    assert res.exit_code == 0, res.output
    assert "scale check (2 held-out support frames, the fitted model's maps, its memory left out)" in res.output
    df = read_manifest(str(logic_lot14))
    held = df.iloc[validation_frames(torch.arange(len(df)), 0).tolist()]
    assert (held["label"] != "normal").any()  # a defect pixel to measure on
    assert loads[0] == sorted(df["uri"]) and loads[1:5] == [sorted(held["uri"])] * 4  # the fit's; the check's
    assert len(loads) >= 6 and sorted(u for u in decoded if u in set(df["url"])) == sorted(df["url"])  # read once
    meta = load_checkpoint(str(tmp_path / "ck")).meta
    record = meta.training["scale_check"]
    assert record["frames"] == 2 and record["fitted_at"] == "whole" and record["scored_by"] == FITTED
    assert list(record["figures"]) == list(SCALE_CHECK_POLICIES)
    # each policy's views: the whole views, and the tiles of a tiled frame
    native = preprocess_config("semclip-tiny", tile_above=10**9, scale_policy=1.0)
    sizes = [Image.open(url).size for url in held["url"]]
    tiles = [len(frame_tiles(h, w, native)) for w, h in sizes]
    assert min(tiles) >= 9  # 512 px and more: at least 3 x 3 tiles of 240 px at native
    assert record["figures"]["whole"]["views"] == 2 and record["figures"]["native"]["views"] == 2 + sum(tiles)
    assert [n for n, _ in calls[:4]] == [row["views"] for row in record["figures"].values()]
    assert all(weight == 0.0 for _, weight in calls[:4])  # the memory left out of the check
    assert meta.training["memory_weight"] == 0.5 and float(_tensors(tmp_path / "ck")["memory.weight"]) == 0.5  # back
    assert record["chosen"] == recommend(record["figures"])
    assert meta.scale_policy == parse_scale_policy(record["chosen"])
    assert meta.training["config"]["check_scale"] is True and meta.training["config"]["model"]["scale_policy"] is None
    assert f"{record['chosen']:<8}" in res.output and "<- chosen: run --model scores the maps at it" in res.output
    assert all(set(row) == {"pAUROC", "F1max", "views"} for row in record["figures"].values())
    localisation = meta.training["held_out_localisation"]
    grey = meta.training.get("grey_memory") or {}
    expected = (grey["figures"][f"{grey['weight']:g}"] if "figures" in grey else record["figures"][record["chosen"]])
    assert localisation["frames"] == 2 and localisation["F1max"] == expected["F1max"]


def test_the_held_out_localisation_is_the_final_maps_and_warns_under_its_bound():
    """The held-out figures ``train`` reports are the grey-level memory's at the weight it chose where it was
    weighed, else the scale check's at the policy chosen; a warning only under 0.05 F1max."""
    scale = {"frames": 14, "chosen": "0.5", "figures": {"whole": {"pAUROC": 0.7, "F1max": 0.2, "views": 14},
                                                        "0.5": {"pAUROC": 0.9, "F1max": 0.03, "views": 90}}}
    grey = {"weight": 0.5, "figures": {"0": {"pAUROC": 0.9, "F1max": 0.03}, "0.5": {"pAUROC": 0.95, "F1max": 0.08}}}
    at_policy = held_out_localisation({"scale_check": scale})
    assert at_policy == {"frames": 14, "pAUROC": 0.9, "F1max": 0.03, "scored_at": "scale policy 0.5"}
    warning = weak_localisation_warning(at_policy)
    assert warning is not None and "F1max 0.030, pixel AUROC 0.900" in warning and "14 support frames" in warning
    fused = held_out_localisation({"scale_check": scale, "grey_memory": grey})
    assert fused is not None and fused["F1max"] == 0.08 and weak_localisation_warning(fused) is None
    dropped = held_out_localisation({"scale_check": scale, "grey_memory": {**grey, "weight": 0.0}})
    assert dropped is not None and dropped["F1max"] == 0.03 and dropped["scored_at"] == "grey-level memory weight 0"
    assert held_out_localisation({"scale_check": {**scale, "chosen": None}}) is None  # nothing measured
    assert held_out_localisation({"scale_check": {"frames": 0, "figures": {}, "chosen": None}}) is None
    assert held_out_localisation({}) is None and weak_localisation_warning(None) is None
    given = held_out_localisation({"grey_memory": {**grey, "weight": 0.0, "held_out": 14}})  # a policy given
    assert given is not None and given["frames"] == 14 and "of the 14 support frames" in str(weak_localisation_warning(given))
    unknown = held_out_localisation({"grey_memory": {**grey, "weight": 0.0}})  # a record from before the count
    assert unknown is not None and "of the support frames the fit held out" in str(weak_localisation_warning(unknown))
    no_truth = {**scale, "figures": {"0.5": {"pAUROC": None, "F1max": None, "views": 90}}}
    assert held_out_localisation({"scale_check": no_truth}) is None


def test_train_checks_nothing_where_a_policy_is_given_or_the_recipe_is_paper(tmp_path, logic_lot14, monkeypatch):
    """No check with a given ``--scale-policy``, weights that recommend one (``whole`` too), the ``paper`` recipe or a
    baseline; ``--scale-policy auto`` checks whatever the weights recommend; ``run`` has no support frames to check
    on. A given policy is trained to the end: no check in the output or the checkpoint; for the others, the
    configuration ``train`` is handed (the same fit, so not trained again here)."""
    from train_handed import STOPPED, handed_to_train

    runner = CliRunner()
    base = ["train", "--adapt-steps", "0", str(logic_lot14), "--backbone", "semclip-tiny", "--epochs", "1",
            "--no-die-to-die"]
    res = runner.invoke(main, [*base, "--out", str(tmp_path / "given"), "--pretrained", "shipped", "--scale-policy", "0.75"])
    assert res.exit_code == 0, res.output
    assert not [line for line in res.output.splitlines() if line.startswith("scale check")], res.output
    meta = load_checkpoint(str(tmp_path / "given")).meta
    assert "scale_check" not in meta.training and meta.scale_policy == 0.75
    with handed_to_train(monkeypatch) as handed:
        for name, extra, policy in (("weights", ["--pretrained", _weights_recommending(tmp_path, "0.5")], 0.5),
                                    ("weights-whole", ["--pretrained", _weights_recommending(tmp_path, "whole")], None),
                                    ("paper", ["--pretrained", "shipped", "--recipe", "paper"], None)):
            res = runner.invoke(main, [*base, "--out", str(tmp_path / name), *extra])
            assert STOPPED in res.output, res.output
            assert handed[-1].check_scale is False and handed[-1].model.scale_policy == policy, name
    res = runner.invoke(main, [*base, "--out", str(tmp_path / "over"), "--scale-policy", "auto",
                               "--pretrained", _weights_recommending(tmp_path, "0.5")])
    assert res.exit_code == 0, res.output
    record = load_checkpoint(str(tmp_path / "over")).meta.training["scale_check"]
    assert record["scored_by"] == FITTED and record["frames"] == 2
    res = runner.invoke(main, ["train", str(logic_lot14), "--out", str(tmp_path / "w"), "--backbone", "semclip-tiny",
                               "--pretrained", "shipped", "--method", "winclip", "--scale-policy", "auto"])
    assert res.exit_code == 1 and not (tmp_path / "w").exists()
    assert res.output.strip().splitlines()[-1].endswith("--method winclip takes whole, native or a fraction")
    res = runner.invoke(main, ["run", str(logic_lot14), "--out", str(tmp_path / "r"), "--backbone", "semclip-tiny",
                               "--pretrained", "shipped", "--scale-policy", "auto"])
    assert res.exit_code != 0 and "--scale-policy must be whole, native or a fraction" in res.output
    assert not (tmp_path / "r").exists()


def test_without_held_out_frames_or_their_pixel_truth_the_maps_stay_whole(tmp_path, logic_lot, logic_lot14):
    """Under 10 support frames the fit holds none out; held-out frames without a mask have no pixel to measure:
    the maps stay whole, and the record and ``train``'s output say why."""
    runner = CliRunner()
    res = runner.invoke(main, ["train", "--adapt-steps", "0", str(logic_lot), "--out", str(tmp_path / "few"),
                               "--backbone", "semclip-tiny", "--pretrained", "shipped", "--epochs", "1"])
    assert res.exit_code == 0, res.output
    meta = load_checkpoint(str(tmp_path / "few")).meta
    note = "under 10 support frames the fit holds none out to check on"
    assert meta.training["scale_check"] == {"figures": {}, "chosen": None, "frames": 0, "fitted_at": "whole",
                                            "scored_by": FITTED, "note": note}
    assert meta.scale_policy is None
    assert f"scale check: {note}; maps at whole (--scale-policy sets another)" in res.output
    unmasked = tmp_path / "unmasked.csv"
    raw = pd.read_csv(logic_lot14, keep_default_na=False)
    raw.assign(uri=[str(logic_lot14.parent / u) for u in raw["uri"]], mask_uri="").to_csv(unmasked, index=False)
    res = runner.invoke(main, ["train", "--adapt-steps", "0", str(unmasked), "--out", str(tmp_path / "nomask"),
                               "--backbone", "semclip-tiny", "--pretrained", "shipped", "--epochs", "1"])
    assert res.exit_code == 0, res.output
    record = load_checkpoint(str(tmp_path / "nomask")).meta.training["scale_check"]
    assert record["note"] == "no defect pixel among the 2 held-out support frames" and record["chosen"] is None
    assert support_check_lines({}) == []


def test_the_memory_is_left_out_inside_the_block_and_back_after():
    from semclip_batch.methods.registry import get_method

    backbone = load_backbone("semclip-tiny", "shipped")
    text = clip_text_embeddings(backbone.clip, "semclip-tiny", load_prompts(None))
    spec = ModelSpec(backbone="semclip-tiny", pretrained="shipped", cls="fused", memory=True)
    model = new_model(spec, backbone.clip, text)
    model.memory.weight.fill_(0.25)
    model.memory.set_banks([torch.randn(64, b.shape[1], generator=torch.Generator().manual_seed(0))
                            for b in model.memory.banks()])
    model.eval()
    x = torch.randn(2, 3, 240, 240, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), get_method("semclip").without_memory(model):
        assert float(model.memory.weight) == 0.0 and model.memory.left_out
        inside = model(x).maps
    assert float(model.memory.weight) == 0.25 and not model.memory.left_out
    model.memory.weight.zero_()  # the maps inside: those of weight 0, without the distances being taken
    with torch.no_grad():
        assert torch.equal(model(x).maps, inside)
    model.memory.weight.fill_(0.25)
    with pytest.raises(RuntimeError), get_method("semclip").without_memory(model):
        raise RuntimeError("a failed check")
    assert float(model.memory.weight) == 0.25
    with get_method("semclip").without_memory(model):
        with get_method("semclip").without_memory(model):
            pass
        assert model.memory.left_out and float(model.memory.weight) == 0.0  # a nested block restores what it found
    assert not model.memory.left_out
    baseline = new_model(ModelSpec(backbone="semclip-tiny", pretrained="shipped", method="winclip"), backbone.clip, text)
    with get_method("winclip").without_memory(baseline):
        pass  # nothing to leave out


def test_auto_steps_down_from_its_choice_and_says_so(tmp_path, logic_lot, monkeypatch, caplog):
    """The support check chose native, the support views do not fit there: ``train`` scores the maps' views at the
    next coarser policy, the warning names the support check, and the printed check marks native as chosen but the
    maps at 0.75."""
    import semclip_batch.fewshot.support_set as support_set
    import semclip_batch.fewshot.train as train_module

    figures = {name: {"pAUROC": 0.5 + 0.1 * k, "views": 7 * (k + 1)} for k, name in enumerate(SCALE_CHECK_POLICIES)}
    monkeypatch.setattr(train_module, "held_out_check",
                        lambda *a: {"figures": figures, "chosen": "native", "frames": 7, "scored_by": FITTED})
    monkeypatch.setattr(support_set, "available_bytes", lambda: needed_bytes(50))  # 70 native rows do not fit
    res = CliRunner().invoke(main, ["train", "--adapt-steps", "0", str(logic_lot), "--out", str(tmp_path / "ck"),
                                    "--backbone", "semclip-tiny", "--pretrained", "shipped", "--epochs", "1",
                                    "--scale-policy", "auto"])
    assert res.exit_code == 0, res.output
    assert "maps at --scale-policy 0.75 instead of the support frames' scale check (native)" in caplog.text
    meta = load_checkpoint(str(tmp_path / "ck")).meta
    assert meta.scale_policy == 0.75 and meta.training["scale_check"]["maps_at"] == "0.75"
    assert meta.training["config"]["model"]["scale_policy"] is None  # the fit at whole, as always with auto
    assert meta.training["maps_at_policy"]["policy"] == "0.75"
    assert "thresholds_at_whole" not in meta.training["maps_at_policy"]  # never fitted at whole: the maps moved
    assert "native   0.800      28  <- chosen; maps at 0.75: the support views would not fit in memory at it" in res.output
    assert meta.training["config"]["policy_from_weights"] is False


@pytest.fixture(scope="module")
def repeating_lot(tmp_path_factory):
    """7 frames of 640 px of the `classic` family (line/space or contact grids that repeat: cell references)."""
    root = tmp_path_factory.mktemp("classic")
    synth(str(root), SynthConfig(seed=43, lots=1, per_class=1, family="classic", sizes=((640, 640),)))
    return root / "manifest.csv"


def _forced_check(monkeypatch, chosen: str) -> list[tuple[int, dict[str, float]]]:
    """``train``'s check of the maps' policy answering ``chosen``, and a record of every threshold fit (rows, thresholds)."""
    import semclip_batch.fewshot.maps_policy as maps_policy
    import semclip_batch.fewshot.support_maps as support_maps
    import semclip_batch.fewshot.train as train_module

    figures = {name: {"pAUROC": 0.5 + 0.1 * (name == chosen), "views": 7 * (k + 1)}
               for k, name in enumerate(SCALE_CHECK_POLICIES)}
    monkeypatch.setattr(train_module, "held_out_check",
                        lambda *a: {"figures": figures, "chosen": chosen, "frames": 7, "scored_by": FITTED})
    calls: list[tuple[int, dict[str, float]]] = []
    real = support_maps.fit_thresholds

    def spy(out, data, *args):
        calls.append((len(data), real(out, data, *args)))
        return calls[-1][1]

    monkeypatch.setattr(support_maps, "fit_thresholds", spy)
    monkeypatch.setattr(maps_policy, "fit_thresholds", spy)  # the refit at the policy calls it by its own name
    return calls


def _auto_and_whole(tmp_path, lot, epochs: int) -> str:
    """``train --scale-policy auto`` into ``tmp_path/auto`` and ``--scale-policy whole`` into ``tmp_path/whole``, frozen
    backbone, on ``lot``; the first command's output."""
    runner = CliRunner()
    args = ["train", "--adapt-steps", "0", str(lot), "--backbone", "semclip-tiny", "--pretrained", "shipped",
            "--epochs", str(epochs)]
    res = runner.invoke(main, [*args, "--out", str(tmp_path / "auto"), "--scale-policy", "auto"])
    assert res.exit_code == 0, res.output
    whole = runner.invoke(main, [*args, "--out", str(tmp_path / "whole"), "--scale-policy", "whole"])
    assert whole.exit_code == 0, whole.output
    return res.output


def test_auto_fits_at_whole_and_refits_what_the_scale_changes(tmp_path, repeating_lot, monkeypatch):
    """``--scale-policy auto`` whose check chose 0.5: the fit is the fit at whole to the bit (head, layers, alpha,
    the map's weights, the thresholds it fitted), and fitted again on the support frames' views at 0.5 (whole views
    and tiles): the memory's bank (their clean patches, computed here on their own), the cell references' scales and
    the thresholds (on those views). The checkpoint records 0.5 and its tiling, so ``run --model`` scores there."""
    import torch.nn.functional as F

    from semclip_batch.fewshot.trainset import load_trainset
    from semclip_batch.methods.features import encode_views
    from semclip_batch.methods.weights import preprocess_config
    from semclip_batch.model.towers import vision_tower

    calls = _forced_check(monkeypatch, "0.5")
    output = _auto_and_whole(tmp_path, repeating_lot, epochs=2)
    assert "0.5      0.600      14  <- chosen: run --model scores the maps at it (the fit at whole" in output
    auto, whole = load_checkpoint(str(tmp_path / "auto")).meta, load_checkpoint(str(tmp_path / "whole")).meta
    record = auto.training["maps_at_policy"]
    assert auto.scale_policy == 0.5 and auto.preprocessing["scale_policy"] == 0.5 and whole.scale_policy is None
    assert record["policy"] == "0.5" and record["views"] > auto.training["views"] == whole.training["views"] == 7
    # thresholds: fitted once, on the views at 0.5 (none at whole: the check moved the maps before they were fitted)
    whole_thresholds = {"image": whole.thresholds.image, "pixel": whole.thresholds.pixel,
                        "min_region_px": whole.thresholds.min_region_px}
    assert [n for n, _ in calls] == [record["views"], 28]  # auto: the views at 0.5; whole: the fit's rows
    assert "thresholds_at_whole" not in record and calls[1][1] == whole_thresholds
    assert calls[0][1] == {"image": auto.thresholds.image, "pixel": auto.thresholds.pixel,
                           "min_region_px": auto.thresholds.min_region_px}
    assert (auto.alpha, auto.self_similarity, auto.training["memory_weight"]) == (
        whole.alpha, whole.self_similarity, whole.training["memory_weight"])
    a, b = _tensors(tmp_path / "auto"), _tensors(tmp_path / "whole")
    scale_bound = {k for k in a if k.startswith(("memory.bank", "reference."))}
    assert a.keys() == b.keys() and {"memory.bank0", "reference.scale", "reference.pixel_scale"} <= scale_bound
    for key in a.keys() - scale_bound:
        assert torch.equal(a[key], b[key]), key
    # the memory: every clean patch of the views at 0.5, at the first memory tap, as encoded here
    prep = preprocess_config("semclip-tiny", tile_above=10**9, scale_policy=0.5)
    data = load_trainset(read_manifest(str(repeating_lot)), load_prompts(None).classes, prep)
    tap = tuple(auto.taps)[1]
    feats = encode_views(vision_tower(load_backbone("semclip-tiny", "shipped").clip), data.views, prep, (tap,))
    clean = (F.adaptive_avg_pool2d(data.masks.float()[:, None], 15)[:, 0].flatten(1) == 0) & data.has_mask[:, None]
    expected = F.normalize(feats.dual.original[0][:, 1:].float(), dim=-1)[clean]
    assert len(data) == record["views"] and expected.shape[0] == record["memory_tokens"] <= 8192
    assert torch.allclose(a["memory.bank0"], expected, atol=1e-5)
    assert auto.self_reference and record["reference_refit"]
    assert record["reference_scale"] == pytest.approx(float(a["reference.scale"]))
    assert record["reference_scale"] != whole.training["reference_scale"]


def test_auto_that_keeps_whole_is_the_whole_fit_to_the_bit(tmp_path, repeating_lot, monkeypatch):
    """The check chose whole: the thresholds, left by the fit until the check had spoken, are fitted on the fit's own
    rows (augmented, with the cell references' pixel differences) and equal ``--scale-policy whole``'s, as every
    tensor does."""
    calls = _forced_check(monkeypatch, "whole")
    _auto_and_whole(tmp_path, repeating_lot, epochs=1)
    auto, whole = load_checkpoint(str(tmp_path / "auto")).meta, load_checkpoint(str(tmp_path / "whole")).meta
    assert auto.scale_policy is None and "maps_at_policy" not in auto.training and auto.self_reference
    assert [n for n, _ in calls] == [28, 28] and calls[0][1] == calls[1][1]  # once each: auto, then whole
    assert auto.thresholds == whole.thresholds
    a, b = _tensors(tmp_path / "auto"), _tensors(tmp_path / "whole")
    assert a.keys() == b.keys() and "reference.scale" in a and all(torch.equal(a[k], b[k]) for k in a)


def test_auto_whose_views_do_not_fit_keeps_the_whole_fit(tmp_path, repeating_lot, monkeypatch, caplog):
    """The check chose 0.5, its 35 views would not fit but the whole fit's 28 rows do: the maps step down to
    whole, and the checkpoint is the whole fit as it was (every tensor, the thresholds, no tiling): the thresholds,
    left to the maps' views, fitted on the views at whole as ``--scale-policy whole`` fits them."""
    import semclip_batch.fewshot.support_set as support_set

    _forced_check(monkeypatch, "0.5")
    monkeypatch.setattr(support_set, "available_bytes", lambda: needed_bytes(30))
    output = _auto_and_whole(tmp_path, repeating_lot, epochs=1)
    assert "0.5      0.600      14  <- chosen; maps at whole: the support views would not fit in memory at it" in output
    assert "maps at --scale-policy whole instead of the support frames' scale check (0.5)" in caplog.text
    auto, whole = load_checkpoint(str(tmp_path / "auto")).meta, load_checkpoint(str(tmp_path / "whole")).meta
    assert auto.scale_policy is None and auto.training["scale_check"]["maps_at"] == "whole"
    assert "maps_at_policy" not in auto.training and auto.thresholds == whole.thresholds
    a, b = _tensors(tmp_path / "auto"), _tensors(tmp_path / "whole")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_auto_from_the_library_fits_at_whole_whatever_the_spec_says(tmp_path, logic_lot, monkeypatch):
    from semclip_batch.fewshot.train import TrainConfig, train

    _forced_check(monkeypatch, "whole")
    meta = train(TrainConfig(support=str(logic_lot), out=str(tmp_path / "ck"), epochs=1, check_scale=True,
                             model=ModelSpec(backbone="semclip-tiny", pretrained="shipped", cls="fused", scale_policy=0.5)))
    assert meta.scale_policy is None and meta.training["config"]["model"]["scale_policy"] is None
    assert meta.training["config"]["check_scale"] is True and "maps_at_policy" not in meta.training


def _tensors(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))
