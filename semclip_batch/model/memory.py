"""A memory of normal patch tokens from the support frames, fused into SEM-CLIP's map (beyond the paper: what
WinCLIP+ and PromptAD have and SEM-CLIP lacks; PatchCore-style nearest-neighbour distances).

The memory holds original-path patch tokens of mid-level blocks (the middle taps: PatchCore's finding that
mid-level features localise best) of every clean patch of the support set: all patches of normal frames and
the patches of defect frames that hold no defect pixel. A patch scores ``(1 - max cos) / 2`` to its nearest
memory token, averaged over the memory taps, less the frame's median distance (:func:`centred`); the map is
``clamp(centred / (2 * scale), 0, 1)`` with ``scale`` the 99th percentile of held-out clean patches' centred
distances, and the fused map is
``(1 - weight) * method + weight * memory`` (:meth:`.semclip.SemClip.fused_map`). ``scale`` and ``weight`` are
fitted on the support set.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .encoder import EncoderOutput
from .patchops import nearest_distance

MAX_MEMORY = 8192  # tokens per memory tap (a seeded random subset beyond it): ~2 GFLOP per frame at width 896


def centred(distance: torch.Tensor) -> torch.Tensor:
    """Each frame's distances less their median ``(B, N)``: a frame unlike every support frame as a whole (another
    pattern scale, texture or contrast) is not flagged everywhere; what stands out within it still is."""
    return distance - distance.median(dim=1, keepdim=True).values


def memory_taps(taps: tuple[int, ...]) -> tuple[int, ...]:
    """The middle taps of a model's taps (all of them when there are fewer than three)."""
    return taps[1:-1] if len(taps) >= 3 else taps


class PatchMemory(nn.Module):
    """Normal patch tokens per memory tap, their distance scale and the fusion weight (buffers: saved with the
    model; the bank's size comes from the checkpoint)."""

    scale: torch.Tensor
    weight: torch.Tensor

    def __init__(self, taps: tuple[int, ...], width: int) -> None:
        super().__init__()
        self.taps = taps
        for k in range(len(taps)):
            self.register_buffer(f"bank{k}", torch.zeros(0, width))
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("weight", torch.tensor(0.0))
        self.left_out = False  # maps scored without it (train's checks): no distances taken, the weight at 0

    def banks(self) -> list[torch.Tensor]:
        return [getattr(self, f"bank{k}") for k in range(len(self.taps))]

    @property
    def empty(self) -> bool:
        return self.banks()[0].shape[0] == 0

    def set_banks(self, banks: list[torch.Tensor], seed: int = 0) -> None:
        """Store normalised ``(M, W)`` tokens per tap, at most ``MAX_MEMORY`` each (a seeded random subset)."""
        gen = torch.Generator().manual_seed(seed)
        for k, bank in enumerate(banks):
            if bank.shape[0] > MAX_MEMORY:
                bank = bank[torch.randperm(bank.shape[0], generator=gen)[:MAX_MEMORY]]
            setattr(self, f"bank{k}", F.normalize(bank.detach().float(), dim=-1).contiguous())

    def tokens(self, enc: EncoderOutput, taps: tuple[int, ...]) -> list[torch.Tensor]:
        """Normalised patch tokens ``(B, N, W)`` of each memory tap, from an encoding at ``taps``."""
        return [F.normalize(enc.original[taps.index(t)][:, 1:].float(), dim=-1) for t in self.taps]

    def distance(self, enc: EncoderOutput, taps: tuple[int, ...]) -> torch.Tensor:
        """``(B, N)`` mean nearest-neighbour distance over the memory taps."""
        return self.token_distance(self.tokens(enc, taps))

    def token_distance(self, tokens: list[torch.Tensor]) -> torch.Tensor:
        """:meth:`distance` of tokens already taken by :meth:`tokens`, one ``(B, N, W)`` per memory tap."""
        # in the tokens' dtype (float32): a model held in bf16 holds its banks in bf16 too
        terms = [nearest_distance(t, bank.to(t.dtype)) for t, bank in zip(tokens, self.banks(), strict=True)]
        return torch.stack(terms).mean(dim=0)

    def patch_scores(self, distance: torch.Tensor) -> torch.Tensor:
        """Distances ``(B, N)`` -> scores in [0, 1], after :func:`centred`."""
        return (centred(distance) / (2.0 * self.scale)).clamp(0.0, 1.0)

