"""Storage under injected faults: moto behind tests/faultproxy.py (503 SlowDown, 500 InternalError, reset)."""

from __future__ import annotations

import http.client
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pandas as pd
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError
from click.testing import CliRunner
from conftest import BUCKET
from faultproxy import FaultProxy

from semclip_batch.analysis.results import read_predictions
from semclip_batch.cli import main
from semclip_batch.errors import ConfigError
from semclip_batch.io import storage

pytestmark = [pytest.mark.s3, pytest.mark.timeout(120)]

N_OBJECTS = 60


def payload(i: int) -> bytes:
    return bytes((i * 7 + k) % 256 for k in range(50 + 13 * i))


def round_trip(i: int, endpoint_url: str) -> bytes:
    url = f"s3://{BUCKET}/faults/roundtrip/{i:03d}.bin"
    options = {"endpoint_url": endpoint_url}
    storage.write_bytes(url, payload(i), options)
    return storage.read_bytes(url, options)


def raw_request(proxy_url: str, method: str, path: str) -> tuple[int, bytes]:
    host, port = proxy_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def client_error(status: int, code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


def test_round_trips_survive_ten_percent_faults(faulty_s3):
    proxy, endpoint_url = faulty_s3
    proxy.p_by_method = {"GET": 0.1, "PUT": 0.1}
    with ThreadPoolExecutor(max_workers=8) as pool:
        read = list(pool.map(round_trip, range(N_OBJECTS), [endpoint_url] * N_OBJECTS))
    assert read == [payload(i) for i in range(N_OBJECTS)]
    assert proxy.requests["PUT"] >= N_OBJECTS and proxy.requests["GET"] >= N_OBJECTS
    assert proxy.faults["GET"] > 0 and proxy.faults["PUT"] > 0, proxy.faults
    assert proxy.requests["GET"] - proxy.faults["GET"] == N_OBJECTS  # every fault was retried, every read ended once


def test_object_that_keeps_failing_fails_in_bounded_time(faulty_s3):
    proxy, endpoint_url = faulty_s3
    url = f"s3://{BUCKET}/faults/cursed/frame.png"
    storage.write_bytes(url, b"stored before the trouble", {})  # straight to moto: it exists
    proxy.fail_paths.add("cursed/")
    start = time.monotonic()
    with pytest.raises(OSError) as raised:
        storage.read_bytes(url, {"endpoint_url": endpoint_url})
    took = time.monotonic() - start
    assert took < 30, f"took {took:.1f} s"
    assert not isinstance(raised.value, FileNotFoundError)
    assert proxy.total_faults == sum(proxy.requests.values()) >= 5  # botocore's own tries, at least


def test_missing_object_is_not_retried(faulty_s3):
    proxy, endpoint_url = faulty_s3
    proxy.p_by_method = {}
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f"s3://{BUCKET}/faults/never-written.bin", {"endpoint_url": endpoint_url})
    assert proxy.requests == {"HEAD": 1, "GET": 1} and proxy.total_faults == 0  # s3fs: HEAD, then a listing


@pytest.mark.parametrize(("kind", "status", "code"), [("slowdown", 503, b"<Code>SlowDown</Code>"),
                                                      ("internal", 500, b"<Code>InternalError</Code>")])
def test_proxy_error_answers(s3_endpoint, kind, status, code):
    with FaultProxy(s3_endpoint, p_fail=1.0, kinds=[kind]) as proxy:
        got_status, body = raw_request(proxy.url, "GET", f"/{BUCKET}/any")
        assert got_status == status and code in body
        assert raw_request(proxy.url, "HEAD", f"/{BUCKET}/any")[0] == 404  # HEAD is not faulted by default
    assert proxy.faults == {"GET": 1} and proxy.fault_kinds == {kind: 1}


def test_proxy_reset_and_forwarding(s3_endpoint):
    with FaultProxy(s3_endpoint, p_fail=0.0, fail_paths=["boom"], kinds=["reset"]) as proxy:
        with pytest.raises(ConnectionResetError):
            raw_request(proxy.url, "GET", f"/{BUCKET}/boom.bin")
        status, body = raw_request(proxy.url, "GET", f"/{BUCKET}?list-type=2")
    assert status == 200 and b"<Name>fab-archive</Name>" in body
    assert proxy.requests == {"GET": 2} and proxy.fault_kinds == {"reset": 1}


@pytest.mark.parametrize("upstream", ["http://10.0.0.1:9000", "http://localhost:9000", "https://127.0.0.1:9000",
                                      "http://127.0.0.1"])
def test_proxy_refuses_non_loopback_upstream(upstream):
    with pytest.raises(ValueError):
        FaultProxy(upstream)


@pytest.mark.parametrize(("exc", "transient"), [
    (OSError(16, "Service Unavailable"), False),  # no cause: not recognisable as the store's
    (client_error(503, "SlowDown"), True),
    (client_error(503, "503"), True),
    (client_error(500, "InternalError"), True),
    (client_error(400, "Throttling"), True),
    (client_error(404, "NoSuchKey"), False),
    (client_error(403, "AccessDenied"), False),
    (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), True),
    (ConnectionResetError(), True),
    (TimeoutError(), True),
    (PermissionError("denied"), False),
    (ConfigError("bad option"), False),
])
def test_transient_classification(exc, transient):
    assert storage._transient(exc) is transient


def test_translated_errors_classified_by_cause():
    translated = OSError(16, "Service Unavailable")
    translated.__cause__ = client_error(503, "503")
    missing = FileNotFoundError("gone")
    missing.__cause__ = client_error(503, "503")  # never retried, whatever caused it
    assert storage._transient(translated) and not storage._transient(missing)


# --- the whole pipeline behind the proxy ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def proxied_archive(s3_endpoint, tmp_path_factory) -> tuple[str, pd.DataFrame]:
    import fsspec
    from test_archive_inputs import write_archive

    root = tmp_path_factory.mktemp("faulty-archive")
    full = write_archive(root)
    # lot "001" (8 rows, a 0-byte frame first) and 16 rows of lot "1": three shards of 8
    manifest = pd.concat([full[full["lot_id"] == "001"], full[full["lot_id"] == "1"].head(16)], ignore_index=True)
    manifest.drop(columns="expect").to_csv(root / "manifest.csv", index=False)
    fsspec.filesystem("s3").put(str(root) + "/", f"{BUCKET}/faulty-archive/", recursive=True)
    return f"s3://{BUCKET}/faulty-archive", manifest


def _run_args(data: str, out: str, proxy_url: str) -> list[str]:
    return ["run", f"{data}/manifest.csv", "--out", out, "--backbone", "semclip-tiny", "--pretrained", "none",
            "--shard-size", "8", "--storage-option", f"endpoint_url={proxy_url}"]


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_run_completes_with_every_row_under_ten_percent_faults(ray_cluster, proxied_archive, faulty_s3):
    from test_archive_inputs import check_rows

    data, manifest = proxied_archive
    proxy, url = faulty_s3
    proxy.p_by_method.update({"GET": 0.1, "PUT": 0.1, "POST": 0.1, "HEAD": 0.1, "DELETE": 0.1})
    out = f"{data}/out-faults"
    result = CliRunner().invoke(main, _run_args(data, out, url))
    assert result.exit_code == 0, result.output
    assert proxy.faults["GET"] > 0 and proxy.faults["PUT"] > 0, proxy.faults
    check_rows(read_predictions(out).to_pandas(), manifest)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize(("stage", "fault"), [("part", "transient"), ("final_file", "denied")])
def test_a_shard_that_cannot_be_stored_is_named_and_rerun(ray_cluster, proxied_archive, faulty_s3, stage, fault):
    """A writer's part that keeps failing with transient errors (every retry layer gives up), or the finaliser's
    Parquet file refused outright (403 AccessDenied, as a bucket policy denying the prefix answers; no layer
    retries it): that shard fails, the others finish, and a rerun redoes only it."""
    from test_archive_inputs import check_rows

    data, manifest = proxied_archive
    proxy, url = faulty_s3
    proxy.p_by_method.update({"GET": 0.0, "PUT": 0.0, "POST": 0.0})
    if fault == "denied":
        proxy.kinds = ("denied",)
    out = f"{data}/out-write-fail-{stage}"
    failing = {"part": "_state/parts/1/s00001/", "final_file": "predictions/lot_id=1/s00001.parquet"}[stage]
    proxy.fail_paths.add(f"out-write-fail-{stage}/{failing}")
    failed = CliRunner().invoke(main, _run_args(data, out, url))
    assert failed.exit_code == 1, failed.output
    lines = failed.output.strip().splitlines()
    assert lines[-1].startswith("Error: 1 shard(s) could not be stored, e.g. 1/s00001"), failed.output
    record = json.loads(storage.read_bytes(f"{out}/runs/{_only(storage.list_names(f'{out}/runs'))}/attempt-1.json"))
    assert record["status"] == "failed" and record["failed_shards"] == ["1/s00001"]
    assert record["error"] and "\n" not in record["error"] and "2 of 3 shards are done" in lines[-1]
    assert storage.list_names(f"{out}/_state/done/1") == ["s00000.json"]
    proxy.fail_paths.clear()
    again = CliRunner().invoke(main, _run_args(data, out, url))
    assert again.exit_code == 0, again.output
    assert "shards run 1, skipped 2" in again.output
    check_rows(read_predictions(out).to_pandas(), manifest)


def _only(items: list[str]) -> str:
    assert len(items) == 1, items
    return items[0]
