"""``semclip-batch``: the click CLI, a thin layer over the library. User mistakes end in one line, exit != 0."""

from __future__ import annotations

import logging
from typing import Any

import click

from semclip_batch.cli.archive_commands import export, manifest
from semclip_batch.cli.fewshot_commands import pretrain, train
from semclip_batch.cli.options import (
    parse_storage_options,
    print_result,
    report_flag,
    run_config,
    run_options,
    storage_option_flag,
    user_errors,
    write_report_line,
)
from semclip_batch.cli.progress import row_progress
from semclip_batch.config import (
    DEFAULT_REPORT_TOP_N,
    DEFAULT_STALE_AFTER_S,
    configure_logging,
)
from semclip_batch.pipeline.native_stderr import split_stderr


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def main(verbose: int) -> None:
    """SEM-CLIP defect segmentation and classification for archived SEM lots, on Ray.

    \b
    Example:
      semclip-batch synth data/ && semclip-batch run data/manifest.csv --out out/ \\
          --backbone semclip-tiny --pretrained none
    """
    level = logging.WARNING - 10 * min(verbose, 2)
    split_stderr()  # first: Python's output keeps the terminal when a private Ray moves native lines to its log
    configure_logging(level)


@main.command()
@click.argument("out")
@click.option("--family", default="classic", show_default=True,
              type=click.Choice(["classic", "logic", "contacts", "metal", "mixed"]),
              help="Kind of data: classic (the original lines/contacts, 200-320 px); logic (Manhattan routing, "
                   "512-1024 px, 3-10 px defects, charging); contacts (hole arrays, 480-640 px, 8-30 px defects, "
                   "scan drift, dark and noisy); metal (wide lines, 400-900 px, 20-60 px defects, grain, blur); "
                   "mixed (one of logic/contacts/metal per frame, 256-1024 px).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--lots", default=2, show_default=True, type=int)
@click.option("--wafers", default=2, show_default=True, type=int, help="Wafers per lot.")
@click.option("--dies", default=4, show_default=True, type=int, help="Dies per wafer.")
@click.option("--per-class", default=2, show_default=True, type=int, help="Images per class per lot.")
@click.option("--sizes", default=None, help="Frame sizes HxW, cycled.  [default: the family's; classic: "
                                            "256x256,240x320,300x200]")
@click.option("--formats", default="png,tif", show_default=True, help="png and/or tif, cycled.")
@click.option("--bits", default=None, help="8 and/or 16 (12 significant bits), cycled.  [default: the family's; "
                                           "classic: 8,16]")
@click.option("--banner-frac", default=None, type=float,
              help="Share of frames with an info banner.  [default: the family's; classic: 0.3]")
@click.option("--defect-px", default=None,
              help="Defect size range LO-HI in px at frame resolution, e.g. 3-10 (not classic; with mixed, every "
                   "member takes it; particles and holes are never drawn under 4-5 px across).  [default: the "
                   "family's]")
@user_errors
def synth(out: str, family: str, seed: int, lots: int, wafers: int, dies: int, per_class: int, sizes: str | None,
          formats: str, bits: str | None, banner_frac: float | None, defect_px: str | None) -> None:
    """Write synthetic SEM lots (images, masks, reference frames, manifest.csv/.parquet) to OUT.

    \b
    Example:
      semclip-batch synth data/ --seed 3 --lots 2 --per-class 4 --sizes 512x512,480x640
      semclip-batch synth logic/ --family logic --per-class 4
    """
    from semclip_batch.errors import ConfigError
    from semclip_batch.synth.generate import SynthConfig, parse_defect_px, parse_sizes
    from semclip_batch.synth.generate import synth as make

    bit_list = None
    if bits is not None:
        try:
            bit_list = tuple(int(b) for b in bits.split(",") if b)
        except ValueError:
            raise ConfigError(f"--bits {bits!r}: expected 8 and/or 16") from None
    cfg = SynthConfig(seed=seed, lots=lots, wafers=wafers, dies=dies, per_class=per_class,
                      sizes=None if sizes is None else parse_sizes(sizes),
                      formats=tuple(f.strip().lower() for f in formats.split(",") if f), bits=bit_list,
                      banner_frac=banner_frac, family=family,
                      defect_px=None if defect_px is None else parse_defect_px(defect_px))
    manifest = make(out, cfg)
    click.echo(f"wrote {len(manifest)} images in {manifest['lot_id'].nunique()} lots; manifest: {out}/manifest.csv")


@main.command()
@run_options
@report_flag
@user_errors
def run(report: bool, **options: Any) -> None:
    """Score every row of a manifest (CSV/Parquet) or image folder INPUT into OUT.

    \b
    Example:
      semclip-batch run data/manifest.csv --out out/ --backbone semclip-tiny --pretrained none
      semclip-batch run s3://fab/lot42/ --pattern '{lot_id}/{wafer_id}/{name}.{ext}' --out s3://fab/out \\
          --pretrained s3://models/vit-b-16-plus-240.safetensors --actors 4 --num-gpus 1
    """
    from semclip_batch.pipeline.driver import run as run_pipeline

    with row_progress("scored", "img") as progress:
        result = run_pipeline(run_config(**options), progress=progress)
    print_result(result.record, result.out)
    if report:
        write_report_line(result.out, options["storage_option"])


@main.command()
@click.argument("out")
@storage_option_flag
@report_flag
@user_errors
def aggregate(out: str, storage_option: tuple[str, ...], report: bool) -> None:
    """Per (lot, wafer, class) defect statistics of OUT's predictions -> OUT/lot_stats/.

    \b
    Example:
      semclip-batch aggregate out/
    """
    from semclip_batch.analysis.aggregate import aggregate as make_stats

    stats = make_stats(out, parse_storage_options(storage_option))
    click.echo(f"wrote {len(stats)} rows for {stats['lot_id'].nunique()} lots to {out.rstrip('/')}/lot_stats")
    if report:
        write_report_line(out, storage_option)


@main.command()
@click.argument("out")
@click.option("--top-n", default=DEFAULT_REPORT_TOP_N, show_default=True, type=int,
              help="Overlay thumbnails per lot: the lot's most anomalous ok frames.")
@click.option("--workers", type=int, default=None,
              help="Processes drawing lot pages, from 8 lots on, never more than lots [default: one per CPU this "
                   "process may use, at most 8; 1: one process].")
@storage_option_flag
@user_errors
def report(out: str, top_n: int, workers: int | None, storage_option: tuple[str, ...]) -> None:
    """Write static lot reports (HTML + PNG) to OUT/reports/ and print the path of its index.html.

    index.html: the latest run's summary, rows by status with an example error each, the lots. One page per lot:
    wafer maps, Pareto chart of defect classes, defect rate per wafer, overlays of the top-N frames.

    \b
    Example:
      semclip-batch report out/ --top-n 8
      chromium out/reports/index.html
    """
    from semclip_batch.analysis.report import write_report

    with row_progress("report", "lot", plain=False) as progress:
        index = write_report(out, top_n=top_n, storage_options=parse_storage_options(storage_option), progress=progress,
                             workers=workers)
    click.echo(index)


@main.command()
@click.argument("out")
@click.argument("sql")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True,
              help="json: one array of objects, valid JSON (NaN and infinities as null, dates ISO 8601).")
@storage_option_flag
@user_errors
def query(out: str, sql: str, fmt: str, storage_option: tuple[str, ...]) -> None:
    """Run SQL (DuckDB) over OUT: views `predictions` and `lot_stats` (lot_id VARCHAR). The last statement's
    result is printed; SQL that holds no statement is refused.

    \b
    Example:
      semclip-batch query out/ "select lot_id, count(*) from predictions group by 1" --format csv
    """
    from semclip_batch.analysis.query import render, run_query

    click.echo(render(run_query(out, sql, parse_storage_options(storage_option)), fmt), nl=False)


@main.command()
@click.argument("out")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--stale-after", type=float, default=DEFAULT_STALE_AFTER_S / 60, show_default=True,
              help="Minutes without a new done marker or part after which an attempt whose record still says "
                   "`running` is reported as likely killed.")
@storage_option_flag
@user_errors
def status(out: str, fmt: str, stale_after: float, storage_option: tuple[str, ...]) -> None:
    """Where OUT stands: runs and attempts (running, likely killed, complete, failed), shards done / total, rows by
    status, errors by kind with an example each, throughput.

    \b
    Example:
      semclip-batch status out/
      semclip-batch status s3://fab-results/lot42 --format json --storage-option endpoint_url=http://minio:9000
    """
    from semclip_batch.analysis.status import out_status
    from semclip_batch.analysis.status_text import render
    from semclip_batch.errors import ConfigError

    if not stale_after > 0:
        raise ConfigError(f"--stale-after must be a positive number of minutes, got {stale_after}")
    st = out_status(out, parse_storage_options(storage_option), stale_after_s=60 * stale_after)
    click.echo(render(st, fmt), nl=False)


@main.command()
@click.argument("out")
@click.option("--n", "n", default=50, show_default=True, type=int, help="Frames to suggest.")
@click.option("--out", "dest", required=True,
              help="Manifest to write: .csv or .parquet, local path or fsspec URL (label column left empty).")
@click.option("--exclude", multiple=True, metavar="MANIFEST",
              help="Manifest of frames labelled already (repeatable); the run's own labelled rows and its checkpoint's "
                   "support rows are skipped anyway.")
@click.option("--shortlist", default=1, show_default=True, type=int,
              help="1: the N most informative frames, near-duplicates skipped (chosen on the validation family); "
                   "K > 1: a diverse N (informativeness x embedding distance) among the K x N most informative.")
@click.option("--seed", default=0, show_default=True, type=int, help="Breaks ties; same OUT and seed, same manifest.")
@click.option("--overwrite", is_flag=True, help="Replace the manifest at --out if it exists.")
@storage_option_flag
@user_errors
def suggest(out: str, n: int, dest: str, exclude: tuple[str, ...], shortlist: int, seed: int, overwrite: bool,
            storage_option: tuple[str, ...]) -> None:
    """Suggest the N frames of a finished run in OUT whose labels would teach the model most: uncertain class
    scores, scores and map peaks near the run's thresholds; no two alike in the backbone's image embedding. Writes
    a manifest (uri, lot_id, wafer_id, image_id, die_x, die_y, reference_uri, label, mask_uri, suggest_rank,
    suggest_reason): fill `label` (and optionally `mask_uri`), then give it to `train`. Error rows and frames
    labelled already (in the run's manifest, its checkpoint's support set, or --exclude) are never suggested.

    \b
    Example:
      semclip-batch suggest out/ --n 50 --out to-label.csv
      semclip-batch train to-label.csv --out ckpt2/ --backbone semclip-tiny --pretrained sem-tiny.safetensors
    """
    from semclip_batch.analysis.suggest import SuggestConfig
    from semclip_batch.analysis.suggest import suggest as suggest_frames

    result = suggest_frames(SuggestConfig(out=out, dest=dest, n=n, seed=seed, overwrite=overwrite, shortlist=shortlist,
                                          exclude=exclude, storage_options=parse_storage_options(storage_option)))
    skipped = f", {result.excluded} labelled already skipped" if result.excluded else ""
    click.echo(f"wrote {dest}: {len(result.rows)} of {result.candidates} unlabelled ok frames{skipped}; "
               f"frames compared by {result.diversity}")


@main.command(name="eval")
@click.argument("out")
@click.option("--truth", required=True, help="Manifest with label and/or mask_uri (the one that was run, or a subset).")
@storage_option_flag
@user_errors
def eval_cmd(out: str, truth: str, storage_option: tuple[str, ...]) -> None:
    """Score OUT's predictions against ground truth -> OUT/metrics.json and a printed table.

    \b
    Example:
      semclip-batch eval out/ --truth data/manifest.csv
    """
    from semclip_batch.analysis.evaluate import evaluate, metrics_table

    with row_progress("evaluated", "img", plain=False) as progress:  # no lines off a terminal, as before
        metrics = evaluate(out, truth, parse_storage_options(storage_option), progress=progress)
    click.echo(metrics_table(metrics))
    click.echo(f"wrote {out.rstrip('/')}/metrics.json")


@main.command()
@click.argument("dir", default="./demo-out", required=False)
@click.option("--backbone", default="semclip-tiny", show_default=True, help="Backbone for the demo run.")
@click.option("--pretrain", "with_pretrain", is_flag=True,
              help="Pretrain the backbone first (short schedule, ~3 min, cached in DIR) instead of using the shipped "
                   "semclip-tiny weights.")
@user_errors
def demo(dir: str, backbone: str, with_pretrain: bool) -> None:
    """Run every step on synthetic lots in DIR: synth, train on the shipped weights, run, eval, aggregate, report,
    summary (with --pretrain: a short pretraining first).

    \b
    Example:
      semclip-batch demo ./demo-out
    """
    from semclip_batch.demo import run_demo

    for line in run_demo(dir, backbone=backbone, with_pretrain=with_pretrain):
        click.echo(line)


main.add_command(manifest)
main.add_command(export)
main.add_command(pretrain)
main.add_command(train)
