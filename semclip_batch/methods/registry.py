"""The scoring methods behind one interface: SEM-CLIP and the baselines it is measured against (WinCLIP+,
PromptAD), optionally with reference frames. Builds a method's model from a spec (and checkpoint tensors) and
scores precomputed :class:`~semclip_batch.methods.features.Features`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import overload

import torch
from torch import nn

from semclip_batch.config import METHODS, ModelSpec
from semclip_batch.methods.checkpoint import BACKBONE_PREFIXES
from semclip_batch.methods.features import Features
from semclip_batch.model import SemClip, SemClipConfig, SemClipOutput, default_taps
from semclip_batch.model.encoder import EncoderOutput
from semclip_batch.model.promptad import PromptAd
from semclip_batch.model.reference import ReferenceScorer
from semclip_batch.model.towers import vision_tower
from semclip_batch.model.winclip import WinClip, WindowFeatures, penultimate_block

__all__ = ["METHODS", "Scorer", "load_trained", "method_taps", "model_inputs", "needed_taps", "new_model", "score_features"]
Scorer = SemClip | WinClip | PromptAd


def depth_of(clip: nn.Module) -> int:
    """Blocks of the vision tower of a CLIP model or of a scorer (anything with ``.visual``)."""
    return len(vision_tower(clip).transformer.resblocks)


def method_taps(spec: ModelSpec, depth: int) -> tuple[int, ...]:
    return tuple(spec.taps) if spec.taps else default_taps(depth)


def new_model(spec: ModelSpec, clip: nn.Module, text: torch.Tensor) -> Scorer:
    """An untrained model of ``spec.method`` around ``clip`` with class embeddings ``text`` ``(C, E)``."""
    taps = method_taps(spec, depth_of(clip))
    if spec.method == "semclip":
        cfg = SemClipConfig(taps=taps, use_vv=spec.use_vv, vv_from=spec.vv_from, surgery=spec.surgery,
                            surgery_weights=spec.surgery_weights, sigma=spec.sigma, cls=spec.cls)
        semclip = SemClip(clip, cfg, n_classes=text.shape[0])
        semclip.set_text_embeddings(text)
        return semclip
    if spec.method == "winclip":
        winclip = WinClip(clip, n_classes=text.shape[0], sigma=spec.sigma)
        winclip.set_text(text)
        return winclip
    promptad = PromptAd(clip, n_classes=text.shape[0], taps=taps, sigma=spec.sigma)
    promptad.text_embeddings.copy_(torch.nn.functional.normalize(text.float(), dim=-1))
    return promptad


def load_trained(model: Scorer, tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Load checkpoint tensors (memories first: their sizes come from the checkpoint). Returns problems."""
    if isinstance(model, WinClip):
        model.set_memory(tensors.get("memory_patch", model.memory_patch),
                         [tensors.get(f"memory_window{k}", m) for k, m in enumerate(model.memories())])
    elif isinstance(model, PromptAd):
        model.set_memory([tensors.get(f"memory{k}", m) for k, m in enumerate(model.memories())])
    own = {k: v for k, v in tensors.items() if not k.startswith("reference.")}
    missing, unexpected = model.load_state_dict(own, strict=False)
    return [f"unexpected {k}" for k in unexpected] + [f"missing {k}" for k in missing if not k.startswith(BACKBONE_PREFIXES)]


@overload
def model_inputs(model: SemClip | PromptAd, feats: Features) -> EncoderOutput: ...


@overload
def model_inputs(model: WinClip, feats: Features) -> WindowFeatures: ...


def model_inputs(model: Scorer, feats: Features) -> EncoderOutput | WindowFeatures:
    """What ``model.from_encoded`` takes, sliced from shared features."""
    if isinstance(model, SemClip):
        return feats.select(model.cfg.taps, model.cfg.use_vv)
    if isinstance(model, WinClip):
        return feats.window_features(depth_of(model))
    return feats.select(model.read_taps, True)


def needed_taps(model: Scorer) -> tuple[int, ...]:
    if isinstance(model, SemClip):
        return model.cfg.taps
    if isinstance(model, WinClip):
        return (penultimate_block(depth_of(model)),)
    return model.read_taps


def score_features(model: Scorer, feats: Features, size: tuple[int, int], reference: ReferenceScorer | None = None,
                   ref_feats: Features | None = None, has_reference: torch.Tensor | None = None) -> SemClipOutput:
    """Maps (model-input size), class probabilities and embeddings of precomputed features, with the
    reference map fused in where given."""
    # one call per input type: WinClip.from_encoded takes WindowFeatures, the others an EncoderOutput
    if isinstance(model, WinClip):
        out = model.from_encoded(model_inputs(model, feats), size)
    else:
        out = model.from_encoded(model_inputs(model, feats), size)
    if reference is None or ref_feats is None or has_reference is None or not bool(has_reference.any()):
        return out
    dist = reference.distance(feats.dual, feats.taps, ref_feats.dual, ref_feats.taps)
    return SemClipOutput(maps=reference.fuse(out.maps, dist, has_reference), class_probs=out.class_probs,
                         embeddings=out.embeddings)
