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
from collections import deque
from collections.abc import Hashable
from typing import Any

from klein_ray.config import ConfigError
from klein_ray.executors.base import AGAIN, Outcome, Pool, PoolExecutor, WorkerFailed, WorkerLost
from klein_ray.executors.ray_metrics import RayMetrics
from klein_ray.types import UnitOutcome, WorkUnit, first_line
from klein_ray.worker.render import RenderWorker, log_loaded
from klein_ray.worker.spec import WorkerSpec

ACTOR_RESTARTS = 3  # a killed worker process comes back (its model reloads)


def _actor_class(worker: type[RenderWorker]):
    import ray

    class RenderWorkerActor:
        """A worker as a Ray actor, naming the Ray node it runs on in every row's metadata."""

        def __init__(self, spec: WorkerSpec):
            node = ray.get_runtime_context().get_node_id()[:12]
            self.worker = worker.load(spec, node=node)

        def describe(self) -> dict:
            return self.worker.describe()

        def render_unit(self, unit: WorkUnit) -> UnitOutcome:
            return self.worker.render_unit(unit)

    # `ray::RenderWorker` in ps and Ray's logs, as the class it runs.
    RenderWorkerActor.__name__ = RenderWorkerActor.__qualname__ = worker.__name__
    return ray.remote(RenderWorkerActor)


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


class RayExecutor(PoolExecutor):
    """Workers are Ray actors running ``worker`` (``RenderWorker``; tests subclass it to inject
    faults). A worker's handle is its actor; the handle on its load, a ``describe`` call."""

    def __init__(self, address: str | None = None, worker: type[RenderWorker] = RenderWorker):
        import ray

        super().__init__()
        self._ray = ray
        # Only a Ray this executor started is shut down by it (tests and notebooks share theirs).
        self.owns_ray = not ray.is_initialized()
        if self.owns_ray:
            connect(ray, address)
        self._actor_cls = _actor_class(worker)
        self._metrics: RayMetrics | None = None

    def cluster_cpus(self) -> float:
        return float(self._ray.cluster_resources().get("CPU", os.cpu_count() or 1))

    def map_tasks(self, fn, items, in_flight: int = 8, num_cpus: float = 1.0):
        """Ray tasks, anywhere on the cluster, ``in_flight`` at once, results in order."""
        remote = self._ray.remote(num_cpus=num_cpus, max_retries=2)(fn)
        pending: deque = deque()
        for item in items:
            pending.append(remote.remote(item))
            if len(pending) >= in_flight:
                yield self._task_result(pending.popleft())
        while pending:
            yield self._task_result(pending.popleft())

    def _task_result(self, ref):
        try:
            return self._ray.get(ref)
        except self._ray.exceptions.RayTaskError as exc:
            raise _unwrap(exc) from None

    def metrics(self) -> RayMetrics:
        if self._metrics is None:
            self._metrics = RayMetrics()
        return self._metrics

    def _launch(self, spec: WorkerSpec, num_cpus: float, num_gpus: float) -> Any:
        # As many concurrent calls as units queued per actor: the worker serialises only the
        # model, so fetch, encode and upload of other units overlap the render.
        return self._actor_cls.options(
            num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=ACTOR_RESTARTS, max_task_retries=0,
            max_concurrency=spec.config.run.in_flight_per_actor).remote(spec)

    def _load_handle(self, worker: Any) -> Hashable:
        return worker.describe.remote()  # answers once the actor's model is loaded

    def _load_result(self, handle: Hashable) -> BaseException | object | None:
        exceptions = self._ray.exceptions
        try:
            info = self._ray.get(handle)  # type: ignore[call-overload]
        except exceptions.ActorUnavailableError:
            return AGAIN  # restarting: ask again
        except exceptions.RayActorError as exc:
            return _unwrap(getattr(exc, "cause", None) or exc)
        except exceptions.RayTaskError as exc:
            return _unwrap(exc)
        self.metrics().model_load_seconds(info["variant"], info["load_seconds"])
        log_loaded(info)
        return None

    def _start_call(self, worker: Any, unit: WorkUnit, name: str) -> Hashable:
        return worker.render_unit.remote(unit)

    def _call_result(self, handle: Hashable) -> Outcome:
        try:
            return self._ray.get(handle)  # type: ignore[call-overload]
        except self._ray.exceptions.RayActorError as exc:  # the process died (or is restarting)
            return WorkerLost(first_line(exc)[:300])
        except self._ray.exceptions.RayTaskError as exc:
            return WorkerFailed(_unwrap(exc))

    def _wait(self, handles: list[Hashable], timeout: float) -> list[Hashable]:
        ready, _ = self._ray.wait(handles, num_returns=len(handles), timeout=timeout)
        return ready

    def _retire(self, worker: Any) -> None:
        # For good: a fresh actor takes its slot with all of Ray's restarts for real crashes
        # ahead of it (a hang is not a crash). Its calls fail; their handles are forgotten.
        self._ray.kill(worker, no_restart=True)

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
