"""`klein-ray render`: pick the executor, show progress, run the driver.

The one place that chooses *how* a job runs: on Ray (the default; a local Ray unless an address
is given) or in this process (``--executor local``: no Ray, for a laptop or a debugger). The
driver only ever sees the ``Executor`` interface.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from klein_ray.config import ConfigError
from klein_ray.executors.base import Executor
from klein_ray.scheduling.driver import Driver, Progress, RenderJob

EXECUTORS = ("ray", "local")


def executor_factory(kind: str, address: str | None = None, join_timeout: float = 120.0) -> Callable[[], Executor]:
    """A constructor for the chosen executor, called only when there is something to render
    (a resumed job with nothing left never starts Ray)."""
    if kind == "ray":
        def make() -> Executor:
            from klein_ray.executors.ray_cluster import RayExecutor  # the only module importing ray

            return RayExecutor(address, join_timeout=join_timeout)
        return make
    if kind == "local":
        if address:
            raise ConfigError("--address joins a Ray cluster; it means nothing with --executor local")

        def make_local() -> Executor:
            from klein_ray.executors.inprocess import InProcessExecutor

            return InProcessExecutor()
        return make_local
    raise ConfigError(f"unknown executor {kind!r}; use one of {', '.join(EXECUTORS)}")


def progress_bar(enabled: bool) -> Callable[[int], Progress]:
    """A tqdm bar on stderr (rate, ETA) per run, or nothing."""
    def make(total: int) -> Progress:
        from tqdm import tqdm

        return tqdm(total=total, disable=not enabled, unit="img", file=sys.stderr,
                    dynamic_ncols=True, smoothing=0.1, desc="rendering")
    return make


def render(job: RenderJob, executor: str = "ray", address: str | None = None,
           progress: bool = True) -> tuple[dict, int]:
    """Render ``job``; returns (summary, exit code)."""
    driver = Driver(job, executor_factory(executor, address, job.config.run.ray_join_timeout_s),
                    progress_bar(progress))
    return driver.run()
