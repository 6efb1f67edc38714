"""``demo``: the steps that exist, in order, on synthetic lots (synth -> run -> aggregate -> summary)."""

from __future__ import annotations

from collections.abc import Iterator

from . import storage
from .aggregate import aggregate
from .config import ModelSpec, RunConfig
from .pipeline import run
from .query import render, run_query
from .results import lot_summary
from .synth import SynthConfig, synth

DEMO_SIZES = ((256, 256), (240, 320), (300, 200), (1200, 900))


def run_demo(folder: str, *, backbone: str = "semclip-tiny") -> Iterator[str]:
    """Run the demo, yielding lines to show."""
    root = storage.normalize_root(folder)
    data, out = storage.join(root, "data"), storage.join(root, "out")
    yield f"[1/4] synth: synthetic SEM lots -> {data}"
    manifest = synth(data, SynthConfig(seed=7, lots=2, per_class=3, sizes=DEMO_SIZES))
    yield f"      {len(manifest)} images, {manifest['lot_id'].nunique()} lots (one 1200x900 frame per lot is tiled)"
    yield f"[2/4] run: zero-shot SEM-CLIP ({backbone}, seeded random weights) on a private local Ray -> {out}"
    cfg = RunConfig(input=storage.join(data, "manifest.csv"), out=out,
                    model=ModelSpec(backbone=backbone, pretrained="none", seed=0), overwrite=True, show_progress=False)
    result = run(cfg)
    rec = result.record
    yield f"      run {rec['run_id']}: {rec['status']}, counts {rec['counts']}, {rec['throughput_img_s']} img/s"
    yield "[3/4] aggregate: per (lot, wafer, class) statistics"
    stats = aggregate(out)
    yield f"      {len(stats)} rows -> {out}/lot_stats"
    yield "[4/4] summary per lot:"
    yield from ("      " + line for line in lot_summary(out).to_string(index=False).splitlines())
    sql = "select lot_id, count(*) as images, avg(anomaly_score) as mean_score from predictions group by 1 order by 1"
    yield f"      query: {sql}"
    yield from ("      " + line for line in render(run_query(out, sql), "table").splitlines())
    yield "note: with random weights the classes and maps carry no learned meaning; train/pretrain come later."
    yield f"outputs: {out}/predictions (Parquet, hive by lot_id), {out}/masks.zarr, {out}/lot_stats, {result.record_url}"
