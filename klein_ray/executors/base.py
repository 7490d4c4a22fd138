"""The executor seam: *how* work units run, behind one interface the driver schedules through.

The driver decides what runs and when (which unit, retries, failures); an executor decides how:
it starts a variant's pool of workers, takes units, and reports each unit's outcome.
``Executor`` is that interface. ``PoolExecutor`` is the loop every executor shares, as
datatrove's base executor owns its loop: it keeps each pool's books (units in flight per
worker, workers loading, down or dead), hands a unit to the least-loaded healthy worker, waits,
turns what came back into outcomes, finds hung workers and replaces them. A backend supplies
only its primitives (start a worker, a handle on its load, start a call, wait on handles, read
a call's or a load's result, retire a worker): ``ray_cluster.RayExecutor`` (actors on a Ray
cluster, what ``render`` uses) and ``inprocess.InProcessExecutor`` (workers on threads of this
process: a laptop, a debugger, the retry-policy tests). This module imports neither.

An outcome is what the worker returned (``UnitOutcome``: every row a result or an error), or
one of two shared failure types: ``WorkerLost`` (the worker went away under the unit: killed,
preempted, node lost; it gets no work until its model answers again) and ``WorkerFailed`` (the
worker raised; ``cause`` is the original exception, so the driver classifies by type, never by
message).

A worker that hangs is found here too: a unit whose outcome has not come back within
``run.unit_timeout_s`` of its submission means its worker is stuck (a wedged driver call, a
deadlocked library). Measured from submission because that is when the call starts: the driver
gives a worker at most ``in_flight_per_actor`` units and the worker runs that many calls at
once, so a unit waits only behind the others' turns at the model, which the generous deadline
covers. The executor then retires that worker, starts a fresh one in its slot and reports each
of its units ``WorkerLost``, exactly as when its process dies; the retry policy does the rest.
A late outcome of an abandoned call is never reported.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from klein_ray.executors.metrics import RunMetrics
from klein_ray.types import UnitOutcome, WorkUnit, first_line
from klein_ray.worker.spec import WorkerSpec

__all__ = ["AGAIN", "Call", "Executor", "Outcome", "Pool", "PoolExecutor", "WorkerFailed",
           "WorkerLost", "WorkerSpec"]


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


Outcome = UnitOutcome | WorkerLost | WorkerFailed


@dataclass
class Pool:
    """One variant's workers and what the executor knows of each (by index)."""

    variant: str
    workers: list[Any]  # executor-specific handles
    in_flight: dict[int, int] = field(default_factory=dict)  # worker index -> units queued
    down: set[int] = field(default_factory=set)  # loading or restarting: no work until it answers
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
    due: float  # when (the executor's clock) its outcome must be back by


class Executor(ABC):
    """What the driver schedules through: runs work units on pools of workers, reports outcomes.
    Holds no scheduling policy."""

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

    def map_tasks(self, fn: Callable[[Any], Any], items: Iterable[Any], in_flight: int = 8,
                  num_cpus: float = 1.0) -> Iterator[Any]:
        """``fn(item)`` for each item as an independent task (not on a render worker: a shard
        of an export, a slice of a verify), at most ``in_flight`` at once, results in the order
        of ``items``. An exception in a task is raised here, for that item. ``fn`` and the items
        must be picklable for executors that run tasks elsewhere. This base runs them here, one
        after another."""
        for item in items:
            yield fn(item)

    def metrics(self) -> RunMetrics:
        """Where the run's metrics go (this base: nowhere)."""
        return RunMetrics()

    def shutdown(self, pools: list[Pool]) -> None:
        """Stop every pool and release what the executor holds."""
        for pool in pools:
            self.shutdown_pool(pool)


AGAIN = object()  # a load handle's result: the worker is restarting, ask again with a new handle

Load = dict[Hashable, tuple[Pool, int]]  # a handle on a worker's load -> its (pool, index)


class PoolExecutor(Executor):
    """The loop every executor shares. A backend implements the primitives below; ``clock`` is
    what unit deadlines are measured on (tests move it to make a unit overdue at a set moment)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._calls: dict[Hashable, Call] = {}
        self._loads: Load = {}  # workers loading after wait_ready: late, restarting or replacing

    # -- the primitives ------------------------------------------------------------------

    @abstractmethod
    def _launch(self, spec: WorkerSpec, num_cpus: float, num_gpus: float) -> Any:
        """Start one worker (it loads its model in the background); its handle."""

    @abstractmethod
    def _load_handle(self, worker: Any) -> Hashable:
        """Something ``_wait`` can wait on that is done once ``worker``'s model is loaded."""

    @abstractmethod
    def _load_result(self, handle: Hashable) -> BaseException | object | None:
        """A finished load: None (ready), why it failed, or ``AGAIN`` (restarting: wait anew)."""

    @abstractmethod
    def _start_call(self, worker: Any, unit: WorkUnit, name: str) -> Hashable:
        """Start ``worker.render_unit(unit)``; a handle ``_wait`` can wait on."""

    @abstractmethod
    def _call_result(self, handle: Hashable) -> Outcome:
        """A finished call's outcome (the worker's ``UnitOutcome``, or why there is none)."""

    @abstractmethod
    def _wait(self, handles: list[Hashable], timeout: float) -> list[Hashable]:
        """Those of ``handles`` that are done, waiting up to ``timeout`` s for the first."""

    @abstractmethod
    def _retire(self, worker: Any) -> None:
        """Stop a worker for good (hung, or its pool shutting down); its calls are abandoned."""

    # -- the loop ------------------------------------------------------------------------

    def start_pool(self, spec: WorkerSpec, count: int, num_cpus: float, num_gpus: float) -> Pool:
        def launch() -> Any:
            return self._launch(spec, num_cpus, num_gpus)

        return Pool(spec.variant, [launch() for _ in range(count)],
                    unit_timeout=spec.config.run.unit_timeout_s, launch=launch)

    def wait_ready(self, pools: list[Pool], timeout: float, stop: Callable[[], bool],
                   every: float = 0.5) -> dict[str, BaseException]:
        """Returns as soon as every pool has one worker ready (work can start; a cluster short
        of resources, or still scaling up, must not hold the whole job) or none can be. Loads
        still pending join later (``collect`` settles them); a worker whose load failed in a pool
        that has a ready one is marked dead. Polls every ``every`` s so ``stop()`` is noticed."""
        pending: Load = {self._load_handle(w): (pool, i) for pool in pools for i, w in enumerate(pool.workers)}
        errors: dict[str, BaseException] = {}
        ready: set[int] = set()  # ids of pools with a worker ready
        deadline = time.monotonic() + timeout
        while {id(pool) for pool, _ in pending.values()} - ready and not stop() and time.monotonic() <= deadline:
            for handle in self._wait(list(pending), every):
                pool, index = pending.pop(handle)
                result = self._load_result(handle)
                if result is AGAIN:
                    pending[self._load_handle(pool.workers[index])] = (pool, index)
                elif result is None:
                    ready.add(id(pool))
                else:
                    errors.setdefault(pool.variant, result)  # type: ignore[arg-type]
                    pool.dead.add(index)
        for handle, (pool, index) in pending.items():
            if id(pool) in ready:
                pool.down.add(index)
                self._loads[handle] = (pool, index)
        return {pool.variant: errors.get(pool.variant) or TimeoutError(
            f"no worker loaded its model within {timeout:.0f} s") for pool in pools if id(pool) not in ready}

    def submit(self, pool: Pool, unit: WorkUnit) -> None:
        index = pool.least_loaded()
        due = self._clock() + pool.unit_timeout  # the deadline runs from before the call starts
        handle = self._start_call(pool.workers[index], unit, f"klein-ray-{pool.variant}-{index}")
        pool.in_flight[index] += 1
        self._calls[handle] = Call(pool, index, unit, due)

    @property
    def in_flight(self) -> int:
        return len(self._calls)

    def collect(self, timeout: float) -> list[tuple[WorkUnit, Outcome]]:
        waiting = list(self._calls) + list(self._loads)
        if not waiting:
            return []
        finished = []
        for handle in self._wait(waiting, _wait_seconds(self._calls.values(), timeout, self._clock())):
            if handle in self._loads:
                self._settle_load(handle)
                continue
            call = self._calls.pop(handle)
            call.pool.in_flight[call.index] -= 1
            outcome = self._call_result(handle)
            if isinstance(outcome, WorkerLost):  # dead or restarting: no work until it answers
                self._watch_load(call.pool, call.index)
            finished.append((call.unit, outcome))
        for pool, index, lost in _take_hung(self._calls, self._clock()):
            self._replace(pool, index)
            finished.extend(lost)
        return finished

    def shutdown_pool(self, pool: Pool) -> None:
        for worker in pool.workers:
            self._retire(worker)
        # Calls still running are abandoned: their outcomes are never reported.
        self._calls = {h: c for h, c in self._calls.items() if c.pool is not pool}
        self._loads = {h: w for h, w in self._loads.items() if w[0] is not pool}

    def _settle_load(self, handle: Hashable) -> None:
        pool, index = self._loads.pop(handle)
        result = self._load_result(handle)
        if result is AGAIN:
            self._loads[self._load_handle(pool.workers[index])] = (pool, index)
            return
        pool.down.discard(index)  # loaded (back to work), or dead
        if result is not None:
            pool.dead.add(index)

    def _watch_load(self, pool: Pool, index: int) -> None:
        if index in pool.down or index in pool.dead:
            return
        pool.down.add(index)
        self._loads[self._load_handle(pool.workers[index])] = (pool, index)

    def _replace(self, pool: Pool, index: int) -> None:
        """Retire a hung worker and start a fresh one in its slot, down until it has loaded."""
        self._retire(pool.workers[index])
        # A load handle on the old worker would fail and mark its successor dead: forget it.
        self._loads = {h: w for h, w in self._loads.items() if not (w[0] is pool and w[1] == index)}
        assert pool.launch is not None
        pool.workers[index] = pool.launch()
        pool.down.add(index)
        self._loads[self._load_handle(pool.workers[index])] = (pool, index)


def _wait_seconds(calls: Iterable[Call], timeout: float, now: float) -> float:
    """How long ``collect`` may wait: ``timeout``, or less when a call falls due sooner."""
    due = min((c.due for c in calls), default=math.inf)
    return max(0.0, min(timeout, due - now))


def _take_hung(calls: dict[Hashable, Call], now: float) -> list[tuple[Pool, int, list[tuple[WorkUnit, Outcome]]]]:
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
        lost: list[tuple[WorkUnit, Outcome]] = []
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
