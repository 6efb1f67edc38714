"""`ray job submit` of jobs/process_lots.py against a real Ray head started here, as the README says."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from conftest import SECRET_KEY, free_port
from ray.job_submission import JobStatus, JobSubmissionClient

from semclip_batch.analysis.results import read_predictions
from semclip_batch.pipeline.cluster_config import validate_cluster_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = REPO / ".venv" / "bin"


def head_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PATH=f"{VENV_BIN}:{env.get('PATH', '')}", RAY_AUTH_MODE="disabled",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    return env


def wait_for_dashboard(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(1.0)
    raise TimeoutError(f"Ray dashboard at {url} did not come up in {timeout:.0f} s")


@pytest.fixture
def ray_head():
    """A real head on 127.0.0.1 with the venv first on PATH; stopped (its whole process group) afterwards."""
    assert (VENV_BIN / "ray").exists(), "run `make test` (it creates .venv with ray) before this test"
    temp_dir = tempfile.mkdtemp(prefix="rayjob", dir="/tmp")  # short: Ray's socket paths have a length limit
    dash = free_port()
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           f"--port={free_port()}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
           f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
           f"--metrics-export-port={free_port()}", "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=head_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{dash}"
    try:
        wait_for_dashboard(url, proc)
        yield url
    finally:
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):  # a throwaway head: no need to wait long
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=wait)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.timeout(600)
def test_job_submit_processes_lots(ray_head, synth_lot, tmp_path):
    out = tmp_path / "job-out"
    cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", ray_head, "--runtime-env", "cluster/runtime_env.yaml",
           "--working-dir", ".", "--", "python", "jobs/process_lots.py", str(synth_lot / "manifest.parquet"),
           "--out", str(out), "--backbone", "semclip-tiny", "--pretrained", "none", "--shard-size", "5",
           "--aggregate"]
    done = subprocess.run(cmd, cwd=REPO, env=head_env(), capture_output=True, text=True, timeout=480)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    job_id = re.search(r"raysubmit_\w+", done.stdout + done.stderr).group(0)
    assert JobSubmissionClient(ray_head).get_job_status(job_id) == JobStatus.SUCCEEDED
    manifest = pd.read_parquet(synth_lot / "manifest.parquet")
    preds = read_predictions(str(out)).to_pandas()
    assert len(preds) == len(manifest) and (preds["status"] == "ok").all()
    stats = pd.read_parquet(out / "lot_stats")
    assert len(stats) == manifest.groupby(["lot_id", "wafer_id"]).ngroups * 7
    assert set(stats["class"]) == {"normal", "bridge", "copper_residue", "hole", "infilm", "particle", "scratch"}
    jobs = subprocess.run([str(VENV_BIN / "ray"), "job", "list", "--address", ray_head], cwd=REPO, env=head_env(),
                          capture_output=True, text=True, timeout=60)
    assert jobs.returncode == 0 and SECRET_KEY not in jobs.stdout + jobs.stderr


def test_cluster_config_validates_with_ray():
    validate_cluster_config(REPO / "cluster" / "cluster.yaml")
    broken = REPO / "cluster" / "cluster.yaml"
    text = broken.read_text().replace("head_node_type: head_cpu", "head_node_type: no_such_type")
    path = Path(tempfile.mkdtemp()) / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"no_such_type|head_node_type"):
        validate_cluster_config(path)
