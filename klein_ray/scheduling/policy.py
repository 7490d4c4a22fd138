"""The retry policy: what happens to a unit after its outcome, by failure class. No I/O, no state.

``settle(unit, outcome)`` says which rows were committed, which units run again (first, in
order) and which rows failed for good. The driver applies it; tests can read it directly.

| outcome                                   | what happens                                        |
|-------------------------------------------|-----------------------------------------------------|
| rows committed                            | recorded                                            |
| a row's store error                       | that row alone again, until MAX_ROW_FAILURES        |
| a row's fetch / encode / input error      | the row fails (running it again gives the same)     |
| the worker ran out of memory (batch > 1)  | the same rows as two halves                         |
| the worker raised (batch > 1)             | each row alone, so one poisonous row sinks only itself |
| the worker raised (one row)               | again, until MAX_ROW_FAILURES, then the row fails   |
| the worker was lost under the unit      | the whole unit again; split into single rows after |
| (it died, or hung past unit_timeout_s)    | MAX_LOST; a single row fails                        |

A retried unit is a subset of the rows of the one it replaces with ``attempt`` one higher, so
its rows' history (``failures``, ``losses``) travels with it and nothing here needs memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from klein_ray.executors.base import Outcome, WorkerFailed, WorkerLost
from klein_ray.types import RenderOOM, RowError, RowResult, UnitOutcome, WorkUnit

MAX_ROW_FAILURES = 3  # a row whose render or store keeps failing
MAX_LOST = 4  # a unit whose worker keeps dying under it
RETRIED_STAGES = ("store",)  # row errors worth another try (storage outages outlast retries)


@dataclass
class Settlement:
    """What became of one unit's rows."""

    committed: list[RowResult] = field(default_factory=list)
    retry: list[WorkUnit] = field(default_factory=list)  # run these next, in this order
    failed: list[RowError] = field(default_factory=list)


def settle(unit: WorkUnit, outcome: Outcome) -> Settlement:
    """Decide the fate of ``unit``'s rows from its outcome."""
    if isinstance(outcome, UnitOutcome):
        settled = Settlement(committed=list(outcome.results))
        for error in outcome.errors:
            _retry_or_fail(unit, error, error.stage in RETRIED_STAGES, settled)
        return settled
    if isinstance(outcome, WorkerLost):
        return _lost(unit, outcome)
    if isinstance(outcome, WorkerFailed):
        return _failed(unit, outcome)
    raise TypeError(f"not an outcome: {type(outcome).__name__}")


def _failed(unit: WorkUnit, outcome: WorkerFailed) -> Settlement:
    if isinstance(outcome.cause, RenderOOM) and unit.size > 1:
        # Out of memory: the same rows in halves (each half keeps sharing its references).
        mid = (unit.size + 1) // 2
        return Settlement(retry=[_again(unit, unit.rows[:mid]), _again(unit, unit.rows[mid:])])
    if unit.size > 1:
        # Isolate: each row alone, so one poisonous row cannot sink its batchmates.
        return Settlement(retry=[_again(unit, (row,)) for row in unit.rows])
    settled = Settlement()
    error = RowError.from_exception(unit.rows[0], "render", outcome.cause, unit.attempt)
    _retry_or_fail(unit, error, True, settled)
    return settled


def _lost(unit: WorkUnit, outcome: WorkerLost) -> Settlement:
    """The worker died under the unit (killed, preempted, node lost): run it again, whole; a
    unit that keeps killing workers is split so that a poisonous row is found alone."""
    losses = unit.losses + 1
    if losses < MAX_LOST:
        return Settlement(retry=[_again(unit, unit.rows, losses=losses)])
    if unit.size > 1:
        return Settlement(retry=[_again(unit, (row,), losses=losses) for row in unit.rows])
    row = unit.rows[0]
    return Settlement(failed=[RowError.for_row(row, "render", "WorkerLost", str(outcome), unit.attempt)])


def _retry_or_fail(unit: WorkUnit, error: RowError, retry: bool, settled: Settlement) -> None:
    failures = unit.failures + 1
    error.attempts = unit.attempt
    if retry and failures < MAX_ROW_FAILURES:
        row = next(r for r in unit.rows if r.id == error.id)
        settled.retry.append(_again(unit, (row,), failures=failures))
    else:
        settled.failed.append(error)


def _again(unit: WorkUnit, rows: tuple, failures: int | None = None, losses: int | None = None) -> WorkUnit:
    """The next attempt at some of ``unit``'s rows (same unit id: it is the same work)."""
    return replace(unit, rows=tuple(rows), attempt=unit.attempt + 1,
                   failures=unit.failures if failures is None else failures,
                   losses=unit.losses if losses is None else losses)
