#!/usr/bin/env python
"""Scale benchmark: resume, status and end-of-run compaction at 1M, 10M and 100M rows, 99% done.

    .venv/bin/python benchmarks/scale.py [--rows 1000000 10000000 100000000] [--done 0.99] [--json FILE]

For each size it writes (``scale_setup.py``, vectorised) a manifest and the OUT a killed job
leaves on a local filesystem (``--dir``, default a temporary directory; S3 through moto holds
every object in the server's memory: not for 10 GB checkpoints), then measures, each in a fresh
child process (its peak RSS is ``VmHWM``, the clock starts after the imports):

- ``resume``: ``Driver(...)`` -> ``Lease.acquire()`` -> ``Driver.prepare()`` (sweep, compact if
  more than 64 parts, the standing of every row, the kept scan, the counts, the job state) ->
  ``Driver.units()`` until the first ``WorkUnit``: what a restarted driver does before it renders.
- ``resume, no kept scan``: the same without ``_job/scan.parquet`` (the first run over a manifest
  decodes every column and finds the duplicate ids).
- ``status``: ``klein_ray.commands.status.output_status``.
- ``set of ids``: the baseline, in the same run: the done ids read from the checkpoint into a
  Python ``set`` (what the old resume held); above ``--set-limit`` rows extrapolated linearly
  from the largest size measured (a 100M-id set is ~10 GB on a machine shared with others).
- ``compaction``: ``Checkpoint.compact()`` at the end of the run: every part merged into one,
  streamed, each id's newest record kept.

``requests`` counts the store operations (a listing counts a request per 1,000 keys, as S3's), so
the figure is what the same path would send to S3. Figures only: nothing asserts on time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T_PROCESS = time.perf_counter()
HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent
for _path in (str(ROOT), str(HERE.parent)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

TARGETS = {"resume_rss_mb": 1024, "resume_s": 60, "resume_requests": 2000, "compaction_rss_mb": 1024}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def peak_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# ---------------------------------------------------------------------------------------------
# The child: one scenario, in a fresh process
# ---------------------------------------------------------------------------------------------

def count_requests() -> dict:
    """Count every store operation of LocalStore (a listing: one per 1,000 keys)."""
    from klein_ray.storage.local import LocalStore

    counts = {"total": 0}

    def counted(name, fn):
        def wrapper(self, *args, **kwargs):
            counts["total"] += 1
            counts[name] = counts.get(name, 0) + 1
            return fn(self, *args, **kwargs)
        return wrapper

    def listed(fn):
        def wrapper(self, *args, **kwargs):
            n = 0
            for item in fn(self, *args, **kwargs):
                n += 1
                yield item
            pages = max(1, math.ceil(n / 1000))
            counts["total"] += pages
            counts["list"] = counts.get("list", 0) + pages
        return wrapper

    for name in ("put", "get", "get_range", "get_versioned", "head", "delete", "put_file", "download"):
        setattr(LocalStore, name, counted(name, getattr(LocalStore, name)))
    LocalStore.list = listed(LocalStore.list)
    return counts


def child(spec: dict) -> dict:
    import pyarrow  # noqa: F401  (imports before the clock: their memory is code, not data)

    from klein_ray.commands.status import output_status
    from klein_ray.config import JobConfig, VariantConfig
    from klein_ray.intake.manifest import Manifest
    from klein_ray.output.checkpoint import Checkpoint
    from klein_ray.output.lease import Lease
    from klein_ray.scheduling.driver import Driver, RenderJob

    counts = count_requests()
    start_rss, t0, c0 = rss_mb(), time.perf_counter(), time.process_time()
    extra: dict = {}
    if spec["scenario"].startswith("resume"):
        config = JobConfig(variants={"tiny": VariantConfig(source=spec["model_dir"])})
        driver = Driver(RenderJob(spec["manifest"], spec["output"], config), executor=_renders_nothing)
        with Manifest(driver.job.manifest, driver.cfg.storage) as manifest:
            lease = Lease(driver.store, driver.run_id)
            lease.acquire()
            driver.ledger.epoch = driver.ledger.checkpoint.epoch = lease.record.epoch
            plan = driver.prepare(manifest)
            unit = next(driver.units(plan))
            seconds = time.perf_counter() - t0
            extra = {"to_render": plan.scan.to_render, "skipped_before_unit": driver.tally.skipped,
                     "first_row": unit.rows[0].id, "by_position": plan.standing.by_position,
                     "by_id": plan.standing.by_id}
            lease.release()
    elif spec["scenario"] == "status":
        found = output_status(spec["output"])
        seconds = time.perf_counter() - t0
        extra = {"counts": found.counts(), "how": found.requests}
    elif spec["scenario"] == "set":
        ids: set[str] = set()
        for chunk in Checkpoint(_store(spec["output"]), "reader").scan(["id"]):
            ids.update(chunk.table.column("id").to_pylist())
        seconds = time.perf_counter() - t0
        extra = {"ids": len(ids)}
    else:  # compaction
        Checkpoint(_store(spec["output"]), "20261203T000000Z-cccccc", tmp_dir=spec["tmp"]).compact(keep=1)
        seconds = time.perf_counter() - t0
    return {"scenario": spec["scenario"], "rows": spec["rows"], "seconds": seconds,
            "cpu_s": time.process_time() - c0, "peak_rss_mb": peak_mb(), "rss_after_imports_mb": start_rss,
            "requests": counts["total"], "by_op": {k: v for k, v in counts.items() if k != "total"},
            "startup_s": t0 - T_PROCESS, **extra}


def _store(uri: str):
    from klein_ray.storage import open_store

    return open_store(uri)


def _renders_nothing():
    raise AssertionError("the benchmark measures up to the first unit; it starts no executor")


# ---------------------------------------------------------------------------------------------
# The parent: setup, the scenarios in order, the report
# ---------------------------------------------------------------------------------------------

def run_child(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, str(HERE), "--child", json.dumps(spec)], capture_output=True,
                          text=True, cwd=str(ROOT), env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"child failed: {spec['scenario']} at {spec['rows']:,} rows")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def one_size(rows: int, args, base: Path) -> list[dict]:
    from scale_setup import RUN_KILLED, write_checkpoint, write_manifest

    from klein_ray.config import JobConfig, VariantConfig
    from klein_ray.intake.prescan import DUPLICATES_SCHEMA
    from klein_ray.intake.schema import setup_group
    from klein_ray.output.joblog import JobLog
    from klein_ray.output.record import setup_digest
    from klein_ray.scheduling.pools import check_sources
    from klein_ray.storage import open_store

    where = base / f"rows-{rows}"
    shutil.rmtree(where, ignore_errors=True)
    (where / "model").mkdir(parents=True)
    config = JobConfig(variants={"tiny": VariantConfig(source=str(where / "model"))})
    setup = setup_digest(config, "tiny", check_sources(config)["tiny"], {})
    t = time.perf_counter()
    files = write_manifest(where / "manifest", rows)
    log(f"  manifest: {rows:,} rows in {len(files)} file(s) ({time.perf_counter() - t:.0f} s)")
    store = open_store(str(where / "out"))
    spec = write_checkpoint(store, files, rows, args.done, setup, setup_group({}), log)
    JobLog(store, config, str(where / "manifest"), RUN_KILLED).put_scan(
        [[name, tag, n] for name, tag, _, n in files], DUPLICATES_SCHEMA.empty_table())
    log(f"  checkpoint: {spec['parts']} parts, {spec['checkpoint_mb']:.0f} MB ({time.perf_counter() - t:.0f} s in all)")
    common = {"rows": rows, "manifest": str(where / "manifest"), "output": str(where / "out"),
              "model_dir": str(where / "model"), "tmp": str(where)}
    scenarios = ["resume", "status"] + (["set"] if rows <= args.set_limit else []) + ["compaction"]
    if not args.no_fresh_scan:
        scenarios.insert(0, "resume, no kept scan")
    results = []
    for name in scenarios:
        if name == "resume, no kept scan":
            store.delete("_job/scan.parquet")
        log(f"  {name}...")
        r = run_child(dict(common, scenario=name))
        r.update(checkpoint_mb=spec["checkpoint_mb"], parts=spec["parts"], done=spec["done"])
        results.append(r)
        log(f"    {r['seconds']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB, {r['requests']} requests")
    if not args.keep:
        shutil.rmtree(where, ignore_errors=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000, 100_000_000])
    ap.add_argument("--done", type=float, default=0.99, help="fraction of rows committed")
    ap.add_argument("--json", help="also write every figure to this file")
    ap.add_argument("--dir", help="where manifests and outputs go (default: a temporary directory)")
    ap.add_argument("--set-limit", type=int, default=20_000_000,
                    help="largest size whose Python set of ids is built (larger: extrapolated)")
    ap.add_argument("--no-fresh-scan", action="store_true", help="skip the resume without a kept scan")
    ap.add_argument("--keep", action="store_true", help="leave the data behind")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    from scale_report import report

    started = datetime.datetime.now().astimezone()
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="klein-ray-scale-"))
    results = []
    for rows in args.rows:
        log(f"{rows:,} rows, {args.done:.0%} done, under {base}")
        results.extend(one_size(rows, args, base))
    report(args, results, started, TARGETS)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
