"""``pretrain``'s refusals, each one line before or instead of writing weights that would be wrong: an ``--out``
that is one of its inputs, a manifest with nothing to learn from, and training that diverged (a loss or a weight
that is not finite). ``train``'s adaptation runs through them too."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from torch import nn

from semclip_batch.errors import ConfigError, SemclipError, shorten
from semclip_batch.io import storage, targets
from semclip_batch.io.manifest_files import read_table
from semclip_batch.methods.shipped import SHIPPED
from semclip_batch.methods.weights import RANDOM, first_non_finite

if TYPE_CHECKING:
    from semclip_batch.fewshot.pretrain import PretrainConfig


def refuse_out_over_inputs(cfg: PretrainConfig) -> None:
    """Refuse, in one line and before any work, an ``--out`` that is the manifest pretrain reads, the
    ``--pretrained`` weights it starts from or its ``--prompts`` file: writing the weights there would destroy it."""
    pretrained = None if cfg.model.pretrained in (RANDOM, SHIPPED) else cfg.model.pretrained
    targets.refuse_overwriting_inputs(cfg.out, {"manifest": cfg.manifest, "--pretrained weights file": pretrained,
                                                "--prompts file": cfg.model.prompts})


def refuse_nothing_to_learn(df: pd.DataFrame, manifest: str | None, classes: tuple[str, ...], caller: str,
                            storage_options: Mapping[str, Any]) -> None:
    """Refuse, in one line, frames with neither a ``label`` nor a ``caption`` in any row: every target of the loss
    comes from them (masks without a label mark no class: they train only ``normal``, the texts collapse), so
    the steps would learn nothing (loss 0) or worse and write the weights as if trained. ``manifest``: the file the
    rows come from, read again for its header to say whether ``label`` is there at all (None: rows given)."""
    if (df["label"] != "").any() or (df["caption"] != "").any():
        return
    source = "" if manifest is None else f" {storage.redact(manifest)}"
    raise ConfigError(f"{caller}: nothing to learn from manifest{source}: {_label_column_state(manifest, storage_options)} "
                      f"and no row has a `caption`; each frame's class comes from `label` (one of: {', '.join(classes)}), "
                      "or its text from `caption` (a mask alone names no class)")


def _label_column_state(manifest: str | None, storage_options: Mapping[str, Any]) -> str:
    """Whether the manifest's header has no ``label`` column (its columns named, a near miss such as ``lable``
    suggested) or only empty ones: the header is read again only here, on the way to the refusal."""
    try:
        names = [str(n) for n in read_table(manifest, storage_options).column_names] if manifest is not None else None
    except (SemclipError, OSError, ValueError):  # an image folder (--pattern) or unreadable header: no columns to name
        names = None
    if names is None:
        return "no row has a `label`"
    if "label" in names:
        return "every `label` is empty"
    near = difflib.get_close_matches("label", names, n=1)
    hint = f"; {near[0]!r} is not `label`" if near else ""
    return f"no `label` column was found (columns: {shorten(', '.join(names), 150)}{hint})"


def refuse_diverged_loss(loss: torch.Tensor, step: int, steps: int, lr: float, caller: str) -> None:
    """Stop, in one line naming the step, at a loss that is not finite: the step would make every weight NaN, and
    weights that diverged must never be written as if trained. One ``isfinite`` on the loss scalar a step."""
    if not bool(torch.isfinite(loss.detach())):
        raise ConfigError(f"{caller}: the loss is {float(loss.detach())} at step {step} of {steps}: training diverged "
                          f"(learning rate {lr:g} too high for these weights?); nothing was written")


def refuse_diverged_weights(clip: nn.Module, steps: int, lr: float, caller: str) -> None:
    """Stop, in one line, where a weight is not finite after the last step (a finite loss before a step that
    diverged): such weights score NaN everywhere and are never written."""
    bad = first_non_finite(clip.named_parameters())
    if bad is not None:
        raise ConfigError(f"{caller}: after step {steps} the weight {bad} is not finite: training diverged (learning "
                          f"rate {lr:g} too high for these weights?); nothing was written")
