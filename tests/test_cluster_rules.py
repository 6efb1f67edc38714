"""Rules that keep the pipeline safe on any cluster: CPU sizing on 2 cores, shared OUT on multi-node."""

from __future__ import annotations

import pytest

from semclip_batch.config import ModelSpec, RunConfig
from semclip_batch.errors import ConfigError, OutputError
from semclip_batch.pipeline.driver import actor_resources
from semclip_batch.pipeline.identity import compute_run_id
from semclip_batch.pipeline.ray_session import ClusterShape, check_accelerators, check_output_reachable


def cfg(**kw) -> RunConfig:
    return RunConfig(input="m.csv", out="out", model=ModelSpec(backbone="semclip-tiny"), **kw)


@pytest.mark.parametrize(("actors", "node"), [(1, 2.0), (2, 2.0), (4, 2.0), (8, 2.0), (16, 2.0), (1, 1.0), (3, 1.0)])
def test_cpu_actors_leave_room_for_decode_and_write_on_one_or_two_cores(actors, node):
    """``--actors 8`` on 2 cores asked for 0.25 CPU each, every core: decode never started and the run waited
    forever without a word."""
    cpus, threads = actor_resources(cfg(actors=actors), ClusterShape(cpus=node, gpus=0.0, nodes=1))
    assert 0 < cpus <= 1.0 and actors * cpus + 0.5 + 0.25 <= node + 1e-9
    assert threads >= 1


@pytest.mark.parametrize("gpus", [float("nan"), float("inf"), -1.0])
def test_num_gpus_must_be_a_finite_number(gpus):
    with pytest.raises(ConfigError, match="--num-gpus must be a finite number >= 0"):
        cfg(num_gpus=gpus)


def test_gpu_actors_a_private_ray_lacks_are_refused_and_an_attached_cluster_waits(caplog):
    """A local Ray never grows: actors asking for GPUs it lacks would wait forever without a word."""
    check_accelerators(0.0, 8, ClusterShape(cpus=2.0, gpus=0.0, nodes=1, private=True))
    check_accelerators(0.5, 2, ClusterShape(cpus=2.0, gpus=1.0, nodes=1, private=True))
    check_accelerators(2.0, 2, ClusterShape(cpus=8.0, gpus=4.0, nodes=1, private=True))
    for gpus, actors, has, hold in ((0.5, 1, 0.0, 0), (1.0, 4, 2.0, 2), (0.6, 3, 2.0, 2), (2.0, 3, 4.0, 2)):
        with pytest.raises(ConfigError, match=rf"the Ray cluster's {has:g} GPU\(s\) hold {hold} such actor"):
            check_accelerators(gpus, actors, ClusterShape(cpus=2.0, gpus=has, nodes=1, private=True))
    with caplog.at_level("WARNING"):
        check_accelerators(1.0, 4, ClusterShape(cpus=32.0, gpus=2.0, nodes=3))
    assert "the run waits until they are added" in caplog.text


def test_gpu_actor_takes_one_cpu():
    cpus, threads = actor_resources(cfg(num_gpus=1.0, actors=4), ClusterShape(cpus=32.0, gpus=4.0, nodes=5))
    assert cpus == 1.0 and threads >= 1


def test_local_out_refused_on_multi_node_cluster():
    check_output_reachable("/tmp/out", ClusterShape(cpus=8, gpus=0, nodes=1))
    check_output_reachable("s3://bucket/out", ClusterShape(cpus=8, gpus=1, nodes=3))
    with pytest.raises(OutputError, match="3 nodes"):
        check_output_reachable("/tmp/out", ClusterShape(cpus=8, gpus=1, nodes=3))


def test_run_id_depends_on_output_affecting_config_only():
    base = compute_run_id("m", {"thresholds": {"image": 0.95}}, "w")
    assert base == compute_run_id("m", {"thresholds": {"image": 0.95}}, "w")
    assert base != compute_run_id("m", {"thresholds": {"image": 0.9}}, "w")
    assert base != compute_run_id("m2", {"thresholds": {"image": 0.95}}, "w")
    assert base != compute_run_id("m", {"thresholds": {"image": 0.95}}, "w2")


def test_run_id_ignores_how_wide_and_where_a_run_goes():
    import dataclasses

    import numpy as np

    from semclip_batch.config import Thresholds
    from semclip_batch.methods.prompts import PromptSet
    from semclip_batch.methods.weights import preprocess_config
    from semclip_batch.pipeline.identity import ModelIdentity, output_config

    ident = ModelIdentity(model_id="m", sha256="s", weights_sha256="w", text=np.zeros((2, 4), np.float32),
                          prompts=PromptSet(classes=("normal", "particle"), prompts=(("a",), ("b",))), mode="zero-shot")
    prep = preprocess_config("semclip-tiny", tile_above=1024)
    base = RunConfig(input="m.csv", out="out", model=ModelSpec(backbone="semclip-tiny", pretrained="none"))
    wide = dataclasses.replace(base, batch_size=64, actors=8, num_gpus=1.0, address="ray://head:10001",
                               shard_size=1024, out="s3://b/out", overwrite=True)
    def config_of(cfg: RunConfig) -> dict:
        assert isinstance(cfg.model, ModelSpec)
        return output_config(cfg.model, cfg.thresholds, prep, ident)

    assert config_of(base) == config_of(wide)
    assert config_of(base) != config_of(dataclasses.replace(base, thresholds=Thresholds(image=0.5)))
    assert config_of(base) != config_of(dataclasses.replace(base, model=dataclasses.replace(base.model, precision="bf16")))
