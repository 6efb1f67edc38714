"""Three of ``train``'s kernels, the package's way against the way before it (docs/quality.md, "`train`'s time on
`logic`: the same work, faster"), best of ``--repeats`` on this machine's threads:

    .venv/bin/python benchmarks/train_kernels.py               # ~30 s here

- the grey-level memory's map of one ``--side`` px frame: ``GreyMemory.nearest`` in blocks of 1,024 neighbourhoods x
  512 entries, against one product of 1,024 neighbourhoods x all entries a block (the search before it), with
  ``--entries`` random entries (``train``'s 4,096), and whether the two maps are equal to the bit;
- the patch embedding of one adaptation step, forward and backward, ``--batch`` crops at the model's input with a
  quarter of the patches kept: ``embed_kept_patches`` against the whole grid embedded then gathered
  (``embed_patches`` + ``keep_tokens``), and the largest difference between the two;
- the Gaussian blur of one ``--side`` px map (``gaussian_blur``: a long axis in blocks of its band, at the maps'
  sigma 4 and the line residual's sigma 1) against the two whole matrix products before it, and the largest
  difference.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from unittest import mock

import torch

from semclip_batch.methods.weights import load_backbone, preprocess_config
from semclip_batch.model import grey_memory
from semclip_batch.model.encoder import embed_kept_patches, embed_patches, keep_tokens
from semclip_batch.model.grey_memory import DIM, PATCH, GreyMemory
from semclip_batch.model.semclip import blur_matrix, gaussian_blur
from semclip_batch.model.towers import vision_tower

KEEP = 0.25  # pretrain's default share of the patches a step runs


def best_seconds(work: Callable[[], object], repeats: int) -> float:
    """The least wall time of ``repeats`` calls of ``work`` (after one unmeasured call)."""
    work()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)


def one_block_nearest(memory: GreyMemory, q: torch.Tensor) -> torch.Tensor:
    """The search before blocks of entries: each block of neighbourhoods against every entry in one product."""
    squared = (memory.entries * memory.entries).sum(dim=1)
    least = [torch.addmm(squared, part, memory.entries.T, alpha=-2).amin(dim=1) + (part * part).sum(dim=1)
             for part in q.split(grey_memory.NEAREST_ROWS)]
    return torch.cat(least).clamp_min(0).sqrt()


def memory_map(side: int, entries: int, repeats: int) -> dict[str, float | bool]:
    """Seconds for one frame's neighbourhood map, blocked and in one block, and whether the maps are equal."""
    gen = torch.Generator().manual_seed(0)
    memory = GreyMemory(entries)
    memory.entries.copy_(0.3 * torch.randn(entries, DIM, generator=gen))
    memory.axes.copy_(torch.linalg.qr(torch.randn(PATCH * PATCH, DIM, generator=gen))[0])
    levels = torch.rand(side, side, generator=gen)
    blocked = best_seconds(lambda: memory.neighbourhood_map(levels), repeats)
    with mock.patch.object(GreyMemory, "nearest", one_block_nearest):
        before = best_seconds(lambda: memory.neighbourhood_map(levels), repeats)
        map_before = memory.neighbourhood_map(levels)
    return {"blocked_s": blocked, "one_block_s": before, "equal": bool(torch.equal(map_before,
                                                                                 memory.neighbourhood_map(levels)))}


def patch_embedding(batch: int, repeats: int) -> dict[str, float]:
    """Seconds for one step's patch embedding, forward and backward, kept patches only and the whole grid, and the
    largest difference of the embeddings."""
    clip = load_backbone("semclip-tiny", "shipped", seed=0).clip.train()
    visual = vision_tower(clip)
    size, side = preprocess_config("semclip-tiny", tile_above=10**9).image_size, visual.conv1.kernel_size[0]
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, size, size, generator=gen)
    n = (size // side) ** 2
    keep = torch.rand(batch, n, generator=gen).topk(round(KEEP * n), dim=1).indices.sort(dim=1).values

    def step(embed: Callable[[], torch.Tensor]) -> Callable[[], object]:
        def run() -> None:
            clip.zero_grad()
            embed().square().sum().backward()
        return run

    kept = best_seconds(step(lambda: embed_kept_patches(visual, images, keep)), repeats)
    whole = best_seconds(step(lambda: keep_tokens(embed_patches(visual, images), keep)), repeats)
    with torch.no_grad():
        gap = (embed_kept_patches(visual, images, keep) - keep_tokens(embed_patches(visual, images), keep)).abs().max()
    return {"kept_s": kept, "whole_grid_s": whole, "max_difference": float(gap)}


def blur(side: int, sigma: float, repeats: int) -> dict[str, float]:
    """Seconds for one map's blur, in blocks of the band and as the two whole products, and the largest difference."""
    maps = torch.rand(1, side, side, generator=torch.Generator().manual_seed(2))
    along = blur_matrix(side, sigma)

    def whole() -> torch.Tensor:
        return along.t() @ (maps @ along)

    gap = (gaussian_blur(maps, sigma) - whole()).abs().max()
    return {"blocked_s": best_seconds(lambda: gaussian_blur(maps, sigma), repeats),
            "whole_s": best_seconds(whole, repeats), "max_difference": float(gap)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=1024, help="the frame's side in px (logic's largest)")
    parser.add_argument("--entries", type=int, default=4096, help="the memory's entries (train's default)")
    parser.add_argument("--batch", type=int, default=32, help="crops a step (pretrain's and the adaptation's)")
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    print(f"torch threads: {torch.get_num_threads()}")
    m = memory_map(args.side, args.entries, args.repeats)
    print(f"grey-level memory map, {args.side} px, {args.entries} entries: blocked {m['blocked_s']:.3f} s, "
          f"one block {m['one_block_s']:.3f} s, maps equal to the bit: {m['equal']}")
    e = patch_embedding(args.batch, args.repeats)
    print(f"patch embedding, {args.batch} crops, {KEEP:g} of the patches kept, forward and backward: kept only "
          f"{1000 * e['kept_s']:.1f} ms, whole grid {1000 * e['whole_grid_s']:.1f} ms, "
          f"largest difference {e['max_difference']:.2e}")
    for sigma in (4.0, 1.0):
        b = blur(args.side, sigma, args.repeats)
        print(f"gaussian blur, {args.side} px, sigma {sigma:g}: band blocks {1000 * b['blocked_s']:.1f} ms, whole products "
              f"{1000 * b['whole_s']:.1f} ms, largest difference {b['max_difference']:.2e}")


if __name__ == "__main__":
    main()
