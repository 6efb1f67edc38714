"""Manifests: CSV / Parquet / folder, ids, relative URIs, and refusals with one clear line."""

from __future__ import annotations

import hashlib

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from semclip_batch.errors import ManifestError
from semclip_batch.io.manifest import content_digest, default_image_id, read_manifest


def write_csv(path, rows):
    pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


def test_default_image_id_formula():
    expected = hashlib.sha256(b"images/a.png#").hexdigest()[:16]
    assert default_image_id("images/a.png", "") == expected
    assert default_image_id("a.png", "3") == hashlib.sha256(b"a.png#3").hexdigest()[:16]


def test_csv_relative_uris_and_defaults(tmp_path):
    (tmp_path / "sub").mkdir()
    src = write_csv(tmp_path / "sub" / "m.csv", [
        {"uri": "img/a.png", "lot_id": "L1", "wafer_id": "W1", "die_x": "3", "die_y": ""},
        {"uri": "/abs/b.tif", "lot_id": "L1", "wafer_id": "W2", "die_x": "", "die_y": "4"},
        {"uri": "s3://bucket/c.png", "lot_id": "L2", "wafer_id": "W1", "die_x": "", "die_y": ""},
    ])
    df = read_manifest(src)
    assert list(df["url"]) == [str(tmp_path / "sub" / "img" / "a.png"), "/abs/b.tif", "s3://bucket/c.png"]
    assert df.loc[0, "image_id"] == default_image_id("img/a.png", "")
    assert df.loc[0, "die_x"] == 3 and df.loc[0, "die_y"] is None and df.loc[1, "die_y"] == 4


def test_parquet_cells_as_text_and_integral_defect_id(tmp_path):
    table = pa.table({"uri": ["a.png", "a.png"], "lot_id": ["L", "L"], "wafer_id": [1, 2],
                      "defect_id": [7.0, 8.0], "die_x": [1.0, 2.0]})
    path = tmp_path / "m.parquet"
    pq.write_table(table, path)
    df = read_manifest(str(path))
    assert list(df["wafer_id"]) == ["1", "2"]
    assert list(df["image_id"]) == [default_image_id("a.png", "7"), default_image_id("a.png", "8")]
    assert list(df["die_x"]) == [1, 2]


def test_csv_and_parquet_of_same_rows_agree(synth_lot):
    a = read_manifest(str(synth_lot / "manifest.csv"))
    b = read_manifest(str(synth_lot / "manifest.parquet"))
    assert list(a["image_id"]) == list(b["image_id"])
    assert content_digest(a) == content_digest(b)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"uri": "a.png", "lot_id": "L"}], "lacks required column 'wafer_id'"),
        ([{"uri": "a.png", "lot_id": "L", "wafer_id": "W"}, {"uri": "a.png", "lot_id": "L", "wafer_id": "W"}],
         "share image_ids.*rows 1, 2"),
        ([{"uri": "a.png", "lot_id": "", "wafer_id": "W"}], "empty 'lot_id'"),
        ([{"uri": "a.png", "lot_id": "a/b", "wafer_id": "W"}], "contains '/'"),
        ([{"uri": "a.png", "lot_id": "L", "wafer_id": "W", "die_x": "1.5"}], "die_x '1.5' is not an integer"),
    ],
)
def test_bad_manifests_refused(tmp_path, rows, message):
    with pytest.raises(ManifestError, match=message):
        read_manifest(write_csv(tmp_path / "m.csv", rows))


def test_missing_and_unparsable_manifest(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(str(tmp_path / "nope.csv"))
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ManifestError, match="cannot parse"):
        read_manifest(str(bad))


def test_folder_with_pattern(tmp_path):
    for rel in ("L1/W1/a.png", "L1/W2/b.tif", "L2/W1/c.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    df = read_manifest(str(tmp_path), pattern="{lot_id}/{wafer_id}/{name}.{ext}")
    assert sorted(df["uri"]) == ["L1/W1/a.png", "L1/W2/b.tif", "L2/W1/c.png"]
    assert set(df["lot_id"]) == {"L1", "L2"}
    assert df.set_index("uri").loc["L1/W2/b.tif", "image_id"] == default_image_id("L1/W2/b.tif", "")


def test_folder_pattern_mismatch_refused_with_count_and_example(tmp_path):
    for rel in ("L1/W1/a.png", "stray.png", "L1/deep/er/x.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    with pytest.raises(ManifestError, match=r"2 file\(s\) .* do not match .*e\.g\."):
        read_manifest(str(tmp_path), pattern="{lot_id}/{wafer_id}/{name}.{ext}")
