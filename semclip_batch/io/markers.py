"""A shard's done marker (``OUT/_state/done/<lot>/<shard>.json``): the rule that says whether one counts as done,
shared by ``run``'s resume (:func:`~semclip_batch.pipeline.shards.done_shards`) and ``status``, so that what
``status`` reports done is what a rerun skips."""

from __future__ import annotations

import json


def marker_counts(data: object, lot: str, shard: str) -> dict[str, int] | None:
    """A marker's status counts, or None when it is missing, damaged or not this shard's (``status`` reads
    markers with this same rule, so it counts as done exactly what a rerun skips)."""
    if not isinstance(data, bytes):
        return None
    try:
        body = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(body, dict) or body.get("lot_id") != lot or body.get("shard") != shard:
        return None
    counts = body.get("counts")
    if (not isinstance(counts, dict) or not all(isinstance(v, int) for v in counts.values())
            or sum(counts.values()) != body.get("rows")):
        return None
    return {str(k): int(v) for k, v in counts.items()}
