"""``demo``: the steps that exist, in order, on synthetic lots (synth -> run -> summary per lot)."""

from __future__ import annotations

from collections.abc import Iterator

from . import storage
from .config import ModelSpec, RunConfig
from .pipeline import run
from .results import lot_summary
from .synth import SynthConfig, synth


def run_demo(folder: str, *, backbone: str = "semclip-tiny") -> Iterator[str]:
    """Run the demo, yielding lines to show."""
    root = storage.normalize_root(folder)
    data, out = storage.join(root, "data"), storage.join(root, "out")
    yield f"[1/3] synth: synthetic SEM lots -> {data}"
    manifest = synth(data, SynthConfig(seed=7, lots=2, per_class=3, sizes=((256, 256), (240, 320), (300, 200),
                                                                            (1200, 900))))
    yield f"      {len(manifest)} images, {manifest['lot_id'].nunique()} lots"
    yield f"[2/3] run: zero-shot SEM-CLIP ({backbone}, seeded random weights) on Ray -> {out}"
    cfg = RunConfig(input=storage.join(data, "manifest.csv"), out=out,
                    model=ModelSpec(backbone=backbone, pretrained="none", seed=0), overwrite=True,
                    show_progress=False)
    result = run(cfg)
    rec = result.record
    yield f"      run {rec['run_id']}: {rec['status']}, counts {rec['counts']}, {rec['throughput_img_s']} img/s"
    yield "[3/3] summary per lot:"
    yield from ("      " + line for line in lot_summary(out).to_string(index=False).splitlines())
    yield f"outputs: {out}/predictions (Parquet, hive by lot_id), {out}/masks.zarr, run record {result.record_url}"
