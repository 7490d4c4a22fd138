"""Chaos: nothing lost, nothing duplicated, whatever dies.

- the driver's whole process group SIGKILLed at random moments, then re-run to the end;
- a render worker process SIGKILLed mid-batch: the same run still finishes;
- a render worker that hangs: past run.unit_timeout_s its actor is killed and replaced;
- every request through a fault-injecting proxy in front of Ceph RGW (503, 500, resets before
  and after the write lands, stalls past the read timeout), a quarter of them;
- SIGTERM (a preemption notice): exit 130 within seconds, and a re-run resumes.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
from faultproxy import FaultProxy
from helpers import REPO, last_json, lease_released, row, run_cli, write_config, write_manifest
from refgate import REFERENCES, RefGate

from klein_ray.storage import open_store

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]


def _rows(n: int, prefix: str = "r") -> list[dict]:
    # Two sizes and a few formats so units of several shapes are in flight when things die.
    return [row(id=f"{prefix}{i:04d}", prompt=f"product {i % 7} on a plain background",
                width=64 if i % 3 else 80, height=64, seed=i if i % 2 else None,
                format=("png", "jpeg", "webp")[i % 3]) for i in range(n)]


def _start(args, env=None) -> subprocess.Popen:
    """The CLI in a process group of its own, so the whole group can be killed."""
    return subprocess.Popen([sys.executable, "-m", "klein_ray", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait_for(proc: subprocess.Popen, ready, timeout: float, step: float = 0.1) -> bool:
    """Poll ``ready()`` while ``proc`` runs; True once it holds, False on exit or timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if ready():
            return True
        time.sleep(step)
    return False


def _count_markers(store) -> int:
    return sum(1 for _ in store.list("meta/"))


def _assert_exactly_once(store, rows: list[dict]) -> None:
    """Every row committed, one image per id, every sha256 matching, nothing extra."""
    ids = {r["id"] for r in rows}
    images = [o.key for o in store.list("images/")]
    stems = [k.split("/", 1)[1].rsplit(".", 1)[0] for k in images]
    assert sorted(stems) == sorted(ids), "an id has no image, or more than one"
    metas = [o.key for o in store.list("meta/")]
    assert len(metas) == len(ids)
    for row_id in ids:
        meta = json.loads(store.get(f"meta/{row_id}.json"))
        data = store.get(meta["image"]["key"])
        assert hashlib.sha256(data).hexdigest() == meta["image"]["sha256"], row_id


def test_driver_killed_repeatedly_then_resumed(tmp_path, tiny_models, ray_address, rgw, s3_env):
    s3_env(rgw)
    rows = _rows(240)
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    config = write_config(tmp_path / "job.yaml", tiny_models)
    out = f"s3://{rgw.new_bucket()}/chaos"
    args = ("render", str(manifest), "--output", out, "--config", str(config),
            "--address", ray_address, "--no-progress")
    store = open_store(out)
    rng = random.Random(1234)
    kills = 0
    for _ in range(4):
        proc = _start(args, env=rgw.env())
        before = _count_markers(store)
        # Kill at a chosen moment of the run: once it has committed ``target`` rows (drawn from a
        # seeded generator, so every run of the test kills at the same points), never by a timer.
        target = rng.randint(3, 25)
        _wait_for(proc, lambda b=before, n=target: _count_markers(store) - b >= n, timeout=120, step=0.2)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            kills += 1
        proc.communicate()
    assert kills >= 2, "the job finished before it could be killed; make it longer"
    final = run_cli(*args, env=rgw.env())
    assert final.returncode == 0, final.stderr[-3000:]
    _assert_exactly_once(store, rows)
    again = run_cli(*args, env=rgw.env())
    summary = last_json(again.stdout)
    assert again.returncode == 0 and summary["committed"] == 0 and summary["skipped"] == len(rows)


def test_worker_killed_mid_batch_same_run_finishes(tmp_path, tiny_models, ray_address, rgw, s3_env):
    s3_env(rgw)
    gate = RefGate(free=2, held=10**6, auto_open=False)
    rows = gate.gated(_rows(80, prefix="w"), per=4)
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    config = write_config(tmp_path / "job.yaml", tiny_models, references=REFERENCES)
    out = f"s3://{rgw.new_bucket()}/worker-kill"
    store = open_store(out)
    try:
        proc = _start(("render", str(manifest), "--output", out, "--config", str(config),
                       "--address", ray_address, "--no-progress"), env=rgw.env())
        # Some rows committed, and a unit waits on its reference: the (one) worker is mid-unit.
        assert _wait_for(proc, lambda: _count_markers(store) >= 1 and bool(gate.waiting), timeout=120)
        first = next(iter(store.list("meta/"))).key
        worker = json.loads(store.get(first))["worker"]  # host:pid@node:... of the process
        psutil.Process(int(worker.split("@")[0].rsplit(":", 1)[1])).kill()
        gate.open.set()
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        gate.close()
    errors = store.get("_job/errors.parquet") if proc.returncode else b""
    assert proc.returncode == 0, (stdout[-2000:], stderr[-2000:], _errors(errors))
    assert last_json(stdout)["committed"] == len(rows)
    _assert_exactly_once(store, rows)
    assert any(json.loads(store.get(f"meta/{r['id']}.json"))["attempt"] > 1 for r in rows), \
        "no unit was in flight on the killed worker"


def test_a_hung_actor_is_killed_and_replaced(tmp_path, tiny_models, ray_address):
    from klein_ray.config import load_config
    from klein_ray.executors.ray_cluster import RayExecutor
    from klein_ray.scheduling.driver import EXIT_OK, Driver, RenderJob
    from klein_ray.worker.render import RenderWorker

    hung = tmp_path / "hung-worker"

    class Hanging(RenderWorker):  # defined here: Ray ships it to the actor by value
        def render_unit(self, unit):
            if unit.attempt == 1 and any(r.id == "hang" for r in unit.rows):
                hung.write_text(self.name)
                threading.Event().wait()  # for ever: only killing the actor ends this call
            return super().render_unit(unit)

    rows = [row(id=f"h{i}", prompt="a teapot", width=64, height=64, seed=i) for i in range(4)]
    rows.append(row(id="hang", prompt="a stuck teapot", width=80, height=64, seed=9))  # its own unit
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    config = load_config(write_config(tmp_path / "job.yaml", tiny_models, run={"unit_timeout_s": 20}))  # generous: a loaded CI machine
    out = tmp_path / "out"
    summary, code = Driver(RenderJob(str(manifest), str(out), config), lambda: RayExecutor(worker=Hanging)).run()
    assert code == EXIT_OK and summary["committed"] == len(rows)
    meta = json.loads((out / "meta" / "hang.json").read_text())
    assert meta["attempt"] == 2 and meta["worker"] != hung.read_text()  # a fresh actor
    try:  # the hung actor's process is gone (killed), not left behind
        psutil.Process(int(hung.read_text().split("@")[0].rsplit(":", 1)[1])).wait(timeout=60)
    except psutil.NoSuchProcess:
        pass


def test_faults_on_a_quarter_of_storage_requests(tmp_path, tiny_models, ray_address, rgw, s3_env):
    s3_env(rgw)
    bucket = rgw.new_bucket()
    ref = tmp_path / "ref.png"
    from PIL import Image

    Image.new("RGB", (96, 64), (120, 40, 40)).save(ref)
    rgw.client().upload_file(str(ref), bucket, "refs/ref.png")
    rows = _rows(36, prefix="f") + [
        row(id=f"edit{i}", prompt="recolour it", references=[f"s3://{bucket}/refs/ref.png"], seed=i)
        for i in range(4)]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    with FaultProxy(rgw.endpoint, rate=0.25, seed=99, stall_seconds=3.0) as proxy:
        config = write_config(tmp_path / "job.yaml", tiny_models, storage={
            "endpoint_url": proxy.url, "read_timeout": 2, "connect_timeout": 2,
            "max_attempts": 4, "outer_retry_seconds": 120})
        env = {k: v for k, v in rgw.env().items() if k != "AWS_ENDPOINT_URL_S3"}
        out = f"s3://{bucket}/faulty"
        proc = run_cli("render", str(manifest), "--output", out, "--config", str(config),
                       "--address", ray_address, "--no-progress", env=env, timeout=600)
        stats = proxy.stats
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert last_json(proc.stdout)["committed"] == len(rows)
    for fault in ("slowdown", "internal", "reset_before", "reset_after", "stall"):
        assert stats[fault] > 0, f"{fault} never fired: {stats}"
    _assert_exactly_once(open_store(out), rows)  # checked straight against RGW


def test_sigterm_exits_130_and_rerun_resumes(tmp_path, tiny_models, ray_address):
    gate = RefGate(free=4, held=10**6, auto_open=False)
    rows = gate.gated(_rows(120, prefix="t"), per=4)
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    config = write_config(tmp_path / "job.yaml", tiny_models, references=REFERENCES)
    out = tmp_path / "out"
    args = ("render", str(manifest), "--output", str(out), "--config", str(config),
            "--address", ray_address, "--no-progress")
    try:
        proc = _start(args)
        # Stopped mid-run, units provably in flight (waiting on their references).
        assert _wait_for(proc, lambda: any((out / "meta").glob("*.json")) and bool(gate.waiting), timeout=120)
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        gate.open.set()  # they may land while the driver drains
        _stopped_then_resumed(proc, sent, args, out, rows)
    finally:
        gate.close()


def _stopped_then_resumed(proc: subprocess.Popen, sent: float, args: tuple, out, rows: list[dict]) -> None:
    """A SIGTERM sent at ``sent``: exit 130 within seconds, the lease let go, and a re-run
    finishes the job with every row once."""
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-3000:]
    assert time.monotonic() - sent < 15
    summary = last_json(stdout)
    assert summary["interrupted"] is True and summary["committed"] < len(rows)
    assert lease_released(out)
    final = run_cli(*args)
    assert final.returncode == 0, final.stderr[-3000:]
    resumed = last_json(final.stdout)
    assert resumed["skipped"] >= summary["committed"]
    assert resumed["skipped"] + resumed["committed"] == len(rows)
    _assert_exactly_once(open_store(str(out)), rows)


def test_second_driver_on_same_output_refuses(tmp_path, tiny_models, ray_address):
    gate = RefGate(free=0, held=10**6, auto_open=False)  # the first run holds
    rows = gate.gated(_rows(60, prefix="l"), per=4)
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    config = write_config(tmp_path / "job.yaml", tiny_models, references=REFERENCES)
    out = tmp_path / "out"
    args = ("render", str(manifest), "--output", str(out), "--config", str(config),
            "--address", ray_address, "--no-progress")
    try:
        first = _start(args)
        assert _wait_for(first, lambda: (out / "_job" / "lease.json").exists() and bool(gate.waiting), timeout=120)
        second = run_cli(*args)
        gate.open.set()
        stdout, stderr = first.communicate(timeout=300)
    finally:
        gate.close()
    assert second.returncode == 2
    assert "another klein-ray job" in second.stderr and "Traceback" not in second.stderr
    assert first.returncode == 0, stderr[-3000:]
    assert last_json(stdout)["committed"] == len(rows)


def _errors(data: bytes) -> list[dict]:
    import io

    import pyarrow.parquet as pq

    return pq.ParquetFile(io.BytesIO(data)).read().to_pylist()[:5] if data else []
