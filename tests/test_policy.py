"""The retry policy as a pure function: every failure class, and the history a retried unit carries.

These pin the decisions; tests/test_inprocess.py shows the driver applying them to real renders.
"""

from __future__ import annotations

from dataclasses import replace

from klein_ray.executors.base import WorkerFailed, WorkerLost
from klein_ray.scheduling.policy import MAX_LOST, MAX_ROW_FAILURES, settle
from klein_ray.types import RenderOOM, RowError, RowResult, RowSpec, UnitOutcome, WorkUnit


def _row(i: int) -> RowSpec:
    return RowSpec(id=f"r{i}", prompt=f"p{i}", variant="v", references=("s3://b/ref.png",),
                   width=64, height=64, steps=None, guidance=4.0, seed=i, seed_source="manifest",
                   format="png", manifest_file="m.parquet", manifest_row=i)


def _unit(n: int, **history) -> WorkUnit:
    rows = tuple(_row(i) for i in range(n))
    return WorkUnit(7, "v", 64, 64, None, 4.0, ("s3://b/ref.png",), rows, **history)


def _result(row_id: str) -> RowResult:
    return RowResult(id=row_id, variant="v", image_key=f"images/{row_id}.png",
                     meta_key=f"meta/{row_id}.json", sha256="0" * 64, bytes=1, width=64, height=64,
                     seed=0, prompt="p", timings={}, worker="w")


def test_committed_rows_are_recorded_and_nothing_is_retried():
    unit = _unit(2)
    settled = settle(unit, UnitOutcome(unit.unit_id, results=[_result("r0"), _result("r1")]))
    assert [r.id for r in settled.committed] == ["r0", "r1"]
    assert settled.retry == [] and settled.failed == []


def test_out_of_memory_halves_the_batch_and_keeps_its_references():
    unit = _unit(5)
    settled = settle(unit, WorkerFailed(RenderOOM("out of memory")))
    assert [u.size for u in settled.retry] == [3, 2]
    assert [r for u in settled.retry for r in u.rows] == list(unit.rows)
    for half in settled.retry:
        assert (half.unit_id, half.references, half.width, half.attempt) == (7, unit.references, 64, 2)
        assert (half.failures, half.losses) == (0, 0)  # running out of memory is not the row's fault
    assert settled.failed == []


def test_out_of_memory_on_one_row_is_a_failure_of_that_row():
    unit = _unit(1)
    settled = settle(unit, WorkerFailed(RenderOOM("out of memory")))
    assert [u.failures for u in settled.retry] == [1]
    last = settle(replace(unit, failures=MAX_ROW_FAILURES - 1, attempt=3), WorkerFailed(RenderOOM("oom")))
    (error,) = last.failed
    assert (error.stage, error.error_type, error.attempts) == ("render", "RenderOOM", 3)


def test_a_raising_batch_is_split_so_a_poisonous_row_sinks_only_itself():
    unit = _unit(3)
    settled = settle(unit, WorkerFailed(RuntimeError("bad row")))
    assert [u.rows for u in settled.retry] == [(r,) for r in unit.rows]
    assert {u.attempt for u in settled.retry} == {2}
    assert all(u.failures == 0 for u in settled.retry)


def test_a_raising_single_row_is_retried_then_fails_with_its_attempts():
    unit = _unit(1, attempt=2)
    seen = []
    while True:
        settled = settle(unit, WorkerFailed(ValueError("always\nsecond line")))
        if not settled.retry:
            break
        (unit,) = settled.retry
        seen.append(unit.failures)
    assert seen == list(range(1, MAX_ROW_FAILURES))
    (error,) = settled.failed
    assert error.attempts == unit.attempt == 2 + MAX_ROW_FAILURES - 1
    assert (error.id, error.error_type, error.message) == ("r0", "ValueError", "always")
    assert (error.manifest_file, error.manifest_row) == ("m.parquet", 0)


def test_a_lost_worker_requeues_the_whole_unit_then_splits_then_fails():
    unit = _unit(2)
    for losses in range(1, MAX_LOST):
        (unit,) = settle(unit, WorkerLost("actor died")).retry
        assert (unit.size, unit.losses, unit.attempt) == (2, losses, losses + 1)
    singles = settle(unit, WorkerLost("actor died")).retry
    assert [u.rows for u in singles] == [(r,) for r in unit.rows]
    assert {u.losses for u in singles} == {MAX_LOST}
    (error,) = settle(singles[0], WorkerLost("node lost")).failed
    assert (error.id, error.error_type, error.message) == ("r0", "WorkerLost", "node lost")
    assert error.attempts == MAX_LOST + 1


def test_store_errors_are_retried_alone_other_row_errors_fail_at_once():
    unit = _unit(3)
    errors = [RowError.for_row(unit.rows[0], "store", "StorageError", "503"),
              RowError.for_row(unit.rows[1], "fetch", "ReferenceError", "404"),
              RowError.for_row(unit.rows[2], "encode", "OSError", "disk")]
    settled = settle(unit, UnitOutcome(unit.unit_id, errors=errors))
    (retry,) = settled.retry
    assert (retry.rows, retry.failures, retry.attempt) == ((unit.rows[0],), 1, 2)
    assert [(e.id, e.stage) for e in settled.failed] == [("r1", "fetch"), ("r2", "encode")]
    again = settle(replace(retry, failures=MAX_ROW_FAILURES - 1),
                   UnitOutcome(unit.unit_id, errors=[errors[0]]))
    assert again.retry == [] and [e.stage for e in again.failed] == ["store"]


def test_row_error_messages_share_one_cap():
    row = _row(0)
    long = RowError.from_exception(row, "render", RuntimeError("x" * 5000))
    assert len(long.message) <= 500 and long.message.endswith("...")
    assert RowError.from_exception(row, "render", RuntimeError()).message == "RuntimeError"
