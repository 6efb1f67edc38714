"""``train --adapt-steps``: the backbone adapted on the support lot before the fit, against the frozen backbone,
per family, over several support and test lots.

    .venv/bin/python benchmarks/adapt.py --work /tmp/adapt      # ~23 min here; lots cached in --work

Per family (``--families``; the first is the validation family, the others held out) and support lot
(``--support-seeds``, 70 frames each), for every step count of ``--steps`` (0: the frozen shipped `semclip-tiny`):
the backbone adapted with ``train``'s own code (:func:`semclip_batch.fewshot.adapt.adapt_backbone`, ``--lr``), then
zero-shot (its text scores, no fit) and the 10-shot `transfer` fit of ``train`` (``--methods``: baselines too;
``--shots K``: on the K frames a class ``train --shots K`` samples from each support lot)
scored on every test lot (``--test-seeds``, 70 frames each; whole views, as ``benchmarks/quality.py``). Figures
as ``eval`` computes them. The shipped backbone's zero-shot is the baseline every gain is read against.

On the validation family the step count is chosen by the rule written before the first run (:func:`choose_steps`)
and printed; the held-out families are reported, never chosen on. Everything goes to ``--work/adapt.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import TRANSFER, Lot, defect_view_probs, load_lot, metrics, score_test, subset
from weight_choice import ensure_lot, lot_arguments

from semclip_batch.config import DEFAULT_ADAPT_BELOW, DEFAULT_ADAPT_LR, DEFAULT_SELF_SIMILARITY, ModelSpec
from semclip_batch.fewshot.adapt import adapt_backbone, adaptation_rows, zero_shot_accuracy
from semclip_batch.fewshot.recipes import copies
from semclip_batch.fewshot.train import TrainConfig, fit, sample_shots
from semclip_batch.fewshot.trainset import load_trainset
from semclip_batch.io.manifest import read_manifest
from semclip_batch.methods.prompts import load_prompts, text_embeddings
from semclip_batch.methods.registry import new_model, score_features
from semclip_batch.methods.weights import LoadedBackbone, load_backbone, preprocess_config

BACKBONE = "semclip-tiny"
KEYS = ("pAUROC", "F1max", "macro_F1", "iAUROC", "accuracy")
SHOTS = 10
# the rule, fixed before the first run: a step count may cost at most this much pixel AUROC on any support lot,
# against the frozen fit and against the shipped zero-shot; the default moves only for this much macro F1 on each
WITHIN_PAUROC = 0.01
MIN_MACRO_F1_GAIN = 0.05


def mean_figures(per_lot: dict[int, dict[str, float | None]]) -> dict[str, float]:
    """Each key's mean over the test lots (NaN where a lot has none), with the worst lot's pAUROC."""
    out = {k: float(np.nanmean([np.nan if r[k] is None else r[k] for r in per_lot.values()])) for k in KEYS}
    out["worst_pAUROC"] = float(np.nanmin([np.nan if r["pAUROC"] is None else r["pAUROC"] for r in per_lot.values()]))
    return out


def load_tests(work: Path, family: str, seeds: list[int], backbone: LoadedBackbone) -> dict[int, Lot]:
    classes = load_prompts().classes
    return {s: load_lot(ensure_lot(work / family / f"test-{s}", family, s), backbone, classes, f"test {s}",
                        augmented=False) for s in seeds}


@torch.no_grad()
def zero_shot(backbone: LoadedBackbone, tests: dict[int, Lot]) -> dict[int, dict[str, float | None]]:
    """The backbone's text scores on every test lot, as ``run`` without a checkpoint."""
    text = torch.from_numpy(text_embeddings(backbone, load_prompts()))
    model = new_model(ModelSpec(backbone=BACKBONE, pretrained=backbone.source, self_similarity=DEFAULT_SELF_SIMILARITY),
                      backbone.clip, text)
    out = {}
    for s, lot in tests.items():
        scored = score_features(model, lot.feats, (lot.data.views.shape[-2], lot.data.views.shape[-1]))
        out[s] = metrics(scored, lot, defect_view_probs(model, backbone, scored, lot))
    return out


def few_shot(backbone: LoadedBackbone, support: Lot, tests: dict[int, Lot], method: str,
             steps: int, shots: int = SHOTS) -> dict[int, dict[str, float | None]]:
    """``train``'s ``shots``-shot fit of ``method`` on the support lot (augmented where ``train`` augments: one copy for a
    baseline), scored on every test lot (``steps``: the adaptation's, which the fit is told of as ``train`` tells
    it)."""
    text = torch.from_numpy(text_embeddings(backbone, load_prompts()))
    cfg = TrainConfig(support="", out="", shots=shots, recipe=TRANSFER,
                      model=ModelSpec(backbone=BACKBONE, pretrained=backbone.source, cls="fused", method=method))
    data, feats, ref_feats = support.data, support.feats, support.ref_feats
    rows = len(support.df) * copies(TRANSFER, method)  # the copies train gives it: one for a baseline
    if rows != len(data):
        data, feats, ref_feats = subset(support, torch.arange(rows))  # copy-major, as augment()
    fitted = fit(cfg, backbone, text, data, feats, ref_feats, adapted=steps > 0)
    out = {}
    for s, lot in tests.items():
        scored = score_test(fitted, backbone, lot)
        out[s] = metrics(scored, lot, defect_view_probs(fitted.model, backbone, scored, lot), fitted.thresholds["image"])
    return out


def fewer_shots(folder: Path, shots: int) -> Path:
    """A sibling of the support lot ``folder`` holding the ``shots`` frames a class ``train --shots`` samples from it
    (seed 0): its manifest rows, the frames linked."""
    if shots == SHOTS:
        return folder
    out = folder.with_name(f"{folder.name}-{shots}shot")
    if not (out / "manifest.csv").exists():
        out.mkdir(exist_ok=True)
        for sub in ("images", "masks", "reference"):
            if (folder / sub).exists() and not (out / sub).exists():
                (out / sub).symlink_to((folder / sub).resolve())
        kept = set(sample_shots(read_manifest(str(folder / "manifest.csv")), shots, 0)["uri"])
        raw = pd.read_csv(folder / "manifest.csv")
        raw[raw["uri"].isin(kept)].to_csv(out / "manifest.csv", index=False)
    return out


def support_rows(work: Path, family: str, seeds: list[int], test_seeds: list[int], steps: list[int], lr: float,
                 methods: list[str], shipped: LoadedBackbone, shipped_tests: dict[int, Lot],
                 shots: int = SHOTS) -> dict[str, Any]:
    """Per support lot and step count: the adaptation's record, zero-shot and each method's ``shots``-shot figures."""
    result: dict[str, Any] = {}
    classes = load_prompts().classes
    for seed in seeds:
        folder = fewer_shots(ensure_lot(work / family / f"support-{seed}", family, seed), shots)
        manifest = read_manifest(str(folder / "manifest.csv"))
        if len(sample_shots(manifest, shots, 0)) != len(manifest):
            raise SystemExit(f"{folder}: the support lot must hold {shots} frames a class at most (train --shots {shots})")
        prep = preprocess_config(BACKBONE, tile_above=10**9)
        check = zero_shot_accuracy(shipped, load_prompts(), load_trainset(manifest, classes, prep), prep)
        print(f"  support {seed}: the shipped weights classify {check:.3f} of its frames right zero-shot (train adapts "
              f"below {DEFAULT_ADAPT_BELOW})", flush=True)
        result[str(seed)] = {"zero_shot_support_accuracy": check, "steps": {}}
        for n in steps:
            t0 = time.perf_counter()
            record: dict[str, Any] = {}
            backbone, tests = shipped, shipped_tests
            if n:
                # as train: not on the frames the fit holds out (one whole view a frame: load_lot's frame numbers)
                rows, held = adaptation_rows(manifest, torch.arange(len(manifest)), 0)
                with tempfile.TemporaryDirectory() as ckpt:  # the checkpoint folder the weights go into
                    adapted = adapt_backbone(ModelSpec(backbone=BACKBONE, pretrained="shipped"),
                                             str(folder / "manifest.csv"), rows, ckpt, n, lr, held_out=held)
                    backbone = load_backbone(BACKBONE, adapted.url, expected_sha256=adapted.sha256)
                record = adapted.record
                tests = load_tests(work, family, test_seeds, backbone)
            support = load_lot(folder, backbone, classes, f"support {seed} x4", augmented=True)
            row: dict[str, Any] = {"adapted": record, "zero_shot": zero_shot(backbone, tests)}
            for method in methods:
                row[method] = few_shot(backbone, support, tests, method, n, shots)
            row["seconds"] = round(time.perf_counter() - t0, 1)
            result[str(seed)]["steps"][str(n)] = row
            print(f"  support {seed}, {n} steps: " + ", ".join(
                f"{k} pAUROC {mean_figures(row[k])['pAUROC']:.3f} macro F1 {mean_figures(row[k])['macro_F1']:.3f}"
                for k in ("zero_shot", *methods)) + f" ({row['seconds']:.0f} s)", flush=True)
    return result


def choose_steps(result: dict[str, Any], baseline: dict[str, float]) -> dict[str, Any]:
    """The rule fixed before the first run, on the validation family's `semclip` 10-shot figures (means over the
    test lots, per support lot): a step count is eligible where on every support lot its pAUROC is within
    :data:`WITHIN_PAUROC` of the frozen fit's (0 steps) and of the shipped zero-shot's (``baseline``); the chosen
    one has the best macro F1 averaged over the support lots (ties: fewer steps). It becomes the default only
    where it is not 0 and beats 0's macro F1 by :data:`MIN_MACRO_F1_GAIN` on every support lot."""
    supports = [s["steps"] for s in result.values()]
    steps = sorted({int(n) for s in supports for n in s})
    mean = {n: [mean_figures(s[str(n)]["semclip"]) for s in supports] for n in steps}
    eligible = [n for n in steps if all(m["pAUROC"] >= max(f["pAUROC"], baseline["pAUROC"]) - WITHIN_PAUROC
                                        for m, f in zip(mean[n], mean[0], strict=True))]
    chosen = max(eligible, key=lambda n: (np.mean([m["macro_F1"] for m in mean[n]]), -n))
    gains = [m["macro_F1"] - f["macro_F1"] for m, f in zip(mean[chosen], mean[0], strict=True)]
    return {"eligible": eligible, "chosen": chosen, "macro_F1_gain_per_support_lot": gains,
            "default": chosen if chosen and min(gains) >= MIN_MACRO_F1_GAIN else 0}


def print_family(family: str, result: dict[str, Any], methods: list[str]) -> None:
    zs = mean_figures(result["shipped_zero_shot"])
    print(f"\n{family}: shipped zero-shot " + " ".join(f"{k} {zs[k]:.3f}" for k in KEYS))
    print(f"  {'support':<8}{'steps':>6} {'scored':<11}" + "".join(f"{k:>10}" for k in (*KEYS, "worst_pAUROC"))
          + f"{'vs zs pAUROC':>14}{'macro F1':>10}{'s':>6}")
    for seed, support in result["supports"].items():
        print(f"  support {seed}: zero-shot support accuracy {support['zero_shot_support_accuracy']:.3f}")
        for n, row in support["steps"].items():
            for what in ("zero_shot", *methods):
                m = mean_figures(row[what])
                print(f"  {seed:<8}{n:>6} {what:<11}" + "".join(f"{m[k]:>10.3f}" for k in (*KEYS, "worst_pAUROC"))
                      + f"{m['pAUROC'] - zs['pAUROC']:>+14.3f}{m['macro_F1'] - zs['macro_F1']:>+10.3f}"
                      + f"{row['adapted'].get('seconds', 0):>6.0f}")


def main() -> None:
    parser = lot_arguments(argparse.ArgumentParser(description=__doc__,
                                                   formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("--steps", default="0,200,400", help="adaptation steps; 0: the frozen shipped backbone")
    parser.add_argument("--lr", type=float, default=DEFAULT_ADAPT_LR)
    parser.add_argument("--methods", default="semclip", help="semclip first; winclip, promptad: the baselines")
    parser.add_argument("--shots", type=int, default=SHOTS, help="frames a class of each support lot (train --shots)")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    steps = sorted({int(s) for s in args.steps.split(",")} | {0})  # the frozen fit is what the rule compares with
    methods = [m for m in args.methods.split(",") if m]
    families = [f for f in args.families.split(",") if f]
    test_seeds = [int(s) for s in args.test_seeds.split(",")]
    shipped = load_backbone(BACKBONE, "shipped")
    results: dict[str, Any] = {}
    for family in families:
        print(f"[{family} ({'val' if family == families[0] else 'held-out'})]", flush=True)
        tests = load_tests(work, family, test_seeds, shipped)
        results[family] = {"shipped_zero_shot": zero_shot(shipped, tests)}
        results[family]["supports"] = support_rows(work, family, [int(s) for s in args.support_seeds.split(",")],
                                                   test_seeds, steps, args.lr, methods, shipped, tests, args.shots)
        if family == families[0] and methods[0] == "semclip":
            results[family]["choice"] = choose_steps(results[family]["supports"],
                                                     mean_figures(results[family]["shipped_zero_shot"]))
        (work / "adapt.json").write_text(json.dumps(results, indent=1))
    for family, result in results.items():
        print_family(family, result, methods)
        if "choice" in result:
            print(f"  choice (validation family): {result['choice']}")
    print(f"\ntotal {(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
