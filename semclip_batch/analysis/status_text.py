"""``status`` as text: a table for people, JSON for scripts (what :func:`~semclip_batch.analysis.status.out_status`
read)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime
from typing import Any

from semclip_batch.analysis.status import RUNNING, Attempt, OutStatus


def _ago(then: datetime | None, now: datetime) -> str:
    if then is None:
        return "-"
    seconds = max(0, int((now - then).total_seconds()))
    if seconds < 120:
        return f"{seconds} s ago"
    if seconds < 7200:
        return f"{seconds // 60} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _clock(t: datetime | None) -> str:
    return t.isoformat(timespec="seconds") if t is not None else "-"


def verdict(st: OutStatus) -> str:
    """One line on the latest attempt: what its record says, and for a ``running`` record what to make of it."""
    a = st.latest
    if a is None:
        return "no attempt record under runs/ (state only): a run was set up but never recorded"
    head = f"run {a.run_id} attempt {a.attempt}"
    window = f"{st.stale_after_s / 60:g} min"
    seen = (f"newest {st.activity_source} {_ago(st.activity, st.now)}" if st.activity is not None
            else "no marker or part written yet")
    if a.state == "complete":
        return f"{head}: complete, finished {_clock(a.finished_at)} ({_ago(a.finished_at, st.now)})"
    if a.state == "failed":
        return (f"{head}: failed at {_clock(a.finished_at)}: {a.error or 'see the record'}; rerun the same command "
                "to redo the shards that are not done")
    if a.state == RUNNING:
        return (f"{head}: running, started {_ago(a.started_at, st.now)}; {seen} (a run killed less than {window} "
                "ago looks the same until then)")
    return (f"{head}: likely killed: no end recorded, started {_ago(a.started_at, st.now)}, {seen}, nothing new for "
            f"more than {window}. If its process is still alive it is stuck, or one shard takes longer than that "
            "(--stale-after). Rerun the same command to resume: done shards are kept")


def _shards_line(st: OutStatus) -> str:
    if st.shards_total:
        share = f" ({100 * st.shards_done / st.shards_total:.1f} %)"
        text = f"{st.shards_done} / {st.shards_total} done{share} (total from {st.shards_total_source})"
    else:
        text = f"{st.shards_done} done (total unknown: {st.shards_total_source})"
    return text + (f"; {st.damaged_markers} damaged marker(s) (those shards run again)" if st.damaged_markers else "")


def _rows_line(st: OutStatus) -> str:
    done = sum(st.rows_by_status.values())
    of = f" / {st.rows_total}" if st.rows_total is not None else ""
    counts = ", ".join(f"{k}={v}" for k, v in st.rows_by_status.items()) or "none yet"
    return f"{done}{of} in done shards: {counts}"


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    return ["  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [head, *rows]]


def render_table(st: OutStatus) -> str:
    lines = [f"out        {st.out}", f"run        {st.run_id or '-'}", f"state      {verdict(st)}",
             f"shards     {_shards_line(st)}", f"rows       {_rows_line(st)}"]
    t = st.throughput
    lines.append(f"throughput {t.throughput_img_s} img/s (run {t.run_id} attempt {t.attempt})" if t
                 else "throughput - (no complete attempt measured one)")
    lines.append("attempts")
    lines += _table(("run_id", "attempt", "state", "started_at", "finished_at", "img/s", "failed_shards", "error"),
                    [(a.run_id, str(a.attempt), a.state, _clock(a.started_at), _clock(a.finished_at),
                      f"{a.throughput_img_s:g}" if a.throughput_img_s else "-",
                      ",".join(a.failed_shards[:3]) + (" …" if len(a.failed_shards) > 3 else "") or "-",
                      (a.error or "-")[:80]) for a in st.attempts])
    if st.errors is None or not st.errors:
        lines.append(f"errors     {st.errors_note or 'none'}")
    else:
        lines.append("errors by kind (predictions/, one example each)")
        lines += _table(("status", "rows", "lot_id", "image_id", "example"),
                        [(e.status, str(e.n), e.lot_id or "-", e.image_id or "-", (e.example or "-")[:120])
                         for e in st.errors])
    return "\n".join(lines) + "\n"


def as_json(st: OutStatus) -> dict[str, Any]:
    def attempt(a: Attempt) -> dict[str, Any]:
        return {"run_id": a.run_id, "attempt": a.attempt, "status": a.status, "state": a.state,
                "started_at": _clock(a.started_at) if a.started_at else None,
                "finished_at": _clock(a.finished_at) if a.finished_at else None,
                "throughput_img_s": a.throughput_img_s, "failed_shards": list(a.failed_shards), "error": a.error}

    latest = st.latest
    t = st.throughput
    return {
        "out": st.out, "run_id": st.run_id, "state": latest.state if latest else None, "summary": verdict(st),
        "checked_at": _clock(st.now), "stale_after_s": st.stale_after_s,
        "last_activity": {"at": _clock(st.activity) if st.activity else None, "source": st.activity_source or None,
                          "age_s": math.floor((st.now - st.activity).total_seconds()) if st.activity else None},
        "attempts": [attempt(a) for a in st.attempts],
        "shards": {"done": st.shards_done, "total": st.shards_total, "total_from": st.shards_total_source,
                   "damaged_markers": st.damaged_markers},
        "rows": {"total": st.rows_total, "done": sum(st.rows_by_status.values()), "by_status": st.rows_by_status},
        "errors": None if st.errors is None else [asdict(e) for e in st.errors],
        "errors_note": st.errors_note or None,
        "throughput": {"img_s": t.throughput_img_s, "run_id": t.run_id, "attempt": t.attempt} if t else None,
    }


def render(st: OutStatus, fmt: str) -> str:
    return json.dumps(as_json(st), indent=2) + "\n" if fmt == "json" else render_table(st)

