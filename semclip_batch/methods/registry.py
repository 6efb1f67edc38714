"""The scoring methods behind one interface (timm-style registry): SEM-CLIP and the baselines it is measured
against (WinCLIP+, PromptAD), optionally with reference frames. A method is one registered :class:`Method`
object in its own module that builds its model from a spec (and loads checkpoint tensors), says which blocks
and paths it reads, scores precomputed :class:`~semclip_batch.methods.features.Features` and fits itself on a
support set. Adding a method = one module with a ``@register``-ed class; nothing else changes."""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any, ClassVar, Generic, TypeVar

import torch
from torch import nn

from semclip_batch.config import ModelSpec
from semclip_batch.errors import ConfigError
from semclip_batch.methods.features import Features
from semclip_batch.methods.fitting import HeldOutMaps, Support
from semclip_batch.methods.weights import BACKBONE_PREFIXES
from semclip_batch.model import SemClipOutput, default_taps
from semclip_batch.model.grey_memory import GREY_MEMORY
from semclip_batch.model.reference import ReferenceScorer
from semclip_batch.model.region_classes import REGION_CLASSES
from semclip_batch.model.scorer import Scorer
from semclip_batch.model.towers import vision_tower

__all__ = ["Method", "Scorer", "depth_of", "get_method", "method_names", "method_taps", "new_model", "register",
           "score_features"]

M = TypeVar("M", bound=Scorer)
C = TypeVar("C", bound="type[Method[Any]]")
BUILTIN = ("semclip_batch.methods.semclip_method", "semclip_batch.methods.winclip_method",
           "semclip_batch.methods.promptad_method")  # each registers itself when imported
_METHODS: dict[str, Method[Any]] = {}


def depth_of(clip: nn.Module) -> int:
    """Blocks of the vision tower of a CLIP model or of a scorer (anything with ``.visual``)."""
    return len(vision_tower(clip).transformer.resblocks)


def method_taps(spec: ModelSpec, depth: int) -> tuple[int, ...]:
    return tuple(spec.taps) if spec.taps else default_taps(depth)


class Method(ABC, Generic[M]):
    """One scoring method. ``name``: what ``--method`` / ``ModelSpec.method`` call it; ``windows``: it reads
    WinCLIP's window embeddings; ``layer_options``: it takes SEM-CLIP's ``--taps / --no-vv / --no-surgery / --cls``;
    ``recipes``: ``train --recipe`` applies to it (``fewshot.recipes``; the baselines keep their papers' recipes)."""

    name: ClassVar[str]
    windows: ClassVar[bool] = False
    layer_options: ClassVar[bool] = False
    recipes: ClassVar[bool] = False

    @abstractmethod
    def build(self, spec: ModelSpec, clip: nn.Module, text: torch.Tensor) -> M:
        """The untrained model around ``clip`` with class embeddings ``text`` ``(C, E)`` (set through
        :meth:`Scorer.set_text_embeddings`)."""

    def load(self, model: M, tensors: Mapping[str, torch.Tensor]) -> list[str]:
        """Load checkpoint tensors into ``model``; returns problems (missing / unexpected keys)."""
        beside = ("reference.", f"{GREY_MEMORY}.", f"{REGION_CLASSES}.")  # loaded by the scoring beside the model
        own = {k: v for k, v in tensors.items() if not k.startswith(beside)}
        missing, unexpected = model.load_state_dict(own, strict=False)
        return [f"unexpected {k}" for k in unexpected] + [f"missing {k}" for k in missing if not k.startswith(BACKBONE_PREFIXES)]

    @abstractmethod
    def taps(self, model: M) -> tuple[int, ...]:
        """The blocks (1-based) whose tokens ``score`` reads."""

    def vv_from(self, model: M) -> int | None:
        """The first block of the V-V path to encode, or None for the original path only."""
        return None

    @abstractmethod
    def score(self, model: M, feats: Features, size: tuple[int, int]) -> SemClipOutput:
        """Maps at ``size`` (model input), class probabilities and embeddings of precomputed features."""

    def score_maps(self, model: M, feats: Features, size: tuple[int, int]) -> SemClipOutput:
        """:meth:`score` where nothing reads the class probabilities (``run``'s shifted passes): a method may skip
        what only they need and give NaN there, the maps the same. By default :meth:`score` itself."""
        return self.score(model, feats, size)

    @abstractmethod
    def fit(self, model: M, spec: ModelSpec, support: Support) -> dict[str, Any]:
        """Fit ``model`` (built from ``spec``) on the support set, in place; returns the training summary."""

    def held_out_maps(self, model: M, support: Support) -> HeldOutMaps | None:
        """After :meth:`fit`: support rows whose frames the fit did not learn from, and the fitted model's maps
        of them, scored as ``run`` would score frames it never saw; ``model`` is left as :meth:`fit` left it. None
        where the method keeps no such rows (the default): a choice made after the fit on the support set, such
        as ``train --reference-weight auto``'s, then has nothing unbiased to go on."""
        return None

    def refill_memory(self, model: M, feats: Features, masks: torch.Tensor, has_mask: torch.Tensor,
                      seed: int) -> int | None:
        """After :meth:`fit`: the model's normal-patch memory filled again from other views of its support frames
        (``train --scale-policy auto``: the views ``run`` scores at the checked policy, their ``masks``), the rest of
        the fit kept; returns the tokens kept per memory tap. None where the method keeps no such memory of its own
        fitting (the default)."""
        return None

    def without_memory(self, model: M) -> AbstractContextManager[None]:
        """Inside the block the model's maps leave its normal-patch memory out (``train``'s checks score frames
        whose clean patches that memory holds, and read only the maps there); nothing to leave out by default."""
        return nullcontext()

    def memory_in_maps(self, model: M) -> bool:
        """Whether :meth:`without_memory` would change the model's maps (its memory is filled and weighed in them):
        where not, ``train``'s grey-level memory step reads its held-out maps from maps scored with the memory in.
        By default, whether the method overrides :meth:`without_memory` at all (one that does and says no more is
        taken to need it)."""
        return type(self).without_memory is not Method.without_memory

    def skips_in_maps_only(self) -> bool:
        """Whether :meth:`score_maps` is the method's own (it may skip work): otherwise it is :meth:`score`, and a
        caller wanting some views' class scores scores every view in one pass."""
        return type(self).score_maps is not Method.score_maps


def register(cls: C) -> C:
    """Class decorator: register one instance of ``cls`` under ``cls.name``."""
    known = _METHODS.get(cls.name)
    if known is not None and type(known).__qualname__ != cls.__qualname__:
        raise ValueError(f"method {cls.name!r} is already registered ({type(known).__qualname__})")
    _METHODS[cls.name] = cls()
    return cls


def _registry() -> dict[str, Method[Any]]:
    """Every registered method: the built-ins (in ``BUILTIN`` order), then the others in registration order."""
    for module in BUILTIN:
        importlib.import_module(module)
    rank = {name: (BUILTIN.index(type(m).__module__) if type(m).__module__ in BUILTIN else len(BUILTIN), k)
            for k, (name, m) in enumerate(_METHODS.items())}
    return {name: _METHODS[name] for name in sorted(_METHODS, key=rank.__getitem__)}


def method_names() -> tuple[str, ...]:
    """The registered methods' names, built-ins first."""
    return tuple(_registry())


def get_method(name: str) -> Method[Any]:
    """The registered method ``name``. Raises :class:`ConfigError` (one line) for an unknown name."""
    methods = _registry()
    if name not in methods:
        raise ConfigError(f"--method must be one of {', '.join(methods)}, got {name!r}")
    return methods[name]


def new_model(spec: ModelSpec, clip: nn.Module, text: torch.Tensor) -> Scorer:
    """An untrained model of ``spec.method`` around ``clip`` with class embeddings ``text`` ``(C, E)``."""
    model = get_method(spec.method).build(spec, clip, text)
    model.method = spec.method
    return model


def score_features(model: Scorer, feats: Features, size: tuple[int, int], reference: ReferenceScorer | None = None,
                   ref_feats: Features | None = None, has_reference: torch.Tensor | None = None,
                   pixels: torch.Tensor | None = None, maps_only: bool = False) -> SemClipOutput:
    """Maps (model-input size), class probabilities and embeddings of precomputed features, with the
    reference map (token distances, and ``pixels``: ``model.reference.pixel_difference`` maps) fused in where
    given (``maps_only``: :meth:`Method.score_maps`)."""
    method = get_method(model.method)
    out = method.score_maps(model, feats, size) if maps_only else method.score(model, feats, size)
    if reference is None or ref_feats is None or has_reference is None or not bool(has_reference.any()):
        return out
    dist = reference.distance(feats.dual, feats.taps, ref_feats.dual, ref_feats.taps)
    return SemClipOutput(maps=reference.fuse(out.maps, dist, has_reference, pixels), class_probs=out.class_probs,
                         embeddings=out.embeddings)
