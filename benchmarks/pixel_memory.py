"""The grey-level memory that `train` fits and `run` fuses (`semclip_batch/model/grey_memory.py`, rule 17 in
docs/quality.md), measured alone against a run's maps: fitted here on a whole support lot and scored on a test lot.

    .venv/bin/python benchmarks/pixel_memory.py SUPPORT.csv TEST.csv --out RUN_OUT    # RUN_OUT: `run` of TEST.csv

The support frames' levels as `run`'s decode stage ships them (stretched between their 0.5 and 99.5 % levels, in
1/255 steps) give the memory (`fewshot/grey_memory_fit.fit_grey_memory`: every clean 11 x 11 neighbourhood every
4 px, centred and norm-scaled, 16 principal axes, at most 2,048 a frame, ``--bank`` entries chosen greedily as
PatchCore does, ``--random``: a seeded random subset; each frame also compared with ``--own`` of its own
neighbourhoods more than 24 px away, rule 18, 0: the entries only; the distance scale from a seeded fifth of the
frames). Each test frame's memory map (`GreyMemory.frame_map`, in the stored masks' uint8 form) is scored with ``eval``'s own
pixel counts (pAUROC, F1max, AUPRO) against the test manifest's masks, next to the maps `run` stored in RUN_OUT and
their fusions ``(1 - w) * run + w * memory`` for each ``--weights`` value. (`train` fits it on the support frames
its checks do not hold out and keeps it only where those frames gain: this script shows the memory itself.) Which
weight to use is a choice: make it on validation lots, never on the lots reported.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from semclip_batch.analysis.evaluate import joined_rows, truth_mask
from semclip_batch.analysis.metrics import PixelCounts
from semclip_batch.errors import OK
from semclip_batch.fewshot.grey_memory_fit import ENTRIES, fit_grey_memory, native_frames
from semclip_batch.io import storage
from semclip_batch.io.layout import OutLayout
from semclip_batch.io.manifest import read_manifest
from semclip_batch.io.masks import mask_array, open_masks
from semclip_batch.methods.decisions import to_mask
from semclip_batch.model.grey_memory import OWN


def figures(counts: PixelCounts) -> str:
    return " ".join(f"{name} {value:.3f}" if value is not None else f"{name} n/a"
                    for name, value in (("pAUROC", counts.auroc()), ("F1max", counts.f1_max()),
                                        ("AUPRO", counts.aupro())))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("support")
    ap.add_argument("test")
    ap.add_argument("--out", help="a `run` of TEST on which to compare and fuse (its stored maps)")
    ap.add_argument("--bank", type=int, default=ENTRIES)
    ap.add_argument("--weights", default="0.5")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--random", action="store_true", help="draw the memory at random instead of greedily (k-centre)")
    ap.add_argument("--own", type=int, default=0,
                    help=f"the frame's own neighbourhoods each is also compared with (rule 18 drew {OWN}; 0: none)")
    args = ap.parse_args()
    start = time.perf_counter()
    support = native_frames(read_manifest(args.support), None)
    memory = fit_grey_memory([(f.as_levels(), f.mask) for f in support.values()], args.seed, entries=args.bank,
                             coreset=not args.random, own=args.own)
    print(f"memory ({'random' if args.random else 'greedy'}): {len(memory.entries)} neighbourhoods, own {args.own}, "
          f"scale {float(memory.scale):.4f}, {time.perf_counter() - start:.0f} s")
    weights = [float(w) for w in args.weights.split(",")] if args.out else []
    counts = {name: PixelCounts() for name in ["pixel memory", *(["run"] if args.out else []),
                                               *(f"fused w={w:g}" for w in weights)]}
    if args.out:
        rows, _ = joined_rows(args.out, args.test, None)
        rows = rows[rows["status"] == OK].merge(read_manifest(args.test)[["image_id", "url", "page"]], on="image_id")
        root = open_masks(OutLayout(storage.normalize_root(args.out)).masks, None, mode="r")
    else:
        rows, root = read_manifest(args.test), None
    frames = native_frames(rows, None)
    seconds, n = 0.0, 0
    for pos, (_, row) in enumerate(rows.reset_index(drop=True).iterrows()):
        if pos not in frames:
            continue
        start = time.perf_counter()
        ours = to_mask(memory.frame_map(frames[pos].as_levels()).numpy())
        seconds += time.perf_counter() - start
        truth = truth_mask(row, ours.shape, None)
        if truth is None:
            continue
        counts["pixel memory"].add(ours, truth)
        n += 1
        if root is None:
            continue
        theirs = np.asarray(mask_array(root, row["mask_path"])[int(row["mask_index"])])
        counts["run"].add(theirs, truth)
        for w in weights:
            fused = (1 - w) * theirs.astype(np.float32) + w * ours.astype(np.float32)
            counts[f"fused w={w:g}"].add(fused.round().astype(np.uint8), truth)
    print(f"{n} test frames, the memory's map {seconds / max(n, 1):.2f} s a frame (this machine; decode and scoring apart)")
    for name, c in counts.items():
        print(f"  {name:14s} {figures(c)}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
