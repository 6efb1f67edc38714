"""Frozen-backbone features of a set of views, computed once and sliced for every method and ablation
(``train`` encodes its support set once; ``benchmarks/quality.py`` shares one encoding per backbone and lot)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from semclip_batch.config import PreprocessConfig
from semclip_batch.io.preprocess import normalize
from semclip_batch.model.encoder import EncoderOutput, encode_dual_path
from semclip_batch.model.towers import VisionTower
from semclip_batch.model.winclip import WINDOW_SCALES, WindowFeatures, encode_windows, penultimate_block


@dataclass
class Features:
    """``dual``: both paths at ``taps`` (V-V from block 1); ``windows``: WinCLIP's window embeddings, if asked."""

    dual: EncoderOutput
    taps: tuple[int, ...]
    windows: list[torch.Tensor] | None = None

    def select(self, taps: tuple[int, ...], use_vv: bool = True) -> EncoderOutput:
        """The encoder output a model with these taps (and V-V path or not) would have computed."""
        missing = set(taps) - set(self.taps)
        if missing:
            raise ValueError(f"taps {sorted(missing)} were not encoded (have {self.taps})")
        pick = [self.taps.index(t) for t in taps]
        return EncoderOutput(pooled=self.dual.pooled, original=[self.dual.original[i] for i in pick],
                             vv=[self.dual.vv[i] if use_vv else None for i in pick])

    def window_features(self, depth: int) -> WindowFeatures:
        if self.windows is None:
            raise ValueError("window embeddings were not encoded")
        penultimate = self.dual.original[self.taps.index(penultimate_block(depth))][:, 1:]
        return WindowFeatures(pooled=self.dual.pooled, windows=self.windows, patches=F.normalize(penultimate, dim=-1))

    def subset(self, idx: torch.Tensor) -> Features:
        d = self.dual
        dual = EncoderOutput(pooled=d.pooled[idx], original=[t[idx] for t in d.original],
                             vv=[None if t is None else t[idx] for t in d.vv])
        return Features(dual, self.taps, None if self.windows is None else [w[idx] for w in self.windows])


def encode_batch(visual: VisionTower, x: torch.Tensor, taps: tuple[int, ...], *, vv_from: int | None = 1,
                 windows: bool = False, pooled: bool = True) -> Features:
    """Encode normalised images ``(B, 3, S, S)``: both paths at ``taps`` (+ the penultimate block and WinCLIP's
    window embeddings when ``windows``); without ``pooled``, only up to the last tap (no pooled embedding)."""
    depth = len(visual.transformer.resblocks)
    taps = tuple(sorted({*taps, penultimate_block(depth)} if windows else set(taps)))
    dual = encode_dual_path(visual, x, taps, vv_from, pooled=pooled)
    return Features(dual, taps, [encode_windows(visual, x, s) for s in WINDOW_SCALES] if windows else None)


def concat(parts: list[Features]) -> Features:
    cat = lambda xs: None if xs[0] is None else torch.cat(xs)  # noqa: E731
    first = parts[0]
    dual = EncoderOutput(pooled=torch.cat([p.dual.pooled for p in parts]),
                         original=[torch.cat([p.dual.original[k] for p in parts]) for k in range(len(first.taps))],
                         vv=[cat([p.dual.vv[k] for p in parts]) for k in range(len(first.taps))])
    windows = None
    if first.windows is not None:
        per_part = [p.windows for p in parts if p.windows is not None]
        assert len(per_part) == len(parts)  # every part comes from the same encode_batch options
        windows = [torch.cat([w[k] for w in per_part]) for k in range(len(first.windows))]
    return Features(dual, first.taps, windows)


@torch.no_grad()
def encode_views(visual: VisionTower, views: torch.Tensor, prep: PreprocessConfig, taps: tuple[int, ...], *,
                 vv_from: int | None = 1, windows: bool = False, pooled: bool = True, batch: int = 32) -> Features:
    """Encode grey views ``(N, S, S)`` in [0, 1] once, in batches (see :func:`encode_batch`)."""
    return concat([encode_batch(visual, normalize(views[i:i + batch], prep), taps, vv_from=vv_from, windows=windows,
                                pooled=pooled) for i in range(0, views.shape[0], batch)])
