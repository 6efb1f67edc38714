"""``status``: where a run into OUT stands, read from what OUT holds (README "Status and progress").

Attempts come from ``runs/<run_id>/attempt-<n>.json``; shards done and rows by status from the done markers
under ``_state/done/<lot>/``; the shard total from the latest finished record of the current run, else from
the stored plan (its ``lot_id`` and ``shard`` columns); errors by kind from DuckDB over ``predictions/``.

An attempt ends by rewriting its record, so a record still ``running`` is either running or was killed. There
is no heartbeat: the newest write under ``_state/`` (done markers, writers' parts; modification times as the
store gives them) or the attempt's start, if later, stands in for one. Within ``stale_after_s`` of now the
latest attempt is reported ``running``, past it ``likely killed``; an earlier ``running`` attempt that a later
one followed is ``interrupted``.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from semclip_batch.analysis.query import connect, parquet_files
from semclip_batch.config import DEFAULT_STALE_AFTER_S
from semclip_batch.errors import OutputError, one_line
from semclip_batch.io import storage
from semclip_batch.io.layout import OutLayout
from semclip_batch.io.manifest_files import hidden
from semclip_batch.io.markers import marker_counts

log = logging.getLogger(__name__)
RUNNING, LIKELY_KILLED, INTERRUPTED = "running", "likely killed", "interrupted"
ERRORS_SQL = """
select status, count(*) as n, min_by(error, image_id) as example, min_by(lot_id, image_id) as lot_id,
       min(image_id) as image_id
from predictions where status <> 'ok' group by status order by n desc, status
"""


@dataclass(frozen=True)
class Attempt:
    """One ``runs/<run_id>/attempt-<n>.json`` as ``status`` reads it; ``state`` is the recorded status, or for a
    record still ``running`` what OUT's activity says (running | likely killed | interrupted)."""

    run_id: str
    attempt: int
    status: str
    started_at: datetime | None
    finished_at: datetime | None
    throughput_img_s: float | None
    failed_shards: tuple[str, ...]
    error: str | None
    shards_total: int | None
    rows_total: int | None
    state: str = ""

    @classmethod
    def from_record(cls, body: Mapping[str, Any]) -> Attempt:
        shards, rows = (_mapping(body.get(k)) for k in ("shards", "rows"))
        throughput = body.get("throughput_img_s")
        return cls(run_id=str(body.get("run_id") or "?"), attempt=_int(body.get("attempt")) or 0,
                   status=str(body.get("status") or "?"), started_at=_time(body.get("started_at")),
                   finished_at=_time(body.get("finished_at")),
                   throughput_img_s=float(throughput) if isinstance(throughput, (int, float)) else None,
                   failed_shards=tuple(str(s) for s in body.get("failed_shards") or ()),
                   error=str(body["error"]) if body.get("error") else None,
                   shards_total=_int(shards.get("total")), rows_total=_int(rows.get("total")))

    @property
    def order(self) -> tuple[datetime, int]:
        return self.started_at or datetime.min.replace(tzinfo=UTC), self.attempt


@dataclass(frozen=True)
class ErrorKind:
    """Rows of one non-ok status, with the first one (by image_id) as the example."""

    status: str
    n: int
    example: str | None
    lot_id: str | None
    image_id: str | None


@dataclass
class OutStatus:
    out: str
    run_id: str | None  # the run whose outputs OUT holds (``_state/run.json``)
    now: datetime
    stale_after_s: float
    attempts: list[Attempt]
    activity: datetime | None  # the newest write under _state/ (None: nothing there, or no times given)
    activity_source: str
    shards_done: int
    shards_total: int | None
    shards_total_source: str
    damaged_markers: int
    rows_total: int | None
    rows_by_status: dict[str, int]
    errors: list[ErrorKind] | None  # None: predictions/ could not be read (``errors_note`` says why)
    errors_note: str = ""

    @property
    def latest(self) -> Attempt | None:
        return self.attempts[-1] if self.attempts else None

    @property
    def throughput(self) -> Attempt | None:
        """The latest complete attempt that measured a throughput."""
        done = [a for a in self.attempts if a.status == "complete" and a.throughput_img_s]
        return done[-1] if done else None


def out_status(out: str, storage_options: Mapping[str, Any] | None = None, *, stale_after_s: float = DEFAULT_STALE_AFTER_S,
               now: datetime | None = None) -> OutStatus:
    """Read where OUT stands. Raises :class:`OutputError` when OUT holds neither run records nor run state."""
    so = dict(storage_options or {})
    layout = OutLayout(storage.normalize_root(out))
    info = _read_object(layout.run_info, so)
    attempts = _read_attempts(layout, so)
    if info is None and not attempts:
        what = "does not exist" if not storage.exists(layout.root, so) else "holds no runs/ records and no _state/run.json"
        raise OutputError(f"{layout.root} is not a semclip-batch output: it {what} (give the --out of a `run`)")
    run_id = str(info["run_id"]) if info and info.get("run_id") else (attempts[-1].run_id if attempts else None)
    markers, damaged, marker_time = _read_markers(layout, so)
    activity, source = _newest_activity(layout, so, marker_time)
    now = now or datetime.now(UTC)
    attempts = _assess(attempts, activity, now, stale_after_s)
    current = [a for a in attempts if a.run_id == run_id]
    total, total_source = _shard_total(layout, info, current, so)
    by_status: Counter[str] = Counter()
    for counts in markers.values():
        by_status.update(counts)
    errors, note = _errors_by_kind(layout, so)
    rows_total = next((a.rows_total for a in reversed(current) if a.rows_total is not None), None)
    return OutStatus(out=layout.root, run_id=run_id, now=now, stale_after_s=stale_after_s, attempts=attempts,
                     activity=activity, activity_source=source, shards_done=len(markers), shards_total=total,
                     shards_total_source=total_source, damaged_markers=damaged, rows_total=rows_total,
                     rows_by_status=dict(sorted(by_status.items())), errors=errors, errors_note=note)


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _read_object(url: str, so: Mapping[str, Any]) -> dict[str, Any] | None:
    """A stored JSON object, or None when missing or damaged (a damaged one is logged)."""
    try:
        body = json.loads(storage.read_bytes(url, so))
    except (FileNotFoundError, NotADirectoryError):  # NotADirectoryError: OUT (or runs/) is a file
        return None
    except (UnicodeDecodeError, json.JSONDecodeError):
        log.warning("%s is damaged (not JSON); ignoring it", url)
        return None
    return body if isinstance(body, dict) else None


def _read_attempts(layout: OutLayout, so: Mapping[str, Any]) -> list[Attempt]:
    """Every readable attempt record under ``runs/``, oldest first."""
    found = []
    for run_id in storage.list_names(layout.runs, so):
        folder = storage.join(layout.runs, run_id)
        for name in storage.list_names(folder, so):
            if name.startswith("attempt-") and name.endswith(".json"):
                body = _read_object(storage.join(folder, name), so)
                if body is not None:
                    found.append(Attempt.from_record(body))
    return sorted(found, key=lambda a: a.order)


def _find(url: str, so: Mapping[str, Any]) -> tuple[Any, dict[str, dict[str, Any]]]:
    """Every stored object below ``url`` (dot-files, i.e. writes in progress, left out) with its details."""
    fs, path = storage.filesystem(url, so)
    fs.invalidate_cache(path)
    try:
        found = fs.find(path, withdirs=False, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return fs, {}
    base = path.rstrip("/") + "/"
    return fs, {p: info for p, info in found.items() if not hidden(p[len(base):] if p.startswith(base) else p)}


def _mtime(info: Mapping[str, Any]) -> datetime | None:
    """An object's modification time from its listing details (local: mtime; S3: LastModified; others: created)."""
    for key in ("mtime", "LastModified", "last_modified", "created"):
        value = info.get(key)
        if isinstance(value, datetime):
            return value if value.tzinfo else value.replace(tzinfo=UTC)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return datetime.fromtimestamp(float(value), UTC)
    return None


def _newest(infos: Mapping[str, Mapping[str, Any]]) -> datetime | None:
    return max((t for t in map(_mtime, infos.values()) if t is not None), default=None)


def _read_markers(layout: OutLayout, so: Mapping[str, Any]) -> tuple[dict[str, dict[str, int]], int, datetime | None]:
    """Done markers (``<lot>/<shard>`` -> status counts), how many are damaged, and the newest one's time."""
    fs, infos = _find(layout.markers, so)
    paths = [p for p in infos if p.endswith(".json")]
    # cat_ranges reads each path as it is (concurrently on object stores); fs.cat would expand glob characters
    # in OUT's name ("o[a]x" matches only "oax": FileNotFoundError; "o*x" reads other OUTs' markers too)
    bodies = fs.cat_ranges(paths, None, None, on_error="return") if paths else []
    markers: dict[str, dict[str, int]] = {}
    damaged = 0
    for path, body in zip(paths, bodies, strict=True):
        lot, name = path.rsplit("/", 2)[-2:]
        shard = name.removesuffix(".json")
        counts = marker_counts(body, lot, shard)  # run's own rule: done here is what a rerun skips
        if counts is None:
            damaged += 1
        else:
            markers[f"{lot}/{shard}"] = counts
    return markers, damaged, _newest(infos)


def _newest_activity(layout: OutLayout, so: Mapping[str, Any], marker_time: datetime | None) -> tuple[datetime | None, str]:
    """The newest write under ``_state/`` a run makes as it goes: done markers, then writers' parts."""
    _, parts = _find(layout.parts, so)
    part_time = _newest(parts)
    candidates = [(t, s) for t, s in ((marker_time, "done marker"), (part_time, "part written")) if t is not None]
    return max(candidates, default=(None, ""))


def _assess(attempts: Sequence[Attempt], activity: datetime | None, now: datetime, stale_after_s: float) -> list[Attempt]:
    """Each attempt with its ``state``: recorded ends as they are; a ``running`` record by OUT's activity."""
    out = []
    for k, a in enumerate(attempts):
        state = a.status
        if a.status == "running":
            if k < len(attempts) - 1:
                state = INTERRUPTED
            else:
                last = max((t for t in (a.started_at, activity) if t is not None), default=None)
                fresh = last is not None and (now - last).total_seconds() <= stale_after_s
                state = RUNNING if fresh else LIKELY_KILLED
        out.append(Attempt(**{**asdict(a), "state": state}))
    return out


def _shard_total(layout: OutLayout, info: Mapping[str, Any] | None, current: Sequence[Attempt],
                 so: Mapping[str, Any]) -> tuple[int | None, str]:
    """The current run's shard count: from its latest finished record, else counted in the stored plan."""
    recorded = [a for a in current if a.status != "running" and a.shards_total is not None]
    if recorded:
        return recorded[-1].shards_total, f"record attempt-{recorded[-1].attempt}"
    expected = _int((info or {}).get("plan_files"))
    fs, infos = _find(layout.plan, so)
    files = sorted(p for p in infos if p.endswith(".parquet"))
    if not files or (expected is not None and len(files) != expected):
        return None, "plan not stored yet"
    try:
        table = pq.read_table(files, columns=["lot_id", "shard"], filesystem=fs)
    except (OSError, pa.ArrowException) as exc:
        return None, f"plan unreadable ({one_line(exc)})"
    return table.group_by(["lot_id", "shard"]).aggregate([]).num_rows, "plan"


def _errors_by_kind(layout: OutLayout, so: Mapping[str, Any]) -> tuple[list[ErrorKind] | None, str]:
    """Error rows by status over ``predictions/`` (with one example each), or None and why they are unknown."""
    if not parquet_files(layout.predictions, so):
        return [], "no predictions/ yet"
    try:
        con = connect(layout.root, so)
    except OutputError as exc:
        return None, str(exc)
    try:
        rows = con.execute(ERRORS_SQL).fetchall()
    except duckdb.Error as exc:
        return None, f"predictions/ unreadable: {one_line(exc)}"
    finally:
        con.close()
    return [ErrorKind(status=s, n=int(n), example=e, lot_id=lot, image_id=i) for s, n, e, lot, i in rows], ""
