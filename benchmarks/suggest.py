"""Label suggestions against random picks: does labelling what ``suggest`` chooses teach the model more?

    nice -n 10 .venv/bin/python benchmarks/suggest.py --work /tmp/quality     # reuses quality.py's cache

Per family: a *pool* of unlabelled frames (``synth`` seed 4000, ``--pool-lots`` x 70 frames, balanced classes), the
test lot of ``benchmarks/quality.py`` (seed 6000, 70 frames) and its backbone pretrained on ``classic``. Per seed
``s``: a seeded ``--pool-frac`` of the pool is the pool of that seed; the zero-shot model scores it as ``run`` would
(class scores, whole-frame map at the frame's size, ``anomaly_score``, default thresholds); then

- ``suggest``: :func:`semclip_batch.analysis.suggest_rule.select` (the command's own rule) picks n = ``--per-class`` x
  (classes incl. normal) frames from those scores and the backbone's image embeddings;
- ``random``: n frames drawn uniformly from the same pool (seed ``s``);

each set is trained with its true labels and masks by ``train``'s code (:func:`semclip_batch.fewshot.train.fit`,
recipe ``transfer``, seed ``s``) and scored on the test lot as ``run`` + ``eval`` score (quality.py's
``metrics``). Settings of ``suggest`` (the variants below) are compared on ``--validation`` only; the best one by
mean rank of pAUROC and macro F1 there (ties by the order of ``VARIANTS``) is the one reported on ``--test``
against random (``--test-arms`` adds others, after the choice; ``--validation-from`` reuses a previous table's
validation rows and choice). Prints a table and writes ``--work/--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import KEYS, TRANSFER, Lot, load_lot, metrics, score_test, subset

from semclip_batch.analysis.suggest import image_embeddings
from semclip_batch.analysis.suggest_rule import FixedEmbeddings, Scores, Weights, map_peak, select
from semclip_batch.config import DEFAULT_SELF_SIMILARITY, ModelSpec, Thresholds
from semclip_batch.fewshot.recipes import copies
from semclip_batch.fewshot.train import TrainConfig, fit
from semclip_batch.io.preprocess import maps_to_frame, normalize
from semclip_batch.methods.decisions import anomaly_score
from semclip_batch.methods.prompts import load_prompts, text_embeddings
from semclip_batch.methods.registry import new_model, score_features
from semclip_batch.methods.weights import LoadedBackbone, load_backbone, preprocess_config
from semclip_batch.synth.generate import SynthConfig, synth

POOL_SEED = 4000
EXTRA = ("classes_covered", "normal_share")


@dataclass(frozen=True)
class Variant:
    name: str
    weights: Weights
    shortlist: int


VARIANTS = {v.name: v for v in (  # in this order (it breaks ties of the validation choice)
    Variant("suggest diverse 4n", Weights(1.0, 1.0, 1.0), 4),
    Variant("suggest classes only diverse 4n", Weights(1.0, 0.0, 0.0), 4),
    Variant("suggest top n (default)", Weights(1.0, 1.0, 1.0), 1),
    Variant("suggest diverse whole pool", Weights(1.0, 1.0, 1.0), 1000),
)}


@dataclass
class PoolView:
    """What ``run`` writes about the pool (per frame), plus the backbone embeddings ``suggest`` computes."""

    scores: Scores
    emb: np.ndarray


def score_pool(pool: Lot, backbone: LoadedBackbone, text: torch.Tensor, weights: str) -> PoolView:
    """The zero-shot run over the pool's un-augmented frames (the first copy of each)."""
    n = len(pool.df)
    first = torch.arange(n)
    zero = new_model(ModelSpec(backbone=backbone.name, pretrained=weights, self_similarity=DEFAULT_SELF_SIMILARITY),
                     backbone.clip, text)
    size = (pool.data.views.shape[-2], pool.data.views.shape[-1])
    with torch.no_grad():
        out = score_features(zero, pool.feats.subset(first), size)
    probs = out.class_probs.double().numpy()
    score = np.array([anomaly_score(float(probs[i, 0]),
                                    float(maps_to_frame(out.maps[i:i + 1], h, w, []).max()))
                      for i, (h, w) in enumerate(pool.shapes)])
    t = Thresholds()
    scores = Scores(probs, score, map_peak(score, probs[:, 0], "mean"), t.image, t.pixel)
    prep = preprocess_config(backbone.name, tile_above=10**9)
    return PoolView(scores, image_embeddings(backbone.clip, normalize(pool.data.views[:n], prep)))


def restrict(view: PoolView, rows: np.ndarray) -> PoolView:
    s = view.scores
    return PoolView(Scores(s.probs[rows], s.score[rows], s.peak[rows], s.image_threshold, s.pixel_threshold),
                    view.emb[rows])


def train_and_score(name: str, picked: np.ndarray, pool: Lot, test: Lot, backbone: LoadedBackbone,
                    text: torch.Tensor, seed: int) -> dict[str, float | None]:
    frames = len(pool.df)
    idx = torch.from_numpy(np.sort(picked))
    rows = (idx[None, :] + frames * torch.arange(copies(TRANSFER, "semclip"))[:, None]).flatten()
    data, feats, ref_feats = subset(pool, rows)
    cfg = TrainConfig(support="", out="", shots=None, recipe=TRANSFER,
                      model=ModelSpec(backbone=backbone.name, pretrained=backbone.source, cls="fused", seed=seed))
    t0 = time.perf_counter()
    fitted = fit(cfg, backbone, text, data, feats, ref_feats)
    out = score_test(fitted, backbone, test)
    figures = metrics(out, test)
    labels = pool.df["label"].to_numpy()[picked]
    figures["classes_covered"] = float(len(set(labels)))
    figures["normal_share"] = float(np.mean(labels == "normal"))
    figures["seconds"] = time.perf_counter() - t0
    print(f"    {name:<24} seed {seed}: " + " ".join(f"{k} {figures[k]:.3f}" for k in (*KEYS, *EXTRA, "seconds")),
          flush=True)
    return figures


def pick(arm: str, view: PoolView, pool_rows: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indexes into the whole pool of the ``n`` frames ``arm`` chooses among ``pool_rows``."""
    if arm == "random":
        return np.random.default_rng(1000 + seed).choice(pool_rows, size=n, replace=False)
    v = VARIANTS[arm]
    local = restrict(view, pool_rows)
    chosen, _ = select(local.scores, FixedEmbeddings(local.emb), n, v.weights, v.shortlist, seed)
    return pool_rows[np.array(chosen)]


def evaluate_family(work: Path, family: str, weights: str, arms: list[str], seeds: list[int], args: argparse.Namespace,
                    role: str) -> list[dict[str, object]]:
    prompts = load_prompts()
    backbone = load_backbone(args.backbone, weights)
    text = torch.from_numpy(text_embeddings(backbone, prompts))
    print(f"\n[classic -> {family} ({role})]", flush=True)
    pool = load_lot(work / family / f"pool-{POOL_SEED}", backbone, prompts.classes, "pool x4", augmented=True)
    test = load_lot(work / family / "test", backbone, prompts.classes, "test", augmented=False)
    view = score_pool(pool, backbone, text, weights)
    n = args.per_class * len(prompts.classes)
    size = round(args.pool_frac * len(pool.df))
    runs: dict[str, list[dict[str, float | None]]] = {a: [] for a in arms}
    for seed in seeds:
        pool_rows = np.sort(np.random.default_rng(seed).choice(len(pool.df), size=size, replace=False))
        for arm in arms:
            runs[arm].append(train_and_score(arm, pick(arm, view, pool_rows, n, seed), pool, test, backbone, text, seed))
    base = {"family": f"{family} ({role})", "role": role, "n": n, "pool": size, "seeds": len(seeds)}
    return [summarise({**base, "config": arm}, r, (*KEYS, *EXTRA, "seconds")) for arm, r in runs.items()]


def summarise(row: dict[str, object], runs: list[dict[str, float | None]], keys: tuple[str, ...]) -> dict[str, object]:
    for k in keys:
        values = np.array([np.nan if r[k] is None else r[k] for r in runs], dtype=float)
        row[k], row[f"{k}_std"] = float(np.nanmean(values)), float(np.nanstd(values))
    row["runs"] = runs
    return row


def best_on_validation(rows: list[dict[str, object]]) -> str:
    """The variant with the best mean rank of pAUROC and macro F1 among the suggest variants (validation rows)."""
    cands = [r for r in rows if r["config"] in VARIANTS]
    rank = {str(r["config"]): 0.0 for r in cands}
    for key in ("pAUROC", "macro_F1"):
        for i, r in enumerate(sorted(cands, key=lambda r: -float(r[key]))):  # type: ignore[arg-type]
            rank[str(r["config"])] += i
    return min(rank, key=lambda k: (rank[k], list(VARIANTS).index(k)))


def print_table(rows: list[dict[str, object]]) -> None:
    keys = (*KEYS, *EXTRA)
    print(f"\n{'family':<20}{'picked by':<24}" + "".join(f"{k:>16}" for k in keys) + f"{'s/fit':>7}")
    for r in rows:
        cells = "".join(f"{r[k]:>9.3f} ±{r[f'{k}_std']:.3f}" for k in keys)
        print(f"{r['family']:<20}{r['config']:<24}{cells}{r['seconds']:>7.1f}")


def ensure_pool(work: Path, family: str, lots: int) -> None:
    folder = work / family / f"pool-{POOL_SEED}"
    if not (folder / "manifest.csv").exists():
        t0 = time.perf_counter()
        synth(str(folder), SynthConfig(seed=POOL_SEED, lots=lots, per_class=10, family=family))
        print(f"synth pool {family}: {time.perf_counter() - t0:.0f} s", flush=True)
    if not (work / family / "test" / "manifest.csv").exists():
        synth(str(work / family / "test"), SynthConfig(seed=6000, lots=1, per_class=10, family=family))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="quality.py's --work (pretrained-classic.safetensors in it)")
    parser.add_argument("--backbone", default="semclip-tiny")
    parser.add_argument("--validation", default="contacts", help="the family suggest's settings are chosen on")
    parser.add_argument("--test", default="metal", help="the held-out family reported")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--per-class", type=int, default=5, help="n = this x classes (incl. normal)")
    parser.add_argument("--pool-lots", type=int, default=2, help="70 frames per lot")
    parser.add_argument("--pool-frac", type=float, default=0.75, help="share of the pool each seed draws")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="suggest settings tried on --validation")
    parser.add_argument("--test-arms", default="chosen,random",
                        help="what is trained on --test: 'chosen' (the validation's pick), 'random', variant names")
    parser.add_argument("--validation-from", default=None,
                        help="a previous --json: take its validation rows and choice (and its --test rows of arms "
                             "not run again) instead of recomputing them")
    parser.add_argument("--json", default="suggest.json", help="file name of the table, in --work")
    args = parser.parse_args()
    work, started = Path(args.work), time.perf_counter()
    weights = str(work / "pretrained-classic.safetensors")
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if set(variants) - set(VARIANTS):
        parser.error(f"--variants: unknown {sorted(set(variants) - set(VARIANTS))}")
    torch.set_num_threads(2)
    for family in (args.validation, args.test):
        ensure_pool(work, family, args.pool_lots)
    kept: list[dict[str, object]] = []
    if args.validation_from:
        previous = json.loads(Path(args.validation_from).read_text())
        rows, chosen = [r for r in previous["rows"] if r["role"] == "val"], str(previous["chosen"])
        kept = [r for r in previous["rows"] if r["role"] != "val"]
    else:
        rows = evaluate_family(work, args.validation, weights, [*variants, "random"], seeds, args, "val")
        chosen = best_on_validation(rows)
    print(f"\nchosen on {args.validation}: {chosen}", flush=True)
    (work / args.json).write_text(json.dumps({"rows": rows, "chosen": chosen}, indent=2))
    arms = list(dict.fromkeys(chosen if a.strip() == "chosen" else a.strip() for a in args.test_arms.split(",")))
    if set(arms) - {*VARIANTS, "random"}:
        parser.error(f"--test-arms: unknown {sorted(set(arms) - {*VARIANTS, 'random'})}")
    tested = evaluate_family(work, args.test, weights, arms, seeds, args, "held-out")
    rows += [r for r in kept if r["config"] not in arms] + tested
    print_table(rows)
    total = time.perf_counter() - started
    print(f"\ntotal {total / 60:.1f} min")
    (work / args.json).write_text(json.dumps({"rows": rows, "chosen": chosen, "seeds": seeds,
                                                   "per_class": args.per_class, "pool_frac": args.pool_frac,
                                                   "pool_lots": args.pool_lots, "minutes": total / 60}, indent=2))


if __name__ == "__main__":
    main()
