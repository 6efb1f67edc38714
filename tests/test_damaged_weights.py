"""Weights and checkpoints damaged or misused, as a tester made them: refused in one line before any work, never
written over, never scored into rows (each case was an exit 0 or a failure after the work before)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

from semclip_batch.cli import main
from semclip_batch.config import SIGMA_MAX, ModelSpec
from semclip_batch.errors import ConfigError, WeightsError
from semclip_batch.methods.checkpoint import META, TENSORS, load_checkpoint
from semclip_batch.methods.shipped import shipped_path
from semclip_batch.methods.weights import load_backbone

TINY = ("--backbone", "semclip-tiny")


def _shipped_copy(tmp_path: Path, name: str, change=None) -> Path:
    """The shipped weights written again under ``name`` as ``pretrain`` writes weights (their metadata recording
    their tensors' checksum), then ``change`` applied to the tensors."""
    with safe_open(shipped_path("semclip-tiny"), "pt") as f:
        state, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    meta["sha256"] = load_backbone("semclip-tiny", "shipped").sha256
    if change is not None:
        change(state)
    path = tmp_path / name
    save_file(state, str(path), metadata=meta)
    return path


def test_weights_holding_nan_are_refused_before_any_work(tmp_path):
    """A run scored every frame with them, then failed each shard in its writer."""
    path = _shipped_copy(tmp_path, "nan.safetensors", lambda s: s["positional_embedding"].fill_(float("nan")))
    with pytest.raises(WeightsError, match="tensor positional_embedding holds NaN or inf values"):
        load_backbone("semclip-tiny", str(path))


def test_a_pretrain_output_changed_after_it_was_written_is_refused(tmp_path):
    """Its metadata records its tensors' checksum; a flipped value no longer matches it and loaded silently."""
    assert load_backbone("semclip-tiny", str(_shipped_copy(tmp_path, "same.safetensors"))).sha256
    path = _shipped_copy(tmp_path, "flip.safetensors", lambda s: s["logit_scale"].add_(1.0))
    with pytest.raises(WeightsError, match="do not match the checksum they record"):
        load_backbone("semclip-tiny", str(path))


def test_weights_from_a_model_hub_are_refused_without_a_connection():
    with pytest.raises(WeightsError, match="a model hub is never read at run time"):
        load_backbone("semclip-tiny", "hf://laion/CLIP/open_clip_model.safetensors")


@pytest.mark.parametrize("sigma", [float("nan"), float("inf"), -1.0, SIGMA_MAX + 1, 1e6])
def test_sigma_outside_the_view_is_refused(sigma):
    """``train --sigma 100`` failed in torch's padding after the fit; a checkpoint's 1e6 made every row a
    model_error."""
    with pytest.raises(ConfigError, match=r"sigma .* must be a number in \[0, 32\] px"):
        ModelSpec(backbone="semclip-tiny", sigma=sigma)


@pytest.fixture(scope="module")
def trained(synth_lot, tmp_path_factory) -> Path:
    ck = tmp_path_factory.mktemp("ck") / "ck"
    result = CliRunner().invoke(main, ["train", str(synth_lot / "manifest.csv"), "--out", str(ck), *TINY,
                                       "--pretrained", "shipped", "--adapt-steps", "0", "--epochs", "1"])
    assert result.exit_code == 0, result.output
    return ck


def test_a_checkpoint_naming_a_class_twice_is_refused(trained, tmp_path):
    """Its rows counted that class twice in every statistic."""
    ck = tmp_path / "ck"
    shutil.copytree(trained, ck)
    body = json.loads((ck / META).read_text())
    body["classes"][1] = body["classes"][0]
    (ck / META).write_text(json.dumps(body))
    with pytest.raises(WeightsError, match=f"names class '{body['classes'][0]}' twice"):
        load_checkpoint(str(ck))


def test_train_never_writes_over_the_weights_it_reads(synth_lot, tmp_path):
    """``--pretrained OUT/model.safetensors``: the fit's tensors replaced the weights (exit 0, a broken checkpoint)."""
    ck = tmp_path / "ck"
    ck.mkdir()
    weights = _shipped_copy(ck, TENSORS)
    before = weights.read_bytes()
    result = CliRunner().invoke(main, ["train", str(synth_lot / "manifest.csv"), "--out", str(ck), *TINY,
                                       "--pretrained", str(weights), "--adapt-steps", "0", "--epochs", "1"])
    assert result.exit_code != 0 and "is the --pretrained weights this command reads" in result.output, result.output
    assert "epoch" not in result.output and weights.read_bytes() == before and not (ck / META).exists()


def test_a_fit_that_diverges_writes_nothing(synth_lot, tmp_path):
    """``--lr 1e30``: the loss went NaN and the checkpoint was written with NaN tensors and thresholds, exit 0."""
    ck = tmp_path / "ck"
    result = CliRunner().invoke(main, ["train", str(synth_lot / "manifest.csv"), "--out", str(ck), *TINY,
                                       "--pretrained", "shipped", "--adapt-steps", "0", "--epochs", "2", "--lr=1e30"])
    assert result.exit_code != 0 and "is not finite: the fit diverged" in result.output, result.output
    assert "Traceback" not in result.output and not (ck / META).exists() and not (ck / TENSORS).exists()
