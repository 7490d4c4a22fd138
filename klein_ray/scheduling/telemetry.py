"""What a run reports while it runs: ``_job/progress.json`` for schedulers and people, and
metrics for Prometheus, from one place the driver feeds (``RunWatch``).

The driver tells the watch what it submits and what each unit's settlement was; the watch keeps
per-variant counts, rewrites the progress file every ``PROGRESS_EVERY_S`` (through a writer the
driver gives it: the job log, or nothing once OUT is not ours to write), and forwards every
event to a ``RunMetrics``. Metrics are the executor's: the Ray executor exports them through
``ray.util.metrics`` (``executors/ray_metrics.py``); others export nothing (``RunMetrics`` itself).

Metric names: see ``executors/metrics.py``.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Protocol

from klein_ray.executors.metrics import RunMetrics
from klein_ray.scheduling.policy import Settlement
from klein_ray.types import WorkUnit

PROGRESS_EVERY_S = 5.0
STAGES = ("fetch", "render", "encode", "store")


class Progress(Protocol):
    """Where the driver reports rows settled (the CLI shows a bar; library use, nothing)."""

    def update(self, n: int) -> None: ...

    def close(self) -> None: ...


class Silent:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


class RunWatch:
    """Counts of one run, per variant, and the progress file written from them."""

    def __init__(self, run_id: str, total: int, done_before: int, pending: Counter,
                 write: Callable[[dict], None], metrics: RunMetrics | None = None,
                 errors: Callable[[], int] | None = None, clock: Callable[[], float] = time.monotonic,
                 refused: Callable[[], Counter] | None = None):
        self.run_id, self.total, self.done_before = run_id, total, done_before
        self.pending = Counter(pending)  # rows to render at the start, per variant
        self.write, self.metrics, self.clock = write, metrics or RunMetrics(), clock
        # Rows failed in this run, those refused before rendering (invalid, duplicate) included.
        self.errors = errors or (lambda: sum(self.failed.values()))
        self.refused = refused or Counter  # per variant: rows refused before rendering
        self.started = clock()
        self.started_at = _now()
        self.committed: Counter = Counter()
        self.skipped: Counter = Counter()
        self.failed: Counter = Counter()
        self.in_flight: dict[str, int] = defaultdict(int)  # rows
        self._units: dict[str, int] = defaultdict(int)
        self._written = -float("inf")
        self.state = "running"  # the driver says "loading" until every variant has a worker ready

    def submitted(self, unit: WorkUnit) -> None:
        self.in_flight[unit.variant] += unit.size
        self._units[unit.variant] += 1
        self.metrics.units_in_flight(unit.variant, self._units[unit.variant])

    def returned(self, unit: WorkUnit) -> None:
        self.in_flight[unit.variant] -= unit.size
        self._units[unit.variant] -= 1
        self.metrics.units_in_flight(unit.variant, self._units[unit.variant])

    def settled(self, variant: str, settlement: Settlement) -> None:
        for result in settlement.committed:
            if result.already:
                self.skipped[variant] += 1
                continue
            self.committed[variant] += 1
            for stage in STAGES:
                if stage in result.timings:
                    self.metrics.stage_seconds(variant, stage, result.timings[stage])
        if settlement.committed:
            self.metrics.committed(variant, sum(not r.already for r in settlement.committed))
        self.fail(variant, [e.stage for e in settlement.failed])

    def fail(self, variant: str, stages: list[str]) -> None:
        for stage, n in Counter(stages).items():
            self.failed[variant] += n
            self.metrics.failed(variant, stage, n)

    def tick(self, force: bool = False) -> None:
        """Rewrite the progress file if it is due (or ``force``)."""
        now = self.clock()
        if force or now - self._written >= PROGRESS_EVERY_S:
            self._written = now
            self.write(self.snapshot(self.state))

    def _left(self, variant: str) -> int:
        """The variant's rows still to settle (``pending``): what a re-run would render."""
        settled = self.committed[variant] + self.skipped[variant] + self.failed[variant] + self.refused()[variant]
        return max(0, self.pending[variant] - settled)

    def finish(self, state: str) -> None:
        self.write(self.snapshot(state))

    def snapshot(self, state: str) -> dict:
        """What ``_job/progress.json`` holds."""
        seconds = max(self.clock() - self.started, 1e-9)
        committed = sum(self.committed.values())
        rate = committed / seconds
        left = max(0, sum(self.pending.values()) - committed - sum(self.skipped.values())
                   - sum(self.failed.values()))
        return {
            "run_id": self.run_id, "state": state, "total": self.total,
            "committed": self.done_before + committed, "committed_this_run": committed,
            "skipped": sum(self.skipped.values()), "failed": self.errors(),
            "in_flight": sum(self.in_flight.values()), "remaining": left,
            "rows_per_second": round(rate, 3),
            "eta_seconds": round(left / rate, 1) if rate > 0 and state == "running" else None,
            "variants": {v: {"to_render": self.pending[v], "pending": self._left(v),
                             "committed": self.committed[v], "skipped": self.skipped[v],
                             "failed": self.failed[v], "in_flight": self.in_flight[v]}
                         for v in sorted(self.pending)},
            "started_at": self.started_at, "updated_at": _now(),
        }


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def counts(summary: dict) -> dict:
    """A run summary's figures, for the run_finish log event."""
    return {k: summary[k] for k in ("committed", "skipped", "failed", "seconds")}
