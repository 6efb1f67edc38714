"""``semclip-batch pretrain`` and ``train``: the few-shot commands of the CLI (:mod:`semclip_batch.cli.commands`
registers them). User mistakes end in one line, exit != 0."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import click

from semclip_batch.cli.options import (
    MethodChoice,
    default_scale_policy,
    model_options,
    parse_reference_weight,
    parse_storage_options,
    pretrain_steps,
    scale_policy_option,
    self_similarity_option,
    user_errors,
)
from semclip_batch.cli.progress import loss_progress
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
    REFERENCE_FUSIONS,
    SCORE_MODES,
    ModelSpec,
    parse_scale_policy,
)
from semclip_batch.errors import ConfigError

if TYPE_CHECKING:
    from semclip_batch.fewshot.train import TrainConfig
    from semclip_batch.methods.checkpoint import CheckpointMeta


@click.command()
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
    from semclip_batch.fewshot.heldout import heldout_table
    from semclip_batch.fewshot.pretrain import PretrainConfig
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
    for line in heldout_table(result.before, result.after):
        click.echo(line)
    if result.scale_check is not None:
        for line in result.scale_check.lines():
            click.echo(line)
    click.echo(f"{result.steps} steps" + (" (--steps auto)" if fill else "")
               + f", {result.seconds:.0f} s of training and the final check")
    click.echo(f"wrote {out}")
    click.echo(result.sha256)


@click.command()
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
@scale_policy_option("[default: the one the --pretrained weights' scale check recommends (pretrain); else, with "
                     "SEM-CLIP's recipe transfer, auto; else whole; stored in the checkpoint, run scores with it]",
                     auto="; auto: the fit at whole, its maps at the cheapest policy within 0.01 pixel AUROC of the best "
                          "on the support frames the fit held out, scored by the fitted model (pretrain's rule; "
                          "SEM-CLIP; README \"The maps' scale checked on the held-out support frames\")")
@self_similarity_option("[default: with SEM-CLIP's recipe transfer chosen on the support frames with the memory's "
                        "weight (0, 0.25 .. 1 or 0.8), 0 with paper; a given W is used as given; baselines have none; "
                        "stored in the checkpoint]")
@click.option("--own-neighbourhoods", "own_neighbourhoods", type=int, default=0, show_default=True,
              help="The grey-level memory (SEM-CLIP's recipe transfer) also compares each frame's 11 px "
                   "neighbourhoods with this many of the frame's own more than 24 px away, so structures the frame "
                   "repeats but the support lacks score low (docs/quality.md rules 18 and 19: 4,096 raised F1max on "
                   "every validation lot where the memory is kept but lost macro F1 on two of rule 18's lots and on "
                   "rule 19's banner lot, and costs time; not adopted; 0 to 16384; stored in the checkpoint).")
@click.option("--die-to-die/--no-die-to-die", "die_to_die", default=None,
              help="The grey-level memory (SEM-CLIP's recipe transfer) may also take in each frame's difference from "
                   "its registered reference_uri frame at the frame's resolution (0 in the rows of a data bar, "
                   "rule 30), kept where the held-out support "
                   "frames (at least 3 of them listing a readable reference) gain 0.01 F1max and lose at most 0.005 "
                   "pixel AUROC; where kept, run reads and registers the reference of every frame up to 4096 x 4096 "
                   "px, an unreadable one a reference_error row (docs/quality.md rules 27 and 29; the default "
                   "wherever the grey-level memory is fitted).")
@user_errors
def train(support: str, out: str, backbone: str | None, pretrained: str | None, pretrained_sha256: str | None,
          seed: int, prompts: str | None, storage_option: tuple[str, ...], cache_dir: str | None,
          method: str, recipe: str, shots: int | None, epochs: int | None, lr: float, adapt_steps: int | None,
          adapt_lr: float, no_vv: bool, no_surgery: bool,
          taps: str | None, cls_mode: str, score_mode: str, sigma: float, use_reference: bool,
          no_register: bool, reference_fusion: str, reference_weight: str, self_reference: bool | None,
          scale_policy: str | None, self_similarity: float | None, own_neighbourhoods: int,
          die_to_die: bool | None) -> None:
    """Few-shot SEM-CLIP (or a baseline) from a labelled SUPPORT manifest -> checkpoint (with the default recipe
    the backbone is first adapted on it where the weights do not know its frames, --adapt-steps).

    \b
    Examples:
      semclip-batch train support.csv --out ckpt/ --backbone semclip-tiny --pretrained sem-tiny.safetensors --shots 10
      semclip-batch train support.csv --out ckpt-winclip/ --method winclip --pretrained sem-tiny.safetensors --shots 10
    """
    from semclip_batch.fewshot.adapt import default_adapt_steps
    from semclip_batch.fewshot.recipes import applied, get_recipe, with_self_reference, with_self_similarity
    from semclip_batch.fewshot.train import TrainConfig
    from semclip_batch.fewshot.train import train as run_train
    from semclip_batch.methods.registry import get_method

    if pretrained is None:
        raise ConfigError("train needs --pretrained (a weights path/URL, 'shipped', or 'none' for seeded random weights)")
    try:
        tap_list = tuple(int(t) for t in taps.split(",")) if taps else None
    except ValueError:
        raise ConfigError(f"--taps {taps!r}: expected block numbers such as 3,6") from None
    weight = parse_reference_weight(reference_weight)  # None: auto
    so = parse_storage_options(storage_option)
    auto = scale_policy == "auto"
    if auto and not get_method(method).recipes:
        raise ConfigError(f"--scale-policy auto chooses SEM-CLIP's policy on the support frames; --method {method} "
                          "takes whole, native or a fraction")
    recommended = None if scale_policy else default_scale_policy(backbone or DEFAULT_BACKBONE, pretrained, so)
    policy = "whole" if auto else scale_policy or recommended or "whole"
    # with no --scale-policy and none from the weights, SEM-CLIP's transfer recipe checks its maps' policy after the fit
    auto = auto or (scale_policy is None and recommended is None and get_method(method).recipes
                    and recipe == "transfer")
    cfg = TrainConfig(support=support, out=out, shots=shots, epochs=epochs, lr=lr, cache_dir=cache_dir,
                      adapt_steps=default_adapt_steps(method, recipe) if adapt_steps is None else adapt_steps,
                      adapt_lr=adapt_lr, adapt_below=DEFAULT_ADAPT_BELOW if adapt_steps is None else None,
                      recipe=with_self_similarity(with_self_reference(get_recipe(recipe), self_reference),
                                                  self_similarity),
                      choose_reference_weight=weight is None, policy_from_weights=scale_policy is None,
                      check_scale=auto, grey_own=own_neighbourhoods, reference_residual=bool(die_to_die),
                      model=ModelSpec(backbone=backbone or DEFAULT_BACKBONE, pretrained=pretrained,
                                      pretrained_sha256=pretrained_sha256, seed=seed, prompts=prompts, taps=tap_list,
                                      use_vv=not no_vv, surgery=not no_surgery, cls=cls_mode, method=method,
                                      use_reference=use_reference, register_reference=not no_register,
                                      reference_fusion=reference_fusion,
                                      reference_weight=DEFAULT_REFERENCE_WEIGHT if weight is None else weight,
                                      self_reference=bool(self_reference),
                                      score_mode=score_mode, sigma=sigma,
                                      scale_policy=parse_scale_policy(policy), storage_options=so))
    if die_to_die is None:  # rule 29: tried wherever the grey-level memory is fitted
        cfg = replace(cfg, reference_residual=applied(cfg.recipe, cfg.model).grey_memory)
    _refuse_unused_reference_options(click.get_current_context(), applied(cfg.recipe, cfg.model))
    _refuse_unused_fit_options(click.get_current_context(), cfg, adapt_steps, recipe, self_similarity)
    try:
        with (loss_progress("adaptation step", "adapt backbone", unit="step") as adapt_progress,
              loss_progress("epoch", f"train {method}") as progress):
            meta = run_train(cfg, progress=progress, adapt_progress=adapt_progress)
    except ValueError as exc:  # e.g. taps outside the backbone's depth
        raise ConfigError(str(exc)) from None
    for line in _train_summary(meta, out):
        click.echo(line)


def _refuse_unused_fit_options(ctx: click.Context, cfg: TrainConfig, adapt_steps: int | None, recipe: str,
                               self_similarity: float | None) -> None:
    """Refuse, in one line, ``--adapt-lr`` where nothing adapts, ``--self-similarity`` for a baseline, and
    ``--own-neighbourhoods`` and ``--die-to-die`` where no grey-level memory is fitted (options that would be stored
    or asked for and ignored)."""
    from click.core import ParameterSource

    from semclip_batch.fewshot.recipes import applied
    from semclip_batch.methods.registry import get_method

    method = cfg.model.method
    if not cfg.adapt_steps and ctx.get_parameter_source("adapt_lr") not in (None, ParameterSource.DEFAULT):
        why = ("--adapt-steps 0" if adapt_steps == 0 else f"--recipe {recipe}" if get_method(method).recipes
               else f"--method {method} (a baseline: a frozen backbone unless --adapt-steps N)")
        raise ConfigError(f"--adapt-lr is the rate of the backbone's adaptation, and with {why} nothing adapts: "
                          "omit it or give --adapt-steps N")
    if self_similarity is not None and not get_method(method).recipes:
        raise ConfigError(f"--self-similarity is a SEM-CLIP option; --method {method} has none: omit it")
    for given, flag in ((cfg.grey_own, "--own-neighbourhoods"), (cfg.reference_residual, "--die-to-die")):
        if given and not applied(cfg.recipe, cfg.model).grey_memory:
            raise ConfigError(f"{flag} is the grey-level memory's, which --recipe {recipe} with --method {method} does "
                              "not fit (SEM-CLIP's recipe transfer does): omit it")


def _train_summary(meta: CheckpointMeta, out: str) -> list[str]:
    """What ``train`` prints once the checkpoint is written: the fit, the map's weights, the support scale check,
    the grey-level memory, the region's classes, the backbone's adaptation and where the time went."""
    from semclip_batch.fewshot.adapt import adaptation_lines
    from semclip_batch.fewshot.grey_memory_fit import grey_memory_lines
    from semclip_batch.fewshot.region_fit import region_classes_lines
    from semclip_batch.fewshot.scale_check import support_check_lines
    from semclip_batch.fewshot.train import step_time_line
    from semclip_batch.methods.weight_choice import describe_choice

    th = meta.thresholds
    recipe = "" if meta.recipe == meta.method else f" (recipe {meta.recipe})"
    choice = meta.training.get("reference_weight_choice")
    chosen = "" if choice is None else f"reference weight {meta.reference_weight:g} ({'kept' if 'kept' in choice else 'auto'}), "
    lines = [f"wrote {meta.method} checkpoint {out}{recipe}: alpha {meta.alpha:.2f}, {chosen}"
             f"temperature {meta.temperature:.1f}, thresholds image {th.image:.3f} pixel {th.pixel:.3f}, "
             f"{meta.training['used']} images, {meta.training['seconds']} s"]
    weights = describe_choice(meta.training.get("weights_choice") or {})
    return (lines + ([] if weights is None else [weights]) + support_check_lines(meta.training)
            + grey_memory_lines(meta.training) + region_classes_lines(meta.training) + adaptation_lines(meta.training)
            + step_time_line(meta.training))


def _refuse_unused_reference_options(ctx: click.Context, spec: ModelSpec) -> None:
    """A reference option the model would store and ignore is refused in one line: ``--reference-weight`` and
    ``--reference-fusion`` without any reference (neither ``--use-reference`` nor cell references), and
    ``--no-register`` without ``--use-reference`` (only reference frames are registered)."""
    from click.core import ParameterSource


    given = [f"--{name.replace('_', '-')}" for name in ("reference_weight", "reference_fusion")
             if ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT)]
    if given and not spec.reference_scorer:
        raise ConfigError(f"without references the model ignores {' and '.join(given)}: add --use-reference (a "
                          "reference_uri per row) or --self-reference (cell to cell), or omit it")
    if ctx.params.get("no_register") and not spec.use_reference:
        raise ConfigError("--no-register applies to reference frames only (cell references need no registration): "
                          "add --use-reference or omit it")
