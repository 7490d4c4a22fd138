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
import sys
import threading
from collections import deque
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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


@dataclass(frozen=True)
class ClusterAddress:
    """Where a run joins Ray, and what chose it (for every message about it)."""

    address: str | None  # None: start a fresh local Ray
    source: str


def resolve_address(address: str | None) -> ClusterAddress:
    """``--address`` first, then ``RAY_ADDRESS``, then the cluster `ray start` recorded on this
    node (as Ray's own tools do), else a fresh local Ray; ``local`` asks for one explicitly."""
    if address:
        return ClusterAddress(None if address == "local" else address, f"--address {address}")
    env = os.environ.get("RAY_ADDRESS")
    if env:
        return ClusterAddress(None if env == "local" else env, f"RAY_ADDRESS={env}")
    recorded = _recorded_cluster()
    if recorded:
        return ClusterAddress(recorded, "the record `ray start` left on this node")
    return ClusterAddress(None, "no address given: a local Ray")


def connect(ray, address: str | None, join_timeout: float = 120.0) -> None:
    """Join the cluster ``resolve_address`` names, or start a local Ray sized to this machine,
    within ``join_timeout`` seconds: past it, a join that still waits (an unreachable or
    token-protected cluster can hold ``ray.init`` for minutes) ends the process with exit 2 and
    a message naming the address, what chose it and what to do. Our SIGTERM/SIGINT handlers
    stay in place throughout (Ray's init would replace SIGTERM's with an exit 15)."""
    where = resolve_address(address)
    if where.address is not None and not where.address.startswith("ray://") and not _answers(where.address):
        gone = ("the cluster is gone. Run `ray stop` to clear the record, or pass --address (or set "
                "RAY_ADDRESS) to join another cluster, or --address local for a fresh local Ray"
                if where.source.startswith("the record") else "nothing answers there")
        raise ConfigError(f"`ray start` left a record of a Ray cluster at {where.address} on this node, but "
                          f"nothing answers there ({gone})" if where.source.startswith("the record")
                          else f"no Ray cluster answers at {where.address} (from {where.source}); "
                          "pass --address local for a fresh local Ray")
    kwargs: dict[str, Any] = dict(address=where.address, log_to_driver=False, configure_logging=True,
                                  logging_level="ERROR")
    if where.address is None:  # a new local Ray: num_cpus is only allowed when starting one
        kwargs.update(address="local", include_dashboard=False, num_cpus=os.cpu_count() or 1)
    watchdog = threading.Timer(join_timeout, _give_up, args=(_join_failed(where, join_timeout),))
    watchdog.daemon = True
    watchdog.start()
    try:
        with _our_signal_handlers(ray):
            ray.init(**kwargs)
    except (ConnectionError, TimeoutError, RuntimeError) as exc:
        raise ConfigError(_join_failed(where, join_timeout, first_line(exc))) from None
    finally:
        watchdog.cancel()


def _join_failed(where: ClusterAddress, timeout: float, why: str = "") -> str:
    target = f"the Ray cluster at {where.address} (from {where.source})" if where.address else "a local Ray"
    return (f"could not join {target}" + (f": {why}" if why else f" within {timeout:g} s (run.ray_join_timeout_s)")
            + ". If the cluster uses token authentication, give this process its token (RAY_AUTH_MODE=token "
            "and RAY_AUTH_TOKEN); to render on a fresh local Ray instead, pass --address local"
            + (" (or run `ray stop` to clear the record)" if where.source.startswith("the record") else ""))


def _give_up(message: str) -> None:
    """The join timed out: ``ray.init`` cannot be interrupted from here, so end the process
    (exit 2: a configuration to fix). The output's lease, if taken, goes stale (on this host
    the next driver takes it at once: this process is gone)."""
    sys.stderr.write(f"klein-ray: {message}\n")
    sys.stderr.flush()
    os._exit(2)


@contextmanager
def _our_signal_handlers(ray) -> Iterator[None]:
    """Keep Ray's init from installing its SIGTERM handler (``sys.exit(15)``: no summary, no
    lease released) over ours, for as long as the init runs."""
    utils: Any = getattr(getattr(ray, "_private", None), "utils", None)
    original = getattr(utils, "set_sigterm_handler", None)
    if original is None:
        yield
        return
    utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    finally:
        utils.set_sigterm_handler = original


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

    def __init__(self, address: str | None = None, worker: type[RenderWorker] = RenderWorker,
                 join_timeout: float = 120.0):
        import ray

        super().__init__()
        self._ray = ray
        # Only a Ray this executor started is shut down by it (tests and notebooks share theirs).
        self.owns_ray = not ray.is_initialized()
        if self.owns_ray:
            connect(ray, address, join_timeout)
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
