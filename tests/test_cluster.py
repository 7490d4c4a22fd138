"""A real multi-node Ray cluster on this machine (Ray's own cluster utilities: a head with no CPUs
for work and worker nodes of one CPU each, every node a raylet of its own): actors spread over
the nodes, a node killed outright mid-run costs nothing, a node that joins mid-run gets work;
and the driver joins the cluster `ray start` runs on this node, or says clearly that its record
is stale. The driver is the CLI in a subprocess, as a user runs it."""

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
from helpers import REPO, assert_done, last_json, row, run_cli, stop_ray_under, write_config, write_manifest
from refgate import REFERENCES, RefGate

from klein_ray.storage import LocalStore

pytestmark = [pytest.mark.slow, pytest.mark.subprocess, pytest.mark.ray]


@pytest.fixture
def cluster():  # token auth: every Ray of the session shares conftest's token
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, connect=False,
                head_node_args={"num_cpus": 0, "num_gpus": 0, "include_dashboard": False})
    yield c
    c.shutdown()


def _rows(n: int, side: int = 96) -> list[dict]:
    return [row(id=f"n{i:03d}", prompt=f"a lamp, angle {i}", width=side, height=side, seed=i) for i in range(n)]


def _job(tmp_path: Path, tiny_models, rows: list[dict], actors: int, **extra) -> tuple[tuple[str, ...], Path]:
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    config = write_config(tmp_path / "job.yaml", tiny_models, variants={"tiny": {
        "source": str(tiny_models["tiny"]), "pipeline": "distilled", "actors": actors,
        "cpus_per_actor": 1, "batch_size": 2}}, **extra)
    out = tmp_path / "out"
    return ("render", str(manifest), "--output", str(out), "--config", str(config), "--no-progress"), out


def _start(args, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "klein_ray", *args], cwd=REPO, text=True,
                            env=dict(env or os.environ, PYTHONUNBUFFERED="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _markers(out: Path) -> int:
    return len(list((out / "meta").glob("*.json"))) if (out / "meta").is_dir() else 0


def _wait(predicate, proc: subprocess.Popen, timeout: float = 180, what: str = "timed out") -> None:
    """Poll another process's progress (on the files, or a test server's state)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended first (exit {proc.returncode}):\n{proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def _node(meta: dict) -> str:
    """The Ray node (first 12 hex digits) that rendered a row, from its metadata."""
    return meta["worker"].split("@node:")[1]


def _nodes_of(out: Path) -> dict[str, str]:
    """Row id -> the node that rendered it."""
    return {path.stem: _node(json.loads(path.read_text())) for path in (out / "meta").glob("*.json")}


def _finish(proc: subprocess.Popen, out: Path, rows: list[dict]) -> dict:
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    store = LocalStore(out)
    for r in rows:
        assert_done(store, r["id"])
    assert sum(1 for _ in store.list("images/")) == len(rows)  # once each
    assert run_cli("verify", str(out), "--deep").returncode == 0
    return last_json(stdout)


def _gated_job(tmp_path: Path, tiny_models, gate: RefGate, n: int, in_flight: int, actors: int = 2):
    """``n`` rows of 128², each with its own reference behind ``gate``."""
    rows = gate.gated(_rows(n, side=128))
    args, out = _job(tmp_path, tiny_models, rows, actors=actors, run={"in_flight_per_actor": in_flight},
                     references=REFERENCES)
    return rows, args, out


def test_actors_spread_over_nodes_and_a_killed_node_costs_nothing(cluster, tmp_path, tiny_models):
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    in_flight = 3
    gate = RefGate(free=6, held=in_flight, auto_open=False)
    try:
        rows, args, out = _gated_job(tmp_path, tiny_models, gate, 40, in_flight)
        proc = _start((*args, "--address", cluster.address))
        _wait(gate.full.is_set, proc, what="the two actors never held work at once")
        survivor = nodes[1].node_id[:12]
        cluster.remove_node(nodes[0], allow_graceful=False)  # its raylet and everything under it
        gate.open.set()  # the victim's units were in flight when it died: they must be redone
        summary = _finish(proc, out, rows)
    finally:
        gate.close()
    assert summary["committed"] + summary["skipped"] == len(rows) and summary["failed"] == 0
    metas = [json.loads(path.read_text()) for path in (out / "meta").glob("*.json")]
    redone = [m["id"] for m in metas if m["attempt"] > 1]
    assert redone, "no unit was in flight on the killed node"
    assert {_node(m) for m in metas if m["id"] in redone} == {survivor}


def test_a_node_that_joins_mid_run_gets_work(cluster, tmp_path, tiny_models):
    cluster.add_node(num_cpus=1)  # room for one of the two actors: the other waits for a node
    cluster.wait_for_nodes()
    in_flight = 3
    gate = RefGate(free=8, held=in_flight)
    try:
        rows, args, out = _gated_job(tmp_path, tiny_models, gate, 40, in_flight)
        proc = _start((*args, "--address", cluster.address))
        _wait(lambda: _markers(out) >= 4, proc)  # rendering began with the one actor that fit
        joined = cluster.add_node(num_cpus=1)
        # Opens once the second actor holds units (the first cannot hold that many rows).
        _wait(gate.open.is_set, proc, what="the actor on the new node never took work")
        _finish(proc, out, rows)
    finally:
        gate.close()
    assert joined.node_id[:12] in set(_nodes_of(out).values()), "the new node never got work"


def _ray(*args: str, env: dict) -> subprocess.CompletedProcess:
    ray_bin = Path(sys.executable).with_name("ray")
    return subprocess.run([str(ray_bin), *args], env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def raytmp():
    """A Ray temp dir of the test's own (where `ray start` records its cluster), short: Ray's
    socket paths under it must fit in 107 bytes."""
    path = tempfile.mkdtemp(prefix="kr-", dir="/tmp")
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


def test_the_driver_joins_the_cluster_ray_start_runs_on_this_node_and_exports_metrics(
        tmp_path, tiny_models, raytmp):
    # Metrics reach the node's endpoint within half a second instead of Ray's default 10.
    env = dict(os.environ, RAY_TMPDIR=str(raytmp), RAY_metrics_report_interval_ms="500")
    env.pop("RAY_ADDRESS", None)
    metrics_port = free_port()
    started = _ray("start", "--head", f"--port={free_port()}", "--num-cpus=1", "--include-dashboard=false",
                   f"--metrics-export-port={metrics_port}", "--disable-usage-stats",
                   # fixed by default (52365, 10001): another Ray on the machine may hold them
                   f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
                   env=env)
    assert started.returncode == 0, started.stderr[-2000:]
    try:
        rows = _rows(4, side=64)
        args, out = _job(tmp_path, tiny_models, rows, actors=1)
        # Before: "ValueError: When connecting to an existing cluster, num_cpus and num_gpus
        # must not be provided" and a traceback.
        proc = _start(args, env=env)
        summary = _finish(proc, out, rows)
        assert summary["committed"] == 4
        assert set(_nodes_of(out).values())  # rendered by an actor of that cluster
        scraped = _scrape(metrics_port, 'ray_klein_ray_rows_committed_total')
        assert _value(scraped, "ray_klein_ray_rows_committed_total", variant="tiny") == 4
        assert _value(scraped, "ray_klein_ray_stage_seconds_count", variant="tiny", stage="render") == 4
        assert _value(scraped, "ray_klein_ray_model_load_seconds_count", variant="tiny") >= 1
        assert "ray_klein_ray_units_in_flight" in scraped
    finally:
        # Not `ray stop`: it kills every Ray on the machine (the session's shared one too).
        stop_ray_under(raytmp)


def _scrape(port: int, wanted: str, timeout: float = 30) -> str:
    """The node's Prometheus endpoint, once it carries ``wanted`` (metrics arrive in batches)."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        if wanted in text or time.monotonic() > deadline:
            return text
        time.sleep(0.5)


def _value(text: str, name: str, **tags: str) -> float:
    """The sum of ``name``'s samples whose labels include ``tags``."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in tags.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_stale_record_of_a_gone_cluster_gets_a_clear_message(tmp_path, tiny_models, raytmp):
    (raytmp / "ray").mkdir()
    (raytmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")  # nothing listens
    env = dict(os.environ, RAY_TMPDIR=str(raytmp))
    env.pop("RAY_ADDRESS", None)
    args, _ = _job(tmp_path, tiny_models, _rows(2, side=64), actors=1)
    proc = run_cli(*args, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "ray stop" in proc.stderr and "Traceback" not in proc.stderr


def test_sigterm_on_a_cluster_stops_the_run_and_resumes(cluster, tmp_path, tiny_models):
    """A scheduler's stop on a multi-node cluster, arriving while units are in flight: 130, and
    the re-run finishes the job once."""
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    gate = RefGate(free=4, held=10**6, auto_open=False)  # opened by the test alone
    try:
        rows, args, out = _gated_job(tmp_path, tiny_models, gate, 40, in_flight=3, actors=1)
        proc = _start((*args, "--address", cluster.address))
        _wait(lambda: _markers(out) >= 3 and bool(gate.waiting), proc)
        proc.send_signal(signal.SIGTERM)
        gate.open.set()  # the units in flight may land while the driver drains
        proc.communicate(timeout=120)
        assert proc.returncode == 130
        assert _markers(out) < len(rows)
        _finish(_start((*args, "--address", cluster.address)), out, rows)
    finally:
        gate.close()
