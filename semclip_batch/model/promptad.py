"""PromptAD (Li et al., CVPR 2024) on an open_clip ViT, as the second few-shot baseline.

Prompts are learned from the normal support images only. A normal prompt is ``[ctx_1 .. ctx_n] <object>.``
with learnable context vectors (CoOp); anomaly prompts are made by *semantic concatenation* of a normal
prompt with an anomaly suffix: manual ones (``... <object> with <defect state>.``, the defect states of the
prompt file) and learnable ones (``... <object> with [actx_1 .. actx_m].``). Training pulls the normal
images' image and patch features to the normal prompts (cross-entropy against all prompts) and keeps an
*explicit anomaly margin*: the distance to the normal prototype must beat the distance to the anomaly
prototype by ``margin``; the learnable anomaly prototype is aligned to the manual one. Patch features are the
last block's V-V path tokens (CLIP Surgery's local features) through ``ln_post`` + ``proj``. Scoring: text map
= two-state softmax against the normal and anomaly prototypes; vision map = ``(1 - max cos) / 2`` of the
tapped blocks' patch tokens to a memory of the normal support images' tokens (mean over taps); fused as
``1 / (1/text + 1/vision)``; smoothed with SEM-CLIP's Gaussian. Image p(defect) from the pooled embedding
against the prototypes; defect classes share it by their text softmax.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .encoder import EncoderOutput, encode_dual_path
from .patchops import nearest_distance
from .semclip import SemClipOutput
from .towers import VisionTower, as_clip
from .twostate import TwoStateScorer


def project_tokens(visual: VisionTower, tokens: torch.Tensor) -> torch.Tensor:
    """Patch tokens (CLS dropped) through ``ln_post`` + ``proj``, normalised. ``(B, 1 + N, W)`` -> ``(B, N, E)``."""
    return F.normalize(visual.ln_post(tokens[:, 1:]) @ visual.proj, dim=-1)


class PromptAd(TwoStateScorer):
    """PromptAD scoring: learned normal / anomaly prototypes (``states``) and a normal-patch memory per tap."""

    def __init__(self, clip: nn.Module, n_classes: int, taps: tuple[int, ...], sigma: float = 4.0) -> None:
        super().__init__(clip, n_classes, sigma)
        self.taps = taps
        # the blocks it reads: the memory taps plus the last block (its V-V tokens are the local features)
        self.read_taps = tuple(sorted({*taps, len(self.visual.transformer.resblocks)}))
        width = self.visual.proj.shape[0]
        for k in range(len(taps)):
            self.register_buffer(f"memory{k}", torch.zeros(0, width))

    def set_memory(self, per_tap: Sequence[torch.Tensor]) -> None:
        for k, m in enumerate(per_tap):
            setattr(self, f"memory{k}", m.detach().float().contiguous())

    def memories(self) -> list[torch.Tensor]:
        return [getattr(self, f"memory{k}") for k in range(len(self.taps))]

    def encode(self, images: torch.Tensor) -> EncoderOutput:
        return encode_dual_path(self.visual, images, self.read_taps, 1)

    def patch_scores(self, enc: EncoderOutput) -> torch.Tensor:
        local = project_tokens(self.visual, enc.vv[-1] if enc.vv[-1] is not None else enc.original[-1])
        text = self.state_probability(local)
        memories = self.memories()
        if memories[0].shape[0] == 0:
            return text
        vision = torch.stack([nearest_distance(F.normalize(enc.original[self.read_taps.index(t)][:, 1:], dim=-1), m)
                              for t, m in zip(self.taps, memories, strict=True)]).mean(dim=0)
        return 1.0 / (1.0 / text.clamp_min(1e-6) + 1.0 / vision.clamp_min(1e-6))

    def from_encoded(self, enc: EncoderOutput, size: tuple[int, int]) -> SemClipOutput:
        return self.output(self.patch_scores(enc), enc.pooled, size)

    def forward(self, images: torch.Tensor) -> SemClipOutput:
        return self.from_encoded(self.encode(images), (images.shape[-2], images.shape[-1]))


class PromptLearner(nn.Module):
    """Learnable normal context and anomaly suffixes on a frozen open_clip text tower.

    ``normal_tokens``: ``(P, T)`` token ids of ``"X .. X <object>."`` (n_ctx placeholders);
    ``manual_tokens``: ``(A, T)`` of ``"X .. X <object> with <state>."``; ``learned_tokens``: ``(L, T)`` of
    ``"X .. X <object> with Y .. Y."`` (Y = n_ab placeholders, after the object words at ``ab_start``).
    """

    normal_tokens: torch.Tensor  # buffers, registered in __init__
    manual_tokens: torch.Tensor
    learned_tokens: torch.Tensor

    def __init__(self, clip: nn.Module, normal_tokens: torch.Tensor, manual_tokens: torch.Tensor,
                 learned_tokens: torch.Tensor, n_ctx: int, n_ab: int, ab_start: int, seed: int) -> None:
        super().__init__()
        self.clip = clip
        width = as_clip(clip).token_embedding.weight.shape[1]
        gen = torch.Generator().manual_seed(seed)
        self.ctx = nn.Parameter(torch.randn(normal_tokens.shape[0], n_ctx, width, generator=gen) * 0.02)
        self.ab_ctx = nn.Parameter(torch.randn(learned_tokens.shape[0], n_ab, width, generator=gen) * 0.02)
        self.n_ctx, self.n_ab, self.ab_start = n_ctx, n_ab, ab_start
        self.register_buffer("normal_tokens", normal_tokens)
        self.register_buffer("manual_tokens", manual_tokens)
        self.register_buffer("learned_tokens", learned_tokens)

    def _encode(self, tokens: torch.Tensor, ctx: torch.Tensor, ab: torch.Tensor | None) -> torch.Tensor:
        clip = as_clip(self.clip)
        x = clip.token_embedding(tokens)
        x = torch.cat([x[:, :1], ctx, x[:, 1 + self.n_ctx:]], dim=1)
        if ab is not None:
            s = self.ab_start
            x = torch.cat([x[:, :s], ab, x[:, s + self.n_ab:]], dim=1)
        x = x + clip.positional_embedding
        x = clip.transformer(x, attn_mask=clip.attn_mask)
        x = clip.ln_final(x)
        x = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)]
        x = x @ clip.text_projection if not isinstance(clip.text_projection, nn.Linear) else clip.text_projection(x)
        return F.normalize(x, dim=-1)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normal ``(P, E)``, manual anomaly ``(P * A, E)`` and learned anomaly ``(P * L, E)`` prompt embeddings."""
        p = self.ctx.shape[0]
        normal = self._encode(self.normal_tokens, self.ctx, None)
        a, n_l = self.manual_tokens.shape[0], self.learned_tokens.shape[0]
        manual = self._encode(self.manual_tokens.repeat(p, 1), self.ctx.repeat_interleave(a, dim=0), None)
        learned = self._encode(self.learned_tokens.repeat(p, 1), self.ctx.repeat_interleave(n_l, dim=0),
                               self.ab_ctx.repeat(p, 1, 1))
        return normal, manual, learned


def promptad_loss(feats: torch.Tensor, normal: torch.Tensor, manual: torch.Tensor, learned: torch.Tensor,
                  scale: torch.Tensor, margin: float) -> torch.Tensor:
    """PromptAD's objective on normal features ``(M, E)``: cross-entropy of "normal" against every prompt
    + explicit anomaly margin on the prototypes + alignment of the learned anomaly prototype to the manual one."""
    anomaly = torch.cat([manual, learned])
    logits = scale * feats @ torch.cat([normal, anomaly]).t()
    ce = -(logits.log_softmax(dim=-1)[:, : normal.shape[0]].logsumexp(dim=-1)).mean()
    p_n, p_a = F.normalize(normal.mean(0), dim=-1), F.normalize(anomaly.mean(0), dim=-1)
    eam = F.relu((feats - p_n).norm(dim=-1) - (feats - p_a).norm(dim=-1) + margin).mean()
    align = (F.normalize(learned.mean(0), dim=-1) - F.normalize(manual.mean(0), dim=-1)).pow(2).sum()
    return ce + eam + align
