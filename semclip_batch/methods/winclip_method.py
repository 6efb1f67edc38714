"""WinCLIP+ as a registered method: the zero-shot window scorer plus memories of the normal support images'
window embeddings (2x2 and 3x3 patches) and penultimate-block patch tokens (the paper's settings, fixed before
any SEM-CLIP figure was measured; only the support set's normal images are used, as in the paper)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from semclip_batch.config import ModelSpec
from semclip_batch.methods.features import Features
from semclip_batch.methods.fitting import Support, fit_temperature, normal_rows, pooled_embeddings
from semclip_batch.methods.registry import Method, depth_of, register
from semclip_batch.model import SemClipOutput
from semclip_batch.model.winclip import WinClip, penultimate_block


@register
class WinClipMethod(Method[WinClip]):
    name = "winclip"
    windows = True

    def build(self, spec: ModelSpec, clip: nn.Module, text: torch.Tensor) -> WinClip:
        model = WinClip(clip, n_classes=text.shape[0], sigma=spec.sigma)
        model.set_text_embeddings(text)
        return model

    def load(self, model: WinClip, tensors: Mapping[str, torch.Tensor]) -> list[str]:
        # memories first: their sizes come from the checkpoint
        model.set_memory(tensors.get("memory_patch", model.memory_patch),
                         [tensors.get(f"memory_window{k}", m) for k, m in enumerate(model.memories())])
        return super().load(model, tensors)

    def taps(self, model: WinClip) -> tuple[int, ...]:
        return (penultimate_block(depth_of(model)),)

    def score(self, model: WinClip, feats: Features, size: tuple[int, int]) -> SemClipOutput:
        return model.from_encoded(feats.window_features(depth_of(model)), size)

    def fit(self, model: WinClip, spec: ModelSpec, support: Support) -> dict[str, Any]:
        model.text_scale.fill_(fit_temperature(pooled_embeddings(support.feats), model.text_embeddings,
                                               support.data.labels))
        return fit_winclip(model, support.feats, support)


def fit_winclip(model: WinClip, feats: Features, support: Support) -> dict[str, Any]:
    """Fill WinCLIP+'s memories with the normal support images' patch tokens and window embeddings."""
    wf = feats.window_features(depth_of(model)).subset(normal_rows(support.data, "winclip"))
    model.set_memory(wf.patches.reshape(-1, wf.patches.shape[-1]), [w.reshape(-1, w.shape[-1]) for w in wf.windows])
    return {"memory_patches": int(model.memory_patch.shape[0])}
