"""The Ray executor: the only module that imports ray. It decides *how* work runs, not *what*.

It connects to (or starts) Ray, creates actor pools of ``RenderWorker`` with the configured
resources, submits units and reports what finished. A dead actor is restarted by Ray (its model
reloads) and gets no work until it answers a ping. An actor that hangs on a unit past
``run.unit_timeout_s`` is killed and replaced by a fresh one (a hang is not a crash: it does not
use up the restarts Ray keeps for those), which also gets no work until it answers. The driver
decides what to submit and when.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from klein_ray.config import ConfigError
from klein_ray.run.executor import (
    Call,
    Executor,
    Outcome,
    Pool,
    WorkerFailed,
    WorkerLost,
    WorkerSpec,
    take_hung,
    wait_for_loads,
    wait_seconds,
)
from klein_ray.run.ray_metrics import RayMetrics
from klein_ray.run.worker import RenderWorker, log_loaded
from klein_ray.types import WorkUnit, first_line

ACTOR_RESTARTS = 3  # a killed worker process comes back (its model reloads)


def _worker_class(worker: type[RenderWorker]):
    import ray

    class OnRay(worker):  # type: ignore[valid-type, misc]
        """The worker, naming the Ray node it runs on in every row's metadata."""

        def __init__(self, spec: WorkerSpec):
            super().__init__(spec)
            self.name = f"{self.name}@node:{ray.get_runtime_context().get_node_id()[:12]}"

    OnRay.__name__ = OnRay.__qualname__ = worker.__name__  # `ray::RenderWorker` in ps and logs
    return ray.remote(OnRay)


def connect(ray, address: str | None) -> None:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``), else the one `ray start` runs on
    this node (as Ray's own tools do), else start a local Ray sized to this machine."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    recorded = None if address else _recorded_cluster()
    if recorded is not None and not _answers(recorded):
        raise ConfigError(
            f"`ray start` left a record of a Ray cluster at {recorded} on this node, but nothing "
            "answers there (the cluster is gone). Run `ray stop` to clear the record, or pass "
            "--address (or set RAY_ADDRESS) to join another cluster.")
    address = address or recorded
    kwargs: dict[str, Any] = dict(address=address, log_to_driver=False, configure_logging=True,
                                  logging_level="ERROR")
    if address is None:  # a new local Ray: num_cpus is only allowed when starting one
        kwargs.update(include_dashboard=False, num_cpus=os.cpu_count() or 1)
    try:
        ray.init(**kwargs)
    except (ConnectionError, TimeoutError) as exc:
        raise ConfigError(f"could not join the Ray cluster at {address}: {first_line(exc)}") from None


def _recorded_cluster() -> str | None:
    """The address `ray start` recorded on this node (Ray's temp dir; RAY_TMPDIR moves it)."""
    try:
        from ray._private.utils import read_ray_address

        return read_ray_address(None) or None
    except Exception:  # noqa: BLE001 - a private helper: without it, behave as before
        return None


def _answers(address: str, timeout: float = 3.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


class RayExecutor(Executor):
    """Workers are Ray actors of ``worker`` (``RenderWorker``; tests subclass it to inject faults)."""

    def __init__(self, address: str | None = None, worker: type[RenderWorker] = RenderWorker):
        import ray

        self._ray = ray
        # Only a Ray this executor started is shut down by it (tests and notebooks share theirs).
        self.owns_ray = not ray.is_initialized()
        if self.owns_ray:
            connect(ray, address)
        self._actor_cls = _worker_class(worker)
        self._refs: dict[Any, Call] = {}
        self._pings: dict[Any, tuple[Pool, int]] = {}
        self._metrics: RayMetrics | None = None

    def cluster_cpus(self) -> float:
        return float(self._ray.cluster_resources().get("CPU", os.cpu_count() or 1))

    def start_pool(self, spec: WorkerSpec, count: int, num_cpus: float, num_gpus: float) -> Pool:
        # As many concurrent calls as units queued per actor: the worker serialises only the
        # model, so fetch, encode and upload of other units overlap the render.
        opts = dict(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=ACTOR_RESTARTS,
                    max_task_retries=0, max_concurrency=spec.config.run.in_flight_per_actor)
        def launch():
            return self._actor_cls.options(**opts).remote(spec)

        return Pool(spec.variant, [launch() for _ in range(count)],
                    unit_timeout=spec.config.run.unit_timeout_s, launch=launch)

    def wait_ready(self, pools: list[Pool], timeout: float, stop) -> dict[str, BaseException]:
        # The actors load in parallel; each answers `describe` once its model is loaded.
        pending = {a.describe.remote(): (pool, i) for pool in pools for i, a in enumerate(pool.workers)}

        def poll(refs: list, seconds: float):
            ready, _ = self._ray.wait(refs, num_returns=len(refs), timeout=seconds)
            return [(ref, self._load_error(ref)) for ref in ready]

        failed, later = wait_for_loads(pending, poll, timeout, stop)
        self._pings.update(later)  # they join when loaded (an actor waiting for a node, too)
        return failed

    def _load_error(self, ref) -> BaseException | None:
        """Why an actor's model did not load (the original exception), or None if it did."""
        try:
            self._loaded(self._ray.get(ref))
        except self._ray.exceptions.RayActorError as exc:
            return _unwrap(getattr(exc, "cause", None) or exc)
        except self._ray.exceptions.RayTaskError as exc:
            return _unwrap(exc)
        return None

    def _loaded(self, info: dict) -> None:
        self.metrics().model_load_seconds(info["variant"], info["load_seconds"])
        log_loaded(info)

    def metrics(self) -> RayMetrics:
        if self._metrics is None:
            self._metrics = RayMetrics()
        return self._metrics

    def submit(self, pool: Pool, unit: WorkUnit) -> None:
        index = pool.least_loaded()
        ref = pool.workers[index].render_unit.remote(unit)
        self._refs[ref] = Call.start(pool, index, unit, time.monotonic())

    @property
    def in_flight(self) -> int:
        return len(self._refs)

    def collect(self, timeout: float) -> list[tuple[WorkUnit, Outcome]]:
        waiting = list(self._refs) + list(self._pings)
        if not waiting:
            return []
        ready, _ = self._ray.wait(waiting, num_returns=len(waiting),
                                  timeout=wait_seconds(self._refs.values(), timeout, time.monotonic()))
        done = []
        for ref in ready:
            if ref in self._pings:
                self._settle_ping(ref)
                continue
            call = self._refs.pop(ref)
            call.pool.in_flight[call.index] -= 1
            try:
                done.append((call.unit, self._ray.get(ref)))
            except self._ray.exceptions.RayActorError as exc:
                # The process died (or is restarting): stop feeding it until it answers a ping.
                self._mark_down(call.pool, call.index)
                done.append((call.unit, WorkerLost(first_line(exc)[:300])))
            except self._ray.exceptions.RayTaskError as exc:
                done.append((call.unit, WorkerFailed(_unwrap(exc))))
        for pool, index, lost in take_hung(self._refs, time.monotonic()):
            self._replace(pool, index)
            done.extend(lost)
        return done

    def _replace(self, pool: Pool, index: int) -> None:
        """Kill a hung actor for good (its calls fail; their refs are already forgotten) and
        start a fresh one in its place, with all of Ray's restarts for real crashes ahead of it."""
        self._ray.kill(pool.workers[index], no_restart=True)
        # A ping to the old actor would fail and mark its successor dead: forget it.
        self._pings = {r: w for r, w in self._pings.items() if not (w[0] is pool and w[1] == index)}
        pool.workers[index] = pool.launch()
        pool.down.add(index)
        self._pings[pool.workers[index].describe.remote()] = (pool, index)

    def _mark_down(self, pool: Pool, index: int) -> None:
        if index in pool.down or index in pool.dead:
            return
        pool.down.add(index)
        self._pings[pool.workers[index].describe.remote()] = (pool, index)

    def _settle_ping(self, ref) -> None:
        pool, index = self._pings.pop(ref)
        try:
            self._loaded(self._ray.get(ref))
            pool.down.discard(index)  # restarted, model loaded: back to work
        except self._ray.exceptions.ActorUnavailableError:
            self._pings[pool.workers[index].describe.remote()] = (pool, index)  # still restarting
        except (self._ray.exceptions.RayActorError, self._ray.exceptions.RayTaskError):
            pool.down.discard(index)
            pool.dead.add(index)

    def shutdown_pool(self, pool: Pool) -> None:
        for actor in pool.workers:
            self._ray.kill(actor, no_restart=True)

    def shutdown(self, pools: list[Pool]) -> None:
        super().shutdown(pools)
        if self.owns_ray:
            self._ray.shutdown()


def _unwrap(exc: BaseException) -> BaseException:
    """The application exception inside a RayTaskError (classify by type, not message)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException) and cause is not exc:
        return _unwrap(cause)
    as_instance = getattr(exc, "as_instanceof_cause", None)
    return as_instance() if callable(as_instance) else exc
