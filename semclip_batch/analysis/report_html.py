"""The report's HTML: ``index.html`` and ``lot-<lot_id>.html``. Static pages (inline CSS, no scripts, nothing
fetched), every link relative and URL-encoded, every value from the data HTML-escaped."""

from __future__ import annotations

import html
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from semclip_batch.analysis.charts import ERROR, Palette

if TYPE_CHECKING:
    from semclip_batch.analysis.report import Lot, TopFrame, Wafer

STYLE = """
body{font-family:"DejaVu Sans",system-ui,sans-serif;margin:24px auto;max-width:1340px;padding:0 16px;color:#222}
h1{font-size:24px}h2{font-size:19px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:15px;margin:0 0 6px}code{font-size:13px;background:#f3f3f3;padding:0 3px;border-radius:3px}
h1 code,h3 code{font-size:inherit}
table{border-collapse:collapse;margin:6px 0 14px;font-size:13px}
th,td{border:1px solid #d0d0d0;padding:3px 8px;text-align:left;vertical-align:top}th{background:#f5f5f5}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.grid{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start}
.card{border:1px solid #ddd;border-radius:6px;padding:10px;background:#fff}
.card img{display:block;max-width:100%}
figure{margin:0;width:244px}figcaption{font-size:12px;line-height:1.35;margin-top:4px;overflow-wrap:anywhere}
.sw{display:inline-block;width:11px;height:11px;border:1px solid #333;margin-right:5px;vertical-align:-1px}
.note{color:#a0301f;font-size:12px;overflow-wrap:anywhere}.muted{color:#666;font-size:12px}
.placeholder{width:240px;height:120px;background:#eee;display:flex;align-items:center;justify-content:center;
color:#666;font-size:12px;text-align:center}
.msg{max-width:760px;overflow-wrap:anywhere}
.excursion{color:#b3261e}
"""


@dataclass(frozen=True)
class LotCharts:
    """File names (inside the lot's assets folder) of a lot's charts; None where there is nothing to draw."""

    pareto: str | None
    rate: str | None
    wafers: list[str | None]


@dataclass(frozen=True)
class Tile:
    """One overlay thumbnail: its row, its file name (None when neither frame nor mask could be read), notes."""

    row: TopFrame
    image: str | None
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class LotRow:
    """A lot's line of the index."""

    lot_id: str
    statuses: Counter[str]
    examples: Mapping[str, str]
    pareto: list[tuple[str, int]]

    @property
    def n_images(self) -> int:
        return sum(self.statuses.values())

    @property
    def n_ok(self) -> int:
        return self.statuses["ok"]

    @property
    def n_defect(self) -> int:
        return sum(n for _, n in self.pareto)


def lot_page_name(lot_id: str) -> str:
    """``lot-<lot_id>.html``: lot ids hold no ``/``, NUL or control characters and no leading ``.`` (refused up
    front), so the name is a valid file and object name as it is."""
    return f"lot-{lot_id}.html"


def assets_folder(lot_id: str) -> str:
    """The lot's pictures; ``.files`` never equals a page name, which ends in ``.html``."""
    return f"lot-{lot_id}.files"


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _known(value: Any) -> str:
    """A run record's value for the page, a dash where the record has none (an attempt still running, or killed,
    has no shard counts yet)."""
    return "–" if value is None or value == "" else esc(value)


def href(*names: str) -> str:
    """A relative link to ``names`` joined by ``/``, each URL-encoded (``#``, ``?``, ``:``, spaces, unicode)."""
    return esc("/".join(quote(n, safe="") for n in names))


def _page(title: str, body: str) -> bytes:
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f'<link rel="icon" href="data:,"><style>{STYLE}</style></head>\n<body>\n{body}\n'
            f'<p class="muted">Written by semclip-batch report, {stamp}.</p>\n</body></html>\n').encode()


def _table(head: Sequence[str], rows: Iterable[Sequence[str]], numeric: Sequence[int] = ()) -> str:
    """An HTML table; cells are HTML already (escape values before), columns in ``numeric`` right-aligned."""
    out = ["<table><tr>", *(f"<th>{h}</th>" for h in head), "</tr>"]
    for row in rows:
        out.append("<tr>" + "".join(f'<td class="n">{c}</td>' if i in numeric else f"<td>{c}</td>"
                                    for i, c in enumerate(row)) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f} %" if whole else "–"


def _swatch(palette: Palette, key: str) -> str:
    return f'<span class="sw" style="background:{palette.colour(key)}"></span>{esc(palette.label(key))}'


def _run_summary(record: Mapping[str, Any] | None) -> str:
    if record is None:
        return '<p class="note">No run record found under runs/ (the summary below comes from predictions/).</p>'
    th = record.get("thresholds") or {}
    rows = record.get("rows") or {}
    shards = record.get("shards") or {}
    throughput = record.get("throughput_img_s")
    facts = [
        ("run_id", f"<code>{_known(record.get('run_id'))}</code> (attempt {_known(record.get('attempt'))})"),
        ("status", _known(record.get("status"))),
        ("model_id", f"<code>{_known(record.get('model_id'))}</code> ({_known(record.get('mode'))})"),
        ("started / finished", f"{_known(record.get('started_at'))} / {_known(record.get('finished_at'))}"),
        ("rows", f"{_known(rows.get('total'))} in all, {_known(rows.get('sent_to_model'))} sent to the model"),
        ("counts by status", esc(", ".join(f"{k} {v}" for k, v in (record.get("counts") or {}).items()) or "–")),
        ("shards", f"{_known(shards.get('total'))} ({_known(shards.get('run'))} run, {_known(shards.get('skipped'))} skipped)"),
        ("throughput", f"{_known(throughput)} img/s" if throughput else "– (no row was scored by this attempt)"),
        ("thresholds", f"image {_known(th.get('image'))}, pixel {_known(th.get('pixel'))}, min region "
                       f"{_known(th.get('min_region_px'))} px"),
        ("classes", esc(", ".join(map(str, record.get("classes") or [])))),
    ]
    return _table(["latest run record", ""], ([f"<b>{k}</b>", v] for k, v in facts))


def index_page(record: Mapping[str, Any] | None, lots: Sequence[LotRow],
               by_status: Sequence[tuple[str, int, str | None, str | None]],
               out_of_control: Mapping[str, Sequence[str]] | None = None) -> bytes:
    """The run summary, rows by status with one example error each, and the lots with links to their pages
    (``out_of_control``: the classes of each lot beyond its control limits, from ``OUT/excursions/``)."""
    flagged = out_of_control or {}
    status_rows = ([esc(s), str(n), f'<span class="msg">{esc(m)}</span>' if m else "",
                    f"<code>{esc(lot)}</code>" if lot is not None else ""] for s, n, m, lot in by_status)
    lot_rows = ([f'<a href="{href(lot_page_name(r.lot_id))}">{esc(r.lot_id)}</a>', str(r.n_images), str(r.n_ok),
                 str(r.n_images - r.n_ok), str(r.n_defect), _pct(r.n_defect, r.n_ok),
                 esc(", ".join(f"{c} {n}" for c, n in r.pareto[:3]) or "–"),
                 f'<b class="excursion">{esc(", ".join(flagged[r.lot_id]))}</b>' if r.lot_id in flagged else "–"]
                for r in lots)
    excursions = (f'\n<p><b class="excursion">{len(flagged)} lot(s) out of control</b> (p-chart of the trailing '
                  "lots, <code>excursions/</code>): listed first.</p>" if flagged else "")
    body = (
        "<h1>semclip-batch report</h1>\n<h2>Run</h2>\n" + _run_summary(record)
        + "\n<h2>Rows by status</h2>\n" + _table(["status", "rows", "example error", "lot of the example"],
                                                  status_rows, numeric=(1,))
        + f"\n<h2>Lots ({len(lots)})</h2>" + excursions + "\n"
        + _table(["lot", "images", "ok", "errors", "defective", "defect rate", "main defect classes",
                  "out of control"], lot_rows, numeric=(1, 2, 3, 4, 5))
    )
    return _page("semclip-batch report", body)


def _wafer_card(wafer: Wafer, image: str | None, assets: str, palette: Palette) -> str:
    dies = Counter(wafer.dominant(palette).values())
    rows = [[_swatch(palette, k), str(wafer.frames[k]), str(dies[k])] for k in palette.order if wafer.frames[k]]
    rows.append(["<b>all</b>", str(sum(wafer.frames.values())), str(len(wafer.dies))])
    placed = sum(sum(c.values()) for c in wafer.dies.values())
    unplaced = sum(wafer.frames.values()) - placed
    pic = (f'<img src="{href(assets, image)}" alt="wafer map of wafer {esc(wafer.wafer_id)}">' if image
           else '<p class="note">No die positions (die_x, die_y) in these rows: no map.</p>')
    note = (f'<p class="muted">{unplaced} frame(s) without a die position are counted here, not on the map.</p>'
            if unplaced and image else "")
    return (f'<div class="card"><h3>Wafer <code>{esc(wafer.wafer_id)}</code></h3>{pic}'
            + _table(["category", "frames", "dies (dominant)"], rows, numeric=(1, 2)) + note + "</div>")


def _tile(tile: Tile, assets: str) -> str:
    row = tile.row
    pic = (f'<img src="{href(assets, tile.image)}" alt="overlay of {esc(row.image_id)}" width="240">' if tile.image
           else '<div class="placeholder">neither the frame nor its mask<br>could be read</div>')
    label = f"<b>{esc(row.defect_class)}</b>" if row.is_defect and row.defect_class else "not flagged"
    die = f"die ({esc(row.die_x)}, {esc(row.die_y)})" if row.die_x is not None and row.die_y is not None else "no die"
    notes = "".join(f'<div class="note">{esc(n)}</div>' for n in tile.notes)
    return (f'<figure class="card">{pic}<figcaption>{label} · score {row.anomaly_score:.3f}<br>'
            f'wafer <code>{esc(row.wafer_id)}</code> · {die}<br><code>{esc(row.image_id)}</code>{notes}'
            "</figcaption></figure>")


def lot_page(lot: Lot, palette: Palette, charts: LotCharts, tiles: Sequence[Tile]) -> bytes:
    """Summary, Pareto of defect classes, defect rate per wafer, wafer maps, overlays of the top-N frames."""
    assets = assets_folder(lot.lot_id)
    n_images = sum(lot.statuses.values())
    n_ok = lot.statuses["ok"]
    counts = lot.class_counts()
    n_defect = sum(counts[c] for c in palette.defects)
    summary = _table(["images", "ok", "errors", "defective", "defect rate", "wafers"],
                     [[str(n_images), str(n_ok), str(n_images - n_ok), str(n_defect), _pct(n_defect, n_ok),
                       str(len(lot.wafers))]], numeric=(0, 1, 2, 3, 4, 5))
    pareto = (f'<img src="{href(assets, charts.pareto)}" alt="Pareto chart of defect classes">' if charts.pareto
              else "<p>No defective frames in this lot.</p>")
    rate = (f'<img src="{href(assets, charts.rate)}" alt="defect rate per wafer">' if charts.rate else "<p>No rows.</p>")
    cards = "".join(_wafer_card(w, img, assets, palette) for w, img in zip(lot.wafers, charts.wafers, strict=True))
    top = "".join(_tile(t, assets) for t in tiles) or "<p>No ok frames in this lot.</p>"
    body = (
        f'<p><a href="index.html">← all lots</a></p>\n<h1>Lot <code>{esc(lot.lot_id)}</code></h1>\n{summary}'
        f'\n<h2>Defect classes</h2>\n<div class="grid"><div class="card"><h3>Pareto: defective frames by class</h3>'
        f'{pareto}</div><div class="card"><h3>Defect rate per wafer</h3>{rate}</div></div>'
        f'\n<h2>Wafer maps</h2>\n<p class="muted">Each die is coloured by its dominant defect class (most frames; '
        f"ties in the run's class order), normal when none of its frames was flagged; "
        f"{esc(palette.label(ERROR))} when no frame of it was scored. White squares: die positions without a frame."
        f'</p>\n<div class="grid">{cards}</div>'
        f"\n<h2>Most anomalous frames (top {len(tiles)} ok frames by anomaly_score)</h2>\n"
        '<p class="muted">Outlined and tinted red: the defect pixels (stored mask ≥ the pixel threshold). Where the '
        f'frame cannot be read, the stored mask itself is shown (brighter = more anomalous).</p>\n'
        f'<div class="grid">{top}</div>'
    )
    return _page(f"Lot {lot.lot_id}", body)
