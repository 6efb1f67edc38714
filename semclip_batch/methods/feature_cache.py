"""``--cache-dir``: frozen-backbone features of a set of views, stored once and reused.

The key is the content: the backbone weights' canonical sha256, the views' bytes, the preprocessing and what
was encoded (taps, V-V path, windows), so a hit can only be the same computation. Entries are safetensors
files written whole through storage (any fsspec URL); a damaged entry is recomputed, never trusted.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from semclip_batch.config import PreprocessConfig
from semclip_batch.io import storage
from semclip_batch.methods.features import Features
from semclip_batch.methods.weights import safetensors_metadata
from semclip_batch.model.encoder import EncoderOutput

log = logging.getLogger(__name__)
FORMAT = 1


def feature_key(weights_sha256: str, views: torch.Tensor, prep: PreprocessConfig, taps: tuple[int, ...],
                vv_from: int | None, windows: bool) -> str:
    """sha256 of everything the features depend on."""
    h = hashlib.sha256()
    spec = {"format": FORMAT, "weights": weights_sha256, "prep": prep.as_record(), "taps": list(taps),
            "vv_from": vv_from, "windows": windows, "shape": list(views.shape), "dtype": str(views.dtype)}
    h.update(json.dumps(spec, sort_keys=True).encode())
    h.update(views.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def _flatten(feats: Features) -> dict[str, torch.Tensor]:
    out = {"pooled": feats.dual.pooled}
    out.update({f"original.{k}": t for k, t in enumerate(feats.dual.original)})
    out.update({f"vv.{k}": t for k, t in enumerate(feats.dual.vv) if t is not None})
    out.update({f"windows.{k}": t for k, t in enumerate(feats.windows or [])})
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def _unflatten(tensors: Mapping[str, torch.Tensor], taps: tuple[int, ...], windows: bool) -> Features:
    n_windows = sum(1 for k in tensors if k.startswith("windows."))
    dual = EncoderOutput(pooled=tensors["pooled"], original=[tensors[f"original.{k}"] for k in range(len(taps))],
                         vv=[tensors.get(f"vv.{k}") for k in range(len(taps))])
    return Features(dual, taps, [tensors[f"windows.{k}"] for k in range(n_windows)] if windows else None)


def cached_features(cache_dir: str | None, key: str, compute: Callable[[], Features],
                    storage_options: Mapping[str, Any] | None = None) -> Features:
    """``compute()``'s features, read from ``cache_dir/features/<key>.safetensors`` when present (no cache
    without ``cache_dir``)."""
    if not cache_dir:
        return compute()
    url = storage.join(cache_dir, "features", f"{key}.safetensors")
    try:
        blob = storage.read_bytes(url, storage_options)
        tensors = load_safetensors(blob)
        meta = json.loads(safetensors_metadata(io.BytesIO(blob)).get("semclip", "{}"))
        log.info("features from cache %s", url)
        return _unflatten(tensors, tuple(meta["taps"]), bool(meta["windows"]))
    except FileNotFoundError:
        pass
    except Exception as exc:  # noqa: BLE001 - a damaged entry is recomputed and rewritten
        log.warning("feature cache entry %s is unreadable (%s); recomputing", url, type(exc).__name__)
    feats = compute()
    meta = {"semclip": json.dumps({"taps": list(feats.taps), "windows": feats.windows is not None})}
    storage.write_bytes(url, save_safetensors(_flatten(feats), metadata=meta), storage_options)
    return feats

