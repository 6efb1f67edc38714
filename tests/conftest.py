"""Shared fixtures: one small local Ray for the whole session, synthetic lots, the tiny backbone."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def ray_cluster():
    """The one local Ray every pipeline test shares (the pipeline uses an initialised Ray as it is)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=300 * 1024 * 1024,
                 log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synth_lot(tmp_path_factory) -> Path:
    """A small synthetic data set: 2 lots x 7 classes x 1 image, mixed sizes, formats and bit depths."""
    from semclip_batch.synth import SynthConfig, synth

    root = tmp_path_factory.mktemp("synth")
    synth(str(root), SynthConfig(seed=11, lots=2, per_class=1, sizes=((256, 256), (200, 312), (96, 128))))
    return root


@pytest.fixture(scope="session")
def tiny_clip():
    from semclip_batch.weights import load_backbone

    return load_backbone("semclip-tiny", "none", seed=0)
