"""Whether ``train``'s support views fit in this machine's memory, before the fit starts.

``train`` holds every support row (views, their augmented copies, features and map parts) in memory at once; at a
fine scale policy a 1024 px frame is 26 views and 70 such frames do not fit 24 GB (README "Scale check"). Rather
than being killed by the kernel an hour in, ``train`` compares its estimate with the memory available now: a
policy the user gave is refused in one line naming the fixes; a policy taken from the weights' scale check gives
way to the next coarser one that fits, with a warning.
"""

from __future__ import annotations

from pathlib import Path

from semclip_batch.config import SCALE_CHECK_POLICIES, parse_scale_policy, scale_policy_name

# resident bytes a support row costs a semclip-tiny `transfer` fit (a view, its features and map parts; measured:
# 588 views of 70 `metal` frames at 0.75, 4 orientations each: 11.2 GB peak), and what the process holds besides.
# Wider backbones hold wider features: for them the estimate is a lower bound.
BYTES_PER_ROW = 4_800_000
BASE_BYTES = 1_000_000_000


def needed_bytes(rows: int) -> int:
    """The estimated peak of a fit on ``rows`` support rows (augmented copies counted)."""
    return BASE_BYTES + rows * BYTES_PER_ROW


def available_bytes(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """``MemAvailable`` of the kernel (bytes), or None where it cannot be read (not Linux)."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def coarser(policy: float | None) -> float | None:
    """The next coarser candidate of the scale check than ``policy`` (``whole`` stays ``whole``)."""
    names = [n for n in SCALE_CHECK_POLICIES if n != "whole"]
    finer = [n for n in names if (parse_scale_policy(n) or 0.0) < (policy or 0.0)]
    return parse_scale_policy(finer[-1]) if finer else None


def too_large(rows: int, policy: float | None, available: int | None) -> str | None:
    """Why ``rows`` support rows at ``policy`` would not fit (one line), or None when they would (or the memory
    cannot be read)."""
    need = needed_bytes(rows)
    if available is None or need <= available:
        return None
    return (f"{rows} support rows at --scale-policy {scale_policy_name(policy)} need ~{need / 1e9:.1f} GB, "
            f"{available / 1e9:.1f} GB are available")
