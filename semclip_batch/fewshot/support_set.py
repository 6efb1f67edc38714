"""The support set as ``train`` fits on it and checks it: the training config, the support rows sampled and
decoded as ``run`` will score them (at a scale policy, stepping to a coarser one where they would not fit in memory),
the cell references where a normal frame repeats its pattern, and the rows' backbone features."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import pandas as pd

from semclip_batch.config import DEFAULT_ADAPT_LR, ModelSpec, PreprocessConfig, scale_policy_name
from semclip_batch.errors import ConfigError
from semclip_batch.fewshot.decoded import active_rows
from semclip_batch.fewshot.fit_memory import available_bytes, coarser, too_large
from semclip_batch.fewshot.recipes import DEFAULT_RECIPE, RECIPES, Recipe, applied, copies, for_policy
from semclip_batch.fewshot.reference_fit import normal_with_reference
from semclip_batch.fewshot.trainset import TrainSet, load_trainset
from semclip_batch.methods.feature_cache import cached_features, feature_key
from semclip_batch.methods.features import Features, encode_views
from semclip_batch.methods.registry import Scorer, depth_of, get_method, method_taps
from semclip_batch.methods.weights import LoadedBackbone, preprocess_config
from semclip_batch.model.grey_memory import OWN_MAX
from semclip_batch.model.reference import ReferenceScorer, reference_taps
from semclip_batch.model.towers import vision_tower

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    support: str
    out: str
    model: ModelSpec = field(default_factory=lambda: ModelSpec(cls="fused"))  # backbone, weights, method, options
    shots: int | None = None
    epochs: int | None = None
    lr: float = 1e-3
    batch_size: int = 8
    anchor: float = 1.0  # L2-SP weight pulling the Transformation Layers towards their zero-shot start
    cache_dir: str | None = None  # frozen-backbone features of the support frames (methods.feature_cache)
    recipe: Recipe = field(default_factory=lambda: RECIPES[DEFAULT_RECIPE])  # SEM-CLIP's (fewshot.recipes)
    choose_reference_weight: bool = False  # --reference-weight auto: chosen on held-out support frames
    # the scale policy is the weights' recommendation (pretrain's scale check), not the user's: where the support
    # rows would not fit in memory at it, the next coarser one is taken (fewshot.fit_memory)
    policy_from_weights: bool = False
    # --scale-policy auto (train's default with the transfer recipe where no policy is given or recommended): the
    # fit at whole, then the policy run scores SEM-CLIP's maps at is chosen by the fitted model on the support frames
    # it held out (held_out_check), and what depends on the view scale is fitted again at it (maps_at_policy)
    check_scale: bool = False
    adapt_steps: int = 0  # --adapt-steps: the backbone adapted on the support frames first (fewshot.adapt); 0: frozen
    adapt_lr: float = DEFAULT_ADAPT_LR
    # train's default: adapt only where the weights classify fewer of the support frames right zero-shot; None: as asked
    adapt_below: float | None = None
    # --own-neighbourhoods: the grey-level memory also compares each frame with this many of its own neighbourhoods
    # (rule 18, measured and not adopted: docs/quality.md); 0: with the support's entries only
    grey_own: int = 0
    # --die-to-die: the grey-level memory's map may also take in each frame's difference from its registered
    # reference_uri frame, kept where the held-out support frames gain 0.01 F1max and lose at most 0.005 pixel AUROC
    # (rule 27, measured and not adopted)
    reference_residual: bool = False

    def __post_init__(self) -> None:
        m = self.model
        if not get_method(m.method).layer_options and (m.taps is not None or not m.use_vv or not m.surgery
                                                       or m.cls != "fused"):
            raise ConfigError("--taps, --no-vv, --no-surgery and --cls are SEM-CLIP options; "
                              f"--method {m.method} takes none of them")
        if self.check_scale and not get_method(m.method).recipes:
            raise ConfigError(f"--scale-policy auto chooses SEM-CLIP's policy; --method {m.method} takes a given one")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"--epochs must be >= 1, got {self.epochs}")
        if self.shots is not None and self.shots < 1:
            raise ConfigError(f"--shots must be >= 1, got {self.shots}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"--lr must be a finite number > 0, got {self.lr}")
        if self.adapt_below is not None and not 0.0 < self.adapt_below <= 1.0:
            raise ConfigError(f"the adaptation's accuracy bound must be in (0, 1], got {self.adapt_below}")
        if self.adapt_steps < 0 or not (math.isfinite(self.adapt_lr) and self.adapt_lr > 0):
            raise ConfigError(f"--adapt-steps must be >= 0 (0: a frozen backbone) and --adapt-lr a finite number > 0, got "
                              f"{self.adapt_steps} and {self.adapt_lr}")
        if not 0 <= self.grey_own <= OWN_MAX:
            raise ConfigError(f"--own-neighbourhoods must be 0 to {OWN_MAX}, got {self.grey_own}")


def public_config(cfg: TrainConfig) -> dict[str, Any]:
    """The training config as stored in the checkpoint: storage options (endpoints) left out, and the map shifts
    (a ``run`` option: ``train`` never scores with them)."""
    body = asdict(cfg)
    body["model"].pop("storage_options", None)
    body["model"].pop("map_shifts", None)
    return body


def sample_shots(df: pd.DataFrame, shots: int | None, seed: int) -> pd.DataFrame:
    """K rows per class (all rows of a class with fewer), seeded; all rows when ``shots`` is None."""
    if shots is None:
        return df
    parts = [g.sample(n=min(shots, len(g)), random_state=seed) for _, g in df.groupby("label", sort=True)]
    return pd.concat(parts).sort_values("image_id").reset_index(drop=True)


@dataclass
class Fitted:
    """A trained model and what ``train`` records about it."""

    model: Scorer
    reference: ReferenceScorer | None
    summary: dict[str, Any]
    thresholds: dict[str, float]


def support_taps(cfg: TrainConfig, depth: int) -> tuple[int, ...]:
    """Every block whose tokens this configuration reads."""
    taps = set(method_taps(cfg.model, depth)) | {depth}
    if applied(cfg.recipe, cfg.model).reference_scorer:
        taps |= set(reference_taps(depth))
    return tuple(sorted(taps))


def support_that_fits(cfg: TrainConfig, df: pd.DataFrame, classes: tuple[str, ...],
                      verb: str = "trained at") -> tuple[TrainConfig, PreprocessConfig, TrainSet]:
    """The support set decoded as ``run`` will score it (the whole frame, and with a scale policy its tiles,
    whatever run's --tile-above), at the config's policy (the recipe's augmentation at ``whole`` only:
    :func:`~semclip_batch.fewshot.recipes.for_policy`). Where its rows would not fit in memory
    (:mod:`~semclip_batch.fewshot.fit_memory`): without the recipe's augmentation if that fits, else, when the
    policy came from the weights or the support frames' scale check, at the next coarser policy (the config returned
    says which; ``verb`` says in the warning what is done at it); else refused."""
    recipe, asked = cfg.recipe, scale_policy_name(cfg.model.scale_policy)
    while True:
        cfg = replace(cfg, recipe=for_policy(recipe, cfg.model.scale_policy))  # a step down to whole augments again
        spec = applied(cfg.recipe, cfg.model)
        prep = preprocess_config(cfg.model.backbone, tile_above=10**9, scale_policy=cfg.model.scale_policy,
                                 tile_overlap=cfg.model.tile_overlap)
        data = load_trainset(df, classes, prep, storage_options=cfg.model.storage_options,
                             references=spec.use_reference, register=spec.register_reference,
                             self_reference=spec.self_reference)
        if not get_method(cfg.model.method).recipes:  # the estimate was measured on SEM-CLIP's fit
            return cfg, prep, data
        available, n = available_bytes(), copies(cfg.recipe, cfg.model.method)
        why = too_large(len(data) * n, cfg.model.scale_policy, available)
        kept = active_rows()
        if why is not None and kept is not None and kept.release():  # the decoded rows kept count as free
            available = available_bytes()
            why = too_large(len(data) * n, cfg.model.scale_policy, available)
        if why is None:
            return cfg, prep, data
        if n > 1 and too_large(len(data), cfg.model.scale_policy, available) is None:
            log.warning("%s: trained without the recipe's augmentation (%d rows, not %d)", why, len(data), len(data) * n)
            return replace(cfg, recipe=replace(cfg.recipe, augment=False)), prep, data
        if cfg.model.scale_policy is None:
            raise ConfigError(f"{why}: train on fewer support frames (--shots)")
        if not (cfg.policy_from_weights or cfg.check_scale):
            raise ConfigError(f"{why}: train on fewer support frames (--shots) or at a coarser --scale-policy")
        policy = coarser(cfg.model.scale_policy)
        source = "the support frames' scale check" if cfg.check_scale else "the weights' recommendation"
        log.warning("%s: %s --scale-policy %s instead of %s (%s)", why, verb, scale_policy_name(policy), source, asked)
        cfg = replace(cfg, model=replace(cfg.model, scale_policy=policy, tile_overlap=None))


def cell_references_if_any(cfg: TrainConfig, data: TrainSet) -> TrainConfig:
    """The config without cell references where the recipe asks for them but no normal support frame repeats its
    pattern (a warning; ``data`` loses the references it has)."""
    spec = applied(cfg.recipe, cfg.model)
    if not spec.self_reference or spec.use_reference or normal_with_reference(data):
        return cfg
    log.warning("no normal support frame repeats its pattern: trained without cell references")
    data.refs = data.has_ref = None
    return replace(cfg, model=replace(cfg.model, self_reference=False), recipe=replace(cfg.recipe, self_reference=False))


def support_features(cfg: TrainConfig, spec: ModelSpec, backbone: LoadedBackbone, data: TrainSet,
                     prep: PreprocessConfig) -> tuple[Features, Features | None]:
    """The support rows' features at the fit's taps, and the reference frames' where a reference scorer reads them
    (both from ``cfg.cache_dir`` when it holds them)."""
    visual, depth = vision_tower(backbone.clip), depth_of(backbone.clip)
    taps, windows = support_taps(cfg, depth), get_method(cfg.model.method).windows
    feats = cached_features(cfg.cache_dir, feature_key(backbone.sha256, data.views, prep, taps, 1, windows),
                            lambda: encode_views(visual, data.views, prep, taps, windows=windows), cfg.model.storage_options)
    if not spec.reference_scorer:
        return feats, None
    assert data.refs is not None
    refs, ref_taps = data.refs, reference_taps(depth)
    return feats, cached_features(cfg.cache_dir, feature_key(backbone.sha256, refs, prep, ref_taps, None, False),
                                  lambda: encode_views(visual, refs, prep, ref_taps, vv_from=None, pooled=False),
                                  cfg.model.storage_options)
