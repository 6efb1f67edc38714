"""The `transfer` fit's choice of the memory's and the self-similarity's weights from support-fold scores, and
the record of its evidence (``training.weights_choice`` in a checkpoint; one line of ``train``'s output).

Scores map ``(memory weight, self-similarity weight)`` to ``(pooled pixel AUROC over every support frame, the
AUROC per fold with a defect pixel)``, as :func:`semclip_batch.methods.semclip_method.choose_memory_weight`
computes them. Light module (numpy only): the CLI imports it for the line.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

Scores = Mapping[tuple[float, float], tuple[float, list[float]]]


def one_se_choice(scores: Scores, given: float) -> tuple[float, float]:
    """From ``(memory weight, self-similarity weight) -> (pixel AUROC over every support frame, per fold with a
    defect pixel)``: the weights of the best AUROC (ties: the smaller memory weight, then the self-similarity
    weight nearest ``given``, then the larger), unless their pooled gain over the map without the memory at the
    given self-similarity weight, ``(0, given)``, is within one standard error of their per-fold (paired) gains:
    then that map, as a zero-shot model scores. With fewer than two folds there is no standard error and the best
    is taken. A paired variant of the one-standard-error rule of cross-validation (Breiman et al., 1984: the
    simplest model within one SE of the best), against one simpler pair only: the best of some 30 weight pairs
    scored on the same frames is overrated, and a few shots should not move the map from the zero-shot one on
    noise."""
    best = _best_pair(scores, given)
    anchor = (0.0, given)
    if anchor not in scores or best == anchor:
        return best
    se = _paired_standard_error(scores, best, anchor)
    if se is None:
        return best
    return best if scores[best][0] - scores[anchor][0] > se else anchor  # NaN: the anchor


def _best_pair(scores: Scores, given: float) -> tuple[float, float]:
    """The pair of the best pooled AUROC (an undefined one ranks last); ties as :func:`one_se_choice` says."""
    def rank(k: tuple[float, float]) -> tuple[float, float, float, float]:
        auroc = scores[k][0]
        return (-math.inf if math.isnan(auroc) else auroc, -k[0], -abs(k[1] - given), k[1])
    return max(scores, key=rank)


def _paired_standard_error(scores: Scores, best: tuple[float, float],
                           anchor: tuple[float, float]) -> float | None:
    """The standard error of ``best``'s per-fold gains over ``anchor``: None under two folds (or folds that do not
    pair up); 0 where the gains differ by rounding only."""
    if len(scores[best][1]) != len(scores[anchor][1]) or len(scores[best][1]) < 2:
        return None
    gains = np.subtract(scores[best][1], scores[anchor][1])
    se = float(gains.std(ddof=1) / np.sqrt(len(gains)))
    return 0.0 if se < 1e-9 else se


def pair_key(pair: tuple[float, float] | list[float]) -> str:
    """A (memory, self-similarity) pair as a key of the record's ``pairs``: ``"0.25,0.8"``."""
    return f"{pair[0]:g},{pair[1]:g}"


def _figure(value: float | None) -> float | None:
    """A figure for the checkpoint's JSON record: 4 decimals, None for an undefined one (NaN)."""
    return None if value is None or math.isnan(value) else round(float(value), 4)


def choice_evidence(scores: Scores, given: float) -> dict[str, Any]:
    """What the checkpoint records about :func:`one_se_choice`'s pair (``training.weights_choice``) and ``train``
    prints: the pooled support-fold pixel AUROC of the pair chosen, of the best pair and of the zero-shot pair
    ``(0, given)``, the best's gain over the zero-shot pair, its standard error over the folds and the gain in
    standard errors (None without a standard error), and every pair's AUROC, so that a user can see whether a few
    shots moved the map on evidence or kept it. Undefined figures are None (strict JSON)."""
    chosen, best = one_se_choice(scores, given), _best_pair(scores, given)
    anchor = (0.0, given)
    record: dict[str, Any] = {
        "chosen": list(chosen), "chosen_pAUROC": _figure(scores[chosen][0]),
        "best": list(best), "best_pAUROC": _figure(scores[best][0]),
        "pairs": {pair_key(k): _figure(v[0]) for k, v in sorted(scores.items())},
    }
    if anchor in scores:
        se = _paired_standard_error(scores, best, anchor)
        gain = scores[best][0] - scores[anchor][0]
        record.update(zero_shot_pair=list(anchor), zero_shot_pAUROC=_figure(scores[anchor][0]), gain=_figure(gain),
                      standard_error=_figure(se), folds=len(scores[best][1]),
                      gain_in_standard_errors=None if not se or math.isnan(gain) else _figure(gain / se))
    return record


def describe_choice(evidence: Mapping[str, Any]) -> str | None:
    """One line for ``train``'s output from :func:`choice_evidence`'s record (None for an empty one)."""
    if not evidence:
        return None
    chosen, best = evidence["chosen"], evidence["best"]
    head = f"memory weight {chosen[0]:g}, self-similarity {chosen[1]:g}"
    if "zero_shot_pAUROC" not in evidence:
        return f"{head}: the best pair in the support folds (pixel AUROC {_fmt(evidence['chosen_pAUROC'])})"
    anchor = evidence["zero_shot_pair"]
    if chosen == anchor == best:
        return f"{head} (the zero-shot pair): the best in the support folds (pixel AUROC {_fmt(evidence['chosen_pAUROC'])})"
    ratio = evidence.get("gain_in_standard_errors")
    margin = "no standard error" if ratio is None else f"{ratio:.1f} standard errors"
    against = (f"against {_fmt(evidence['zero_shot_pAUROC'])} for the zero-shot pair ({anchor[0]:g}, {anchor[1]:g}) "
               f"in the support folds: gain {_fmt(evidence['gain'], '+.3f')}, {margin}")
    if chosen == anchor:
        return (f"{head} (the zero-shot pair, kept): the best, ({best[0]:g}, {best[1]:g}), scored "
                f"{_fmt(evidence['best_pAUROC'])} {against}{'' if ratio is None else ', not more than one'}")
    return f"{head}: pixel AUROC {_fmt(evidence['chosen_pAUROC'])} {against}"


def _fmt(value: float | None, spec: str = ".3f") -> str:
    """A recorded figure for the line: ``n/a`` where undefined."""
    return "n/a" if value is None else format(value, spec)
