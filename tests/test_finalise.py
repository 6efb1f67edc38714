"""Finalising shards without Ray: parts -> one Parquet file + one sharded Zarr group, idempotent at every step."""

from __future__ import annotations

import io
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr

from semclip_batch.config import Thresholds
from semclip_batch.errors import DECODE_ERROR, OK
from semclip_batch.io import storage
from semclip_batch.io.layout import OutLayout
from semclip_batch.io.schema import PREDICTIONS
from semclip_batch.methods.decisions import weighed_class_scores
from semclip_batch.pipeline import finalise
from semclip_batch.pipeline.finalise import FinaliseSetup, finalise_shard
from semclip_batch.pipeline.shards import create_mask_groups
from semclip_batch.pipeline.writer import WriterSetup, write_batch

CLASSES = ("normal", "particle", "scratch")
SIZES = [(40, 56), (40, 56), (33, 20), (40, 56), (33, 20), (40, 56), (16, 16)]


def _batch(lot: str, shard: str, ids: list[str], sizes: list[tuple[int, int]], bad: set[str]) -> dict[str, np.ndarray]:
    """A scored batch as the model stage gives it: random uint8 masks of ``sizes``."""
    rng = np.random.default_rng(len(ids))
    n = len(ids)
    masks = [rng.integers(0, 256, size=h * w, dtype=np.uint8).tobytes() for h, w in sizes]
    status = [DECODE_ERROR if i in bad else OK for i in ids]
    return {
        "lot_id": np.array([lot] * n, object), "shard": np.array([shard] * n, object),
        "image_id": np.array(ids, object), "uri": np.array([f"{i}.png" for i in ids], object),
        "wafer_id": np.array(["W1"] * n, object), "die_x": np.arange(n), "die_y": np.arange(n),
        "status": np.array(status, object),
        "error": np.array(["broken" if s != OK else None for s in status], object),
        "height": np.array([h for h, _ in sizes]), "width": np.array([w for _, w in sizes]),
        "mask": np.array([b"" if s != OK else m for s, m in zip(status, masks, strict=True)], object),
        "anomaly_score": rng.random(n), "class_scores": rng.random((n, 3)).astype(np.float32),
        "cell_ref": np.zeros(n, bool),
    }


def _write_parts(out: str, lot: str, shard: str, pieces: list[list[int]], ids: list[str], bad: set[str],
                 sizes: list[tuple[int, int]] = SIZES) -> dict[str, np.ndarray]:
    setup = WriterSetup(out=out, run_id="r1", model_id="m", classes=CLASSES, thresholds=Thresholds(), storage_options={})
    full = _batch(lot, shard, ids, sizes[:len(ids)], bad)
    for rows in pieces:
        receipts = write_batch({k: v[rows] for k, v in full.items()}, setup=setup)
        assert all(receipts.column("written").to_pylist())
    return full


def _check(out: str, lot: str, shard: str, full: dict[str, np.ndarray]) -> None:
    layout = OutLayout(out)
    table = pq.read_table(layout.prediction_file(lot, shard))
    assert table.schema.names == PREDICTIONS.names
    rows = {r["image_id"]: r for r in table.to_pylist()}
    assert sorted(rows) == sorted(full["image_id"].tolist()) and len(rows) == table.num_rows
    assert table.column("image_id").to_pylist() == sorted(rows)
    root = zarr.open_group(layout.masks, mode="r")
    for i, image_id in enumerate(full["image_id"]):
        row = rows[image_id]
        if full["status"][i] != OK:
            assert row["mask_path"] is None and row["mask_index"] is None
            continue
        h, w = int(full["height"][i]), int(full["width"][i])
        assert row["mask_path"] == f"{lot}/{shard}/{h}x{w}"
        got = root[row["mask_path"]][row["mask_index"]]
        assert np.array_equal(got, np.frombuffer(full["mask"][i], np.uint8).reshape(h, w))
    assert not os.path.exists(layout.shard_parts(lot, shard))


@pytest.mark.parametrize("lot", ["L1", "Lü #:x"])
def test_parts_become_one_file_and_one_sharded_group(tmp_path, lot):
    out = str(tmp_path)
    ids = [f"img{k:02d}" for k in range(7)]
    full = _write_parts(out, lot, "s00003", [[0, 1, 2], [3, 4], [5, 6]], ids, bad={"img02"})
    create_mask_groups(OutLayout(out), [lot], {})
    result = finalise_shard(FinaliseSetup(out=out, storage_options={}), lot, "s00003", 7)
    assert result.error is None and result.counts == {OK: 6, DECODE_ERROR: 1}
    _check(out, lot, "s00003", full)
    # one array per frame size, each stored as a single shard object of the sharding codec
    arrays = sorted((tmp_path / "masks.zarr" / lot / "s00003").iterdir())
    assert [a.name for a in arrays] == ["16x16", "33x20", "40x56", "zarr.json"]
    for folder in arrays[:-1]:
        objects = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        assert objects == ["c/0/0/0", "zarr.json"]
        assert '"sharding_indexed"' in (folder / "zarr.json").read_text()


def test_a_calibrated_threshold_writes_class_scores_that_weigh_the_image_decision(tmp_path):
    """Rule 29: under a checkpoint's image threshold every ok row's stored class scores are the weighed ones; under
    the default threshold the model's; is_defect and defect_class are the same either way."""
    ids = [f"img{k:02d}" for k in range(7)]
    full = _batch("L1", "s00000", ids, SIZES, bad={"img02"})
    tables = {}
    calibrated = Thresholds(image=0.55, source={"image": "checkpoint", "pixel": "checkpoint", "min_region_px": "checkpoint"})
    for name, thresholds in (("model", Thresholds(image=0.55)), ("weighed", calibrated)):
        out = str(tmp_path / name)
        setup = WriterSetup(out=out, run_id="r1", model_id="m", classes=CLASSES, thresholds=thresholds, storage_options={})
        assert all(write_batch(full, setup=setup).column("written").to_pylist())
        create_mask_groups(OutLayout(out), ["L1"], {})
        assert finalise_shard(FinaliseSetup(out=out, storage_options={}), "L1", "s00000", 7).error is None
        tables[name] = {r["image_id"]: r for r in pq.read_table(OutLayout(out).prediction_file("L1", "s00000")).to_pylist()}
    model, weighed = tables["model"], tables["weighed"]
    flipped = 0
    for i, image_id in enumerate(ids):
        if full["status"][i] != OK:
            assert weighed[image_id]["class_scores"] is None
            continue
        given = full["class_scores"][i]
        assert np.allclose(model[image_id]["class_scores"], given)
        expected = weighed_class_scores(given, float(full["anomaly_score"][i]), 0.55)
        assert np.allclose(weighed[image_id]["class_scores"], expected)
        for column in ("is_defect", "defect_class", "anomaly_score"):
            assert weighed[image_id][column] == model[image_id][column]
        flipped += int(np.argmax(given)) != int(np.argmax(expected))
    assert flipped  # the random batch has rows whose arg-max the decision moves


def test_shard_objects_are_capped(tmp_path, monkeypatch):
    monkeypatch.setattr(finalise, "SHARD_BYTES", 2 * 40 * 56)  # two 40x56 masks per stored object
    out = str(tmp_path)
    ids = [f"img{k:02d}" for k in range(7)]
    full = _write_parts(out, "L", "s00000", [list(range(7))], ids, bad=set())
    create_mask_groups(OutLayout(out), ["L"], {})
    assert finalise_shard(FinaliseSetup(out=out, storage_options={}), "L", "s00000", 7).error is None
    _check(out, "L", "s00000", full)
    chunks = sorted((tmp_path / "masks.zarr" / "L" / "s00000" / "40x56" / "c").rglob("*"))
    assert len([c for c in chunks if c.is_file()]) == 2  # 4 masks of 40x56 in shard objects of at most 2


def test_frames_larger_than_an_inner_chunk_and_not_a_multiple_of_it(tmp_path):
    out = str(tmp_path)
    ids = ["a", "b", "c"]
    full = _write_parts(out, "L", "s00000", [[0], [1, 2]], ids, bad=set(), sizes=[(1280, 960), (1100, 70), (1280, 960)])
    create_mask_groups(OutLayout(out), ["L"], {})
    assert finalise_shard(FinaliseSetup(out=out, storage_options={}), "L", "s00000", 3).counts == {OK: 3}
    _check(out, "L", "s00000", full)
    stored = [p for p in (tmp_path / "masks.zarr" / "L" / "s00000" / "1280x960" / "c").rglob("*") if p.is_file()]
    assert len(stored) == 1  # both 1280x960 masks in one stored shard object


def test_duplicate_rows_across_parts_are_stored_once(tmp_path):
    out = str(tmp_path)
    ids = [f"img{k:02d}" for k in range(5)]
    full = _write_parts(out, "L", "s00000", [[0, 1, 2], [2, 3, 4]], ids, bad=set())
    create_mask_groups(OutLayout(out), ["L"], {})
    assert finalise_shard(FinaliseSetup(out=out, storage_options={}), "L", "s00000", 5).counts == {OK: 5}
    _check(out, "L", "s00000", full)


def test_missing_rows_fail_the_shard_and_keep_the_parts(tmp_path):
    out = str(tmp_path)
    ids = [f"img{k:02d}" for k in range(5)]
    _write_parts(out, "L", "s00000", [[0, 1, 2]], ids, bad=set())
    create_mask_groups(OutLayout(out), ["L"], {})
    result = finalise_shard(FinaliseSetup(out=out, storage_options={}), "L", "s00000", 5)
    assert result.error is not None and "3 distinct rows" in result.error and "expected 5" in result.error
    assert os.path.exists(OutLayout(out).shard_parts("L", "s00000"))
    assert not os.path.exists(OutLayout(out).prediction_file("L", "s00000"))


@pytest.mark.parametrize("stop_after", ["masks", "final_file", "half_the_parts_removed"])
def test_a_finaliser_killed_at_any_step_is_repeated_to_the_same_result(tmp_path, monkeypatch, stop_after):
    out = str(tmp_path)
    layout = OutLayout(out)
    ids = [f"img{k:02d}" for k in range(7)]
    full = _write_parts(out, "L", "s00000", [[0, 1, 2], [3, 4], [5, 6]], ids, bad={"img04"})
    create_mask_groups(layout, ["L"], {})

    class Killed(BaseException):
        pass

    real_write, real_remove = storage.write_bytes, finalise._remove_parts

    def write_then_die(url, data, so):
        if stop_after == "final_file":
            real_write(url, data, so)
        raise Killed

    def remove_half_then_die(lay, lot, shard, so):
        first = sorted(os.listdir(lay.shard_parts(lot, shard)))[0]
        os.unlink(os.path.join(lay.shard_parts(lot, shard), first))
        raise Killed

    if stop_after == "half_the_parts_removed":
        monkeypatch.setattr(finalise, "_remove_parts", remove_half_then_die)
    else:
        monkeypatch.setattr(finalise.storage, "write_bytes", write_then_die)
    with pytest.raises(Killed):
        finalise_shard(FinaliseSetup(out=out, storage_options={}), "L", "s00000", 7)
    monkeypatch.setattr(finalise.storage, "write_bytes", real_write)
    monkeypatch.setattr(finalise, "_remove_parts", real_remove)
    result = finalise_shard(FinaliseSetup(out=out, storage_options={}), "L", "s00000", 7)
    assert result.error is None and result.counts == {OK: 6, DECODE_ERROR: 1}
    _check(out, "L", "s00000", full)
    assert not [p for p in storage.list_names(layout.prediction_folder("L")) if p != "s00000.parquet"]


@pytest.mark.s3
@pytest.mark.parametrize("lot", ["LOT::7", "a::b::c"])
def test_a_lot_with_double_colons_finalises_on_s3(s3_endpoint, lot):
    """'::' is a URL chain to fsspec; inside our keys it is just text (a lot id may hold it)."""
    from conftest import BUCKET

    out = f"s3://{BUCKET}/finalise-colons/{lot.replace(':', '_')}"
    ids = [f"img{k:02d}" for k in range(4)]
    full = _write_parts(out, lot, "s00000", [[0, 1], [2, 3]], ids, bad={"img01"})
    assert storage.list_names(OutLayout(out).shard_parts(lot, "s00000")) != []
    assert storage.list_names(f"{out}/_state/parts") == [lot]
    create_mask_groups(OutLayout(out), [lot], {})
    assert finalise_shard(FinaliseSetup(out=out, storage_options={}), lot, "s00000", 4).counts == {OK: 3, DECODE_ERROR: 1}
    table = pq.read_table(io.BytesIO(storage.read_bytes(OutLayout(out).prediction_file(lot, "s00000"))))
    rows = {r["image_id"]: r for r in table.to_pylist()}
    root = zarr.open_group(store=f"{out}/masks.zarr", mode="r")
    for i, image_id in enumerate(ids):
        if full["status"][i] == OK:
            h, w = int(full["height"][i]), int(full["width"][i])
            assert np.array_equal(root[rows[image_id]["mask_path"]][rows[image_id]["mask_index"]],
                                  np.frombuffer(full["mask"][i], np.uint8).reshape(h, w))
    assert storage.list_names(OutLayout(out).shard_parts(lot, "s00000")) == []
