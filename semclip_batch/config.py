"""Typed, frozen configuration: validated once at the boundary, then passed whole.

Defaults for the thresholds are chosen so a zero-shot run does not flag every frame: with 7 near-uniform
classes, 1 - p(normal) is about 0.86, and on a random-weight backbone the map's maximum reaches about 0.95 on
normal frames (measured on synthetic lots), so the image and pixel thresholds sit at 0.95.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from semclip_batch.errors import ConfigError

Progress = Callable[[int, int], None]
"""Called with (rows just done, rows in all) as a run goes."""
LossProgress = Callable[[int, int, float], None]
"""Called with (step, steps, loss) as training goes."""

DEFAULT_BACKBONE = "ViT-B-16-plus-240"
NORMAL = "normal"  # the class of defect-free frames, always class 0 of a prompt file
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"  # log lines of the CLI (and of its report workers)
WIRE_LOGGERS = ("botocore", "aiobotocore", "boto3", "s3transfer", "urllib3")
"""Loggers whose debug lines print each request's headers (an S3 session token, an endpoint's credentials): never
below INFO."""

DEFAULT_IMAGE_THRESHOLD = 0.95
DEFAULT_PIXEL_THRESHOLD = 0.95
DEFAULT_MIN_REGION_PX = 16
DEFAULT_TILE_ABOVE = 1024
TILE_OVERLAP = 0.25  # least overlap of --tile-above's tiles (DESIGN.md)
# least overlap of a scale policy's tiles: the frame's slack is spread evenly, so a 1024 px frame at native takes
# 5 x 5 tiles of 240 px overlapping by 44 px (18 %) instead of 25 %'s 6 x 6 (README "Small defects at any frame size")
SCALE_POLICY_OVERLAP = 0.125
# pretrain's scale check (fewshot.scale_check): the policies its held-out frames are scored at, cheapest first; the
# recommendation is the cheapest within the tolerance of the best pixel AUROC (issue 13's own 0.01), on at most
# SCALE_CHECK_FRAMES of them. Fixed before any measurement with them (README "The scale check").
SCALE_CHECK_POLICIES = ("whole", "0.5", "0.75", "native")
SCALE_CHECK_TOLERANCE = 0.01
SCALE_CHECK_FRAMES = 100
SCALE_CHECK_KEY = "scale_check"  # a weights file's metadata: {policy: {"pAUROC": .., "views": ..}} (JSON)
SCALE_POLICY_KEY = "scale_policy"  # a weights file's metadata: the recommended policy's name (--scale-policy's spelling)
DEFAULT_REFERENCE_WEIGHT = 0.75  # the reference map's share of the fused map: chosen on the validation family (README)
# how the reference map joins its token and pixel terms (model.reference): chosen on the validation family (README)
REFERENCE_FUSIONS = ("mean", "max")
DEFAULT_REFERENCE_FUSION = "mean"
# the in-frame self-similarity map's share of SEM-CLIP's map (model.selfsim): zero-shot `run` and train's recipe
# transfer; chosen on the validation families (README "Self-similarity")
DEFAULT_SELF_SIMILARITY = 0.8
# views scored per view, the maps of the half-patch shifted ones moved back and averaged (model.shifts): `run`'s
# default; 1 for library callers (README "The map over half-patch shifts")
MAP_SHIFTS = (1, 2, 4)
DEFAULT_MAP_SHIFTS = 4
DEFAULT_SHARD_SIZE = 256
DEFAULT_REPORT_TOP_N = 12  # overlay thumbnails per lot page of `report`
# `status`: a record still `running` with nothing new under _state/ for this long is reported as likely killed
# (a 256-row shard of large frames takes minutes on CPU)
DEFAULT_STALE_AFTER_S = 600.0
# pretrain (the CLI and PretrainConfig): the fixed schedule (--steps N or --max-minutes 0; the CLI's default is
# --steps auto, as many as fit in the budget), a quarter of the tokens per step
DEFAULT_PRETRAIN_STEPS = 1500
DEFAULT_PRETRAIN_BATCH = 32
DEFAULT_PRETRAIN_LR = 1e-3
DEFAULT_KEEP_TOKENS = 0.25
DEFAULT_PRETRAIN_CROPS = 2  # per frame larger than the model input: at native resolution and at half of it
# pretrain's wall-clock budget: --steps auto fills it; a fixed --steps N runs fewer steps rather than overrun (0: none)
DEFAULT_PRETRAIN_MINUTES = 10.0
DEFAULT_PRETRAIN_HELDOUT = 0.1  # share of the frames never trained on (the final check; none below 20 frames)
DEFAULT_ADAPT_STEPS = 200  # train's, with SEM-CLIP's transfer recipe: chosen on the validation family (README)
# train's default adapts only a backbone whose zero-shot text scores classify fewer of the support frames right; on the
# validation families with the shipped weights: contacts 0.16-0.17 (adapting helps), classic 0.81-0.90 (it costs)
DEFAULT_ADAPT_BELOW = 0.5
DEFAULT_ADAPT_LR = 3e-4  # train --adapt-steps: chosen with 600 steps on a contacts support lot (README: not re-chosen at 200)
PRECISIONS = ("fp32", "bf16", "fp16")
SCORE_MODES = ("mean", "max")
SIGMA_MAX = 32.0  # px of the model's view (224-240 px): the map's Gaussian pads 4 sigma, which must stay inside it


def configure_logging(level: int) -> None:
    """The CLI's logging (and its report workers'): ``level`` on stderr, :data:`WIRE_LOGGERS` at INFO at most."""
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr)
    for wire in WIRE_LOGGERS:
        logging.getLogger(wire).setLevel(max(level, logging.INFO))


@dataclass(frozen=True)
class Thresholds:
    """Decision thresholds; ``source`` says where each value came from (default | flag | checkpoint)."""

    image: float = DEFAULT_IMAGE_THRESHOLD
    pixel: float = DEFAULT_PIXEL_THRESHOLD
    min_region_px: int = DEFAULT_MIN_REGION_PX
    source: dict[str, str] = field(
        default_factory=lambda: {"image": "default", "pixel": "default", "min_region_px": "default"}
    )

    def __post_init__(self) -> None:
        for name in ("image", "pixel"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} threshold must be in [0, 1], got {value}")
        if self.min_region_px < 1:
            raise ConfigError(f"--min-region-px must be >= 1, got {self.min_region_px}")

    def as_record(self) -> dict[str, Any]:
        return {"image": self.image, "pixel": self.pixel, "min_region_px": self.min_region_px,
                "source": dict(self.source)}


def parse_scale_policy(text: str) -> float | None:
    """``--scale-policy``: ``whole`` (None: the whole frame resized to the model input; tiles only above
    ``--tile-above``), ``native`` (1.0) or a fraction of native resolution in (0, 1] such as ``0.5``: frames larger
    than the model input covers at that resolution are scored as overlapping tiles at it (class scores still from
    the whole-frame view)."""
    if text == "whole":
        return None
    if text == "native":
        return 1.0
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"--scale-policy must be whole, native or a fraction in (0, 1], got {text!r}") from None
    check_scale_policy(value)
    return value


def check_scale_policy(value: float | None) -> None:
    if value is not None and not 0.0 < value <= 1.0:
        raise ConfigError(f"--scale-policy must be whole, native or a fraction in (0, 1], got {value}")


def tile_overlap_for(scale_policy: float | None) -> float:
    """The least overlap of the tiles a frame is cut into: :data:`TILE_OVERLAP` for ``--tile-above``'s,
    :data:`SCALE_POLICY_OVERLAP` under a scale policy (whose many small tiles make each one a cost)."""
    return TILE_OVERLAP if scale_policy is None else SCALE_POLICY_OVERLAP


def scale_policy_name(value: float | None) -> str:
    """The flag's spelling of a policy (inverse of :func:`parse_scale_policy`)."""
    return "whole" if value is None else "native" if value == 1.0 else f"{value:g}"


@dataclass(frozen=True)
class PreprocessConfig:
    """The one preprocessing recipe (README "Architecture"); mean/std/size are the backbone's own."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    percentile_low: float = 0.5
    percentile_high: float = 99.5
    tile_above: int = DEFAULT_TILE_ABOVE
    tile_overlap: float = TILE_OVERLAP  # a scale policy's constructors pass SCALE_POLICY_OVERLAP (tile_overlap_for)
    scale_policy: float | None = None  # see parse_scale_policy; None: the whole frame (tiled above tile_above)
    defect_view: bool = False  # large frames' class scores also read a native crop at the map's maximum (io.preprocess)
    frame_levels: bool = False  # every frame ships its uint8 levels (io.preprocess.pack_frame): a grey-level memory reads them

    def __post_init__(self) -> None:
        if not 0.0 <= self.percentile_low < self.percentile_high <= 100.0:
            raise ConfigError(
                f"percentile stretch needs 0 <= low < high <= 100, got {self.percentile_low}, {self.percentile_high}"
            )
        if self.tile_above < 16:
            raise ConfigError(f"--tile-above must be >= 16, got {self.tile_above}")
        if not 0.0 <= self.tile_overlap < 1.0:
            raise ConfigError(f"tile overlap must be in [0, 1), got {self.tile_overlap}")
        check_scale_policy(self.scale_policy)

    @property
    def tile_side(self) -> int:
        """Frames whose longer side exceeds this are tiled, in tiles of (up to) this side: ``tile_above``, or with a
        scale policy the frame-pixel side that the model input covers at that fraction of native resolution
        (``tile_above`` then does not apply: train and run must cut the same tiles whatever run's flag)."""
        if self.scale_policy is None:
            return self.tile_above
        return max(16, round(self.image_size / self.scale_policy))

    def as_record(self) -> dict[str, Any]:
        """The recipe as stored (run records, run_id); ``scale_policy``, ``defect_view`` and ``frame_levels`` only when
        set (run ids stay as they were)."""
        record = dataclasses.asdict(self)
        if self.scale_policy is None:
            del record["scale_policy"]
        for flag in ("defect_view", "frame_levels"):
            if not record[flag]:
                del record[flag]
        return record


@dataclass(frozen=True)
class ModelSpec:
    """What an actor needs to build the model where it runs: a small, picklable description, fully resolved
    (``run --model`` arrives as a :class:`CheckpointRequest` and becomes one of these in the driver)."""

    backbone: str = DEFAULT_BACKBONE
    pretrained: str = "none"
    pretrained_sha256: str | None = None
    seed: int = 0
    precision: str = "fp32"
    prompts: str | None = None
    taps: tuple[int, ...] | None = None
    use_vv: bool = True
    surgery: bool = True
    sigma: float = 4.0
    score_mode: str = "mean"
    cls: str = "text"
    method: str = "semclip"  # a registered method: validated by methods.registry.get_method where it is built
    use_reference: bool = False  # each row's reference_uri frame (die-to-die)
    register_reference: bool = True  # references shifted and intensity-matched onto the frame (io.register)
    self_reference: bool = False  # rows without a reference frame compared with their own repeats (io.cell_reference)
    reference_weight: float = DEFAULT_REFERENCE_WEIGHT
    reference_fusion: str = DEFAULT_REFERENCE_FUSION  # the reference map: mean or max of its token and pixel terms
    memory: bool = False  # SEM-CLIP: a normal-patch memory fused into the map (train's recipe sets it)
    region_head: bool = False  # SEM-CLIP: the head also reads the most anomalous patches' embedding
    self_similarity: float = 0.0  # SEM-CLIP: the in-frame self-similarity map's share of the map (model.selfsim)
    scale_policy: float | None = None  # maps of large frames at this fraction of native resolution (parse_scale_policy)
    defect_view: bool = False  # class scores of large frames also from a native crop at the map's maximum
    grey_memory: bool = False  # a memory of normal grey-level neighbourhoods fused into the frame's map (model.grey_memory)
    region_classes: bool = False  # defect classes also from the region at the map's maximum (model.region_classes)
    # the checkpoint's grey-level memory keeps rule 27's die-to-die residual (its grey_memory.reference tensor; train
    # --die-to-die): run reads and registers the listed reference of every frame whose map the memory fuses (its
    # levels shipped) and ships its levels too; an unreadable one is a reference_error row
    reference_levels: bool = False
    # the tiles' least overlap a checkpoint was trained with (its preprocessing record); None: tile_overlap_for(policy)
    tile_overlap: float | None = None
    map_shifts: int = 1  # views scored per view for the map (model.shifts; run's default DEFAULT_MAP_SHIFTS)
    checkpoint: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        check_map_shifts(self.map_shifts)
        if self.score_mode not in SCORE_MODES:
            raise ConfigError(f"score mode must be one of {', '.join(SCORE_MODES)}, got {self.score_mode!r}")
        if not (math.isfinite(self.sigma) and 0 <= self.sigma <= SIGMA_MAX):
            raise ConfigError(f"sigma (train --sigma, sigma in a checkpoint) must be a number in [0, {SIGMA_MAX:g}] px of "
                              f"the model's view, got {self.sigma}")
        check_scale_policy(self.scale_policy)
        if not 0.0 <= self.reference_weight <= 1.0:
            raise ConfigError(f"the reference weight (train --reference-weight, reference_weight in a checkpoint) must be "
                              f"in [0, 1], got {self.reference_weight:g}")
        check_self_similarity(self.self_similarity)
        if self.reference_fusion not in REFERENCE_FUSIONS:
            raise ConfigError(f"reference fusion must be one of {', '.join(REFERENCE_FUSIONS)}, "
                              f"got {self.reference_fusion!r}")

    @property
    def reference_scorer(self) -> bool:
        """Whether maps are fused with a reference map: from ``reference_uri`` frames, cell references, or both."""
        return self.use_reference or self.self_reference

    def output_affecting(self) -> dict[str, Any]:
        """Fields that change predictions (weights enter run_id through their checksum instead). Fields added
        later appear only where they apply (references) or differ from the old behaviour (a scale policy), so
        the run ids of runs they do not change stay as they were."""
        keep = ("backbone", "precision", "taps", "use_vv", "surgery", "sigma", "score_mode", "seed", "cls", "method",
                "use_reference", "memory", "region_head")
        out = {k: getattr(self, k) for k in keep}
        if self.reference_scorer:
            out.update(register_reference=self.register_reference, reference_weight=self.reference_weight)
            if self.reference_fusion != "mean":
                out["reference_fusion"] = self.reference_fusion
        if self.self_reference:
            out["self_reference"] = True
        if self.self_similarity:
            out["self_similarity"] = self.self_similarity
        if self.scale_policy is not None:
            out["scale_policy"] = self.scale_policy
        if self.defect_view:
            out["defect_view"] = True
        if self.grey_memory:
            out["grey_memory"] = True
        if self.region_classes:
            out["region_classes"] = True
        if self.reference_levels:
            out["reference_levels"] = True
        if self.map_shifts != 1:
            out["map_shifts"] = self.map_shifts
        return out


def zero_shot_spec(backbone: str, pretrained: str, *, scale_policy: float | None = None,
                   self_similarity: float | None = None, defect_view: bool | None = None, **fields: Any) -> ModelSpec:
    """The model zero-shot ``run`` scores with: its own defaults where None (self-similarity
    :data:`DEFAULT_SELF_SIMILARITY`, the defect view on; ``ModelSpec``'s, for library callers, are off), ``fields``
    (other :class:`ModelSpec` fields) as given. The CLI and the benchmarks that measure zero-shot ``run`` share it;
    the map shifts are the caller's (``run`` passes its ``--map-shifts``; the benchmarks keep 1)."""
    return ModelSpec(backbone=backbone, pretrained=pretrained, scale_policy=scale_policy,
                     self_similarity=DEFAULT_SELF_SIMILARITY if self_similarity is None else self_similarity,
                     defect_view=True if defect_view is None else defect_view, **fields)


def check_map_shifts(shifts: int) -> None:
    if shifts not in MAP_SHIFTS:
        raise ConfigError(f"--map-shifts must be one of {', '.join(map(str, MAP_SHIFTS))}, got {shifts}")


def check_self_similarity(weight: float) -> None:
    if not 0.0 <= weight <= 1.0:
        raise ConfigError(f"the self-similarity weight (--self-similarity, self_similarity in a checkpoint) must be "
                          f"in [0, 1], got {weight:g}")


@dataclass(frozen=True)
class CheckpointRequest:
    """``run --model URL``: a checkpoint whose backbone, weights, options, classes and thresholds apply. The
    driver reads it and resolves it into a :class:`ModelSpec`; the optional fields only check or relocate."""

    url: str
    backbone: str | None = None  # must equal the checkpoint's when given
    pretrained: str | None = None  # another location of the same weights
    pretrained_sha256: str | None = None
    precision: str = "fp32"
    scale_policy: str | None = None  # must name the checkpoint's policy when given (parse_scale_policy)
    defect_view: bool | None = None  # None: the checkpoint's
    map_shifts: int = 1  # views scored per view for the map (a run option: checkpoints do not record it)
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_map_shifts(self.map_shifts)
        if self.scale_policy is not None:
            parse_scale_policy(self.scale_policy)
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")


@dataclass(frozen=True)
class RunConfig:
    """One ``run``: where from, where to, how wide, and the model description."""

    input: str
    out: str
    model: ModelSpec | CheckpointRequest  # always a ModelSpec once the driver has resolved it
    thresholds: Thresholds = field(default_factory=Thresholds)
    tile_above: int = DEFAULT_TILE_ABOVE
    pattern: str | None = None
    shard_size: int = DEFAULT_SHARD_SIZE
    batch_size: int = 16
    actors: int = 1
    num_gpus: float = 0.0
    address: str | None = None
    overwrite: bool = False
    storage_options: dict[str, Any] = field(default_factory=dict)
    # benchmarks only: a stand-in for the model stage returning well-formed rows at this many model views a
    # second per actor (an accelerator that costs no CPU); its outputs are not predictions, and its run_id says so
    model_stub: float | None = None

    def __post_init__(self) -> None:
        if self.model_stub is not None and not self.model_stub > 0:
            raise ConfigError(f"--model-stub must be > 0 img/s, got {self.model_stub}")
        if self.shard_size < 1:
            raise ConfigError(f"--shard-size must be >= 1, got {self.shard_size}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.actors < 1:
            raise ConfigError(f"--actors must be >= 1, got {self.actors}")
        if not (math.isfinite(self.num_gpus) and self.num_gpus >= 0):
            raise ConfigError(f"--num-gpus must be a finite number >= 0, got {self.num_gpus}")

    def public_record(self) -> dict[str, Any]:
        """The config as stored in the run record (no secrets: storage options are checked non-secret)."""
        rec = dataclasses.asdict(self)
        rec["model"] = dataclasses.asdict(self.model)
        return rec
