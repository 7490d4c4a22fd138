"""Start-up, as a scheduler sees it: a SIGTERM at any instant exits 130 with the output's lease
released, and a damaged manifest exits 2 with one line and nothing rendered. No Ray: the
in-process executor, and a harness that holds the driver at a chosen point (no sleeps)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import REPO, lease_released, row, run_cli, write_config, write_manifest

# The CLI, with Driver.prepare held once it is done (the lease is taken, the plan made) until
# the test closes stdin: the moment a scheduler's SIGTERM must still leave nothing behind.
HARNESS = """
import os, sys
from klein_ray.scheduling import driver

prepare = driver.Driver.prepare

def held(self, manifest):
    plan = prepare(self, manifest)
    open(os.environ["KLEIN_RAY_TEST_READY"], "w").close()
    sys.stdin.read()
    return plan

driver.Driver.prepare = held
from klein_ray.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.subprocess
def test_sigterm_during_start_up_exits_130_and_releases_the_lease(tmp_path, tiny_models):
    manifest = write_manifest(tmp_path / "m.parquet", [row(id="a", prompt="a cup", width=64, height=64)])
    config = write_config(tmp_path / "job.yaml", tiny_models)
    out, ready = tmp_path / "out", tmp_path / "ready"
    args = ["render", str(manifest), "--output", str(out), "--config", str(config),
            "--executor", "local", "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-c", HARNESS, *args], cwd=REPO, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, KLEIN_RAY_TEST_READY=str(ready)))
    _wait_for(ready, proc)
    assert (out / "_job" / "lease.json").is_file()  # held: this is the moment that matters
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "re-run the same command to resume" in stderr
    assert lease_released(out)
    again = run_cli(*args)  # nothing blocks the next run
    assert again.returncode == 0, again.stderr[-3000:]


def _damaged_manifest(path: Path) -> Path:
    """A Parquet file whose footer reads but one data page of the prompt column is garbage."""
    rows = [row(id=f"r{i}", prompt=f"a lamp number {i} " * 4, width=64, height=64) for i in range(3000)]
    write_manifest(path, rows)
    pq.write_table(pq.read_table(path), path, row_group_size=1000)
    data = bytearray(path.read_bytes())
    page = pq.ParquetFile(path).metadata.row_group(2).column(1).data_page_offset
    for i in range(page + 16, page + 160):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    return path


@pytest.mark.subprocess
def test_a_manifest_with_damaged_data_exits_2_before_rendering(tmp_path, tiny_models):
    manifest = _damaged_manifest(tmp_path / "m.parquet")
    config = write_config(tmp_path / "job.yaml", tiny_models)
    out = tmp_path / "out"
    proc = run_cli("render", str(manifest), "--output", str(out), "--config", str(config),
                   "--executor", "local", "--no-progress")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "its data cannot be read" in proc.stderr
    assert not (out / "images").exists() and not (out / "meta").exists()
    assert lease_released(out)
    validated = run_cli("validate", str(manifest), "--config", str(config))
    assert validated.returncode == 2 and "its data cannot be read" in validated.stderr
    assert "Traceback" not in validated.stderr
