"""Quality that transfers: SEM-CLIP's recipes against WinCLIP+ and PromptAD, with data families as an axis.

    .venv/bin/python benchmarks/quality.py --work /tmp/quality        # data, pretraining and features cached in --work

A *family* is a kind of data (``synth --family``: layout, defect scale, contrast and noise); *siblings* are
other seeds of one family. Two backbones are pretrained once by ``pretrain`` with its defaults (every step: no
time budget), on 2,030 labelled frames each: one on ``--source`` (family A), one on ``--siblings``. Then, per
(backbone, family):

- (a) transfer: the family-A backbone, zero-shot and 10-shot, on every ``--families`` member (never A);
- (b) siblings: the siblings backbone, zero-shot and 10-shot, on other seeds of its own family.

Per family, apart seeds: support (seed 2000, 10 per class = 70 frames), test (seed 6000, ``--test-lots`` x 70
frames). Every configuration is fitted with ``train``'s own code (:func:`semclip_batch.fewshot.train.fit`, over
``--seeds`` support draws, 0 and 1 by default) and scored as ``run`` + ``eval`` score (whole-frame view, map
resized to the frame, uint8 masks, the same metric code; class scores with ``run``'s defect view where ``run``
takes one: SEM-CLIP zero-shot and the ``transfer`` recipe, frames of at least twice the model input).
``--validation`` names the family on which settings were chosen (the recipe's parts, the default recipe); its
rows are marked ``val``. Nothing is chosen on the other families.

Configurations: SEM-CLIP zero-shot (as ``run`` scores without a checkpoint: with the in-frame self-similarity
map) and without self-similarity; ``--recipe paper`` and ``transfer`` (the default) and ``transfer`` without
each of its parts (augmentation, memory, region head, cell references, self-similarity); WinCLIP+ and PromptAD. Frames that
repeat take their cell reference (``io.cell_reference``) as ``train`` and ``run`` do under ``transfer``; the
other configurations ignore it. Prints one table (mean +- std
over seeds) and writes it as JSON to ``--work/quality.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from semclip_batch.analysis.metrics import PixelCounts, classification_report, roc_auc
from semclip_batch.config import DEFAULT_SELF_SIMILARITY, ModelSpec
from semclip_batch.fewshot.augment import augment
from semclip_batch.fewshot.heldout import heldout_table
from semclip_batch.fewshot.pretrain import PretrainConfig, pretrain
from semclip_batch.fewshot.recipes import RECIPES, Recipe, applied, copies
from semclip_batch.fewshot.reference_fit import support_pixel_differences
from semclip_batch.fewshot.train import Fitted, TrainConfig, fit, sample_shots
from semclip_batch.fewshot.trainset import TrainSet, load_trainset
from semclip_batch.io.frames import load_frame
from semclip_batch.io.manifest import read_manifest
from semclip_batch.io.preprocess import defect_view, maps_to_frame, needs_defect_view, shipped_levels
from semclip_batch.methods.decisions import anomaly_score, to_mask, weighed_class_scores, with_defect_view
from semclip_batch.methods.features import Features, encode_views
from semclip_batch.methods.prompts import load_prompts, text_embeddings
from semclip_batch.methods.registry import Scorer, depth_of, get_method, new_model, score_features
from semclip_batch.methods.weights import LoadedBackbone, load_backbone, preprocess_config
from semclip_batch.model import SemClipOutput
from semclip_batch.model.reference import reference_taps
from semclip_batch.model.towers import vision_tower
from semclip_batch.synth.generate import SynthConfig, synth

KEYS = ("iAUROC", "pAUROC", "F1max", "AUPRO", "accuracy", "macro_F1")
TRANSFER = RECIPES["transfer"]
CONFIGS: dict[str, tuple[str, Recipe]] = {  # name -> (method, SEM-CLIP recipe)
    "semclip paper": ("semclip", RECIPES["paper"]),
    "semclip transfer": ("semclip", TRANSFER),
    "transfer - augment": ("semclip", replace(TRANSFER, name="transfer-augment", augment=False)),
    "transfer - memory": ("semclip", replace(TRANSFER, name="transfer-memory", memory=False)),
    "transfer - region head": ("semclip", replace(TRANSFER, name="transfer-region", region_head=False)),
    "transfer - self reference": ("semclip", replace(TRANSFER, name="transfer-self", self_reference=False)),
    "transfer - self similarity": ("semclip", replace(TRANSFER, name="transfer-selfsim", self_similarity=0.0)),
    "winclip": ("winclip", TRANSFER),
    "promptad": ("promptad", TRANSFER),
}
PRETRAIN_LOTS = 29  # x 70 frames = 2,030


@dataclass
class Lot:
    """One encoded set: the frames (and, for support sets, their augmented copies) and the backbone's features;
    for test sets, the uint8 levels of the frames that take a defect view (``run``'s decode stage ships them)."""

    df: pd.DataFrame
    data: TrainSet
    feats: Features
    shapes: list[tuple[int, int]]
    truth: list[np.ndarray]
    levels: dict[int, np.ndarray] = field(default_factory=dict)
    ref_feats: Features | None = None  # the cell references' features (data.refs / has_ref: where a frame repeats)


def load_lot(folder: Path, backbone: LoadedBackbone, classes: tuple[str, ...], name: str, augmented: bool) -> Lot:
    prep = preprocess_config(backbone.name, tile_above=10**9)
    df = read_manifest(str(folder / "manifest.csv"))
    data = load_trainset(df, classes, prep, self_reference=True)  # as train and run take them (transfer recipe)
    if data.skipped:
        raise SystemExit(f"{folder}: {data.skipped} rows did not decode")
    if augmented:
        data = augment(data)
    depth = depth_of(backbone.clip)
    t0 = time.perf_counter()
    feats = encode_views(vision_tower(backbone.clip), data.views, prep, tuple(range(1, depth + 1)), windows=True)
    assert data.refs is not None
    ref_feats = encode_views(vision_tower(backbone.clip), data.refs, prep, reference_taps(depth), vv_from=None,
                             pooled=False)
    truth = [load_frame(u) > 0 for u in df["mask_url"]]
    levels = {}
    if not augmented:  # the frames run ships for a defect view (load_trainset keeps only the model views)
        with_view = replace(prep, defect_view=True)
        for i, (url, mask) in enumerate(zip(df["url"], truth, strict=True)):  # a truth mask has its frame's shape
            if needs_defect_view(mask.shape[0], mask.shape[1], with_view):
                levels[i] = shipped_levels(load_frame(url), (prep.percentile_low, prep.percentile_high))
    print(f"  encoded {name}: {len(data)} views in {time.perf_counter() - t0:.0f} s "
          f"({int(data.has_ref.sum()) if data.has_ref is not None else 0} with a cell reference)", flush=True)
    return Lot(df, data, feats, [t.shape for t in truth], truth, levels, ref_feats)


@torch.no_grad()
def defect_view_probs(model: Scorer, backbone: LoadedBackbone, out: SemClipOutput, test: Lot) -> torch.Tensor:
    """``run``'s class scores with the defect view: frames of at least twice the model input average their whole
    view's class probabilities with those of a native crop at their map's maximum."""
    if not test.levels:
        return out.class_probs
    size = test.data.views.shape[-1]
    rows = sorted(test.levels)
    crops = torch.stack([defect_view(torch.from_numpy(test.levels[i]),
                                     maps_to_frame(out.maps[i:i + 1], *test.shapes[i], []), size) for i in rows])
    prep = preprocess_config(backbone.name, tile_above=10**9)
    feats = encode_views(vision_tower(backbone.clip), crops, prep, tuple(range(1, depth_of(backbone.clip) + 1)),
                         windows=get_method(model.method).windows)
    probs = out.class_probs.clone()
    probs[rows] = with_defect_view(probs[rows], score_features(model, feats, (size, size)).class_probs)
    return probs


def subset(lot: Lot, rows: torch.Tensor) -> tuple[TrainSet, Features, Features | None]:
    d = lot.data
    data = TrainSet(d.views[rows], d.masks[rows], d.labels[rows], d.has_mask[rows], [d.captions[i] for i in rows],
                    d.classes, 0, refs=None if d.refs is None else d.refs[rows],
                    has_ref=None if d.has_ref is None else d.has_ref[rows])
    return data, lot.feats.subset(rows), None if lot.ref_feats is None else lot.ref_feats.subset(rows)


def metrics(out: SemClipOutput, test: Lot, class_probs: torch.Tensor | None = None,
            image_threshold: float | None = None) -> dict[str, float | None]:
    """The figures ``eval`` computes, from maps at model size resized to each frame as ``run`` does; classes from
    ``class_probs`` where given (the defect view's), the image score from the whole view's p(normal) as in
    ``run``; with a fit's ``image_threshold``, the classes read from the class scores ``run`` writes under it
    (rule 29: :func:`~semclip_batch.methods.decisions.weighed_class_scores`)."""
    pixels = PixelCounts()
    scores, truth_cls, pred_cls = [], [], []
    classes = list(test.data.classes)
    labels = list(test.df["label"])
    probs = out.class_probs if class_probs is None else class_probs
    for i, (shape, truth) in enumerate(zip(test.shapes, test.truth, strict=True)):
        frame = maps_to_frame(out.maps[i:i + 1], shape[0], shape[1], []).numpy()
        pixels.add(to_mask(frame), truth)
        scores.append(anomaly_score(float(out.class_probs[i, 0]), float(frame.max())))
        truth_cls.append(labels[i])
        written = probs[i].numpy() if image_threshold is None else weighed_class_scores(
            probs[i].numpy(), scores[-1], image_threshold)
        pred_cls.append(classes[int(np.argmax(written))])
    report = classification_report(truth_cls, pred_cls, classes)
    is_defect = np.array([label != "normal" for label in labels])
    return {"iAUROC": roc_auc(np.array(scores), is_defect), "pAUROC": pixels.auroc(), "F1max": pixels.f1_max(),
            "AUPRO": pixels.aupro(), "accuracy": report["accuracy"], "macro_F1": report["macro_F1"]}


def score_test(fitted: Fitted, backbone: LoadedBackbone, test: Lot) -> SemClipOutput:
    """Score the test lot's cached features with a fitted model, against its references (read or cell) where the
    fit built a reference scorer."""
    reference = fitted.reference
    pixels = None if reference is None else support_pixel_differences(test.data, preprocess_config(
        backbone.name, tile_above=10**9).std[0])
    with torch.no_grad():
        return score_features(fitted.model, test.feats, (test.data.views.shape[-2], test.data.views.shape[-1]),
                              reference, None if reference is None else test.ref_feats, test.data.has_ref, pixels)


def run_config(name: str, method: str, recipe: Recipe, backbone: LoadedBackbone, text: torch.Tensor, support: Lot,
               test: Lot, seed: int, shots: int = 10) -> dict[str, float | None]:
    frames = len(support.df)
    ids = set(sample_shots(support.df, shots, seed)["image_id"])
    picked = torch.from_numpy(np.flatnonzero(support.df["image_id"].isin(ids).to_numpy()))
    n_copies = copies(recipe, method)
    rows = (picked[None, :] + frames * torch.arange(n_copies)[:, None]).flatten()  # copy-major, as augment()
    data, feats, ref_feats = subset(support, rows)
    cfg = TrainConfig(support="", out="", shots=shots, recipe=recipe,
                      model=ModelSpec(backbone=backbone.name, pretrained=backbone.source, cls="fused", method=method,
                                      seed=seed))
    t0 = time.perf_counter()
    fitted = fit(cfg, backbone, text, data, feats, ref_feats)
    out = score_test(fitted, backbone, test)
    probs = defect_view_probs(fitted.model, backbone, out, test) if applied(recipe, cfg.model).defect_view else None
    figures = metrics(out, test, probs, fitted.thresholds["image"])
    figures["seconds"] = time.perf_counter() - t0
    print(f"    {name:<24} seed {seed}: " + " ".join(f"{k} {figures[k]:.3f}" for k in (*KEYS, "seconds")), flush=True)
    return figures


def summarise(row: dict[str, object], runs: list[dict[str, float | None]]) -> dict[str, object]:
    for k in (*KEYS, "seconds"):
        values = np.array([np.nan if r[k] is None else r[k] for r in runs], dtype=float)
        row[k] = float(np.nanmean(values))
        row[f"{k}_std"] = float(np.nanstd(values))
    return row


def print_table(rows: list[dict[str, object]]) -> None:
    print(f"\n{'backbone (pretrained on)':<26}{'test family':<16}{'configuration':<24}"
          + "".join(f"{k:>15}" for k in KEYS) + f"{'s/fit':>7}")
    for r in rows:
        cells = "".join(f"{r[k]:>8.3f} ±{r[f'{k}_std']:.3f}" for k in KEYS)
        print(f"{r['pretrained_on']:<26}{r['family']:<16}{r['config']:<24}{cells}{r['seconds']:>7.1f}")


def _synth(args: tuple[str, SynthConfig]) -> None:
    synth(*args)


def ensure_data(work: Path, families: list[str], source: str, siblings: str, test_lots: int,
                pretrain_lots: int) -> None:
    """Every set the benchmark reads, written in parallel (2 processes) unless already in ``work``."""
    jobs = [(str(work / f"pretrain-{source}"), SynthConfig(seed=1000, lots=pretrain_lots, per_class=10, family=source)),
            (str(work / f"pretrain-{siblings}"), SynthConfig(seed=1100, lots=pretrain_lots, per_class=10,
                                                             family=siblings))]
    for fam in dict.fromkeys([*families, siblings]):
        jobs += [(str(work / fam / "support"), SynthConfig(seed=2000, lots=1, per_class=10, family=fam)),
                 (str(work / fam / "test"), SynthConfig(seed=6000, lots=test_lots, per_class=10, family=fam))]
    todo = [j for j in jobs if not (Path(j[0]) / "manifest.csv").exists()]
    if todo:
        t0 = time.perf_counter()
        with ProcessPoolExecutor(max_workers=2) as pool:
            list(pool.map(_synth, todo))
        print(f"synth: {len(todo)} sets in {time.perf_counter() - t0:.0f} s", flush=True)


def ensure_weights(work: Path, family: str, backbone: str, steps: int | None) -> tuple[str, dict[str, object]]:
    path = work / f"pretrained-{family}.safetensors"
    record = work / f"pretrained-{family}.json"
    if not path.exists():
        cfg = PretrainConfig(manifest=str(work / f"pretrain-{family}" / "manifest.csv"), out=str(path),
                             model=ModelSpec(backbone=backbone), max_minutes=0.0)  # every step: rows do not
        # depend on the day's speed (pretrain's default budget would cut them on a slow day)
        result = pretrain(cfg if steps is None else replace(cfg, steps=steps))
        print("\n".join(heldout_table(result.before, result.after)), flush=True)
        record.write_text(json.dumps({"seconds": result.seconds, "steps": result.steps, "before": result.before,
                                      "after": result.after}))
        print(f"pretrain on {family}: {result.steps} steps in {result.seconds:.0f} s (cached in {path})", flush=True)
    return str(path), json.loads(record.read_text())


def evaluate_family(work: Path, weights: str, pretrained_on: str, family: str, backbone_name: str,
                    seeds: list[int], validation: str, configs: list[str]) -> list[dict[str, object]]:
    prompts = load_prompts()
    backbone = load_backbone(backbone_name, weights)
    text = torch.from_numpy(text_embeddings(backbone, prompts))
    role = "siblings" if family == pretrained_on else ("val" if family == validation else "held-out")
    print(f"\n[{pretrained_on} -> {family} ({role})]", flush=True)
    support = load_lot(work / family / "support", backbone, prompts.classes, "support x4", augmented=True)
    test = load_lot(work / family / "test", backbone, prompts.classes, "test", augmented=False)
    base = {"pretrained_on": pretrained_on, "family": f"{family} ({role})", "role": role}
    rows = []
    for name, weight in (("semclip zero-shot", DEFAULT_SELF_SIMILARITY), ("zero-shot - self similarity", 0.0)):
        zero = new_model(ModelSpec(backbone=backbone_name, pretrained=weights, self_similarity=weight), backbone.clip,
                         text)
        with torch.no_grad():
            out = score_features(zero, test.feats, (test.data.views.shape[-2], test.data.views.shape[-1]))
            figures = metrics(out, test, defect_view_probs(zero, backbone, out, test))
        figures["seconds"] = 0.0
        print(f"    {name}: " + " ".join(f"{k} {figures[k]:.3f}" for k in KEYS), flush=True)
        rows.append(summarise({**base, "config": name, "seeds": 1}, [figures]))
    for name in configs:
        method, recipe = CONFIGS[name]
        runs = [run_config(name, method, recipe, backbone, text, support, test, seed) for seed in seeds]
        rows.append(summarise({**base, "config": name, "seeds": len(seeds)}, runs))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True)
    parser.add_argument("--backbone", default="semclip-tiny")
    parser.add_argument("--source", default="classic", help="family A: the transfer backbone is pretrained on it")
    parser.add_argument("--families", default="contacts,logic,metal", help="families tested after pretraining on A")
    parser.add_argument("--siblings", default="metal", help="pretrained and tested on its own siblings")
    parser.add_argument("--validation", default="contacts", help="the family settings were chosen on")
    parser.add_argument("--no-siblings", action="store_true", help="only the transfer part (a)")
    parser.add_argument("--json", default="quality.json", help="file name of the table, in --work")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="a subset of: " + ", ".join(CONFIGS))
    parser.add_argument("--seeds", default="0,1", help="support draws (the defaults fit the 60-minute cap here)")
    parser.add_argument("--test-lots", type=int, default=1, help="70 frames per lot")
    parser.add_argument("--pretrain-lots", type=int, default=PRETRAIN_LOTS, help="70 frames per lot")
    parser.add_argument("--pretrain-steps", type=int, default=None, help="[default: pretrain's] (smoke tests only)")
    args = parser.parse_args()
    work = Path(args.work)
    started = time.perf_counter()
    families = [f for f in args.families.split(",") if f and f != args.source]
    seeds = [int(s) for s in args.seeds.split(",")]
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if set(configs) - set(CONFIGS):
        parser.error(f"--configs: unknown {sorted(set(configs) - set(CONFIGS))}; choose from {', '.join(CONFIGS)}")
    ensure_data(work, families, args.source, args.siblings, args.test_lots, args.pretrain_lots)
    rows: list[dict[str, object]] = []
    pretraining: dict[str, object] = {}
    parts = [(args.source, families)] + ([] if args.no_siblings else [(args.siblings, [args.siblings])])
    for pretrained_on, tested in parts:
        weights, record = ensure_weights(work, pretrained_on, args.backbone, args.pretrain_steps)
        pretraining[pretrained_on] = record
        for family in tested:
            rows += evaluate_family(work, weights, pretrained_on, family, args.backbone, seeds, args.validation, configs)
            (work / args.json).write_text(json.dumps({"backbone": args.backbone, "rows": rows,
                                                           "pretraining": pretraining}, indent=2))
    print_table(rows)
    total = time.perf_counter() - started
    print(f"\ntotal {total / 60:.1f} min")
    (work / args.json).write_text(json.dumps({"backbone": args.backbone, "rows": rows, "pretraining": pretraining,
                                                   "minutes": total / 60}, indent=2))


if __name__ == "__main__":
    main()
