"""The Ray Data pipeline end to end on local files: the output contract, idempotence and resume."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest
import tifffile
import zarr
from benchmark_module import load_benchmark
from PIL import Image

from semclip_batch.analysis.results import read_predictions
from semclip_batch.config import ModelSpec, RunConfig
from semclip_batch.errors import OutputError
from semclip_batch.io.preprocess import tile_grid
from semclip_batch.io.schema import PREDICTIONS, RESULT_COLUMNS
from semclip_batch.pipeline.driver import run

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]

SPEC = ModelSpec(backbone="semclip-tiny", pretrained="none", seed=0, defect_view=True)  # as `run` zero-shot


@pytest.fixture(scope="module")
def mixed_manifest(synth_lot, tmp_path_factory) -> Path:
    """The synthetic lots plus broken files and a 4096x4096 16-bit frame, in another folder."""
    root = tmp_path_factory.mktemp("mixed")
    m = pd.read_csv(synth_lot / "manifest.csv", dtype=str, keep_default_na=False)
    for col in ("uri", "mask_uri", "reference_uri"):
        m[col] = [str(synth_lot / u) for u in m[col]]
    broken = root / "broken"
    broken.mkdir()
    (broken / "empty.png").write_bytes(b"")
    (broken / "text.png").write_text("this is not an image")
    good = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(good, format="PNG")
    (broken / "truncated.png").write_bytes(good.getvalue()[:200])
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(broken / "tiny.png")
    big = (np.random.default_rng(1).random((4096, 4096)) * 4095).astype(np.uint16)
    big[1000:1100, 2000:2100] = 4095
    tifffile.imwrite(root / "big.tif", big)
    extra = pd.DataFrame([
        {"uri": "broken/missing.png", "lot_id": "LOT-X", "wafer_id": "W9"},
        {"uri": "broken/empty.png", "lot_id": "LOT-X", "wafer_id": "W9"},
        {"uri": "broken/text.png", "lot_id": "LOT-X", "wafer_id": "W9"},
        {"uri": "broken/truncated.png", "lot_id": "LOT-X", "wafer_id": "W9"},
        {"uri": "broken/tiny.png", "lot_id": "LOT-X", "wafer_id": "W9"},
        {"uri": "big.tif", "lot_id": "LOT-X", "wafer_id": "W9", "die_x": "2", "die_y": "5"},
    ])
    pd.concat([m, extra], ignore_index=True).fillna("").to_csv(root / "manifest.csv", index=False)
    return root / "manifest.csv"


def cfg_for(manifest: Path, out: Path, **kw) -> RunConfig:
    base = {"input": str(manifest), "out": str(out), "model": SPEC, "shard_size": 4, "batch_size": 8}
    base.update(kw)
    return RunConfig(**base)


def predictions(out: Path) -> pd.DataFrame:
    return read_predictions(str(out)).to_pandas().sort_values("image_id").reset_index(drop=True)


@pytest.fixture(scope="module")
def first_run(ray_cluster, mixed_manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "run"
    result = run(cfg_for(mixed_manifest, out))
    return out, result


def test_one_row_per_manifest_row_with_errors(first_run, mixed_manifest):
    out, result = first_run
    df = predictions(out)
    manifest = pd.read_csv(mixed_manifest)
    assert len(df) == len(manifest) == result.record["rows"]["total"]
    assert df["image_id"].is_unique
    by_uri = df.set_index("uri")
    assert by_uri.loc["broken/missing.png", "status"] == "read_error"
    for name in ("empty", "text", "truncated", "tiny"):
        assert by_uri.loc[f"broken/{name}.png", "status"] == "decode_error"
    bad = df[df["status"] != "ok"]
    assert len(bad) == 5
    assert bad["error"].map(lambda e: isinstance(e, str) and e and "\n" not in e).all()
    assert bad[list(RESULT_COLUMNS)].isna().all().all()
    ok = df[df["status"] == "ok"]
    assert ok["error"].isna().all() and ok["anomaly_score"].between(0, 1).all()
    assert ok["class_scores"].map(len).eq(7).all()
    assert (df["model_id"] == result.record["model_id"]).all() and (df["run_id"] == result.run_id).all()
    assert result.record["counts"] == {"decode_error": 4, "ok": len(ok), "read_error": 1}


def test_masks_open_with_plain_zarr_at_frame_size(first_run, mixed_manifest):
    out, _ = first_run
    df = predictions(out)
    root = zarr.open_group(str(out / "masks.zarr"), mode="r")
    base = mixed_manifest.parent
    for row in df[df["status"] == "ok"].itertuples():
        mask = root[row.mask_path][int(row.mask_index)]
        path = Path(row.uri) if Path(row.uri).is_absolute() else base / row.uri
        h, w = (tifffile.imread(path).shape if str(path).endswith(".tif") else Image.open(path).size[::-1])[:2]
        assert mask.shape == (h, w) and mask.dtype == np.uint8
    big = df.set_index("uri").loc["big.tif"]
    assert big["status"] == "ok"
    assert root[big["mask_path"]][int(big["mask_index"])].shape == (4096, 4096)
    assert (big["die_x"], big["die_y"]) == (2, 5)


def test_parquet_schema_and_duckdb_hive(first_run):
    out, result = first_run
    files = list((out / "predictions").rglob("*.parquet"))
    assert all(f.parent.name.startswith("lot_id=") for f in files)
    import pyarrow.parquet as pq

    assert pq.read_schema(files[0]).names == PREDICTIONS.names  # lot_id lives in the folder name only
    con = duckdb.connect()
    rows = con.execute(
        f"select lot_id, count(*) from read_parquet('{out}/predictions/**/*.parquet', hive_partitioning=true, "
        "hive_types={'lot_id': VARCHAR}) group by 1 order by 1").fetchall()
    assert rows == sorted(rows) and sum(n for _, n in rows) == result.record["rows"]["total"]
    assert {lot for lot, _ in rows} == {"LOT-S11-00", "LOT-S11-01", "LOT-X"}


def test_run_record_holds_ray_datas_stage_stats(first_run):
    _, result = first_run
    names = [s["stage"] for s in result.record["stages"]]
    at = [next(i for i, name in enumerate(names) if key in name)
          for key in ("read_plan", "decode_batch", "Predictor", "write_batch")]
    assert at == sorted(at)  # pipeline order
    # the plan read is a stage of its own: fused into decode, its one row per plan file took decode's batch size
    # as its bundle size, and one task read and decoded 4 plan files (a run of ~1,000 rows on one core)
    assert "decode_batch" not in names[at[0]]
    decode, model, writer = (result.record["stages"][i] for i in at[1:])
    assert model["rows"] == writer["rows"] == result.record["rows"]["total"]  # error rows pass through too
    assert model["cpu_s"] > 0 and model["busy_s"] > 0 and model["span_s"] > 0 and model["tasks"] >= 1
    assert 0 < model["start_s"] < model["end_s"] <= writer["end_s"] + 1e-3  # seconds after the run's start
    # decode ships one uint16 grey channel per model view, not 3 float32 channels
    views = result.record["counts"]["ok"] + len(tile_grid(4096, 4096, 1024))  # the 4096 px frame is tiled
    view_bytes = 2 * result.record["preprocessing"]["image_size"] ** 2 * views
    frame_bytes = 4096 * 4096  # the one frame >= 480 px also ships its uint8 levels for the defect view
    assert view_bytes + frame_bytes <= decode["out_bytes"] < 1.5 * view_bytes + frame_bytes
    assert model["out_bytes"] > 0


def test_run_record(first_run):
    _out, result = first_run
    rec = json.loads(Path(result.record_url).read_text())
    for key in ("run_id", "attempt", "started_at", "finished_at", "status", "mode", "model_id", "classes",
                "thresholds", "preprocessing", "shard_size", "shards", "rows", "counts", "timings_s",
                "throughput_img_s", "config"):
        assert key in rec
    assert rec["status"] == "complete" and rec["mode"] == "zero-shot" and rec["attempt"] == 1
    assert rec["model_id"].startswith("zero-shot:semclip-tiny:") and len(rec["model_id"].split(":")[2]) == 12
    assert rec["thresholds"]["source"] == {"image": "default", "pixel": "default", "min_region_px": "default"}
    assert rec["class_scores"] == "model"  # zero-shot under the default threshold: the model's own class scores
    assert rec["shards"]["total"] == rec["shards"]["run"] and rec["shards"]["skipped"] == 0
    assert rec["rows"]["sent_to_model"] == rec["counts"]["ok"]


def test_rerun_does_no_model_work_and_changes_nothing(first_run, mixed_manifest):
    out, first = first_run
    before = predictions(out)
    again = run(cfg_for(mixed_manifest, out, batch_size=3, actors=1))  # batch size is not output-affecting
    assert again.run_id == first.run_id and again.record["attempt"] == 2
    assert again.record["rows"]["sent_to_model"] == 0 and again.record["shards"]["run"] == 0
    pd.testing.assert_frame_equal(predictions(out), before)


def test_resume_after_interruption_equals_uninterrupted(first_run, mixed_manifest, tmp_path):
    out, first = first_run
    copy = tmp_path / "resumed"
    shutil.copytree(out, copy)
    # Simulate a crash: two shards lose their marker, one of them also its Parquet file.
    markers = sorted((copy / "_state" / "done").rglob("*.json"))
    victims = markers[:2]
    for marker in victims:
        marker.unlink()
    lot, shard = victims[0].parent.name, victims[0].stem
    (copy / "predictions" / f"lot_id={lot}" / f"{shard}.parquet").unlink()
    result = run(cfg_for(mixed_manifest, copy))
    assert result.record["shards"]["run"] == 2
    assert result.record["shards"]["skipped"] == first.record["shards"]["total"] - 2
    assert 0 < result.record["rows"]["sent_to_model"] < first.record["rows"]["sent_to_model"]
    a, b = predictions(out), predictions(copy)
    assert list(a["image_id"]) == list(b["image_id"]) and list(a["status"]) == list(b["status"])
    assert np.allclose(a["anomaly_score"].fillna(-1), b["anomaly_score"].fillna(-1), atol=1e-4)
    ra, rb = zarr.open_group(str(out / "masks.zarr"), mode="r"), zarr.open_group(str(copy / "masks.zarr"), mode="r")
    for x, y in zip(a[a.status == "ok"].itertuples(), b[b.status == "ok"].itertuples(), strict=False):
        diff = np.abs(ra[x.mask_path][int(x.mask_index)].astype(int) - rb[y.mask_path][int(y.mask_index)].astype(int))
        assert diff.max() <= 1


def test_other_run_refused_unless_overwrite(first_run, mixed_manifest, tmp_path):
    out, first = first_run
    copy = tmp_path / "other"
    shutil.copytree(out, copy)
    changed = cfg_for(mixed_manifest, copy, model=ModelSpec(backbone="semclip-tiny", pretrained="none", seed=1))
    with pytest.raises(OutputError, match="--overwrite"):
        run(changed)
    result = run(RunConfig(**{**changed.__dict__, "overwrite": True}))
    assert result.run_id != first.run_id
    assert set(predictions(copy)["run_id"]) == {result.run_id}
    assert (copy / "runs" / first.run_id).is_dir()  # runs/ is kept


def test_eval_writes_metrics_json(first_run, mixed_manifest, tmp_path):
    from semclip_batch.analysis.evaluate import evaluate

    out, _ = first_run
    metrics = evaluate(str(out), str(mixed_manifest))
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    for key in ("iAUROC", "pAUROC", "F1max", "AUPRO", "accuracy", "macro_precision", "macro_recall", "macro_F1"):
        assert saved[key] is None or 0.0 <= saved[key] <= 1.0
    assert saved["n_truth"] == 20 and saved["n_error"] == 5 and saved["n_scored"] == 15 and saved["n_unmatched"] == 0
    assert saved["confusion"]["labels"][0] == "normal" and len(saved["confusion"]["matrix"]) == 7
    assert sum(map(sum, saved["confusion"]["matrix"])) == 14  # labelled ok rows (the big frame has no label)
    extra = pd.read_csv(mixed_manifest, dtype=str, keep_default_na=False)
    extra = pd.concat([extra, pd.DataFrame([{"uri": "never_run.png", "lot_id": "LOT-X", "wafer_id": "W1"}])])
    extra.to_csv(tmp_path / "truth.csv", index=False)
    (tmp_path / "never_run.png").write_bytes(b"")
    with pytest.raises(OutputError, match="1 truth rows have no prediction"):
        evaluate(str(out), str(tmp_path / "truth.csv"))
    upper = pd.read_csv(mixed_manifest, dtype=str, keep_default_na=False)
    upper["label"] = upper["label"].str.upper()  # NORMAL, BRIDGE, ...: not the run's classes
    upper.to_csv(tmp_path / "upper.csv", index=False)
    with pytest.raises(OutputError, match=r"label 'NORMAL' \(\d+ rows; \d+ with labels outside the run's classes\) is "
                                          r"not a class of the run \(normal, "):
        evaluate(str(out), str(tmp_path / "upper.csv"))
    assert json.loads((out / "metrics.json").read_text()) == saved  # nothing written for the refused truth
    damaged = tmp_path / "damaged"
    shutil.copytree(out, damaged)
    part = sorted((damaged / "predictions").rglob("*.parquet"))[0]
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])  # a truncated file, as a full disk leaves
    with pytest.raises(OutputError, match=r"predictions holds a file that cannot be read: "):
        evaluate(str(damaged), str(mixed_manifest))
    # no scored row with a label: metrics.json keeps its shape (every class, support 0; a zero matrix)
    unlabelled = tmp_path / "unlabelled"
    shutil.copytree(out, unlabelled)
    pd.read_csv(mixed_manifest, dtype=str, keep_default_na=False).assign(label="", mask_uri="").to_csv(
        tmp_path / "no-labels.csv", index=False)
    bare = evaluate(str(unlabelled), str(tmp_path / "no-labels.csv"))
    assert bare.keys() == saved.keys() and bare["per_class"].keys() == saved["per_class"].keys()
    assert {m["support"] for m in bare["per_class"].values()} == {0} and bare["macro_F1"] is None
    assert bare["confusion"]["labels"] == saved["confusion"]["labels"]
    assert bare["confusion"]["matrix"] == [[0] * 7 for _ in range(7)]


def test_a_stand_in_model_stage_keeps_the_contract_and_its_own_run_id(first_run, mixed_manifest, tmp_path):
    """benchmarks/pipeline.py --model-stub: the rest of the pipeline against a fixed-rate stand-in model."""
    out, first = first_run
    result = run(cfg_for(mixed_manifest, tmp_path / "stub", model_stub=400.0))
    assert result.run_id != first.run_id and result.record["status"] == "complete"
    real, stub = predictions(out), predictions(tmp_path / "stub")
    assert stub["image_id"].tolist() == real["image_id"].tolist()
    assert stub["status"].tolist() == real["status"].tolist()  # read and decode errors are rows as before
    ok = stub[stub["status"] == "ok"]
    assert (ok["anomaly_score"] == 0).all() and (ok["defect_area_px"] == 0).all() and not ok["is_defect"].any()
    root = zarr.open_group(str(tmp_path / "stub" / "masks.zarr"), mode="r")
    for row, truth in zip(ok.itertuples(), real[real["status"] == "ok"].itertuples(), strict=True):
        stored = root[row.mask_path][int(row.mask_index)]
        assert stored.shape == root[truth.mask_path][int(truth.mask_index)].shape and not stored.any()


def test_the_benchmarks_plain_loop_stores_what_the_pipeline_stores(first_run, mixed_manifest, tmp_path):
    """benchmarks/pipeline.py's plain loop (the pipeline's work in one process, writes and finalisation
    included) stores the same rows, statuses and scores as `run`, with a done marker per shard."""
    from semclip_batch.methods.prompts import load_prompts, text_embeddings
    from semclip_batch.methods.weights import load_backbone, preprocess_config
    from semclip_batch.pipeline.inference import Predictor, PredictorSetup

    bench = load_benchmark("pipeline")
    out, _ = first_run
    prep = preprocess_config(SPEC.backbone, tile_above=1024, defect_view=SPEC.defect_view)
    backbone = load_backbone(SPEC.backbone, SPEC.pretrained, seed=SPEC.seed)
    prompts = load_prompts()
    predictor = Predictor(PredictorSetup(spec=SPEC, prep=prep, text_embeddings=text_embeddings(backbone, prompts),
                                         weights_sha256=backbone.sha256, batch_size=8, threads=2, use_gpu=False))
    rate = bench.plain_loop(mixed_manifest, tmp_path / "plain", predictor, prep, 8, "plain", prompts.classes)
    assert rate > 0
    real, plain = predictions(out), predictions(tmp_path / "plain")
    assert plain["image_id"].tolist() == real["image_id"].tolist()
    assert plain["status"].tolist() == real["status"].tolist()
    assert np.allclose(plain["anomaly_score"].to_numpy(float), real["anomaly_score"].to_numpy(float), atol=1e-5,
                       equal_nan=True)
    lots = sorted(set(real["lot_id"]))
    assert all(list((tmp_path / "plain" / "_state" / "done" / lot).glob("*.json")) for lot in lots)
