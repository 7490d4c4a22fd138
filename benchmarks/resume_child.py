"""The measured side of ``benchmarks/resume.py``: one resume, in a fresh interpreter.

``resume.py --child SPEC`` calls ``child`` here, in a process with no S3 server and no setup data
in its memory. It owns what one scenario measures: the driver's path from ``Driver(...)`` to the
first ``WorkUnit``, each phase's wall and CPU seconds, the HTTP requests the shared boto3 client
sends and the bytes it reads, and the peak RSS.
Nothing heavy is imported at module level: the client stack is imported inside ``child``, where
its cost is measured as ``imports_s``.
"""

from __future__ import annotations

import importlib
import os
import resource
import time
from types import SimpleNamespace


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def maxrss_mb() -> float:
    """Peak RSS of this process image (VmHWM). Not getrusage's ru_maxrss: Linux carries that over
    from the parent across fork + exec, so a child of this (large) parent would report its peak."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class Requests:
    """Counts the HTTP requests the shared client sends, by operation, and the bytes it reads."""

    def __init__(self) -> None:
        self.total, self.by_op, self.bytes_in = 0, {}, 0

    def on_send(self, event_name: str = "", **_kw) -> None:  # must return None (or it short-cuts)
        op = event_name.rsplit(".", 1)[-1]
        self.total += 1
        self.by_op[op] = self.by_op.get(op, 0) + 1

    def on_call(self, http_response=None, parsed=None, model=None, **_kw) -> None:
        if model is not None and model.name == "GetObject":
            self.bytes_in += int((parsed or {}).get("ContentLength") or 0)
        elif http_response is not None:
            self.bytes_in += len(http_response.content or b"")


class Phases:
    """The measured path's phases: ``with phases("name"):`` records its wall and CPU seconds, and
    the requests and MB read in it, in ``phases.rows``."""

    def __init__(self, req: Requests) -> None:
        self.req = req
        self.rows: list[dict] = []

    def __call__(self, name: str) -> _Phase:
        return _Phase(self, name)


class _Phase:
    def __init__(self, owner: Phases, name: str):
        self.owner, self.name = owner, name

    def __enter__(self):
        req = self.owner.req
        self.t, self.c, self.n, self.b = time.perf_counter(), time.process_time(), req.total, req.bytes_in

    def __exit__(self, *exc):
        req = self.owner.req
        self.owner.rows.append({"phase": self.name, "s": time.perf_counter() - self.t,
                                "cpu_s": time.process_time() - self.c, "requests": req.total - self.n,
                                "mb_in": (req.bytes_in - self.b) / 2**20})


# The modules measured_path uses, boto3 first (it is most of the cost).
STACK = ("boto3", "klein_ray.output.checkpoint", "klein_ray.config", "klein_ray.intake.manifest",
         "klein_ray.output.joblog", "klein_ray.output.lease", "klein_ray.scheduling.driver", "klein_ray.storage.s3",
         "klein_ray.scheduling.standing")


def _import_stack() -> None:
    """Imports the client stack before the clock starts, so that its cost is ``imports_s`` and the
    RSS increase measured after it is data, not code."""
    for name in STACK:
        importlib.import_module(name)


def measured_path(spec: dict, req: Requests, phase: Phases) -> SimpleNamespace:
    """The calls ``Driver.run`` makes, in its order, up to the first ``WorkUnit`` (no Ray).
    ``Driver.prepare`` finds where every row stands (``standing.build``, timed as a phase of its
    own); in the baseline's mode that step lists every marker instead."""
    from klein_ray.config import JobConfig, VariantConfig
    from klein_ray.intake.manifest import Manifest
    from klein_ray.output.lease import Lease
    from klein_ray.scheduling import resume
    from klein_ray.scheduling.driver import Driver, RenderJob
    from klein_ray.storage.s3 import s3_client

    with phase("Driver(RenderJob(...))"):
        config = JobConfig(variants={"tiny": VariantConfig(source=spec["model_dir"])})
        client = s3_client(config.storage)  # the shared client Driver's store will use
        client.meta.events.register("before-send.s3", req.on_send)
        client.meta.events.register("after-call.s3", req.on_call)
        driver = Driver(RenderJob(spec["manifest"], spec["output"], config), executor=_renders_nothing)
        assert driver.store.client is client
    with phase("Manifest(...)"):
        manifest = Manifest(driver.job.manifest, driver.cfg.storage).__enter__()
    with phase("Lease.acquire()"):
        lease = Lease(driver.store, driver.run_id)
        lease.acquire()
    build = resume.build if spec["mode"] == "checkpoint" else _listing_build(driver)
    name = "standing.build (checkpoint)" if spec["mode"] == "checkpoint" else "marker_ids() (list every marker)"

    def timed_build(*args, **kwargs):
        with phase(name):
            return build(*args, **kwargs)
    resume.build = timed_build
    with phase("Driver.prepare(manifest)"):
        plan = driver.prepare(manifest)
    with phase("Driver.units(plan) -> 1st unit"):
        assert plan.scan.to_render, "nothing pending: the job would not render"
        unit = next(driver.units(plan))
    return SimpleNamespace(driver=driver, manifest=manifest, lease=lease, plan=plan, unit=unit)


def _listing_build(driver):
    """What a design without a checkpoint does instead: list every marker, mark the rows whose
    id has one (ids in a Python set)."""
    import numpy as np

    from klein_ray.intake.marks import DONE, RowMarks
    from klein_ray.scheduling.standing import Standing

    def build(checkpoint, manifest, setup_of, tmp_dir=None):
        listed = set(driver.ledger.marker_ids())
        marks = RowMarks([f.rows for f in manifest.files])
        for index, _, start, batch in manifest.iter_record_batches(["id"], 65536):
            hit = np.array([i in listed for i in batch.column(0).to_pylist()], bool)
            marks.set(index, start + np.flatnonzero(hit), DONE)
        return Standing(marks, records=len(listed), by_id=len(listed))
    return build


def child(spec: dict, t_process: float) -> dict:
    """One scenario (``spec`` from resume.py's ``run_child``); ``t_process`` is when the script
    started, so that ``startup_s`` counts the interpreter start and the imports."""
    t_imports = time.perf_counter()
    _import_stack()
    imports_s = time.perf_counter() - t_imports
    startup_s = time.perf_counter() - t_process
    rss_start, maxrss_start = rss_mb(), maxrss_mb()
    req = Requests()
    phases = Phases(req)

    t0, c0 = time.perf_counter(), time.process_time()
    p = measured_path(spec, req, phases)
    wall_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    peak = maxrss_mb()
    by_op = dict(req.by_op)  # the measured path only (not the lease release below)
    result = {
        "mode": spec["mode"], "rows": p.manifest.total_rows, "done": p.plan.kept, "fresh": bool(p.plan.output_was_empty),
        "requests": req.total, "by_op": by_op, "mb_in": req.bytes_in / 2**20,
        "seconds": wall_s, "cpu_s": cpu_s, "imports_s": imports_s, "startup_s": startup_s,
        "rss_start_mb": rss_start, "peak_rss_mb": peak, "peak_rss_increase_mb": peak - rss_start,
        "maxrss_before_mb": maxrss_start, "phases": phases.rows, "pending": p.plan.scan.to_render,
        "skipped_before_unit": p.driver.tally.skipped, "unit_rows": p.unit.size,
        "first_row": p.unit.rows[0].id,
    }
    p.lease.release()
    p.manifest.close()

    # For reference, outside the measured path: output_is_empty() alone (prepare skips it when
    # the checkpoint has records).
    n0, t = req.total, time.perf_counter()
    p.driver.ledger.output_is_empty()
    result["is_fresh_alone"] = {"requests": req.total - n0, "s": time.perf_counter() - t}
    return result


def _renders_nothing():
    raise AssertionError("the resume benchmark measures up to the first unit; it starts no executor")
