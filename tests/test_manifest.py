"""Manifests: CSV / Parquet / folder, ids, relative URIs, and refusals with one clear line."""

from __future__ import annotations

import hashlib
import math

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from semclip_batch.cli import main
from semclip_batch.errors import ManifestError
from semclip_batch.io import storage
from semclip_batch.io.listing import from_prefix
from semclip_batch.io.manifest import (
    COLUMNS,
    MAX_CELL_CHARS,
    content_digest,
    default_image_id,
    read_manifest,
    read_manifest_table,
)

TABLE_SCHEMA = pa.schema([(c, pa.int64() if c in ("die_x", "die_y", "page") else pa.string()) for c in COLUMNS])


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
        ([{"uri": "a.png", "lot_id": "L", "wafer_id": "W", "die_y": "7"}, {"uri": "b.png", "lot_id": "L", "wafer_id": "W",
                                                                           "die_y": "0x10"}],
         "row 2: die_y '0x10' is not an integer"),
        ([{"uri": "a.png", "lot_id": "L", "wafer_id": "W", "reference_uri": "s3://b/x@y"},
          {"uri": "b.png", "lot_id": "L", "wafer_id": "W", "reference_uri": "s3://u:p@b/x"}],
         "row 2: reference_uri carries credentials"),
        ([{"uri": "a.png", "lot_id": "ok", "wafer_id": "W"}, {"uri": "b.png", "lot_id": ".x", "wafer_id": "W"},
          {"uri": "c.png", "lot_id": "ok", "wafer_id": "W"}, {"uri": "d.png", "lot_id": ".x", "wafer_id": "W"}],
         r"row 2: lot_id '\.x' starts with '\.'"),
        ([{"uri": "a.png", "lot_id": "L", "wafer_id": "W", "caption": "c" * (MAX_CELL_CHARS + 1)}],
         f"row 1: caption is {MAX_CELL_CHARS + 1} characters long"),
        ([{"uri": f"{i % 3}.png", "lot_id": "L", "wafer_id": "W"} for i in range(33)],
         r"33 manifest rows share image_ids, e.g. '[0-9a-f]{16}' on rows 1, 4, 7, 10, 13, 16, 19, 22, 25, 28 \.\.\. "),
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


def test_a_pattern_naming_a_field_twice_is_refused_by_name(tmp_path):
    (tmp_path / "L1" / "W1").mkdir(parents=True)
    (tmp_path / "L1" / "W1" / "L1.png").write_bytes(b"x")
    with pytest.raises(ManifestError, match=r"names \{lot_id\} twice: each field may appear once"):
        read_manifest(str(tmp_path), pattern="{lot_id}/{wafer_id}/{lot_id}.{ext}")


def test_a_null_timestamp_lot_time_in_parquet_is_absent(tmp_path):
    """A timestamp column's null came back as pandas' text 'NaT' and refused the whole manifest; a date or
    text column's null was already empty."""
    import datetime as dt

    pq.write_table(pa.table({"uri": ["a.png", "b.png"], "lot_id": ["L", "M"], "wafer_id": ["W1", "W1"],
                             "lot_time": pa.array([dt.datetime(2024, 3, 1, 14, 5), None], pa.timestamp("s"))}),
                   tmp_path / "m.parquet")
    df = read_manifest(str(tmp_path / "m.parquet"))
    assert list(df["lot_time"]) == ["2024-03-01 14:05:00", ""]


def test_table_schema_text_without_nulls_and_integer_dies(tmp_path):
    (tmp_path / "m.csv").write_text('uri,lot_id,wafer_id,die_x,die_y,caption\n'
                                    ' a.png ,L1 ,W1,3,,"two\nlines"\n'
                                    'b.png,L1,W1,12.0,-4,NA\n')
    table = read_manifest_table(str(tmp_path / "m.csv"))
    assert table.schema == TABLE_SCHEMA
    assert all(table.column(c).null_count == 0 for c in COLUMNS if c not in ("die_x", "die_y", "page"))
    assert table.column("die_x").to_pylist() == [3, 12] and table.column("die_y").to_pylist() == [None, -4]
    assert table.column("uri").to_pylist() == ["a.png", "b.png"] and table.column("lot_id").to_pylist() == ["L1 ", "L1"]
    assert table.column("caption").to_pylist() == ["two\nlines", "NA"] and table.column("label").to_pylist() == ["", ""]
    frame = read_manifest(str(tmp_path / "m.csv"))
    assert list(frame.columns) == list(COLUMNS) and frame["die_y"].tolist() == [None, -4]
    assert [type(v) for v in frame["die_x"]] == [int, int]


def test_relative_uris_resolved_like_storage_resolve(tmp_path):
    uris = ["a.png", "./b.png", "c//d.png", "e/../f.png", "../g.png", "h/", "i/./j.png", "/abs/k.png", "s3://b/l.png",
            "...", "m/.n.png"]
    refs = ["", "r.png", "", "./r2.png", "", "", "", "", "", "", ""]
    write_csv(tmp_path / "m.csv", [{"uri": u, "lot_id": "L", "wafer_id": "W", "reference_uri": r}
                                   for u, r in zip(uris, refs, strict=True)])
    table = read_manifest_table(str(tmp_path / "m.csv"))
    assert table.column("url").to_pylist() == [storage.resolve(u, str(tmp_path)) for u in uris]
    assert table.column("reference_url").to_pylist() == [storage.resolve(r, str(tmp_path)) if r else "" for r in refs]


def _typed_and_text(tmp_path):
    """The same rows as a Parquet file with integer, float and null columns and as CSV text."""
    typed = pa.table({
        "uri": ["a.png", "b.png", "c.png", "a.png"],
        "lot_id": ["L1", "L1", "L2", "L2"],
        "wafer_id": pa.array([1, 2, 3, 4], pa.int32()),
        "die_x": [1.0, float("nan"), 3.0, None],
        "die_y": pa.array([5, None, -2, 0], pa.int64()),
        "defect_id": [7.0, 8.0, None, 9.0],
        "label": pa.array([None, "scratch", None, "normal"], pa.string()),
        "caption": pa.nulls(4, pa.string()),
    })
    pq.write_table(typed, tmp_path / "m.parquet")
    (tmp_path / "m.csv").write_text("uri,lot_id,wafer_id,die_x,die_y,defect_id,label,caption\n"
                                    "a.png,L1,1,1,5,7,,\nb.png,L1,2,,,8,scratch,\n"
                                    "c.png,L2,3,3.0,-2,,,\na.png,L2,4,,0,9,normal,\n")
    return str(tmp_path / "m.parquet"), str(tmp_path / "m.csv")


def test_parquet_with_integer_float_and_null_columns_gives_the_csv_table(tmp_path):
    parquet, text = _typed_and_text(tmp_path)
    a, b = read_manifest_table(parquet), read_manifest_table(text)
    assert a.schema == b.schema == TABLE_SCHEMA
    assert a.equals(b)
    assert a.column("wafer_id").to_pylist() == ["1", "2", "3", "4"]
    assert a.column("defect_id").to_pylist() == ["7", "8", "", "9"]
    assert a.column("die_x").to_pylist() == [1, None, 3, None]


def test_digest_same_for_csv_parquet_dataframe_and_any_row_order(tmp_path):
    parquet, text = _typed_and_text(tmp_path)
    table = read_manifest_table(text)
    digest = content_digest(table)
    assert content_digest(read_manifest_table(parquet)) == digest
    assert content_digest(read_manifest(text)) == digest
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    pq.write_table(pq.read_table(parquet).take([2, 0, 3, 1]), shuffled / "m.parquet")
    moved = read_manifest_table(str(shuffled / "m.parquet"))
    base = str(tmp_path)
    same_folder = moved.set_column(COLUMNS.index("url"), "url", pa.array([
        storage.resolve(u, base) for u in moved.column("uri").to_pylist()]))
    assert content_digest(same_folder) == digest
    assert content_digest(table.take([3, 1, 0, 2])) == digest


@pytest.mark.parametrize(("column", "value"), [("uri", "z.png"), ("lot_id", "L9"), ("wafer_id", "W9"),
                                               ("caption", "new"), ("die_x", 42), ("die_y", 1), ("label", "x"),
                                               ("image_id", "fresh")])
def test_digest_changes_when_one_cell_changes(tmp_path, column, value):
    _, text = _typed_and_text(tmp_path)
    table = read_manifest_table(text)
    cells = table.column(column).to_pylist()
    assert cells[1] != value
    cells[1] = value
    changed = table.set_column(COLUMNS.index(column), column, pa.array(cells, table.schema.field(column).type))
    assert content_digest(changed) != content_digest(table)


def test_digest_is_unambiguous_across_cell_boundaries(tmp_path):
    _, text = _typed_and_text(tmp_path)
    table = read_manifest_table(text)

    def with_cells(label: str, caption: str) -> pa.Table:
        out = table.set_column(COLUMNS.index("label"), "label", pa.array([label] * table.num_rows))
        return out.set_column(COLUMNS.index("caption"), "caption", pa.array([caption] * table.num_rows))

    assert content_digest(with_cells("a\x1f", "b")) != content_digest(with_cells("a", "\x1fb"))


def test_csv_fallbacks_keep_their_rules(tmp_path):
    (tmp_path / "short.csv").write_text("uri,lot_id,wafer_id,label\na.png,L,W\nb.png,L,W,x\n")
    assert read_manifest_table(str(tmp_path / "short.csv")).column("label").to_pylist() == ["", "x"]
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbfuri,lot_id,wafer_id\r\na.png,L,W\r\n")
    assert read_manifest_table(str(tmp_path / "bom.csv")).column("wafer_id").to_pylist() == ["W"]
    (tmp_path / "late.csv").write_bytes(b"uri,lot_id,wafer_id\na.png,L,W\nb.png,L,W\nc\xc3(,L,W\n")
    with pytest.raises(ManifestError, match=r"not UTF-8 text \(byte 0xc3 on line 4\)"):
        read_manifest_table(str(tmp_path / "late.csv"))


def test_parquet_unusual_types_as_cell_text(tmp_path):
    table = pa.table({"uri": pa.array([b"a.png", b"b\xff.png"], pa.binary()), "lot_id": ["L", "L"],
                      "wafer_id": pa.array([3, 4]).dictionary_encode(), "label": [True, None], "caption": [1.5, math.nan],
                      "defect_id": [1e20, 2.0]})
    pq.write_table(table, tmp_path / "m.parquet")
    out = read_manifest_table(str(tmp_path / "m.parquet"))
    assert out.column("uri").to_pylist() == ["a.png", "b\ufffd.png"] and out.column("wafer_id").to_pylist() == ["3", "4"]
    assert out.column("label").to_pylist() == ["True", ""] and out.column("caption").to_pylist() == ["1.5", ""]
    assert out.column("defect_id").to_pylist() == [str(10**20), "2"]


def test_page_column_parsed_refused_and_part_of_ids_only_where_set(tmp_path):
    (tmp_path / "m.csv").write_text("uri,lot_id,wafer_id,defect_id,page\n"
                                    "w.tif,L1,W1,1,0\nw.tif,L1,W1,2,3.0\nw.tif,L1,W1,3,\n")
    table = read_manifest_table(str(tmp_path / "m.csv"))
    assert table.column("page").to_pylist() == [0, 3, None]
    assert table.column("image_id").to_pylist() == [
        hashlib.sha256(b"w.tif#1#0").hexdigest()[:16], hashlib.sha256(b"w.tif#2#3").hexdigest()[:16],
        default_image_id("w.tif", "3")]
    assert default_image_id("w.tif", "2", 3) == table.column("image_id")[1].as_py()
    for bad, why in (("-1", "out of range"), ("70000", "out of range"), ("two", "not an integer")):
        (tmp_path / "bad.csv").write_text(f"uri,lot_id,wafer_id,page\na.tif,L1,W1,0\nb.tif,L1,W1,{bad}\n")
        with pytest.raises(ManifestError, match=rf"^manifest row 2: page .*{why}"):
            read_manifest_table(str(tmp_path / "bad.csv"))


def test_page_joins_the_digest_only_where_a_row_sets_it(tmp_path):
    (tmp_path / "plain.csv").write_text("uri,lot_id,wafer_id\na.tif,L1,W1\n")
    (tmp_path / "empty.csv").write_text("uri,lot_id,wafer_id,page\na.tif,L1,W1,\n")
    plain = read_manifest_table(str(tmp_path / "plain.csv"))
    assert content_digest(read_manifest_table(str(tmp_path / "empty.csv"))) == content_digest(plain)
    pages = []
    for page in (0, 1):
        (tmp_path / "set.csv").write_text(f"uri,lot_id,wafer_id,image_id,page\na.tif,L1,W1,{plain['image_id'][0]},{page}\n")
        pages.append(content_digest(read_manifest_table(str(tmp_path / "set.csv"))))
    assert len({content_digest(plain), *pages}) == 3
    frame = read_manifest(str(tmp_path / "set.csv"))
    assert frame.loc[0, "page"] == 1 and content_digest(frame) == pages[1]


def _prefix_with_odd_keys(root) -> None:
    """An archive whose lot folders and file names `run` would refuse, next to one good key."""
    for lot in ("L1", "L[A]", "a=b", "zarr.json", "__HIVE_DEFAULT_PARTITION__", "L%20", " "):
        (root / lot / "W1").mkdir(parents=True)
        (root / lot / "W1" / "3.tif").write_bytes(b"x")
    (root / "L1" / "W1" / "bridge_001.tif").write_bytes(b"x")
    (root / "L1" / " ").mkdir()
    (root / "L1" / " " / "4.tif").write_bytes(b"x")  # a blank wafer id


def test_from_prefix_skips_and_counts_keys_whose_fields_run_refuses(tmp_path):
    _prefix_with_odd_keys(tmp_path / "images")
    out = tmp_path / "new" / "m.csv"  # its folder made, as every manifest writer does
    res = CliRunner().invoke(main, ["manifest", "from-prefix", str(tmp_path / "images"), "--pattern",
                                    "{lot_id}/{wafer_id}/{die_x}.{ext}", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output and ": 1 rows" in res.output and "skipped 8 key(s) whose fields `run` refuses" in res.output
    df = read_manifest(str(out))  # what `run` reads: accepted
    assert df["uri"].tolist() == [str(tmp_path / "images" / "L1" / "W1" / "3.tif")] and df["die_x"].tolist() == [3]


@pytest.mark.parametrize("key, message", [
    ("L1/W1/bridge_001.tif", "'L1/W1/bridge_001.tif': die_x 'bridge_001' is not an integer"),
    ("L[A]/W1/3.tif", "'L[A]/W1/3.tif': lot_id 'L[A]' contains '['"),
    ("zarr.json/W1/3.tif", "lot_id 'zarr.json' is a reserved name"),
    ("__HIVE_DEFAULT_PARTITION__/W1/3.tif", "is a reserved name"),
    ("a=b/W1/3.tif", "contains '='"),
    ("L%20/W1/3.tif", "contains '%'"),
    (" /W1/3.tif", "lot_id ' ' is blank"),
    ("L1/W1/99999999999999999999.tif", "is out of range"),
])
def test_from_prefix_names_the_first_refused_key_and_field(tmp_path, key, message):
    (tmp_path / "images" / key).parent.mkdir(parents=True)
    (tmp_path / "images" / key).write_bytes(b"x")
    (tmp_path / "images" / "L2" / "W1").mkdir(parents=True)
    (tmp_path / "images" / "L2" / "W1" / "7.tif").write_bytes(b"x")
    listed = from_prefix(str(tmp_path / "images"), "{lot_id}/{wafer_id}/{die_x}.{ext}", str(tmp_path / "m.parquet"))
    assert listed.rows == 1 and listed.refused == 1 and message in (listed.refused_example or ""), listed
    (tmp_path / "images" / "L2" / "W1" / "7.tif").unlink()  # only the refused key left: nothing to list
    with pytest.raises(ManifestError, match=r"nothing listed \(1 key\(s\) have fields `run` refuses, e\.g\. "):
        from_prefix(str(tmp_path / "images"), "{lot_id}/{wafer_id}/{die_x}.{ext}", str(tmp_path / "n.csv"))
    assert not (tmp_path / "n.csv").exists()


def test_from_prefix_of_a_file_says_it_is_a_file(tmp_path):
    (tmp_path / "m.csv").write_text("uri,lot_id,wafer_id\na.png,L1,W1\n")
    res = CliRunner().invoke(main, ["manifest", "from-prefix", str(tmp_path / "m.csv"), "--out", str(tmp_path / "o.csv")])
    assert res.exit_code != 0 and "is a file, not a folder or prefix" in res.output, res.output
    assert "e.g. ''" not in res.output and len(res.output.strip().splitlines()) == 1


def test_from_prefix_does_not_list_the_manifest_it_writes(tmp_path):
    (tmp_path / "L1" / "W1").mkdir(parents=True)
    (tmp_path / "L1" / "W1" / "a.png").write_bytes(b"x")
    (tmp_path / "L1" / "W1" / "m.csv").write_text("an earlier listing\n")
    listed = from_prefix(str(tmp_path), "{lot_id}/{wafer_id}/{name}.{ext}", str(tmp_path / "L1" / "W1" / "m.csv"))
    assert listed.rows == 1 and listed.unmatched == 0
    assert read_manifest(str(tmp_path / "L1" / "W1" / "m.csv"))["uri"].tolist() == [str(tmp_path / "L1" / "W1" / "a.png")]
