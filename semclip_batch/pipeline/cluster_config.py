"""Validate a Ray cluster-launcher config with Ray's own schema and defaults (as `ray up` does)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def validate_cluster_config(path: str | Path) -> dict[str, Any]:
    """Fill Ray's defaults and validate; raises ``ValueError`` naming the problem. Returns the filled config."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(Path(path).read_text())
    try:
        filled = prepare_config(config)
        validate_config(filled)
    except Exception as exc:  # noqa: BLE001 - jsonschema / Ray raise several types; one message for the user
        raise ValueError(f"{path}: {' '.join(str(exc).split())[:300]}") from None
    return filled
