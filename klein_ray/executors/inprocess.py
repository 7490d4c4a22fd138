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
inside torch as the interpreter is torn down aborts it (exit 134), so the CLI ends its process
without that teardown (``klein_ray.__main__``; the commit protocol makes a commit cut short
harmless). A crash takes the driver with it, and ``num_cpus`` / ``num_gpus`` reserve nothing
(every worker uses this process's device and its torch threads).
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import FIRST_COMPLETED, CancelledError, Future, ThreadPoolExecutor, wait

from klein_ray.executors.base import Outcome, PoolExecutor, WorkerFailed
from klein_ray.types import WorkUnit
from klein_ray.worker.render import RenderWorker
from klein_ray.worker.spec import WorkerSpec


class InProcessExecutor(PoolExecutor):
    """Runs every pool's workers in this process. ``worker_factory`` builds a worker from its
    spec (``RenderWorker.load`` by default; tests wrap it to inject faults); ``clock`` is what
    unit deadlines are measured on. A worker's handle is the future of its ``RenderWorker``
    (loading on the loader thread), which is also the handle on its load."""

    def __init__(self, worker_factory: Callable[[WorkerSpec], RenderWorker] = RenderWorker.load,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__(clock)
        self._factory = worker_factory
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="klein-ray-load")  # one load at a time

    def cluster_cpus(self) -> float:
        return float(os.cpu_count() or 1)

    def map_tasks(self, fn, items, in_flight: int = 8, num_cpus: float = 1.0):
        """Tasks on a thread pool of this process, ``in_flight`` submitted ahead, in order."""
        with ThreadPoolExecutor(max(1, in_flight), thread_name_prefix="klein-ray-task") as pool:
            pending: deque[Future] = deque()
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= in_flight:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()

    def _launch(self, spec: WorkerSpec, num_cpus: float, num_gpus: float) -> Future:
        return self._loader.submit(self._factory, spec)

    def _load_handle(self, worker: Future) -> Hashable:
        return worker

    def _load_result(self, handle: Hashable) -> BaseException | None:
        future: Future = handle  # type: ignore[assignment]
        return CancelledError() if future.cancelled() else future.exception()

    def _start_call(self, worker: Future, unit: WorkUnit, name: str) -> Hashable:
        return _on_daemon_thread(worker.result().render_unit, unit, name)

    def _call_result(self, handle: Hashable) -> Outcome:
        future: Future = handle  # type: ignore[assignment]
        error = future.exception()
        return WorkerFailed(error) if error is not None else future.result()

    def _wait(self, handles: list[Hashable], timeout: float) -> list[Hashable]:
        done, _ = wait(handles, timeout=timeout, return_when=FIRST_COMPLETED)  # type: ignore[arg-type]
        return list(done)

    def _retire(self, worker: Future) -> None:
        # A thread cannot be killed: a hung call runs on, and what it returns is dropped (its
        # handle is forgotten). A worker still waiting to load never starts.
        worker.cancel()

    def shutdown(self, pools) -> None:
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
    thread.start()
    return future
