"""Excursions: which lots are out of control, per defect class (``OUT/excursions/``, written by ``aggregate``).

Lots are ordered by the manifest's ``lot_time`` (kept by ``run`` in ``_state/lot_times.parquet``) when it
has one, else by lot_id. For each (lot, class) the lot's rate (frames of that class / ok frames) is compared
with a p-chart of the trailing ``window`` lots before it (default 20): centre ``p = sum(counts) / sum(ok)``
over those lots, limits ``p +- 3 sqrt(p (1 - p) / n)`` with ``n`` the lot's own ok frames (the lower limit
floored at 0). With fewer than ``min_lots`` (5) trailing lots there are no limits and ``out_of_control`` is
null. A rate above the upper limit or below the lower one is out of control. ``normal`` is charted like the
defect classes (a lot with far fewer normal frames than usual is an excursion too).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from semclip_batch.io import storage
from semclip_batch.io.layout import OutLayout

DEFAULT_WINDOW = 20
MIN_LOTS = 5
SIGMAS = 3.0
EXCURSIONS = pa.schema([
    ("lot_id", pa.string()),
    ("class", pa.string()),
    ("lot_order", pa.int64()),
    ("n_ok", pa.int64()),
    ("count", pa.int64()),
    ("rate", pa.float64()),
    ("center", pa.float64()),
    ("lcl", pa.float64()),
    ("ucl", pa.float64()),
    ("n_reference_lots", pa.int64()),
    ("rule", pa.string()),
    ("out_of_control", pa.bool_()),
])


def rule_name(window: int = DEFAULT_WINDOW, sigmas: float = SIGMAS) -> str:
    return f"p-chart {sigmas:g} sigma, trailing {window} lots (at least {MIN_LOTS})"


def lot_order(lots: list[str], lot_times: Mapping[str, str] | None = None) -> list[str]:
    """Lots by time (those without one after, by lot_id), or by lot_id when no lot has a time."""
    times = {lot: pd.to_datetime(t, format="ISO8601", utc=True) for lot, t in (lot_times or {}).items() if t}
    epoch = pd.Timestamp(0, tz="UTC")
    return sorted(lots, key=lambda lot: (lot not in times, times.get(lot, epoch), lot))


def excursions(stats: pd.DataFrame, order: list[str], window: int = DEFAULT_WINDOW,
               sigmas: float = SIGMAS) -> pd.DataFrame:
    """``stats``: rows with ``lot_id, class, n_ok, count``, one per (lot, class) or per (lot, wafer, class) as
    ``aggregate`` writes them (every class has a row for every wafer) -> one row per (lot, class) of
    :data:`EXCURSIONS`, lots in ``order``."""
    per_lot = stats.groupby(["lot_id", "class"], sort=False)[["n_ok", "count"]].sum()
    classes = list(dict.fromkeys(stats["class"]))
    rows = []
    for cls in classes:
        history: list[tuple[int, int]] = []  # (count, n_ok) of the lots before, in order
        for k, lot in enumerate(order):
            count = int(per_lot["count"].get((lot, cls), 0))
            ok = int(per_lot["n_ok"].get((lot, cls), 0))
            trailing = history[-window:]
            rows.append({"lot_id": lot, "class": cls, "lot_order": k, "n_ok": ok, "count": count,
                         "rate": count / ok if ok else None,
                         **_limits(trailing, ok, sigmas, count / ok if ok else None),
                         "n_reference_lots": len(trailing), "rule": rule_name(window, sigmas)})
            if ok:
                history.append((count, ok))
    return pd.DataFrame(rows, columns=EXCURSIONS.names)


def _limits(trailing: list[tuple[int, int]], n: int, sigmas: float, rate: float | None) -> dict[str, Any]:
    none = {"center": None, "lcl": None, "ucl": None, "out_of_control": None}
    if len(trailing) < MIN_LOTS or not n or rate is None:
        return none
    center = sum(c for c, _ in trailing) / sum(o for _, o in trailing)
    spread = sigmas * math.sqrt(center * (1.0 - center) / n)
    lcl, ucl = max(0.0, center - spread), min(1.0, center + spread)
    return {"center": center, "lcl": lcl, "ucl": ucl, "out_of_control": bool(rate > ucl or rate < lcl)}


def read_lot_times(layout: OutLayout, storage_options: Mapping[str, Any] | None) -> dict[str, str]:
    """``lot_id -> lot_time`` kept by ``run`` (empty when the manifest had no lot_time)."""
    url = layout.lot_times
    if not storage.exists(url, storage_options):
        return {}
    table = pq.read_table(io.BytesIO(storage.read_bytes(url, storage_options)))
    return dict(zip(table.column("lot_id").to_pylist(), table.column("lot_time").to_pylist(), strict=True))


def out_of_control(layout: OutLayout, storage_options: Mapping[str, Any] | None) -> dict[str, list[str]]:
    """``lot_id -> classes out of control`` from ``OUT/excursions/`` (empty before ``aggregate``)."""
    url = storage.join(layout.excursions, "excursions.parquet")
    if not storage.exists(url, storage_options):
        return {}
    table = pq.read_table(io.BytesIO(storage.read_bytes(url, storage_options))).to_pandas()
    fired = table[table["out_of_control"].fillna(False).astype(bool)]
    return {str(lot): [str(c) for c in g["class"]] for lot, g in fired.groupby("lot_id", sort=False)}


def write_excursions(layout: OutLayout, stats: pd.DataFrame, storage_options: Mapping[str, Any] | None) -> pd.DataFrame:
    """Chart every (lot, class) of ``stats`` (``aggregate``'s rows) into ``OUT/excursions/excursions.parquet``."""
    order = lot_order(sorted(set(stats["lot_id"])), read_lot_times(layout, storage_options))
    table = excursions(stats, order)
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(table, schema=EXCURSIONS, preserve_index=False), sink)
    storage.remove(layout.excursions, storage_options)
    storage.write_bytes(storage.join(layout.excursions, "excursions.parquet"), sink.getvalue(), storage_options)
    return table
