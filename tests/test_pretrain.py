"""``pretrain``'s refusals: options that must be finite, training that diverges, an ``--out`` that is one of its
inputs, and manifests it can learn nothing from. Each ends in one line, exit != 0, and writes nothing."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner, Result
from torch import nn

from semclip_batch.cli import main
from semclip_batch.errors import ConfigError
from semclip_batch.fewshot.pretrain_checks import refuse_diverged_weights
from semclip_batch.io.targets import same_file

FAST = ("--backbone", "semclip-tiny", "--pretrained", "none", "--no-scale-check", "--steps", "2", "--batch-size", "2",
        "--heldout", "0", "--crops", "0")


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def assert_one_line_error(result: Result, fragment: str) -> None:
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("Error")]
    assert len(lines) == 1 and fragment in lines[0], result.output


def absolute_manifest(synth_lot: Path, folder: Path, name: str, edit=None) -> Path:
    """The synthetic lot's manifest with absolute URIs (so it can live in ``folder``), edited by ``edit``."""
    df = pd.read_csv(synth_lot / "manifest.csv", dtype=str, keep_default_na=False)
    for col in ("uri", "mask_uri", "reference_uri"):
        if col in df:
            df[col] = [f"{synth_lot}/{u}" if u else "" for u in df[col]]
    df = edit(df) if edit is not None else df
    path = folder / name
    df.to_csv(path, index=False)
    return path


@pytest.mark.parametrize(("option", "value", "fragment"), [
    ("--lr", "inf", "--lr must be a finite number > 0, got inf"),
    ("--lr", "nan", "--lr must be a finite number > 0, got nan"),
    ("--text-separation", "inf", "--text-separation must be a finite number >= 0"),
    ("--text-separation", "nan", "--text-separation must be a finite number >= 0"),
    ("--max-minutes", "inf", "--max-minutes"),
    ("--keep-tokens", "nan", "--keep-tokens"),
    ("--heldout", "nan", "--heldout"),
])
def test_non_finite_float_options_are_refused_up_front(synth_lot, tmp_path, option, value, fragment):
    out = tmp_path / "w.safetensors"
    result = invoke("pretrain", str(synth_lot / "manifest.csv"), "--out", str(out), *FAST, option, value)
    assert_one_line_error(result, fragment)
    assert not out.exists()


def test_a_diverging_loss_stops_pretrain_naming_the_step(synth_lot, tmp_path):
    """A rate so high the weights turn NaN: the first non-finite loss ends it in one line; nothing is written
    (before: exit 0 and a weights file of NaN)."""
    out = tmp_path / "w.safetensors"
    result = invoke("pretrain", str(synth_lot / "manifest.csv"), "--out", str(out), *FAST, "--lr", "1e30")
    assert_one_line_error(result, "the loss is nan at step ")
    assert "training diverged" in result.output and not out.exists()


def test_weights_that_diverged_on_the_last_step_are_refused():
    net = nn.Linear(2, 2)
    refuse_diverged_weights(net, 3, 1e-3, "pretrain")  # finite: passes
    with torch.no_grad():
        net.bias[0] = float("inf")
    with pytest.raises(ConfigError, match=r"^pretrain: after step 3 the weight bias is not finite"):
        refuse_diverged_weights(net, 3, 1e-3, "pretrain")


def test_out_that_is_the_manifest_or_the_pretrained_weights_is_refused(synth_lot, tmp_path, monkeypatch):
    manifest = absolute_manifest(synth_lot, tmp_path, "pt_two.csv")
    before = manifest.read_bytes()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "link.csv").symlink_to(manifest)
    for out in (str(manifest), "pt_two.csv", "./sub/../pt_two.csv", "link.csv", f"file://{manifest}"):
        result = invoke("pretrain", "pt_two.csv", "--out", out, *FAST)
        assert_one_line_error(result, "is the manifest this command reads")
    assert manifest.read_bytes() == before
    weights = tmp_path / "start.safetensors"
    weights.write_bytes(b"not read: refused first")
    args = ("--backbone", "semclip-tiny", "--pretrained", str(weights), "--no-scale-check", "--steps", "2")
    result = invoke("pretrain", str(manifest), "--out", "start.safetensors", *args)
    assert_one_line_error(result, "is the --pretrained weights file this command reads")
    assert weights.read_bytes() == b"not read: refused first"


def test_same_file_compares_urls_as_keys_and_paths_as_files(tmp_path):
    assert same_file("s3://b/a/w.safetensors", "S3://b/a/w.safetensors")
    assert not same_file("s3://b/x/../a/w.safetensors", "s3://b/a/w.safetensors")  # keys are literal
    assert not same_file("s3://b/a/w.safetensors", "gs://b/a/w.safetensors")
    assert not same_file("s3://b/a/w.safetensors", "s3://b/a/m.csv")
    assert same_file(f"file://{tmp_path}/m.csv", str(tmp_path / "x" / ".." / "m.csv"))
    assert not same_file(f"file://{tmp_path}/m.csv", f"s3:/{tmp_path}/m.csv")


@pytest.mark.parametrize(("edit", "fragment"), [
    (lambda df: df.drop(columns=["label", "mask_uri"]), "no `label` column was found"),
    (lambda df: df.rename(columns={"label": "lable"}), "'lable' is not `label`"),
    (lambda df: df.assign(label=""), "every `label` is empty"),
])
def test_a_manifest_with_nothing_to_learn_is_refused(synth_lot, tmp_path, edit, fragment):
    """No label (no column, a misspelled one, all empty) and no caption: before, every step's loss was 0 (or,
    with masks, only `normal` trained) and the weights were written, exit 0; `train` refuses the same."""
    manifest = absolute_manifest(synth_lot, tmp_path, "bare.csv", edit)
    out = tmp_path / "w.safetensors"
    result = invoke("pretrain", str(manifest), "--out", str(out), *FAST)
    assert_one_line_error(result, fragment)
    assert "nothing to learn" in result.output and not out.exists()


def test_captions_alone_still_pretrain(synth_lot, tmp_path):
    """CLIP's loss against a `caption` column needs no label: such a manifest still trains."""
    captions = ["a clean wafer pattern", "a bridge between lines", "a scratch across the die", "a particle"]
    manifest = absolute_manifest(synth_lot, tmp_path, "captions.csv", lambda df: df.assign(
        label="", mask_uri="", caption=[captions[i % len(captions)] for i in range(len(df))]))
    out = tmp_path / "w.safetensors"
    result = invoke("pretrain", str(manifest), "--out", str(out), *FAST)
    assert result.exit_code == 0, result.output
    assert out.exists()
