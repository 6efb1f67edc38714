"""Classes read from the defect region's attributes (size, shape, contrast) instead of the backbone's embedding of
the defect view: a probe of where few-shot classification is lost, measured on two `run` outputs (rule 22 in
docs/quality.md; not in `train` or `run`).

    .venv/bin/python benchmarks/region_classes.py SUPPORT.csv TEST.csv --support-out SUP_OUT --test-out TEST_OUT
    # SUP_OUT: `run --model CKPT` of SUPPORT.csv; TEST_OUT: the same checkpoint's `run` of TEST.csv

For every defect frame of both lots (a defect label, status ok) the region is the 8-connected component of the
stored map at or above ``--share`` of the map's maximum that holds the maximum; its attributes are ten numbers of
the frame's grey levels as `run`'s decode stage ships them (:func:`attributes`). A multinomial logistic regression
(L2, standardised attributes, pure torch) is fitted on the support frames' attributes and labels and classifies the
test frames. Printed per lot: how often the map's maximum lies within 8 px of a defect pixel; the defect-class
accuracy over the test's defect frames of `run`'s own class scores (the best defect class), of the attributes
alone, and of the two blended (``--weight`` of the attributes' probabilities); macro F1 over every test frame with
each frame's class the arg-max of its scores as `eval` reads them, `run`'s against those whose defect classes' share
is given out by the blend (normal's score kept); and the ceiling: the same classifier fitted and read on the
truth masks' regions instead of the maps'. The support maps are those of frames the checkpoint was fitted on (a
build in `train` would read its own support maps). Choose ``--share`` and ``--weight`` on validation lots only.
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
from semclip_batch.config import NORMAL
from semclip_batch.errors import OK
from semclip_batch.fewshot.grey_memory_fit import native_frames
from semclip_batch.io import storage
from semclip_batch.io.layout import OutLayout
from semclip_batch.io.manifest import read_manifest
from semclip_batch.io.masks import mask_array, open_masks
from semclip_batch.io.preprocess import FRAME_LEVELS

EIGHT = np.ones((3, 3), dtype=bool)
RING_PX = 4  # the ring around the region its contrast is measured against
HIT_PX = 8  # the map's maximum within this many px of a defect pixel counts as on the defect
N_ATTRIBUTES = 10


def region_at_max(amap: np.ndarray, share: float) -> np.ndarray:
    """The 8-connected component of ``amap >= share * max`` holding the map's (first) maximum; a flat zero map:
    that pixel alone. ``(H, W)`` -> ``(H, W)`` bool."""
    y, x = np.unravel_index(int(np.argmax(amap)), amap.shape)
    peak = float(amap[y, x])
    labels, _ = ndimage.label(amap >= share * peak, structure=EIGHT) if peak > 0 else (np.zeros(amap.shape, int), 0)
    region = labels == labels[y, x] if labels[y, x] else np.zeros(amap.shape, bool)
    region[y, x] = True
    return region


def attributes(levels: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Ten attributes of a region of a frame's grey levels in [0, 1], as a review tool's ADC reads a defect: log
    area, log elongation (the ratio of the pixel coordinates' principal variances), the mean, median, brightest and
    darkest level inside less the mean of a :data:`RING_PX`-px ring around it, the spread inside and in the ring,
    the share of its bounding box it fills, and the log of the box's longer side. ``(H, W)`` each -> ``(10,)``."""
    ys, xs = np.nonzero(region)
    ring = ndimage.binary_dilation(region, structure=EIGHT, iterations=RING_PX) & ~region
    inside = levels[region]
    around = levels[ring] if ring.any() else levels.ravel()
    spread = np.cov(np.stack([ys, xs]).astype(np.float64)) if len(ys) > 2 else np.eye(2)
    major, minor = np.sort(np.linalg.eigvalsh(spread))[::-1].clip(1e-3)
    height, width = int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)
    base = float(around.mean())
    return np.array([np.log(len(ys)), np.log(major / minor), inside.mean() - base, np.median(inside) - base,
                     inside.max() - base, inside.min() - base, inside.std(), around.std(),
                     len(ys) / (height * width), np.log(max(height, width))], dtype=np.float64)


@dataclass(frozen=True)
class Logistic:
    """A multinomial logistic regression on standardised attributes."""

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor

    def probs(self, x: np.ndarray) -> np.ndarray:
        z = (torch.from_numpy(x) - self.mean) / self.std
        return (z @ self.weight + self.bias).softmax(dim=-1).numpy()


def fit_logistic(x: np.ndarray, y: np.ndarray, n_classes: int, l2: float = 1.0) -> Logistic:
    """Cross-entropy summed over the rows plus ``l2 / 2 * |W|^2`` (scikit-learn's ``C = 1 / l2``), by L-BFGS.
    ``(N, D)`` float64, ``(N,)`` class indices."""
    xt = torch.from_numpy(x)
    mean, std = xt.mean(dim=0), xt.std(dim=0).clamp_min(1e-6)
    z, target = (xt - mean) / std, torch.from_numpy(y).long()
    weight = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ weight + bias, target, reduction="sum") \
            + 0.5 * l2 * (weight ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return Logistic(mean, std, weight.detach(), bias.detach())


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


def macro_f1(truth: Sequence[str], predicted: Sequence[str], classes: Sequence[str]) -> float:
    """The mean over ``classes`` of each class's F1 (0 where it is neither true nor predicted)."""
    t, p = np.asarray(truth), np.asarray(predicted)
    scores = []
    for c in classes:
        tp, fp, fn = np.sum((p == c) & (t == c)), np.sum((p == c) & (t != c)), np.sum((p != c) & (t == c))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return float(np.mean(scores))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("support")
    ap.add_argument("test")
    ap.add_argument("--support-out", required=True, help="`run --model CKPT` of SUPPORT")
    ap.add_argument("--test-out", required=True, help="the same checkpoint's `run` of TEST")
    ap.add_argument("--share", type=float, default=0.8, help="the region: the map at or above this share of its max")
    ap.add_argument("--weight", type=float, default=0.5, help="the attributes' share of the blended probabilities")
    args = ap.parse_args()
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
    attrs = mapped.probs(np.stack([f.map_attributes for f in on_defects]))
    blend = args.weight * attrs + (1 - args.weight) * runs
    ceiling = fit_logistic(np.stack([f.truth_attributes for f in support]), labels, len(defects))
    roof = ceiling.probs(np.stack([f.truth_attributes for f in on_defects]))

    def accuracy(probs: np.ndarray) -> float:
        return float(np.mean(np.array(defects)[probs.argmax(axis=1)] == np.array(truth)))

    print(f"defect-class accuracy on the test's defect frames: run {accuracy(runs):.3f}  attributes {accuracy(attrs):.3f}  "
          f"blend {args.weight:g} {accuracy(blend):.3f}  (truth-mask regions: {accuracy(roof):.3f})")
    every = np.stack([f.scores for f in test])
    mixed = every.copy()  # the defect classes' share of each frame's scores given out by the blend; normal's kept
    mass = every[:, 1:].sum(axis=1, keepdims=True)
    attrs_all = mapped.probs(np.stack([f.map_attributes for f in test]))
    mixed[:, 1:] = (1 - args.weight) * every[:, 1:] + args.weight * mass * attrs_all
    named = [f.label for f in test]
    print(f"macro F1 over the {len(test)} test frames (eval's rule: the arg-max of the class scores): run "
          f"{macro_f1(named, [classes[k] for k in every.argmax(axis=1)], classes):.3f}  blend "
          f"{macro_f1(named, [classes[k] for k in mixed.argmax(axis=1)], classes):.3f}")

if __name__ == "__main__":
    main()
