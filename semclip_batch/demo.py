"""``demo``: every step, in order, on synthetic lots:
synth -> train (10-shot, on the shipped weights) -> run -> eval -> aggregate -> report -> summary;
``--pretrain`` first pretrains a backbone with the short schedule (cached in DIR) and trains on it instead.

Synthetic sets from apart seeds: a 10-shot support set and the test lots (and, with ``--pretrain``, pretraining
lots). The shipped weights were pretrained on other seeds still (:mod:`semclip_batch.methods.shipped`).
"""

from __future__ import annotations

from collections.abc import Iterator

from safetensors import safe_open

from semclip_batch.analysis.aggregate import aggregate
from semclip_batch.analysis.evaluate import evaluate
from semclip_batch.analysis.report import write_report
from semclip_batch.analysis.results import lot_summary
from semclip_batch.config import (
    DEFAULT_ADAPT_BELOW,
    DEFAULT_ADAPT_STEPS,
    DEFAULT_MAP_SHIFTS,
    CheckpointRequest,
    ModelSpec,
    RunConfig,
)
from semclip_batch.fewshot.adapt import adaptation_lines
from semclip_batch.fewshot.pretrain import OPTIMIZER, PretrainConfig, pretrain
from semclip_batch.fewshot.scale_check import support_check_lines
from semclip_batch.fewshot.train import TrainConfig, train
from semclip_batch.io import storage, targets
from semclip_batch.methods.shipped import SHIPPED, shipped_weights
from semclip_batch.pipeline.driver import run
from semclip_batch.synth.generate import SynthConfig, synth

SIZES = ((256, 256), (240, 320), (300, 200))
LOT_SIZES = (*SIZES, (1200, 900))  # the test lots' frames; the support set is drawn at the same sizes, as a fab
# labels frames of its own lots (a support set without 1200x900 frames gave pAUROC 0.881 instead of 0.928 on
# classic lots of other seeds: README "The two commands")
DEMO_STEPS = 350
DEMO_RECIPE = {"steps": str(DEMO_STEPS), "keep": str(PretrainConfig.keep), "optimizer": OPTIMIZER}


def _cached_weights(path: str, backbone: str) -> str | None:
    """The sha256 of a previous demo's weights file for ``backbone``, if there is one."""
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
    except (OSError, ValueError):
        return None
    ok = meta.get("backbone") == backbone and all(meta.get(k) == v for k, v in DEMO_RECIPE.items())
    return meta.get("sha256") if ok else None


def _short_pretrain(pre: str, weights: str, backbone: str) -> Iterator[str]:
    """``demo --pretrain``: the short schedule on synthetic lots, cached in ``pre``."""
    digest = _cached_weights(weights, backbone)
    if digest is None:
        synth(pre, SynthConfig(seed=1000, lots=6, per_class=10, sizes=SIZES))
        yield f"[2/8] pretrain: {backbone} from random weights, {DEMO_STEPS} steps (the short schedule, ~3 min)"
        digest = pretrain(PretrainConfig(manifest=storage.join(pre, "manifest.csv"), out=weights, steps=DEMO_STEPS,
                                         model=ModelSpec(backbone=backbone), max_minutes=0.0,  # every step: cached
                                         scale_check=False),  # train's own check chooses the maps' policy
                          metadata=DEMO_RECIPE).sha256
    else:
        yield f"[2/8] pretrain: cached {weights}"
    yield f"      weights sha256 {digest}"


def run_demo(folder: str, *, backbone: str = "semclip-tiny", with_pretrain: bool = False) -> Iterator[str]:
    """Run the demo, yielding lines to show."""
    root = storage.normalize_root(folder)
    targets.check_target(root, "folder", "DIR (the demo's folder)")
    data, support, pre, out = (storage.join(root, p) for p in ("data", "support", "pretrain", "out"))
    ckpt = storage.join(root, "checkpoint")
    yield f"[1/8] synth: test lots -> {data}, 10-shot support set -> {support}"
    manifest = synth(data, SynthConfig(seed=7, lots=2, per_class=3, sizes=LOT_SIZES))
    synth(support, SynthConfig(seed=2000, lots=1, per_class=10, sizes=LOT_SIZES))
    yield f"      {len(manifest)} test images in {manifest['lot_id'].nunique()} lots (about a quarter of them 1200x900, tiled)"
    if with_pretrain:
        weights = storage.join(pre, "weights.safetensors")
        yield from _short_pretrain(pre, weights, backbone)
    else:
        weights = SHIPPED
        yield (f"[2/8] pretrain: skipped; the shipped {backbone} weights (pretrained by `pretrain` with its defaults on "
               f"2,030 synthetic frames of other seeds; `demo --pretrain` shows the step)")
        yield f"      weights sha256 {shipped_weights(backbone).sha256}"
    yield ("[3/8] train: 10-shot SEM-CLIP (recipe transfer; as train's default, the backbone adapted on the support "
           "frames first if it does not know them, the maps' scale and the die-to-die residual checked on the frames the "
           "fit held out)")
    meta = train(TrainConfig(support=storage.join(support, "manifest.csv"), out=ckpt, shots=10,
                             adapt_steps=DEFAULT_ADAPT_STEPS, adapt_below=DEFAULT_ADAPT_BELOW, check_scale=True,
                             reference_residual=True, model=ModelSpec(backbone=backbone, pretrained=weights, cls="fused")))
    yield (f"      checkpoint {ckpt}: alpha {meta.alpha:.2f}, thresholds image {meta.thresholds.image:.3f} "
           f"pixel {meta.thresholds.pixel:.3f}, {meta.training['seconds']} s")
    yield from ("      " + line for line in support_check_lines(meta.training))
    yield from ("      " + line for line in adaptation_lines(meta.training))
    yield (f"[4/8] run: the checkpoint on the test lots, each map averaged over {DEFAULT_MAP_SHIFTS} half-patch shifts as "
           f"run's default, on a private local Ray -> {out}")
    cfg = RunConfig(input=storage.join(data, "manifest.csv"), out=out,
                    model=CheckpointRequest(url=ckpt, map_shifts=DEFAULT_MAP_SHIFTS), overwrite=True)
    result = run(cfg)
    rec = result.record
    yield f"      run {rec['run_id']}: {rec['status']}, counts {rec['counts']}, {rec['throughput_img_s']} img/s"
    yield "[5/8] eval against the synthetic ground truth:"
    m = evaluate(out, storage.join(data, "manifest.csv"))
    yield "      " + ", ".join(f"{k} {m[k]:.3f}" for k in ("iAUROC", "pAUROC", "F1max", "AUPRO", "accuracy", "macro_F1")
                                 if m[k] is not None)
    yield "[6/8] aggregate: per (lot, wafer, class) statistics"
    yield f"      {len(aggregate(out))} rows -> {out}/lot_stats"
    yield "[7/8] report: wafer maps, Pareto of classes, defect rate per wafer, the most anomalous frames"
    yield f"      {write_report(out)}"
    yield "[8/8] summary per lot:"
    yield from ("      " + line for line in lot_summary(out).to_string(index=False).splitlines())
    yield (f"outputs: {out}/predictions (Parquet, hive by lot_id), {out}/masks.zarr, {out}/lot_stats, "
           f"{out}/metrics.json, {out}/reports/index.html, {result.record_url}")
    sql = "select lot_id, defect_class, count(*) from predictions group by all"
    yield f'query them: .venv/bin/semclip-batch query {out} "{sql}"'
