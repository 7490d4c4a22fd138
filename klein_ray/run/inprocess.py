"""The in-process executor: ``RenderWorker``s on threads of this process, no Ray.

For a laptop or a debugger (``klein-ray render --executor local``: breakpoints in the worker
work, one process to profile) and for the tests of the driver's retry policy, which run in
seconds here. Workers load their models on a background thread, one after another (so
``wait_ready`` can time out and notice an interrupt, as with Ray; one at a time because
diffusers' loading patches torch globally and two loads on threads corrupt each other), and
each unit runs on a thread of its own, so a worker runs up to ``in_flight_per_actor`` units at
once (the driver gives it no more), exactly as a Ray actor's concurrent calls do: the worker
serialises only the model.

What it cannot do is what a process boundary gives. Threads cannot be killed: a worker that
hangs past ``run.unit_timeout_s`` is abandoned (its thread and its model's memory stay until
they return or the process exits) and a fresh worker is built for its slot; whatever the
abandoned call returns later is dropped. Unit threads are daemons, so neither a hung call nor a
unit still in flight when a run stops keeps the process from exiting; but a thread cut off
inside torch as the interpreter exits aborts it, so the CLI ends a process that still has unit
threads (``units_running``) with ``os._exit`` (the commit protocol makes a commit cut short
harmless). A crash takes the driver with it, and ``num_cpus`` / ``num_gpus`` reserve nothing
(every worker uses this process's device and its torch threads).
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Callable

from klein_ray.run.executor import (
    Call,
    Executor,
    Outcome,
    Pool,
    WorkerFailed,
    WorkerSpec,
    take_hung,
    wait_for_loads,
    wait_seconds,
)
from klein_ray.run.worker import RenderWorker
from klein_ray.types import WorkUnit

_unit_threads: weakref.WeakSet[threading.Thread] = weakref.WeakSet()


def units_running() -> int:
    """Unit threads of this process still running: hung, abandoned, or cut off by a stop."""
    return sum(1 for thread in list(_unit_threads) if thread.is_alive())


class InProcessExecutor(Executor):
    """Runs every pool's workers in this process. ``worker_factory`` builds a worker from its
    spec (``RenderWorker`` by default; tests wrap it to inject faults); ``clock`` is what unit
    deadlines are measured on (tests move it to make a unit overdue at a chosen moment). A
    pool's workers are futures of their ``RenderWorker`` (each loading on the loader thread)."""

    def __init__(self, worker_factory: Callable[[WorkerSpec], RenderWorker] = RenderWorker,
                 clock: Callable[[], float] = time.monotonic):
        self._factory = worker_factory
        self._clock = clock
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="klein-ray-load")  # one load at a time
        self._futures: dict[Future, Call] = {}
        self._reloads: dict[Future, tuple[Pool, int]] = {}  # workers still loading: later, or replacing hung ones

    def cluster_cpus(self) -> float:
        return float(os.cpu_count() or 1)

    def start_pool(self, spec: WorkerSpec, count: int, num_cpus: float, num_gpus: float) -> Pool:
        def launch() -> Future:
            return self._loader.submit(self._factory, spec)

        return Pool(spec.variant, [launch() for _ in range(count)],
                    unit_timeout=spec.config.run.unit_timeout_s, launch=launch)

    def wait_ready(self, pools: list[Pool], timeout: float, stop) -> dict[str, BaseException]:
        pending = {loading: (pool, i) for pool in pools for i, loading in enumerate(pool.workers)}

        def poll(futures: list[Future], seconds: float):
            done, _ = wait(futures, timeout=seconds, return_when=FIRST_COMPLETED)
            return [(future, future.exception()) for future in done]

        failed, later = wait_for_loads(pending, poll, timeout, stop)
        self._reloads.update(later)  # they join when loaded, like a replacement for a hung one
        return failed

    def submit(self, pool: Pool, unit: WorkUnit) -> None:
        index = pool.least_loaded()
        worker: RenderWorker = pool.workers[index].result()
        call = Call.start(pool, index, unit, self._clock())  # the deadline runs from before it starts
        self._futures[_on_daemon_thread(worker.render_unit, unit, f"klein-ray-{pool.variant}-{index}")] = call

    @property
    def in_flight(self) -> int:
        return len(self._futures)

    def collect(self, timeout: float) -> list[tuple[WorkUnit, Outcome]]:
        waiting = list(self._futures) + list(self._reloads)
        if not waiting:
            return []
        done, _ = wait(waiting, timeout=wait_seconds(self._futures.values(), timeout, self._clock()),
                       return_when=FIRST_COMPLETED)
        finished = []
        for future in done:
            if future in self._reloads:
                self._settle_reload(future)
                continue
            call = self._futures.pop(future)
            call.pool.in_flight[call.index] -= 1
            error = future.exception()
            finished.append((call.unit, WorkerFailed(error) if error is not None else future.result()))
        for pool, index, lost in take_hung(self._futures, self._clock()):
            # The hung call's thread runs on; its future is forgotten, so what it returns is dropped.
            pool.workers[index] = pool.launch()
            pool.down.add(index)
            self._reloads[pool.workers[index]] = (pool, index)
            finished.extend(lost)
        return finished

    def _settle_reload(self, loading: Future) -> None:
        pool, index = self._reloads.pop(loading)
        pool.down.discard(index)
        if loading.cancelled() or loading.exception() is not None:
            pool.dead.add(index)

    def shutdown_pool(self, pool: Pool) -> None:
        for loading in pool.workers:
            loading.cancel()
        # Calls still running are abandoned (daemon threads): their outcomes are never reported.
        self._futures = {f: c for f, c in self._futures.items() if c.pool is not pool}
        self._reloads = {f: v for f, v in self._reloads.items() if v[0] is not pool}

    def shutdown(self, pools: list[Pool]) -> None:
        super().shutdown(pools)
        self._loader.shutdown(wait=False, cancel_futures=True)


def _on_daemon_thread(fn: Callable[[WorkUnit], Outcome], unit: WorkUnit, name: str) -> Future:
    """``fn(unit)`` on a daemon thread of its own: one that never returns cannot hold the
    process at exit (a pool's threads would: they are joined when the interpreter exits)."""
    future: Future = Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(unit))
        except BaseException as exc:  # noqa: BLE001 - reported as the unit's outcome
            future.set_exception(exc)

    thread = threading.Thread(target=run, name=name, daemon=True)
    _unit_threads.add(thread)
    thread.start()
    return future
