"""``semclip-batch status`` on OUTs built by hand, without Ray: a finished run, a killed one (record ``running``,
no end, nothing new under ``_state/`` for an hour) and a running one (record ``running``, fresh markers)."""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from semclip_batch.analysis.status import INTERRUPTED, LIKELY_KILLED, RUNNING, out_status
from semclip_batch.cli import main
from semclip_batch.io.layout import OutLayout
from semclip_batch.io.schema import INPUT, PREDICTIONS

RUN_ID = "0123456789ab"
SHARD_SIZE = 2
LOTS = {"L1": 4, "L 2#": 2}  # lot -> rows: shards s00000, s00001 of L1 and s00000 of "L 2#"
MODEL_ID = "zero-shot:semclip-tiny:0123456789ab"


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="seconds")


def _record(attempt: int, started: datetime, status: str, **extra: object) -> dict:
    body = {"run_id": RUN_ID, "attempt": attempt, "started_at": _iso(started), "finished_at": None,
            "status": status, "mode": "zero-shot", "model_id": MODEL_ID, "shard_size": SHARD_SIZE, "shards": {},
            "rows": {"total": sum(LOTS.values()), "sent_to_model": 0}, "counts": {}, "throughput_img_s": None}
    body.update(extra)
    return body


def _write_json(path: Path, body: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body))


def _plan(out: Path) -> list[tuple[str, str, str]]:
    """Store the plan (one file) and ``_state/run.json``; return the rows as (lot, shard, image_id)."""
    rows = [(lot, f"s{k // SHARD_SIZE:05d}", f"{lot}-{k}") for lot, n in LOTS.items() for k in range(n)]
    table = pa.table({name: [None] * len(rows) for name in INPUT.names}, schema=INPUT)
    for name, values in (("lot_id", [r[0] for r in rows]), ("shard", [r[1] for r in rows]),
                         ("image_id", [r[2] for r in rows])):
        table = table.set_column(INPUT.get_field_index(name), name, pa.array(values, pa.string()))
    layout = OutLayout(str(out))
    Path(layout.plan).mkdir(parents=True)
    pq.write_table(table, layout.plan_file(0))
    _write_json(Path(layout.run_info), {"run_id": RUN_ID, "shard_size": SHARD_SIZE, "plan_files": 1})
    return rows


def _finish_shard(out: Path, rows: list[tuple[str, str, str]], lot: str, shard: str, age_s: float) -> None:
    """A finalised shard: its predictions file (L1/s00000 starts with a decode_error) and its done marker,
    ``age_s`` old."""
    mine = [r for r in rows if r[:2] == (lot, shard)]
    preds = []
    for k, (_, _, image_id) in enumerate(mine):
        row = {name: None for name in PREDICTIONS.names}
        bad = k == 0 and (lot, shard) == ("L1", "s00000")
        row.update(image_id=image_id, uri=f"{image_id}.png", wafer_id="W1", status="decode_error" if bad else "ok",
                   error=f"not a readable image: {image_id}.png" if bad else None, model_id=MODEL_ID, run_id=RUN_ID,
                   anomaly_score=None if bad else 0.5, is_defect=None if bad else False)
        preds.append(row)
    layout = OutLayout(str(out))
    Path(layout.prediction_folder(lot)).mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(preds, schema=PREDICTIONS), layout.prediction_file(lot, shard))
    counts: dict[str, int] = {}
    for p in preds:
        counts[p["status"]] = counts.get(p["status"], 0) + 1
    marker = Path(layout.marker(lot, shard))
    _write_json(marker, {"lot_id": lot, "shard": shard, "rows": len(preds), "counts": counts})
    then = time.time() - age_s
    os.utime(marker, (then, then))


def finished_out(out: Path, now: datetime) -> None:
    """Attempt 1 killed an hour ago after one shard; attempt 2 redid the rest and completed."""
    rows = _plan(out)
    _finish_shard(out, rows, "L1", "s00000", age_s=3600)
    _finish_shard(out, rows, "L1", "s00001", age_s=600)
    _finish_shard(out, rows, "L 2#", "s00000", age_s=590)
    runs = Path(OutLayout(str(out)).runs) / RUN_ID
    _write_json(runs / "attempt-1.json", _record(1, now - timedelta(hours=1, minutes=5), "running"))
    _write_json(runs / "attempt-2.json", _record(
        2, now - timedelta(minutes=15), "complete", finished_at=_iso(now - timedelta(minutes=9)),
        shards={"total": 3, "skipped": 1, "run": 2}, counts={"decode_error": 1, "ok": 5}, throughput_img_s=4.25))


def killed_out(out: Path, now: datetime) -> None:
    """Started an hour ago; one shard done 50 minutes ago, a part of another 45 minutes ago; no end recorded."""
    rows = _plan(out)
    _finish_shard(out, rows, "L1", "s00000", age_s=3000)
    part = Path(OutLayout(str(out)).part_file("L1", "s00001", "abc"))
    part.parent.mkdir(parents=True)
    part.write_bytes(b"PAR1")
    then = time.time() - 2700
    os.utime(part, (then, then))
    _write_json(Path(OutLayout(str(out)).attempt(RUN_ID, 1)), _record(1, now - timedelta(hours=1), "running"))


def running_out(out: Path, now: datetime) -> None:
    """Started 20 minutes ago; two shards done, the newest 30 s ago; no end recorded."""
    rows = _plan(out)
    _finish_shard(out, rows, "L1", "s00000", age_s=300)
    _finish_shard(out, rows, "L1", "s00001", age_s=30)
    _write_json(Path(OutLayout(str(out)).attempt(RUN_ID, 1)), _record(1, now - timedelta(minutes=20), "running"))


@pytest.fixture
def now() -> datetime:
    return datetime.now(UTC)


def test_finished_out(tmp_path: Path, now: datetime) -> None:
    finished_out(tmp_path, now)
    st = out_status(str(tmp_path), now=now)
    assert [(a.attempt, a.state) for a in st.attempts] == [(1, INTERRUPTED), (2, "complete")]
    assert (st.shards_done, st.shards_total, st.shards_total_source) == (3, 3, "record attempt-2")
    assert st.rows_by_status == {"decode_error": 1, "ok": 5} and st.rows_total == 6
    assert st.errors is not None and [(e.status, e.n, e.lot_id, e.image_id) for e in st.errors] == [
        ("decode_error", 1, "L1", "L1-0")]
    assert st.throughput is not None and st.throughput.throughput_img_s == 4.25


def test_killed_out(tmp_path: Path, now: datetime) -> None:
    killed_out(tmp_path, now)
    st = out_status(str(tmp_path), now=now)
    assert [a.state for a in st.attempts] == [LIKELY_KILLED]
    assert st.activity_source == "part written"  # the part (45 min) is newer than the marker (50 min)
    assert (st.shards_done, st.shards_total, st.shards_total_source) == (1, 3, "plan")
    assert st.throughput is None
    # the same OUT read with a window longer than its silence is (still) running
    assert out_status(str(tmp_path), now=now, stale_after_s=3600).attempts[-1].state == RUNNING


def test_running_out(tmp_path: Path, now: datetime) -> None:
    running_out(tmp_path, now)
    st = out_status(str(tmp_path), now=now)
    assert [a.state for a in st.attempts] == [RUNNING]
    assert st.activity_source == "done marker" and st.activity is not None
    assert 20 <= (now - st.activity).total_seconds() <= 60
    assert (st.shards_done, st.shards_total) == (2, 3)
    assert sum(st.rows_by_status.values()) == 4


def test_a_run_just_started_is_running(tmp_path: Path, now: datetime) -> None:
    """Nothing under _state/ but the plan yet: the record's recent start counts."""
    _plan(tmp_path)
    _write_json(Path(OutLayout(str(tmp_path)).attempt(RUN_ID, 1)), _record(1, now - timedelta(seconds=40), "running"))
    st = out_status(str(tmp_path), now=now)
    assert [a.state for a in st.attempts] == [RUNNING] and st.shards_done == 0 and st.errors == []


@pytest.mark.parametrize(("build", "says"), [
    (finished_out, ["attempt 2: complete", "3 / 3 done", "decode_error  1", "throughput 4.25 img/s", "interrupted"]),
    (killed_out, ["attempt 1: likely killed", "no end recorded", "newest part written 45 min ago", "1 / 3 done",
                  "Rerun the same command"]),
    (running_out, ["attempt 1: running", "newest done marker 30 s ago", "2 / 3 done (66.7 %)"]),
])
def test_status_command_says_which_is_which(tmp_path: Path, now: datetime, build, says) -> None:
    build(tmp_path, now)
    result = CliRunner().invoke(main, ["status", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for text in says:
        assert text in result.output, result.output
    as_json = CliRunner().invoke(main, ["status", str(tmp_path), "--format", "json"])
    body = json.loads(as_json.output)
    assert body["state"] == {finished_out: "complete", killed_out: LIKELY_KILLED, running_out: RUNNING}[build]
    assert body["shards"]["total"] == 3 and body["rows"]["total"] == 6


def test_damaged_marker_is_counted_apart(tmp_path: Path, now: datetime) -> None:
    running_out(tmp_path, now)
    _write_json(Path(OutLayout(str(tmp_path)).marker("L 2#", "s00000")), {})
    Path(OutLayout(str(tmp_path)).marker("L 2#", "s00000")).write_text("{not json")
    st = out_status(str(tmp_path), now=now)
    assert (st.shards_done, st.damaged_markers) == (2, 1)
    # a marker a rerun would not skip (its counts do not add up to its rows, or it names another shard) is not
    # done for status either: the same rule as run's
    _write_json(Path(OutLayout(str(tmp_path)).marker("L 2#", "s00000")),
                {"lot_id": "L 2#", "shard": "s00000", "rows": 5, "counts": {"ok": 2}})
    _write_json(Path(OutLayout(str(tmp_path)).marker("L 2#", "s00001")),
                {"lot_id": "L 2#", "shard": "s00009", "rows": 2, "counts": {"ok": 2}})
    st = out_status(str(tmp_path), now=now)
    assert (st.shards_done, st.damaged_markers) == (2, 2)


@pytest.mark.parametrize("make", ["missing", "empty", "other", "file"])
def test_not_an_out_is_one_line(tmp_path: Path, make: str) -> None:
    target = tmp_path / "out"
    if make == "file":  # a manifest given for OUT
        target.write_text("uri\na.png\n")
    elif make != "missing":
        target.mkdir()
    if make == "other":
        (target / "predictions").mkdir()
        (target / "notes.txt").write_text("hello")
    result = CliRunner().invoke(main, ["status", str(target)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "is not a semclip-batch output" in lines[0], result.output


def test_stale_after_must_be_positive(tmp_path: Path, now: datetime) -> None:
    running_out(tmp_path, now)
    result = CliRunner().invoke(main, ["status", str(tmp_path), "--stale-after", "0"])
    assert result.exit_code != 0 and "--stale-after" in result.output


def test_object_store_out(now: datetime) -> None:
    """Through fsspec (memory://, whose listings give creation times): the same reading as on a local disk."""
    import fsspec

    fs = fsspec.filesystem("memory")
    root = f"memory://status-{time.time_ns()}"
    fs.pipe(f"{root}/_state/run.json", json.dumps({"run_id": RUN_ID, "shard_size": SHARD_SIZE}).encode())
    fs.pipe(f"{root}/runs/{RUN_ID}/attempt-1.json", json.dumps(_record(1, now - timedelta(minutes=3), "running")).encode())
    fs.pipe(f"{root}/_state/done/L1/s00000.json",
            json.dumps({"lot_id": "L1", "shard": "s00000", "rows": 2, "counts": {"ok": 2}}).encode())
    try:
        st = out_status(root, now=now)
        assert [a.state for a in st.attempts] == [RUNNING]
        assert (st.shards_done, st.shards_total, st.rows_by_status) == (1, None, {"ok": 2})
        assert st.activity is not None and st.activity_source == "done marker"
    finally:
        fs.rm(root.removeprefix("memory://"), recursive=True)


def test_failed_attempt_names_its_shards(tmp_path: Path, now: datetime) -> None:
    rows = _plan(tmp_path)
    _finish_shard(tmp_path, rows, "L1", "s00000", age_s=120)
    _finish_shard(tmp_path, rows, "L 2#", "s00000", age_s=100)
    _write_json(Path(OutLayout(str(tmp_path)).attempt(RUN_ID, 1)), _record(
        1, now - timedelta(minutes=5), "failed", finished_at=_iso(now - timedelta(minutes=1)),
        shards={"total": 3, "skipped": 0, "run": 3}, failed_shards=["L1/s00001"], error="OSError: disk full",
        throughput_img_s=3.0))
    result = CliRunner().invoke(main, ["status", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "attempt 1: failed at" in result.output and "OSError: disk full" in result.output
    assert "L1/s00001" in result.output and "2 / 3 done" in result.output
    assert "throughput - (no complete attempt" in result.output  # a failed attempt's rate is not the run's


@pytest.mark.parametrize(("name", "other"), [("o*x", "oZx"), ("o[a]x", "oax"), ("o[x", "o[x2")])
def test_an_out_named_like_a_glob_is_read_as_named(tmp_path: Path, now: datetime, name: str, other: str) -> None:
    """``*``, ``?`` and ``[`` in OUT's name are characters: ``o[a]x``'s markers were looked up as ``oax``'s
    (FileNotFoundError), and ``o*x``'s errors by kind counted ``oZx``'s error rows too."""
    finished_out(tmp_path / name, now)
    killed_out(tmp_path / other, now)  # its own decode_error row and marker, which must not count
    st = out_status(str(tmp_path / name), now=now)
    assert (st.shards_done, st.rows_by_status) == (3, {"decode_error": 1, "ok": 5})
    assert st.errors is not None and [(e.status, e.n) for e in st.errors] == [("decode_error", 1)], st.errors_note
    result = CliRunner().invoke(main, ["status", str(tmp_path / name)])
    assert result.exit_code == 0 and "3 / 3 done" in result.output, result.output


def test_predictions_folder_without_files_is_no_predictions_yet(tmp_path: Path, now: datetime) -> None:
    running_out(tmp_path, now)
    for file in Path(OutLayout(str(tmp_path)).predictions).rglob("*.parquet"):
        file.unlink()
    st = out_status(str(tmp_path), now=now)
    assert (st.errors, st.errors_note) == ([], "no predictions/ yet")
