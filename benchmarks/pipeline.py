"""Throughput of the whole pipeline, the model stage alone, and a plain single-process loop.

    .venv/bin/python benchmarks/pipeline.py                      # semclip-tiny and ViT-B-16-plus-240
    .venv/bin/python benchmarks/pipeline.py --backbones semclip-tiny --images 400

Same synthetic lot, backbone (random weights: speed does not depend on their values), batch size and torch
threads for all three. "plain loop" = read + decode + preprocess + SEM-CLIP + mask/regions in one process,
no Ray and no output writes; "model stage" = the Predictor actor's work on already-decoded batches;
"pipeline" = `semclip-batch run` end to end (Ray Data, writes to Zarr + Parquet), from the first block to the
last receipt: it includes starting the actor (importing torch, building the model: a few seconds).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from semclip_batch.config import ModelSpec, RunConfig, Thresholds
from semclip_batch.io.manifest import read_manifest
from semclip_batch.methods.decisions import defect_regions
from semclip_batch.methods.prompts import load_prompts, text_embeddings
from semclip_batch.methods.weights import load_backbone, preprocess_config
from semclip_batch.pipeline.driver import run
from semclip_batch.pipeline.inference import Predictor, PredictorSetup
from semclip_batch.pipeline.reader import decode_batch
from semclip_batch.synth.generate import SynthConfig, synth


def make_lot(folder: Path, images: int) -> Path:
    per_class = max(1, images // 7)
    synth(str(folder), SynthConfig(seed=99, lots=1, per_class=per_class, sizes=((256, 256), (240, 320), (480, 480))))
    return folder / "manifest.csv"


def decoded_batches(manifest: Path, prep, batch_size: int) -> list[dict[str, np.ndarray]]:
    df = read_manifest(str(manifest))
    cols = {c: df[c].to_numpy(dtype=object) for c in ("image_id", "uri", "url", "lot_id", "wafer_id", "die_x", "die_y")}
    cols["shard"] = np.full(len(df), "s00000", dtype=object)
    batches = []
    for start in range(0, len(df), batch_size):
        batches.append(decode_batch({k: v[start:start + batch_size] for k, v in cols.items()}, prep=prep))
    return batches


def bench_backbone(name: str, images: int, batch_size: int, threads: int, precision: str) -> dict[str, float | str]:
    torch.set_num_threads(threads)
    spec = ModelSpec(backbone=name, pretrained="none", precision=precision)
    prep = preprocess_config(name, tile_above=1024)
    backbone = load_backbone(name, "none")
    text = text_embeddings(backbone, load_prompts())
    setup = PredictorSetup(spec=spec, prep=prep, text_embeddings=text, weights_sha256=backbone.sha256,
                           batch_size=batch_size, threads=threads, use_gpu=False)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = make_lot(Path(tmp) / "data", images)
        n = len(read_manifest(str(manifest)))
        predictor = Predictor(setup)
        # plain loop: everything in one process, batch by batch
        t0 = time.perf_counter()
        for batch in decoded_batches(manifest, prep, batch_size):
            out = predictor(batch)
            for i in range(len(out["image_id"])):
                mask = np.frombuffer(out["mask"][i], np.uint8).reshape(int(out["height"][i]), int(out["width"][i]))
                defect_regions(mask, Thresholds().pixel, Thresholds().min_region_px)
        plain = n / (time.perf_counter() - t0)
        # model stage alone on already-decoded batches
        batches = decoded_batches(manifest, prep, batch_size)
        t0 = time.perf_counter()
        for batch in batches:
            predictor(batch)
        model_only = n / (time.perf_counter() - t0)
        del predictor
        cfg = RunConfig(input=str(manifest), out=str(Path(tmp) / "out"), model=spec, batch_size=batch_size)
        record = run(cfg).record
        pipeline = record["throughput_img_s"]
    return {"backbone": name, "images": n, "batch_size": batch_size, "threads": threads, "precision": precision,
            "pipeline_img_s": round(pipeline, 2), "model_stage_img_s": round(model_only, 2),
            "plain_loop_img_s": round(plain, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="semclip-tiny,ViT-B-16-plus-240")
    parser.add_argument("--images", type=int, default=0, help="images per backbone (default: 420 tiny, 35 others)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    rows = []
    for name in args.backbones.split(","):
        images = args.images or (420 if name == "semclip-tiny" else 35)
        rows.append(bench_backbone(name, images, args.batch_size, args.threads, args.precision))
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, CPU")
    header = f"{'backbone':<20} {'images':>6} {'batch':>5} {'prec':>5} {'pipeline':>10} {'model stage':>12} {'plain loop':>11}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['backbone']:<20} {r['images']:>6} {r['batch_size']:>5} {r['precision']:>5} "
              f"{r['pipeline_img_s']:>10} {r['model_stage_img_s']:>12} {r['plain_loop_img_s']:>11}   (img/s)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
