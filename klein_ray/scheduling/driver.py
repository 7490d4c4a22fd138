"""The driver: the only place that schedules. It renders nothing itself.

A run is two steps. ``prepare`` (under the output lease; ``resume.prepare``) reads where the
output stands and prescans the manifest: a ``ResumePlan``. ``execute`` streams the rows the
plan leaves (``resume.rows``), plans work units, keeps every worker fed with a bounded number of
units through an ``Executor`` (it knows only that interface), applies the retry policy
(``policy.settle``) to every outcome, and writes the job log. Whether a row is done is the
ledger's decision, never the driver's. A run can stop early (``stopping``): an interrupt, an
``abort`` from another thread, the lease lost, or an output store that is unreachable (exit 75).
Nothing is written under ``_job/`` unless the lease is confirmed ours at that moment.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import chain

from klein_ray.assets import adapters, modelsource
from klein_ray.assets.confinement import confine
from klein_ray.config import JobConfig
from klein_ray.executors.base import Executor, Outcome, Pool, WorkerLost
from klein_ray.intake.manifest import Manifest
from klein_ray.intake.planner import Planner, look_ahead
from klein_ray.output.audit import Depth
from klein_ray.output.errors import ErrorLog
from klein_ray.output.joblog import JobLog, new_run_id
from klein_ray.output.lease import Lease
from klein_ray.output.ledger import Ledger
from klein_ray.scheduling.policy import settle
from klein_ray.scheduling.pools import check_sources, start_pools, worker_specs
from klein_ray.scheduling.resume import ResumePlan, Tally, spill_dir
from klein_ray.scheduling.resume import prepare as prepare_resume
from klein_ray.scheduling.resume import rows as resume_rows
from klein_ray.scheduling.stopping import (  # the exit codes are the driver's API too
    EXIT_INTERRUPTED,
    EXIT_INVALID,
    EXIT_OK,
    EXIT_ROWS_FAILED,
    EXIT_TEMPFAIL,
    INTERRUPT,
    STOP_GRACE_S,
    TRY_LATER,
    OutageWatch,
    Stop,
    Stops,
    quietly,
    restore_signals,
    run_state,
    trap_signals,
    unreachable,
)
from klein_ray.scheduling.telemetry import Progress, RunWatch, Silent, counts
from klein_ray.startup import stop_asked
from klein_ray.storage import StorageError, open_store
from klein_ray.storage.base import StorageUnavailable
from klein_ray.types import RowError, RowSpec, UnitOutcome, WorkUnit, first_line
from klein_ray.uris import scrub

log = logging.getLogger(__name__)

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_INVALID",
    "EXIT_OK",
    "EXIT_ROWS_FAILED",
    "EXIT_TEMPFAIL",
    "Driver",
    "Progress",
    "RenderJob",
    "ResumePlan",
]


@dataclass
class RenderJob:
    manifest: str
    output: str
    config: JobConfig
    verify_first: Depth | None = None  # "shallow" or "deep": audit OUT first, render broken rows again
    rerender_outdated: bool = False  # render rows committed under another setup of their variant again


class Driver:
    def __init__(self, job: RenderJob, executor: Callable[[], Executor],
                 progress: Callable[[int], Progress] | None = None):
        self.job = job
        # Workers may run on other nodes with another environment: resolve the endpoint here,
        # once, so every worker writes where the driver reads. Credentials are not copied: each
        # node uses its own AWS chain (a local Ray inherits the driver's environment).
        storage = job.config.storage
        self.cfg = job.config.model_copy(update={"storage": storage.model_copy(
            update={"endpoint_url": storage.resolved_endpoint()}),
            # Likewise the references' confinement: its defaults depend on where the manifest
            # and OUT are, which workers do not know.
            "references": confine(job.config.references, job.manifest, job.output)})
        self.store = open_store(job.output, self.cfg.storage)
        self.run_id = new_run_id()
        self.ledger = Ledger(self.store, self.run_id, set_aside=True)
        # Failed rows are counted and kept on local disk, not in memory (the first few are).
        self.tally = Tally(errors=ErrorLog(self.run_id, flagged=unreachable, tmp_dir=spill_dir(self.cfg)))
        self._plan: ResumePlan | None = None
        self.interrupted = False
        self._stops = Stops()
        self.sources = check_sources(self.cfg)
        self.identities = adapters.identities(self.cfg)
        self._make_executor = executor
        self._progress = progress or (lambda total: Silent())
        # False while the lease may have been taken over (after a long pause, until renewed).
        self._may_issue: Callable[[], bool] = lambda: True
        self._lease: Lease | None = None

    def run(self) -> tuple[dict, int]:
        """Render the job; returns (summary, exit code). Raises LeaseHeld if OUT is in use.
        An interrupt at any instant (the CLI turns SIGTERM into one until the render loop's own
        handler takes over) still ends with a summary, and with the lease released."""
        started = time.monotonic()
        try:
            with Manifest(self.job.manifest, self.cfg.storage) as manifest:
                self.tally.total = manifest.total_rows
                self._run_with_lease(manifest, started)
        except KeyboardInterrupt:
            self.interrupted = True
            self._stops.request(INTERRUPT)
        finally:
            self.tally.errors.close()  # (its counts stay; the local file of errors goes)
        summary = self._summary(started)
        log.info("run %s %s: %d committed, %d skipped, %d failed, %s remaining in %.1f s", self.run_id,
                 "stopped" if self.stopped else "finished", summary["committed"], summary["skipped"],
                 summary["failed"], summary["remaining"], summary["seconds"],
                 extra={"event": "run_finish", "run_id": self.run_id, **counts(summary)})
        if summary["failed"]:
            where = self.store.url_of("_job/")
            log.error("%d row(s) failed: their reasons are in %serrors.parquet and %sreport.html",
                      summary["failed"], where, where)
        code = self._exit_code(summary)
        if self.stopped not in (None, INTERRUPT):
            log.error("%s", self.stopped.reason)  # the last line: what to do now
        elif self.stopped is INTERRUPT and code == INTERRUPT.exit_code:
            log.warning("interrupted; the output's lease is released: re-run the same command to resume")
        return summary, code

    def _run_with_lease(self, manifest: Manifest, started: float) -> None:
        ttl = self.cfg.run.lease_ttl_s
        quick = open_store(self.store.uri, self.cfg.storage.within(ttl / 4))  # renewals fail fast
        lease = Lease(self.store, self.run_id, ttl, on_lost=self._lost_lease, renew_store=quick)
        self._may_issue, self._lease = lease.renewed_recently, lease
        try:  # taken inside: an interrupt at any instant after the create still releases it
            lease.acquire()
            self.store.reserve()  # room to release the lease if the output's disk fills up
            self.ledger.epoch = self.ledger.checkpoint.epoch = lease.record.epoch
            self._run_leased(manifest, started)
        except StorageUnavailable as exc:  # the driver's own reads and writes of OUT
            self._unreachable(f"storage unreachable: {first_line(exc)}")
        finally:
            self._let_go(lease)

    def abort(self, reason: str, exit_code: int, write_log: bool = True) -> None:
        """Stop the run from any thread: no more work is issued, units in flight get a short
        grace, and ``run`` returns ``exit_code``. ``write_log=False``: nothing more is written
        under ``OUT/_job`` (job log, checkpoint), e.g. the lease was lost and OUT belongs to
        another driver now; rows the workers commit stay safe by the commit protocol. The
        first stop wins."""
        if self._stops.request(Stop(reason, exit_code, write_log)):
            log.warning("stopping: %s", reason, extra={"event": "run_stopping", "run_id": self.run_id,
                                                        "exit_code": exit_code})

    def _lost_lease(self, why: str) -> None:
        self.abort(f"{why}; this driver stopped and wrote nothing more under _job/ (rows it "
                   "committed are safe; anything it writes late is fenced by the lease's epoch)",
                   EXIT_TEMPFAIL, write_log=False)

    @property
    def stopped(self) -> Stop | None:
        """Why the run stopped early (the first stop asked for), or None."""
        return self._stops.first

    def _run_leased(self, manifest: Manifest, started: float) -> None:
        plan = self.prepare(manifest)
        self.tally.kept = plan.kept
        scan = plan.scan
        again = " (rendered again)" if plan.rerender_outdated else " (kept; --rerender-outdated renders them)"
        changed = "".join([f", {scan.stale} of them edited since (rendered again)" if scan.stale else "",
                           f", {scan.outdated} rendered under another setup of their variant{again}"
                           if scan.outdated else ""])
        log.info("run %s (epoch %d): %d rows, %d committed already, %d to render%s", self.run_id,
                 self.ledger.epoch, manifest.total_rows, scan.done + scan.stale + scan.outdated,
                 scan.to_render, changed,
                 extra={"event": "run_start", "run_id": self.run_id, "rows": manifest.total_rows})
        self.execute(plan)
        summary = self._summary(started)
        if self._writes_log():
            noise = any(modelsource.is_test_model(s) for s in self.sources.values())
            plan.log.finish(self.tally.errors, summary, plan.kept + self.tally.committed, noise)

    def prepare(self, manifest: Manifest) -> ResumePlan:
        """Where this run starts (call it holding the lease): a few requests, not a listing."""
        joblog = JobLog(self.store, self.cfg, self.job.manifest, self.run_id, set_aside=True)
        return prepare_resume(self.ledger, manifest, self.cfg, self.sources, joblog,
                              self.job.verify_first, self.job.rerender_outdated, self._writes_log,
                              self.identities)

    def execute(self, plan: ResumePlan) -> None:
        """Render what ``plan`` leaves; rows found bad on the way are recorded, never rendered."""
        old_handlers = trap_signals(self._on_signal)
        if stop_asked():  # before this handler, its interrupt swallowed by a library (see startup)
            self.interrupted = True
            self._stops.request(INTERRUPT)
        self._plan = plan
        try:
            if self.stopped is not None:  # stopped while preparing: start nothing
                pass
            elif sum(plan.pending.values()):
                self._render(plan)
            else:
                for _ in self.rows(plan):  # nothing to render: still count skips, record bad rows
                    pass
        except StorageUnavailable as exc:  # a checkpoint flush (or the manifest) could not be written/read
            self._unreachable(f"storage unreachable: {first_line(exc)}")
        finally:
            restore_signals(old_handlers)
            if self._writes_log():
                self.ledger.checkpoint.flush()
        if self._writes_log():
            self.ledger.checkpoint.compact()

    # -- rows and units --------------------------------------------------------------------

    def rows(self, plan: ResumePlan) -> Iterator[RowSpec]:
        """The plan's valid rows that are to render, streamed; skips and bad rows are tallied."""
        return resume_rows(plan, self.cfg, self.tally)

    def units(self, plan: ResumePlan, rows: Iterable[RowSpec] | None = None) -> Iterator[WorkUnit]:
        """The plan's rows (or ``rows``) grouped into work units, planned lazily as consumed."""
        planner = Planner({v: c.batch_size for v, c in self.cfg.variants.items()})
        return planner.plan(self.rows(plan) if rows is None else rows)

    # -- rendering -------------------------------------------------------------------------

    def _render(self, plan: ResumePlan) -> None:
        # "loading" from the first second (joining Ray, loading models take a while): a
        # scheduler polling progress.json sees the run before its workers are ready.
        self._watch = RunWatch(self.run_id, plan.manifest.total_rows, plan.kept, plan.pending,
                               self._progress_writer(plan.log), errors=lambda: len(self.tally.errors),
                               refused=lambda: self.tally.refused)
        self._watch.state = "loading"
        self._watch.tick(force=True)
        executor = self._make_executor()
        trap_signals(self._on_signal)  # again, should anything in the executor have replaced it
        self._watch.metrics = executor.metrics()
        rows = self.rows(plan)
        ahead, sizes = look_ahead(rows)  # what compiling workers warm up for, while they load
        specs = worker_specs(self.cfg, executor, sorted(plan.pending), self.store.uri, self.sources,
                             plan.output_was_empty, sizes, self.ledger.epoch, plan.rerender_outdated,
                             self.identities)
        pools, failed_variants = start_pools(executor, specs, self.cfg.run,
                                             lambda: self.stopped is not None)
        self._watch.state = "running"
        units = self.units(plan, chain(ahead, rows))
        queues: dict[str, deque[WorkUnit]] = defaultdict(deque)
        bar = self._progress(sum(plan.pending.values()))
        watch = OutageWatch(self.cfg.run.unreachable_after_s)
        try:
            exhausted = False
            while self.stopped is None and (not exhausted or any(queues.values()) or executor.in_flight):
                exhausted = self._top_up(units, queues, pools, exhausted)
                if self._may_issue():
                    self._dispatch(executor, queues, pools, failed_variants, bar)
                for unit, outcome in executor.collect(timeout=0.2):
                    watch.observe(outcome)
                    self._apply(unit, outcome, queues, plan.log, bar)
                if (evidence := watch.gone()) is not None:
                    self._unreachable(f"output storage unreachable: {evidence}")
                self._watch.tick()
            if self.stopped is not None:
                self._drain(executor, queues, plan.log, bar)
        finally:
            bar.close()
            executor.shutdown(list(pools.values()))
            self._watch.finish(run_state(self.stopped))

    def _dispatch(self, executor: Executor, queues, pools: dict[str, Pool],
                  failed_variants: dict[str, str], bar: Progress) -> None:
        """Give every healthy worker units up to its capacity; fail what cannot run."""
        for variant, queue in queues.items():
            if variant in pools and pools[variant].all_dead:
                failed_variants[variant] = f"every worker of variant {variant!r} died and used up its restarts"
            if variant in failed_variants:
                self._fail_unloadable(queue, failed_variants[variant], bar)
                continue
            pool = pools[variant]
            while queue and sum(pool.in_flight.values()) < len(pool.healthy) * self.cfg.run.in_flight_per_actor:
                unit = queue.popleft()
                executor.submit(pool, unit)
                self._watch.submitted(unit)

    def _top_up(self, units: Iterator[WorkUnit], queues, pools, exhausted: bool) -> bool:
        """Plan ahead just far enough that no worker waits; False until the manifest is done."""
        limit = 2 * sum(len(p.workers) * self.cfg.run.in_flight_per_actor for p in pools.values()) + 2
        while not exhausted and sum(len(q) for q in queues.values()) < limit:
            unit = next(units, None)
            if unit is None:
                return True
            queues[unit.variant].append(unit)
        return exhausted

    def _apply(self, unit: WorkUnit, outcome: Outcome, queues, joblog: JobLog, bar: Progress) -> None:
        """Ask the policy what ``outcome`` means and record it: committed rows, units to run
        again, failed rows."""
        settled = settle(unit, outcome)
        self._watch.returned(unit)
        self._watch.settled(unit.variant, settled)
        rows = {row.id: row for row in unit.rows}
        for result in settled.committed:
            if self._writes_log():  # else committed all the same: a re-run's marker check finds it
                row = rows.get(result.id)
                self.ledger.record(result, self._plan.origin(row) if self._plan and row else None)
            if result.already:
                self.tally.skipped += 1
                self.tally.already += 1
            else:
                self.tally.committed += 1
                joblog.add_result(result)
        if settled.retry:
            log.info("unit %d (%d rows, attempt %d): %s; %d unit(s) queued again", unit.unit_id,
                     unit.size, unit.attempt, _describe(outcome), len(settled.retry),
                     extra={"event": "worker_lost" if isinstance(outcome, WorkerLost) else "unit_retried",
                            "run_id": self.run_id, "variant": unit.variant, "unit": unit.unit_id,
                            "attempt": unit.attempt})
        queues[unit.variant].extendleft(reversed(settled.retry))
        self.tally.errors.extend(settled.failed)
        bar.update(len(settled.committed) + len(settled.failed))

    def _fail_unloadable(self, queue: deque, reason: str, bar: Progress) -> None:
        while queue:
            unit = queue.popleft()
            for row in unit.rows:
                self.tally.errors.append(RowError.for_row(row, "render", "ModelLoadError", reason, unit.attempt))
            self._watch.fail(unit.variant, ["render"] * unit.size)
            bar.update(unit.size)

    def _drain(self, executor: Executor, queues, joblog: JobLog, bar: Progress) -> None:
        """After a stop: let in-flight commits land for a few seconds, take nothing new."""
        deadline = time.monotonic() + STOP_GRACE_S
        queues.clear()
        while executor.in_flight and time.monotonic() < deadline:
            for unit, outcome in executor.collect(timeout=0.2):
                if isinstance(outcome, UnitOutcome):
                    self._apply(unit, outcome, queues, joblog, bar)

    # -- bookkeeping -----------------------------------------------------------------------

    def _on_signal(self, signum, frame) -> None:
        if self.interrupted:  # a second Ctrl-C: stop waiting
            raise KeyboardInterrupt
        self.interrupted = True
        self._stops.request(INTERRUPT)
        log.warning("interrupted; finishing in-flight commits (Ctrl-C again to abandon)")

    @property
    def _offline(self) -> bool:
        return self.stopped is not None and self.stopped.offline

    def _unreachable(self, why: str) -> None:
        """The output store cannot be reached: stop, and write nothing more to it (every write
        would only block for the storage retries and fail)."""
        reason = f"{why.rstrip('.')}; {TRY_LATER}"
        self._stops.request(Stop(reason, EXIT_TEMPFAIL, write_log=False, offline=True))

    def _progress_writer(self, joblog: JobLog) -> Callable[[dict], None]:
        """Progress is written while OUT is ours to write and reachable; a failed write is
        skipped (the next one, seconds later, says the same and more)."""
        def write(progress: dict) -> None:
            if self._writes_log() and not self._offline:
                try:
                    joblog.put_progress(progress)
                except StorageError as exc:
                    log.debug("progress not written: %s", exc)
        return write

    def _writes_log(self) -> bool:
        """Whether the job log and the checkpoint may still be written (see ``abort``): never
        once a stop says not, and only while the lease is confirmed ours (a driver woken from a
        long pause renews first, and learns then that it lost the lease)."""
        if self.stopped is not None and not self.stopped.write_log:
            return False
        return self._lease is None or self._lease.etag is None or self._lease.confirm()

    def _let_go(self, lease: Lease) -> None:
        """Release the lease; with the store unreachable, on a thread given a few seconds, so
        that it cannot hold the exit (unreleased, it expires, or on this host is taken over
        once we are gone)."""
        if not self._offline:
            lease.release()
            return
        release = threading.Thread(target=quietly, args=(lease.release,), name="klein-ray-lease-release",
                                   daemon=True)
        release.start()
        release.join(STOP_GRACE_S)

    def _summary(self, started: float) -> dict:
        failed = len(self.tally.errors)
        if self._offline:  # rows that could not be stored are not failed, only not done yet
            failed -= self.tally.errors.flagged
        stop = self.stopped
        return {"total": self.tally.total, "committed": self.tally.committed, "skipped": self.tally.skipped,
                "failed": failed, "remaining": self.tally.remaining(failed),
                "output": self.store.uri, "seconds": round(time.monotonic() - started, 3),
                "run_id": self.run_id, "interrupted": self.interrupted,
                "stopped": None if stop in (None, INTERRUPT) else scrub(stop.reason)}

    def _exit_code(self, summary: dict) -> int:
        """The stop's code; but an interrupt that came when nothing was left to do changes
        nothing: the run ends as if it had not come (0, or 1 with failed rows)."""
        settled = EXIT_ROWS_FAILED if summary["failed"] else EXIT_OK
        if self.stopped is None or (self.stopped is INTERRUPT and summary["remaining"] == 0):
            return settled
        return self.stopped.exit_code


def _describe(outcome: Outcome) -> str:
    if isinstance(outcome, UnitOutcome):
        return f"{len(outcome.errors)} row error(s)"
    return f"{type(outcome).__name__} ({outcome})"
