r"""Small defects at any frame size, and reference frames registered: the scale policy and registration measured.

    .venv/bin/python benchmarks/resolution.py --work /tmp/resolution            # data and checkpoints cached there
    .venv/bin/python benchmarks/resolution.py --families logic --configs whole,0.5 --throughput-frames 0

Every configuration is what a user runs: ``train`` (10-shot, ``--recipe transfer``, the shipped ``semclip-tiny``
weights, which were pretrained on ``classic`` only) writes a checkpoint, ``run`` (a private local Ray) scores a
test lot of other seeds, and the stored uint8 maps are compared with the truth masks at frame resolution.
Pixel AUROC and F1max are reported per defect-size bucket: every truth region (8-connected) falls in the
bucket of its longer bounding-box side (< 8 px, 8-32 px, > 32 px at frame resolution); a bucket's positives are
its regions' pixels, its negatives every defect-free pixel of the lot.

Families (``synth --family``; support seed 3000, test seed 7000): ``contacts@1024`` (contacts drawn at
768-1024 px, so its 8-30 px defects shrink below a patch) is the validation family: the scale policy's
fraction and the reference fusion weight were chosen on it. ``contacts-small@1024`` (the same with 3-10 px
defects, ``synth --defect-px 3-10``) is a second validation family, for the reference join and weight where
defects are small. ``logic`` (512-1024 px, 3-10 px defects), ``metal`` (400-900 px, 20-60 px) and
``metal-small`` (``metal`` drawn with 3-10 px defects) are held out: nothing was chosen on them.

Configurations (``--configs``): a scale policy name (``whole``, ``native``, ``0.5``...), optionally with ``+ref``
(``train --use-reference``, registered), ``+ref-noreg`` (references as they come), ``+mean`` or ``+max`` (how the
reference map joins its token and pixel terms) and ``@W`` (the reference fusion weight, e.g.
``whole+ref+max@0.3``, or ``@auto``: ``train --reference-weight auto``, trained apart); a weight or a join other
than the default scores the same trained tensors with the checkpoint's field changed. ``+zs`` (e.g. ``native+zs``)
scores zero-shot, as ``run --pretrained P --scale-policy X`` does with its defaults, instead of training.
``--throughput-frames`` 1024x1024 frames of the first family are also scored by ``run`` with each policy's
checkpoint or zero-shot spec (img/s from the run record: the pipeline stage, Ray's start excluded).
``--pretrained`` trains on other ``semclip-tiny`` weights instead of the shipped ones (a ``pretrain`` output, e.g.
on a family's own archive, as a fab would pretrain on its own lots). Each row also counts the defect frames whose
map peaks within 30 px of a truth pixel (``argmax<=30px``; the peak is the first pixel of the stored uint8 map's
maximum in row order, as numpy's argmax). Prints a table and writes ``--work/resolution.json``.

    .venv/bin/python benchmarks/resolution.py --families contacts-small@1024 --throughput-frames 0 \
        --configs "0.5+ref+mean@0.5,0.5+ref+mean@0.75,0.5+ref+mean@1.0,0.5+ref+max@0.5,0.5+ref+max@0.75,whole,0.5"
    .venv/bin/python benchmarks/resolution.py --families logic --test-per-class 14 --throughput-frames 0 \
        --configs whole,0.5,whole+ref --pretrained pretrained-logic.safetensors     # a `pretrain` on logic
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from semclip_batch.analysis.evaluate import joined_rows, truth_mask
from semclip_batch.analysis.metrics import PixelCounts, roc_auc
from semclip_batch.config import (
    DEFAULT_REFERENCE_FUSION,
    NORMAL,
    REFERENCE_FUSIONS,
    CheckpointRequest,
    ModelSpec,
    RunConfig,
    parse_scale_policy,
    tile_overlap_for,
    zero_shot_spec,
)
from semclip_batch.errors import OK
from semclip_batch.fewshot.train import TrainConfig, train
from semclip_batch.io.layout import OutLayout
from semclip_batch.io.masks import mask_array, open_masks
from semclip_batch.pipeline.driver import run
from semclip_batch.synth.generate import SynthConfig, synth

BUCKETS = (("<8", 0, 8), ("8-32", 8, 33), (">32", 33, 10**9))
# name: (synth family, frame sizes or the family's, defect sizes in px or the family's)
FAMILIES: dict[str, tuple[str, tuple[tuple[int, int], ...] | None, tuple[float, float] | None]] = {
    "contacts@1024": ("contacts", ((1024, 1024), (768, 768), (1024, 768)), None),
    "contacts-small@1024": ("contacts", ((1024, 1024), (768, 768), (1024, 768)), (3.0, 10.0)),
    "logic": ("logic", None, None),
    "metal": ("metal", None, None),
    "metal-small": ("metal", None, (3.0, 10.0)),
}
VALIDATION = ("contacts@1024", "contacts-small@1024")
TEST_SEED = 7000  # the test lots (support: seed 3000)
EIGHT = np.ones((3, 3), bool)


@dataclass(frozen=True)
class Config:
    name: str
    policy: float | None
    reference: bool = False
    register: bool = True
    weight: float | None = None  # None: the default
    fusion: str | None = None  # None: the default
    auto: bool = False  # @auto: train --reference-weight auto (chosen on the support frames the fit held out)
    zero_shot: bool = False  # +zs: zero-shot ``run --scale-policy P`` (its defaults), no checkpoint


def parse_config(text: str) -> Config:
    head, _, weight = text.partition("@")
    policy, *flags = head.split("+")
    fusion = next((f for f in flags if f in REFERENCE_FUSIONS), None)
    auto = weight.strip().lower() == "auto"
    cfg = Config(name=text, policy=parse_scale_policy(policy), reference=any(f.startswith("ref") for f in flags),
                 register="ref-noreg" not in flags, weight=float(weight) if weight and not auto else None,
                 fusion=fusion, auto=auto, zero_shot="zs" in flags)
    if cfg.zero_shot and (cfg.reference or cfg.weight is not None or cfg.fusion or cfg.auto):
        raise SystemExit(f"{text}: a zero-shot configuration takes no references (they are fitted by train)")
    return cfg


def model_of(work: Path, family: str, shots: int, cfg: Config, seed: int,
             pretrained: str) -> ModelSpec | CheckpointRequest:
    """The zero-shot spec, or the (cached) checkpoint ``train`` writes for ``cfg`` on the family's support lot
    (seed 3000, ``shots`` frames a class; drawn here on first use)."""
    if cfg.zero_shot:
        return zero_shot_spec("semclip-tiny", pretrained, scale_policy=cfg.policy)  # zero-shot run's defaults, 1 shift
    return CheckpointRequest(url=checkpoint(work, family, lot(work, family, 3000, shots), cfg, seed, pretrained))


def lot(work: Path, name: str, seed: int, per_class: int, sizes: tuple[tuple[int, int], ...] | None = None) -> Path:
    family, family_sizes, defect_px = FAMILIES[name]
    folder = work / f"{name}-{seed}-{per_class}{'' if sizes is None else '-' + 'x'.join(map(str, sizes[0]))}"
    if not (folder / "manifest.csv").exists():
        synth(str(folder), SynthConfig(seed=seed, lots=1, wafers=1, dies=1, per_class=per_class, family=family,
                                       sizes=sizes or family_sizes, defect_px=defect_px))
    return folder


def weights_tag(pretrained: str) -> str:
    """The prefix of cached checkpoints and outputs trained on other weights than the shipped ones (their file
    name: weights written again under the same name need a fresh ``--work``)."""
    return "" if pretrained == "shipped" else f"{Path(pretrained).stem}-"


def checkpoint(work: Path, family: str, support: Path, cfg: Config, seed: int, pretrained: str = "shipped") -> str:
    base = Config(name="", policy=cfg.policy, reference=cfg.reference, register=cfg.register)
    # a policy's checkpoints are named with their tiles' overlap: those cached before SCALE_POLICY_OVERLAP (0.25)
    # are trained again, not scored on other tiles than they trained on
    overlap = "" if cfg.policy is None else f"-ov{tile_overlap_for(cfg.policy):g}"
    folder = work / "ckpt" / (f"{weights_tag(pretrained)}{family}-{base.policy}-{base.reference}-{base.register}-{seed}"
                              + (f"-auto-{cfg.fusion or DEFAULT_REFERENCE_FUSION}" if cfg.auto else "") + overlap)
    if not (folder / "checkpoint.json").exists():
        spec = ModelSpec(backbone="semclip-tiny", pretrained=pretrained, seed=seed, cls="fused",
                         use_reference=cfg.reference, register_reference=cfg.register, scale_policy=cfg.policy,
                         reference_fusion=(cfg.fusion or DEFAULT_REFERENCE_FUSION) if cfg.auto else DEFAULT_REFERENCE_FUSION)
        t0 = time.perf_counter()
        meta = train(TrainConfig(support=str(support / "manifest.csv"), out=str(folder), model=spec,
                                 choose_reference_weight=cfg.auto))
        print(f"  trained {folder.name} in {time.perf_counter() - t0:.0f} s", flush=True)
        if cfg.auto:
            print(f"  reference weight chosen: {json.dumps(meta.training.get('reference_weight_choice'))}", flush=True)
    if cfg.auto or (cfg.weight is None and cfg.fusion is None):  # auto: trained with its join, its weight chosen
        return str(folder)
    changed = {"reference_weight": cfg.weight, "reference_fusion": cfg.fusion}
    changed = {k: v for k, v in changed.items() if v is not None}
    variant = folder.with_name(f"{folder.name}@{cfg.weight}+{cfg.fusion}")  # same tensors, other fusion fields
    if not variant.exists():
        shutil.copytree(folder, variant)
        meta = json.loads((variant / "checkpoint.json").read_text())
        meta.update(changed)
        (variant / "checkpoint.json").write_text(json.dumps(meta, indent=2))
    return str(variant)


def score(model: ModelSpec | CheckpointRequest, test: Path, out: Path) -> dict[str, Any]:
    """``run`` the model (zero-shot spec or checkpoint) on the test lot; its run record."""
    if out.exists():
        shutil.rmtree(out)
    result = run(RunConfig(input=str(test / "manifest.csv"), out=str(out), model=model))
    return result.record


def bucket_of(mask: np.ndarray) -> np.ndarray:
    """Per pixel: the index in :data:`BUCKETS` of its truth region (-1: no defect)."""
    labels, _ = ndimage.label(mask, structure=EIGHT)
    out = np.full(mask.shape, -1, np.int8)
    for k, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        side = max(box[0].stop - box[0].start, box[1].stop - box[1].start)
        b = next(i for i, (_, lo, hi) in enumerate(BUCKETS) if lo <= side < hi)
        region = labels[box] == k
        out[box][region] = b
    return out


def bucket_metrics(out: Path, test: Path) -> dict[str, Any]:
    rows, _ = joined_rows(str(out), str(test / "manifest.csv"), None)
    ok = rows[rows["status"] == OK]
    root = open_masks(OutLayout(str(out)).masks, None, mode="r")
    counts = {name: PixelCounts() for name, _, _ in BUCKETS}
    everything = PixelCounts()
    regions = dict.fromkeys(counts, 0)
    scores, truth = [], []
    hits = defects = 0
    for _, row in ok.iterrows():
        pred = np.asarray(mask_array(root, row["mask_path"])[int(row["mask_index"])])
        mask = truth_mask(row, pred.shape, None)
        scores.append(float(row["anomaly_score"]))
        truth.append(row["label"] != NORMAL)
        if mask is None:
            continue
        everything.add(pred, mask)
        if mask.any():  # issue 14's criterion: the map's maximum within 30 px of a truth pixel
            y, x = np.unravel_index(int(pred.argmax()), pred.shape)
            hits += bool(ndimage.distance_transform_edt(~mask)[y, x] <= 30)
            defects += 1
        buckets = bucket_of(mask)
        for b, (name, _, _) in enumerate(BUCKETS):
            keep = (buckets == b) | ~mask
            counts[name].add(pred[keep][None], mask[keep][None])
            regions[name] += int(ndimage.label(buckets == b, structure=EIGHT)[1])
    result: dict[str, Any] = {"pAUROC": everything.auroc(), "F1max": everything.f1_max(),
                              "iAUROC": roc_auc(np.array(scores), np.array(truth, bool)), "argmax<=30px": f"{hits}/{defects}"}
    for name, c in counts.items():
        result[f"pAUROC{name}"] = c.auroc()
        result[f"F1max{name}"] = c.f1_max()
        result[f"regions{name}"] = regions[name]
    return result


def fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/resolution")
    ap.add_argument("--families", default="contacts@1024,logic,metal")
    ap.add_argument("--configs", default="whole,0.5,native")
    ap.add_argument("--shots", type=int, default=10)
    ap.add_argument("--test-per-class", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test-seed", type=int, default=TEST_SEED, help="seed of the test lots (another draw of them)")
    ap.add_argument("--pretrained", default="shipped",
                    help="semclip-tiny weights to train on (a `pretrain` output; default: the shipped classic ones)")
    ap.add_argument("--throughput-frames", type=int, default=42, help="1024x1024 frames per throughput run (0: none)")
    ap.add_argument("--throughput-only", action="store_true", help="only the throughput runs (on a quiet machine)")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    configs = [parse_config(c) for c in args.configs.split(",")]
    results: list[dict[str, Any]] = []
    for family in [] if args.throughput_only else args.families.split(","):
        test = lot(work, family, args.test_seed, args.test_per_class)
        for cfg in configs:
            model = model_of(work, family, args.shots, cfg, args.seed, args.pretrained)
            out = work / "out" / (f"{weights_tag(args.pretrained)}{family}-{cfg.name}"
                                  + ("" if args.test_seed == TEST_SEED else f"-test{args.test_seed}"))
            record = score(model, test, out)
            weight = (json.loads((Path(model.url) / "checkpoint.json").read_text()).get("reference_weight")
                      if isinstance(model, CheckpointRequest) else None)
            row = {"family": family, "set": "val" if family in VALIDATION else "held-out", "config": cfg.name,
                   "weight": weight if cfg.reference else None, **bucket_metrics(out, test),
                   "img_s": record["throughput_img_s"], "pretrained": args.pretrained}
            results.append(row)
            print("  " + "  ".join(f"{k} {fmt(v)}" for k, v in row.items()), flush=True)
    first = args.families.split(",")[0]
    if args.throughput_frames:
        per_class = max(1, args.throughput_frames // 7)
        big = lot(work, first, 9000, per_class, sizes=((1024, 1024),))
        for cfg in {(c.policy, c.zero_shot): c for c in configs if not c.reference}.values():
            record = score(model_of(work, first, args.shots, replace(cfg, weight=None), args.seed, args.pretrained), big,
                           work / "out" / f"speed-{weights_tag(args.pretrained)}{cfg.name}")
            results.append({"family": f"{first} 1024x1024", "set": "throughput", "config": cfg.name,
                            "img_s": record["throughput_img_s"], "frames": record["rows"]["total"]})
            print(f"  throughput {cfg.name}: {record['throughput_img_s']} img/s", flush=True)
    keys = ["family", "set", "config", "weight", "pAUROC<8", "pAUROC8-32", "pAUROC>32", "F1max<8", "F1max8-32", "F1max>32",
            "pAUROC", "F1max", "iAUROC", "argmax<=30px", "img_s"]
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in results:
        print("| " + " | ".join(fmt(row.get(k)) for k in keys) + " |")
    (work / "resolution.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
