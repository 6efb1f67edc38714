"""How the `transfer` fit's weight choice carries to other lots: every (memory, self-similarity) pair it tried,
scored on several test lots, against zero-shot.

    .venv/bin/python benchmarks/weight_choice.py --work /tmp/weights      # ~15 min here; lots cached in --work

Per family (``--families``; the first is the validation family, the others held out): support lots
(``--support-seeds``, 70 frames each) and test lots (``--test-seeds``, 70 frames each), written by ``synth`` unless
already in ``--work``. Per support lot, one `transfer` fit with ``train``'s own code on the shipped `semclip-tiny`
weights (whole views, as ``benchmarks/quality.py`` scores); the fit records the support folds' pixel AUROC of every
pair and the best pair's gain over the zero-shot pair with its standard error (``training.weights_choice``). Every
pair is then scored on every test lot (pixel AUROC at frame resolution, as ``run`` + ``eval``), so each rule's
choice is read off the same fits:

- ``one-SE``: the shipped rule (:func:`semclip_batch.methods.weight_choice.one_se_choice`);
- ``two-SE``: the zero-shot pair unless the best gains more than two standard errors;
- ``zero-shot pair``: no memory, the recipe's self-similarity weight (the fitted layers, cell references fused).

Prints per rule the test lots' pAUROC, their mean, the mean gain over zero-shot and the worst lot's gain, and
writes everything to ``--work/weight_choice.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import TRANSFER, Lot, load_lot, score_test

from semclip_batch.analysis.metrics import PixelCounts
from semclip_batch.config import DEFAULT_SELF_SIMILARITY, ModelSpec
from semclip_batch.fewshot.train import Fitted, TrainConfig, fit
from semclip_batch.io.preprocess import maps_to_frame
from semclip_batch.methods.decisions import to_mask
from semclip_batch.methods.prompts import load_prompts, text_embeddings
from semclip_batch.methods.registry import new_model, score_features
from semclip_batch.methods.weight_choice import pair_key
from semclip_batch.methods.weights import LoadedBackbone, load_backbone
from semclip_batch.model import SemClip, SemClipOutput
from semclip_batch.synth.generate import SynthConfig, parse_defect_px, synth

BACKBONE = "semclip-tiny"


def pixel_auroc(out: SemClipOutput, lot: Lot) -> float:
    """Pixel AUROC of the maps resized to each frame, as ``run`` writes them and ``eval`` counts them."""
    pixels = PixelCounts()
    for i, (shape, truth) in enumerate(zip(lot.shapes, lot.truth, strict=True)):
        pixels.add(to_mask(maps_to_frame(out.maps[i:i + 1], shape[0], shape[1], []).numpy()), truth)
    auroc = pixels.auroc()
    return float("nan") if auroc is None else auroc  # no defect pixel in the lot


def family_config(family: str, seed: int) -> SynthConfig:
    """``synth``'s settings for one 70-frame lot of ``family``: a family name, or ``NAME:LO-HI`` for that family
    with its defects drawn LO-HI px at frame resolution (``synth --defect-px``)."""
    name, sep, scale = family.partition(":")
    return SynthConfig(seed=seed, lots=1, per_class=10, family=name, defect_px=parse_defect_px(scale) if sep else None)


def ensure_lot(folder: Path, family: str, seed: int) -> Path:
    """One 70-frame lot of ``family`` (:func:`family_config`, seed ``seed``) in ``folder``, written by ``synth``
    unless already there."""
    if not (folder / "manifest.csv").exists():
        synth(str(folder), family_config(family, seed))
    return folder


def lot_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options that name the lots (shared with ``benchmarks/adapt.py``): the work folder, the families (the
    first the validation family), the support and the test seeds."""
    parser.add_argument("--work", required=True)
    parser.add_argument("--families", default="contacts,metal,logic",
                        help="the first is the validation family; NAME:LO-HI: that family, its defects LO-HI px")
    parser.add_argument("--support-seeds", default="2000,2001")
    parser.add_argument("--test-seeds", default="6000,6001,6002,6003")
    return parser


def rule_choices(evidence: dict[str, Any]) -> dict[str, str]:
    """Each rule's pair, as the key of ``evidence["pairs"]`` (:func:`pair_key`)."""
    if "zero_shot_pair" not in evidence:
        raise SystemExit("the fit recorded no weight choice against the zero-shot pair (under 5 support frames, or "
                         "none with a defect pixel): nothing to compare")
    anchor, best = pair_key(evidence["zero_shot_pair"]), pair_key(evidence["best"])
    ratio = evidence["gain_in_standard_errors"]  # None: no standard error, and the two-SE rule is the fit's own
    two_se = pair_key(evidence["chosen"]) if ratio is None else (best if ratio > 2 else anchor)
    return {"one-SE": pair_key(evidence["chosen"]), "two-SE": two_se, "zero-shot pair": anchor}


@torch.no_grad()
def score_pairs(fitted: Fitted, backbone: LoadedBackbone, tests: dict[int, Lot], keys: list[str]) -> dict[int, dict[str, float]]:
    """Every pair set on the fitted model in turn, scored on every test lot; leaves the model as it was."""
    model = fitted.model
    assert isinstance(model, SemClip) and model.memory is not None
    memory = model.memory
    kept = (float(memory.weight), model.cfg.self_similarity)
    out: dict[int, dict[str, float]] = {s: {} for s in tests}
    for key in keys:
        w, sw = (float(v) for v in key.split(","))
        memory.weight.fill_(w)
        model.cfg = replace(model.cfg, self_similarity=sw)
        for s, lot in tests.items():
            out[s][key] = pixel_auroc(score_test(fitted, backbone, lot), lot)
    memory.weight.fill_(kept[0])
    model.cfg = replace(model.cfg, self_similarity=kept[1])
    return out


def family_rows(work: Path, family: str, backbone: LoadedBackbone, text: torch.Tensor, support_seeds: list[int],
                test_seeds: list[int]) -> dict[str, Any]:
    """Zero-shot on every test lot, then per support lot a `transfer` fit, its record and every pair it tried
    scored on every test lot."""
    prompts = load_prompts()
    tests = {s: load_lot(ensure_lot(work / family / f"test-{s}", family, s), backbone, prompts.classes, f"test {s}",
                         augmented=False) for s in test_seeds}
    zero = new_model(ModelSpec(backbone=BACKBONE, pretrained="shipped", self_similarity=DEFAULT_SELF_SIMILARITY),
                     backbone.clip, text)
    with torch.no_grad():
        zs = {s: pixel_auroc(score_features(zero, lot.feats, (lot.data.views.shape[-2], lot.data.views.shape[-1])), lot)
              for s, lot in tests.items()}
    result: dict[str, Any] = {"zero_shot": zs, "supports": {}}
    for seed in support_seeds:
        support = load_lot(ensure_lot(work / family / f"support-{seed}", family, seed), backbone, prompts.classes,
                           f"support {seed} x4", augmented=True)
        cfg = TrainConfig(support="", out="", shots=10, recipe=TRANSFER,
                          model=ModelSpec(backbone=BACKBONE, pretrained="shipped", cls="fused", method="semclip"))
        t0 = time.perf_counter()
        fitted = fit(cfg, backbone, text, support.data, support.feats, support.ref_feats)
        evidence = fitted.summary["weights_choice"]
        per_lot = score_pairs(fitted, backbone, tests, list(evidence["pairs"]))
        print(f"  support {seed}: fit and {len(evidence['pairs'])} pairs x {len(tests)} lots scored in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        fit_figures = {k: v for k, v in fitted.summary.items() if isinstance(v, int | float | str)}  # epochs, accuracy
        result["supports"][seed] = {"evidence": evidence, "test": per_lot, "rules": rule_choices(evidence),
                                    "fit": fit_figures}
    return result


def print_family(family: str, result: dict[str, Any]) -> None:
    """Per support lot and rule: the pair, its pAUROC per test lot, the mean, and the gain over zero-shot (mean
    and worst lot)."""
    zs = result["zero_shot"]
    lots = list(zs)
    print(f"\n{family}: zero-shot " + " / ".join(f"{zs[s]:.3f}" for s in lots) + f" (mean {np.mean(list(zs.values())):.3f})")
    for seed, fit_result in result["supports"].items():
        ev = fit_result["evidence"]
        print(f"  support {seed}: support folds best {ev['best']} {ev['best_pAUROC']}, zero-shot pair "
              f"{ev.get('zero_shot_pAUROC')}, gain {ev.get('gain')} ({ev.get('gain_in_standard_errors')} SE)")
        for rule, key in fit_result["rules"].items():
            test = [fit_result["test"][s][key] for s in lots]
            gains = np.subtract(test, [zs[s] for s in lots])
            print(f"    {rule:<15} ({key}): " + " / ".join(f"{v:.3f}" for v in test)
                  + f"  mean {np.mean(test):.3f}  vs zero-shot {np.mean(gains):+.3f}, worst lot {gains.min():+.3f}")


def main() -> None:
    args = lot_arguments(argparse.ArgumentParser(description=__doc__,
                                                 formatter_class=argparse.RawDescriptionHelpFormatter)).parse_args()
    work = Path(args.work)
    started = time.perf_counter()
    backbone = load_backbone(BACKBONE, "shipped")
    text = torch.from_numpy(text_embeddings(backbone, load_prompts()))
    families = [f for f in args.families.split(",") if f]
    results = {}
    for family in families:
        print(f"[{family} ({'val' if family == families[0] else 'held-out'})]", flush=True)
        results[family] = family_rows(work, family, backbone, text, [int(s) for s in args.support_seeds.split(",")],
                                      [int(s) for s in args.test_seeds.split(",")])
        (work / "weight_choice.json").write_text(json.dumps(results, indent=1))
    for family, result in results.items():
        print_family(family, result)
    print(f"\ntotal {(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
