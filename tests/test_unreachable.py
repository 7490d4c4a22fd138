"""Stopping a run early: ``Driver.abort`` from another thread, and exit 75 when the output
storage is unreachable (the store stops answering mid-run, or is down from the start). Nothing
is lost either way: a re-run finishes every row exactly once.

The in-process executor and moto behind the fault proxy; a run is held at a chosen point with
events, and the store "dies" at a chosen request (the proxy starts failing every request right
after a given commit marker landed), never after a sleep.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time

import pytest
from faultproxy import FaultProxy
from helpers import assert_done, last_json, lease_released, row, run_cli, write_config, write_manifest

from klein_ray.config import JobConfig, RunConfig, StorageConfig, VariantConfig
from klein_ray.executors.base import WorkerFailed
from klein_ray.executors.inprocess import InProcessExecutor
from klein_ray.output.layout import RESULTS, SUMMARY, meta_key
from klein_ray.scheduling.driver import EXIT_OK, EXIT_TEMPFAIL, Driver, RenderJob
from klein_ray.scheduling.stopping import OutageWatch
from klein_ray.storage import LocalStore, StorageError, open_store
from klein_ray.storage.base import StorageUnavailable
from klein_ray.types import RowError, RowResult, RowSpec, UnitOutcome
from klein_ray.worker.render import RenderWorker

TRY_LATER = "nothing is lost, run the same command again later"


def _rows(n: int) -> list[dict]:
    return [row(id=f"r{i}", prompt=f"a product shot r{i}", width=64, height=64, seed=i) for i in range(n)]


# -- Driver.abort ---------------------------------------------------------------------------


@pytest.mark.parametrize("write_log", [False, True])
def test_abort_from_another_thread_stops_issuing_work_and_settles_what_is_in_flight(
        tmp_path, tiny_models, write_log):
    entered, go = threading.Event(), threading.Event()

    def make(spec):
        worker = RenderWorker.load(spec)
        render = worker.render_unit

        def render_unit(unit):
            if any(r.id == "r2" for r in unit.rows):
                entered.set()  # r2 is in flight: the moment the abort comes
                go.wait(60)
            return render(unit)
        worker.render_unit = render_unit
        return worker

    config = JobConfig(variants={"tiny": VariantConfig(source=str(tiny_models["tiny"]), pipeline="distilled",
                                                       batch_size=1)}, run=RunConfig(in_flight_per_actor=2))
    manifest, out = write_manifest(tmp_path / "m.parquet", _rows(8)), tmp_path / "out"
    driver = Driver(RenderJob(str(manifest), str(out), config), lambda: InProcessExecutor(make))

    def lose_the_lease():  # what the lease's renewal thread does
        entered.wait(60)
        driver.abort("the output's lease was lost (test)", EXIT_TEMPFAIL, write_log=write_log)
        driver.abort("a later stop", 1)  # the first stop wins
        go.set()

    aborter = threading.Thread(target=lose_the_lease)
    aborter.start()
    try:
        summary, code = driver.run()
    finally:
        go.set()
        aborter.join()
    store = LocalStore(out)
    assert code == EXIT_TEMPFAIL and summary["stopped"] == "the output's lease was lost (test)"
    assert not summary["interrupted"] and summary["failed"] == 0
    landed = {i for i in range(8) if store.head(meta_key(f"r{i}"))}
    assert 2 in landed  # in flight at the abort: it landed during the grace
    assert len(landed) == summary["committed"] < 8  # and nothing new was started
    assert (store.head(SUMMARY) is not None) == write_log  # the job log,
    assert any(store.list(RESULTS)) == write_log  # and the checkpoint: nothing under _job/ without
    assert lease_released(store)  # released: the store is reachable

    summary, code = Driver(RenderJob(str(manifest), str(out), config), InProcessExecutor).run()
    assert code == EXIT_OK and summary["committed"] == 8 - len(landed)
    for i in range(8):
        assert_done(store, f"r{i}")
    assert sum(1 for _ in store.list("images/")) == 8


# -- telling "unreachable" from other storage failures ---------------------------------------


def test_outage_watch_needs_evidence_and_a_window_without_commits():
    row_spec = RowSpec(id="a", prompt="p", variant="v", references=(), width=64, height=64, steps=None,
                       guidance=4.0, seed=1, seed_source="manifest", format="png")
    gone = RowError.for_row(row_spec, "store", "StorageUnavailable", "put s3://b/k: 503 SlowDown")
    refused = RowError.for_row(row_spec, "store", "StorageError", "put s3://b/k: 403 AccessDenied")
    committed = RowResult(id="b", variant="v", image_key="images/b.png", meta_key="meta/b.json",
                          sha256="0" * 64, bytes=1, width=64, height=64, seed=1, prompt="p",
                          timings={}, worker="w")
    watch = OutageWatch(window=0)
    watch.observe(UnitOutcome(1, errors=[refused]))  # a refusal says nothing about reachability
    assert watch.gone() is None
    watch.observe(UnitOutcome(1, errors=[gone]))
    assert watch.gone() == "put s3://b/k: 503 SlowDown"
    watch.observe(UnitOutcome(2, results=[committed]))  # something committed: it is back
    assert watch.gone() is None
    watch.observe(WorkerFailed(StorageUnavailable("get s3://b/meta/a.json: 500")))
    assert watch.gone() == "get s3://b/meta/a.json: 500"
    patient = OutageWatch(window=3600)
    patient.observe(UnitOutcome(1, errors=[gone]))
    assert patient.gone() is None  # not for an hour without a commit


def test_s3_tells_unreachable_from_refused(moto_s3, s3_env):
    s3_env(moto_s3)
    bucket = moto_s3.new_bucket()
    with FaultProxy(moto_s3.endpoint, rate=1.0, faults=("internal", "slowdown", "reset_before")) as proxy:
        cfg = StorageConfig(endpoint_url=proxy.url, max_attempts=2, outer_retry_seconds=0)
        with pytest.raises(StorageUnavailable, match="put s3://"):
            open_store(f"s3://{bucket}/out", cfg).put("k", b"x")
    with pytest.raises(StorageError) as refused:  # a bucket that is not there: no use trying later
        open_store(f"s3://{bucket}-missing/out", StorageConfig(endpoint_url=moto_s3.endpoint)).put("k", b"x")
    assert not isinstance(refused.value, StorageUnavailable)


# -- exit 75 from the CLI ------------------------------------------------------------------


class _DiesAfterCommits(FaultProxy):
    """Forwards everything until ``markers`` commit markers have landed, then fails every
    request (5xx and connection resets): the output store going away mid-run."""

    def __init__(self, upstream: str, markers: int):
        super().__init__(upstream, rate=0.0, faults=("internal", "slowdown", "reset_before"))
        self.markers, self.died_at = markers, None

    def _record(self, req, outcome) -> None:
        super()._record(req, outcome)
        if outcome == "forwarded" and req.method == "PUT" and "/meta/" in req.target:
            self.markers -= 1
            if self.markers == 0:
                self.died_at = time.monotonic()
                self.set_rate(1.0)


def _markers(store) -> dict[str, str]:
    return {o.key: hashlib.sha256(store.get(o.key)).hexdigest() for o in store.list("meta/")}


@pytest.mark.subprocess
def test_output_store_gone_mid_run_exits_75_and_a_rerun_finishes(tmp_path, tiny_models, moto_s3, s3_env):
    s3_env(moto_s3)  # this process reads OUT straight from moto
    rows = _rows(12)
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    out = f"s3://{moto_s3.new_bucket()}/out"
    env = {k: v for k, v in moto_s3.env().items() if k != "AWS_ENDPOINT_URL_S3"}
    with _DiesAfterCommits(moto_s3.endpoint, markers=2) as proxy:
        config = write_config(tmp_path / "job.yaml", tiny_models, storage={
            "endpoint_url": proxy.url, "max_attempts": 2, "outer_retry_seconds": 1,
            "connect_timeout": 2, "read_timeout": 2}, run={"unreachable_after_s": 2})
        args = ("render", str(manifest), "--output", out, "--config", str(config), "--executor", "local",
                "--no-progress")
        started = time.monotonic()
        first = run_cli(*args, env=env, timeout=300)
        ended = time.monotonic()
        assert first.returncode == EXIT_TEMPFAIL, first.stderr[-3000:]
        assert proxy.died_at is not None
        summary = last_json(first.stdout)
        assert "Traceback" not in first.stderr
        assert "output storage unreachable: " in first.stderr and TRY_LATER in first.stderr
        assert summary["stopped"].startswith("output storage unreachable: ") and summary["failed"] == 0
        store = open_store(out)
        before = _markers(store)
        assert 2 <= len(before) < len(rows) and summary["committed"] <= len(before)
        print(f"\nexit 75 after {ended - proxy.died_at:.1f} s of the store gone; first run "
              f"{ended - started:.1f} s")

        proxy.set_rate(0)  # the store is back
        second = run_cli(*args, env=env, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    resumed = last_json(second.stdout)
    assert resumed["committed"] + resumed["skipped"] == len(rows) and resumed["failed"] == 0
    after = _markers(store)
    assert {k: after[k] for k in before} == before  # what was committed stayed committed, as it was
    assert sorted(o.key for o in store.list("images/")) == sorted(f"images/r{i}.png" for i in range(12))
    for r in rows:
        assert_done(store, r["id"])


@pytest.mark.subprocess
def test_output_store_unreachable_from_the_start_exits_75(tmp_path, tiny_models, moto_s3):
    manifest = write_manifest(tmp_path / "m.parquet", _rows(1))
    out = f"s3://{moto_s3.new_bucket()}/out"
    env = {k: v for k, v in moto_s3.env().items() if k != "AWS_ENDPOINT_URL_S3"}
    with FaultProxy(moto_s3.endpoint, rate=1.0, faults=("internal", "reset_before")) as proxy:
        config = write_config(tmp_path / "job.yaml", tiny_models, storage={
            "endpoint_url": proxy.url, "max_attempts": 2, "outer_retry_seconds": 0})
        proc = run_cli("render", str(manifest), "--output", out, "--config", str(config),
                       "--executor", "local", "--no-progress", env=env, timeout=120)
    assert proc.returncode == EXIT_TEMPFAIL, proc.stderr[-3000:]
    assert "storage unreachable: " in proc.stderr and TRY_LATER in proc.stderr
    assert "Traceback" not in proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])  # it stopped before anything ran
    assert summary["committed"] == 0 and summary["stopped"].startswith("storage unreachable")
