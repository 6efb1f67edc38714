"""Object storage end to end against moto's S3 server: manifest, images and OUT all on s3://."""

from __future__ import annotations

import json

import boto3
import numpy as np
import pandas as pd
import pytest
import zarr
from click.testing import CliRunner
from conftest import ACCESS_KEY, BUCKET, SECRET_KEY

from semclip_batch.analysis.aggregate import aggregate
from semclip_batch.analysis.query import run_query
from semclip_batch.analysis.results import read_predictions
from semclip_batch.cli import main
from semclip_batch.config import SCALE_CHECK_POLICIES
from semclip_batch.errors import ConfigError, ManifestError, OutputError
from semclip_batch.fewshot.adapt import ADAPTED_BACKBONE, ADAPTED_SOURCE
from semclip_batch.fewshot.scale_check import FITTED
from semclip_batch.io import storage, targets
from semclip_batch.io.cell_reference import cell_reference
from semclip_batch.io.frames import load_frame
from semclip_batch.io.manifest import read_manifest
from semclip_batch.methods.checkpoint import load_checkpoint
from semclip_batch.methods.fitting import validation_count
from semclip_batch.synth.generate import SynthConfig, synth

pytestmark = [pytest.mark.s3, pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def s3_run(ray_cluster, s3_endpoint):
    data, out = f"s3://{BUCKET}/archive/data", f"s3://{BUCKET}/results/run1"
    synth(data, SynthConfig(seed=23, lots=2, per_class=1, sizes=((256, 256), (200, 312))))
    s3 = boto3.client("s3")
    s3.put_object(Bucket=BUCKET, Key="archive/data/images/broken.png", Body=b"not a png")
    m = pd.read_csv(f"{data}/manifest.csv", dtype=str, keep_default_na=False)
    extra = pd.DataFrame([{"uri": "images/broken.png", "lot_id": m["lot_id"].iloc[0], "wafer_id": "W01"},
                          {"uri": "images/missing.png", "lot_id": m["lot_id"].iloc[0], "wafer_id": "W01"}])
    pd.concat([m, extra]).fillna("").to_csv(f"{data}/manifest_broken.csv", index=False)
    result = CliRunner().invoke(main, ["run", f"{data}/manifest_broken.csv", "--out", out, "--backbone", "semclip-tiny",
                                       "--pretrained", "none", "--shard-size", "5"])
    assert result.exit_code == 0, result.output
    return data, out, len(m) + 2, result.output


def test_an_output_of_the_wrong_kind_is_refused_on_s3(s3_endpoint):
    boto3.client("s3").put_object(Bucket=BUCKET, Key="kinds/a-file", Body=b"x")
    boto3.client("s3").put_object(Bucket=BUCKET, Key="kinds/a-folder/inside.txt", Body=b"x")
    with pytest.raises(OutputError, match="is a file"):
        targets.check_target(f"s3://{BUCKET}/kinds/a-file", "folder", "--out")
    with pytest.raises(OutputError, match="is a folder"):
        targets.check_target(f"s3://{BUCKET}/kinds/a-folder", "file", "--out")
    targets.check_target(f"s3://{BUCKET}/kinds/a-folder", "folder", "--out")  # a run's root written before
    targets.check_target(f"s3://{BUCKET}/kinds/new.safetensors", "file", "--out")


def test_an_output_in_a_bucket_that_does_not_exist_is_refused_before_any_work(s3_endpoint, synth_lot):
    """It failed after the work (a `train`'s fit, a `run`'s Ray start) with a message that named no URL."""
    targets.check_target(f"s3://{BUCKET}/fresh/ck", "folder", "--out")  # the bucket exists: nothing to say
    m = str(synth_lot / "manifest.csv")
    tiny = ("--backbone", "semclip-tiny", "--pretrained", "shipped")
    for args in (("train", m, "--out", "s3://no-such-bucket-x/ck", "--epochs", "1", "--adapt-steps", "0", *tiny),
                 ("run", m, "--out", "s3://no-such-bucket-x/out", *tiny),
                 ("manifest", "from-prefix", str(synth_lot / "images"), "--out", "s3://no-such-bucket-x/m.csv")):
        result = CliRunner().invoke(main, list(args))
        assert result.exit_code != 0 and "Traceback" not in result.output, result.output
        lines = result.output.strip().splitlines()
        assert lines == [lines[-1]] and "s3://no-such-bucket-x/" in lines[-1], result.output
        assert "bucket 'no-such-bucket-x' does not exist" in lines[-1] and "epoch" not in result.output


def test_a_uri_ending_in_a_slash_or_naming_a_prefix_is_a_folder(s3_endpoint, synth_lot):
    """``s3://b/folder/`` read the object ``folder`` (the store strips the slash) and scored it ``ok``; a prefix
    read as "not found"."""
    from semclip_batch.errors import ImageError

    png = next((synth_lot / "images").rglob("*.png")).read_bytes()
    s3 = boto3.client("s3")
    for key in ("odd/folder", "odd/folder/x.png", "odd/prefix/y.png"):
        s3.put_object(Bucket=BUCKET, Key=key, Body=png)
    assert load_frame(f"s3://{BUCKET}/odd/folder").ndim == 2
    for url in (f"s3://{BUCKET}/odd/folder/", f"s3://{BUCKET}/odd/prefix", str(synth_lot / "images") + "/"):
        with pytest.raises(ImageError, match="is a folder, not a file"):
            load_frame(url)
    with pytest.raises(ImageError, match="not found"):
        load_frame(f"s3://{BUCKET}/odd/nothing.png")


def test_credentials_in_a_storage_option_url_are_refused_unseen():
    with pytest.raises(ConfigError) as refused:
        storage.check_storage_options({"endpoint_url": "http://AKIDX:SuperSecret123@127.0.0.1:9"})
    assert "credentials inside a URL are refused" in str(refused.value) and "SuperSecret123" not in str(refused.value)


def test_debug_logging_keeps_the_session_token_off_the_terminal(s3_run):
    """botocore's debug lines print each request's headers, the session token among them."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    _, out, _, _ = s3_run
    env = {**os.environ, "AWS_SESSION_TOKEN": "ZZTOKENZZ"}
    cli = str(Path(sys.executable).parent / "semclip-batch")  # the console script beside this interpreter
    done = subprocess.run([cli, "-vv", "query", out,
                           "select count(*) as n from predictions"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ZZTOKENZZ" not in done.stdout + done.stderr
    assert "DEBUG" in done.stderr  # -vv still logs the package's own debug lines


@pytest.mark.timeout(90)
def test_an_endpoint_that_never_answers_fails_a_read_instead_of_hanging(monkeypatch):
    """It accepts connections and never answers: with botocore's 60 s timeouts and s3fs's 5 tries one read took
    ~7 minutes. Here with 1 s timeouts (the shipped 10 s: ~1 minute), the read ends as an ``OSError``."""
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    monkeypatch.setattr(storage, "S3_TIMEOUTS", {"connect_timeout": 1, "read_timeout": 1})
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    fs = storage.filesystem(f"s3://{BUCKET}/never.png", {"endpoint_url": url})[0]
    assert fs.retries == storage.S3FS_TRIES and fs.config_kwargs == {"connect_timeout": 1, "read_timeout": 1}
    try:
        with pytest.raises(OSError):
            storage.read_bytes(f"s3://{BUCKET}/never.png", {"endpoint_url": url})
    finally:
        listener.close()
        for conn in held:
            conn.close()


def test_rows_and_masks_on_s3(s3_run):
    _, out, n_rows, _ = s3_run
    df = read_predictions(out).to_pandas()
    assert len(df) == n_rows and df["image_id"].is_unique
    assert sorted(df.loc[df.status != "ok", "status"]) == ["decode_error", "read_error"]
    root = zarr.open_group(f"{out}/masks.zarr", mode="r", storage_options={})
    for row in df[df.status == "ok"].itertuples():
        mask = root[row.mask_path][int(row.mask_index)]
        assert mask.dtype == np.uint8 and mask.shape in ((256, 256), (200, 312))


def test_rerun_on_s3_does_no_model_work(s3_run):
    data, out, _, _ = s3_run
    result = CliRunner().invoke(main, ["run", f"{data}/manifest_broken.csv", "--out", out, "--backbone", "semclip-tiny",
                                       "--pretrained", "none"])
    assert result.exit_code == 0, result.output
    assert "sent to model 0" in result.output


def test_aggregate_and_query_on_s3(s3_run):
    _, out, n_rows, _ = s3_run
    stats = aggregate(out)
    counts = run_query(out, "select lot_id, count(*) as n from predictions group by 1 order by 1")
    assert counts["n"].sum() == n_rows and pd.api.types.is_string_dtype(counts["lot_id"])
    lot_rows = run_query(out, "select lot_id, wafer_id, class, count from lot_stats where class != 'normal' and count > 0 "
                              "order by all")
    flagged = run_query(out, "select lot_id, wafer_id, defect_class as class, count(*) as count from predictions "
                             "where status = 'ok' and is_defect group by all order by all")
    pd.testing.assert_frame_equal(lot_rows.reset_index(drop=True), flagged.reset_index(drop=True), check_dtype=False)
    assert len(stats) == len(run_query(out, "select * from lot_stats"))


def test_folder_manifest_on_s3(s3_run):
    data, _, _, _ = s3_run
    df = read_manifest(f"{data}/reference", pattern="{lot_id}/{wafer_id}/{name}.{ext}")
    assert df["url"].str.startswith(f"{data}/reference/").all()
    assert set(df["lot_id"]) == {"LOT-S23-00", "LOT-S23-01"}
    with pytest.raises(ManifestError, match=r"1 file\(s\) .* e\.g\. 'broken.png'"):
        read_manifest(f"{data}/images", pattern="{lot_id}/{wafer_id}/{name}.{ext}")


def test_secrets_never_written(s3_run):
    _, _, _, output = s3_run
    assert SECRET_KEY not in output and ACCESS_KEY not in output
    s3 = boto3.client("s3")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="results/")["Contents"]]
    assert any(k.endswith(".json") for k in keys)
    for key in keys:
        body = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        assert SECRET_KEY.encode() not in body and ACCESS_KEY.encode() not in body, key
    record_key = next(k for k in keys if "/runs/" in k)
    record = json.loads(s3.get_object(Bucket=BUCKET, Key=record_key)["Body"].read())
    assert record["status"] == "complete"


def test_pretrain_train_run_eval_all_on_s3(s3_run):
    data, _, _, _ = s3_run
    models, out = f"s3://{BUCKET}/models", f"s3://{BUCKET}/results/fewshot"
    runner = CliRunner()
    steps = runner.invoke(main, ["pretrain", f"{data}/manifest.csv", "--out", f"{models}/tiny.safetensors",
                                 "--backbone", "semclip-tiny", "--steps", "2", "--batch-size", "4"])
    assert steps.exit_code == 0, steps.output
    digest = steps.output.strip().splitlines()[-1]
    assert len(digest) == 64
    trained = runner.invoke(main, ["train", f"{data}/manifest.csv", "--out", f"{models}/ckpt", "--backbone", "semclip-tiny",
                                   "--pretrained", f"{models}/tiny.safetensors", "--pretrained-sha256", digest,
                                   "--epochs", "2", "--adapt-steps", "3", "--scale-policy", "auto"])
    assert trained.exit_code == 0, trained.output
    # the adapted backbone went into the checkpoint folder on S3, and run reads it from there
    meta = load_checkpoint(f"{models}/ckpt").meta
    assert meta.weights.source == ADAPTED_SOURCE
    # auto: the maps' policy checked by the fitted model on the support frames the fit held out, read from S3
    check = meta.training["scale_check"]
    assert check["scored_by"] == FITTED and check["frames"] == validation_count(14) > 0
    assert set(check["figures"]) == set(SCALE_CHECK_POLICIES) and "scale check (" in trained.output
    assert storage.exists(f"{models}/ckpt/{ADAPTED_BACKBONE}")
    ran = runner.invoke(main, ["run", f"{data}/manifest.csv", "--out", out, "--model", f"{models}/ckpt"])
    assert ran.exit_code == 0, ran.output
    # the run record counts the frames scored against their cell reference: those whose pattern repeats
    assert load_checkpoint(f"{models}/ckpt").meta.self_reference  # the transfer recipe's; these frames repeat
    (run_id,) = storage.list_names(f"{out}/runs")
    record = json.loads(storage.read_bytes(f"{out}/runs/{run_id}/attempt-1.json"))
    preds = read_predictions(out).to_pandas()
    urls = read_manifest(f"{data}/manifest.csv").set_index("image_id")["url"]
    repeating = sum(cell_reference(load_frame(urls[i])) is not None for i in preds.loc[preds["status"] == "ok", "image_id"])
    assert 0 < record["rows"]["with_cell_reference"] == repeating
    evaluated = runner.invoke(main, ["eval", out, "--truth", f"{data}/manifest.csv"])
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads(boto3.client("s3").get_object(Bucket=BUCKET, Key="results/fewshot/metrics.json")["Body"].read())
    assert metrics["n_truth"] == metrics["n_scored"] == 14 and metrics["pAUROC"] is not None
