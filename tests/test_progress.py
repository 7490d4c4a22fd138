"""`_job/progress.json` while a run goes on, and what `status` shows of it: the watch's counts
and its timing on a clock the test moves, then a real in-process run held mid-way (a worker
blocked on an event the test releases) whose progress file says "running" with the rows
committed so far, and "finished" at the end."""

from __future__ import annotations

import json
import threading
from collections import Counter

import pytest
from helpers import row, write_manifest

from klein_ray.config import JobConfig, RunConfig, VariantConfig
from klein_ray.executors.inprocess import InProcessExecutor
from klein_ray.executors.metrics import RunMetrics
from klein_ray.output.layout import PROGRESS
from klein_ray.scheduling import telemetry
from klein_ray.scheduling.driver import Driver, RenderJob
from klein_ray.scheduling.policy import Settlement
from klein_ray.storage import LocalStore
from klein_ray.types import RowError, RowResult, WorkUnit
from klein_ray.worker.render import RenderWorker


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class _Recorded(RunMetrics):
    def __init__(self):
        self.events: list[tuple] = []

    def committed(self, variant, n):
        self.events.append(("committed", variant, n))

    def failed(self, variant, stage, n):
        self.events.append(("failed", variant, stage, n))

    def stage_seconds(self, variant, stage, seconds):
        self.events.append(("seconds", variant, stage))


def _result(i: int, already: bool = False) -> RowResult:
    return RowResult(id=f"r{i}", variant="tiny", image_key="k", meta_key="m", sha256="s", bytes=1,
                     width=1, height=1, seed=i, prompt="p", timings={"render": 0.5, "store": 0.1},
                     worker="w", already=already)


def test_the_watch_counts_and_writes_when_due():
    clock, written, metrics = _Clock(), [], _Recorded()
    watch = telemetry.RunWatch("run-1", total=10, done_before=2, pending=Counter(tiny=8),
                               write=written.append, metrics=metrics, clock=clock)
    unit = WorkUnit(unit_id=1, variant="tiny", width=64, height=64, steps=None, guidance=1.0,
                    references=(), rows=())
    watch.submitted(unit)
    watch.tick()
    assert len(written) == 1 and written[0]["state"] == "running"  # the first tick writes
    clock.now += 2
    watch.returned(unit)
    error = RowError(id="r9", stage="store", error_type="X", message="m")
    watch.settled("tiny", Settlement(committed=[_result(1), _result(2), _result(3, already=True)],
                                     failed=[error]))
    watch.tick()
    assert len(written) == 1  # not due yet
    clock.now += telemetry.PROGRESS_EVERY_S
    watch.tick()
    p = written[-1]
    assert (p["committed"], p["committed_this_run"], p["skipped"], p["failed"], p["remaining"]) == (4, 2, 1, 1, 4)
    assert p["rows_per_second"] == round(2 / (2 + telemetry.PROGRESS_EVERY_S), 3)
    assert p["eta_seconds"] == round(4 / p["rows_per_second"], 1)
    # pending: what is left to settle (before, it stayed the starting count: at the end of a run
    # it read like work left); to_render: the starting count.
    assert p["variants"]["tiny"] == {"to_render": 8, "pending": 4, "committed": 2, "skipped": 1, "failed": 1,
                                     "in_flight": 0}
    watch.finish("finished")
    assert written[-1]["state"] == "finished" and written[-1]["eta_seconds"] is None
    assert ("committed", "tiny", 2) in metrics.events and ("failed", "tiny", "store", 1) in metrics.events
    assert metrics.events.count(("seconds", "tiny", "render")) == 2


def test_progress_is_written_during_a_run_and_status_shows_it(tmp_path, tiny_models, monkeypatch, capsys):
    monkeypatch.setattr(telemetry, "PROGRESS_EVERY_S", 0.0)  # every loop turn
    out = tmp_path / "out"
    seen_running = threading.Event()
    release = threading.Event()

    class Held(RenderWorker):
        calls = 0

        def render_unit(self, unit):
            Held.calls += 1
            if Held.calls == 3:  # two units committed: hold the third until the test has looked
                release.wait(60)
            return super().render_unit(unit)

    rows = [row(id=f"p{i}", prompt=f"a chair {i}", width=64, height=64, seed=i) for i in range(8)]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    config = JobConfig(default_variant="tiny", run=RunConfig(in_flight_per_actor=1), variants={
        "tiny": VariantConfig(source=str(tiny_models["tiny"]), pipeline="distilled", batch_size=2)})
    driver = Driver(RenderJob(str(manifest), str(out), config), lambda: InProcessExecutor(Held.load))
    result = {}
    runner = threading.Thread(target=lambda: result.update(zip(("summary", "code"), driver.run())))
    runner.start()
    try:
        store = LocalStore(out)
        while not seen_running.is_set() and runner.is_alive():
            try:
                p = json.loads(store.get(PROGRESS))
            except Exception:
                release.wait(0.02)  # a polling interval, not a synchronisation: Held holds the run
                continue
            if p["state"] == "running" and p["committed"] == 4 and p["in_flight"] == 2:
                seen_running.set()
                from klein_ray.cli import main

                assert main(["status", str(out)]) == 0
                shown = capsys.readouterr().out
                assert "running" in shown and "in flight" in shown
                assert p["total"] == 8 and p["remaining"] == 4 and p["run_id"] == driver.run_id
            release.wait(0.02)
    finally:
        release.set()
        runner.join(120)
    assert seen_running.is_set(), "never saw the run's progress mid-way"
    assert result["code"] == 0
    final = json.loads(LocalStore(out).get(PROGRESS))
    assert final["state"] == "finished" and final["committed"] == 8 and final["in_flight"] == 0


@pytest.mark.subprocess
def test_json_log_lines_for_log_shippers(tmp_path, tiny_models):
    """`--log-format json`: every stderr line is one JSON object; run events carry their name
    and fields; the secret in the environment appears nowhere."""
    import os

    from helpers import last_json, run_cli, write_config

    rows = [row(id=f"j{i}", prompt=f"a vase {i}", width=64, height=64, seed=i) for i in range(3)]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    config = write_config(tmp_path / "job.yaml", tiny_models)
    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYSECRETKEY"
    proc = run_cli("--log-format", "json", "render", str(manifest), "--output", str(tmp_path / "out"),
                   "--config", str(config), "--no-progress", "--executor", "local",
                   env=dict(os.environ, AWS_SECRET_ACCESS_KEY=secret))
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stderr.strip().splitlines()]
    events = {line.get("event"): line for line in lines}
    assert {"run_start", "variant_ready", "run_finish"} <= events.keys()
    assert events["run_finish"]["committed"] == 3 and events["run_start"]["rows"] == 3
    assert events["variant_ready"]["variant"] == "tiny"
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    assert secret not in proc.stderr + proc.stdout
    assert last_json(proc.stdout)["committed"] == 3
