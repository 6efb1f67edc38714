"""``aggregate`` (DuckDB over predictions/) against a plain pandas reading of DESIGN.md's lot_stats rule."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from semclip_batch.analysis.aggregate import aggregate
from semclip_batch.analysis.results import lot_summary
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


def _write_out(tmp_path, df: pd.DataFrame):
    out = tmp_path / "out"
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
