"""`train`'s default (its maps' policy checked on the support frames its fit held out) against
`train --scale-policy whole`, run as a user runs them.

    .venv/bin/python benchmarks/support_scale.py --work /tmp/support-scale \
        --families contacts:4-10,metal,logic                # ~27 min here; lots and checkpoints cached in --work

Per family (``--families``; ``NAME:LO-HI``: its defects drawn LO-HI px) and support lot (``--support-seeds``, 70
frames each, written by ``synth`` unless already in ``--work``): ``semclip-batch train`` on the shipped
`semclip-tiny` weights with ``--scale-policy whole``, then again with its defaults (the fit at whole, the maps at the
policy its check chose); each checkpoint ``run --model`` on the test lots (``--test-seeds``) pooled into one
manifest, then ``eval``; the shipped weights zero-shot on the same pooled lots. Where the check keeps ``whole``
the two checkpoints are the same fit and the second is not scored. Prints per support lot the policy the check
chose, ``train``'s wall seconds, pAUROC, F1max, AUPRO, iAUROC, macro F1, and the share of test frames whose class
scores say ``normal``; writes ``--work/support_scale.json``.
The README's tables of rules 15 and 14 were run by hand with the same commands; its table of the ``auto`` before
them ("The `auto` before it", under "The maps' scale checked on the held-out support frames") is this script's
run with the code of its time, when its arms were the default (whole) and ``--scale-policy auto``.
Checkpoints are cached in ``--work`` by family and seed alone: use a fresh folder for a new code.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from weight_choice import ensure_lot, lot_arguments

from semclip_batch.io.manifest import read_manifest

KEYS = ("pAUROC", "F1max", "AUPRO", "iAUROC", "macro_F1")
URI_COLUMNS = (("uri", "url"), ("mask_uri", "mask_url"), ("reference_uri", "reference_url"))


def cli(*args: str) -> float:
    """``semclip-batch ARGS`` (this interpreter's), output to the caller's stderr only on failure; its wall seconds."""
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", "from semclip_batch.cli import main; main()", *args], env=env,
                          capture_output=True, text=True, check=False)
    if done.returncode:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"semclip-batch {args[0]} failed (exit {done.returncode})")
    return time.perf_counter() - started


def pooled(work: Path, family: str, seeds: list[int]) -> Path:
    """The test lots of ``family`` in one manifest, their paths made absolute (``work/family/pooled``)."""
    folder = work / family / f"pooled-{'-'.join(map(str, seeds))}"
    if not (folder / "manifest.csv").exists():
        parts = []
        for seed in seeds:
            manifest = (ensure_lot(work / family / f"test-{seed}", family, seed) / "manifest.csv").resolve()
            df = pd.read_csv(manifest, dtype=str, keep_default_na=False)
            resolved = read_manifest(str(manifest))  # the paths as run reads them
            for uri, url in URI_COLUMNS:
                if uri in df:
                    df[uri] = resolved[url].to_numpy()
            parts.append(df)
        folder.mkdir(parents=True, exist_ok=True)
        pd.concat(parts).to_csv(folder / "manifest.csv", index=False)
    return folder / "manifest.csv"


def scored(out: Path, truth: Path, classes: list[str], *model: str) -> dict[str, Any]:
    """``run`` (``model``: ``--model CK`` or zero-shot options) on ``truth``'s rows into ``out``, then ``eval``;
    the figures and the share of frames whose class scores' arg-max is ``normal``."""
    cli("run", str(truth), "--out", str(out), "--overwrite", *model)
    cli("eval", str(out), "--truth", str(truth))
    metrics = json.loads((out / "metrics.json").read_text())
    scores = pd.read_parquet(out / "predictions", columns=["class_scores", "status"])
    ok = scores[scores["status"] == "ok"]["class_scores"]
    normal = float(np.mean([int(np.argmax(s)) == classes.index("normal") for s in ok])) if len(ok) else float("nan")
    return {**{k: metrics.get(k) for k in KEYS}, "called_normal": normal}


def fit(work: Path, family: str, seed: int, checked: bool) -> tuple[Path, dict[str, Any]]:
    """The checkpoint of ``train`` (``checked``: its defaults, else ``--scale-policy whole``) on the support lot
    (cached), and its policy, check and wall seconds."""
    support = ensure_lot(work / family / f"support-{seed}", family, seed)
    folder = work / family / f"ckpt-{seed}-{'checked' if checked else 'whole'}"
    record = folder / "bench.json"
    if not record.exists():
        seconds = cli("train", str(support / "manifest.csv"), "--out", str(folder), "--backbone", "semclip-tiny",
                      "--pretrained", "shipped", *([] if checked else ["--scale-policy", "whole"]))
        meta = json.loads((folder / "checkpoint.json").read_text())
        check = meta["training"].get("scale_check", {})
        record.write_text(json.dumps({"seconds": round(seconds, 1), "classes": meta["classes"],
                                      "chosen": check.get("chosen") or "whole", "policy": meta["scale_policy"],
                                      "check": check.get("figures")}))
    return folder, json.loads(record.read_text())


def family_rows(work: Path, family: str, supports: list[int], tests: list[int]) -> dict[str, Any]:
    truth = pooled(work, family, tests)
    rows: dict[str, Any] = {}
    for seed in supports:
        whole, w_info = fit(work, family, seed, checked=False)
        default, d_info = fit(work, family, seed, checked=True)
        row = {"chosen": d_info["chosen"], "seconds": {"whole": w_info["seconds"], "default": d_info["seconds"]},
               "whole": scored(work / family / f"out-{seed}-whole", truth, w_info["classes"], "--model", str(whole))}
        row["default"] = row["whole"] if d_info.get("policy") is None else scored(
            work / family / f"out-{seed}-checked", truth, d_info["classes"], "--model", str(default))
        rows[str(seed)] = row
        print(f"  support {seed}: check chose {row['chosen']}", flush=True)
    classes = d_info["classes"]
    zero_shot = scored(work / family / "out-zero-shot", truth, classes, "--backbone", "semclip-tiny",
                       "--pretrained", "shipped")
    return {"supports": rows, "zero_shot": zero_shot}


def print_family(family: str, result: dict[str, Any]) -> None:
    print(f"\n[{family}] zero-shot: " + ", ".join(f"{k} {result['zero_shot'][k]:.3f}" for k in KEYS))
    print(f"  {'support':<8}{'chose':<8}{'what':<8}{'s':>6}" + "".join(f"{k:>10}" for k in KEYS) + f"{'normal':>8}")
    for seed, row in result["supports"].items():
        for what in ("whole", "default"):
            m = row[what]
            print(f"  {seed:<8}{row['chosen']:<8}{what:<8}{row['seconds'][what]:>6.0f}"
                  + "".join(f"{m[k]:>10.3f}" for k in KEYS) + f"{m['called_normal']:>8.2f}")


FamilyRows = Callable[[Path, str, list[int], list[int]], dict[str, Any]]


def run_families(args: argparse.Namespace, rows: FamilyRows, show: Callable[[str, dict[str, Any]], None],
                 name: str) -> None:
    """Each family of ``args`` through ``rows(work, family, supports, tests)``, the results written to
    ``--work/NAME`` as they come, then shown per family; the total minutes."""
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    supports = [int(s) for s in args.support_seeds.split(",")]
    tests = [int(s) for s in args.test_seeds.split(",")]
    results = {}
    for family in (f for f in args.families.split(",") if f):
        print(f"[{family}]", flush=True)
        results[family] = rows(work, family, supports, tests)
        (work / name).write_text(json.dumps(results, indent=1))
    for family, result in results.items():
        show(family, result)
    print(f"\ntotal {(time.perf_counter() - started) / 60:.1f} min")


def main() -> None:
    parser = lot_arguments(argparse.ArgumentParser(description=__doc__,
                                                   formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.set_defaults(families="contacts:4-10,metal,logic")
    run_families(parser.parse_args(), family_rows, print_family, "support_scale.json")


if __name__ == "__main__":
    main()
