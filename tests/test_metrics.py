"""Metrics against scikit-learn and a brute-force AUPRO, on small hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, precision_recall_fscore_support, roc_auc_score

from semclip_batch.analysis.metrics import PixelCounts, classification_report, pro_area, roc_auc


@pytest.mark.parametrize("seed", range(3))
def test_image_auroc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(40) < 0.4
    scores = np.round(rng.random(40) + labels * 0.3, 1)  # coarse: many ties
    assert np.isclose(roc_auc(scores, labels), roc_auc_score(labels, scores))


def test_auroc_edge_cases():
    assert roc_auc(np.array([0.1, 0.9]), np.array([False, True])) == 1.0
    assert roc_auc(np.array([0.9, 0.1]), np.array([False, True])) == 0.0
    assert roc_auc(np.array([0.5, 0.5]), np.array([False, True])) == 0.5
    assert roc_auc(np.array([0.1, 0.2]), np.array([True, True])) is None


def pairs(seed: int, n: int = 4, inverted: bool = False):
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        truth = np.zeros((24, 30), bool)
        if k % 2 == 0:
            truth[3:9, 4:12] = True
            truth[15:20, 20:27] = True
        score = np.clip(truth * 0.5 + rng.random(truth.shape) * 0.6, 0, 1)
        if inverted:
            score = 1 - score
        out.append((np.rint(score * 255).astype(np.uint8), truth))
    return out


def brute_aupro(data, max_fpr=0.3):
    fprs, pros = [], []
    neg = sum((~t).sum() for _, t in data)
    for th in range(256, -1, -1):
        fp = sum(((p >= th) & ~t).sum() for p, t in data)
        overlaps = []
        for p, t in data:
            lab, n = ndimage.label(t, structure=np.ones((3, 3)))
            overlaps += [((p >= th) & (lab == i)).sum() / (lab == i).sum() for i in range(1, n + 1)]
        fprs.append(fp / neg)
        pros.append(np.mean(overlaps))
    return pro_area(np.array(fprs), np.array(pros), max_fpr)


@pytest.mark.parametrize("inverted", [False, True])
def test_pixel_metrics_match_sklearn_and_brute_force(inverted):
    data = pairs(1, inverted=inverted)
    counts = PixelCounts()
    for p, t in data:
        counts.add(p, t)
    scores = np.concatenate([p.ravel() for p, _ in data])
    labels = np.concatenate([t.ravel() for _, t in data])
    assert np.isclose(counts.auroc(), roc_auc_score(labels, scores))
    precision, recall, _ = precision_recall_curve(labels, scores)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0)
    assert np.isclose(counts.f1_max(), f1.max())
    assert np.isclose(counts.aupro(), brute_aupro(data))
    assert counts.n_regions == 4


def test_perfect_and_constant_maps():
    truth = np.zeros((20, 20), bool)
    truth[5:10, 5:10] = True
    perfect = PixelCounts()
    perfect.add(np.where(truth, 255, 0).astype(np.uint8), truth)
    assert perfect.auroc() == 1.0 and perfect.f1_max() == 1.0 and np.isclose(perfect.aupro(), 1.0)
    constant = PixelCounts()
    constant.add(np.full((20, 20), 128, np.uint8), truth)
    assert constant.auroc() == 0.5
    assert np.isclose(constant.f1_max(), 2 * 25 / 400 / (25 / 400 + 1))


def test_empty_truth_masks_give_undefined_pixel_metrics():
    counts = PixelCounts()
    counts.add(np.full((16, 16), 200, np.uint8), np.zeros((16, 16), bool))
    assert counts.auroc() is None and counts.f1_max() is None and counts.aupro() is None


def test_classification_matches_sklearn_with_a_class_never_predicted():
    classes = ["normal", "bridge", "particle", "scratch"]
    truth = ["normal", "normal", "bridge", "bridge", "particle", "scratch", "scratch"]
    pred = ["normal", "bridge", "bridge", "normal", "normal", "scratch", "bridge"]  # particle never predicted
    rep = classification_report(truth, pred, classes)
    present = sorted(set(truth))
    p, r, f, _ = precision_recall_fscore_support(truth, pred, labels=present, average="macro", zero_division=0)
    assert np.isclose(rep["macro_precision"], p) and np.isclose(rep["macro_recall"], r)
    assert np.isclose(rep["macro_F1"], f)
    assert np.isclose(rep["accuracy"], 3 / 7)
    assert rep["per_class"]["particle"] == {"precision": None, "recall": 0.0, "F1": 0.0, "support": 1}
    assert rep["confusion"]["labels"] == classes
    assert rep["confusion"]["matrix"][1] == [1, 1, 0, 0]  # bridge row: one predicted normal, one bridge
