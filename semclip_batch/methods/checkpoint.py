"""Few-shot checkpoints: a folder (any fsspec URL) with ``model.safetensors`` (the trained tensors only)
and ``checkpoint.json``, the typed, versioned :class:`CheckpointMeta` (method, backbone and where its weights
came from, classes, prompts, options, fusion, thresholds, preprocessing, training summary). ``train`` writes
it, ``run`` reads it, both through this module. Loading never unpickles."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from semclip_batch.config import REFERENCE_FUSIONS
from semclip_batch.errors import WeightsError, one_line, show
from semclip_batch.io import storage
from semclip_batch.methods.weights import BACKBONE_PREFIXES, canonical_sha256

TENSORS = "model.safetensors"
META = "checkpoint.json"


CHECKPOINT_VERSION = 6
"""1: the unversioned checkpoints written before the version field (read with the defaults below);
2: adds ``version``, ``score_mode`` and ``sigma``; 3: adds ``recipe``, ``memory`` and ``region_head``; 4: adds
``self_similarity`` (a release before it would score a version-4 checkpoint's maps without the self-similarity
its thresholds were fitted with: it refuses the version instead); 5: the backbone weights may lie in the
checkpoint folder itself (``weights.source`` ``checkpoint:<file>``, ``train --adapt-steps``), which a release
before it would read as a path of that name; 6: ``region_classes`` (rule 22: a release before it would name the
defect classes without the regression fitted into the tensors). Each checkpoint is written at the lowest version
that holds it, so the others stay readable by the releases before."""
IN_CHECKPOINT = "checkpoint:"  # a WeightsRef source naming a file inside the checkpoint folder


@dataclass(frozen=True)
class WeightsRef:
    """The backbone weights a checkpoint was trained on: where they came from and their canonical sha256."""

    source: str  # a weights URL, or "random:<seed>" for seeded random weights
    sha256: str
    seed: int = 0

    @property
    def pretrained(self) -> str:
        """The ``--pretrained`` value that gives these weights again (a file in the checkpoint folder: its name
        after :data:`IN_CHECKPOINT`; :meth:`resolved` makes it a URL)."""
        return "none" if self.source.startswith("random:") else self.source

    def resolved(self, checkpoint_url: str) -> str:
        """:attr:`pretrained`, with weights kept in the checkpoint folder as their URL beside the checkpoint's
        files, wherever the folder was copied to."""
        if self.source.startswith(IN_CHECKPOINT):
            return storage.join(checkpoint_url, self.source.removeprefix(IN_CHECKPOINT))
        return self.pretrained


@dataclass(frozen=True)
class CheckpointThresholds:
    image: float
    pixel: float
    min_region_px: int


@dataclass(frozen=True)
class CheckpointMeta:
    """``checkpoint.json``: everything besides the tensors that ``run`` needs to score like ``train`` fitted."""

    method: str
    backbone: str
    weights: WeightsRef
    classes: tuple[str, ...]
    prompts: dict[str, tuple[str, ...]]
    taps: tuple[int, ...]
    use_vv: bool
    surgery: bool
    cls: str
    use_reference: bool
    alpha: float
    temperature: float
    thresholds: CheckpointThresholds
    preprocessing: dict[str, Any]
    training: dict[str, Any] = field(default_factory=dict)
    score_mode: str = "mean"
    sigma: float = 4.0
    recipe: str = "paper"  # train's recipe (fewshot.recipes); older checkpoints were all the paper's
    memory: bool = False
    region_head: bool = False
    register_reference: bool = False  # references registered before scoring (io.register); older: never
    reference_weight: float = 0.5  # the reference map's share of the fused map
    reference_fusion: str = "mean"  # the reference map from its token and pixel terms (model.reference); older: mean
    self_reference: bool = False  # rows without a reference_uri take a cell reference (io.cell_reference); older: never
    scale_policy: float | None = None  # train's --scale-policy (config.parse_scale_policy): run scores with it
    defect_view: bool = False  # the recipe's defect view (io.preprocess.defect_view); older: none
    self_similarity: float = 0.0  # the in-frame self-similarity map's share (model.selfsim); older: none
    grey_memory: bool = False  # the tensors hold a grey-level memory fused into the frame's map; older: none
    region_classes: bool = False  # the tensors hold the region's class regression (rule 22); version 6 only
    version: int = CHECKPOINT_VERSION
    tensors_sha256: str = ""

    @property
    def tile_overlap(self) -> float | None:
        """The tiles' least overlap ``train`` cut its support frames with (its preprocessing record), so that ``run``
        scores the tiles it trained on: a scale-policy checkpoint from before SCALE_POLICY_OVERLAP records 0.25.
        None where not recorded or not a number in [0, 1)."""
        value = self.preprocessing.get("tile_overlap")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value < 1.0:
            return float(value)
        return None

    def to_json(self) -> dict[str, Any]:
        body = asdict(self)
        body["classes"], body["taps"] = list(self.classes), list(self.taps)
        body["prompts"] = {c: list(p) for c, p in self.prompts.items()}
        return body

    @classmethod
    def from_json(cls, body: Any, where: str) -> CheckpointMeta:
        """Read a stored body (version 1 = unversioned); refuse unknown versions and missing fields in one line."""
        if not isinstance(body, dict):
            raise WeightsError(f"{where}: {META} is not a JSON object")
        version = body.get("version", 1)
        if version not in (1, 2, 3, 4, 5, CHECKPOINT_VERSION):
            raise WeightsError(f"{where}: checkpoint version {show(version)} is not one this release reads "
                               f"(1 to {CHECKPOINT_VERSION}); use the release that wrote it, or train again")
        names = [str(c) for c in body.get("classes") or []] if isinstance(body.get("classes"), list) else []
        twice = next((c for c in names if names.count(c) > 1), None)
        if twice is not None:  # its rows would count that class twice in every statistic
            raise WeightsError(f"{where}: {META} names class {show(twice)} twice")
        try:
            w, th = body["weights"], body["thresholds"]
            return cls(
                method=str(body.get("method", "semclip")), backbone=str(body["backbone"]),
                weights=WeightsRef(source=str(w["source"]), sha256=str(w["sha256"]),
                                   seed=_number(w.get("seed", 0), "weights.seed", int)),
                classes=tuple(str(c) for c in body["classes"]),
                prompts={str(c): tuple(str(p) for p in body["prompts"][c]) for c in body["classes"]},
                taps=tuple(_number(t, "taps", int) for t in body["taps"]), use_vv=bool(body["use_vv"]),
                surgery=bool(body["surgery"]), cls=str(body["cls"]),
                use_reference=bool(body.get("use_reference", False)), alpha=_number(body.get("alpha", 1.0), "alpha"),
                temperature=_number(body.get("temperature", 100.0), "temperature"),
                thresholds=CheckpointThresholds(image=_number(th["image"], "thresholds.image"),
                                                pixel=_number(th["pixel"], "thresholds.pixel"),
                                                min_region_px=_number(th["min_region_px"], "thresholds.min_region_px", int)),
                preprocessing=dict(body.get("preprocessing", {})), training=dict(body.get("training", {})),
                score_mode=str(body.get("score_mode", "mean")), sigma=_number(body.get("sigma", 4.0), "sigma"),
                recipe=str(body.get("recipe", "paper")), memory=bool(body.get("memory", False)),
                region_head=bool(body.get("region_head", False)),
                register_reference=bool(body.get("register_reference", False)),
                reference_weight=_number(body.get("reference_weight", 0.5), "reference_weight"),
                reference_fusion=_fusion(body.get("reference_fusion", "mean")),
                self_reference=bool(body.get("self_reference", False)), scale_policy=_policy(body.get("scale_policy")),
                defect_view=bool(body.get("defect_view", False)),
                self_similarity=_self_similarity(body.get("self_similarity", 0.0)),
                grey_memory=bool(body.get("grey_memory", False)),
                region_classes=bool(body.get("region_classes", False)), version=CHECKPOINT_VERSION,
                tensors_sha256=str(body.get("tensors_sha256", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise WeightsError(f"{where}: {META} lacks or mangles {show(str(exc).strip(chr(39)), 40)}") from None


def _number(value: Any, name: str, kind: Callable[[Any], Any] = float) -> Any:
    """``value`` as a number of ``kind``, or a ValueError naming the field (``from_json`` reports it as mangled)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(name)
    try:
        number = kind(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(name) from None
    if not math.isfinite(number) or (kind is int and isinstance(value, float) and value != number):
        raise ValueError(name)  # not finite, or a fraction where a count is stored (3.7 is not 3)
    return number


def _self_similarity(value: Any) -> float:
    weight = _number(value, "self_similarity")
    if not 0.0 <= weight <= 1.0:
        raise ValueError("self_similarity")
    return weight


def _policy(value: Any) -> float | None:
    if value is None:
        return None
    policy = _number(value, "scale_policy")
    if not 0.0 < policy <= 1.0:
        raise ValueError("scale_policy")
    return policy


def _fusion(value: Any) -> str:
    if value not in REFERENCE_FUSIONS:
        raise ValueError("reference_fusion")
    return str(value)


@dataclass(frozen=True)
class Checkpoint:
    url: str
    meta: CheckpointMeta
    tensors: dict[str, torch.Tensor]
    sha256: str

    @property
    def method(self) -> str:
        return self.meta.method


def trained_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Everything but the backbone (which the checkpoint records by source and checksum instead)."""
    return {k: v.detach().contiguous().cpu() for k, v in state.items() if not k.startswith(BACKBONE_PREFIXES)}


def save_checkpoint(url: str, state: Mapping[str, torch.Tensor], meta: CheckpointMeta,
                    storage_options: Mapping[str, Any] | None = None) -> CheckpointMeta:
    """Write the trained tensors and the JSON; returns the meta as stored (with the tensors' checksum)."""
    tensors = trained_state(state)
    digest = canonical_sha256(tensors)
    own = meta.weights.source.startswith(IN_CHECKPOINT)  # version 5 only then: the others stay readable by a release
    version = 6 if meta.region_classes else 5 if own else 4  # before it
    stored = replace(meta, tensors_sha256=digest, version=version)
    storage.write_bytes(storage.join(url, TENSORS), save_safetensors(tensors, metadata={"sha256": digest}),
                        storage_options)
    body = json.dumps(finite_json(stored.to_json()), indent=2, allow_nan=False)
    storage.write_bytes(storage.join(url, META), body.encode(), storage_options)
    return stored


def finite_json(value: Any) -> Any:
    """``value`` with every non-finite float (an undefined AUROC in the training summary, say) as None: the
    checkpoint's JSON stays strict, readable by any JSON reader (``NaN`` is not JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v) for v in value]
    return value


def load_checkpoint(url: str, storage_options: Mapping[str, Any] | None = None) -> Checkpoint:
    """Read and verify a checkpoint folder. Raises :class:`WeightsError` with one line."""
    where = f"checkpoint {storage.redact(url)}"
    try:
        body = json.loads(storage.read_bytes(storage.join(url, META), storage_options))
        blob = storage.read_bytes(storage.join(url, TENSORS), storage_options)
    except FileNotFoundError:
        raise WeightsError(f"--model {storage.redact(url)} is not a checkpoint folder (needs {META} and {TENSORS})") from None
    except (OSError, ValueError) as exc:
        raise WeightsError(f"cannot read {where}: {one_line(exc)}") from None
    meta = CheckpointMeta.from_json(body, where)
    try:
        tensors = load_safetensors(blob)
    except Exception as exc:  # noqa: BLE001 - a corrupt file, whatever the parser says
        raise WeightsError(f"{where}: unreadable {TENSORS}: {one_line(exc)[:150]}") from None
    digest = canonical_sha256(tensors)
    if meta.tensors_sha256 != digest:
        raise WeightsError(f"{where}: tensors checksum {digest[:12]} does not match its "
                           f"{META} ({meta.tensors_sha256[:12]})")
    text = tensors.get("text_embeddings")
    if text is not None and text.shape[0] != len(meta.classes):
        raise WeightsError(f"{where}: {META} names {len(meta.classes)} classes but its tensors were fitted on "
                           f"{text.shape[0]} (text_embeddings); the file was edited, or pairs with other tensors")
    return Checkpoint(url=url, meta=meta, tensors=tensors, sha256=digest)


def model_checksum(ckpt: Checkpoint) -> str:
    """The checksum a checkpoint run is identified by: its tensors plus its backbone weights."""
    return hashlib.sha256(f"{ckpt.sha256}:{ckpt.meta.weights.sha256}".encode()).hexdigest()
