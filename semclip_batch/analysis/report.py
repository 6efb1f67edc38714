"""``report``: static HTML + PNG lot reports under ``OUT/reports/`` (DESIGN "OUT/reports/").

``index.html`` holds the run summary (latest run record), rows by status with one example error per kind, and
the lots; ``lot-<lot_id>.html`` per lot holds a wafer map per wafer, the Pareto chart of defect classes, the
defect rate per wafer and overlays of the lot's top-N most anomalous ok frames. A lot's pictures live in
``lot-<lot_id>.files/``. Everything is written through :func:`storage.write_bytes`, so OUT may be any fsspec URL.

Per lot, its Parquet files (found by listing the lot's exact folder, never a glob) are scanned by DuckDB, which
returns counts per (wafer, die, category) and the top-N rows only; masks are read for those. Lots are drawn one at
a time in this process, or, when the caller asks for workers (``report`` does: one per CPU this process may use,
at most :data:`MAX_WORKERS`) and there are :data:`PARALLEL_FROM_LOTS` lots or more, by a pool of spawned worker
processes (drawing a lot's charts is CPU-bound Python, ~1 s a lot here), each with its own DuckDB connection and
its own handle on the masks and the plan's TIFF pages; the index is written last, by this process.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

import duckdb
import pyarrow.dataset as pads

from semclip_batch.analysis import report_html as pages
from semclip_batch.analysis.charts import ERROR, Palette, pareto_png, rate_png, wafer_map_png
from semclip_batch.analysis.excursions import out_of_control
from semclip_batch.analysis.report_frames import FrameSource, defect_level, frame_base, overlay
from semclip_batch.config import DEFAULT_REPORT_TOP_N, NORMAL, Progress, configure_logging
from semclip_batch.errors import ConfigError, OutputError, one_line
from semclip_batch.io import storage
from semclip_batch.io.layout import OutLayout
from semclip_batch.io.runrecord import read_latest

log = logging.getLogger(__name__)
MAX_TOP_N = 500
LOT_FOLDER = "lot_id="
PARALLEL_FROM_LOTS = 8  # fewer lots are drawn in this process: starting a worker costs ~2.5 s of imports
MAX_WORKERS = 8  # the default's cap: each worker holds matplotlib, DuckDB and a lot's pictures (~200 MB)

# Frames per (wafer, die, category): the category is the defect class of a flagged ok row, the normal class
# for an ok row not flagged, ERROR for any other status.
DIES_SQL = """
select coalesce(wafer_id, '') as wafer_id, die_x, die_y,
       case when status <> 'ok' then $error
            when coalesce(is_defect, false) then coalesce(defect_class, 'defect')
            else $normal end as category,
       count(*) as n
from lot_rows group by all
"""
STATUS_SQL = "select status, count(*) as n, min_by(error, image_id) as example from lot_rows group by status"
TOP_SQL = """
select image_id, uri, wafer_id, die_x, die_y, anomaly_score, is_defect, defect_class, mask_path, mask_index
from lot_rows where status = 'ok' order by anomaly_score desc nulls last, image_id limit $n
"""


@dataclass(frozen=True)
class TopFrame:
    """One of a lot's most anomalous ok rows."""

    image_id: str
    uri: str
    wafer_id: str
    die_x: int | None
    die_y: int | None
    anomaly_score: float
    is_defect: bool
    defect_class: str | None
    mask_path: str
    mask_index: int


@dataclass
class Wafer:
    """Frames of one wafer by category, in all and per die position."""

    wafer_id: str
    frames: Counter[str] = field(default_factory=Counter)
    dies: dict[tuple[int, int], Counter[str]] = field(default_factory=dict)

    def add(self, die_x: int | None, die_y: int | None, category: str, n: int) -> None:
        self.frames[category] += n
        if die_x is not None and die_y is not None:
            self.dies.setdefault((int(die_x), int(die_y)), Counter())[category] += n

    @property
    def n_ok(self) -> int:
        return sum(n for c, n in self.frames.items() if c != ERROR)

    def dominant(self, palette: Palette) -> dict[tuple[int, int], str]:
        """Each die's category: its most frequent defect class (ties: class order), else normal, else error."""
        out = {}
        for pos, counts in self.dies.items():
            defects = [c for c in palette.defects if counts[c]]
            if defects:
                out[pos] = max(defects, key=lambda c: (counts[c], -palette.defects.index(c)))
            else:
                out[pos] = palette.normal if counts[palette.normal] else ERROR
        return out


@dataclass
class Lot:
    """What a lot page shows, gathered by three queries over the lot's Parquet files."""

    lot_id: str
    wafers: list[Wafer]
    statuses: Counter[str]
    examples: dict[str, str]
    top: list[TopFrame]

    def class_counts(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for w in self.wafers:
            total.update(w.frames)
        return total


def write_report(out: str, *, top_n: int = DEFAULT_REPORT_TOP_N, storage_options: Mapping[str, Any] | None = None,
                 progress: Progress | None = None, workers: int | None = 1) -> str:
    """Write ``OUT/reports/`` anew (index last) and return the URL of ``index.html``; ``progress`` is called
    with (1, lots) after each lot page. ``workers``: processes drawing lot pages (1, the default: all in this
    process; None: one per CPU this process may use, at most :data:`MAX_WORKERS`; never more than lots). Spawned
    workers import the caller's main module: a script that asks for them needs an ``if __name__ == "__main__"``
    guard.

    Raises :class:`OutputError` when OUT has no predictions, :class:`ConfigError` for a bad ``top_n`` or
    ``workers``.
    """
    if not 0 <= top_n <= MAX_TOP_N:
        raise ConfigError(f"--top-n must be between 0 and {MAX_TOP_N}, got {top_n}")
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    so = dict(storage_options or {})
    layout = OutLayout(storage.normalize_root(out))
    lots = sorted((n[len(LOT_FOLDER):] for n in storage.list_names(layout.predictions, so) if n.startswith(LOT_FOLDER)),
                  key=natural_key)
    if not lots:
        raise OutputError(f"{layout.root} has no predictions/ yet (run `semclip-batch run ... --out {out}` first)")
    record = read_latest(layout, so)
    classes = [str(c) for c in (record or {}).get("classes") or []]
    frames = FrameSource(layout, so, frame_base(record, so), defect_level(record))
    storage.remove(layout.reports, so)
    job = LotJob(layout=layout, top_n=top_n, classes=tuple(classes), frames=frames, so=so)
    n_workers = min(workers or min(usable_cpus(), MAX_WORKERS), len(lots))
    if n_workers > 1 and len(lots) >= PARALLEL_FROM_LOTS:
        rows = _pages_in_workers(job, lots, n_workers, progress)
    else:
        rows = _pages_here(job, lots, progress)
    flagged = out_of_control(layout, so)
    rows.sort(key=lambda r: r.lot_id not in flagged)  # lots with excursions first, otherwise in lot order
    index = storage.join(layout.reports, "index.html")
    storage.write_bytes(index, pages.index_page(record, rows, _by_status(rows), flagged), so)
    return index


@dataclass(frozen=True)
class LotJob:
    """What drawing any lot's page needs (picklable: a worker process gets it once)."""

    layout: OutLayout
    top_n: int
    classes: tuple[str, ...]
    frames: FrameSource
    so: Mapping[str, Any]

    def page(self, con: duckdb.DuckDBPyConnection, lot_id: str) -> pages.LotRow | None:
        """Write one lot's page and pictures; its line of the index, or None for a lot folder without files."""
        lot = read_lot(con, self.layout, lot_id, self.top_n, self.so)
        if lot is None:
            return None
        return _write_lot(self.layout, lot, _palette(list(self.classes), lot), self.frames, self.so)


def _pages_here(job: LotJob, lots: list[str], progress: Progress | None) -> list[pages.LotRow]:
    rows = []
    con = duckdb.connect()
    try:
        for lot_id in lots:
            row = job.page(con, lot_id)
            if row is not None:
                rows.append(row)
            if progress is not None:
                progress(1, len(lots))
    finally:
        con.close()
    return rows


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, which container runtimes set; else the machine's)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _pages_in_workers(job: LotJob, lots: list[str], workers: int, progress: Progress | None) -> list[pages.LotRow]:
    """The lot pages drawn by ``workers`` processes (spawned: this process may hold threads that a fork would
    copy mid-work), the index lines in lot order. An error in a lot's page is raised here as it would be in
    this process, and the lots not yet started are cancelled; workers log at this process's level, in the
    CLI's format."""
    done: dict[int, pages.LotRow | None] = {}
    context = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                                 initargs=(job, logging.getLogger().getEffectiveLevel())) as pool:
            futures = {pool.submit(_worker_page, lot_id): i for i, lot_id in enumerate(lots)}
            try:
                for future in as_completed(futures):
                    done[futures[future]] = future.result()
                    if progress is not None:
                        progress(1, len(lots))
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    except BrokenProcessPool as exc:
        raise OutputError(f"a report worker process failed or died ({one_line(exc)}); `report --workers 1` draws "
                          "the pages in one process and shows why") from exc
    return [row for _, row in sorted(done.items()) if row is not None]


_WORKER: tuple[LotJob, duckdb.DuckDBPyConnection] | None = None  # a worker process's job and DuckDB connection


def _start_worker(job: LotJob, level: int) -> None:
    global _WORKER
    configure_logging(level)
    _WORKER = (job, duckdb.connect())


def _worker_page(lot_id: str) -> pages.LotRow | None:
    assert _WORKER is not None, "not a report worker"
    job, con = _WORKER
    return job.page(con, lot_id)


def read_lot(con: duckdb.DuckDBPyConnection, layout: OutLayout, lot_id: str, top_n: int,
             so: Mapping[str, Any]) -> Lot | None:
    """Counts per (wafer, die, category), rows per status with an example error, and the top-N ok rows; None
    for a lot folder without Parquet files."""
    folder = layout.prediction_folder(lot_id)
    fs, path = storage.filesystem(folder, so)
    files = [f"{path}/{n}" for n in storage.list_names(folder, so) if n.endswith(".parquet")]
    if not files:
        return None
    con.register("lot_rows", pads.dataset(files, filesystem=fs, format="parquet"))
    try:
        wafers: dict[str, Wafer] = {}
        for wafer_id, x, y, category, n in con.execute(DIES_SQL, {"error": ERROR, "normal": NORMAL}).fetchall():
            wafers.setdefault(wafer_id, Wafer(wafer_id)).add(x, y, category, n)
        statuses = con.execute(STATUS_SQL).fetchall()
        top = [TopFrame(*row) for row in con.execute(TOP_SQL, {"n": top_n}).fetchall()]
    finally:
        con.unregister("lot_rows")
    return Lot(lot_id=lot_id, wafers=[wafers[k] for k in sorted(wafers, key=natural_key)],
               statuses=Counter({s: n for s, n, _ in statuses}),
               examples={s: e for s, _, e in statuses if s != "ok" and e}, top=top)


def natural_key(text: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders ``W2`` before ``W10``."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", text) if p)


def _palette(classes: list[str], lot: Lot) -> Palette:
    """The run's defect classes in its order, then any other class the lot's rows name."""
    known = [c for c in classes if c != NORMAL]
    extra = sorted(set(lot.class_counts()) - {NORMAL, ERROR} - set(known))
    return Palette(normal=NORMAL, defects=(*known, *extra))


def _write_lot(layout: OutLayout, lot: Lot, palette: Palette, source: FrameSource,
               so: Mapping[str, Any]) -> pages.LotRow:
    """Render and write one lot's pictures and page; returns the lot's line of the index."""
    assets = pages.assets_folder(lot.lot_id)

    def put(name: str, data: bytes) -> str:
        storage.write_bytes(storage.join(layout.reports, assets, name), data, so)
        return name

    counts = lot.class_counts()
    pareto = [(c, counts[c]) for c in palette.defects if counts[c]]
    charts = pages.LotCharts(
        pareto=put("pareto.png", pareto_png(pareto, palette)) if pareto else None,
        rate=put("defect-rate.png", rate_png([(w.wafer_id, w.n_ok, w.frames) for w in lot.wafers],
                                             palette)) if lot.wafers else None,
        wafers=[put(f"wafer-{i:03d}.png", wafer_map_png([(x, y, c) for (x, y), c in w.dominant(palette).items()],
                                                         palette)) if w.dies else None
                for i, w in enumerate(lot.wafers, 1)],
    )
    tiles = []
    for k, row in enumerate(lot.top, 1):
        png, notes = overlay(row, source)
        tiles.append(pages.Tile(row=row, image=put(f"top-{k:03d}.png", png) if png else None, notes=notes))
    storage.write_bytes(storage.join(layout.reports, pages.lot_page_name(lot.lot_id)),
                        pages.lot_page(lot, palette, charts, tiles), so)
    return pages.LotRow(lot_id=lot.lot_id, statuses=lot.statuses, examples=lot.examples,
                        pareto=sorted(pareto, key=lambda cn: -cn[1]))


def _by_status(rows: list[pages.LotRow]) -> list[tuple[str, int, str | None, str | None]]:
    """``(status, rows, example error, its lot)`` over all lots: ok first, then by count."""
    total: Counter[str] = Counter()
    example: dict[str, tuple[str, str]] = {}
    for row in rows:
        total.update(row.statuses)
        for status, message in row.examples.items():
            example.setdefault(status, (message, row.lot_id))
    order = sorted(total, key=lambda s: (s != "ok", -total[s], s))
    return [(s, total[s], *(example.get(s) or (None, None))) for s in order]
