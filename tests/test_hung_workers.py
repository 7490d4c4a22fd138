"""A worker that hangs, on the in-process executor: past ``run.unit_timeout_s`` the worker is
abandoned and replaced, its unit runs again, and a row that hangs every time fails naming the
deadline. The executor's clock is moved forward the moment a call hangs, so a unit is overdue
exactly then (never because a render happened to be slow); the hung calls block on an event the
test sets at teardown. The Ray twin is in tests/test_chaos.py.
"""

from __future__ import annotations

import threading
import time

from helpers import assert_done, row
from test_inprocess import _config, _errors, _factory, _rows, _run

from klein_ray.config import JobConfig, RunConfig
from klein_ray.executors.inprocess import InProcessExecutor
from klein_ray.scheduling.driver import EXIT_OK, EXIT_ROWS_FAILED
from klein_ray.scheduling.policy import MAX_LOST
from klein_ray.types import RowError, UnitOutcome

HANG_TIMEOUT_S = 600.0  # run.unit_timeout_s in the hang tests: reached only by moving the clock


class _Clock:
    """The in-process executor's clock for unit deadlines: real time, moved forward by the test
    the moment a call hangs, so that it is overdue then and never by chance of a slow render."""

    def __init__(self):
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset

    def hang(self, release: threading.Event) -> None:
        self.offset += HANG_TIMEOUT_S
        release.wait()


def _hang_config(tiny_models) -> JobConfig:
    # One unit at a time on the one worker: a hung unit is alone on its worker.
    config = _config(tiny_models, batch_size=2)
    return config.model_copy(update={"run": RunConfig(in_flight_per_actor=1, unit_timeout_s=HANG_TIMEOUT_S)})


def _has(unit, row_id: str) -> bool:
    return any(r.id == row_id for r in unit.rows)


def test_a_hung_worker_is_replaced_and_its_unit_runs_again(tmp_path, tiny_models):
    clock, release, late = _Clock(), threading.Event(), threading.Event()
    built = []

    def hang_first_worker_on_r1(worker):
        built.append(worker)
        first, render = len(built) == 1, worker.render_unit

        def render_unit(unit):
            if not _has(unit, "r1"):
                return render(unit)
            if first:  # hung; once released, an outcome the driver must drop (the call was abandoned)
                clock.hang(release)
                outcome = UnitOutcome(unit.unit_id, errors=[RowError.for_row(
                    r, "render", "LateOutcome", "the abandoned call's outcome") for r in unit.rows])
                late.set()
                return outcome
            release.set()  # the retry on the replacement: let the abandoned call return first
            late.wait(60)
            return render(unit)
        worker.render_unit = render_unit

    try:
        summary, code, store = _run(tmp_path, _hang_config(tiny_models), _rows(6), lambda: InProcessExecutor(
            _factory(hang_first_worker_on_r1), clock=clock))
    finally:
        release.set()
    assert code == EXIT_OK and (summary["committed"], summary["failed"]) == (6, 0)
    assert len(built) == 2  # the hung worker and its replacement
    meta = assert_done(store, "r1")
    assert meta["attempt"] == 2 and meta["batch"]["size"] == 2  # whole again, not split
    assert meta["worker"] == assert_done(store, "r5")["worker"]  # the replacement rendered on
    for i in range(6):
        assert_done(store, f"r{i}")


def test_a_row_that_hangs_every_time_fails_naming_the_deadline(tmp_path, tiny_models):
    clock, release, built = _Clock(), threading.Event(), []

    def hang_on_stuck(worker):
        built.append(worker)
        render = worker.render_unit

        def render_unit(unit):
            if _has(unit, "stuck"):
                clock.hang(release)
                return UnitOutcome(unit.unit_id)  # released at teardown: no torch left running
            return render(unit)
        worker.render_unit = render_unit

    # Another size: the stuck row is a unit of its own.
    rows = _rows(4) + [row(id="stuck", prompt="a stuck render", width=80, height=64, seed=7)]
    try:
        summary, code, store = _run(tmp_path, _hang_config(tiny_models), rows, lambda: InProcessExecutor(
            _factory(hang_on_stuck), clock=clock))
    finally:
        release.set()
    assert code == EXIT_ROWS_FAILED and (summary["committed"], summary["failed"]) == (4, 1)
    error = _errors(store)["stuck"]
    assert (error["stage"], error["error_type"]) == ("render", "WorkerLost")
    assert "exceeded run.unit_timeout_s (600 s)" in error["message"]
    assert error["attempts"] == MAX_LOST
    assert len(built) >= MAX_LOST  # the first worker, and a replacement for every retry
    for i in range(4):
        assert_done(store, f"r{i}")
