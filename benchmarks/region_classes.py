"""Classes read from the defect region's attributes (size, shape, contrast) instead of the backbone's embedding of
the defect view, measured on two `run` outputs of a checkpoint without them: the probe that led to rule 22 in
docs/quality.md (since rule 22, `train`'s `transfer` recipe fits them itself: `fewshot/region_fit.py`).

    .venv/bin/python benchmarks/region_classes.py SUPPORT.csv TEST.csv --support-out SUP_OUT --test-out TEST_OUT
    # SUP_OUT: `run --model CKPT` of SUPPORT.csv; TEST_OUT: the same checkpoint's `run` of TEST.csv

CKPT must not hold the region's classes itself (`checkpoint.json` `region_classes` false: `train --recipe paper`,
or a checkpoint of a release before rule 22), or its run's scores would be blended twice. For every defect frame
of both lots (a defect label, status ok) the region is the 8-connected component of the stored map at or above
``--share`` of the map's maximum that holds the maximum; its attributes are the package's ten
(`methods/region_attributes.py`) of the frame's grey levels as `run`'s decode stage ships them. The package's
multinomial logistic regression (`fewshot/region_fit.fit_logistic`) is fitted on the support frames' attributes
and labels and classifies the test frames. Printed per lot: how often the map's maximum lies within 8 px of a
defect pixel; the defect-class accuracy over the test's defect frames of `run`'s own class scores (the best defect
class), of the attributes alone, and of the two blended (``--weight`` of the attributes' probabilities); macro F1
over every test frame with each frame's class the arg-max of its scores as `eval` reads them, `run`'s against
those whose defect classes' share is given out by the blend (normal's score kept); and the ceiling: the same
classifier fitted and read on the truth masks' regions instead of the maps'. The support maps are those of frames
the checkpoint was fitted on (`train` reads its own). Choose ``--share`` and ``--weight`` on validation lots only.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from semclip_batch.analysis.aggregate import run_classes
from semclip_batch.analysis.evaluate import joined_rows, truth_mask
from semclip_batch.analysis.metrics import classification_report
from semclip_batch.config import NORMAL
from semclip_batch.errors import OK
from semclip_batch.fewshot.grey_memory_fit import native_frames
from semclip_batch.fewshot.region_fit import fit_logistic
from semclip_batch.io import storage
from semclip_batch.io.layout import OutLayout
from semclip_batch.io.manifest import read_manifest
from semclip_batch.io.masks import mask_array, open_masks
from semclip_batch.io.preprocess import FRAME_LEVELS
from semclip_batch.io.runrecord import read_latest
from semclip_batch.methods.region_attributes import SHARE, attributes, region_at_max
from semclip_batch.model.region_classes import RegionClasses

HIT_PX = 8  # the map's maximum within this many px of a defect pixel counts as on the defect


@dataclass(frozen=True)
class Frame:
    label: str
    scores: np.ndarray  # run's class scores, in the run's class order
    map_attributes: np.ndarray
    truth_attributes: np.ndarray
    hit: bool


def lot_frames(manifest: str, out: str, share: float) -> list[Frame]:
    """Every ok row of ``out`` with a truth label in ``manifest``: its attributes on the map's region and on the
    truth mask's (a frame without defect pixels in its mask: the map's region again)."""
    rows, _ = joined_rows(out, manifest, None)
    rows = rows[rows["status"] == OK].merge(read_manifest(manifest)[["image_id", "url", "page"]], on="image_id")
    rows = rows.reset_index(drop=True)
    frames = native_frames(rows, None)
    root = open_masks(OutLayout(storage.normalize_root(out)).masks, None, mode="r")
    found = []
    for pos in range(len(rows)):
        if pos not in frames:
            continue
        row = rows.iloc[pos]
        amap = np.asarray(mask_array(root, row["mask_path"])[int(row["mask_index"])])
        levels = frames[pos].levels.astype(np.float64) / FRAME_LEVELS
        truth = truth_mask(row, amap.shape, None)
        region = region_at_max(amap, share)
        known = truth if truth is not None and truth.any() else None  # its defect pixels, where it has any
        y, x = np.unravel_index(int(np.argmax(amap)), amap.shape)
        hit = known is not None and bool(ndimage.binary_dilation(known, iterations=HIT_PX)[y, x])
        found.append(Frame(str(row["label"]), np.asarray(row["class_scores"], dtype=np.float64),
                           attributes(levels, region), attributes(levels, region if known is None else known), hit))
    return found


def probs_of(model: RegionClasses, rows: Sequence[np.ndarray]) -> np.ndarray:
    return model.probs(torch.from_numpy(np.stack(rows))).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("support")
    ap.add_argument("test")
    ap.add_argument("--support-out", required=True, help="`run --model CKPT` of SUPPORT")
    ap.add_argument("--test-out", required=True, help="the same checkpoint's `run` of TEST")
    ap.add_argument("--share", type=float, default=SHARE, help="the region: the map at or above this share of its max")
    ap.add_argument("--weight", type=float, default=0.5, help="the attributes' share of the blended probabilities")
    args = ap.parse_args()
    for out in (args.support_out, args.test_out):
        record = read_latest(OutLayout(storage.normalize_root(out)), {}) or {}
        if (record.get("config") or {}).get("model", {}).get("region_classes"):
            raise SystemExit(f"{out}: its checkpoint already blends the region's classes into its scores; "
                             "measure a checkpoint without them (train --recipe paper, or before rule 22)")
    classes = run_classes(args.test_out)
    defects = [c for c in classes if c != NORMAL]
    support = [f for f in lot_frames(args.support, args.support_out, args.share) if f.label in defects]
    test = lot_frames(args.test, args.test_out, args.share)
    labels = np.array([defects.index(f.label) for f in support])
    on_defects = [f for f in test if f.label in defects]
    truth = [f.label for f in on_defects]
    print(f"support: {len(support)} defect frames, the map's maximum on the defect on {np.mean([f.hit for f in support]):.2f}; "
          f"test: {len(on_defects)} defect frames of {len(test)}, on the defect on {np.mean([f.hit for f in on_defects]):.2f}")
    runs = np.stack([f.scores[1:] / max(f.scores[1:].sum(), 1e-12) for f in on_defects])
    mapped = fit_logistic(np.stack([f.map_attributes for f in support]), labels, len(defects))
    attrs = probs_of(mapped, [f.map_attributes for f in on_defects])
    blend = args.weight * attrs + (1 - args.weight) * runs
    ceiling = fit_logistic(np.stack([f.truth_attributes for f in support]), labels, len(defects))
    roof = probs_of(ceiling, [f.truth_attributes for f in on_defects])

    def accuracy(probs: np.ndarray) -> float:
        return float(np.mean(np.array(defects)[probs.argmax(axis=1)] == np.array(truth)))

    print(f"defect-class accuracy on the test's defect frames: run {accuracy(runs):.3f}  attributes {accuracy(attrs):.3f}  "
          f"blend {args.weight:g} {accuracy(blend):.3f}  (truth-mask regions: {accuracy(roof):.3f})")
    every = np.stack([f.scores for f in test])
    mixed = every.copy()  # the defect classes' share of each frame's scores given out by the blend; normal's kept
    mass = every[:, 1:].sum(axis=1, keepdims=True)
    attrs_all = probs_of(mapped, [f.map_attributes for f in test])
    mixed[:, 1:] = (1 - args.weight) * every[:, 1:] + args.weight * mass * attrs_all
    named = [f.label for f in test]

    def macro_f1(scores: np.ndarray) -> float:  # eval's own figure: the arg-max of the class scores
        return classification_report(named, [classes[k] for k in scores.argmax(axis=1)], classes)["macro_F1"] or 0.0

    print(f"macro F1 over the {len(test)} test frames (eval's rule: the arg-max of the class scores): run "
          f"{macro_f1(every):.3f}  blend {macro_f1(mixed):.3f}")

if __name__ == "__main__":
    main()
