"""The CLI's shared options, their validation into typed configs, and its one-line error edge."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import click

from semclip_batch.config import (
    DEFAULT_BACKBONE,
    DEFAULT_IMAGE_THRESHOLD,
    DEFAULT_MAP_SHIFTS,
    DEFAULT_MIN_REGION_PX,
    DEFAULT_PIXEL_THRESHOLD,
    DEFAULT_PRETRAIN_STEPS,
    DEFAULT_SHARD_SIZE,
    DEFAULT_TILE_ABOVE,
    PRECISIONS,
    CheckpointRequest,
    ModelSpec,
    RunConfig,
    Thresholds,
    parse_scale_policy,
    zero_shot_spec,
)
from semclip_batch.errors import MAX_MESSAGE, SemclipError, one_line, shorten
from semclip_batch.io.storage import check_storage_options

F = TypeVar("F", bound=Callable[..., Any])
P = ParamSpec("P")
N = TypeVar("N", int, float)
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
            hint = " (rerun with -vv for the traceback)"
            raise click.ClickException(shorten(one_line(exc), MAX_MESSAGE - len(hint)) + hint) from None

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


def number_or_auto(text: str, flag: str, cast: Callable[[str], N], expected: str) -> N | None:
    """A flag's value as ``cast(text)``, or None for 'auto' (any case); anything else refused in one line."""
    from semclip_batch.errors import ConfigError

    if text.strip().lower() == "auto":
        return None
    try:
        return cast(text)
    except ValueError:
        raise ConfigError(f"{flag} {shorten(text, 30)!r}: expected {expected} or 'auto'") from None


def parse_reference_weight(text: str) -> float | None:
    """``train --reference-weight W`` as a number (range checked by :class:`ModelSpec`), or None for 'auto'."""
    return number_or_auto(text, "--reference-weight", float, "a number in [0, 1]")


def pretrain_steps(text: str | None, max_minutes: float) -> tuple[int, bool]:
    """``pretrain --steps N|auto`` -> (the planned steps, whether the budget decides instead). Not given: 'auto'
    where there is a budget, else the fixed default schedule. 'auto' plans the first steps as the default does
    (they are timed, then the schedule is laid over the steps that fit). N is checked by :class:`PretrainConfig`."""
    if text is None:
        return DEFAULT_PRETRAIN_STEPS, max_minutes > 0
    steps = number_or_auto(text, "--steps", int, "a whole number")
    return (DEFAULT_PRETRAIN_STEPS, True) if steps is None else (steps, False)


storage_option_flag = click.option(
    "--storage-option", "storage_option", multiple=True, metavar="KEY=VALUE",
    help="Non-secret fsspec storage option (e.g. endpoint_url=...); secrets come from AWS_* env.")


report_flag = click.option("--report", is_flag=True,
                           help="Also write OUT/reports/ at the end (lot reports: HTML + PNG; see `report`).")


def write_report_line(out: str, storage_option: tuple[str, ...]) -> None:
    """``--report``: write OUT/reports/ and say where its index is."""
    from semclip_batch.analysis.report import write_report
    from semclip_batch.cli.progress import row_progress

    with row_progress("report", "lot", plain=False) as progress:
        index = write_report(out, storage_options=parse_storage_options(storage_option), progress=progress,
                             workers=None)
    click.echo(f"report: {index}")


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
                     help="Backbone weights: local path or fsspec URL (.safetensors / .pt), 'shipped' for the "
                          "package's own semclip-tiny weights, or 'none' for seeded random weights."),
        click.option("--pretrained-sha256", default=None, help="Refuse weights whose sha256 differs (canonical or file)."),
        click.option("--seed", default=0, show_default=True, type=int, help="Seed for random weights and sampling."),
        click.option("--prompts", default=None,
                     help="Prompt file (JSON: templates x states per class) [not with run --model: a checkpoint keeps "
                          "its own]."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return storage_option_flag(fn)


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
        scale_policy_option("[default: the one the --pretrained weights' scale check recommends (pretrain), else "
                            "whole; with --model: the checkpoint's, which a given value must equal]"),
        self_similarity_option("[default: 0.8, chosen on the validation families; not with --model: a checkpoint "
                               "scores with its own]"),
        click.option("--defect-view/--no-defect-view", default=None,
                     help="Class scores of frames at least twice the model input also read a native-resolution crop "
                          "at the map's maximum (one more model view per such frame) [default: on; with --model: "
                          "the checkpoint's, which either flag overrides]."),
        click.option("--map-shifts", type=int, default=DEFAULT_MAP_SHIFTS, show_default=True, metavar="1|2|4",
                     help="Views scored per model view for the defect map: 2 adds the view moved half a patch "
                          "diagonally, 4 every half-patch offset; their maps are moved back and averaged (class "
                          "scores stay the view's own, but the defect view's crop follows the averaged map; the model "
                          "stage's cost scales with it). 1: the view alone, as before this option."),
    ]
    fn = model_options(fn)
    for option in reversed(options):
        fn = option(fn)
    return fn


def scale_policy_option(default: str, auto: str = "") -> Callable[[F], F]:
    """``--scale-policy`` (config.parse_scale_policy), for ``run`` and ``train`` (``auto``: its help)."""
    return click.option(
        "--scale-policy", default=None, metavar="whole|native|FRACTION" + ("|auto" if auto else ""),
        help="Resolution of the defect map: whole (the frame resized to the model input), native, or a fraction "
             "such as 0.5 of native resolution; frames larger than the model input covers at it are scored as "
             f"overlapping tiles (class scores from the whole frame){auto} {default}.")


def self_similarity_option(default: str) -> Callable[[F], F]:
    """``--self-similarity`` (model.selfsim), for ``run`` and ``train``."""
    return click.option(
        "--self-similarity", type=float, default=None, metavar="W",
        help="Share w in [0, 1] of the in-frame self-similarity map in SEM-CLIP's defect map, (1 - w) * map + w * "
             "self, where each patch scores by how unlike the rest of its own frame it is (0: off; README "
             f"\"Self-similarity\") {default}.")


def run_config(*, input: str, out: str, model: str | None, backbone: str | None, pretrained: str | None,
               pretrained_sha256: str | None, scale_policy: str | None, self_similarity: float | None,
               defect_view: bool | None,
               seed: int, prompts: str | None, precision: str, storage_option: tuple[str, ...],
               threshold: float | None, pixel_threshold: float | None, min_region_px: int | None, batch_size: int,
               actors: int, num_gpus: float, shard_size: int, tile_above: int, pattern: str | None,
               address: str | None, overwrite: bool, map_shifts: int = DEFAULT_MAP_SHIFTS) -> RunConfig:
    """The validated RunConfig for the options of :func:`run_options`."""
    from semclip_batch.errors import ConfigError

    if pretrained is None and model is None:
        raise ConfigError("run needs --pretrained (a weights path/URL, 'shipped', or 'none' for seeded random weights) "
                          "or --model")
    so = parse_storage_options(storage_option)
    spec: ModelSpec | CheckpointRequest
    if model is not None and self_similarity is not None:
        raise ConfigError("--self-similarity applies to zero-shot runs: a checkpoint scores with the weight it was "
                          "trained with (train --self-similarity); omit it")
    if model is not None and prompts is not None:
        raise ConfigError("--prompts applies to zero-shot runs: a checkpoint scores with the prompts it was trained "
                          "with (stored in it); omit it")
    if model is not None:
        spec = CheckpointRequest(url=model, backbone=backbone, pretrained=pretrained,
                                 pretrained_sha256=pretrained_sha256, precision=precision, scale_policy=scale_policy,
                                 defect_view=defect_view, map_shifts=map_shifts, storage_options=so)
    else:
        assert pretrained is not None  # refused above
        name = backbone or DEFAULT_BACKBONE
        policy = scale_policy or default_scale_policy(name, pretrained, so) or "whole"
        spec = zero_shot_spec(name, pretrained, scale_policy=parse_scale_policy(policy),
                              self_similarity=self_similarity,
                              defect_view=defect_view, map_shifts=map_shifts, pretrained_sha256=pretrained_sha256, seed=seed,
                              precision=precision, prompts=prompts, storage_options=so)
    return RunConfig(input=input, out=out, model=spec, thresholds=_thresholds(threshold, pixel_threshold, min_region_px),
                     tile_above=tile_above, pattern=pattern, shard_size=shard_size, batch_size=batch_size,
                     actors=actors, num_gpus=num_gpus, address=address, overwrite=overwrite, storage_options=so)


def default_scale_policy(backbone: str, pretrained: str, storage_options: dict[str, Any]) -> str | None:
    """``--scale-policy`` not given: the policy the weights' scale check recommends (``pretrain``; said on
    stderr), else None (``run`` scores at ``whole``; ``train`` with the ``transfer`` recipe checks its maps'
    policy)."""
    from semclip_batch.methods.weights import recommended_scale_policy

    name = recommended_scale_policy(backbone, pretrained, storage_options)
    if name is None:
        return None
    click.echo(f"--scale-policy {name}: recommended by the weights' scale check (pretrain); --scale-policy whole "
               "scores the whole frame resized", err=True)
    return name


def print_result(record: dict[str, Any], out: str) -> None:
    counts = ", ".join(f"{k}={v}" for k, v in record["counts"].items())
    click.echo(f"run {record['run_id']} attempt {record['attempt']}: {record['status']}; "
               f"shards run {record['shards']['run']}, skipped {record['shards']['skipped']}; "
               f"rows {record['rows']['total']} ({counts}); sent to model {record['rows']['sent_to_model']}")
    if record["throughput_img_s"]:
        click.echo(f"throughput {record['throughput_img_s']} img/s")
    click.echo(f"outputs: {out}/predictions (Parquet, hive by lot_id), {out}/masks.zarr, {out}/runs/{record['run_id']}")
