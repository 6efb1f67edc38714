"""Rebuild the weights shipped in the package (``--pretrained shipped``; see :mod:`semclip_batch.methods.shipped`):
synthesise the pretraining lots, run ``pretrain`` with its defaults, store the result as fp16 in
``semclip_batch/data/weights/`` and print the canonical sha256 to pin in ``methods/shipped.py``.

    .venv/bin/python jobs/ship_weights.py --work /tmp/ship
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from semclip_batch.config import ModelSpec
from semclip_batch.fewshot.heldout import heldout_table
from semclip_batch.fewshot.pretrain import PretrainConfig, pretrain
from semclip_batch.methods.shipped import shipped_path, shipped_weights, to_fp16_file
from semclip_batch.methods.weights import load_backbone
from semclip_batch.synth.generate import SynthConfig, synth


def build(work: Path, backbone: str = "semclip-tiny") -> str:
    """Synthesise the lots, pretrain with the defaults (every step, whatever this machine's speed: the time
    budget is off), store as fp16 in the package; returns the sha256 to pin."""
    spec = shipped_weights(backbone)
    lots = work / "lots"
    if not (lots / "manifest.csv").exists():
        synth(str(lots), SynthConfig(**spec.synth))  # type: ignore[arg-type]
    fp32 = work / "weights-fp32.safetensors"
    result = pretrain(PretrainConfig(manifest=str(lots / "manifest.csv"), out=str(fp32),
                                     model=ModelSpec(backbone=backbone), max_minutes=0.0))
    print("\n".join(heldout_table(result.before, result.after)))
    to_fp16_file(str(fp32), shipped_path(backbone), {"synth": json.dumps(spec.synth)})
    return load_backbone(backbone, shipped_path(backbone)).sha256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True)
    parser.add_argument("--backbone", default="semclip-tiny")
    args = parser.parse_args()
    print(f"pin this sha256 in semclip_batch/methods/shipped.py WEIGHTS: {build(Path(args.work), args.backbone)}")


if __name__ == "__main__":
    main()
