"""``aggregate`` (DuckDB over predictions/) against a plain pandas reading of DESIGN.md's lot_stats rule."""

from __future__ import annotations

import base64
import csv
import io
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from semclip_batch.analysis.aggregate import aggregate
from semclip_batch.analysis.query import run_query
from semclip_batch.analysis.results import lot_summary
from semclip_batch.cli import main
from semclip_batch.io.schema import PREDICTIONS

CLASSES = ["normal", "particle", "scratch", "bridge"]


def _predictions(seed: int, n: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    status = rng.choice(["ok", "ok", "ok", "read_error"], n)
    ok = status == "ok"
    flagged = ok & (rng.random(n) < 0.5)
    return pd.DataFrame({
        "lot_id": rng.choice(["001", "1", "L #ü"], n), "wafer_id": rng.choice(["W1", "W2"], n),
        "image_id": [f"i{k}" for k in range(n)], "status": status,
        "die_x": [None if rng.random() < 0.2 else int(v) for v in rng.integers(0, 4, n)],
        "die_y": rng.integers(0, 4, n),
        "is_defect": [bool(f) if o else None for f, o in zip(flagged, ok, strict=True)],
        "defect_class": [([*CLASSES[1:], None])[rng.integers(0, len(CLASSES))] if f else None for f in flagged],
        "defect_area_px": [int(v) if o else None for v, o in zip(rng.integers(0, 500, n), ok, strict=True)],
    })


def _oracle(df: pd.DataFrame) -> list[dict]:
    rows = []
    for (lot, wafer), g in df.groupby(["lot_id", "wafer_id"], sort=True):
        ok = g[g["status"] == "ok"]
        flagged = ok["is_defect"].fillna(False).astype(bool)
        for cls in CLASSES:
            hits = ok[~flagged] if cls == "normal" else ok[flagged & (ok["defect_class"] == cls)]
            areas = hits["defect_area_px"].to_numpy(dtype=np.float64)
            dies = [] if cls == "normal" else sorted({(int(x), int(y)) for x, y in zip(hits["die_x"], hits["die_y"], strict=True)
                                                       if pd.notna(x) and pd.notna(y)})
            rows.append({"lot_id": lot, "wafer_id": wafer, "class": cls, "n_images": len(g), "n_ok": len(ok),
                         "n_error": len(g) - len(ok), "n_defect": int(flagged.sum()), "count": len(hits),
                         "rate": len(hits) / len(ok) if len(ok) else None,
                         "area_px_mean": float(areas.mean()) if areas.size else None,
                         "area_px_p50": float(np.percentile(areas, 50)) if areas.size else None,
                         "area_px_p95": float(np.percentile(areas, 95)) if areas.size else None,
                         "area_px_max": int(areas.max()) if areas.size else None,
                         "defect_dies": [{"die_x": x, "die_y": y} for x, y in dies]})
    return rows


def _write_out(tmp_path, df: pd.DataFrame, name: str = "out"):
    out = tmp_path / name
    for (lot, shard), g in df.assign(shard=[f"s{k % 3:05d}" for k in range(len(df))]).groupby(["lot_id", "shard"]):
        folder = out / "predictions" / f"lot_id={lot}"
        folder.mkdir(parents=True, exist_ok=True)
        cols = {c: ([None if pd.isna(v) else v for v in g[c].astype(object)] if c in g else [None] * len(g))
                for c in PREDICTIONS.names}
        pq.write_table(pa.table(cols, schema=PREDICTIONS), folder / f"{shard}.parquet")
    (out / "runs" / "r1").mkdir(parents=True)
    (out / "runs" / "r1" / "attempt-1.json").write_text(json.dumps({"run_id": "r1", "attempt": 1, "classes": CLASSES,
                                                                     "status": "complete"}))
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_lot_stats_equal_the_rule_in_pandas(tmp_path, seed):
    df = _predictions(seed, 300)
    out = _write_out(tmp_path, df)
    got = aggregate(str(out)).to_dict(orient="records")
    want = _oracle(df)
    assert len(got) == len(want) == 3 * 2 * len(CLASSES)
    for g, w in zip(got, want, strict=True):
        for key, value in w.items():
            if isinstance(value, float):
                assert g[key] == pytest.approx(value), (key, g, w)
            elif value is None:
                assert g[key] is None or pd.isna(g[key]), (key, g, w)
            elif key == "defect_dies":
                assert [dict(d) for d in g[key]] == value
            else:
                assert g[key] == value, (key, g, w)
    stored = pq.read_table(out / "lot_stats" / "lot_id=L #ü" / "stats.parquet")
    assert stored.num_rows == 2 * len(CLASSES) and "lot_id" not in stored.column_names


def test_lot_summary_counts_each_lot(tmp_path):
    df = _predictions(3, 200)
    out = _write_out(tmp_path, df)
    got = lot_summary(str(out)).set_index("lot_id")
    for lot, g in df.groupby("lot_id"):
        ok = g[g["status"] == "ok"]
        defects = ok[ok["is_defect"].fillna(False).astype(bool)]
        classes = defects["defect_class"].value_counts().sort_index()
        row = got.loc[lot]
        assert (row["images"], row["ok"], row["errors"], row["defective"]) == (len(g), len(ok), len(g) - len(ok),
                                                                              len(defects))
        assert row["classes"] == (", ".join(f"{c}={n}" for c, n in classes.items()) or "-")


def test_damaged_run_records_and_predictions_are_named_as_such(tmp_path):
    """A run record that cannot be read is not "no run record"; a truncated predictions file is one line naming
    the folder (it was pyarrow's own message)."""
    from semclip_batch.analysis.aggregate import run_classes
    from semclip_batch.analysis.results import read_predictions
    from semclip_batch.errors import OutputError

    out = _write_out(tmp_path, _predictions(2, 20))
    assert run_classes(str(out)) == CLASSES
    (out / "runs" / "r1" / "attempt-1.json").write_text('{"run_id": "r1", "attem')
    with pytest.raises(OutputError, match="no run record under runs/ can be read"):
        run_classes(str(out))
    part = sorted((out / "predictions").rglob("*.parquet"))[0]
    part.write_bytes(part.read_bytes()[:100])
    with pytest.raises(OutputError, match="predictions holds a file that cannot be read: "):
        read_predictions(str(out))


@pytest.mark.parametrize(("name", "other"), [("o*x", "oZx"), ("o?x", "oZx"), ("o[a]x", "oax"), ("o[x", "o[x2")])
def test_an_out_named_like_a_glob_is_read_as_named(tmp_path, name, other):
    """``*``, ``?`` and ``[`` in OUT's own name are characters, not a pattern: ``o*x`` read ``oZx``'s rows too,
    ``o[a]x`` read ``oax``'s instead of its own, ``o[x`` found no files."""
    df = _predictions(4, 60)
    out = _write_out(tmp_path, df, name)
    _write_out(tmp_path, df.assign(lot_id="OTHER"), other)
    want = df.groupby("lot_id").size().sort_index().to_dict()
    counts = run_query(str(out), "select lot_id, count(*) as n from predictions group by 1 order by 1")
    assert dict(zip(counts["lot_id"], counts["n"], strict=True)) == want
    rows = aggregate(str(out))
    assert set(rows["lot_id"]) == set(want)
    stats = run_query(str(out), "select lot_id, sum(n_images) as n from lot_stats where class = 'normal' group by 1")
    assert dict(zip(stats["lot_id"], stats["n"], strict=True)) == want
    assert not (tmp_path / other / "lot_stats").exists()


@pytest.mark.parametrize("sql", ["", "   ", ";", " /* nothing */ "])
def test_a_query_without_a_statement_is_one_line(tmp_path, sql):
    out = _write_out(tmp_path, _predictions(5, 10))
    result = CliRunner().invoke(main, ["query", str(out), sql])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "query: the SQL" in lines[0] and "Traceback" not in result.output, result.output


def test_a_statement_without_rows_does_not_crash(tmp_path):
    out = _write_out(tmp_path, _predictions(5, 10))
    for fmt in ("table", "csv", "json"):
        result = CliRunner().invoke(main, ["query", str(out), "SET threads = 2", "--format", fmt])
        assert result.exit_code == 0 and "Error" not in result.output, result.output


def _strict_json(text: str) -> object:
    def refuse(constant: str) -> object:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_json_output_is_valid_json(tmp_path):
    """Non-finite floats are null (Python's json writes Infinity, which no JSON parser takes); a DATE is an ISO
    date, a TIMESTAMP an ISO timestamp; a HUGEINT an exact integer."""
    out = _write_out(tmp_path, _predictions(5, 10))
    sql = ("select 'inf'::double as a, '-inf'::double as b, 'nan'::double as c, date '2020-01-01' as d, "
           "timestamp '2020-01-02 03:04:05' as t, 12345678901234567890::hugeint as h, null::hugeint as hn, "
           "1.50::decimal(5, 2) as m, [1.5, 'inf'::double] as l, {'x': 'inf'::double} as s")
    result = CliRunner().invoke(main, ["query", str(out), sql, "--format", "json"])
    assert result.exit_code == 0, result.output
    assert _strict_json(result.output) == [{"a": None, "b": None, "c": None, "d": "2020-01-01",
                                            "t": "2020-01-02T03:04:05", "h": 12345678901234567890, "hn": None,
                                            "m": 1.5, "l": [1.5, None], "s": {"x": None}}]


def test_csv_keeps_big_integers_exact(tmp_path):
    """``sum`` of a BIGINT is a HUGEINT: printed as an integer (not ``7.0``), every digit kept."""
    df = _predictions(5, 10)
    out = _write_out(tmp_path, df)
    sql = "select 12345678901234567890::hugeint as h, sum(1::bigint) as n, date '2020-01-01' as d from predictions"
    result = CliRunner().invoke(main, ["query", str(out), sql, "--format", "csv"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == ["h,n,d", f"12345678901234567890,{len(df)},2020-01-01"]


def test_lists_structs_and_blobs_are_one_cell_of_json_in_csv_and_the_table(tmp_path):
    """Every element, one line: numpy's repr put a newline in the cell and ``...`` in place of elements."""
    out = _write_out(tmp_path, _predictions(5, 10))
    sql = ("select range(0, 2000) as r, [0.5, 'nan'::double] as l, {'die_x': 1, 'die_y': 0} as s, "
           "'\\x00\\xff'::blob as b")
    result = CliRunner().invoke(main, ["query", str(out), sql, "--format", "csv"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.output)))
    assert len(rows) == 1 and json.loads(rows[0]["r"]) == list(range(2000))
    assert json.loads(rows[0]["l"]) == [0.5, None] and json.loads(rows[0]["s"]) == {"die_x": 1, "die_y": 0}
    assert base64.b64decode(rows[0]["b"]) == b"\x00\xff"
    table = CliRunner().invoke(main, ["query", str(out), "select [1, 2] as l, 'x' as t"])
    assert table.exit_code == 0 and table.output.splitlines()[1].split() == ["[1,2]", "x"], table.output
    as_json = CliRunner().invoke(main, ["query", str(out), "select '\\x00'::blob as b", "--format", "json"])
    assert _strict_json(as_json.output) == [{"b": "AA=="}]


@pytest.mark.parametrize("sql", ["COPY (select 1 as x) TO '{dir}/escaped.csv'",
                                 "select 1; ATTACH '{dir}/evil.duckdb' AS e",
                                 "EXPORT DATABASE '{dir}/dump'", "INSTALL httpfs", "UPDATE EXTENSIONS",
                                 "COPY (select * from predictions) TO '{out}/predictions/lot_id=x/p.parquet'",
                                 "PREPARE q AS COPY (select 1) TO '{dir}/p.csv'; EXECUTE q",
                                 "SET log_query_path = '{dir}/log.txt'; select 1",
                                 "PRAGMA enable_profiling = 'json'; SET profiling_output = '{dir}/prof.json'; select 1",
                                 "CREATE PERSISTENT SECRET s (TYPE s3)"])
def test_sql_that_writes_or_loads_files_is_refused_before_it_runs(tmp_path, sql):
    out = _write_out(tmp_path, _predictions(5, 10))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    result = CliRunner().invoke(main, ["query", str(out), sql.format(dir=tmp_path, out=out)])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "is refused (it may write or load files)" in lines[0], result.output
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_an_unknown_table_is_duckdbs_message_unless_it_is_lot_stats(tmp_path):
    out = _write_out(tmp_path, _predictions(5, 10))
    for sql in ("select * from lot_stats2", "select * from my_lot_stats_backup",
                "select * from predictions p join wafers w using (wafer_id)"):
        result = CliRunner().invoke(main, ["query", str(out), sql])
        assert result.exit_code == 1 and "query failed: Catalog Error" in result.output, result.output
        assert "no lot_stats yet" not in result.output
    for name in ("lot_stats", "LOT_STATS"):
        result = CliRunner().invoke(main, ["query", str(out), f"select * from {name}"])
        assert result.exit_code == 1 and "has no lot_stats yet" in result.output, result.output
    for sql in ("SET threads = 2", "PRAGMA table_info('predictions')", "create temp table t as select 1; select * from t"):
        assert CliRunner().invoke(main, ["query", str(out), sql]).exit_code == 0, sql  # the session's own changes


def test_an_object_store_out_named_like_a_glob(tmp_path):
    """Through fsspec (memory://, as s3:// is read): the Parquet files are listed, not globbed."""
    import time

    import fsspec

    fs = fsspec.filesystem("memory")
    base = f"memory://query-{time.time_ns()}"
    df = _predictions(6, 40)
    try:
        for name, frame in (("o*x", df), ("oZx", df.assign(lot_id="OTHER"))):
            local = _write_out(tmp_path, frame, name.replace("*", "_"))
            for file in local.rglob("*.parquet"):
                fs.pipe(f"{base}/{name}/{file.relative_to(local).as_posix()}", file.read_bytes())
        counts = run_query(f"{base}/o*x", "select lot_id, count(*) as n from predictions group by 1 order by 1")
        assert dict(zip(counts["lot_id"], counts["n"], strict=True)) == df.groupby("lot_id").size().to_dict()
    finally:
        fs.rm(base.removeprefix("memory://"), recursive=True)
