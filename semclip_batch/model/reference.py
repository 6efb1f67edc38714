"""Reference frames (beyond the paper): score each patch also by its distance to the nearest patch tokens of
a defect-free frame of the same site, within ``radius`` patches of the same place, and fuse that map with the
method's map.

Distance: ``(1 - max cos) / 2`` of original-path patch tokens of the first tapped block (the most local
features; on a validation lot, seed 3000, adding deeper blocks lowered pixel AUROC from 0.94 to 0.77). The map is
``distance / (distance + scale)``, where ``scale`` is the 99th percentile of the distances of the support set's
normal patches (fitted by ``train``): 0.5 there, rising towards 1 and never saturating, so that a registered
reference (whose normal patches barely differ) still ranks a particle above a mild mismatch elsewhere (a clamp
at twice the scale tied them: 1.0 at both). Smoothed like the method's map.

Pixel difference (die-to-die, as inspection tools compare): ``|view - reference view|`` of the registered pair,
Gaussian-smoothed over :data:`PIXEL_SIGMA` px against shot noise, as ``d / (d + pixel_scale)`` with
``pixel_scale`` the 99th percentile over the support set's normal frames. Patch tokens dilute a particle of a
few pixels in a 16 px patch; the pixel difference does not (a routing fixture of 4-8 px particles: token
distances alone ranked bright, noisy wires above the particle). The reference map joins the two terms by
``fusion``: their ``mean`` (checkpoints written before the choice), or their ``max`` (a defect that only one
of the two sees, a particle below a patch or a pattern change the pixels of a noisy pair hide, keeps its
score instead of half of it), and is fused as
``(1 - weight) * method + weight * reference`` for rows that have a reference frame. Checkpoints written before
the pixel term (no ``reference.pixel_scale``, so 0 here) score as they did: tokens alone, as
``clamp(d / (2 * scale), 0, 1)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .encoder import EncoderOutput
from .patchops import grid_to_image, neighbourhood_distance
from .semclip import gaussian_blur


def reference_taps(depth: int) -> tuple[int, ...]:
    """The blocks whose tokens are compared: the first of SEM-CLIP's default taps (block L/4)."""
    return (max(1, round(depth / 4)),)


PIXEL_SIGMA = 1.5  # px at model input: the pixel difference smoothed against shot noise


def pixel_difference(views: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
    """``|view - reference|`` smoothed over :data:`PIXEL_SIGMA` px. ``(B, S, S)`` grey (any affine unit, the same
    for both) -> ``(B, S, S)`` float32."""
    return gaussian_blur((views.float() - refs.float()).abs(), PIXEL_SIGMA)


class ReferenceScorer(nn.Module):
    scale: torch.Tensor  # buffers, registered in __init__
    pixel_scale: torch.Tensor

    def __init__(self, taps: tuple[int, ...], radius: int = 1, weight: float = 0.5, sigma: float = 4.0,
                 fusion: str = "mean") -> None:
        super().__init__()
        if fusion not in ("mean", "max"):
            raise ValueError(f"fusion must be 'mean' or 'max', got {fusion!r}")
        self.taps, self.radius, self.weight, self.sigma, self.fusion = taps, radius, weight, sigma, fusion
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("pixel_scale", torch.tensor(0.0))  # 0: no pixel term (checkpoints written before)

    def distance(self, image: EncoderOutput, image_taps: tuple[int, ...], reference: EncoderOutput,
                 reference_taps: tuple[int, ...]) -> torch.Tensor:
        """``(B, N)`` mean neighbourhood distance over this scorer's taps."""
        terms = []
        for t in self.taps:
            a = F.normalize(image.original[image_taps.index(t)][:, 1:].float(), dim=-1)
            b = F.normalize(reference.original[reference_taps.index(t)][:, 1:].float(), dim=-1)
            terms.append(neighbourhood_distance(a, b, self.radius))
        return torch.stack(terms).mean(dim=0)

    def relative(self, distance: torch.Tensor) -> torch.Tensor:
        """Distances as ``d / (d + scale)`` in [0, 1): 0.5 at the support's 99th percentile of normal patches."""
        d = distance.clamp_min(0.0)
        return d / (d + self.scale)

    def fuse(self, maps: torch.Tensor, distance: torch.Tensor, has_reference: torch.Tensor,
             pixels: torch.Tensor | None = None) -> torch.Tensor:
        """Method maps ``(B, H, W)``, token distances ``(B, N)`` and :func:`pixel_difference` maps ``(B, H, W)``
        -> fused maps; rows without a reference unchanged."""
        return self.join(maps, self.reference_map(distance, (maps.shape[-2], maps.shape[-1]), pixels), has_reference)

    def reference_map(self, distance: torch.Tensor, size: tuple[int, int],
                      pixels: torch.Tensor | None = None) -> torch.Tensor:
        """The reference's own map ``(B, H, W)`` at ``size``, from token distances ``(B, N)`` and pixel differences:
        what :meth:`fuse` joins with the method's maps (it does not depend on them)."""
        legacy = float(self.pixel_scale) <= 0
        tokens = distance / (2.0 * self.scale) if legacy else self.relative(distance)
        ref = gaussian_blur(grid_to_image(tokens, size), self.sigma)
        if legacy:
            return ref.clamp(0.0, 1.0)
        if pixels is not None:
            d = pixels.to(ref.dtype).clamp_min(0.0)
            pix = d / (d + self.pixel_scale)
            ref = torch.maximum(ref, pix) if self.fusion == "max" else 0.5 * (ref + pix)
        return ref

    def join(self, maps: torch.Tensor, ref: torch.Tensor, has_reference: torch.Tensor) -> torch.Tensor:
        """``(1 - weight) * maps + weight * ref`` on rows with a reference; the others' maps unchanged."""
        fused = (1.0 - self.weight) * maps + self.weight * ref
        return torch.where(has_reference.view(-1, 1, 1), fused, maps)
