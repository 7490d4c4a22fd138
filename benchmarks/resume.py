#!/usr/bin/env python
"""Resume benchmark: how much work a restarted driver does before its first work unit is ready.

    .venv/bin/python benchmarks/resume.py [--rows 1000000] [--done 0.99] [--baseline-rows 100000]

Sets up, on a moto S3 server started in this process, the state a killed job leaves in OUT
(the compact checkpoint ``_job/results/*.parquet``, written by ``klein_ray.output.checkpoint.Checkpoint``
itself, plus marker objects under ``meta/``), then measures in a fresh child process per scenario
the driver's path from ``Driver(...)`` to the first ``WorkUnit`` out of the ``Planner``, in
``Driver.run``'s order and through its real methods, without Ray:

    Manifest(...) -> Lease.acquire() -> Ledger.done() -> is_fresh() (only if done is empty)
    -> prescan(...) -> JobLog(...).start() -> Driver.units(ResumePlan(...)) -> first WorkUnit

It counts every HTTP request the shared boto3 client sends (botocore ``before-send`` event,
retries included), wall seconds, the child's CPU seconds (the client side only: the server runs
in this parent process) and the child's peak RSS.

The baseline, measured in the same run, is the same path with ``Ledger.done()`` replaced by a
listing of every marker (``Ledger.committed_ids()``), which is what a design without a checkpoint
does. 990,000 marker objects cannot be created in moto in reasonable time, so the baseline runs at
``--baseline-rows`` (markers injected straight into moto's in-process backend) and its listing
cost is extrapolated linearly to the full job; our path is measured at that scale too, on the very
same OUT, for a like-for-like ratio. Figures only: nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T_PROCESS = time.perf_counter()
HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TARGET_SECONDS, TARGET_REQUESTS = 10.0, 200
BUCKET_FULL, BUCKET_BASE = "bench-resume-full", "bench-resume-base"
MARKER_BODY = json.dumps({
    "id": "ID", "variant": "tiny", "prompt": "x" * 120, "seed": 1234567890123, "width": 512,
    "height": 512, "steps": 4, "guidance": 4.0, "format": "png", "run_id": "20261125T000000Z-abcdef",
    "image": {"key": "images/ID.png", "sha256": "0" * 64, "bytes": 400000, "content_type": "image/png"},
    "timings": {"fetch": 0.0, "render": 1.2, "encode": 0.05, "store": 0.08}, "worker": "node-1/actor-0",
}, sort_keys=True, indent=1)


def row_id(i: int) -> str:
    return f"row-{i + 1:07d}"


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


# ---------------------------------------------------------------------------------------------
# Child: one measured resume, in a fresh interpreter (no server, no setup data in its memory)
# ---------------------------------------------------------------------------------------------

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


def child(spec: dict) -> dict:
    t_imports = time.perf_counter()
    import boto3  # noqa: F401 - imported here so that the RSS increase below is data, not code

    from klein_ray.output.checkpoint import DoneSet
    from klein_ray.config import JobConfig, VariantConfig
    from klein_ray.intake.manifest import Manifest, prescan
    from klein_ray.output.joblog import JobLog
    from klein_ray.output.lease import Lease
    from klein_ray.run.driver import Driver, RenderJob, ResumePlan
    from klein_ray.storage.s3 import s3_client

    imports_s = time.perf_counter() - t_imports
    startup_s = time.perf_counter() - T_PROCESS
    rss_start, maxrss_start = rss_mb(), maxrss_mb()
    req = Requests()
    phases: list[dict] = []

    class phase:
        def __init__(self, name: str):
            self.name = name

        def __enter__(self):
            self.t, self.c, self.n, self.b = time.perf_counter(), time.process_time(), req.total, req.bytes_in

        def __exit__(self, *exc):
            phases.append({"phase": self.name, "s": time.perf_counter() - self.t,
                           "cpu_s": time.process_time() - self.c, "requests": req.total - self.n,
                           "mb_in": (req.bytes_in - self.b) / 2**20})

    t0, c0 = time.perf_counter(), time.process_time()
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
    if spec["mode"] == "checkpoint":
        with phase("checkpoint.compact(keep=64)"):  # as Driver.prepare does first
            driver.ledger.checkpoint.compact(keep=64)
        with phase("Ledger.done() (checkpoint)"):
            done = driver.ledger.done()
    else:
        with phase("committed_ids() (list every marker)"):
            done = DoneSet(sorted(driver.ledger.committed_ids()))
    with phase("is_fresh() as prepare() calls it"):
        fresh = not len(done) and driver.ledger.is_fresh()
    with phase("prescan(...)"):
        duplicates, pending = prescan(manifest, driver.cfg.default_variant, done.mask)
    with phase("JobLog(...).start()"):
        log = JobLog(driver.store, driver.cfg, driver.job.manifest, driver.run_id)
        log.start(manifest.total_rows)
    with phase("Driver.units(plan) -> 1st unit"):
        assert sum(pending.values()), "nothing pending: the job would not render"
        plan = ResumePlan(manifest, done, duplicates, pending, not fresh, log)
        unit = next(driver.units(plan))
    wall_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    peak = maxrss_mb()
    by_op = dict(req.by_op)  # the measured path only (not the lease release below)
    result = {
        "mode": spec["mode"], "rows": manifest.total_rows, "done": len(done), "fresh": bool(fresh),
        "requests": req.total, "by_op": by_op, "mb_in": req.bytes_in / 2**20,
        "seconds": wall_s, "cpu_s": cpu_s, "imports_s": imports_s, "startup_s": startup_s,
        "rss_start_mb": rss_start, "peak_rss_mb": peak, "peak_rss_increase_mb": peak - rss_start,
        "maxrss_before_mb": maxrss_start, "phases": phases, "pending": sum(pending.values()),
        "skipped_before_unit": driver.tally.skipped, "unit_rows": unit.size,
        "first_row": unit.rows[0].id,
    }
    lease.release()
    manifest.close()

    # For reference, outside the measured path: is_fresh() alone (run() skips it when the
    # checkpoint is non-empty) and where the per-row Python time of prescan / Driver.rows goes.
    n0, t = req.total, time.perf_counter()
    driver.ledger.is_fresh()
    result["is_fresh_alone"] = {"requests": req.total - n0, "s": time.perf_counter() - t}
    if spec.get("diagnose"):
        result["diagnostics"] = diagnose(spec["manifest"], done)
    return result


def _renders_nothing():
    raise AssertionError("the resume benchmark measures up to the first unit; it starts no executor")


def diagnose(manifest_path: str, done) -> dict:
    """Split the per-row cost of prescan and Driver.rows cost into its parts, and time a vectorised lookup."""
    import numpy as np
    import pyarrow.parquet as pq

    from klein_ray.intake.manifest import READ_BATCH_ROWS, id_hash

    pf = pq.ParquetFile(manifest_path)
    n = pf.metadata.num_rows
    out: dict[str, float] = {"rows": n}

    def timed(name, fn):
        t = time.perf_counter()
        fn()
        out[name] = time.perf_counter() - t

    id_batches = [b.column("id") for b in pf.iter_batches(batch_size=65536, columns=["id"])]
    ids_py = [b.to_pylist() for b in id_batches]
    timed("ids_to_pylist", lambda: [b.to_pylist() for b in id_batches])
    timed("id_hash_per_row", lambda: [np.fromiter((id_hash(v) for v in ids), np.uint64, len(ids)) for ids in ids_py])
    timed("DoneSet.mask_65536", lambda: [done.mask(ids) for ids in ids_py])
    timed("read_all_columns_to_pylist_4096", lambda: [b.to_pylist() for b in pf.iter_batches(batch_size=READ_BATCH_ROWS)])
    small = [ids[i:i + READ_BATCH_ROWS] for ids in ids_py for i in range(0, len(ids), READ_BATCH_ROWS)]
    timed("DoneSet.mask_4096", lambda: [done.mask(ids) for ids in small])
    out["mask_calls_4096"] = len(small)
    return out


# ---------------------------------------------------------------------------------------------
# Parent: server, setup, scenarios, table
# ---------------------------------------------------------------------------------------------

def machine() -> str:
    model = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cores} cores (nproc), {model}, Python {platform.python_version()}, {platform.system()} {platform.release()}"


def start_moto():
    for k, v in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        os.environ[k] = v
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(k, None)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ["AWS_ENDPOINT_URL_S3"] = f"http://{host}:{port}"
    return server


def write_manifest(path: Path, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "id": pa.array([row_id(i) for i in range(rows)], pa.string()),
        "prompt": pa.array([f"a watercolour lighthouse at dusk, study {i}" for i in range(rows)], pa.string()),
        "width": pa.array([512] * rows, pa.int32()),
        "height": pa.array([512] * rows, pa.int32()),
    })
    pq.write_table(table, path, row_group_size=65536)


def done_indices(rows: int, done: int, layout: str) -> list[int]:
    if layout == "tail":  # a job killed late: it renders in manifest order, so a prefix is done
        return list(range(done))
    import random

    return sorted(random.Random(0).sample(range(rows), done))


def write_checkpoint(store, ids: list[str], run_id: str) -> int:
    """What an uncompacted job leaves: Checkpoint.record() for every committed row (a part per
    FLUSH_ROWS), then the final flush(). Returns the number of parts."""
    from klein_ray.output.checkpoint import Checkpoint
    from klein_ray.output.layout import RESULTS as PREFIX
    from klein_ray.intake.rows import derive_seed
    from klein_ray.types import RowResult

    cp = Checkpoint(store, run_id)
    for n, rid in enumerate(ids):
        cp.record(RowResult(
            id=rid, variant="tiny", image_key=f"images/{rid}.png", meta_key=f"meta/{rid}.json",
            sha256=os.urandom(32).hex(), bytes=400_000 + n % 5000, width=512, height=512,
            seed=derive_seed(rid), prompt="", timings={"render": 1.0 + (n % 97) / 100},
            worker=f"node-{n % 8}/actor-{n % 4}"))
    cp.flush()
    return sum(1 for o in store.list(PREFIX) if o.key.endswith(".parquet"))


def s3_backend(bucket: str):
    from moto.s3.models import s3_backends

    partition, account = s3_backends.bucket_accounts[bucket]
    return s3_backends[account][partition]


def inject_markers(bucket: str, prefix: str, ids: list[str]) -> None:
    """Marker objects straight into moto's in-process backend (HTTP would take ~20 min per 100k)."""
    backend = s3_backend(bucket)
    for rid in ids:
        backend.put_object(bucket, f"{prefix}/meta/{rid}.json", MARKER_BODY.replace("ID", rid).encode(),
                           disable_notification=True)


def setup(args, tmp: Path, log) -> dict:
    import boto3

    from klein_ray.config import StorageConfig
    from klein_ray.output.checkpoint import Checkpoint
    from klein_ray.output.layout import RESULTS as PREFIX
    from klein_ray.storage import open_store
    from klein_ray.storage.s3 import s3_client

    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL_S3"])
    for b in (BUCKET_FULL, BUCKET_BASE):
        s3.create_bucket(Bucket=b)
    cfg = StorageConfig()
    s3_client(cfg)
    model_dir = tmp / "model"  # Driver only normalises the source path; nothing is loaded
    model_dir.mkdir()
    spec: dict = {"model_dir": str(model_dir)}

    # Full scale: the manifest, 99 checkpoint parts, and a few hundred real markers.
    t = time.perf_counter()
    full_rows, full_done = args.rows, int(round(args.rows * args.done))
    spec["full_manifest"] = str(tmp / f"manifest-{full_rows}.parquet")
    write_manifest(Path(spec["full_manifest"]), full_rows)
    done_ids = [row_id(i) for i in done_indices(full_rows, full_done, args.layout)]
    parts_out = f"s3://{BUCKET_FULL}/parts"
    parts_store = open_store(parts_out, cfg)
    spec["full_parts"] = write_checkpoint(parts_store, done_ids, "20261124T120000Z-a1b2c3")
    for rid in done_ids[:args.markers]:  # real PUTs over HTTP
        parts_store.put(f"meta/{rid}.json", MARKER_BODY.replace("ID", rid).encode(),
                        content_type="application/json", if_absent=True)
    log(f"  full-scale OUT {parts_out}: {spec['full_parts']} parts, {args.markers} markers "
        f"({time.perf_counter() - t:.1f} s)")

    # The same state after Checkpoint.compact() (what a run that finished its flushes leaves).
    t = time.perf_counter()
    compact_out = f"s3://{BUCKET_FULL}/compacted"
    compact_store = open_store(compact_out, cfg)
    for o in parts_store.list(PREFIX):
        s3.copy_object(Bucket=BUCKET_FULL, Key=f"compacted/{o.key}",
                       CopySource={"Bucket": BUCKET_FULL, "Key": f"parts/{o.key}"})
    for o in parts_store.list("meta/"):
        s3.copy_object(Bucket=BUCKET_FULL, Key=f"compacted/{o.key}",
                       CopySource={"Bucket": BUCKET_FULL, "Key": f"parts/{o.key}"})
    tc = time.perf_counter()
    Checkpoint(compact_store, "20261124T130000Z-d4e5f6").compact()
    spec["compact_s"] = time.perf_counter() - tc
    spec["compact_parts"] = sum(1 for o in compact_store.list(PREFIX) if o.key.endswith(".parquet"))
    spec["compact_mb"] = sum(o.size for o in compact_store.list(PREFIX)) / 2**20
    spec["parts_mb"] = sum(o.size for o in parts_store.list(PREFIX)) / 2**20
    spec["id_share"] = id_column_share(parts_store, next(iter(parts_store.list(PREFIX))).key)
    log(f"  full-scale OUT {compact_out}: {spec['compact_parts']} part ({spec['compact_mb']:.1f} MB; "
        f"Checkpoint.compact() took {spec['compact_s']:.1f} s) ({time.perf_counter() - t:.1f} s)")

    # Baseline scale: every marker exists (injected), and the checkpoint parts too.
    t = time.perf_counter()
    base_rows, base_done = args.baseline_rows, int(round(args.baseline_rows * args.done))
    spec["base_manifest"] = str(tmp / f"manifest-{base_rows}.parquet")
    write_manifest(Path(spec["base_manifest"]), base_rows)
    base_ids = [row_id(i) for i in done_indices(base_rows, base_done, args.layout)]
    base_out = f"s3://{BUCKET_BASE}/out"
    spec["base_parts"] = write_checkpoint(open_store(base_out, cfg), base_ids, "20261124T140000Z-0a0b0c")
    inject_markers(BUCKET_BASE, "out", base_ids)
    log(f"  baseline-scale OUT {base_out}: {base_done:,} markers (injected), {spec['base_parts']} parts "
        f"({time.perf_counter() - t:.1f} s)")
    spec.update(parts_out=parts_out, compact_out=compact_out, base_out=base_out,
                full_rows=full_rows, full_done=full_done, base_rows=base_rows, base_done=base_done)
    return spec


def id_column_share(store, key: str) -> float:
    """The share of a checkpoint part's bytes that is the ``id`` column (all load() uses)."""
    import io

    import pyarrow.parquet as pq

    data = store.get(key)
    md = pq.ParquetFile(io.BytesIO(data)).metadata
    names = [md.schema.column(i).name for i in range(md.num_columns)]
    col = names.index("id")
    return sum(md.row_group(g).column(col).total_compressed_size for g in range(md.num_row_groups)) / len(data)


def run_child(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, str(HERE), "--child", json.dumps(spec)],
                          capture_output=True, text=True, env=os.environ.copy(), cwd=str(ROOT))
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"child failed: {spec}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="manifest rows at full scale")
    ap.add_argument("--done", type=float, default=0.99, help="fraction of rows already committed")
    ap.add_argument("--baseline-rows", type=int, default=100_000,
                    help="rows at the scale where every marker exists (baseline and like-for-like ours)")
    ap.add_argument("--markers", type=int, default=300, help="real markers under meta/ at full scale")
    ap.add_argument("--layout", choices=("tail", "spread"), default="tail",
                    help="which rows are done: the first DONE (a job killed late; default) or a random sample")
    ap.add_argument("--no-diagnose", action="store_true", help="skip the per-row cost breakdown")
    ap.add_argument("--json", help="also write every figure to this file")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    started = datetime.datetime.now().astimezone()
    server = start_moto()
    try:
        with tempfile.TemporaryDirectory(prefix="klein-ray-bench-") as tmp:
            log(f"moto S3 at {os.environ['AWS_ENDPOINT_URL_S3']}; setting up (writes the checkpoint "
                "with klein_ray.output.checkpoint.Checkpoint)...")
            t = time.perf_counter()
            spec = setup(args, Path(tmp), log)
            log(f"setup done in {time.perf_counter() - t:.1f} s; measuring (a fresh process per scenario)...")
            common = {"model_dir": spec["model_dir"]}
            scenarios = [
                (f"ours: checkpoint, {spec['full_parts']} parts (uncompacted)", "checkpoint",
                 spec["full_manifest"], spec["parts_out"], not args.no_diagnose),
                (f"ours: checkpoint, {spec['compact_parts']} part(s) after compact()", "checkpoint",
                 spec["full_manifest"], spec["compact_out"], False),
                (f"ours: checkpoint, {spec['base_parts']} parts", "checkpoint",
                 spec["base_manifest"], spec["base_out"], False),
                ("baseline: list every marker", "listing", spec["base_manifest"], spec["base_out"], False),
            ]
            results = []
            for name, mode, manifest, out, diag in scenarios:
                log(f"  {name} ({out})...")
                r = run_child(dict(common, mode=mode, manifest=manifest, output=out, diagnose=diag))
                r["scenario"] = name
                results.append(r)
                log(f"    {r['requests']} requests, {r['seconds']:.2f} s")
    finally:
        server.stop()
    report(args, spec, results, started)


def report(args, spec: dict, results: list[dict], started) -> None:
    full_parts, full_compact, base_ours, base_list = results[:4]
    what_if = results[4:]
    w = print

    w(f"# klein-ray resume benchmark ({started:%Y-%m-%d %H:%M %Z})")
    w(f"machine: {machine()}")
    w(f"storage: moto {_version('moto')} S3 server in the benchmark's process (127.0.0.1); "
      f"boto3 {_version('boto3')}, pyarrow {_version('pyarrow')}")
    w(f"command: .venv/bin/python benchmarks/resume.py --rows {args.rows} --done {args.done} "
      f"--baseline-rows {args.baseline_rows} --layout {args.layout}")
    w(f"done rows: {args.layout} ({'the first ' + format(args.done, '.0%') + ' of the manifest' if args.layout == 'tail' else 'a random sample'}); "
      f"path measured: Driver() .. first WorkUnit, in a fresh process (imports not included, listed below)")
    w("")
    header = ("scenario", "rows", "done", "requests", "seconds", "client CPU s", "peak RSS MB", "+RSS MB", "MB read")
    table = [header]
    for r in results[:4]:
        table.append((r["scenario"], f"{r['rows']:,}", f"{r['done']:,}", str(r["requests"]), f"{r['seconds']:.2f}",
                      f"{r['cpu_s']:.2f}", f"{r['peak_rss_mb']:.0f}", f"{r['peak_rss_increase_mb']:.0f}",
                      f"{r['mb_in']:.1f}"))

    # Extrapolated baseline at full scale: its listing per 1,000 markers x the full job's markers,
    # plus everything else as measured for our path at full scale (the same code).
    listing = next(p for p in base_list["phases"] if p["phase"].startswith("committed_ids"))
    per_k_req = listing["requests"] / (base_list["done"] / 1000)
    per_k_s = listing["s"] / (base_list["done"] / 1000)
    per_k_cpu = listing["cpu_s"] / (base_list["done"] / 1000)
    ours_done = next(p for p in full_parts["phases"] if p["phase"].startswith("Ledger.done"))
    k = spec["full_done"] / 1000
    ext_req = full_parts["requests"] - ours_done["requests"] + math.ceil(spec["full_done"] / 1000)
    ext_s = full_parts["seconds"] - ours_done["s"] + per_k_s * k
    ext_cpu = full_parts["cpu_s"] - ours_done["cpu_s"] + per_k_cpu * k
    table.append(("baseline: list every marker (EXTRAPOLATED)", f"{spec['full_rows']:,}", f"{spec['full_done']:,}",
                  f"~{ext_req}", f"~{ext_s:.0f}", f"~{ext_cpu:.0f}", "n/a", "n/a", "n/a"))
    for r in what_if:
        table.append((r["scenario"], f"{r['rows']:,}", f"{r['done']:,}", str(r["requests"]), f"{r['seconds']:.2f}",
                      f"{r['cpu_s']:.2f}", f"{r['peak_rss_mb']:.0f}", f"{r['peak_rss_increase_mb']:.0f}",
                      f"{r['mb_in']:.1f}"))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for n, row in enumerate(table):
        w("| " + " | ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)) + " |")
        if n == 0:
            w("|" + "|".join("-" * (x + 2) if i == 0 else "-" * (x + 1) + ":" for i, x in enumerate(widths)) + "|")
    w("")
    w(f"ratios at {base_ours['rows']:,} rows (same OUT, same run): requests ours/baseline = "
      f"{base_ours['requests']}/{base_list['requests']} = {base_ours['requests'] / base_list['requests']:.3f}; "
      f"seconds ours/baseline = {base_ours['seconds']:.2f}/{base_list['seconds']:.2f} = "
      f"{base_ours['seconds'] / base_list['seconds']:.3f}")
    w(f"ratios at {spec['full_rows']:,} rows vs the EXTRAPOLATED baseline: requests {full_parts['requests']}/~{ext_req} "
      f"= {full_parts['requests'] / ext_req:.3f}; seconds {full_parts['seconds']:.2f}/~{ext_s:.0f} = "
      f"{full_parts['seconds'] / ext_s:.3f}")
    w(f"baseline listing cost, measured at {base_list['done']:,} markers: {per_k_req:.2f} requests, "
      f"{per_k_s:.3f} s wall and {per_k_cpu:.3f} s client CPU per 1,000 markers "
      f"(extrapolated x{k:,.0f} for {spec['full_done']:,} markers; moto's page time grows with the bucket, "
      "real S3's does not: the request count is the robust figure)")
    for r in (full_parts, full_compact, *what_if):
        total = r["seconds"] + r["startup_s"]
        w(f"target check, {r['scenario']}: {r['seconds']:.2f} s / {TARGET_SECONDS:.0f} s = "
          f"{r['seconds'] / TARGET_SECONDS:.2f} of the budget ({total:.2f} s = {total / TARGET_SECONDS:.2f} including "
          f"interpreter start and imports, {r['startup_s']:.2f} s); {r['requests']} / {TARGET_REQUESTS} requests = "
          f"{r['requests'] / TARGET_REQUESTS:.2f} of the budget")
    w("")
    w("phases (wall s / client CPU s / requests / MB read):")
    for r in results:
        w(f"  {r['scenario']} [{r['rows']:,} rows]: " + json.dumps(r["by_op"], sort_keys=True))
        for p in r["phases"]:
            w(f"    {p['phase']:<46} {p['s']:7.3f} {p['cpu_s']:7.3f} {p['requests']:5d} {p['mb_in']:7.1f}")
        w(f"    (first unit: {r['unit_rows']} rows from {r['first_row']}, after skipping {r['skipped_before_unit']:,} "
          f"done rows; {r['pending']:,} pending; is_fresh() alone: {r['is_fresh_alone']['requests']} request, "
          f"{r['is_fresh_alone']['s']:.3f} s)")
    d = full_parts.get("diagnostics")
    if d:
        n = d["rows"]
        w("")
        w(f"per-row costs on the {n:,}-row manifest (outside the measured path; us/row):")
        for key, label in (("ids_to_pylist", "id column to Python list (65,536 batches)"),
                           ("id_hash_per_row", "prescan: blake2b id_hash per row, in Python"),
                           ("DoneSet.mask_65536", "DoneSet.mask, 65,536-row batches (prescan)"),
                           ("DoneSet.mask_4096", "DoneSet.mask, 4,096-row batches (_rows)"),
                           ("pc.is_in_arrow_65536", "for comparison: pc.is_in on the Arrow column"),
                           ("read_all_columns_to_pylist_4096", "Driver.rows: every column to dicts (4,096 batches)"),
                           ("is_in_once_whole_column", "alternative: ONE pc.is_in over the whole id column"),
                           ("set_lookup_per_row", "alternative: frozenset lookup per row (Python)")):
            w(f"  {label:<52} {d[key]:6.2f} s  {1e6 * d[key] / n:6.2f}")
        w(f"  one DoneSet.mask call on 4,096 ids costs {d['is_in_one_4096_call']:.3f} s with {full_parts['done']:,} "
          f"done ids: pc.is_in rebuilds its hash table of the value set on every call, and Driver.rows makes "
          f"{d['mask_calls_4096']} such calls; building a frozenset once costs {d['set_build']:.2f} s")
    w("")
    w(f"setup: {spec['full_parts']} parts = {spec['parts_mb']:.1f} MB; compacted part = {spec['compact_mb']:.1f} MB "
      f"(Checkpoint.compact() took {spec['compact_s']:.1f} s at the end of the setup); the id column, all that "
      f"Ledger.done() uses, is {100 * spec['id_share']:.0f}% of a part's bytes (load() GETs whole parts)")
    w(f"caveats: only {args.markers} of the {spec['full_done']:,} markers exist at full scale (moto cannot hold "
      f"990k objects in reasonable time); our path never lists meta/ when the checkpoint is non-empty, so this "
      "does not flatter it. The baseline ran at its own scale with every marker present (injected into moto's "
      "backend, not PUT) and is extrapolated linearly. The server shares this 2-core machine; figures are one run.")
    if args.json:
        Path(args.json).write_text(json.dumps({"spec": spec, "results": results}, indent=1, default=str))


def _version(name: str) -> str:
    from importlib.metadata import version

    try:
        return version(name)
    except Exception:  # noqa: BLE001
        return "?"


if __name__ == "__main__":
    main()
