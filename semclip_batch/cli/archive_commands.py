"""``semclip-batch manifest`` and ``export``: manifests made from an archive (a prefix listing, KLARF files) and
results written for inspection tools (KLARF); :mod:`semclip_batch.cli.commands` registers them. User mistakes end
in one line, exit != 0."""

from __future__ import annotations

import click

from semclip_batch.cli.options import parse_storage_options, storage_option_flag, user_errors


@click.group()
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
        skipped += f"; skipped {listed.hidden} hidden file(s) or folder(s)"
    if listed.refused:
        skipped += f"; skipped {listed.refused} key(s) whose fields `run` refuses, e.g. {listed.refused_example}"
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
    from semclip_batch.io.klarf_manifest import from_klarf
    from semclip_batch.io.klarf_write import read_class_map

    so = parse_storage_options(storage_option)
    mapping = read_class_map(class_map, so) if class_map else None
    made = from_klarf(list(klarf), images, out, mapping, all_images=all_images, image_name=image_name,
                      class_map_url=class_map, storage_options=so)
    notes = ""
    if made.without_images:
        notes += f"; skipped {made.without_images} defect(s) without an image (--image-name names one file per defect)"
    if made.unmapped:
        listed = ", ".join(f"{k} ({n})" for k, n in list(made.unmapped.items())[:10])
        notes += f"; class numbers not in the class map, label left empty: {listed}"
    click.echo(f"wrote {out}: {made.rows} rows from {made.defects} defects on {made.wafers} wafer(s){notes}")


@click.group()
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
    from semclip_batch.io.klarf_write import read_class_map

    so = parse_storage_options(storage_option)
    mapping = read_class_map(class_map, so) if class_map else None
    done = export_klarf(out, lot_id, dest, class_map=mapping, source=source, class_map_url=class_map,
                        storage_options=so)
    notes = f"; {done.kept} defect(s) not scored kept their class" if source else ""
    if done.error_rows:
        notes += f"; {done.error_rows} error row(s) without a class"
    if done.unnumbered:
        notes += "; written as 0 (no number in the class map): " + ", ".join(
            f"{name} ({n})" for name, n in done.unnumbered.items())
    if done.renumbered:
        notes += "; defect ids were not integers: numbered 1.. per wafer"
    click.echo(f"wrote {dest}: {done.defects} defect(s) classified{notes}")
