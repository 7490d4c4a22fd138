"""The executor seam: *how* work units run, behind one interface the driver schedules through.

The driver decides what runs and when (which unit, retries, failures); an executor decides how:
it starts a variant's pool of workers, takes units, and reports each unit's outcome. Two
implementations: ``ray_executor.RayExecutor`` (actors on a Ray cluster, what ``render`` uses)
and ``inprocess.InProcessExecutor`` (``RenderWorker``s on threads of this process: a laptop, a
debugger, the retry-policy tests). This module never imports either.

An outcome is what the worker returned (``UnitOutcome``: every row a result or an error), or
one of two shared failure types: ``WorkerLost`` (the worker went away under the unit: killed,
preempted, node lost) and ``WorkerFailed`` (the worker raised; ``cause`` is the original
exception, so the driver classifies by type, never by message).

A worker that hangs is found here too: a unit whose outcome has not come back within
``run.unit_timeout_s`` of its submission means its worker is stuck (a wedged driver call, a
deadlocked library). Measured from submission because that is when the call starts: the driver
gives a worker at most ``in_flight_per_actor`` units and the worker runs that many calls at
once, so a unit waits only behind the others' turns at the model, which the generous deadline
covers. The executor then replaces that worker and reports each of its units ``WorkerLost``,
exactly as when its process dies; the retry policy does the rest. A late outcome of an
abandoned call is never reported.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterable, Union

from klein_ray.config import JobConfig
from klein_ray.run.metrics import RunMetrics
from klein_ray.types import UnitOutcome, WorkUnit, first_line


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to load its variant and commit rows; sent to every worker."""

    variant: str
    config: JobConfig
    output_uri: str
    source: str  # normalised: absolute local path, s3:// prefix or Hub repo id
    threads: int | None
    check_markers: bool = True  # False only for an output that had no marker when the job began
    # The job's most common planned (width, height, references) for this variant, most common
    # first: what a compiling worker warms up at load (see klein_ray.model.accel.warmup_plan).
    warmup_sizes: tuple[tuple[int, int, int], ...] = ()


@dataclass(frozen=True)
class WorkerLost:
    """The worker running a unit died (process killed, node lost); the unit can run again."""

    reason: str

    def __str__(self) -> str:
        return self.reason


@dataclass(frozen=True)
class WorkerFailed:
    """The worker raised while running a unit; ``cause`` is the original exception."""

    cause: BaseException

    def __str__(self) -> str:
        return f"{type(self.cause).__name__}: {first_line(self.cause)}"


Outcome = Union[UnitOutcome, WorkerLost, WorkerFailed]


@dataclass
class Pool:
    """One variant's workers and what the executor knows of each (by index)."""

    variant: str
    workers: list[Any]  # executor-specific handles
    in_flight: dict[int, int] = field(default_factory=dict)  # worker index -> units queued
    down: set[int] = field(default_factory=set)  # restarting: no work until it answers again
    dead: set[int] = field(default_factory=set)  # gone for good
    unit_timeout: float = math.inf  # run.unit_timeout_s: past it, a worker counts as hung
    launch: Callable[[], Any] | None = None  # starts one more worker like these (replaces a hung one)

    def __post_init__(self) -> None:
        self.in_flight = self.in_flight or {i: 0 for i in range(len(self.workers))}

    @property
    def healthy(self) -> list[int]:
        return [i for i in self.in_flight if i not in self.down and i not in self.dead]

    @property
    def all_dead(self) -> bool:
        return len(self.dead) == len(self.workers)

    def least_loaded(self) -> int:
        """The healthy worker with the fewest units queued (submit only while one is healthy)."""
        return min(self.healthy, key=self.in_flight.__getitem__)


@dataclass
class Call:
    """A unit in flight: on which worker, and when it is overdue."""

    pool: Pool
    index: int
    unit: WorkUnit
    due: float  # when (the executor's clock: time.monotonic) its outcome must be back by

    @classmethod
    def start(cls, pool: Pool, index: int, unit: WorkUnit, now: float) -> "Call":
        pool.in_flight[index] += 1
        return cls(pool, index, unit, now + pool.unit_timeout)


def wait_seconds(calls: Iterable[Call], timeout: float, now: float) -> float:
    """How long ``collect`` may wait: ``timeout``, or less when a call falls due sooner."""
    due = min((c.due for c in calls), default=math.inf)
    return max(0.0, min(timeout, due - now))


def take_hung(calls: dict[Hashable, Call], now: float) -> list[tuple[Pool, int, list[tuple[WorkUnit, Outcome]]]]:
    """Remove from ``calls`` (those still running) every call on a worker that has an overdue
    one: that worker counts as hung and its units are lost with it. Returns, per hung worker,
    its pool, index and units with their ``WorkerLost``; the caller replaces the worker."""
    hung: dict[tuple[int, int], Call] = {}
    for call in calls.values():
        if call.due <= now:
            hung.setdefault((id(call.pool), call.index), call)
    taken = []
    for culprit in hung.values():
        pool, index, limit = culprit.pool, culprit.index, culprit.pool.unit_timeout
        lost = []
        for key in [k for k, c in calls.items() if c.pool is pool and c.index == index]:
            call = calls.pop(key)
            pool.in_flight[index] -= 1
            if call.due <= now:
                reason = (f"unit {call.unit.unit_id} ({call.unit.size} row(s)) exceeded "
                          f"run.unit_timeout_s ({limit:g} s); its worker was replaced")
            else:
                reason = (f"its worker was replaced: unit {culprit.unit.unit_id} on it exceeded "
                          f"run.unit_timeout_s ({limit:g} s)")
            lost.append((call.unit, WorkerLost(reason)))
        taken.append((pool, index, lost))
    return taken


class Executor(ABC):
    """Runs work units on pools of workers; reports outcomes. Holds no scheduling policy."""

    @abstractmethod
    def cluster_cpus(self) -> float:
        """CPUs the workers can share (CPU actors split them into torch threads)."""

    @abstractmethod
    def start_pool(self, spec: WorkerSpec, count: int, num_cpus: float, num_gpus: float) -> Pool:
        """Start ``count`` workers of ``spec.variant``; they load their model in the background."""

    @abstractmethod
    def wait_ready(self, pools: list[Pool], timeout: float,
                   stop: Callable[[], bool]) -> dict[str, BaseException]:
        """Wait until every pool has a worker with its model loaded; return the variants that
        have none, with why (a load error, or ``TimeoutError`` after ``timeout`` seconds). The
        pools' other workers join as they finish loading (down until then; dead if their load
        fails). Returns early, reporting nothing more, once ``stop()`` is true (an interrupt)."""

    @abstractmethod
    def submit(self, pool: Pool, unit: WorkUnit) -> None:
        """Give ``unit`` to the least-loaded healthy worker of ``pool``."""

    @property
    @abstractmethod
    def in_flight(self) -> int:
        """Units submitted and not yet collected."""

    @abstractmethod
    def collect(self, timeout: float) -> list[tuple[WorkUnit, Outcome]]:
        """Units finished since the last call (waiting up to ``timeout`` s for the first), and
        the units of workers found hung (``WorkerLost``; those workers are being replaced)."""

    @abstractmethod
    def shutdown_pool(self, pool: Pool) -> None:
        """Stop the pool's workers (their units in flight are abandoned)."""

    def metrics(self) -> RunMetrics:
        """Where the run's metrics go (this base: nowhere)."""
        return RunMetrics()

    def shutdown(self, pools: list[Pool]) -> None:
        """Stop every pool and release what the executor holds."""
        for pool in pools:
            self.shutdown_pool(pool)


def wait_for_loads(pending: dict[Hashable, tuple[Pool, int]], poll: Callable[[list, float], Iterable[tuple]],
                   timeout: float, stop: Callable[[], bool],
                   every: float = 0.5) -> tuple[dict[str, BaseException], dict[Hashable, tuple[Pool, int]]]:
    """``wait_ready``'s loop for any executor: ``pending`` maps a handle on one worker's model
    load to its (pool, index); ``poll(handles, seconds)`` waits up to ``seconds`` and returns
    ``(handle, error or None)`` for the loads that finished. Polls so that ``stop()`` is noticed.

    Returns as soon as every pool has one worker ready (work can start; a cluster short of
    resources, or still scaling up, must not hold the whole job) or none can be: the variants
    with no worker ready (why: the first load error, or ``TimeoutError``), and the loads still
    pending, whose workers are marked down (the executor lets them join once loaded). A worker
    whose load failed in a pool that has a ready one is marked dead."""
    errors: dict[str, BaseException] = {}
    ready: set[int] = set()  # ids of pools with a worker ready
    pools = {id(pool): pool for pool, _ in pending.values()}
    deadline = time.monotonic() + timeout

    def waiting_for() -> set[int]:
        return {id(pool) for pool, _ in pending.values()} - ready

    while waiting_for() and not stop() and time.monotonic() <= deadline:
        for handle, error in poll(list(pending), every):
            pool, index = pending.pop(handle)
            if error is None:
                ready.add(id(pool))
            else:
                errors.setdefault(pool.variant, error)
                pool.dead.add(index)
    failed = {}
    for key, pool in pools.items():
        if key not in ready:
            failed[pool.variant] = errors.get(pool.variant) or TimeoutError(
                f"no worker loaded its model within {timeout:.0f} s")
    later = {h: (pool, i) for h, (pool, i) in pending.items() if id(pool) in ready}
    for pool, index in later.values():
        pool.down.add(index)
    return failed, later
