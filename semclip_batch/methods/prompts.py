"""The editable prompt file: templates x states per class (SEMCLIP.md). ``normal`` is always class 0."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
import torch
from torch import nn

from semclip_batch.config import NORMAL
from semclip_batch.errors import ConfigError
from semclip_batch.io import storage
from semclip_batch.methods.weights import LoadedBackbone, open_clip_module
from semclip_batch.model.text import class_embeddings
from semclip_batch.model.vit import VisionBackbone


@dataclass(frozen=True)
class PromptSet:
    """Class names (normal first) and each class's composite prompts."""

    classes: tuple[str, ...]
    prompts: tuple[tuple[str, ...], ...]

    def as_record(self) -> dict[str, list[str]]:
        return {c: list(p) for c, p in zip(self.classes, self.prompts, strict=False)}


def default_prompt_text() -> str:
    return resources.files("semclip_batch").joinpath("data/prompts.json").read_text(encoding="utf-8")


def load_prompts(url: str | None = None, storage_options: Mapping[str, Any] | None = None) -> PromptSet:
    """Read and validate a prompt file (the packaged SEM vocabulary when ``url`` is None)."""
    try:
        text = default_prompt_text() if url is None else storage.read_bytes(url, storage_options).decode("utf-8")
        data = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read prompt file {url!r}: {exc}") from exc
    return parse_prompts(data, url or "packaged prompts")


def parse_prompts(data: Any, name: str) -> PromptSet:
    if not isinstance(data, dict) or not isinstance(data.get("classes"), dict):
        raise ConfigError(f"prompt file {name}: needs an object with 'templates' and 'classes'")
    templates = data.get("templates") or ["{state}"]
    if not all(isinstance(t, str) and "{state}" in t for t in templates):
        raise ConfigError(f"prompt file {name}: every template must be a string containing {{state}}")
    classes = data["classes"]
    if NORMAL not in classes:
        raise ConfigError(f"prompt file {name}: class 'normal' is required")
    if len(classes) < 2:
        raise ConfigError(f"prompt file {name}: needs 'normal' and at least one defect class")
    order = [NORMAL] + [c for c in classes if c != NORMAL]
    prompts = []
    for cls in order:
        states = classes[cls]
        if not isinstance(states, list) or not states or not all(isinstance(s, str) and s for s in states):
            raise ConfigError(f"prompt file {name}: class {cls!r} needs a non-empty list of state strings")
        prompts.append(tuple(t.format(state=s) for t in templates for s in states))
    return PromptSet(classes=tuple(order), prompts=tuple(prompts))


def text_embeddings(backbone: LoadedBackbone, prompts: PromptSet) -> np.ndarray:
    """``(C, E)`` class embeddings from the backbone's own text tower (a whole model's: the vision tower alone,
    :class:`~semclip_batch.model.vit.VisionBackbone`, has none and is refused)."""
    if isinstance(backbone.clip, VisionBackbone):
        raise TypeError(f"backbone {backbone.name} was built as its vision tower alone (load_backbone's vision_only): "
                        "it has no text tower to embed the class prompts")
    return clip_text_embeddings(backbone.clip, backbone.name, prompts).numpy()


def clip_text_embeddings(clip: nn.Module, name: str, prompts: PromptSet) -> torch.Tensor:
    """:func:`text_embeddings` of a CLIP model ``clip`` of backbone ``name`` (weights in memory, e.g. mid-training)."""
    tokenizer = open_clip_module().get_tokenizer(name)
    with torch.no_grad():
        return class_embeddings(clip, [tokenizer(list(p)) for p in prompts.prompts])
