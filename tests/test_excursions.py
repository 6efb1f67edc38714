"""Excursions (``aggregate`` -> ``OUT/excursions/``): p-chart limits from the trailing lots, lots ordered by
``lot_time`` (kept by ``run``) or lot_id; one injected excursion in 30 lots fires there and nowhere else."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_aggregate import CLASSES, _write_out

from semclip_batch.analysis.aggregate import aggregate
from semclip_batch.analysis.excursions import EXCURSIONS, MIN_LOTS, excursions, lot_order
from semclip_batch.errors import ManifestError
from semclip_batch.io.layout import OutLayout
from semclip_batch.io.manifest import content_digest, read_manifest_table
from semclip_batch.pipeline.driver import _store_lot_times

N_LOTS, FRAMES, EXCURSION_LOT = 30, 120, 21


def _lots(seed: int = 0) -> pd.DataFrame:
    """Predictions of 30 lots of 120 frames: particles at 5 %, scratches at 8 %, except lot 21 (particles 25 %)."""
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(N_LOTS):
        p_particle = 0.25 if k == EXCURSION_LOT else 0.05
        for i in range(FRAMES):
            u = rng.random()
            cls = "particle" if u < p_particle else "scratch" if u < p_particle + 0.08 else None
            rows.append({"lot_id": f"L{(N_LOTS - k):03d}", "wafer_id": f"W{i % 2}", "image_id": f"{k}-{i}",
                         "status": "ok", "die_x": i % 5, "die_y": i // 5 % 5, "is_defect": cls is not None,
                         "defect_class": cls, "defect_area_px": 30 if cls else 0})
    return pd.DataFrame(rows)  # lot ids run backwards in time: L030 is the first lot, L001 the last


def test_one_injected_excursion_fires_there_and_nowhere_else(tmp_path):
    df = _lots()
    out = _write_out(tmp_path, df)
    times = pd.DataFrame({"lot_id": [f"L{(N_LOTS - k):03d}" for k in range(N_LOTS)],
                          "lot_time": [f"2026-01-{k + 1:02d}T08:00:00" for k in range(N_LOTS)]})
    (out / "_state").mkdir()
    pq.write_table(pa.Table.from_pandas(times, preserve_index=False), out / "_state" / "lot_times.parquet")
    aggregate(str(out))
    got = pq.read_table(out / "excursions" / "excursions.parquet")
    assert got.schema.equals(EXCURSIONS)
    table = got.to_pandas()
    assert len(table) == N_LOTS * len(CLASSES)
    fired = table[table["out_of_control"].fillna(False).astype(bool)]
    injected = f"L{N_LOTS - EXCURSION_LOT:03d}"
    assert set(fired["lot_id"]) == {injected}  # in time order it is lot 21; by lot_id it would be lot 8
    assert "particle" in set(fired["class"])
    first = table[table["lot_order"] < MIN_LOTS]
    assert first["out_of_control"].isna().all() and first["ucl"].isna().all()
    row = table[(table["lot_id"] == injected) & (table["class"] == "particle")].iloc[0]
    assert row["n_reference_lots"] == 20 and row["rate"] > row["ucl"] and row["rule"].startswith("p-chart 3 sigma")
    assert 0.03 < row["center"] < 0.07


def test_limits_follow_the_p_chart_formula():
    stats = pd.DataFrame([{"lot_id": f"L{k}", "class": "particle", "n_ok": 100, "count": c}
                          for k, c in enumerate([5, 7, 3, 5, 5, 6, 30])])
    table = excursions(stats, [f"L{k}" for k in range(7)], window=20)
    last = table.iloc[-1]
    center = (5 + 7 + 3 + 5 + 5 + 6) / 600
    assert last["center"] == pytest.approx(center)
    assert last["ucl"] == pytest.approx(center + 3 * np.sqrt(center * (1 - center) / 100))
    assert last["lcl"] == 0.0 and bool(last["out_of_control"])
    assert table.iloc[5]["n_reference_lots"] == 5 and table.iloc[4]["out_of_control"] is None


def test_lot_order_by_time_then_lot_id():
    assert lot_order(["b", "a", "c"]) == ["a", "b", "c"]
    assert lot_order(["b", "a", "c"], {"c": "2024-01-01", "a": "2024-02-01T00:00:00Z"}) == ["c", "a", "b"]


def test_run_keeps_each_lots_earliest_time_and_time_is_not_part_of_run_id(tmp_path):
    rows = "uri,lot_id,wafer_id,lot_time\na.png,L1,W1,2024-10-02\nb.png,L1,W2,2024-9-30\nc.png,L2,W1,\n"
    (tmp_path / "m.csv").write_text(rows)
    table = read_manifest_table(str(tmp_path / "m.csv"))
    layout = OutLayout(str(tmp_path / "out"))
    _store_lot_times(layout, table, {})
    kept = pq.read_table(layout.lot_times).to_pydict()
    assert kept == {"lot_id": ["L1"], "lot_time": ["2024-09-30T00:00:00+00:00"]}  # earliest in time, not as text
    (tmp_path / "n.csv").write_text(rows.replace("2024-10-02", "2025-01-01"))
    assert content_digest(read_manifest_table(str(tmp_path / "n.csv"))) == content_digest(table)
    (tmp_path / "bad.csv").write_text("uri,lot_id,wafer_id,lot_time\na.png,L1,W1,last tuesday\n")
    with pytest.raises(ManifestError, match="row 1: lot_time 'last tuesday' is not an ISO 8601 time"):
        read_manifest_table(str(tmp_path / "bad.csv"))


def test_report_lists_out_of_control_lots_first(tmp_path):
    import re

    from semclip_batch.analysis.report import write_report

    out = _write_out(tmp_path, _lots(1))
    aggregate(str(out))  # no lot_time: lots in lot_id order, where the injected lot L009 is the 9th
    table = pq.read_table(out / "excursions" / "excursions.parquet").to_pandas()
    flagged = set(table[table["out_of_control"].fillna(False).astype(bool)]["lot_id"])
    assert "L009" in flagged and len(flagged) < 4  # 3 sigma: a rare false alarm among 30 lots x 4 classes
    html = open(write_report(str(out), top_n=0)).read()
    lots_table = html[html.index("<h2>Lots"):]
    listed = re.findall(r'<a href="[^"]+">(L\d+)</a>', lots_table)
    assert len(listed) == N_LOTS
    assert set(listed[:len(flagged)]) == flagged  # out-of-control lots first
    assert listed[len(flagged):] == sorted(listed[len(flagged):])  # then the others in lot order
    assert f"{len(flagged)} lot(s) out of control" in html
    assert "particle" in lots_table.split(">L009<")[1].split("</tr>")[0]
