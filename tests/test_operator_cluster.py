"""What an operator sees, with real processes: a render that cannot join the Ray cluster
recorded on its node (a head under a token it does not have) ends within the join timeout with
a message naming the address, what chose it and the way out; SIGTERM at any moment of start-up
(0.5 to 5 s in, Ray starting meanwhile) is exit 130 with the summary line and the lease released
(before: 1-3 s in, Ray's own handler made it a bare exit 15); a SIGKILLed run shows as
interrupted in `status`, not running for ever."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import free_port
from helpers import REPO, lease_released, row, run_cli, stop_ray_under, write_config, write_manifest

pytestmark = [pytest.mark.slow, pytest.mark.subprocess, pytest.mark.ray]


@pytest.fixture
def raytmp():
    """A Ray temp dir of the test's own (short: Ray's socket paths must fit in 107 bytes)."""
    path = tempfile.mkdtemp(prefix="kr-", dir="/tmp")
    yield Path(path)
    stop_ray_under(Path(path))
    shutil.rmtree(path, ignore_errors=True)


def _env(raytmp: Path, **extra: str) -> dict:
    env = dict(os.environ, RAY_TMPDIR=str(raytmp), PYTHONUNBUFFERED="1", **extra)
    env.pop("RAY_ADDRESS", None)
    return env


def _rows(n: int) -> list[dict]:
    return [row(id=f"s{i}", prompt=f"a lamp {i}", width=64, height=64, seed=i) for i in range(n)]


def test_a_recorded_cluster_we_cannot_join_ends_within_the_join_timeout(tmp_path, tiny_models, raytmp):
    head = subprocess.run(
        [str(Path(sys.executable).with_name("ray")), "start", "--head", f"--port={free_port()}", "--num-cpus=0",
         "--include-dashboard=false", "--disable-usage-stats", f"--ray-client-server-port={free_port()}",
         f"--dashboard-agent-listen-port={free_port()}"],
        env=_env(raytmp, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="a" * 64), capture_output=True, text=True, timeout=120)
    assert head.returncode == 0, head.stderr[-2000:]
    manifest = write_manifest(tmp_path / "m.parquet", _rows(2))
    config = write_config(tmp_path / "job.yaml", tiny_models, run={"ray_join_timeout_s": 8})
    started = time.monotonic()
    proc = run_cli("render", str(manifest), "--output", str(tmp_path / "out"), "--config", str(config),
                   "--no-progress", env=_env(raytmp, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="b" * 64), timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert time.monotonic() - started < 8 + 30  # the timeout, or Ray's own refusal before it
    assert "could not join the Ray cluster at" in proc.stderr
    assert "the record `ray start` left on this node" in proc.stderr and "--address local" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("delay", [0.5, 1.0, 2.0, 3.0, 5.0])
def test_sigterm_at_any_moment_of_start_up_is_130_with_the_summary(tmp_path, tiny_models, raytmp, delay):
    manifest = write_manifest(tmp_path / "m.parquet", _rows(24))
    config = write_config(tmp_path / "job.yaml", tiny_models)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "klein_ray", "render", str(manifest), "--output", str(out),
                             "--config", str(config), "--no-progress"], cwd=REPO, env=_env(raytmp),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)  # the moment is the test's parameter: anywhere in start-up must do
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, stderr[-3000:])
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["interrupted"] is True and "Traceback" not in stderr
    assert lease_released(out)


def test_a_sigkilled_run_is_interrupted_in_status(tmp_path, tiny_models, raytmp):
    manifest = write_manifest(tmp_path / "m.parquet", _rows(40))
    config = write_config(tmp_path / "job.yaml", tiny_models,
                          variants={"tiny": {"source": str(tiny_models["tiny"]), "pipeline": "distilled",
                                             "batch_size": 1}})
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "klein_ray", "render", str(manifest), "--output", str(out),
                             "--config", str(config), "--no-progress", "--executor", "local"], cwd=REPO,
                            env=_env(raytmp), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while not (out / "_job" / "progress.json").exists() or len(list((out / "meta").glob("*.json"))) < 3:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    status = run_cli("status", str(out))
    assert status.returncode == 0, status.stderr
    assert " interrupted (its driver (pid " in status.stdout and "is gone)" in status.stdout
