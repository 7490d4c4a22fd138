"""The driver: the only place that schedules. Reads the manifest, skips what the ledger says is
done, plans work units, keeps every actor fed with a bounded number of units, retries by
failure class, and writes the job log. It renders nothing itself.
"""

from __future__ import annotations

import signal
import sys
import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np

from klein_ray import modelsource
from klein_ray.config import ConfigError, JobConfig
from klein_ray.checkpoint import DoneSet
from klein_ray.joblog import JobLog, new_run_id
from klein_ray.lease import Lease
from klein_ray.ledger import Ledger
from klein_ray.manifest import Manifest, id_hash
from klein_ray.model.tiny import is_tiny_model
from klein_ray.planner import Planner, halve_unit, split_unit
from klein_ray.rows import RowValidator
from klein_ray.storage import open_store
from klein_ray.types import RenderOOM, RowError, RowSpec, UnitOutcome, WorkUnit

MAX_ROW_ATTEMPTS = 3  # a row whose render or store keeps failing
MAX_LOST = 4  # a unit whose worker process keeps dying under it
INTERRUPT_GRACE_S = 5.0
EXIT_OK, EXIT_ROWS_FAILED, EXIT_INVALID, EXIT_INTERRUPTED = 0, 1, 2, 130


@dataclass
class RenderJob:
    manifest: str
    output: str
    config: JobConfig
    address: str | None = None
    progress: bool = True


@dataclass
class _Tally:
    committed: int = 0
    skipped: int = 0
    errors: list[RowError] = field(default_factory=list)
    attempts: Counter = field(default_factory=Counter)  # only rows that failed at least once
    lost: Counter = field(default_factory=Counter)  # rows whose worker died under them


class Driver:
    def __init__(self, job: RenderJob):
        self.job = job
        # Workers may run on other nodes with another environment: resolve the endpoint here,
        # once, so every worker writes where the driver reads. Credentials are not copied: each
        # node uses its own AWS chain (a local Ray inherits the driver's environment).
        storage = job.config.storage
        self.cfg = job.config.model_copy(update={"storage": storage.model_copy(
            update={"endpoint_url": storage.resolved_endpoint()})})
        self.store = open_store(job.output, self.cfg.storage)
        self.run_id = new_run_id()
        self.ledger = Ledger(self.store, self.run_id)
        self.tally = _Tally()
        self.interrupted = False
        self.sources = self._check_sources()

    def run(self) -> tuple[dict, int]:
        """Render the job; returns (summary, exit code). Raises LeaseHeld if OUT is in use."""
        started = time.monotonic()
        with Manifest(self.job.manifest, self.cfg.storage) as manifest, Lease(self.store, self.run_id):
            self.ledger.checkpoint.compact(keep=64)  # killed runs never compacted at their end
            done = self.ledger.done()
            fresh = not len(done) and self.ledger.is_fresh()
            duplicates, pending = prescan(manifest, done, self.cfg.default_variant)
            log = JobLog(self.store, self.cfg, self.job.manifest, self.run_id)
            log.start(manifest.total_rows)
            rows = self._rows(manifest, done, duplicates)
            old_handlers = _trap_signals(self._on_signal)
            try:
                if sum(pending.values()):
                    self._render(rows, pending, log, check_markers=not fresh)
                else:
                    for _ in rows:  # nothing to render: still count skips and record bad rows
                        pass
            finally:
                _restore_signals(old_handlers)
                self.ledger.checkpoint.flush()
            self.ledger.checkpoint.compact()
            summary = self._summary(manifest.total_rows, started)
            noise = any(is_tiny_model(s) for s in self.sources.values() if not s.startswith("s3://"))
            log.finish(self.tally.errors, summary, len(done) + self.tally.committed, noise)
        return summary, self._exit_code()

    # -- rows ------------------------------------------------------------------------------

    def _rows(self, manifest: Manifest, done: DoneSet, duplicates: set[int]) -> Iterator[RowSpec]:
        validator = RowValidator(self.cfg, base_dir=Path.cwd())
        for mf, start, batch in manifest.iter_row_batches():
            committed = done.mask([raw.get("id") for raw in batch])
            for offset, (raw, is_done) in enumerate(zip(batch, committed)):
                if is_done:
                    self.tally.skipped += 1
                    continue
                row_id, index = raw.get("id"), start + offset
                if duplicates and isinstance(row_id, str) and id_hash(row_id) in duplicates:
                    self.tally.errors.append(RowError(row_id, "validate", "DuplicateId",
                        "id occurs more than once in the manifest; every row with it is rejected",
                        1, mf.name, index, "id"))
                    continue
                checked = validator.validate(raw, mf.name, index)
                if isinstance(checked, list):
                    self.tally.errors.append(checked[0])
                    continue
                yield checked

    # -- rendering -------------------------------------------------------------------------

    def _render(self, rows: Iterator[RowSpec], pending: Counter, log: JobLog, check_markers: bool) -> None:
        from klein_ray.cluster import RayExecutor

        executor = RayExecutor(self.job.address)
        _trap_signals(self._on_signal)  # again: ray.init installs its own SIGTERM handler
        pools, failed_variants = self._start_pools(executor, pending, check_markers)
        planner = Planner({v: c.batch_size for v, c in self.cfg.variants.items()})
        units = planner.plan(rows)
        queues: dict[str, deque[WorkUnit]] = defaultdict(deque)
        bar = _progress(sum(pending.values()), self.job.progress)
        try:
            exhausted = False
            while not self.interrupted and (not exhausted or any(queues.values()) or executor.in_flight):
                exhausted = self._top_up(units, queues, pools, exhausted)
                for variant, queue in queues.items():
                    if variant in pools and pools[variant].all_dead:
                        failed_variants[variant] = f"every actor of variant {variant!r} died and used up its restarts"
                    if variant in failed_variants:
                        self._fail_unloadable(queue, failed_variants[variant], bar)
                        continue
                    pool = pools[variant]
                    while queue and sum(pool.in_flight.values()) < self._capacity(pool):
                        executor.submit(pool, queue.popleft())
                for unit, outcome in executor.collect(timeout=0.2):
                    self._settle(unit, outcome, queues, log, bar)
            if self.interrupted:
                self._drain(executor, queues, log, bar)
        finally:
            bar.close()
            executor.shutdown(list(pools.values()))

    def _start_pools(self, executor, pending: Counter, check_markers: bool) -> tuple[dict, dict[str, str]]:
        """Start every needed variant's actors at once and wait for their models; a variant
        that fails to load is retried, then reported (its rows fail, the others go on)."""
        specs = self._worker_specs(executor, pending, check_markers)
        pools, failed = {}, {}
        todo = sorted(specs)
        for attempt in range(1, self.cfg.run.model_load_attempts + 1):
            started = {v: executor.start_pool(specs[v][0], *specs[v][1:]) for v in todo}
            errors = executor.wait_ready(list(started.values()), self.cfg.run.model_load_timeout,
                                         lambda: self.interrupted)
            for variant, pool in started.items():
                if variant in errors:
                    executor.shutdown_pool(pool)
                    failed[variant] = (f"variant {variant!r} failed to load after {attempt} attempt(s): "
                                       f"{type(errors[variant]).__name__}: {errors[variant]}")[:1000]
                else:
                    pools[variant] = pool
                    failed.pop(variant, None)
            todo = sorted(errors)
            if not todo or self.interrupted:
                break
        for reason in failed.values():
            print(f"klein-ray: {reason}", file=sys.stderr)
        return pools, failed

    def _worker_specs(self, executor, pending: Counter, check_markers: bool) -> dict[str, tuple]:
        """Per variant: (WorkerSpec, actors, CPUs, GPUs). CPU actors without cpus_per_actor
        reserve none and split the node's cores between them (torch threads)."""
        from klein_ray.worker import WorkerSpec

        needed = sorted(v for v in pending if v in self.cfg.variants)
        shared = [v for v in needed if self.cfg.variants[v].gpus_per_actor == 0
                  and self.cfg.variants[v].cpus_per_actor is None]
        shared_actors = sum(self.cfg.variants[v].actors for v in shared)
        shared_threads = max(1, int(executor.cluster_cpus() // max(1, shared_actors)))
        specs = {}
        for variant in needed:
            vcfg = self.cfg.variants[variant]
            cpus = vcfg.cpus_per_actor if vcfg.cpus_per_actor is not None else (1 if vcfg.gpus_per_actor else 0)
            threads = int(cpus) if cpus else shared_threads
            spec = WorkerSpec(variant, self.cfg, self.store.uri, self.sources[variant], threads, check_markers)
            specs[variant] = (spec, vcfg.actors, cpus, vcfg.gpus_per_actor)
        return specs

    def _top_up(self, units: Iterator[WorkUnit], queues, pools, exhausted: bool) -> bool:
        """Plan ahead just far enough that no actor waits; False until the manifest is done."""
        limit = 2 * sum(len(p.actors) * self.cfg.run.in_flight_per_actor for p in pools.values()) + 2
        while not exhausted and sum(len(q) for q in queues.values()) < limit:
            unit = next(units, None)
            if unit is None:
                return True
            queues[unit.variant].append(unit)
        return exhausted

    def _capacity(self, pool) -> int:
        return len(pool.healthy) * self.cfg.run.in_flight_per_actor

    def _settle(self, unit: WorkUnit, outcome, queues, log: JobLog, bar) -> None:
        """Record a finished unit: commit results, retry by failure class, or fail rows."""
        from klein_ray.cluster import WorkerFailed, WorkerLost

        if isinstance(outcome, UnitOutcome):
            for result in outcome.results:
                self.ledger.record(result)
                if result.already:
                    self.tally.skipped += 1
                else:
                    self.tally.committed += 1
                    log.add_result(result)
                bar.update(1)
            for error in outcome.errors:
                self._retry_or_fail(unit, error, queues, bar, retry=error.stage == "store")
            return
        cause = getattr(outcome, "cause", None)
        if isinstance(cause, RenderOOM) and unit.size > 1:
            # Out of memory: the same rows in halves (each half keeps sharing its references).
            queues[unit.variant].extendleft(reversed(halve_unit(unit)))
            return
        if isinstance(outcome, WorkerFailed) and unit.size > 1:
            # Isolate: retry each row alone so one poisonous row cannot sink its batchmates.
            queues[unit.variant].extendleft(reversed(split_unit(unit)))
            return
        if isinstance(outcome, WorkerLost):
            self._requeue_lost(unit, outcome, queues, bar)
            return
        for row in unit.rows:
            err = RowError(row.id, "render", type(getattr(outcome, "cause", outcome)).__name__,
                           str(outcome)[:500], 1, row.manifest_file, row.manifest_row)
            self._retry_or_fail(unit, err, queues, bar, retry=isinstance(outcome, WorkerFailed))

    def _requeue_lost(self, unit: WorkUnit, outcome, queues, bar) -> None:
        """The worker process died under the unit (killed, preempted, node lost): run it again,
        whole; a unit that keeps killing workers is split so a poisonous row is found alone."""
        for row in unit.rows:
            self.tally.lost[row.id] += 1
        losses = max(self.tally.lost[row.id] for row in unit.rows)
        if losses < MAX_LOST:
            queues[unit.variant].appendleft(unit)
        elif unit.size > 1:
            queues[unit.variant].extendleft(reversed(split_unit(unit)))
        else:
            row = unit.rows[0]
            self.tally.errors.append(RowError(row.id, "render", "WorkerLost", str(outcome)[:500],
                                              losses, row.manifest_file, row.manifest_row))
            bar.update(1)

    def _retry_or_fail(self, unit: WorkUnit, error: RowError, queues, bar, retry: bool) -> None:
        self.tally.attempts[error.id] += 1
        error.attempts = self.tally.attempts[error.id]
        if retry and error.attempts < MAX_ROW_ATTEMPTS:
            row = next(r for r in unit.rows if r.id == error.id)
            queues[unit.variant].appendleft(replace(unit, rows=(row,)))
            return
        self.tally.errors.append(error)
        bar.update(1)

    def _fail_unloadable(self, queue: deque, reason: str, bar) -> None:
        while queue:
            unit = queue.popleft()
            for row in unit.rows:
                self.tally.errors.append(RowError(row.id, "render", "ModelLoadError", reason[:500],
                                                  1, row.manifest_file, row.manifest_row))
                bar.update(1)

    def _drain(self, executor, queues, log: JobLog, bar) -> None:
        """After an interrupt: let in-flight commits land for a few seconds, take nothing new."""
        deadline = time.monotonic() + INTERRUPT_GRACE_S
        queues.clear()
        while executor.in_flight and time.monotonic() < deadline:
            for unit, outcome in executor.collect(timeout=0.2):
                if isinstance(outcome, UnitOutcome):
                    self._settle(unit, outcome, queues, log, bar)

    # -- bookkeeping -----------------------------------------------------------------------

    def _check_sources(self) -> dict[str, str]:
        sources = {}
        for name, vcfg in self.cfg.variants.items():
            try:
                sources[name] = modelsource.normalise(vcfg.source)
            except (modelsource.ModelSourceError, ValueError) as exc:
                raise ConfigError(f"variant {name!r}: {exc}") from None
        return sources

    def _on_signal(self, signum, frame) -> None:
        if self.interrupted:  # a second Ctrl-C: stop waiting
            raise KeyboardInterrupt
        self.interrupted = True
        print("\nklein-ray: interrupted; finishing in-flight commits (Ctrl-C again to abandon)",
              file=sys.stderr)

    def _summary(self, total: int, started: float) -> dict:
        return {"total": total, "committed": self.tally.committed, "skipped": self.tally.skipped,
                "failed": len(self.tally.errors), "output": self.store.uri,
                "seconds": round(time.monotonic() - started, 3), "run_id": self.run_id,
                "interrupted": self.interrupted}

    def _exit_code(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPTED
        return EXIT_ROWS_FAILED if self.tally.errors else EXIT_OK


def prescan(manifest: Manifest, done: DoneSet | None, default_variant: str) -> tuple[set[int], Counter]:
    """One pass over ``id`` (and ``variant``): duplicate-id hashes and rows pending per variant.

    Ids are kept as 8-byte hashes in numpy arrays, so this stays ~8 bytes a row.
    """
    chunks, pending = [], Counter()
    for batch in manifest.iter_batches(["id", "variant"]):
        ids = batch.column("id").to_pylist()
        # Only string ids can collide: a null id must not make the id "None" a duplicate.
        strings = [v for v in ids if isinstance(v, str)]
        chunks.append(np.fromiter((id_hash(v) for v in strings), dtype=np.uint64, count=len(strings)))
        variants = (batch.column("variant").to_pylist() if "variant" in batch.schema.names
                    else [None] * len(ids))
        committed = done.mask(ids) if done is not None else [False] * len(ids)
        for variant, is_done in zip(variants, committed):
            if not is_done:
                pending[variant or default_variant] += 1
    if not chunks:
        return set(), pending
    hashes = np.sort(np.concatenate(chunks))
    dup = hashes[1:][hashes[1:] == hashes[:-1]]
    return {int(h) for h in np.unique(dup)}, pending


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, unit="img", file=sys.stderr, dynamic_ncols=True,
                smoothing=0.1, desc="rendering")


def _trap_signals(handler) -> dict:
    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            old[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread (e.g. embedded use)
            pass
    return old


def _restore_signals(old: dict) -> None:
    for sig, handler in old.items():
        signal.signal(sig, handler)
