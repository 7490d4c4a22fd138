"""Renders for tests without Ray: the driver on the in-process executor, the tiny real model,
its weights loaded once per test session and shared by every worker (a render is then a
fraction of a second), into a local or S3 output.

Not a test module: tests import ``job``, ``render`` and ``manifest`` from here.
"""

from __future__ import annotations

import threading
from pathlib import Path

from helpers import row, write_manifest

from klein_ray.config import JobConfig, OutputConfig, RunConfig, VariantConfig
from klein_ray.executors.inprocess import InProcessExecutor
from klein_ray.scheduling.driver import Driver, RenderJob
from klein_ray.worker.render import RenderWorker

_models: dict[tuple[str, int | None], object] = {}
_lock = threading.Lock()


def job(tiny_models, batch_size: int = 2, png_level: int = 1, **run) -> JobConfig:
    """One CPU variant of the tiny model; ``run`` overrides RunConfig fields."""
    return JobConfig(
        default_variant="tiny",
        variants={"tiny": VariantConfig(source=str(tiny_models["tiny"]), pipeline="distilled",
                                        batch_size=batch_size)},
        output=OutputConfig(png_compress_level=png_level),
        run=RunConfig(**{"in_flight_per_actor": 2, **run}),
    )


def rows(n: int, prefix: str = "r", **values) -> list[dict]:
    return [row(id=f"{prefix}{i}", prompt=f"a product shot {prefix}{i}", width=64, height=64, seed=i,
                **values) for i in range(n)]


def manifest(path: Path, table: list[dict]) -> str:
    return str(write_manifest(path, table))


def shared_worker(spec) -> RenderWorker:
    """A worker around the session's already-loaded model of its variant's source."""
    from klein_ray.model.pipeline import KleinModel

    key = (spec.source, spec.threads)
    with _lock:
        if key not in _models:
            _models[key] = KleinModel.from_pretrained(spec.source, pipeline="distilled", threads=spec.threads)
    return RenderWorker(spec, _models[key], test_model=True)


def render(manifest_uri: str, out: str, config: JobConfig, factory=shared_worker, **job_fields) -> tuple[dict, int]:
    """One run of the driver; (summary, exit code)."""
    driver = Driver(RenderJob(manifest_uri, out, config, **job_fields), lambda: InProcessExecutor(factory))
    return driver.run()
