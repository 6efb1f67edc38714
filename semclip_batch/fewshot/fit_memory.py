"""Whether ``train``'s support views fit in this machine's memory, before the fit starts.

``train`` holds every support row (views, their augmented copies, features and map parts) in memory at once; at a
fine scale policy a 1024 px frame is 26 views and 70 such frames do not fit 24 GB (README "The scale check").
Rather than being killed by the kernel mid-fit, ``train`` compares its estimate with the memory available now and,
with a warning, drops the recipe's augmentation (a quarter of the rows) where that fits; else a policy taken from
the weights' scale check gives way to the next coarser one, and a policy the user gave is refused in one line.
"""

from __future__ import annotations

from pathlib import Path

from semclip_batch.config import SCALE_CHECK_POLICIES, parse_scale_policy, scale_policy_name

# resident bytes a support row costs a semclip-tiny `transfer` fit (a view, its features and map parts), and what
# the process holds besides. Measured at 0.75, 4 orientations a view: 588 views of 70 `metal` frames (400-900 px),
# 11.2 GB peak (4.3 MB a row); 678 views of 70 `logic` frames (512-1024 px), 16.6 GB (5.8 MB a row). Wider
# backbones hold wider features: for them the estimate is a lower bound.
BYTES_PER_ROW = 6_000_000
BASE_BYTES = 1_000_000_000


def needed_bytes(rows: int) -> int:
    """The estimated peak of a fit on ``rows`` support rows (augmented copies counted)."""
    return BASE_BYTES + rows * BYTES_PER_ROW


def available_bytes(meminfo: Path = Path("/proc/meminfo"), cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The kernel's ``MemAvailable`` (bytes), or what a container's cgroup v2 limit leaves if less; None where
    neither can be read (not Linux)."""
    free = None
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        free = None
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            left = int(limit) - int((cgroup / "memory.current").read_text().strip())
            free = left if free is None else min(free, left)
    except (OSError, ValueError):
        pass
    return free


def coarser(policy: float | None) -> float | None:
    """The next coarser candidate of the scale check than ``policy`` (``whole`` stays ``whole``)."""
    names = [n for n in SCALE_CHECK_POLICIES if n != "whole"]
    coarser_names = [n for n in names if (parse_scale_policy(n) or 0.0) < (policy or 0.0)]
    return parse_scale_policy(coarser_names[-1]) if coarser_names else None


def too_large(rows: int, policy: float | None, available: int | None) -> str | None:
    """Why ``rows`` support rows at ``policy`` would not fit (one line), or None when they would (or the memory
    cannot be read)."""
    need = needed_bytes(rows)
    if available is None or need <= available:
        return None
    return (f"{rows} support rows at --scale-policy {scale_policy_name(policy)} need ~{need / 1e9:.1f} GB, "
            f"{available / 1e9:.1f} GB are available")
