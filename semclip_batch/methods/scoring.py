"""A method's model built for scoring frames: the backbone and ``spec.method``'s model around it, a checkpoint's
trained tensors and reference scales loaded, and what to encode for it (:class:`Scoring`). The pipeline's model
stage (:mod:`semclip_batch.pipeline.inference`) builds one per actor (benchmarks reach it through that stage); tests
build them directly."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from semclip_batch.config import ModelSpec
from semclip_batch.errors import WeightsError
from semclip_batch.methods.checkpoint import load_checkpoint
from semclip_batch.methods.features import encode_batch
from semclip_batch.methods.region_attributes import N_ATTRIBUTES
from semclip_batch.methods.registry import Scorer, depth_of, get_method, new_model, score_features
from semclip_batch.methods.weights import LoadedBackbone, load_backbone
from semclip_batch.model import SemClipOutput
from semclip_batch.model.grey_memory import GREY_MEMORY, OUTSIDE_BARS, OWN_MAX, REFERENCE_PLAIN, GreyMemory
from semclip_batch.model.line_residual import LINES_MAX
from semclip_batch.model.reference import ReferenceScorer, pixel_difference, reference_taps
from semclip_batch.model.region_classes import REGION_CLASSES, RegionClasses
from semclip_batch.model.shifts import half_patch_offsets, patch_size, shift_views, unshift_maps
from semclip_batch.model.towers import vision_tower


@dataclass
class Scoring:
    """A method's model (+ reference scorer) and what to encode for it."""

    model: Scorer
    reference: ReferenceScorer | None
    taps: tuple[int, ...]
    vv_from: int | None
    windows: bool
    offsets: tuple[tuple[int, int], ...] = ()  # half-patch shifts whose maps are averaged with the view's (model.shifts)
    grey: GreyMemory | None = None  # fused into each frame's map at its resolution (pipeline.inference), float32
    regions: RegionClasses | None = None  # the defect classes' share from the region at the map's maximum, on the CPU

    def to(self, device: torch.device, dtype: torch.dtype) -> Scoring:
        self.model = self.model.to(device=device, dtype=dtype)
        if self.reference is not None:
            self.reference = self.reference.to(device=device)
        if self.grey is not None:
            self.grey = self.grey.to(device=device)
        return self

    def __call__(self, x: torch.Tensor, refs: torch.Tensor | None = None,
                 has_ref: torch.Tensor | None = None) -> SemClipOutput:
        """Maps, class probabilities and embeddings of model inputs ``x`` (and their references). With
        ``offsets``, the map is the mean of the view's and of each shifted view's map moved back; the class
        scores and embeddings stay the view's own."""
        out = self._once(x, refs, has_ref)
        if not self.offsets:
            return out
        total = out.maps.float()
        for down, right in self.offsets:  # their class scores are never read
            moved = self._once(shift_views(x, down, right), None if refs is None else shift_views(refs, down, right),
                               has_ref, maps_only=True)
            total = total + unshift_maps(moved.maps.float(), down, right)
        maps = (total / (1 + len(self.offsets))).to(out.maps.dtype)
        return SemClipOutput(maps=maps, class_probs=out.class_probs, embeddings=out.embeddings)

    def class_probs(self, x: torch.Tensor) -> torch.Tensor:
        """The class probabilities of model inputs ``x`` alone (one pass: the shifts move only the map)."""
        return self._once(x, None, None).class_probs

    def _once(self, x: torch.Tensor, refs: torch.Tensor | None, has_ref: torch.Tensor | None,
              maps_only: bool = False) -> SemClipOutput:
        visual = vision_tower(self.model)
        feats = encode_batch(visual, x, self.taps, vv_from=self.vv_from, windows=self.windows)
        ref_feats = pixels = None
        if self.reference is not None and refs is not None and has_ref is not None and bool(has_ref.any()):
            ref_feats = encode_batch(visual, refs, self.reference.taps, vv_from=None, pooled=False)
            pixels = pixel_difference(x[:, 0], refs[:, 0])  # channel 0: grey in the backbone's normalised units
        return score_features(self.model, feats, (x.shape[-2], x.shape[-1]), self.reference, ref_feats, has_ref,
                              pixels, maps_only)


def build_model(spec: ModelSpec, text_embeddings: np.ndarray, expected_sha256: str | None = None,
                backbone: LoadedBackbone | None = None, tensors: Mapping[str, torch.Tensor] | None = None) -> Scoring:
    """Load the backbone (unless given; its vision tower alone where ``expected_sha256`` allows:
    :func:`~semclip_batch.methods.weights.load_backbone`) and build ``spec.method`` around it with the given class embeddings;
    with a checkpoint in the spec, its trained tensors (read here unless given, already verified) are loaded
    too (eval mode, fp32, CPU)."""
    if backbone is None:
        backbone = load_backbone(spec.backbone, spec.pretrained, seed=spec.seed, expected_sha256=expected_sha256,
                                 storage_options=spec.storage_options, vision_only=True)
    method = get_method(spec.method)
    model = new_model(spec, backbone.clip, torch.from_numpy(np.asarray(text_embeddings, dtype=np.float32)))
    depth = depth_of(backbone.clip)
    grey = regions = None
    reference = (ReferenceScorer(reference_taps(depth), weight=spec.reference_weight, fusion=spec.reference_fusion)
                 if spec.reference_scorer else None)
    if spec.checkpoint is not None:
        if tensors is None:
            tensors = load_checkpoint(spec.checkpoint, spec.storage_options).tensors
        problems = method.load(model, tensors)
        if reference is not None:
            if "reference.scale" not in tensors:
                problems.append("missing reference.scale")
            else:
                reference.scale.copy_(tensors["reference.scale"])
                if "reference.pixel_scale" in tensors:  # absent from checkpoints written before: tokens only
                    reference.pixel_scale.copy_(tensors["reference.pixel_scale"])
        if spec.grey_memory:
            grey = grey_memory_from(tensors, problems)
        if spec.region_classes:
            regions = region_classes_from(tensors, len(text_embeddings) - 1, problems)
        if problems:
            raise WeightsError(f"checkpoint {spec.checkpoint!r} does not fit this model ({', '.join(problems[:3])})")
    taps, vv_from = method.taps(model), method.vv_from(model)
    if reference is not None:
        taps = tuple(sorted({*taps, *reference.taps}))
    model = model.eval().requires_grad_(False)
    offsets = half_patch_offsets(spec.map_shifts, patch_size(vision_tower(model).conv1))
    return Scoring(model, reference, taps, vv_from, windows=method.windows, offsets=offsets, grey=grey, regions=regions)


def region_classes_from(tensors: Mapping[str, torch.Tensor], n_classes: int,
                        problems: list[str]) -> RegionClasses | None:
    """The checkpoint's region class regression over its ``n_classes`` defect classes; what is missing, misshapen
    or out of range is added to ``problems`` (None then)."""
    stored = {k.removeprefix(f"{REGION_CLASSES}."): v for k, v in tensors.items() if k.startswith(f"{REGION_CLASSES}.")}
    regions = RegionClasses(N_ATTRIBUTES, n_classes)
    try:
        regions.load_state_dict(stored)
    except RuntimeError as exc:
        problems.append(f"{REGION_CLASSES}: {str(exc).splitlines()[0][:120]}")
        return None
    if not regions.valid():
        problems.append(f"{REGION_CLASSES}: tensors not finite, a spread of 0, or a blend or share outside (0, 1]")
        return None
    return regions.eval()


def reads_references(tensors: Mapping[str, torch.Tensor]) -> bool:
    """Whether a checkpoint's grey-level memory keeps a die-to-die residual (rule 27's, or rule 30's outside the data
    bars): ``run`` then reads and registers each row's ``reference_uri`` frame for it (:func:`grey_memory_from` checks
    the tensor's value)."""
    flag = tensors.get(f"{GREY_MEMORY}.reference")
    return flag is not None and flag.numel() == 1 and flag.reshape(()).item() in (REFERENCE_PLAIN, OUTSIDE_BARS)


def grey_memory_from(tensors: Mapping[str, torch.Tensor], problems: list[str]) -> GreyMemory | None:
    """The checkpoint's grey-level memory (its size from the tensors); what is missing or misshapen is added to
    ``problems`` (None then)."""
    stored = {k.removeprefix(f"{GREY_MEMORY}."): v for k, v in tensors.items() if k.startswith(f"{GREY_MEMORY}.")}
    entries = stored.get("entries")
    if entries is None or entries.ndim != 2:
        problems.append(f"missing {GREY_MEMORY}.entries")
        return None
    grey = GreyMemory(entries=int(entries.shape[0]))
    stored.setdefault("own", grey.own)  # written before rule 18: the support's entries only
    for pair in (("lines", "line_scale"), ("reference", "reference_scale")):  # rules 23 and 27's residuals
        residual = set(pair) & set(stored)
        if len(residual) == 1:
            problems.append(f"{GREY_MEMORY}: {pair[0]} and {pair[1]} are stored together; only {residual.pop()} is here")
            return None
        if not residual:  # written before the rule, or without the residual
            stored |= {name: getattr(grey, name) for name in pair}
    try:
        grey.load_state_dict(stored)
    except RuntimeError as exc:
        problems.append(f"{GREY_MEMORY}: {str(exc).splitlines()[0][:120]}")
        return None
    scale, weight, drawn = float(grey.scale), float(grey.weight), int(grey.own)
    lines, line_scale = int(grey.lines), float(grey.line_scale)
    if (not len(grey.entries) or not scale > 0 or not 0 < weight <= 1 or not 0 <= drawn <= OWN_MAX
            or not bool(torch.isfinite(grey.entries).all())):
        problems.append(f"{GREY_MEMORY}: {len(grey.entries)} entries, scale {scale:g}, weight {weight:g}, own {drawn} "
                        f"(needs entries, a scale above 0, a weight in (0, 1] and own 0 to {OWN_MAX})")
        return None
    if lines and not (3 <= lines <= LINES_MAX and lines % 2 and 0 < line_scale < math.inf):
        problems.append(f"{GREY_MEMORY}: lines {lines}, line scale {line_scale:g} (needs lines 0, or odd from 3 to "
                        f"{LINES_MAX} with a finite scale above 0)")
        return None
    reference, reference_scale = int(grey.reference), float(grey.reference_scale)
    if reference not in (0, REFERENCE_PLAIN, OUTSIDE_BARS) or not 0 < reference_scale < math.inf:
        problems.append(f"{GREY_MEMORY}: reference {reference}, reference scale {reference_scale:g} (needs reference 0, "
                        f"{REFERENCE_PLAIN} or {OUTSIDE_BARS} with a finite scale above 0)")
        return None
    return grey.eval()
