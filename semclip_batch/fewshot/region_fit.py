"""``train``'s defect classes from the region's attributes (:mod:`semclip_batch.model.region_classes`), as
docs/quality.md's rule 22 fixes them: after the grey-level memory's step, the attributes of each support defect
frame's region at its map's maximum (the map as ``train`` scores it for its thresholds: at the maps' policy, fused
with the memory where kept, in the stored uint8 form, one pass a view where ``run`` by default also averages
half-patch shifts), a multinomial logistic regression on them (L2, standardised, L-BFGS), kept unless on the
support frames the fit held out the blend names fewer defect classes right than the model alone. The model's
classes there are the whole view's (``train`` scores no defect view), which is what a frame without one gets.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
import torch

from semclip_batch.config import NORMAL
from semclip_batch.errors import ConfigError
from semclip_batch.fewshot.grey_memory_fit import NativeSupport, frame_maps
from semclip_batch.fewshot.maps_policy import support_maps_at
from semclip_batch.fewshot.support_maps import SupportMaps
from semclip_batch.fewshot.support_set import Fitted, TrainConfig
from semclip_batch.io.preprocess import fuses_levels
from semclip_batch.methods.decisions import to_mask, with_region_classes
from semclip_batch.methods.region_attributes import N_ATTRIBUTES, SHARE, frame_attributes
from semclip_batch.methods.weights import LoadedBackbone
from semclip_batch.model.region_classes import BLEND, RegionClasses

L2 = 1.0  # the weights' penalty, l2 / 2 * |W|^2 on the summed cross-entropy (scikit-learn's C = 1)
MIN_PER_CLASS = 2  # defect frames a class needs among the fitted ones for the regression to be fitted at all


@dataclass(frozen=True)
class RegionItem:
    """A support defect frame: its position, class (an index among the defect classes), region attributes and the
    model's whole-view class probabilities."""

    position: int
    label: int
    attributes: np.ndarray
    probs: np.ndarray


def fit_logistic(x: np.ndarray, y: np.ndarray, n_classes: int, l2: float = L2) -> RegionClasses:
    """The regression on ``(N, A)`` attributes and ``(N,)`` class indices: the summed cross-entropy plus
    ``l2 / 2 * |W|^2`` minimised by L-BFGS on attributes standardised by their mean and spread."""
    xt = torch.from_numpy(np.asarray(x, dtype=np.float64))
    model = RegionClasses(xt.shape[1], n_classes)
    model.mean.copy_(xt.mean(dim=0))
    model.std.copy_(xt.std(dim=0).nan_to_num(1.0).clamp_min(1e-6) if len(xt) > 1 else torch.ones(xt.shape[1]))
    z, target = (xt - model.mean) / model.std, torch.from_numpy(np.asarray(y)).long()
    weight = torch.zeros(xt.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (torch.nn.functional.cross_entropy(z @ weight + bias, target, reduction="sum")
                + 0.5 * l2 * (weight ** 2).sum())
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    model.weight.copy_(weight.detach())
    model.bias.copy_(bias.detach())
    model.fitted.copy_((torch.bincount(target, minlength=n_classes) > 0).to(torch.float64))
    model.share.fill_(SHARE)
    model.blend.fill_(BLEND)
    return model


def support_items(support: NativeSupport, scored: SupportMaps, df: pd.DataFrame,
                  classes: tuple[str, ...]) -> Iterator[RegionItem]:
    """Every support defect frame whose levels ``run`` would ship, with its attributes on its map as ``train``
    scores it (a tiled frame whose tiles the support set left out, a defect frame without a mask, stays out: its
    map is not the one ``run`` would write)."""
    for item in frame_maps(scored, support.frames):
        label = str(df.iloc[item.position]["label"])
        h, w = item.map.shape
        if (label == NORMAL or label not in classes or item.probs is None or not item.as_run
                or not fuses_levels(h, w)):
            continue
        mask = to_mask(support.final_map(item).numpy())
        yield RegionItem(item.position, classes.index(label) - 1,
                         frame_attributes(support.frames[item.position].levels, mask), item.probs)


def check_on_held_out(items: Sequence[RegionItem], held: set[int], n_classes: int) -> dict[str, Any]:
    """The regression fitted on the frames outside ``held`` and read on those in it: how many held-out defect frames
    the model alone and the blend name right (``kept``: the blend names no fewer)."""
    fitted = [i for i in items if i.position not in held]
    checked = [i for i in items if i.position in held]
    record: dict[str, Any] = {"fitted_on": len(fitted), "held_out": len(checked)}
    if not checked:
        return record | {"kept": False, "note": "no held-out support frame with a defect to check on"}
    counts = np.bincount([i.label for i in fitted], minlength=n_classes)
    if (counts >= MIN_PER_CLASS).sum() < 2:
        return record | {"kept": False, "note": f"fewer than two defect classes with {MIN_PER_CLASS} fitted frames"}
    model = fit_logistic(np.stack([i.attributes for i in fitted]), np.array([i.label for i in fitted]), n_classes)
    probs = model.probs(torch.from_numpy(np.stack([i.attributes for i in checked]))).numpy()
    seen = model.seen().numpy()
    alone = blended = 0
    for item, p in zip(checked, probs, strict=True):
        alone += int(np.argmax(item.probs[1:]) == item.label)
        mixed = with_region_classes(item.probs.astype(np.float64), p, BLEND, seen)
        blended += int(np.argmax(mixed[1:]) == item.label)
    return record | {"model_right": alone, "blend_right": blended, "kept": blended >= alone}


def region_classes_step(cfg: TrainConfig, df: pd.DataFrame, held: Sequence[int], classes: tuple[str, ...],
                        backbone: LoadedBackbone, fitted: Fitted,
                        support: NativeSupport) -> tuple[RegionClasses | None, dict[str, Any]]:
    """Rule 22 after the grey-level memory's step: the attributes of every support defect frame's region (the
    support maps at the policy, scored here where the steps before kept none), the held-out check, and where kept
    the regression fitted on every one of them. Returns the regression (None: not kept) and the record."""
    scored = support.scored
    if scored is None:  # loaded as the grey-level memory's step loads them, at the policy cfg already holds
        at = replace(cfg, policy_from_weights=False, check_scale=False)
        try:
            scored = SupportMaps.of(*support_maps_at(at, df, classes, backbone, fitted))
        except ConfigError as exc:
            return None, {"kept": False, "note": f"the support frames do not load at the maps' policy: {exc}"}
    n_classes = len(classes) - 1
    items = list(support_items(support, scored, df, classes))
    record = check_on_held_out(items, set(held), n_classes) if n_classes >= 2 else {"kept": False,
                                                                                 "note": "one defect class"}
    if not record["kept"]:
        return None, record
    model = fit_logistic(np.stack([i.attributes for i in items]), np.array([i.label for i in items]), n_classes)
    if not model.valid():
        return None, record | {"kept": False, "note": "the regression on every support frame is not usable "
                                                      "(tensors not finite)"}
    unseen = [classes[1 + k] for k in range(n_classes) if not bool(model.seen()[k])]
    return model, record | {"frames": len(items), "share": SHARE, "blend": BLEND,
                            **({"unseen": unseen} if unseen else {})}


def region_classes_lines(training: Mapping[str, Any]) -> list[str]:
    """``train``'s line on the region's classes: kept or not, and on what count (none where not tried)."""
    record = training.get("region_classes")
    if not record:
        return []
    if "model_right" not in record:
        return [f"defect classes from the region's attributes: not kept ({record.get('note', 'not fitted')})"]
    seen = (f"the {record['held_out']} held-out defect frames: the model names {record['model_right']} right, "
            f"blended with the region's attributes {record['blend_right']}")
    verdict = (f"kept (blend {record['blend']:g}, fitted on {record['frames']} frames)" if record["kept"]
               else f"not kept ({record.get('note', 'the blend names fewer right')})")
    return [f"defect classes from the region's attributes ({N_ATTRIBUTES} attributes): {verdict}; {seen}"]
