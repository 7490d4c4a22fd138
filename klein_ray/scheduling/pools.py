"""Starting a run's worker pools: what each variant's workers reserve, and loading their models.

Called by the driver once there is something to render, through the ``Executor`` interface
only. A variant whose model fails to load is retried (``run.model_load_attempts``), then
reported, so that its rows fail and the other variants go on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from klein_ray.assets import modelsource
from klein_ray.config import DEFAULT_TINY_MODEL, ConfigError, JobConfig, RunConfig
from klein_ray.executors.base import Executor, Pool
from klein_ray.worker.spec import WorkerSpec

log = logging.getLogger(__name__)

# Per variant: (WorkerSpec, workers, CPUs, GPUs).
Specs = dict[str, tuple[WorkerSpec, int, float, float]]


def worker_specs(cfg: JobConfig, executor: Executor, variants: list[str], output_uri: str,
                 sources: dict[str, str], output_was_empty: bool, sizes: dict[str, tuple] | None = None,
                 epoch: int = 0, rerender_outdated: bool = False,
                 identities: dict[str, dict[str, str]] | None = None) -> Specs:
    """What the workers of each of ``variants`` (those the config knows) need and reserve.
    CPU actors without cpus_per_actor reserve none and split the node's cores between them
    (torch threads). ``sizes``: each variant's planned sizes, for the compile warm-up."""
    needed = sorted(v for v in variants if v in cfg.variants)
    shared = [v for v in needed if cfg.variants[v].gpus_per_actor == 0
              and cfg.variants[v].cpus_per_actor is None]
    shared_actors = sum(cfg.variants[v].actors for v in shared)
    shared_threads = max(1, int(executor.cluster_cpus() // max(1, shared_actors)))
    specs: Specs = {}
    for variant in needed:
        vcfg = cfg.variants[variant]
        cpus = vcfg.cpus_per_actor if vcfg.cpus_per_actor is not None else (1 if vcfg.gpus_per_actor else 0)
        threads = int(cpus) if cpus else shared_threads
        spec = WorkerSpec(variant, cfg, output_uri, sources[variant], threads, output_was_empty,
                          tuple((sizes or {}).get(variant, ())), epoch, rerender_outdated,
                          tuple(sorted((identities or {}).get(variant, {}).items())))
        specs[variant] = (spec, vcfg.actors, cpus, vcfg.gpus_per_actor)
    return specs


def start_pools(executor: Executor, specs: Specs, run: RunConfig,
                stopping: Callable[[], bool]) -> tuple[dict[str, Pool], dict[str, str]]:
    """Start every variant's workers at once and wait for their models. Returns the pools that
    loaded and, for the variants that did not after every attempt, why. Returns early, with
    what loaded so far, once ``stopping()`` is true."""
    pools: dict[str, Pool] = {}
    failed: dict[str, str] = {}
    todo = sorted(specs)
    for attempt in range(1, run.model_load_attempts + 1):
        started = {v: executor.start_pool(specs[v][0], *specs[v][1:]) for v in todo}
        errors = executor.wait_ready(list(started.values()), run.model_load_timeout, stopping)
        for variant, pool in started.items():
            if variant in errors:
                executor.shutdown_pool(pool)
                failed[variant] = (f"variant {variant!r} failed to load after {attempt} attempt(s): "
                                   f"{type(errors[variant]).__name__}: {errors[variant]}")
            else:
                pools[variant] = pool
                failed.pop(variant, None)
                ready = len(pool.workers) - len(pool.down) - len(pool.dead)
                log.info("variant %s: %d of %d worker(s) ready%s", variant, ready, len(pool.workers),
                         "; the others join as they load" if ready < len(pool.workers) else "",
                         extra={"event": "variant_ready", "variant": variant, "workers": ready})
        todo = sorted(errors)
        if not todo or stopping():
            break
    for reason in failed.values():
        log.error("%s", reason, extra={"event": "variant_failed"})
    return pools, failed


def check_sources(cfg: JobConfig) -> dict[str, str]:
    """Every variant's model source, normalised; a bad one is a ConfigError naming the variant.
    A local source written relative to the working directory (the default job's tiny model is
    one) must be there: from another directory every row would fail to load, so say so now,
    with what to do. An absolute one may exist only on the workers' nodes: not checked here."""
    sources = {}
    for name, vcfg in cfg.variants.items():
        try:
            sources[name] = modelsource.normalise(vcfg.source)
        except (modelsource.ModelSourceError, ValueError) as exc:
            raise ConfigError(f"variant {name!r}: {exc}") from None
        relative = modelsource.classify(vcfg.source) == "local" and not Path(vcfg.source).expanduser().is_absolute() \
            and not vcfg.source.startswith("file://")
        if relative and not (Path(sources[name]) / "model_index.json").is_file():
            default = vcfg.source == DEFAULT_TINY_MODEL
            raise ConfigError(
                f"variant {name!r}: no model at {sources[name]} ({vcfg.source!r} is taken from the working "
                f"directory {Path.cwd()}). " + (
                    "Without --config a job renders with the tiny test model: run `klein-ray "
                    f"make-tiny-model {DEFAULT_TINY_MODEL}` in this directory, or pass --config with your "
                    "variants." if default else "Run from the directory it is relative to, or make it absolute."))
    return sources
