"""Few-shot checkpoints: a folder (any fsspec URL) with ``model.safetensors`` (the trained tensors only)
and ``checkpoint.json`` (method, backbone and where its weights came from, classes, prompts, options, fusion,
thresholds, preprocessing, training summary). Loading never unpickles."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from semclip_batch.errors import WeightsError
from semclip_batch.io import storage
from semclip_batch.methods.weights import canonical_sha256

TENSORS = "model.safetensors"
META = "checkpoint.json"
BACKBONE_PREFIXES = ("visual.", "logit_scale")


@dataclass(frozen=True)
class Checkpoint:
    url: str
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    sha256: str

    @property
    def method(self) -> str:
        return str(self.meta["method"])


def trained_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Everything but the backbone (which the checkpoint records by source and checksum instead)."""
    return {k: v.detach().contiguous().cpu() for k, v in state.items() if not k.startswith(BACKBONE_PREFIXES)}


def save_checkpoint(url: str, state: Mapping[str, torch.Tensor], meta: Mapping[str, Any],
                    storage_options: Mapping[str, Any] | None = None) -> str:
    """Write the trained tensors and the JSON; returns the tensors' canonical sha256."""
    tensors = trained_state(state)
    digest = canonical_sha256(tensors)
    body = dict(meta, tensors_sha256=digest)
    storage.write_bytes(storage.join(url, TENSORS), save_safetensors(tensors, metadata={"sha256": digest}),
                        storage_options)
    storage.write_bytes(storage.join(url, META), json.dumps(body, indent=2).encode(), storage_options)
    return digest


def load_checkpoint(url: str, storage_options: Mapping[str, Any] | None = None) -> Checkpoint:
    """Read and verify a checkpoint folder. Raises :class:`WeightsError` with one line."""
    try:
        meta = json.loads(storage.read_bytes(storage.join(url, META), storage_options))
        blob = storage.read_bytes(storage.join(url, TENSORS), storage_options)
    except FileNotFoundError:
        raise WeightsError(f"--model {url!r} is not a checkpoint folder (needs {META} and {TENSORS})") from None
    except (OSError, ValueError) as exc:
        raise WeightsError(f"cannot read checkpoint {url!r}: {exc}") from None
    try:
        tensors = load_safetensors(blob)
    except Exception as exc:  # noqa: BLE001 - a corrupt file, whatever the parser says
        raise WeightsError(f"checkpoint {url!r}: unreadable {TENSORS}: {' '.join(str(exc).split())[:150]}") from None
    digest = canonical_sha256(tensors)
    if meta.get("tensors_sha256") != digest:
        raise WeightsError(f"checkpoint {url!r}: tensors checksum {digest[:12]} does not match its "
                           f"{META} ({str(meta.get('tensors_sha256'))[:12]})")
    return Checkpoint(url=url, meta=meta, tensors=tensors, sha256=digest)


def model_checksum(ckpt: Checkpoint) -> str:
    """The checksum a checkpoint run is identified by: its tensors plus its backbone weights."""
    return hashlib.sha256(f"{ckpt.sha256}:{ckpt.meta['weights']['sha256']}".encode()).hexdigest()
