"""``semclip-batch``: the click CLI, a thin layer over the library. User mistakes end in one line, exit != 0."""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from semclip_batch.cli.options import (
    MethodChoice,
    default_scale_policy,
    model_options,
    parse_reference_weight,
    parse_storage_options,
    pretrain_steps,
    print_result,
    report_flag,
    run_config,
    run_options,
    scale_policy_option,
    self_similarity_option,
    storage_option_flag,
    user_errors,
    write_report_line,
)
from semclip_batch.cli.progress import loss_progress, row_progress
from semclip_batch.config import (
    DEFAULT_ADAPT_BELOW,
    DEFAULT_ADAPT_LR,
    DEFAULT_ADAPT_STEPS,
    DEFAULT_BACKBONE,
    DEFAULT_KEEP_TOKENS,
    DEFAULT_PRETRAIN_BATCH,
    DEFAULT_PRETRAIN_CROPS,
    DEFAULT_PRETRAIN_HELDOUT,
    DEFAULT_PRETRAIN_LR,
    DEFAULT_PRETRAIN_MINUTES,
    DEFAULT_PRETRAIN_STEPS,
    DEFAULT_REFERENCE_FUSION,
    DEFAULT_REFERENCE_WEIGHT,
    DEFAULT_REPORT_TOP_N,
    DEFAULT_STALE_AFTER_S,
    LOG_FORMAT,
    REFERENCE_FUSIONS,
    SCORE_MODES,
    ModelSpec,
    parse_scale_policy,
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
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr)


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


@main.group()
def manifest() -> None:
    """Make manifests: list an archive prefix once, or read the KLARF files inspection tools write."""


@manifest.command("from-prefix")
@click.argument("url")
@click.option("--pattern", default="{lot_id}/{wafer_id}/{name}.{ext}", show_default=True,
              help="Key pattern below URL; fields lot_id, wafer_id (required), name, ext, die_x, die_y, defect_id, "
                   "image_id.")
@click.option("--out", required=True, help="Manifest to write: .csv or .parquet, local path or fsspec URL.")
@storage_option_flag
@user_errors
def from_prefix_cmd(url: str, pattern: str, out: str, storage_option: tuple[str, ...]) -> None:
    """List every key under URL once (streamed, one folder at a time) into a manifest for `run`.

    \b
    Example:
      semclip-batch manifest from-prefix s3://fab-archive/2024/ --pattern '{lot_id}/{wafer_id}/{name}.{ext}' \\
          --out s3://fab-archive/manifests/2024.parquet
    """
    from semclip_batch.io.listing import from_prefix

    listed = from_prefix(url, pattern, out, parse_storage_options(storage_option))
    skipped = ""
    if listed.unmatched:
        skipped = f"; skipped {listed.unmatched} key(s) not matching the pattern, e.g. {listed.unmatched_example}"
    if listed.hidden:
        skipped += f"; skipped {listed.hidden} hidden file(s)"
    click.echo(f"wrote {out}: {listed.rows} rows{skipped}")


@manifest.command("from-klarf")
@click.argument("klarf", nargs=-1, required=True)
@click.option("--images", required=True,
              help="Folder or prefix (local path or fsspec URL) holding the TIFF files the KLARFs' TiffFileName name.")
@click.option("--out", required=True, help="Manifest to write: .csv or .parquet, local path or fsspec URL.")
@click.option("--class-map", default=None,
              help="CSV class_number,label (or JSON {number: label}): KLARF CLASSNUMBER -> our class, for `label`.")
@click.option("--all-images", is_flag=True, help="One row per listed image of a defect (default: its first image).")
@click.option("--image-name", default=None,
              help="For defects without an image list: their file below --images, e.g. '{wafer_id}/{defect_id}.tif' "
                   "(fields lot_id wafer_id defect_id die_x die_y index; index = position in the wafer's list).")
@storage_option_flag
@user_errors
def from_klarf_cmd(klarf: tuple[str, ...], images: str, out: str, class_map: str | None, all_images: bool,
                   image_name: str | None, storage_option: tuple[str, ...]) -> None:
    """KLARF 1.1 / 1.2 defect files (klarf-reader parses them) into a manifest for `run`, `train` and `eval`.

    One row per defect with an image: lot, wafer, die XINDEX/YINDEX, DEFECTID, the wafer's TiffFileName under
    --images with page = image number - 1, CLASSNUMBER as `label` through --class-map, ResultTimestamp as lot_time.

    \b
    Example:
      semclip-batch manifest from-klarf s3://fab/klarf/LOT42.001 --images s3://fab/review/LOT42/ \\
          --class-map classes.csv --out lot42.csv
    """
    from semclip_batch.io.klarf import read_class_map
    from semclip_batch.io.klarf_manifest import from_klarf

    so = parse_storage_options(storage_option)
    mapping = read_class_map(class_map, so) if class_map else None
    made = from_klarf(list(klarf), images, out, mapping, all_images=all_images, image_name=image_name,
                      storage_options=so)
    notes = ""
    if made.without_images:
        notes += f"; skipped {made.without_images} defect(s) without an image (--image-name names one file per defect)"
    if made.unmapped:
        listed = ", ".join(f"{k} ({n})" for k, n in list(made.unmapped.items())[:10])
        notes += f"; class numbers not in the class map, label left empty: {listed}"
    click.echo(f"wrote {out}: {made.rows} rows from {made.defects} defects on {made.wafers} wafer(s){notes}")


@main.group()
def export() -> None:
    """Write results in the formats other tools read."""


@export.command("klarf")
@click.argument("out")
@click.option("--lot", "lot_id", required=True, help="The lot to export (its lot_id as written).")
@click.option("--out", "dest", required=True, help="KLARF file to write (local path or fsspec URL).")
@click.option("--class-map", default=None,
              help="The class map `manifest from-klarf` took: our class -> its (first) KLARF class number. "
                   "[default: the run's classes numbered from 1]")
@click.option("--klarf", "source", default=None,
              help="The lot's original KLARF: written back with only CLASSNUMBER changed (default: a new KLARF 1.2).")
@storage_option_flag
@user_errors
def export_klarf_cmd(out: str, lot_id: str, dest: str, class_map: str | None, source: str | None,
                     storage_option: tuple[str, ...]) -> None:
    """One lot's classes as KLARF 1.2 CLASSNUMBER values, for the fab's yield tools.

    \b
    Example:
      semclip-batch export klarf out/ --lot LOT42 --klarf s3://fab/klarf/LOT42.001 --class-map classes.csv \\
          --out LOT42.semclip.001
    """
    from semclip_batch.analysis.klarf_export import export_klarf
    from semclip_batch.io.klarf import read_class_map

    so = parse_storage_options(storage_option)
    mapping = read_class_map(class_map, so) if class_map else None
    done = export_klarf(out, lot_id, dest, class_map=mapping, source=source, storage_options=so)
    notes = f"; {done.kept} defect(s) not scored kept their class" if source else ""
    if done.error_rows:
        notes += f"; {done.error_rows} error row(s) without a class"
    if done.unnumbered:
        notes += "; written as 0 (no number in the class map): " + ", ".join(
            f"{name} ({n})" for name, n in done.unnumbered.items())
    if done.renumbered:
        notes += "; defect ids were not integers: numbered 1.. per wafer"
    click.echo(f"wrote {dest}: {done.defects} defect(s) classified{notes}")


@main.command()
@click.argument("out")
@click.argument("sql")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@storage_option_flag
@user_errors
def query(out: str, sql: str, fmt: str, storage_option: tuple[str, ...]) -> None:
    """Run SQL (DuckDB) over OUT: views `predictions` and `lot_stats` (lot_id VARCHAR).

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
@click.argument("manifest")
@click.option("--out", required=True, help="The weights file to write (.safetensors, any fsspec URL).")
@model_options
@click.option("--steps", default=None, metavar="N|auto",
              help="Optimiser steps, fewer if --max-minutes would be overrun, or 'auto': as many as fit in "
                   "--max-minutes (timed on the first 20; a step of 32 took 0.15-0.5 s for semclip-tiny on 2 CPU "
                   f"cores).  [default: auto; with --max-minutes 0: {DEFAULT_PRETRAIN_STEPS}]")
@click.option("--max-minutes", default=DEFAULT_PRETRAIN_MINUTES, show_default=True, type=float,
              help="Wall-clock budget, loading and the held-out and scale checks included: the first 20 steps are timed and the "
                   "schedule is laid over the steps that fit (fewer than a --steps N: a warning says so). 0: none.")
@click.option("--batch-size", default=DEFAULT_PRETRAIN_BATCH, show_default=True, type=int)
@click.option("--lr", default=DEFAULT_PRETRAIN_LR, show_default=True, type=float)
@click.option("--crops", default=DEFAULT_PRETRAIN_CROPS, show_default=True, type=int,
              help="Crops per frame larger than the model input (native resolution, then half), around a defect: "
                   "small defects of large frames seen at their size. 0: whole frames only.")
@click.option("--text-separation", default=0.0, show_default=True, type=float,
              help="Weight of a term pushing the classes' text embeddings apart (mean squared cosine between "
                   "classes): for archives whose loss sits near chance (a held-out check near 0.5), where a "
                   "randomly initialised text tower embeds every class alike. 0: off.")
@click.option("--keep-tokens", default=DEFAULT_KEEP_TOKENS, show_default=True, type=float,
              help="Fraction of each image's patch tokens a step runs (token dropping; patches touching a defect "
                   "go first, the rest at random). 1 runs every patch.")
@click.option("--heldout", default=DEFAULT_PRETRAIN_HELDOUT, show_default=True, type=float,
              help="Share of the frames never trained on, for the check printed at the end and the scale check "
                   "(none are held out below 20 frames). 0: every frame trains, e.g. to adapt a backbone to a "
                   "70-frame support set (train --adapt-steps does it inside train; README: \"The backbone adapted "
                   "on the support frames\").")
@click.option("--scale-check/--no-scale-check", default=True, show_default=True,
              help="After training, score up to 100 held-out frames zero-shot as run does at each scale policy "
                   "(whole, 0.5, 0.75, native) and record the cheapest within 0.01 pixel AUROC of the best in the "
                   "weights file: run and train use it when --scale-policy is not given.")
@user_errors
def pretrain(manifest: str, out: str, backbone: str | None, pretrained: str | None, pretrained_sha256: str | None,
             seed: int, prompts: str | None, storage_option: tuple[str, ...],
             steps: str | None, max_minutes: float, batch_size: int, lr: float, crops: int, text_separation: float,
             keep_tokens: float, heldout: float, scale_check: bool) -> None:
    """Adapt a backbone to SEM images (dense patch-text alignment) and write its weights to --out.

    Text comes from the prompt file per `label` (or a `caption` column). Prints the canonical sha256 last.

    \b
    Example:
      semclip-batch pretrain data/manifest.csv --out sem-tiny.safetensors --backbone semclip-tiny --steps 200
    """
    from semclip_batch.fewshot.pretrain import PretrainConfig, heldout_table
    from semclip_batch.fewshot.pretrain import pretrain as run_pretrain

    plan, fill = pretrain_steps(steps, max_minutes)
    cfg = PretrainConfig(manifest=manifest, out=out, steps=plan, fill_budget=fill, max_minutes=max_minutes,
                         batch_size=batch_size, lr=lr, keep=keep_tokens, crops=crops, separation=text_separation,
                         heldout=heldout, scale_check=scale_check,
                         model=ModelSpec(backbone=backbone or DEFAULT_BACKBONE, pretrained=pretrained or "none",
                                         pretrained_sha256=pretrained_sha256, seed=seed, prompts=prompts,
                                         storage_options=parse_storage_options(storage_option)))
    with loss_progress("step", "pretrain") as progress:
        result = run_pretrain(cfg, progress=progress)
    for line in heldout_table(result):
        click.echo(line)
    if result.scale_check is not None:
        for line in result.scale_check.lines():
            click.echo(line)
    click.echo(f"{result.steps} steps" + (" (--steps auto)" if fill else "")
               + f", {result.seconds:.0f} s of training and the final check")
    click.echo(f"wrote {out}")
    click.echo(result.sha256)


@main.command()
@click.argument("support")
@click.option("--out", required=True, help="Checkpoint folder to write (any fsspec URL).")
@model_options
@click.option("--cache-dir", default=None,
              help="Cache the frozen backbone's features of the support frames here (keyed by content and weights "
                   "checksum; local path or fsspec URL). Nothing is cached without it.")
@click.option("--method", type=MethodChoice(), default="semclip", show_default=True,
              help="SEM-CLIP, or a baseline it is measured against: WinCLIP+ or PromptAD (normal images only).")
@click.option("--recipe", type=click.Choice(["transfer", "paper"]), default="transfer", show_default=True,
              help="SEM-CLIP's fitting recipe: transfer (support frames flipped and turned at --scale-policy whole, a "
                   "normal-patch memory fused "
                   "into the map, a head that also reads the most anomalous patches) or paper (Transformation Layers + "
                   "head on the pooled token). Baselines keep their papers' recipes.")
@click.option("--shots", type=int, default=None, help="K images per class, seeded [default: all rows].")
@click.option("--epochs", default=None, type=int, help="[default: 40 for semclip, 100 for promptad; winclip has none]")
@click.option("--lr", default=1e-3, show_default=True, type=float)
@click.option("--adapt-steps", default=None, type=int,
              help="First adapt the backbone on the support frames with pretrain's objective for this many steps "
                   "(200: ~26 s for semclip-tiny on 70 frames here), all but those the fit holds out for its checks; "
                   "the weights go into the checkpoint folder and the maps keep the adapted backbone's own layers. "
                   f"0: a frozen backbone.  [default: {DEFAULT_ADAPT_STEPS} with SEM-CLIP's recipe transfer where the "
                   f"--pretrained weights classify under {DEFAULT_ADAPT_BELOW:g} of the support frames right zero-shot "
                   "(data they do not know), chosen on the validation families (README); else 0, and 0 with paper and "
                   "for the baselines]")
@click.option("--adapt-lr", default=DEFAULT_ADAPT_LR, show_default=True, type=float,
              help="Peak learning rate of --adapt-steps (refused where nothing adapts).")
@click.option("--no-vv", is_flag=True, help="Ablation: original path only.")
@click.option("--no-surgery", is_flag=True, help="Ablation: plain cosine similarities.")
@click.option("--taps", default=None, help="Tapped blocks, e.g. 3,6 [default: L/4, L/2, 3L/4, L].")
@click.option("--cls", "cls_mode", type=click.Choice(["fused", "head", "text"]), default="fused", show_default=True)
@click.option("--score-mode", type=click.Choice(SCORE_MODES), default="mean", show_default=True,
              help="anomaly_score: mean of 1 - p(normal) and the map maximum, or the map maximum only (stored in "
                   "the checkpoint; run applies it).")
@click.option("--sigma", type=float, default=4.0, show_default=True,
              help="Gaussian smoothing of the maps, px at model-input resolution (stored in the checkpoint).")
@click.option("--use-reference", is_flag=True,
              help="Also score patches by distance to each row's reference_uri frame (stored in the checkpoint).")
@click.option("--no-register", is_flag=True,
              help="With --use-reference: compare references as they are, not shifted and intensity-matched onto the "
                   "frame first (stored in the checkpoint).")
@click.option("--reference-fusion", type=click.Choice(REFERENCE_FUSIONS), default=DEFAULT_REFERENCE_FUSION,
              show_default=True,
              help="How the reference map joins its token distances and pixel differences: their mean, or their "
                   "maximum (a particle only the pixel difference sees keeps its score; the README measures both: "
                   "max found more small defects on a held-out routing family and lost F1max on another). Stored "
                   "in the checkpoint.")
@click.option("--reference-weight", default=str(DEFAULT_REFERENCE_WEIGHT), show_default=True,
              help="The reference map's share w of the fused map, (1 - w) * method + w * reference, in [0, 1], or "
                   "'auto': chosen from 0, 0.25 .. 1 on the support frames the fit held out (SEM-CLIP; the baselines "
                   "keep the default). The default was chosen on contact arrays, which the shipped backbone knows; on "
                   "layouts it has not seen the README measured 0.75 beating 0.5, and 'auto' not beating 0.75 on the "
                   "validation families. Stored in the checkpoint.")
@click.option("--self-reference/--no-self-reference", default=None,
              help="Frames without a reference frame are compared with their own pattern shifted by one and two "
                   "periods (cell-to-cell, where the pattern repeats; stored in the checkpoint) [default: on with "
                   "SEM-CLIP's recipe transfer; off with paper and for the baselines].")
@scale_policy_option("[default: the one the --pretrained weights' scale check recommends (pretrain), else whole; "
                     "stored in the checkpoint, run scores with it]")
@self_similarity_option("[default: with SEM-CLIP's recipe transfer chosen on the support frames with the memory's "
                        "weight (0, 0.25 .. 1 or 0.8), 0 with paper; a given W is used as given; baselines have none; "
                        "stored in the checkpoint]")
@user_errors
def train(support: str, out: str, backbone: str | None, pretrained: str | None, pretrained_sha256: str | None,
          seed: int, prompts: str | None, storage_option: tuple[str, ...], cache_dir: str | None,
          method: str, recipe: str, shots: int | None, epochs: int | None, lr: float, adapt_steps: int | None,
          adapt_lr: float, no_vv: bool, no_surgery: bool,
          taps: str | None, cls_mode: str, score_mode: str, sigma: float, use_reference: bool,
          no_register: bool, reference_fusion: str, reference_weight: str, self_reference: bool | None,
          scale_policy: str | None, self_similarity: float | None) -> None:
    """Few-shot SEM-CLIP (or a baseline) from a labelled SUPPORT manifest -> checkpoint (with the default recipe
    the backbone is first adapted on it where the weights do not know its frames, --adapt-steps).

    \b
    Examples:
      semclip-batch train support.csv --out ckpt/ --backbone semclip-tiny --pretrained sem-tiny.safetensors --shots 10
      semclip-batch train support.csv --out ckpt-winclip/ --method winclip --pretrained sem-tiny.safetensors --shots 10
    """
    from click.core import ParameterSource

    from semclip_batch.errors import ConfigError
    from semclip_batch.fewshot.adapt import adaptation_lines, default_adapt_steps
    from semclip_batch.fewshot.recipes import applied, get_recipe, with_self_reference, with_self_similarity
    from semclip_batch.fewshot.train import TrainConfig
    from semclip_batch.fewshot.train import train as run_train
    from semclip_batch.methods.registry import get_method
    from semclip_batch.methods.weight_choice import describe_choice

    if pretrained is None:
        raise ConfigError("train needs --pretrained (a weights path/URL, 'shipped', or 'none' for seeded random weights)")
    try:
        tap_list = tuple(int(t) for t in taps.split(",")) if taps else None
    except ValueError:
        raise ConfigError(f"--taps {taps!r}: expected block numbers such as 3,6") from None
    weight = parse_reference_weight(reference_weight)  # None: auto
    so = parse_storage_options(storage_option)
    policy = scale_policy or default_scale_policy(backbone or DEFAULT_BACKBONE, pretrained, so)
    cfg = TrainConfig(support=support, out=out, shots=shots, epochs=epochs, lr=lr, cache_dir=cache_dir,
                      adapt_steps=default_adapt_steps(method, recipe) if adapt_steps is None else adapt_steps,
                      adapt_lr=adapt_lr, adapt_below=DEFAULT_ADAPT_BELOW if adapt_steps is None else None,
                      recipe=with_self_similarity(with_self_reference(get_recipe(recipe), self_reference),
                                                  self_similarity),
                      choose_reference_weight=weight is None, policy_from_weights=scale_policy is None,
                      model=ModelSpec(backbone=backbone or DEFAULT_BACKBONE, pretrained=pretrained,
                                      pretrained_sha256=pretrained_sha256, seed=seed, prompts=prompts, taps=tap_list,
                                      use_vv=not no_vv, surgery=not no_surgery, cls=cls_mode, method=method,
                                      use_reference=use_reference, register_reference=not no_register,
                                      reference_fusion=reference_fusion,
                                      reference_weight=DEFAULT_REFERENCE_WEIGHT if weight is None else weight,
                                      self_reference=bool(self_reference),
                                      score_mode=score_mode, sigma=sigma,
                                      scale_policy=parse_scale_policy(policy), storage_options=so))
    _refuse_unused_reference_options(click.get_current_context(), applied(cfg.recipe, cfg.model))
    if not cfg.adapt_steps and click.get_current_context().get_parameter_source("adapt_lr") not in (
            None, ParameterSource.DEFAULT):
        why = ("--adapt-steps 0" if adapt_steps == 0 else f"--recipe {recipe}" if get_method(method).recipes
               else f"--method {method} (a baseline: a frozen backbone unless --adapt-steps N)")
        raise ConfigError(f"--adapt-lr is the rate of the backbone's adaptation, and with {why} nothing adapts: "
                          "omit it or give --adapt-steps N")
    if self_similarity is not None and not get_method(method).recipes:
        raise ConfigError(f"--self-similarity is a SEM-CLIP option; --method {method} has none: omit it")
    try:
        with (loss_progress("adaptation step", "adapt backbone", unit="step") as adapt_progress,
              loss_progress("epoch", f"train {method}") as progress):
            meta = run_train(cfg, progress=progress, adapt_progress=adapt_progress)
    except ValueError as exc:  # e.g. taps outside the backbone's depth
        raise ConfigError(str(exc)) from None
    th = meta.thresholds
    recipe = "" if meta.recipe == meta.method else f" (recipe {meta.recipe})"
    choice = meta.training.get("reference_weight_choice")
    chosen = "" if choice is None else f"reference weight {meta.reference_weight:g} ({'kept' if 'kept' in choice else 'auto'}), "
    click.echo(f"wrote {meta.method} checkpoint {out}{recipe}: alpha {meta.alpha:.2f}, {chosen}"
               f"temperature {meta.temperature:.1f}, "
               f"thresholds image {th.image:.3f} pixel {th.pixel:.3f}, {meta.training['used']} images, "
               f"{meta.training['seconds']} s")
    weights = describe_choice(meta.training.get("weights_choice") or {})
    if weights is not None:
        click.echo(weights)
    for line in adaptation_lines(meta.training):
        click.echo(line)


def _refuse_unused_reference_options(ctx: click.Context, spec: ModelSpec) -> None:
    """A reference option the model would store and ignore is refused in one line: ``--reference-weight`` and
    ``--reference-fusion`` without any reference (neither ``--use-reference`` nor cell references), and
    ``--no-register`` without ``--use-reference`` (only reference frames are registered)."""
    from click.core import ParameterSource

    from semclip_batch.errors import ConfigError

    given = [f"--{name.replace('_', '-')}" for name in ("reference_weight", "reference_fusion")
             if ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT)]
    if given and not spec.reference_scorer:
        raise ConfigError(f"without references the model ignores {' and '.join(given)}: add --use-reference (a "
                          "reference_uri per row) or --self-reference (cell to cell), or omit it")
    if ctx.params.get("no_register") and not spec.use_reference:
        raise ConfigError("--no-register applies to reference frames only (cell references need no registration): "
                          "add --use-reference or omit it")


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
