r"""What each scale policy costs `run` per 1024x1024 frame, stage by stage, without Ray: the decode stage's work on
one CPU core and the model actor's on its device (a GPU where there is one).

    .venv/bin/python benchmarks/model_stage.py --frames 14 --policies whole,native           # CPU here
    python3 benchmarks/model_stage.py --frames 70 --device cuda --batch-size 64              # a GPU machine

``run``'s own figure (img/s in the run record) is what a user sees; on a 2-core CPU the model stage bounds it
(README "Small defects at any frame size"). Where Ray is not installed (the GPU machine lent here) the stages can
still be timed apart: a pipeline runs at the pace of its slowest stage, the model actor (one per GPU) or the decode
tasks (about one per core, each :data:`~semclip_batch.pipeline.driver.DECODE_CPUS` of a CPU), so both stages'
seconds per frame bound what a policy costs there. Frames: a ``synth`` ``logic`` lot drawn at 1024x1024 (seed
9100, uncompressed TIFF and PNG as ``synth`` writes them), zero-shot ``semclip-tiny`` with the shipped weights and
``run``'s zero-shot defaults (self-similarity and the defect view on). The decode stage is
:func:`~semclip_batch.pipeline.reader.decode_batch` (file read and decode, stretch, views, packing) on the whole lot
after a warm-up on its first frames; the model stage is :class:`~semclip_batch.pipeline.inference.Predictor` called as
Ray calls it (``--batch-size`` frames a call, split into forward passes of ``--batch-size`` views), on the whole lot
after one warm-up call, with the device synchronised. Prints one line per policy and a JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from semclip_batch.config import parse_scale_policy, scale_policy_name, zero_shot_spec
from semclip_batch.io.manifest import read_manifest_table
from semclip_batch.io.schema import INPUT, numpy_batch
from semclip_batch.methods.prompts import load_prompts, text_embeddings
from semclip_batch.methods.weights import load_backbone, preprocess_config
from semclip_batch.pipeline.inference import Predictor, PredictorSetup
from semclip_batch.pipeline.reader import decode_batch
from semclip_batch.synth.generate import SynthConfig, synth

BACKBONE = "semclip-tiny"


def lot(work: Path, frames: int) -> Path:
    """A ``logic`` lot of 1024x1024 frames (about ``frames`` of them: whole per-class draws of 7 classes)."""
    folder = work / f"logic-1024-{frames}"
    if not (folder / "manifest.csv").exists():
        synth(str(folder), SynthConfig(seed=9100, lots=1, wafers=1, dies=1, per_class=max(1, frames // 7),
                                       family="logic", sizes=((1024, 1024),)))
    return folder


def input_rows(folder: Path) -> dict[str, np.ndarray]:
    """The lot's manifest as the decode stage's input rows (:data:`~semclip_batch.io.schema.INPUT`), read and
    validated as ``run`` reads it, all in one shard (``plan_shards`` would import Zarr, which a GPU machine without
    Ray may lack too)."""
    table = read_manifest_table(str(folder / "manifest.csv")).select([c for c in INPUT.names if c != "shard"])
    return numpy_batch(table.append_column("shard", pa.array(["s00000"] * table.num_rows, pa.string())).cast(INPUT))


def check_ok(rows: dict[str, np.ndarray], stage: str) -> None:
    """Refuse timings of a stage that failed on any row (a failing batch becomes fast error rows)."""
    bad = [str(e) for s, e in zip(rows["status"], rows["error"], strict=True) if s != "ok"]
    if bad:
        sys.exit(f"{stage} stage failed on {len(bad)} rows: {bad[0]}")


def synchronize(device: str) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()


def measure(policy: float | None, rows: dict[str, np.ndarray], device: str, batch_size: int,
            threads: int) -> dict[str, Any]:
    """Seconds per frame of the decode stage (one core) and the model stage under ``policy``."""
    prep = preprocess_config(BACKBONE, tile_above=1024, scale_policy=policy, defect_view=True)
    spec = zero_shot_spec(BACKBONE, "shipped", scale_policy=policy)
    backbone = load_backbone(BACKBONE, "shipped")
    setup = PredictorSetup(spec=spec, prep=prep, text_embeddings=text_embeddings(backbone, load_prompts(None)),
                           weights_sha256=backbone.sha256, batch_size=batch_size, threads=threads,
                           use_gpu=device == "cuda")
    n = len(rows["image_id"])
    torch.set_num_threads(1)  # a decode task is one core
    decode_batch({k: v[:4] for k, v in rows.items()}, prep=prep)  # warm-up: lazy imports, first reads
    t0 = time.perf_counter()
    decoded = numpy_batch(decode_batch(rows, prep=prep))
    decode_s = time.perf_counter() - t0
    check_ok(decoded, "decode")
    predictor = Predictor(setup)
    per_call = batch_size  # frames per call, as run's map_batches(batch_size=--batch-size) hands them
    check_ok(numpy_batch(predictor({k: v[:per_call] for k, v in decoded.items()})), "model")  # warm-up
    synchronize(device)
    t0 = time.perf_counter()
    outs = [predictor({k: v[start:start + per_call] for k, v in decoded.items()}) for start in range(0, n, per_call)]
    synchronize(device)
    model_s = time.perf_counter() - t0
    check_ok(numpy_batch(pa.concat_tables(outs)), "model")
    views = int(decoded["n_views"].sum())
    return {"policy": scale_policy_name(policy), "frames": n, "views_per_frame": views / n,
            "decode_s_per_frame": decode_s / n, "model_s_per_frame": model_s / n, "device": device}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/model-stage")
    ap.add_argument("--frames", type=int, default=56)
    ap.add_argument("--policies", default="whole,0.5,0.75,native")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--batch-size", type=int, default=16,
                    help="frames per model-stage call and views per forward pass (run --batch-size)")
    ap.add_argument("--threads", type=int, default=2, help="the model actor's CPU threads")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no GPU visible to torch")
    rows = input_rows(lot(Path(args.work), args.frames))
    results = []
    for name in args.policies.split(","):
        r = measure(parse_scale_policy(name), rows, args.device, args.batch_size, args.threads)
        results.append(r)
        base = results[0]
        print(f"{r['policy']:>6}: {r['views_per_frame']:.0f} views/frame; decode {r['decode_s_per_frame'] * 1e3:.1f} ms "
              f"(x{r['decode_s_per_frame'] / base['decode_s_per_frame']:.2f}), model {r['model_s_per_frame'] * 1e3:.1f} ms "
              f"(x{r['model_s_per_frame'] / base['model_s_per_frame']:.2f}) per frame on {args.device}", flush=True)
    if args.device == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(0)}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
