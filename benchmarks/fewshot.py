"""Few-shot quality and cost: zero-shot vs 10-shot SEM-CLIP on a pretrained and a random semclip-tiny.

    .venv/bin/python benchmarks/fewshot.py --work /tmp/fewshot               # pretrain is cached in --work
    .venv/bin/python benchmarks/fewshot.py --work /tmp/fewshot --steps 600 --seeds 0,1,2

Three synthetic sets from apart seeds: pretraining lots (seed 1000), the support set (seed 2000, 10 per class
= 70 images) and the test lot (seed 5000). Nothing is tuned on the test lot. Prints one table (metrics per
configuration, mean over support seeds, and the time `train` took) and writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from semclip_batch.config import ModelSpec, RunConfig
from semclip_batch.evaluate import evaluate
from semclip_batch.pipeline import run
from semclip_batch.pretrain import PretrainConfig, pretrain
from semclip_batch.synth import SynthConfig, synth
from semclip_batch.train import TrainConfig, train

SIZES = ((256, 256), (240, 320), (300, 200), (512, 512))
KEYS = ("iAUROC", "pAUROC", "F1max", "AUPRO", "accuracy", "macro_F1")


def score(work: Path, name: str, spec: ModelSpec) -> dict[str, float]:
    out = work / "runs" / name
    run(RunConfig(input=str(work / "test" / "manifest.csv"), out=str(out), model=spec, overwrite=True))
    m = evaluate(str(out), str(work / "test" / "manifest.csv"))
    return {k: m[k] for k in KEYS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True)
    parser.add_argument("--pretrain-lots", type=int, default=60, help="70 images per lot")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    work = Path(args.work)
    weights = work / "pretrained.safetensors"
    if not weights.exists():
        synth(str(work / "pretrain"), SynthConfig(seed=1000, lots=args.pretrain_lots, per_class=10, sizes=SIZES))
        t0 = time.perf_counter()
        pretrain(PretrainConfig(manifest=str(work / "pretrain" / "manifest.csv"), out=str(weights),
                                backbone="semclip-tiny", steps=args.steps, lr=args.lr))
        print(f"pretrain: {time.perf_counter() - t0:.0f} s")
    for folder, seed, lots in (("support", 2000, 1), ("test", 5000, 1)):
        if not (work / folder / "manifest.csv").exists():
            synth(str(work / folder), SynthConfig(seed=seed, lots=lots, per_class=10, sizes=SIZES))
    rows = [{"config": "zero-shot, pretrained", "train_s": None,
             **score(work, "zs-pre", ModelSpec(backbone="semclip-tiny", pretrained=str(weights)))},
            {"config": "zero-shot, random", "train_s": None,
             **score(work, "zs-rand", ModelSpec(backbone="semclip-tiny", pretrained="none"))}]
    for label, source in (("10-shot, pretrained", str(weights)), ("10-shot, random", "none")):
        per_seed = []
        for seed in (int(s) for s in args.seeds.split(",")):
            ckpt = work / "ckpt" / f"{label.split(',')[1].strip()}-{seed}"
            t0 = time.perf_counter()
            train(TrainConfig(support=str(work / "support" / "manifest.csv"), out=str(ckpt), backbone="semclip-tiny",
                              pretrained=source, shots=10, seed=seed))
            took = time.perf_counter() - t0
            per_seed.append({"train_s": took, **score(work, ckpt.name, ModelSpec(backbone=None, pretrained=None,
                                                                                  checkpoint=str(ckpt)))})
        rows.append({"config": f"{label} (mean of {len(per_seed)} seeds)",
                     **{k: float(np.mean([r[k] for r in per_seed])) for k in ("train_s", *KEYS)}})
    print(f"{'configuration':<36}" + "".join(f"{k:>10}" for k in (*KEYS, "train_s")))
    for r in rows:
        cells = "".join(f"{r[k]:>10.3f}" if r[k] is not None else f"{'-':>10}" for k in (*KEYS, "train_s"))
        print(f"{r['config']:<36}{cells}")
    (work / "fewshot.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
