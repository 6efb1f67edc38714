"""Throughput of the whole pipeline, the model stage alone, and a plain single-process loop.

    .venv/bin/python benchmarks/pipeline.py                      # semclip-tiny and ViT-B-16-plus-240
    .venv/bin/python benchmarks/pipeline.py --backbones semclip-tiny --images 400
    .venv/bin/python benchmarks/pipeline.py --decode-only      # decode + preprocess ms per frame on one core
    .venv/bin/python benchmarks/pipeline.py --model-stub 1000  # the pipeline around a stand-in accelerator
    .venv/bin/python benchmarks/pipeline.py --flops-only       # model FLOPs per frame against the matmul peak
    .venv/bin/python benchmarks/pipeline.py --defect-view-cost  # the model stage with the defect view off / on

Same synthetic lot, backbone (random weights: speed does not depend on their values), batch size and torch
threads for all three. "plain loop" = the pipeline's work in one process without Ray: plan, read + decode +
preprocess, SEM-CLIP, parts written, each shard finalised into Parquet + Zarr with its done marker (the same
functions the pipeline's stages call, local disk); "model stage" = the Predictor actor's work on already-decoded batches;
"pipeline" = `semclip-batch run` end to end (Ray Data, writes to Zarr + Parquet, finalisation), start-up
included; "steady" = frames over the span of the model stage inside that run, from its first batch to its last
(the rate the pipeline feeds the model once running); "start-up" = run start to the model stage's first batch
(manifest, plan, Ray, the actor importing torch and building the model). Each stage's busy, CPU and span
seconds come from Ray Data's own stats (also in the run record, `stages`).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, cast

import numpy as np
import pyarrow as pa
import torch
from flops import bench_flops, print_flops

from semclip_batch.config import DEFAULT_MAP_SHIFTS, DEFAULT_SELF_SIMILARITY, MAP_SHIFTS, ModelSpec, RunConfig, Thresholds
from semclip_batch.io.layout import OutLayout
from semclip_batch.io.manifest import read_manifest, read_manifest_table
from semclip_batch.io.schema import numpy_batch
from semclip_batch.methods.prompts import load_prompts, text_embeddings
from semclip_batch.methods.weights import load_backbone, preprocess_config
from semclip_batch.pipeline.driver import run
from semclip_batch.pipeline.finalise import FinaliseSetup, finalise_shard
from semclip_batch.pipeline.inference import Predictor, PredictorSetup
from semclip_batch.pipeline.reader import decode_batch
from semclip_batch.pipeline.shards import create_mask_groups, plan_shards, write_marker
from semclip_batch.pipeline.writer import WriterSetup, write_batch
from semclip_batch.synth.generate import SynthConfig, synth


def make_lot(folder: Path, images: int) -> Path:
    per_class = max(1, images // 7)
    synth(str(folder), SynthConfig(seed=99, lots=1, per_class=per_class, sizes=((256, 256), (240, 320), (480, 480))))
    return folder / "manifest.csv"


def planned_rows(manifest: Path) -> pa.Table:
    """The manifest's rows as the pipeline plans them (sorted, with their shards)."""
    return plan_shards(read_manifest_table(str(manifest)), RunConfig.shard_size)


def decoded_batches(manifest: Path, prep, batch_size: int) -> list[dict[str, np.ndarray]]:
    rows = planned_rows(manifest)
    return [numpy_batch(decode_batch(numpy_batch(rows.slice(start, batch_size)), prep=prep))
            for start in range(0, rows.num_rows, batch_size)]


def plain_loop(manifest: Path, out: Path, predictor: Predictor, prep, batch_size: int, model_id: str,
               classes: tuple[str, ...]) -> float:
    """The pipeline's work in this process, batch by batch, without Ray (see the module's docstring): frames a
    second, plan to last marker."""
    t0 = time.perf_counter()
    layout, so = OutLayout(str(out)), cast(dict[str, Any], {})
    rows = planned_rows(manifest)
    keys = list(zip(rows.column("lot_id").to_pylist(), rows.column("shard").to_pylist(), strict=True))
    size, left = Counter(keys), Counter(keys)
    create_mask_groups(layout, {lot for lot, _ in keys}, so)
    writer = WriterSetup(out=layout.root, run_id="plain-loop", model_id=model_id, classes=classes,
                         thresholds=Thresholds(), storage_options=so)
    finaliser = FinaliseSetup(out=layout.root, storage_options=so)
    for start in range(0, rows.num_rows, batch_size):
        decoded = decode_batch(numpy_batch(rows.slice(start, batch_size)), prep=prep)
        write_batch(numpy_batch(predictor(numpy_batch(decoded))), setup=writer)
        for key in keys[start:start + batch_size]:
            left[key] -= 1
            if not left[key]:
                done = finalise_shard(finaliser, *key, expected_rows=size[key])
                if done.error is not None:
                    raise RuntimeError(done.error)
                write_marker(layout, key, done.counts, so)
    return rows.num_rows / (time.perf_counter() - t0)


def bench_backbone(name: str, images: int, batch_size: int, threads: int, precision: str,
                   num_gpus: float = 0.0, map_shifts: int = DEFAULT_MAP_SHIFTS) -> dict[str, Any]:
    torch.set_num_threads(threads)
    spec = ModelSpec(backbone=name, pretrained="none", precision=precision, self_similarity=DEFAULT_SELF_SIMILARITY,
                     map_shifts=map_shifts)
    prep = preprocess_config(name, tile_above=1024)
    backbone = load_backbone(name, "none")
    text = text_embeddings(backbone, load_prompts())
    setup = PredictorSetup(spec=spec, prep=prep, text_embeddings=text, weights_sha256=backbone.sha256,
                           batch_size=batch_size, threads=threads, use_gpu=num_gpus > 0)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = make_lot(Path(tmp) / "data", images)
        n = len(read_manifest(str(manifest)))
        predictor = Predictor(setup)
        plain = plain_loop(manifest, Path(tmp) / "plain-out", predictor, prep, batch_size, "benchmark",
                           load_prompts().classes)
        # model stage alone on already-decoded batches
        batches = decoded_batches(manifest, prep, batch_size)
        t0 = time.perf_counter()
        for batch in batches:
            predictor(batch)
        model_only = n / (time.perf_counter() - t0)
        del predictor
        cfg = RunConfig(input=str(manifest), out=str(Path(tmp) / "out"), model=spec, batch_size=batch_size,
                        num_gpus=num_gpus)
        t0 = time.perf_counter()
        record = run(cfg).record
        wall = time.perf_counter() - t0
    stages = record.get("stages", [])
    model = next(s for s in stages if "Predictor" in s["stage"])
    return {"backbone": name, "images": n, "batch_size": batch_size, "threads": threads, "precision": precision,
            "map_shifts": map_shifts, "device": "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu",
            "pipeline_img_s": round(n / wall, 2), "pipeline_steady_img_s": round(n / model["span_s"], 2),
            "startup_s": round(model["start_s"], 2), "model_stage_img_s": round(model_only, 2),
            "plain_loop_img_s": round(plain, 2), "object_store_bytes_per_frame": store_bytes_per_frame(stages, n),
            "stages": stages}


def store_bytes_per_frame(stages: list[dict[str, Any]], frames: int) -> int:
    """Bytes every stage put into Ray's object store (its output blocks), summed, per frame."""
    return round(sum(s.get("out_bytes") or 0 for s in stages) / max(1, frames))


# (name, height, width, format, bits, TIFF compression, TIFF tile side)
DECODE_CASES = (("1024x1024 16-bit TIFF", 1024, 1024, "tif", 16, None, 0),
                ("1024x1024 16-bit TIFF deflate", 1024, 1024, "tif", 16, "zlib", 0),
                ("480x480 8-bit PNG", 480, 480, "png", 8, None, 0),
                ("4096x4096 16-bit TIFF tiled 256", 4096, 4096, "tif", 16, None, 256))


def frame_bytes(h: int, w: int, fmt: str, bits: int, compression: str | None, tile: int) -> bytes:
    """A `logic` family frame (routing, 12-bit window, charging streaks) encoded as the case asks."""
    import io

    import tifffile
    from PIL import Image

    from semclip_batch.synth.generate import make_site

    img, _, _ = make_site("particle", h, w, np.random.default_rng(5), None, "logic")
    arr = np.rint(img * (255 if bits == 8 else 4095)).astype(np.uint8 if bits == 8 else np.uint16)
    buf = io.BytesIO()
    if fmt == "png":
        Image.fromarray(arr).save(buf, format="PNG")
    else:
        tifffile.imwrite(buf, arr, photometric="minisblack", compression=compression, tile=(tile, tile) if tile else None)
    return buf.getvalue()


def bench_decode(repeats: int = 20) -> list[dict[str, float | str]]:
    """Milliseconds per frame on one core: decode from bytes in memory (``decode_image``), then preprocess into
    the model views ``run`` ships to the model stage (``packed_views``: stretch, resize, tiles above 1024 px,
    uint16 grey; the actor normalises)."""
    from semclip_batch.io.decode import decode_image
    from semclip_batch.io.preprocess import packed_views

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    prep = preprocess_config("ViT-B-16-plus-240", tile_above=1024)
    rows: list[dict[str, float | str]] = []
    try:
        for name, h, w, fmt, bits, compression, tile in DECODE_CASES:
            data = frame_bytes(h, w, fmt, bits, compression, tile)
            n = max(3, repeats * 1024 * 1024 // (h * w))
            views = packed_views(decode_image(data), prep)  # warm-up
            t0 = time.perf_counter()
            for _ in range(n):
                gray = decode_image(data)
            t1 = time.perf_counter()
            for _ in range(n):
                views = packed_views(gray, prep)
            t2 = time.perf_counter()
            decode_ms, prep_ms = (t1 - t0) / n * 1e3, (t2 - t1) / n * 1e3
            rows.append({"frame": name, "bytes": len(data), "views": int(views.shape[0]),
                         "decode_ms": round(decode_ms, 2), "preprocess_ms": round(prep_ms, 2),
                         "total_ms": round(decode_ms + prep_ms, 2)})
    finally:
        torch.set_num_threads(threads)
    return rows


def print_stages(stages: list[dict[str, Any]], frames: int) -> None:
    for stage in stages:
        per_row = (stage.get("out_bytes") or 0) / max(1, frames)
        print(f"    {stage['stage']:<52} busy {stage['busy_s']:>7} s  cpu {stage['cpu_s']:>7} s  "
              f"span {stage['span_s']:>7} s  tasks {stage['tasks']:>4}  out {per_row / 1e3:>8.1f} kB/frame")


def print_decode(rows: list[dict[str, float | str]]) -> None:
    header = f"{'frame (one core)':<32} {'MB':>6} {'views':>5} {'decode':>8} {'preprocess':>10} {'total':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['frame']:<32} {int(r['bytes']) / 1e6:>6.2f} {r['views']:>5} {r['decode_ms']:>8} "
              f"{r['preprocess_ms']:>10} {r['total_ms']:>8}   (ms per frame)")


STUB_CASES = ("1024x1024 16-bit TIFF", "480x480 8-bit PNG", "4096x4096 16-bit TIFF tiled 256")


def bench_stub(rate: float, frames: int, gpu_rate: float) -> list[dict[str, Any]]:
    """The pipeline (Ray Data read + decode, the model stage replaced by :class:`StandIn` at ``rate`` model views
    a second, writes and finalisation) on ``frames`` frames of each :data:`STUB_CASES` type; the steady frame
    rate per core of this machine, and the cores a GPU scoring ``gpu_rate`` views a second (a frame above the
    tile size is 1 + its tiles) would need to keep up."""
    from semclip_batch.io.decode import decode_image
    from semclip_batch.io.preprocess import frame_tiles
    from semclip_batch.methods.weights import preprocess_config as prep_of

    prep = prep_of("ViT-B-16-plus-240", tile_above=1024)
    import os

    rows: list[dict[str, Any]] = []
    cores = os.cpu_count() or 1
    for case in (c for c in DECODE_CASES if c[0] in STUB_CASES):
        name, h, w, fmt, bits, compression, tile = case
        n = max(40, frames * 1024 * 1024 // (h * w))
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "lot"
            folder.mkdir()
            data = frame_bytes(h, w, fmt, bits, compression, tile)
            height, width = decode_image(data).shape
            views = 1 + len(frame_tiles(height, width, prep))
            lines = ["uri,lot_id,wafer_id,die_x,die_y"]
            for k in range(n):
                (folder / f"f{k:05d}.{fmt}").write_bytes(data)
                lines.append(f"f{k:05d}.{fmt},STUB,W{k % 25:02d},{k % 7},{k // 7}")
            (folder / "manifest.csv").write_text("\n".join(lines) + "\n")
            spec = ModelSpec(backbone="ViT-B-16-plus-240", pretrained="none", self_similarity=DEFAULT_SELF_SIMILARITY)
            t0 = time.perf_counter()
            record = run(RunConfig(input=str(folder / "manifest.csv"), out=str(Path(tmp) / "out"), model=spec,
                                   batch_size=16, model_stub=rate)).record
            wall = time.perf_counter() - t0
        stand_in = next(s for s in record["stages"] if "StandIn" in s["stage"])
        steady = n / stand_in["span_s"]
        per_core = steady / cores
        rows.append({"frame": name, "frames": n, "views": views, "stub_views_s": rate,
                     "steady_img_s": round(steady, 1), "wall_img_s": round(n / wall, 1), "cores": cores,
                     "img_s_per_core": round(per_core, 1), "gpu_img_s": round(gpu_rate / views, 1),
                     "cores_per_gpu": round(gpu_rate / views / per_core, 1), "status": str(record["status"]),
                     "stages": record["stages"]})
    return rows


def print_stub(rows: list[dict[str, Any]]) -> None:
    header = (f"{'frame (stand-in model)':<32} {'frames':>6} {'views':>5} {'steady':>7} {'per core':>8} "
              f"{'GPU img/s':>9} {'cores / GPU':>11}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['frame']:<32} {r['frames']:>6} {r['views']:>5} {r['steady_img_s']:>7} {r['img_s_per_core']:>8} "
              f"{r['gpu_img_s']:>9} {r['cores_per_gpu']:>11}   (frames/s; stand-in at {r['stub_views_s']} views/s)")
        print_stages(r["stages"], int(r["frames"]))


DEFECT_VIEW_SIZES = ((256, 256), (600, 600), (1024, 1024))


def bench_defect_view(name: str, frames: int, batch_size: int, threads: int, precision: str) -> list[dict[str, Any]]:
    """The model stage alone (already-decoded batches), img/s with the defect view off and on, per frame size:
    frames under twice the model input take none, larger ones one more model view each."""
    torch.set_num_threads(threads)
    backbone = load_backbone(name, "none")
    text = text_embeddings(backbone, load_prompts())
    rows = []
    for size in DEFECT_VIEW_SIZES:
        with tempfile.TemporaryDirectory() as tmp:
            synth(tmp, SynthConfig(seed=98, lots=1, per_class=max(1, frames // 7), family="logic", sizes=(size,)))
            manifest = Path(tmp) / "manifest.csv"
            row: dict[str, Any] = {"backbone": name, "frame": f"{size[0]}x{size[1]}", "precision": precision}
            rates: dict[bool, float] = {}
            for on in (False, True):
                spec = ModelSpec(backbone=name, pretrained="none", precision=precision, defect_view=on,
                                 self_similarity=DEFAULT_SELF_SIMILARITY)
                prep = preprocess_config(name, tile_above=1024, defect_view=on)
                setup = PredictorSetup(spec=spec, prep=prep, text_embeddings=text,
                                       weights_sha256=backbone.sha256, batch_size=batch_size, threads=threads,
                                       use_gpu=False)
                predictor = Predictor(setup)
                batches = decoded_batches(manifest, prep, batch_size)
                predictor(batches[0])  # warm-up
                t0 = time.perf_counter()
                n = sum(len(predictor(b)) for b in batches)
                rates[on] = n / (time.perf_counter() - t0)
                row["on" if on else "off"] = round(rates[on], 2)
                row["frame_kb"] = round(sum(len(f) for b in batches for f in b["frame_pixels"]) / n / 1e3, 1)
            row["cost"] = round(rates[False] / rates[True], 2)
            rows.append(row)
            print(f"{name:<20} {row['frame']:>10} {row['off']:>8} {row['on']:>8} {row['cost']:>6}x "
                  f"{row['frame_kb']:>9} kB", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="semclip-tiny,ViT-B-16-plus-240")
    parser.add_argument("--images", type=int, default=0, help="images per backbone (default: 1400 tiny, 140 others)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--num-gpus", type=float, default=0.0,
                        help="GPUs for the model actor (and the model stage alone / plain loop on cuda)")
    parser.add_argument("--map-shifts", type=int, default=DEFAULT_MAP_SHIFTS, choices=MAP_SHIFTS,
                        help="views scored per view for the map, as run --map-shifts (its default); the backbone "
                             "rows only: --flops-only, --model-stub and --defect-view-cost score each view once")
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    parser.add_argument("--decode-only", action="store_true", help="only decode + preprocess per frame, one core")
    parser.add_argument("--model-stub", type=float, default=None, metavar="RATE",
                        help="only the pipeline around a stand-in model stage scoring RATE img/s")
    parser.add_argument("--stub-frames", type=int, default=400, help="1024x1024-equivalent frames per stub case")
    parser.add_argument("--gpu-rate", type=float, default=1050.0,
                        help="model views/s of one GPU on ViT-B-16-plus-240 (bf16), for the cores-per-GPU column")
    parser.add_argument("--flops-only", action="store_true", help="only the model FLOPs against the matmul peak")
    parser.add_argument("--defect-view-cost", action="store_true",
                        help="only the model stage's img/s with the defect view off and on, per frame size")
    args = parser.parse_args()
    if args.defect_view_cost:
        print(f"{'backbone':<20} {'frame':>10} {'off':>8} {'on':>8} {'cost':>7} {'shipped':>12}   (img/s, model stage)")
        cost = [r for name in args.backbones.split(",")
                for r in bench_defect_view(name, args.images or (70 if name == "semclip-tiny" else 14),
                                           args.batch_size, args.threads, args.precision)]
        if args.json:
            Path(args.json).write_text(json.dumps({"defect_view": cost}, indent=2))
        return
    if args.flops_only:
        flops = bench_flops("ViT-B-16-plus-240", 8)
        print_flops(flops)
        if args.json:
            Path(args.json).write_text(json.dumps({"flops": flops}, indent=2))
        return
    if args.model_stub is not None:
        stub = bench_stub(args.model_stub, args.stub_frames, args.gpu_rate)
        print_stub(stub)
        if args.json:
            Path(args.json).write_text(json.dumps({"stub": stub}, indent=2))
        return
    decode = bench_decode()
    print_decode(decode)
    if args.decode_only:
        if args.json:
            Path(args.json).write_text(json.dumps({"decode": decode}, indent=2))
        return
    rows = []
    for name in args.backbones.split(","):
        images = args.images or (1400 if name == "semclip-tiny" else 140)
        rows.append(bench_backbone(name, images, args.batch_size, args.threads, args.precision, args.num_gpus,
                                   args.map_shifts))
    device = torch.cuda.get_device_name() if args.num_gpus > 0 and torch.cuda.is_available() else "CPU"
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, {device}")
    print(f"map shifts: {args.map_shifts} views scored per model view (run --map-shifts)")
    header = (f"{'backbone':<20} {'images':>6} {'batch':>5} {'prec':>5} {'pipeline':>9} {'steady':>7} {'start-up':>8} "
              f"{'model stage':>11} {'plain loop':>10}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['backbone']:<20} {r['images']:>6} {r['batch_size']:>5} {r['precision']:>5} {r['pipeline_img_s']:>9} "
              f"{r['pipeline_steady_img_s']:>7} {r['startup_s']:>7}s {r['model_stage_img_s']:>11} "
              f"{r['plain_loop_img_s']:>10}   (img/s)")
        print_stages(r["stages"], int(r["images"]))
        print(f"    object store, all stages: {r['object_store_bytes_per_frame'] / 1e3:.1f} kB/frame")
    if args.json:
        Path(args.json).write_text(json.dumps({"decode": decode, "pipeline": rows}, indent=2))


if __name__ == "__main__":
    main()
