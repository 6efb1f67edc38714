"""WinCLIP+ (Jeong et al., CVPR 2023) on an open_clip ViT, as the few-shot baseline SEM-CLIP is measured against.

Zero-shot part: every ``s x s`` window of the patch grid (s = 2, 3: 32 and 48 px at 240 px input, the paper's
small and mid scales for ViT-B/16+) is re-encoded on its own — the class token plus only that window's patch
tokens, with their position embeddings, through every block ("masked windows re-encoded"; no token averaging)
— and scored by a two-state softmax against the normal and anomalous text (the prompt file's ``normal`` class
and the union of its defect classes). Each patch gets the harmonic mean of the scores of the windows covering
it; the scales are averaged. Few-shot part (+): memories of the normal support images' window embeddings
per scale and penultimate-block patch tokens; a window or patch scores ``(1 - max cos) / 2`` to its memory;
window scores go to patches harmonically; the few-shot map is the mean over the three memories. The map is
the mean of the zero-shot and few-shot maps, smoothed with the same Gaussian as SEM-CLIP. Image level: the
two-state softmax of the pooled embedding gives p(defect); defect classes share it by their text softmax.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .encoder import embed_patches, encode_dual_path
from .patchops import harmonic_to_patches, nearest_distance, window_index
from .semclip import SemClipOutput
from .towers import VisionTower
from .twostate import TwoStateScorer

WINDOW_SCALES = (2, 3)


def penultimate_block(depth: int) -> int:
    """The block whose patch tokens fill the patch memory (1-based)."""
    return max(1, depth - 1)


@dataclass
class WindowFeatures:
    """``pooled``: ``(B, E)``; ``windows[i]``: ``(B, n_windows, E)`` normalised, scale ``WINDOW_SCALES[i]``;
    ``patches``: ``(B, N, W)`` normalised penultimate-block patch tokens."""

    pooled: torch.Tensor
    windows: list[torch.Tensor]
    patches: torch.Tensor

    def subset(self, idx: torch.Tensor) -> WindowFeatures:
        return WindowFeatures(self.pooled[idx], [w[idx] for w in self.windows], self.patches[idx])


def encode_windows(visual: VisionTower, images: torch.Tensor, scale: int) -> torch.Tensor:
    """Masked re-encoding of every ``scale x scale`` window. ``(B, 3, S, S)`` -> ``(B, n_windows, E)`` normalised."""
    x = embed_patches(visual, images)
    b, t, w = x.shape
    grid = round((t - 1) ** 0.5)
    idx = window_index(grid, scale).to(x.device) + 1
    n_win = idx.shape[0]
    cls = x[:, :1, None, :].expand(b, n_win, 1, w)
    seq = torch.cat([cls, x[:, idx]], dim=2).reshape(b * n_win, 1 + scale * scale, w)
    batch_first = getattr(visual.transformer, "batch_first", True)
    for block in visual.transformer.resblocks:
        seq = block(seq) if batch_first else block(seq.transpose(0, 1)).transpose(0, 1)
    emb = visual.ln_post(seq[:, 0])
    if visual.proj is not None:
        emb = emb @ visual.proj
    return F.normalize(emb, dim=-1).view(b, n_win, -1)


class WinClip(TwoStateScorer):
    """WinCLIP+ scoring; empty memories = zero-shot WinCLIP."""

    memory_patch: torch.Tensor  # buffer, registered in __init__

    def __init__(self, clip: nn.Module, n_classes: int, sigma: float = 4.0) -> None:
        super().__init__(clip, n_classes, sigma)
        embed, width = self.visual.proj.shape[1], self.visual.proj.shape[0]
        self.register_buffer("memory_patch", torch.zeros(0, width))
        for k in range(len(WINDOW_SCALES)):
            self.register_buffer(f"memory_window{k}", torch.zeros(0, embed))

    def set_text_embeddings(self, text: torch.Tensor) -> None:
        """Class embeddings ``(C, E)`` (class 0 normal); the anomalous state is the mean of the defect classes."""
        super().set_text_embeddings(text)
        text = self.text_embeddings
        self.states.copy_(torch.stack([text[0], F.normalize(text[1:].mean(dim=0), dim=-1)]))

    def set_memory(self, patches: torch.Tensor, windows: Sequence[torch.Tensor]) -> None:
        """Memories of normal features: ``(M0, W)`` patch tokens and one ``(Mk, E)`` per window scale."""
        self.memory_patch = patches.detach().float().contiguous()
        for k, w in enumerate(windows):
            setattr(self, f"memory_window{k}", w.detach().float().contiguous())

    def memories(self) -> list[torch.Tensor]:
        return [getattr(self, f"memory_window{k}") for k in range(len(WINDOW_SCALES))]

    def encode(self, images: torch.Tensor) -> WindowFeatures:
        enc = encode_dual_path(self.visual, images, (penultimate_block(len(self.visual.transformer.resblocks)),), None)
        return WindowFeatures(pooled=enc.pooled, windows=[encode_windows(self.visual, images, s) for s in WINDOW_SCALES],
                              patches=F.normalize(enc.original[0][:, 1:], dim=-1))

    def patch_scores(self, feats: WindowFeatures) -> torch.Tensor:
        """``(B, N)`` patch anomaly scores before upsampling."""
        n = feats.patches.shape[1]
        zero = torch.stack([harmonic_to_patches(self.state_probability(w),
                                                window_index(round(n ** 0.5), s), n)
                            for w, s in zip(feats.windows, WINDOW_SCALES, strict=True)]).mean(dim=0)
        if self.memory_patch.shape[0] == 0:
            return zero
        few = [nearest_distance(feats.patches, self.memory_patch)]
        for w, s, mem in zip(feats.windows, WINDOW_SCALES, self.memories(), strict=True):
            few.append(harmonic_to_patches(nearest_distance(w, mem), window_index(round(n ** 0.5), s), n))
        return 0.5 * (zero + torch.stack(few).mean(dim=0))

    def from_encoded(self, feats: WindowFeatures, size: tuple[int, int]) -> SemClipOutput:
        return self.output(self.patch_scores(feats), feats.pooled, size)

    def forward(self, images: torch.Tensor) -> SemClipOutput:
        return self.from_encoded(self.encode(images), (images.shape[-2], images.shape[-1]))
