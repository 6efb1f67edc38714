"""``semclip-batch``: the click CLI, a thin layer over the library. User mistakes end in one line, exit != 0."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import click

from semclip_batch.config import (
    DEFAULT_BACKBONE,
    DEFAULT_IMAGE_THRESHOLD,
    DEFAULT_KEEP_TOKENS,
    DEFAULT_MIN_REGION_PX,
    DEFAULT_PIXEL_THRESHOLD,
    DEFAULT_PRETRAIN_BATCH,
    DEFAULT_PRETRAIN_LR,
    DEFAULT_PRETRAIN_STEPS,
    DEFAULT_SHARD_SIZE,
    DEFAULT_TILE_ABOVE,
    PRECISIONS,
    ModelSpec,
    RunConfig,
    Thresholds,
)
from semclip_batch.errors import SemclipError, one_line, shorten
from semclip_batch.io.storage import check_storage_options

F = TypeVar("F", bound=Callable[..., Any])
P = ParamSpec("P")
R = TypeVar("R")


def user_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn library errors into one clear line (click prints ``Error: ...`` and exits 1)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except SemclipError as exc:
            raise click.ClickException(shorten(str(exc))) from None
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort, KeyboardInterrupt):
            raise
        except Exception as exc:
            logging.getLogger("semclip_batch").debug("traceback", exc_info=True)
            raise click.ClickException(f"{one_line(exc)} (rerun with -vv for the traceback)") from None

    return wrapper


def parse_storage_options(pairs: tuple[str, ...]) -> dict[str, Any]:
    """``--storage-option KEY=VALUE`` flags, validated (raises :class:`ConfigError`: one line, no usage dump)."""
    from semclip_batch.errors import ConfigError

    opts: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--storage-option {shorten(pair, 60)!r}: expected KEY=VALUE")
        opts[key] = value
    return check_storage_options(opts)


storage_option_flag = click.option(
    "--storage-option", "storage_option", multiple=True, metavar="KEY=VALUE",
    help="Non-secret fsspec storage option (e.g. endpoint_url=...); secrets come from AWS_* env.")


class MethodChoice(click.Choice):
    """``--method``: the registered methods (``methods.registry.method_names``), looked up when first needed so
    that importing the CLI stays free of torch."""

    def __init__(self) -> None:
        super().__init__((), case_sensitive=True)

    @property
    def choices(self) -> tuple[str, ...]:
        from semclip_batch.methods.registry import method_names

        return method_names()

    @choices.setter
    def choices(self, _: object) -> None:
        pass


def model_options(fn: F) -> F:
    """Options shared by commands that build a backbone."""
    options = [
        click.option("--backbone", default=None, help=f"open_clip model name [default: {DEFAULT_BACKBONE}; with --model: "
                                                       "the checkpoint's]."),
        click.option("--pretrained", default=None,
                     help="Backbone weights: local path or fsspec URL (.safetensors / .pt), or 'none' for seeded "
                          "random weights."),
        click.option("--pretrained-sha256", default=None, help="Refuse weights whose sha256 differs (canonical or file)."),
        click.option("--seed", default=0, show_default=True, type=int, help="Seed for random weights and sampling."),
        click.option("--prompts", default=None, help="Prompt file (JSON: templates x states per class)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return storage_option_flag(fn)


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
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@main.command()
@click.argument("out")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--lots", default=2, show_default=True, type=int)
@click.option("--wafers", default=2, show_default=True, type=int, help="Wafers per lot.")
@click.option("--dies", default=4, show_default=True, type=int, help="Dies per wafer.")
@click.option("--per-class", default=2, show_default=True, type=int, help="Images per class per lot.")
@click.option("--sizes", default="256x256,240x320,300x200", show_default=True, help="Frame sizes HxW, cycled.")
@click.option("--formats", default="png,tif", show_default=True, help="png and/or tif, cycled.")
@click.option("--bits", default="8,16", show_default=True, help="8 and/or 16 (12 significant bits), cycled.")
@click.option("--banner-frac", default=0.3, show_default=True, type=float, help="Share of frames with an info banner.")
@user_errors
def synth(out: str, seed: int, lots: int, wafers: int, dies: int, per_class: int, sizes: str, formats: str,
          bits: str, banner_frac: float) -> None:
    """Write synthetic SEM lots (images, masks, reference frames, manifest.csv/.parquet) to OUT.

    \b
    Example:
      semclip-batch synth data/ --seed 3 --lots 2 --per-class 4 --sizes 512x512,480x640
    """
    from semclip_batch.errors import ConfigError
    from semclip_batch.synth.generate import SynthConfig, parse_sizes
    from semclip_batch.synth.generate import synth as make

    try:
        bit_list = tuple(int(b) for b in bits.split(",") if b)
    except ValueError:
        raise ConfigError(f"--bits {bits!r}: expected 8 and/or 16") from None
    cfg = SynthConfig(seed=seed, lots=lots, wafers=wafers, dies=dies, per_class=per_class, sizes=parse_sizes(sizes),
                      formats=tuple(f.strip().lower() for f in formats.split(",") if f), bits=bit_list,
                      banner_frac=banner_frac)
    manifest = make(out, cfg)
    click.echo(f"wrote {len(manifest)} images in {manifest['lot_id'].nunique()} lots; manifest: {out}/manifest.csv")


def _thresholds(threshold: float | None, pixel_threshold: float | None, min_region_px: int | None) -> Thresholds:
    given = {"image": threshold, "pixel": pixel_threshold, "min_region_px": min_region_px}
    return Thresholds(
        image=DEFAULT_IMAGE_THRESHOLD if threshold is None else threshold,
        pixel=DEFAULT_PIXEL_THRESHOLD if pixel_threshold is None else pixel_threshold,
        min_region_px=DEFAULT_MIN_REGION_PX if min_region_px is None else min_region_px,
        source={k: "default" if v is None else "flag" for k, v in given.items()},
    )


def run_options(fn: F) -> F:
    """Every option of ``run`` (shared with ``jobs/process_lots.py``)."""
    options = [
        click.argument("input"),
        click.option("--out", required=True, help="Output root (local path or fsspec URL such as s3://bucket/run)."),
        click.option("--threshold", type=float, default=None,
                     help=f"Image threshold on anomaly_score [default: {DEFAULT_IMAGE_THRESHOLD}]."),
        click.option("--pixel-threshold", type=float, default=None,
                     help=f"Pixel threshold on the map [default: {DEFAULT_PIXEL_THRESHOLD}]."),
        click.option("--min-region-px", type=int, default=None,
                     help=f"Smallest defect region, original pixels [default: {DEFAULT_MIN_REGION_PX}]."),
        click.option("--batch-size", default=16, show_default=True, type=int, help="Model views per forward pass."),
        click.option("--actors", default=1, show_default=True, type=int, help="Model actors (one per GPU on a cluster)."),
        click.option("--num-gpus", default=0.0, show_default=True, type=float, help="GPUs per model actor."),
        click.option("--shard-size", default=DEFAULT_SHARD_SIZE, show_default=True, type=int, help="Rows per work shard."),
        click.option("--tile-above", default=DEFAULT_TILE_ABOVE, show_default=True, type=int,
                     help="Tile frames whose longer side exceeds this (px)."),
        click.option("--pattern", default=None,
                     help="For a folder INPUT: path pattern, e.g. '{lot_id}/{wafer_id}/{name}.{ext}'."),
        click.option("--address", default=None, help="Ray address to attach to (default: a private local Ray)."),
        click.option("--overwrite", is_flag=True, help="Replace the outputs of another run in OUT (keeps runs/)."),
        click.option("--model", "model", default=None,
                     help="Few-shot checkpoint folder/URL from `train` (its thresholds apply unless given as flags)."),
        click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
                     help="Model precision (bf16 is fastest on CPU)."),
    ]
    fn = model_options(fn)
    for option in reversed(options):
        fn = option(fn)
    return fn


def run_config(*, input: str, out: str, model: str | None, backbone: str | None, pretrained: str | None,
               pretrained_sha256: str | None,
               seed: int, prompts: str | None, precision: str, storage_option: tuple[str, ...],
               threshold: float | None, pixel_threshold: float | None, min_region_px: int | None, batch_size: int,
               actors: int, num_gpus: float, shard_size: int, tile_above: int, pattern: str | None,
               address: str | None, overwrite: bool) -> RunConfig:
    """The validated RunConfig for the options of :func:`run_options`."""
    from semclip_batch.errors import ConfigError

    if pretrained is None and model is None:
        raise ConfigError("run needs --pretrained (a weights path/URL, or 'none' for seeded random weights) or --model")
    so = parse_storage_options(storage_option)
    spec = ModelSpec(backbone=backbone if backbone or model else DEFAULT_BACKBONE, pretrained=pretrained,
                     pretrained_sha256=pretrained_sha256, seed=seed, precision=precision, prompts=prompts,
                     checkpoint=model, storage_options=so)
    return RunConfig(input=input, out=out, model=spec, thresholds=_thresholds(threshold, pixel_threshold, min_region_px),
                     tile_above=tile_above, pattern=pattern, shard_size=shard_size, batch_size=batch_size,
                     actors=actors, num_gpus=num_gpus, address=address, overwrite=overwrite, storage_options=so)


@main.command()
@run_options
@user_errors
def run(**options: Any) -> None:
    """Score every row of a manifest (CSV/Parquet) or image folder INPUT into OUT.

    \b
    Example:
      semclip-batch run data/manifest.csv --out out/ --backbone semclip-tiny --pretrained none
      semclip-batch run s3://fab/lot42/ --pattern '{lot_id}/{wafer_id}/{name}.{ext}' --out s3://fab/out \\
          --pretrained s3://models/vit-b-16-plus-240.safetensors --actors 4 --num-gpus 1
    """
    from semclip_batch.pipeline.driver import run as run_pipeline

    result = run_pipeline(run_config(**options), progress=progress_printer())
    print_result(result.record, result.out)


def progress_printer() -> Callable[[int, int], None]:
    state = {"done": 0}

    def update(n: int, total: int) -> None:
        state["done"] += n
        click.echo(f"\rscored {state['done']}/{total} images", nl=state["done"] >= total, err=True)

    return update


def print_result(record: dict[str, Any], out: str) -> None:
    counts = ", ".join(f"{k}={v}" for k, v in record["counts"].items())
    click.echo(f"run {record['run_id']} attempt {record['attempt']}: {record['status']}; "
               f"shards run {record['shards']['run']}, skipped {record['shards']['skipped']}; "
               f"rows {record['rows']['total']} ({counts}); sent to model {record['rows']['sent_to_model']}")
    if record["throughput_img_s"]:
        click.echo(f"throughput {record['throughput_img_s']} img/s")
    click.echo(f"outputs: {out}/predictions (Parquet, hive by lot_id), {out}/masks.zarr, {out}/runs/{record['run_id']}")


@main.command()
@click.argument("out")
@storage_option_flag
@user_errors
def aggregate(out: str, storage_option: tuple[str, ...]) -> None:
    """Per (lot, wafer, class) defect statistics of OUT's predictions -> OUT/lot_stats/.

    \b
    Example:
      semclip-batch aggregate out/
    """
    from semclip_batch.analysis.aggregate import aggregate as make_stats

    stats = make_stats(out, parse_storage_options(storage_option))
    click.echo(f"wrote {len(stats)} rows for {stats['lot_id'].nunique()} lots to {out.rstrip('/')}/lot_stats")


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

    metrics = evaluate(out, truth, parse_storage_options(storage_option))
    click.echo(metrics_table(metrics))
    click.echo(f"wrote {out.rstrip('/')}/metrics.json")


def _loss_printer(what: str) -> Callable[[int, int, float], None]:
    def show(step: int, total: int, loss: float) -> None:
        click.echo(f"{what} {step}/{total}  loss {loss:.4f}", err=True)

    return show


@main.command()
@click.argument("manifest")
@click.option("--out", required=True, help="The weights file to write (.safetensors, any fsspec URL).")
@model_options
@click.option("--steps", default=DEFAULT_PRETRAIN_STEPS, show_default=True, type=int,
              help="Optimiser steps (the default took 9.2 min for semclip-tiny on 4.2k images here, loading included).")
@click.option("--batch-size", default=DEFAULT_PRETRAIN_BATCH, show_default=True, type=int)
@click.option("--lr", default=DEFAULT_PRETRAIN_LR, show_default=True, type=float)
@click.option("--keep-tokens", default=DEFAULT_KEEP_TOKENS, show_default=True, type=float,
              help="Fraction of each image's patch tokens a step runs (token dropping; patches touching a defect "
                   "go first, the rest at random). 1 runs every patch.")
@user_errors
def pretrain(manifest: str, out: str, backbone: str | None, pretrained: str | None, pretrained_sha256: str | None,
             seed: int, prompts: str | None, storage_option: tuple[str, ...],
             steps: int, batch_size: int, lr: float, keep_tokens: float) -> None:
    """Adapt a backbone to SEM images (dense patch-text alignment) and write its weights to --out.

    Text comes from the prompt file per `label` (or a `caption` column). Prints the canonical sha256 last.

    \b
    Example:
      semclip-batch pretrain data/manifest.csv --out sem-tiny.safetensors --backbone semclip-tiny --steps 200
    """
    from semclip_batch.fewshot.pretrain import PretrainConfig
    from semclip_batch.fewshot.pretrain import pretrain as run_pretrain

    cfg = PretrainConfig(manifest=manifest, out=out, backbone=backbone or DEFAULT_BACKBONE, pretrained=pretrained or "none",
                         pretrained_sha256=pretrained_sha256, seed=seed, steps=steps, batch_size=batch_size, lr=lr,
                         keep=keep_tokens, prompts=prompts, storage_options=parse_storage_options(storage_option))
    digest = run_pretrain(cfg, progress=_loss_printer("step"))
    click.echo(f"wrote {out}")
    click.echo(digest)


@main.command()
@click.argument("support")
@click.option("--out", required=True, help="Checkpoint folder to write (any fsspec URL).")
@model_options
@click.option("--cache-dir", default=None,
              help="Cache the frozen backbone's features of the support frames here (keyed by content and weights "
                   "checksum; local path or fsspec URL). Nothing is cached without it.")
@click.option("--method", type=MethodChoice(), default="semclip", show_default=True,
              help="SEM-CLIP, or a baseline it is measured against: WinCLIP+ or PromptAD (normal images only).")
@click.option("--shots", type=int, default=None, help="K images per class, seeded [default: all rows].")
@click.option("--epochs", default=None, type=int, help="[default: 40 for semclip, 100 for promptad; winclip has none]")
@click.option("--lr", default=1e-3, show_default=True, type=float)
@click.option("--no-vv", is_flag=True, help="Ablation: original path only.")
@click.option("--no-surgery", is_flag=True, help="Ablation: plain cosine similarities.")
@click.option("--taps", default=None, help="Tapped blocks, e.g. 3,6 [default: L/4, L/2, 3L/4, L].")
@click.option("--cls", "cls_mode", type=click.Choice(["fused", "head", "text"]), default="fused", show_default=True)
@click.option("--use-reference", is_flag=True,
              help="Also score patches by distance to each row's reference_uri frame (stored in the checkpoint).")
@user_errors
def train(support: str, out: str, backbone: str | None, pretrained: str | None, pretrained_sha256: str | None,
          seed: int, prompts: str | None, storage_option: tuple[str, ...], cache_dir: str | None,
          method: str, shots: int | None, epochs: int | None, lr: float, no_vv: bool, no_surgery: bool,
          taps: str | None, cls_mode: str, use_reference: bool) -> None:
    """Few-shot SEM-CLIP (or a baseline) on a frozen backbone from a labelled SUPPORT manifest -> checkpoint.

    \b
    Examples:
      semclip-batch train support.csv --out ckpt/ --backbone semclip-tiny --pretrained sem-tiny.safetensors --shots 10
      semclip-batch train support.csv --out ckpt-winclip/ --method winclip --pretrained sem-tiny.safetensors --shots 10
    """
    from semclip_batch.errors import ConfigError
    from semclip_batch.fewshot.train import TrainConfig
    from semclip_batch.fewshot.train import train as run_train

    if pretrained is None:
        raise ConfigError("train needs --pretrained (a weights path/URL, or 'none' for seeded random weights)")
    try:
        tap_list = tuple(int(t) for t in taps.split(",")) if taps else None
    except ValueError:
        raise ConfigError(f"--taps {taps!r}: expected block numbers such as 3,6") from None
    cfg = TrainConfig(support=support, out=out, backbone=backbone or DEFAULT_BACKBONE, pretrained=pretrained,
                      pretrained_sha256=pretrained_sha256, seed=seed, shots=shots, epochs=epochs, lr=lr,
                      prompts=prompts, taps=tap_list, use_vv=not no_vv, surgery=not no_surgery, cls=cls_mode,
                      method=method, use_reference=use_reference, cache_dir=cache_dir,
                      storage_options=parse_storage_options(storage_option))
    try:
        meta = run_train(cfg, progress=_loss_printer("epoch"))
    except ValueError as exc:  # e.g. taps outside the backbone's depth
        raise ConfigError(str(exc)) from None
    th = meta.thresholds
    click.echo(f"wrote {meta.method} checkpoint {out}: alpha {meta.alpha:.2f}, temperature {meta.temperature:.1f}, "
               f"thresholds image {th.image:.3f} pixel {th.pixel:.3f}, {meta.training['used']} images, "
               f"{meta.training['seconds']} s")


@main.command()
@click.argument("dir", default="./demo-out", required=False)
@click.option("--backbone", default="semclip-tiny", show_default=True, help="Backbone for the demo run.")
@user_errors
def demo(dir: str, backbone: str) -> None:
    """Run every step on synthetic lots in DIR: synth, pretrain (cached), train, run, eval, aggregate, summary.

    \b
    Example:
      semclip-batch demo ./demo-out
    """
    from semclip_batch.demo import run_demo

    for line in run_demo(dir, backbone=backbone):
        click.echo(line)
