"""The in-process executor: ``RenderWorker``s on threads of this process, no Ray.

For a laptop or a debugger (``klein-ray render --executor local``: breakpoints in the worker
work, one process to profile) and for the tests of the driver's retry policy, which run in
seconds here. Workers load their models on a background thread, one after another (so
``wait_ready`` can time out and notice an interrupt, as with Ray; one at a time because
diffusers' loading patches torch globally and two loads on threads corrupt each other), and
each runs up to ``in_flight_per_actor`` units at once on a thread pool, exactly as a Ray actor's
concurrent calls do: the worker serialises only the model.

What it cannot do is what a process boundary gives: a worker that hangs hangs this process, a
crash takes the driver with it, and ``num_cpus`` / ``num_gpus`` reserve nothing (every worker
uses this process's device and its torch threads). Units in flight when the run is interrupted
finish before the process exits (threads cannot be killed).
"""

from __future__ import annotations

import os
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable

from klein_ray.run.executor import Executor, Outcome, Pool, WorkerFailed, WorkerSpec, wait_for_loads
from klein_ray.run.worker import RenderWorker
from klein_ray.types import WorkUnit

@dataclass
class _Slot:
    """One worker: its loading (a future of the worker) and the threads its units run on."""

    loading: Future
    calls: ThreadPoolExecutor


class InProcessExecutor(Executor):
    """Runs every pool's workers in this process. ``worker_factory`` builds a worker from its
    spec (``RenderWorker`` by default; tests wrap it to inject faults)."""

    def __init__(self, worker_factory: Callable[[WorkerSpec], RenderWorker] = RenderWorker):
        self._factory = worker_factory
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="klein-ray-load")  # one load at a time
        self._futures: dict[Future, tuple[Pool, int, WorkUnit]] = {}

    def cluster_cpus(self) -> float:
        return float(os.cpu_count() or 1)

    def start_pool(self, spec: WorkerSpec, count: int, num_cpus: float, num_gpus: float) -> Pool:
        slots = [_Slot(self._loader.submit(self._factory, spec),
                       ThreadPoolExecutor(spec.config.run.in_flight_per_actor,
                                          thread_name_prefix=f"klein-ray-{spec.variant}-{i}"))
                 for i in range(count)]
        return Pool(spec.variant, slots)

    def wait_ready(self, pools: list[Pool], timeout: float, stop) -> dict[str, BaseException]:
        pending = {slot.loading: pool for pool in pools for slot in pool.workers}

        def poll(futures: list[Future], seconds: float):
            done, _ = wait(futures, timeout=seconds, return_when=FIRST_COMPLETED)
            return [(future, future.exception()) for future in done]

        return wait_for_loads(pending, poll, timeout, stop)

    def submit(self, pool: Pool, unit: WorkUnit) -> None:
        index = pool.least_loaded()
        slot: _Slot = pool.workers[index]
        future = slot.calls.submit(slot.loading.result().render_unit, unit)
        pool.in_flight[index] += 1
        self._futures[future] = (pool, index, unit)

    @property
    def in_flight(self) -> int:
        return len(self._futures)

    def collect(self, timeout: float) -> list[tuple[WorkUnit, Outcome]]:
        if not self._futures:
            return []
        done, _ = wait(list(self._futures), timeout=timeout, return_when=FIRST_COMPLETED)
        finished = []
        for future in done:
            pool, index, unit = self._futures.pop(future)
            pool.in_flight[index] -= 1
            error = future.exception()
            finished.append((unit, WorkerFailed(error) if error is not None else future.result()))
        return finished

    def shutdown_pool(self, pool: Pool) -> None:
        for slot in pool.workers:
            slot.loading.cancel()
            slot.calls.shutdown(wait=False, cancel_futures=True)
        self._futures = {f: v for f, v in self._futures.items() if v[0] is not pool}

    def shutdown(self, pools: list[Pool]) -> None:
        super().shutdown(pools)
        self._loader.shutdown(wait=False, cancel_futures=True)
