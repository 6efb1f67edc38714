"""Lot reports (``semclip-batch report``) on a small OUT built without Ray: predictions Parquet, masks.zarr and a
run record written directly, frames from the synthetic renderer. Pages are opened in headless Chromium."""

from __future__ import annotations

import io
import json
import logging
import math
import re
import shutil
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import unquote

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr
from click.testing import CliRunner
from PIL import Image
from scipy import ndimage

from semclip_batch.analysis.charts import ERROR
from semclip_batch.analysis.report import read_lot, write_report
from semclip_batch.analysis.report_frames import overlay
from semclip_batch.analysis.report_html import lot_page_name
from semclip_batch.cli import main
from semclip_batch.io.layout import OutLayout
from semclip_batch.io.schema import PREDICTIONS
from semclip_batch.synth.generate import encode, make_site
from semclip_batch.synth.render import CLASSES

LOTS = ("LOT-A", "Lot #7 ü:β", 'Q&A <"5">')
WAFERS = ("W01", "W02", "W10")
SIZES = ((64, 96), (80, 80))
IMAGE_THRESHOLD, PIXEL_THRESHOLD = 0.9, 0.5
BAD_MESSAGE = '<script>alert("x")</script> & broken'
TOP_N = 6


def _dies() -> list[tuple[int, int]]:
    return [(x, y) for x in range(-3, 4) for y in range(-3, 4) if math.hypot(abs(x) + 0.5, abs(y) + 0.5) <= 3.3]


def _mask(truth: np.ndarray, defect: bool, rng: np.random.Generator) -> np.ndarray:
    """A plausible stored mask: the blurred truth region near 1, a faint noisy background."""
    soft = ndimage.gaussian_filter(truth.astype(np.float32), 1.5)
    soft = soft / soft.max() if defect and soft.max() > 0 else soft
    background = ndimage.gaussian_filter(rng.random(truth.shape).astype(np.float32), 4) * 0.6
    return np.rint(255 * np.clip(np.maximum(soft, background), 0, 1)).astype(np.uint8)


def _ok_row(lot_index: int, k: int, wafer: str, die: tuple[int, int] | None, rng: np.random.Generator,
            data: Path) -> tuple[dict, np.ndarray]:
    label = str(rng.choice(CLASSES, p=[0.5, *[0.5 / (len(CLASSES) - 1)] * (len(CLASSES) - 1)]))
    h, w = SIZES[k % len(SIZES)]
    img, truth, _ = make_site(label, h, w, rng, None)
    uri = f"images/{lot_index}/{k:04d}.png"
    (data / uri).parent.mkdir(parents=True, exist_ok=True)
    (data / uri).write_bytes(encode(img, "png", 8))
    mask = _mask(truth, label != "normal", rng)
    score = float(rng.uniform(0.9, 0.99) if label != "normal" else rng.uniform(0.2, 0.6))
    area = int((mask >= math.ceil(255 * PIXEL_THRESHOLD)).sum())
    flagged = score >= IMAGE_THRESHOLD
    return {"image_id": f"{lot_index}-{k:04d}", "uri": uri, "wafer_id": wafer,
            "die_x": die[0] if die else None, "die_y": die[1] if die else None, "status": "ok", "error": None,
            "anomaly_score": score, "is_defect": flagged, "defect_class": label if flagged else None,
            "class_scores": rng.random(len(CLASSES)).astype(np.float32).tolist(), "defect_area_px": area,
            "defect_area_frac": area / (h * w), "n_regions": int(area > 0), "mask_path": f"{h}x{w}",
            "mask_index": None, "model_id": "zero-shot:semclip-tiny:0123456789ab", "run_id": "r-report"}, mask


def _error_row(lot_index: int, k: int, wafer: str, die: tuple[int, int] | None, status: str, message: str) -> dict:
    row = {name: None for name in PREDICTIONS.names}
    row.update(image_id=f"{lot_index}-{k:04d}", uri=f"images/{lot_index}/bad-{k}.png", wafer_id=wafer,
               die_x=die[0] if die else None, die_y=die[1] if die else None, status=status, error=message,
               model_id="zero-shot:semclip-tiny:0123456789ab", run_id="r-report")
    return row


def _lot_rows(lot_index: int, data: Path, rng: np.random.Generator) -> tuple[list[dict], list[np.ndarray]]:
    rows, masks = [], []
    for wafer in WAFERS[: 3 if lot_index != 2 else 2]:
        chosen = rng.choice(len(_dies()), size=12, replace=False)
        for j, d in enumerate(chosen):
            die = _dies()[int(d)]
            for _ in range(2 if j % 5 == 0 else 1):
                row, mask = _ok_row(lot_index, len(rows), wafer, die, rng, data)
                rows.append(row)
                masks.append(mask)
    row, mask = _ok_row(lot_index, len(rows), "W01", None, rng, data)  # a frame without a die position
    rows.append(row)
    masks.append(mask)
    errors = [_error_row(lot_index, len(rows), "W02", (3, 0), "decode_error", BAD_MESSAGE),
              _error_row(lot_index, len(rows) + 1, "W01", None, "read_error", f"not found: {data}/gone.png")]
    return rows + errors, masks


def _break_top_frames(rows: list[dict], data: Path) -> None:
    """The three most anomalous ok rows: a missing frame, a corrupt one and one given by an absolute path."""
    ok = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: -r["anomaly_score"])
    (data / ok[0]["uri"]).unlink()
    (data / ok[1]["uri"]).write_bytes(b"this is not an image")
    ok[2]["uri"] = str(data / ok[2]["uri"])


def _store(out: Path, lot: str, rows: list[dict], masks: list[np.ndarray]) -> None:
    root = zarr.open_group(str(out / "masks.zarr"), mode="a", zarr_format=3)
    group = root.require_group(lot).require_group("s00000")
    ok = [r for r in rows if r["status"] == "ok"]
    for h, w in SIZES:
        members = [(r, m) for r, m in zip(ok, masks, strict=True) if m.shape == (h, w)]
        array = group.create_array(name=f"{h}x{w}", shape=(len(members), h, w), dtype="uint8", chunks=(1, h, w))
        array[:] = np.stack([m for _, m in members])
        for index, (r, _) in enumerate(members):
            r["mask_path"], r["mask_index"] = f"{lot}/s00000/{h}x{w}", index
    folder = out / "predictions" / f"lot_id={lot}"
    folder.mkdir(parents=True)
    half = len(rows) // 2  # two files per lot, as two shards would give
    for name, part in (("s00000.parquet", rows[:half]), ("s00001.parquet", rows[half:])):
        pq.write_table(pa.Table.from_pylist(part, schema=PREDICTIONS), folder / name)


def _record(out: Path, data: Path, counts: Counter[str], n_rows: int) -> None:
    record = {
        "run_id": "r-report", "attempt": 1, "started_at": "2026-12-01T10:00:00+00:00",
        "finished_at": "2026-12-01T10:01:00+00:00", "status": "complete", "mode": "zero-shot",
        "model_id": "zero-shot:semclip-tiny:0123456789ab", "classes": list(CLASSES),
        "thresholds": {"image": IMAGE_THRESHOLD, "pixel": PIXEL_THRESHOLD, "min_region_px": 16,
                       "source": {"image": "flag", "pixel": "flag", "min_region_px": "default"}},
        "shard_size": 256, "shards": {"total": 6, "skipped": 0, "run": 6},
        "rows": {"total": n_rows, "sent_to_model": n_rows}, "counts": dict(sorted(counts.items())),
        "timings_s": {"pipeline": 10.0}, "throughput_img_s": 12.3,
        "config": {"input": str(data / "manifest.csv"), "pattern": None},
    }
    folder = out / "runs" / "r-report"
    folder.mkdir(parents=True)
    (folder / "attempt-1.json").write_text(json.dumps(record))


def build_out(root: Path) -> tuple[Path, dict[str, list[dict]]]:
    """OUT with three lots (a space, '#', ':', unicode and HTML characters in their ids), error rows, a frame
    without a die position, and unreadable frames among each lot's most anomalous."""
    data, out = root / "data", root / "out"
    data.mkdir(parents=True)
    (data / "manifest.csv").write_text("uri,lot_id,wafer_id\n")
    rng = np.random.default_rng(7)
    by_lot, counts = {}, Counter()
    for i, lot in enumerate(LOTS):
        rows, masks = _lot_rows(i, data, rng)
        _break_top_frames(rows, data)
        _store(out, lot, rows, masks)
        by_lot[lot] = rows
        counts.update(r["status"] for r in rows)
    _record(out, data, counts, sum(counts.values()))
    return out, by_lot


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, dict[str, list[dict]], str]:
    out, by_lot = build_out(tmp_path_factory.mktemp("report"))
    index = write_report(str(out), top_n=TOP_N)
    return out, by_lot, index


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.images = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.images += tag == "img"
        self.links += [v for k, v in attrs if k in ("href", "src") and v is not None]


def links_of(html_text: str) -> list[str]:
    parser = _Links()
    parser.feed(html_text)
    return parser.links


def check_links(pages: dict[str, str], exists) -> list[str]:
    """Every href/src of every page, as a path relative to the reports folder; each must name a written file."""
    targets = []
    for name, text in pages.items():
        for link in links_of(text):
            if link.startswith("data:"):
                continue
            assert "://" not in link and not link.startswith("/"), f"{name}: link {link!r} is not relative"
            target = unquote(link)
            assert exists(target), f"{name}: {link!r} -> {target!r} was not written"
            targets.append(target)
    return targets


def test_pages_for_every_lot_and_every_link_resolves(report):
    out, _, index = report
    reports = out / "reports"
    assert index == str(reports / "index.html")
    assert sorted(p.name for p in reports.glob("*.html")) == sorted(["index.html", *map(lot_page_name, LOTS)])
    pages = {p.name: p.read_text(encoding="utf-8") for p in reports.glob("*.html")}
    targets = check_links(pages, lambda rel: (reports / rel).is_file())
    assert {t for t in targets if t.endswith(".html")} == {"index.html", *map(lot_page_name, LOTS)}
    pngs = {str(p.relative_to(reports)) for p in reports.rglob("*.png")}
    assert pngs == {t for t in targets if t.endswith(".png")}, "every picture is shown, none missing"
    for png in pngs:
        with Image.open(reports / png) as img:
            assert img.format == "PNG" and min(img.size) > 8


def test_lot_pages_drawn_by_worker_processes_equal_those_drawn_here(report, tmp_path, monkeypatch):
    """The worker processes (spawned, each with its own DuckDB connection and handle on masks and frames) write
    the same files, byte for byte, as drawing every lot in this process (the fixture's report); the progress
    callback still counts every lot."""
    import semclip_batch.analysis.report as report_module

    out = report[0]
    copy = tmp_path / "out"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("reports"))
    monkeypatch.setattr(report_module, "PARALLEL_FROM_LOTS", 2)  # the fixture has 3 lots
    monkeypatch.setattr(report_module, "_pages_here", lambda *_: pytest.fail("lot pages drawn in this process"))
    calls = []
    write_report(str(copy), top_n=TOP_N, workers=2, progress=lambda n, total: calls.append((n, total)))
    assert calls == [(1, len(LOTS))] * len(LOTS)

    def files(root: Path) -> dict[str, bytes]:  # pages say when they were written (to the minute): not compared
        return {str(p.relative_to(root)): re.sub(rb"Written by semclip-batch report, [^<]*", b"", p.read_bytes())
                for p in sorted(root.rglob("*")) if p.is_file()}

    here, workers = files(out / "reports"), files(copy / "reports")
    assert sorted(here) == sorted(workers) and len(here) > 3 * len(LOTS)
    assert [name for name in here if here[name] != workers[name]] == []
    refused = CliRunner().invoke(main, ["report", str(copy), "--workers", "0"])
    assert refused.exit_code == 1 and refused.output == "Error: --workers must be at least 1, got 0\n"
    assert (copy / "reports" / "index.html").exists()  # refused before anything was removed


def test_a_lot_that_fails_in_a_worker_fails_the_report_as_in_one_process(report, tmp_path, monkeypatch):
    """A lot whose Parquet file is not Parquet: the same exception, type and message, from a worker as from this
    process, and the CLI's one line."""
    import semclip_batch.analysis.report as report_module

    copy = tmp_path / "out"
    shutil.copytree(report[0], copy, ignore=shutil.ignore_patterns("reports"))
    lot_folder = sorted((copy / "predictions").iterdir())[1]
    next(lot_folder.glob("*.parquet")).write_bytes(b"not a parquet file")
    monkeypatch.setattr(report_module, "PARALLEL_FROM_LOTS", 2)
    raised = []
    for workers in (1, 2):
        with pytest.raises(Exception) as info:
            write_report(str(copy), top_n=TOP_N, workers=workers)
        raised.append((type(info.value), str(info.value)))
    assert raised[0] == raised[1], raised
    res = CliRunner().invoke(main, ["report", str(copy), "--workers", "2"])
    assert res.exit_code == 1 and res.output.startswith("Error: ") and res.output.count("\n") == 1, res.output


def test_index_summarises_the_run_and_escapes_error_messages(report):
    out, by_lot, _ = report
    text = (out / "reports" / "index.html").read_text(encoding="utf-8")
    assert "<script" not in text and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; broken" in text
    for fact in ("r-report", "zero-shot:semclip-tiny:0123456789ab", "12.3 img/s", "decode_error", "read_error"):
        assert fact in text
    assert "Q&amp;A &lt;&quot;5&quot;&gt;" in text and 'Q&A <"5">' not in text
    assert 'href="lot-Lot%20%237%20%C3%BC%3A%CE%B2.html"' in text
    n_rows = sum(len(rows) for rows in by_lot.values())
    assert f"<td>ok</td><td class=\"n\">{n_rows - 2 * len(LOTS)}</td>" in text


def test_lot_counts_come_from_the_rows(report):
    out, by_lot, _ = report
    con = duckdb.connect()
    for lot, rows in by_lot.items():
        got = read_lot(con, OutLayout(str(out)), lot, TOP_N, {})
        assert got is not None
        assert [w.wafer_id for w in got.wafers] == sorted({r["wafer_id"] for r in rows}, key=lambda w: int(w[1:]))
        for wafer in got.wafers:
            mine = [r for r in rows if r["wafer_id"] == wafer.wafer_id]
            expect = Counter(ERROR if r["status"] != "ok" else r["defect_class"] or "normal" for r in mine)
            assert wafer.frames == expect
            assert sum(sum(c.values()) for c in wafer.dies.values()) == sum(r["die_x"] is not None for r in mine)
        ok = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: (-r["anomaly_score"], r["image_id"]))
        assert [t.image_id for t in got.top] == [r["image_id"] for r in ok[:TOP_N]]


def test_unreadable_frames_show_the_mask_and_say_so(report):
    out, _, _ = report
    for lot in LOTS:
        text = (out / "reports" / lot_page_name(lot)).read_text(encoding="utf-8")
        assert text.count("frame not readable (not found:") == 1, lot
        assert text.count("frame not readable (not a readable image") == 1, lot
        assert text.count("showing the mask alone") == 2 and text.count('class="placeholder"') == 0
        assert text.count('alt="overlay of') == TOP_N and text.count('alt="wafer map of wafer') >= 2


def test_an_unreadable_mask_is_one_warning_line_and_a_note(caplog):
    """A mask that cannot be read (a corrupt chunk, masks.zarr gone) costs its thumbnail a note and the log one
    line; its traceback only at -vv (debug)."""

    class Broken:
        level = 0

        def mask(self, row: object) -> np.ndarray:
            raise ValueError("Stored and computed checksum do not match\nstored: 1, computed: 2")

        def frame(self, row: object) -> np.ndarray:
            return np.full((32, 32), 128, np.uint8)

    with caplog.at_level(logging.WARNING):
        png, notes = overlay(SimpleNamespace(image_id="abc"), Broken())  # type: ignore[arg-type]
    assert png is not None and len(notes) == 1 and "\n" not in notes[0]
    assert notes[0].startswith("mask not readable: ValueError: Stored and computed checksum do not match")
    warned = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in warned] == [f"mask of abc unreadable: {notes[0].removeprefix('mask not readable: ')}"]
    assert all(r.exc_info is None for r in warned)


def _not_blank(png: Path, width: int) -> None:
    with Image.open(png) as img:
        pixels = np.asarray(img.convert("L"))
    assert img.size[0] == width and img.size[1] > 400 and pixels.std() > 10, png


def test_pages_open_in_headless_chromium_without_console_errors(report, tmp_path):
    from headless import open_page

    index = report[2]
    shots = tmp_path / "screenshots"
    shots.mkdir()
    problems = open_page(Path(index).as_uri(), shots / "index.png", tmp_path / "profile")
    assert problems == [], problems
    _not_blank(shots / "index.png", 1400)
    links = [h for h in links_of(Path(index).read_text(encoding="utf-8")) if h.startswith("lot-")]
    assert len(links) == len(LOTS)
    for k, link in enumerate(links):  # each page opened by the very href the index holds
        problems = open_page(f"{Path(index).parent.as_uri()}/{link}", shots / f"lot-{k}.png", tmp_path / "profile")
        assert problems == [], (link, problems)
        _not_blank(shots / f"lot-{k}.png", 1400)
    print(f"screenshots in {shots}")


def test_headless_check_catches_a_missing_picture(tmp_path):
    from headless import open_page

    page = tmp_path / "bad.html"
    page.write_text('<!doctype html><html><head><link rel="icon" href="data:,"></head><body>'
                    '<img src="missing.png"></body></html>')
    problems = open_page(page.as_uri(), tmp_path / "bad.png", tmp_path / "profile")
    assert any("ERR_FILE_NOT_FOUND" in p for p in problems), problems


def test_report_cli(report, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(report[0], out, ignore=shutil.ignore_patterns("reports"))
    index = str(out / "reports" / "index.html")
    result = CliRunner().invoke(main, ["report", str(out), "--top-n", "2"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == index
    assert (out / "reports" / lot_page_name(LOTS[1])).read_text(encoding="utf-8").count('alt="overlay of') == 2
    result = CliRunner().invoke(main, ["aggregate", str(out), "--report"])
    assert result.exit_code == 0, result.output
    assert f"report: {index}" in result.output and (out / "lot_stats").is_dir()
    for args, fragment in ((["report", str(tmp_path / "empty")], "has no predictions/"),
                           (["report", str(out), "--top-n", "-1"], "--top-n must be between 0 and")):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert result.output.count("\n") == 1 and fragment in result.output, result.output
    for command in (["run", "--help"], ["aggregate", "--help"]):
        assert "--report" in CliRunner().invoke(main, command).output


def test_process_lots_job_offers_report():
    import importlib.util

    spec = importlib.util.spec_from_file_location("process_lots", Path(__file__).parents[1] / "jobs" / "process_lots.py")
    assert spec is not None and spec.loader is not None
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    assert "--report" in CliRunner().invoke(job.main, ["--help"]).output


def test_overwrite_removes_reports():
    layout = OutLayout("/x/out")
    assert layout.reports in layout.owned_outputs()


@pytest.mark.s3
def test_report_written_to_s3(report, s3_endpoint):
    import fsspec
    from conftest import BUCKET

    out, _, _ = report
    fs = fsspec.filesystem("s3")
    remote = f"{BUCKET}/report-test/out"
    for path in out.rglob("*"):
        if path.is_file() and path.relative_to(out).parts[0] != "reports":
            fs.pipe_file(f"{remote}/{path.relative_to(out).as_posix()}", path.read_bytes())
    calls: list[tuple[int, int]] = []
    index = write_report(f"s3://{remote}", top_n=2, progress=lambda n, total: calls.append((n, total)))
    assert index == f"s3://{remote}/reports/index.html"
    assert calls == [(1, len(LOTS))] * len(LOTS)  # the progress bar of `report`: one step per lot page
    fs.invalidate_cache()
    names = [p[len(remote) + len("/reports/"):] for p in fs.find(f"{remote}/reports")]
    pages = {n: fs.cat_file(f"{remote}/reports/{n}").decode() for n in names if n.endswith(".html")}
    assert sorted(pages) == sorted(["index.html", *map(lot_page_name, LOTS)])
    targets = check_links(pages, lambda rel: rel in names)
    assert {t for t in targets if t.endswith(".png")} == {n for n in names if n.endswith(".png")}
    with Image.open(io.BytesIO(fs.cat_file(f"{remote}/reports/{sorted(n for n in names if n.endswith('.png'))[0]}"))) as img:
        assert img.format == "PNG"


def test_a_killed_attempts_record_shows_dashes_not_none():
    """An attempt still ``running`` (or killed) has no shard counts, finish time or throughput yet."""
    from semclip_batch.analysis.report_html import index_page

    record = {"run_id": "abc", "attempt": 2, "status": "running", "started_at": "2026-12-07T10:00:00+00:00",
              "finished_at": None, "rows": {"total": 14, "sent_to_model": 0}, "shards": {}, "counts": {},
              "thresholds": {"image": 0.95}, "classes": ["normal", "particle"]}
    page = index_page(record, [], []).decode()
    assert "None" not in page
    assert "– (– run, – skipped)" in page and "2026-12-07T10:00:00+00:00 / –" in page
    assert "image 0.95, pixel –, min region – px" in page
