"""`train --shots K` against zero-shot and the whole support lot, run as a user runs them.

    .venv/bin/python benchmarks/shots.py --work /tmp/shots \
        --families contacts:4-10,contacts,metal --shots 1,5,all      # ~40 min here; lots and checkpoints cached

Per family (``--families``; ``NAME:LO-HI``: its defects drawn LO-HI px) and support lot (``--support-seeds``, 70
frames, 10 a class, written by ``synth`` unless already in ``--work``): ``semclip-batch train --shots K`` on the
shipped `semclip-tiny` weights, otherwise with its defaults, for each K of ``--shots`` (``all``: no ``--shots``,
the whole lot: the checkpoint ``benchmarks/support_scale.py`` calls its default, shared through ``--work``); each
checkpoint ``run --model`` on the test lots (``--test-seeds``) pooled into one manifest, then ``eval``; the shipped
weights zero-shot on the same pooled lots. Prints per support lot and K ``train``'s wall seconds, whether it adapted
the backbone, pAUROC, F1max, AUPRO, iAUROC, macro F1 and the share of test frames called ``normal``; writes
``--work/shots.json``. The README's table ("How many shots") is this script's run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support_scale import KEYS, cli, pooled, run_families, scored
from weight_choice import ensure_lot, lot_arguments


def fit(work: Path, family: str, seed: int, shots: int | None) -> tuple[Path, dict[str, Any]]:
    """The checkpoint of ``train --shots`` on the support lot (cached), its wall seconds and adaptation."""
    support = ensure_lot(work / family / f"support-{seed}", family, seed)
    folder = work / family / (f"ckpt-{seed}-default" if shots is None else f"ckpt-{seed}-shots{shots}")
    record = folder / "shots.json"
    if not record.exists():
        seconds = cli("train", str(support / "manifest.csv"), "--out", str(folder), "--backbone", "semclip-tiny",
                      "--pretrained", "shipped", *([] if shots is None else ["--shots", str(shots)]))
        meta = json.loads((folder / "checkpoint.json").read_text())
        training = meta["training"]
        record.write_text(json.dumps({"seconds": round(seconds, 1), "classes": meta["classes"],
                                      "frames": training["used"], "adapted": "adapted_backbone" in training}))
    return folder, json.loads(record.read_text())


def family_rows(work: Path, family: str, supports: list[int], tests: list[int],
                counts: list[int | None]) -> dict[str, Any]:
    truth = pooled(work, family, tests)
    rows: dict[str, Any] = {}
    classes: list[str] = []
    for seed in supports:
        for shots in counts:
            name = "all" if shots is None else str(shots)
            folder, info = fit(work, family, seed, shots)
            classes = info["classes"]
            figures = scored(work / family / f"out-{seed}-shots-{name}", truth, classes, "--model", str(folder))
            rows[f"{seed}/{name}"] = {**info, **figures}
            print(f"  support {seed}, shots {name}: pAUROC {figures['pAUROC']:.3f}", flush=True)
    zero_shot = scored(work / family / "out-zero-shot", truth, classes, "--backbone", "semclip-tiny",
                       "--pretrained", "shipped")
    return {"fits": rows, "zero_shot": zero_shot}


def print_family(family: str, result: dict[str, Any]) -> None:
    print(f"\n[{family}] zero-shot: " + ", ".join(f"{k} {result['zero_shot'][k]:.3f}" for k in KEYS))
    print(f"  {'support/shots':<14}{'frames':>7}{'adapted':>8}{'s':>6}" + "".join(f"{k:>10}" for k in KEYS)
          + f"{'normal':>8}")
    for key, row in result["fits"].items():
        print(f"  {key:<14}{row['frames']:>7}{'yes' if row['adapted'] else 'no':>8}{row['seconds']:>6.0f}"
              + "".join(f"{row[k]:>10.3f}" for k in KEYS) + f"{row['called_normal']:>8.2f}")


def shot_counts(text: str) -> list[int | None]:
    """``--shots``: comma-separated counts a class, ``all`` for the whole lot."""
    return [None if part == "all" else int(part) for part in text.split(",") if part]


def main() -> None:
    parser = lot_arguments(argparse.ArgumentParser(description=__doc__,
                                                   formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.set_defaults(families="contacts:4-10,contacts,metal")
    parser.add_argument("--shots", default="1,5,all", help="frames a class: counts, 'all' for the whole lot")
    args = parser.parse_args()
    counts = shot_counts(args.shots)
    run_families(args, lambda work, family, supports, tests: family_rows(work, family, supports, tests, counts),
                 print_family, "shots.json")


if __name__ == "__main__":
    main()
