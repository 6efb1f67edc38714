"""``eval``: join OUT's predictions with a truth manifest and write ``OUT/metrics.json`` (README "Architecture").

Image truth = label != normal (else a non-empty mask); pixel metrics pool every row with a truth mask (a
``normal`` row without one counts as all zeros); predicted class = argmax(class_scores). Non-ok rows are
excluded and counted. A truth row without a prediction is refused.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from semclip_batch.analysis.aggregate import run_classes
from semclip_batch.analysis.metrics import ClassificationReport, PixelCounts, classification_report, roc_auc
from semclip_batch.analysis.results import read_predictions
from semclip_batch.config import NORMAL, Progress
from semclip_batch.errors import OK, ImageError, OutputError, show
from semclip_batch.io import storage
from semclip_batch.io.frames import load_frame
from semclip_batch.io.layout import OutLayout
from semclip_batch.io.manifest import read_manifest
from semclip_batch.io.masks import mask_array, open_masks

METRIC_KEYS = ("iAUROC", "pAUROC", "F1max", "AUPRO", "accuracy", "macro_precision", "macro_recall", "macro_F1")


def joined_rows(out: str, truth: str, storage_options: Mapping[str, Any] | None) -> tuple[pd.DataFrame, int]:
    """Truth rows with their prediction columns; and the number of predictions without truth."""
    truth_df = read_manifest(truth, storage_options=storage_options)
    preds = read_predictions(out, storage_options).to_pandas()
    missing = truth_df[~truth_df["image_id"].isin(preds["image_id"])]
    if len(missing):
        example = missing.iloc[0]
        raise OutputError(f"{len(missing)} truth rows have no prediction in {out}, e.g. image_id "
                          f"{example['image_id']} ({example['uri']}); run the same manifest first")
    unmatched = int((~preds["image_id"].isin(truth_df["image_id"])).sum())
    joined = truth_df[["image_id", "uri", "label", "mask_url"]].merge(
        preds.drop(columns=["uri"]), on="image_id", how="left")
    return joined, unmatched


def check_labels(rows: pd.DataFrame, classes: list[str], truth: str) -> None:
    """Refuse truth labels that are not classes of the run (matched exactly, as ``train`` matches them): scored,
    each would count as a miss of a class the model cannot name (an upper-case ``NORMAL`` as a defect)."""
    labels = rows.loc[rows["label"] != "", "label"]
    unknown = labels[~labels.isin(classes)]
    if len(unknown):
        first = unknown.iloc[0]
        raise OutputError(f"{truth}: label {show(first)} ({int((unknown == first).sum())} rows; {len(unknown)} with "
                          f"labels outside the run's classes) is not a class of the run ({', '.join(classes)}); "
                          "labels are matched exactly")


def truth_mask(row: pd.Series, shape: tuple[int, int], storage_options: Mapping[str, Any] | None) -> np.ndarray | None:
    if row["mask_url"]:
        try:
            mask = load_frame(row["mask_url"], storage_options) > 0
        except ImageError as exc:
            raise OutputError(f"truth mask of {row['uri']} unusable: {exc}") from None
        if mask.shape != shape:
            raise OutputError(f"truth mask of {row['uri']} is {mask.shape[0]}x{mask.shape[1]}, "
                              f"prediction is {shape[0]}x{shape[1]}")
        return mask
    if row["label"] == NORMAL:
        return np.zeros(shape, bool)
    return None


def evaluate(out: str, truth: str, storage_options: Mapping[str, Any] | None = None,
             progress: Progress | None = None) -> dict[str, Any]:
    """Compute every metric, write ``OUT/metrics.json`` and return it; ``progress`` is told of each ok row as
    its stored mask is read."""
    classes = run_classes(out, storage_options)
    rows, unmatched = joined_rows(out, truth, storage_options)
    check_labels(rows, classes, truth)
    ok = rows[rows["status"] == OK]
    root = open_masks(OutLayout(storage.normalize_root(out)).masks, storage_options, mode="r")
    pixels = PixelCounts()
    image_scores, image_truth, cls_truth, cls_pred = [], [], [], []
    for _, row in ok.iterrows():
        if progress is not None:
            progress(1, len(ok))
        pred = np.asarray(mask_array(root, row["mask_path"])[int(row["mask_index"])])
        mask = truth_mask(row, pred.shape, storage_options)
        if mask is not None:
            pixels.add(pred, mask)
        if row["label"]:
            image_truth.append(row["label"] != NORMAL)
            cls_truth.append(row["label"])
            cls_pred.append(classes[int(np.argmax(row["class_scores"]))])
        elif mask is not None:
            image_truth.append(bool(mask.any()))
        else:
            continue
        image_scores.append(float(row["anomaly_score"]))
    # no labelled scored row: every class with support 0 and a zero matrix, the shape of every other metrics.json
    report: ClassificationReport = classification_report(cls_truth, cls_pred, classes)
    metrics: dict[str, Any] = {
        "iAUROC": roc_auc(np.array(image_scores), np.array(image_truth, dtype=bool)) if image_scores else None,
        "pAUROC": pixels.auroc(), "F1max": pixels.f1_max(), "AUPRO": pixels.aupro(),
        "accuracy": report["accuracy"], "macro_precision": report["macro_precision"],
        "macro_recall": report["macro_recall"], "macro_F1": report["macro_F1"],
        "n_truth": len(rows), "n_scored": len(ok), "n_error": len(rows) - len(ok), "n_unmatched": unmatched,
        "per_class": report["per_class"], "confusion": report["confusion"],
    }
    layout = OutLayout(storage.normalize_root(out))
    storage.write_bytes(layout.metrics, json.dumps(metrics, indent=2).encode(), storage_options)
    return metrics


def metrics_table(metrics: Mapping[str, Any]) -> str:
    """A small printed table of the headline metrics and the per-class figures."""
    fmt = lambda v: "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = [f"{k:<16} {fmt(metrics[k])}" for k in (*METRIC_KEYS, "n_truth", "n_scored", "n_error", "n_unmatched")]
    lines.append(f"{'class':<16} {'precision':>9} {'recall':>9} {'F1':>9} {'support':>8}")
    for cls, m in metrics["per_class"].items():
        lines.append(f"{cls:<16} {fmt(m['precision']):>9} {fmt(m['recall']):>9} {fmt(m['F1']):>9} {m['support']:>8}")
    return "\n".join(lines)
