"""Shared fixtures: one small local Ray for the whole session, synthetic lots, the tiny backbone."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.pop("RAY_ADDRESS", None)  # tests start their own Ray; never join a stray head


SECRET_KEY = "semclipTestSecret0xDEADBEEF"
ACCESS_KEY = "semclipTestAccessKey42"
BUCKET = "fab-archive"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on 127.0.0.1; the code sees only the standard AWS_* variables, as with real S3.

    Started before Ray so every Ray worker inherits the same environment. botocore keeps its default retries
    (5 attempts), as users get them: the storage layer relies on them for every request it does not wrap in its
    own tries, and with ``AWS_MAX_ATTEMPTS=2`` a run under 10 % faults lost a shard to an unwrapped request.
    """
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                       "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1"})
    import boto3

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    yield endpoint
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint):
    """The one local Ray every pipeline test shares (the pipeline uses an initialised Ray as it is), with the
    worker settings of the private Ray a CLI run starts: idle workers (torch imported) are kept between runs, as
    they are between the stages of one run. With Ray's default (idle workers above one per CPU killed after 1 s)
    every run started its decode and write workers afresh, 3 s of imports each (a run of 80 frames: 16 s -> 11 s)."""
    import ray

    from semclip_batch.pipeline.ray_session import LOCAL_SYSTEM_CONFIG

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=300 * 1024 * 1024,
                 log_to_driver=False, configure_logging=False, _system_config=LOCAL_SYSTEM_CONFIG)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synth_lot(tmp_path_factory) -> Path:
    """A small synthetic data set: 2 lots x 7 classes x 1 image, mixed sizes, formats and bit depths."""
    from semclip_batch.synth.generate import SynthConfig, synth

    root = tmp_path_factory.mktemp("synth")
    synth(str(root), SynthConfig(seed=11, lots=2, per_class=1, sizes=((256, 256), (200, 312), (96, 128))))
    return root


@pytest.fixture(scope="session")
def tiny_clip():
    from semclip_batch.methods.weights import load_backbone

    return load_backbone("semclip-tiny", "none", seed=0)


@pytest.fixture
def faulty_s3(s3_endpoint):
    """A :class:`faultproxy.FaultProxy` in front of the session's moto: ``(proxy, proxy_url)``.

    Faults on 10 % of GET, PUT and POST requests by default (seed 0); a test may change ``proxy.p_by_method``,
    ``proxy.kinds`` and ``proxy.fail_paths``. Code reaches it through the flat storage option
    ``{"endpoint_url": proxy_url}``; no environment variable changes.
    """
    from faultproxy import FaultProxy

    with FaultProxy(s3_endpoint, p_fail=0.1, seed=0) as proxy:
        yield proxy, proxy.url
