"""``OUT/masks.zarr`` (Zarr v3): opening the root group and finding a row's array of masks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import zarr

from semclip_batch.errors import OutputError
from semclip_batch.io import storage


def open_masks(url: str, storage_options: Mapping[str, Any] | None, mode: Literal["r", "r+", "a"] = "r+") -> zarr.Group:
    """The Zarr v3 root group of ``masks.zarr`` (local path or any fsspec URL)."""
    opts = storage.fs_kwargs(url, storage_options) if storage.has_protocol(url) else None
    return zarr.open_group(store=url, mode=mode, zarr_format=3, storage_options=opts)


def mask_array(root: zarr.Group, path: str) -> zarr.Array:
    """The array of masks at ``path`` (a predictions row's ``mask_path``) in the root group of ``masks.zarr``."""
    node = root[path]
    if not isinstance(node, zarr.Array):
        raise OutputError(f"masks.zarr/{path} is a group, not an array of masks")
    return node
