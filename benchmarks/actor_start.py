"""A model actor's start: a fresh Python process from nothing to the scoring model built, the whole open_clip model
against the vision tower alone (``model/vit.py``, what ``run``'s actors build), on this machine's threads:

    .venv/bin/python benchmarks/actor_start.py               # ~30 s here

Each start is its own interpreter (imports are cached per process, so only a fresh one shows their cost), timed from
the parent; the child reports its peak resident memory and whether it imported open_clip or torchvision. Median of
``--repeats`` starts per way, the two ways taken in turns.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import textwrap
import time
from typing import Any

CHILD = textwrap.dedent("""
    import json, resource, sys
    import numpy as np
    from semclip_batch.config import ModelSpec
    from semclip_batch.methods.weights import load_backbone
    from semclip_batch.pipeline.inference import build_model  # through the actors' own module: its imports count
    spec = ModelSpec(backbone={backbone!r}, pretrained={pretrained!r})
    backbone = load_backbone(spec.backbone, spec.pretrained, vision_only={alone!r}, expected_sha256={sha!r})
    scoring = build_model(spec, np.zeros((7, {embed}), np.float32), backbone=backbone)
    print(json.dumps({{"tower": type(backbone.clip).__name__,
                      "imported": sorted({{m.split(".")[0] for m in sys.modules}} & {{"open_clip", "torchvision", "timm"}}),
                      "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
""")


def start_once(backbone: str, pretrained: str, alone: bool, sha: str | None, embed: int) -> tuple[float, dict[str, Any]]:
    """Seconds from spawning a fresh interpreter to its model built, and what the child reported."""
    code = CHILD.format(backbone=backbone, pretrained=pretrained, alone=alone, sha=sha, embed=embed)
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=600)
    seconds = time.perf_counter() - started
    return seconds, json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="semclip-tiny")
    parser.add_argument("--pretrained", default="shipped", help="a weights file or URL, or shipped")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from semclip_batch.methods.weights import load_backbone
    from semclip_batch.model.towers import vision_tower

    whole = load_backbone(args.backbone, args.pretrained)  # the checksum run's driver ships to its actors
    embed = int(vision_tower(whole.clip).proj.shape[1])
    times: dict[str, list[float]] = {"whole": [], "tower": []}
    reports: dict[str, dict[str, Any]] = {}
    for _ in range(args.repeats):
        for way in times:
            seconds, reports[way] = start_once(args.backbone, args.pretrained, way == "tower", whole.sha256, embed)
            times[way].append(seconds)
    print(f"{args.backbone} ({args.pretrained}), median of {args.repeats} fresh starts:")
    for way, label in (("whole", "whole open_clip model"), ("tower", "vision tower alone")):
        report = reports[way]
        print(f"  {label}: {statistics.median(times[way]):.2f} s, peak {report['peak_mib']:.0f} MiB, "
              f"built {report['tower']}, of open_clip / torchvision / timm imported: {', '.join(report['imported']) or 'none'}")


if __name__ == "__main__":
    main()
