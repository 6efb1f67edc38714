"""Few-shot quality benchmark: SEM-CLIP vs WinCLIP+ and PromptAD, SEM-CLIP's ablations, reference frames.

    .venv/bin/python benchmarks/quality.py --work /tmp/quality            # pretrains once, cached in --work
    .venv/bin/python benchmarks/quality.py --work /tmp/quality --weights w.safetensors --backbone ViT-B-16-plus-240

Synthetic sets from apart seeds: support (seed 2000, 10 per class = 70 images, with reference frames) and test
(seed 6000, 3 lots = 210 images; seed 5000 was looked at while choosing the pretraining recipe, so it is not
the test). ``--weights`` absent: ``semclip-tiny`` is pretrained once by ``pretrain``
(its default, full schedule, seed-1000 lots) and cached in ``--work``. The frozen backbone's features are computed once
per (backbone, set) and shared by every configuration; each configuration is fitted with ``train``'s own
code and defaults (:func:`semclip_batch.fewshot.train.fit`) and scored exactly as ``run`` + ``eval`` score (whole-frame
view, map resized to the frame, uint8 masks, the same metric code). Nothing is tuned on the test lots.

Grid: K in {1, 5, 10} x support seeds {0, 1, 2} x {every registered method (semclip, winclip, promptad),
semclip without the V-V path, without feature surgery, with one tapped layer (the last), head-only and text-only
classification}; ``--use-reference`` for every method at K = 10; the random backbone for semclip at K = 10; zero-shot
SEM-CLIP for reference. Prints one table (mean +- std over seeds, seconds per configuration) and writes it as
JSON to ``--work/quality.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from semclip_batch.analysis.metrics import PixelCounts, classification_report, roc_auc
from semclip_batch.config import ModelSpec
from semclip_batch.fewshot.pretrain import PretrainConfig, pretrain
from semclip_batch.fewshot.train import TrainConfig, fit, sample_shots
from semclip_batch.fewshot.trainset import TrainSet, load_trainset
from semclip_batch.io.frames import load_frame
from semclip_batch.io.manifest import read_manifest
from semclip_batch.io.preprocess import maps_to_frame
from semclip_batch.methods.decisions import anomaly_score, to_mask
from semclip_batch.methods.features import Features, encode_views
from semclip_batch.methods.prompts import load_prompts, text_embeddings
from semclip_batch.methods.registry import depth_of, method_names, new_model, score_features
from semclip_batch.methods.weights import LoadedBackbone, load_backbone, preprocess_config
from semclip_batch.model import SemClipOutput
from semclip_batch.model.reference import reference_taps
from semclip_batch.model.towers import vision_tower
from semclip_batch.synth.generate import SynthConfig, synth

SIZES = ((256, 256), (240, 320), (300, 200), (512, 512))
KEYS = ("iAUROC", "pAUROC", "F1max", "AUPRO", "accuracy", "macro_F1")
ABLATIONS: dict[str, dict[str, Any]] = {  # TrainConfig fields to replace
    "semclip no V-V": {"use_vv": False},
    "semclip no surgery": {"surgery": False},
    "semclip one tap": {"taps": "last"},
    "semclip head only": {"cls": "head"},
    "semclip text only": {"cls": "text"},
}


@dataclass
class Lot:
    """One encoded synthetic set: views, refs, truth and the backbone's features (shared by every config)."""

    df: pd.DataFrame
    data: TrainSet
    feats: Features
    ref_feats: Features
    shapes: list[tuple[int, int]]
    truth: list[np.ndarray]


def load_lot(folder: Path, backbone: LoadedBackbone, classes: tuple[str, ...], name: str) -> Lot:
    prep = preprocess_config(backbone.name, tile_above=10**9)
    df = read_manifest(str(folder / "manifest.csv"))
    data = load_trainset(df, classes, prep, references=True)
    if data.skipped:
        raise SystemExit(f"{folder}: {data.skipped} rows did not decode")
    visual = vision_tower(backbone.clip)
    depth = depth_of(backbone.clip)
    t0 = time.perf_counter()
    feats = encode_views(visual, data.views, prep, tuple(range(1, depth + 1)), windows=True)
    assert data.refs is not None
    ref_feats = encode_views(visual, data.refs, prep, reference_taps(depth), vv_from=None)
    truth = [load_frame(u) > 0 for u in df["mask_url"]]
    print(f"encoded {name}: {len(data)} images + references in {time.perf_counter() - t0:.0f} s", flush=True)
    return Lot(df, data, feats, ref_feats, [t.shape for t in truth], truth)


def subset(lot: Lot, rows: np.ndarray) -> tuple[TrainSet, Features, Features]:
    idx = torch.from_numpy(rows)
    d = lot.data
    assert d.refs is not None and d.has_ref is not None
    data = TrainSet(d.views[idx], d.masks[idx], d.labels[idx], d.has_mask[idx], [d.captions[i] for i in rows], d.classes,
                    0, d.refs[idx], d.has_ref[idx])
    return data, lot.feats.subset(idx), lot.ref_feats.subset(idx)


def metrics(out: SemClipOutput, test: Lot) -> dict[str, float | None]:
    """The figures ``eval`` computes, from maps at model size resized to each frame as ``run`` does."""
    pixels = PixelCounts()
    scores, truth_cls, pred_cls = [], [], []
    classes = list(test.data.classes)
    labels = list(test.df["label"])
    for i, (shape, truth) in enumerate(zip(test.shapes, test.truth, strict=True)):
        frame = maps_to_frame(out.maps[i:i + 1], shape[0], shape[1], []).numpy()
        pixels.add(to_mask(frame), truth)
        p = out.class_probs[i].numpy()
        scores.append(anomaly_score(float(p[0]), float(frame.max())))
        truth_cls.append(labels[i])
        pred_cls.append(classes[int(np.argmax(p))])
    report = classification_report(truth_cls, pred_cls, classes)
    is_defect = np.array([label != "normal" for label in labels])
    return {"iAUROC": roc_auc(np.array(scores), is_defect), "pAUROC": pixels.auroc(), "F1max": pixels.f1_max(),
            "AUPRO": pixels.aupro(), "accuracy": report["accuracy"], "macro_F1": report["macro_F1"]}


def run_config(name: str, cfg: TrainConfig, backbone: LoadedBackbone, text: torch.Tensor, support: Lot, test: Lot,
               shots: int, seed: int) -> dict[str, float | None]:
    rows = sample_shots(support.df, shots, seed)["image_id"]
    positions = np.flatnonzero(support.df["image_id"].isin(set(rows)).to_numpy())
    data, feats, ref_feats = subset(support, positions)
    t0 = time.perf_counter()
    fitted = fit(replace(cfg, shots=shots, model=replace(cfg.model, seed=seed)), backbone, text, data, feats, ref_feats)
    size = (test.data.views.shape[-2], test.data.views.shape[-1])
    with torch.no_grad():
        out = score_features(fitted.model, test.feats, size, fitted.reference, test.ref_feats, test.data.has_ref)
    figures = metrics(out, test)
    figures["seconds"] = time.perf_counter() - t0
    print(f"  {name:<26} K={shots:<2} seed {seed}: " + " ".join(f"{k} {figures[k]:.3f}" for k in (*KEYS, "seconds")),
          flush=True)
    return figures


def summarise(name: str, backbone: str, shots: int | None, runs: list[dict[str, float | None]]) -> dict[str, object]:
    row: dict[str, object] = {"config": name, "backbone": backbone, "K": shots, "seeds": len(runs)}
    for k in (*KEYS, "seconds"):
        values = np.array([r[k] for r in runs], dtype=float)
        row[k] = float(values.mean())
        row[f"{k}_std"] = float(values.std())
    return row


def print_table(rows: list[dict[str, object]]) -> None:
    print(f"\n{'configuration':<30}{'backbone':<11}{'K':>3}" + "".join(f"{k:>15}" for k in KEYS) + f"{'s/config':>10}")
    for r in rows:
        cells = "".join(f"{r[k]:>8.3f} ±{r[f'{k}_std']:.3f}" for k in KEYS)
        k = "-" if r["K"] is None else str(r["K"])
        print(f"{r['config']:<30}{r['backbone']:<11}{k:>3}{cells}{r['seconds']:>10.1f}")


def ensure_data(work: Path, test_lots: int) -> None:
    for folder, seed, lots in (("support", 2000, 1), ("test", 6000, test_lots)):
        if not (work / folder / "manifest.csv").exists():
            synth(str(work / folder), SynthConfig(seed=seed, lots=lots, per_class=10, sizes=SIZES))


def ensure_weights(work: Path, weights: str | None, backbone: str) -> str:
    if weights:
        return weights
    path = work / "pretrained.safetensors"
    if not path.exists():
        synth(str(work / "pretrain"), SynthConfig(seed=1000, lots=60, per_class=10, sizes=SIZES))
        t0 = time.perf_counter()
        pretrain(PretrainConfig(manifest=str(work / "pretrain" / "manifest.csv"), out=str(path),
                                model=ModelSpec(backbone=backbone)))
        print(f"pretrain: {time.perf_counter() - t0:.0f} s (cached in {path})", flush=True)
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True)
    parser.add_argument("--backbone", default="semclip-tiny")
    parser.add_argument("--weights", default=None, help="pretrained weights of --backbone [default: pretrain tiny]")
    parser.add_argument("--shots", default="1,5,10")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--test-lots", type=int, default=3, help="70 images per lot")
    args = parser.parse_args()
    work = Path(args.work)
    started = time.perf_counter()
    ensure_data(work, args.test_lots)
    weights = ensure_weights(work, args.weights, args.backbone)
    shots = [int(s) for s in args.shots.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    prompts = load_prompts()
    rows: list[dict[str, object]] = []
    for label, source in (("pretrained", weights), ("random", "none")):
        backbone = load_backbone(args.backbone, source)
        text = torch.from_numpy(text_embeddings(backbone, prompts))
        support = load_lot(work / "support", backbone, prompts.classes, f"support ({label})")
        test = load_lot(work / "test", backbone, prompts.classes, f"test ({label})")
        depth = depth_of(backbone.clip)
        base = TrainConfig(support="", out="", model=ModelSpec(backbone=args.backbone, pretrained=source, cls="fused"))
        zero = new_model(ModelSpec(backbone=args.backbone, pretrained=source), backbone.clip, text)
        t0 = time.perf_counter()
        with torch.no_grad():
            size = (test.data.views.shape[-2], test.data.views.shape[-1])
            figures = metrics(score_features(zero, test.feats, size), test)
        figures["seconds"] = time.perf_counter() - t0
        rows.append(summarise("semclip zero-shot", label, None, [figures]))
        variants = {**{m: {"method": m} for m in method_names()}, **ABLATIONS}  # every registered method
        grid = [(n, v, k) for k in shots for n, v in variants.items()] if label == "pretrained" else \
            [("semclip", {}, max(shots))]
        if label == "pretrained":
            grid += [(f"{m} + reference", {"method": m, "use_reference": True}, max(shots))
                     for m in method_names()]
        for name, options, k in grid:
            opts = dict(options)
            if opts.get("taps") == "last":
                opts["taps"] = (depth,)
            cfg = replace(base, model=replace(base.model, **opts))
            runs = [run_config(name, cfg, backbone, text, support, test, k, seed) for seed in seeds]
            rows.append(summarise(name, label, k, runs))
    print_table(rows)
    total = time.perf_counter() - started
    print(f"\ntotal {total / 60:.1f} min; weights {weights}")
    (work / "quality.json").write_text(json.dumps({"backbone": args.backbone, "weights": weights, "rows": rows,
                                                   "minutes": total / 60}, indent=2))


if __name__ == "__main__":
    main()
