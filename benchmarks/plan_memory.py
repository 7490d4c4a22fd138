#!/usr/bin/env python
"""Planning memory benchmark: driver memory while planning a 10,000,000-row manifest.

    .venv/bin/python benchmarks/plan_memory.py [--rows 10000000] [--baseline-rows 1000000]
                                               [--keep DIR] [--sample-ms 20]

Goal checked: the driver's planning path stays under 1 GB and is flat in rows. Nothing asserts.

1. Writes two manifests with pyarrow, chunk by chunk (never the whole table in memory): the
   baseline (``--baseline-rows``, 1M) and the big one (``--rows``, 10M). Columns: ``id``,
   ``prompt`` (1,000 distinct prompts cycling: catalog-like repetition), ``width``/``height``
   (four sizes), ``seed``, and ``references`` (a list of one or two local paths on one row in
   ten, ``null`` otherwise; paths are only normalised while planning, never read). Row groups
   are ``--chunk`` rows (pyarrow's writer default is 1Mi).
2. For each manifest, in a fresh child process and without Ray, runs the driver's planning path
   in ``Driver.run``'s order through its real code:
       Driver(RenderJob(...))   (config, local output store, run id)
       Manifest(...) open  ->  driver.prepare(manifest) on the empty local output (the
       prescan: counts, exact duplicates, the committed set's marks)  ->  driver.units(plan)
       (Planner over Driver.rows), consumed to the end (units and rows counted)
   while sampling RSS every ``--sample-ms`` from a psutil thread; the child also reports the
   kernel's peak, ``VmHWM`` from /proc/self/status (imports included), and
   ``resource.getrusage(RUSAGE_SELF).ru_maxrss``, which on Linux also counts the parent's RSS at
   the time it spawned the child (the parent is kept small: manifests are written in a
   separate process for that reason).
3. Prints per manifest: peak RSS (both ways), RSS after imports (before planning), seconds for
   prescan and for planning, rows/s; and the ratio big/baseline ("flat in rows" means ~1.0x).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIZES = [(1024, 1024), (768, 1024), (1024, 768), (512, 512)]
GOAL_BYTES = 1 << 30


def _prompts() -> list[str]:
    items = ["sneaker", "mug", "peacoat", "wristwatch", "towel set", "side table", "denim jacket",
             "water bottle", "headphones", "vase", "raincoat", "wallet", "dinner plate", "bicycle",
             "linen dress", "espresso machine", "hiking boots", "candle", "keyboard", "silk scarf",
             "backpack", "lamp", "sofa", "perfume bottle", "sunglasses"]
    colours = ["red", "black", "navy", "gold", "sage green", "oak", "silver", "terracotta"]
    scenes = ["on a white background, studio light, catalog style",
              "in a sunlit scandinavian living room, editorial photo",
              "on a marble counter, soft window light",
              "outdoors at golden hour, shallow depth of field",
              "flat lay on beige linen, top view"]
    out = [f"product photo of a {c} {i} {s}" for i in items for c in colours for s in scenes]
    return out[:1000]


def write_manifest(path: Path, rows: int, chunk: int) -> float:
    """Write ``rows`` rows in chunks; returns seconds taken."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    prompts = _prompts()
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("width", pa.int32()),
                        ("height", pa.int32()), ("seed", pa.int64()),
                        ("references", pa.list_(pa.string()))])
    t0 = time.perf_counter()
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, chunk):
            idx = range(start, min(rows, start + chunk))
            sizes = [SIZES[(i // 7) % len(SIZES)] for i in idx]
            refs = [None if i % 10 else ([f"refs/ref-{i % 97:03d}.png"] if i % 20 else
                                         [f"refs/ref-{i % 97:03d}.png", f"refs/ref-{i % 89:03d}.png"])
                    for i in idx]
            table = pa.table({
                "id": [f"row-{i:09d}" for i in idx],
                "prompt": [prompts[i % len(prompts)] for i in idx],
                "width": pa.array([s[0] for s in sizes], pa.int32()),
                "height": pa.array([s[1] for s in sizes], pa.int32()),
                "seed": pa.array([(i * 2654435761) % (1 << 62) for i in idx], pa.int64()),
                "references": pa.array(refs, pa.list_(pa.string())),
            }, schema=schema)
            writer.write_table(table, row_group_size=chunk)
            del table, sizes, refs
    return time.perf_counter() - t0


# -- the child: the driver's planning path, no Ray ----------------------------------------------

def _vm_hwm() -> int:
    """The kernel's peak RSS of this process image (VmHWM). Unlike ru_maxrss it starts afresh at
    exec: Linux carries the parent's RSS at fork into the child's ru_maxrss."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def child(manifest: str, output: str, sample_ms: float) -> dict:
    import resource
    import threading

    import psutil

    from klein_ray.config import JobConfig, VariantConfig
    from klein_ray.intake.manifest import Manifest
    from klein_ray.scheduling.driver import Driver, RenderJob

    proc = psutil.Process()
    peak = {"rss": proc.memory_info().rss}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            rss = proc.memory_info().rss
            if rss > peak["rss"]:
                peak["rss"] = rss
            stop.wait(sample_ms / 1000)

    # A model source is only normalised by the driver here, never loaded.
    cfg = JobConfig(default_variant="klein-4b", variants={
        "klein-4b": VariantConfig(source=str(ROOT / ".cache" / "tiny-klein"), batch_size=4)})
    rss_imports = proc.memory_info().rss
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    driver = Driver(RenderJob(manifest, output, cfg), executor=_renders_nothing)
    with Manifest(manifest, driver.cfg.storage) as m:
        t1 = time.perf_counter()
        plan = driver.prepare(m)  # what a run does first: the prescan and the committed set
        t2 = time.perf_counter()
        rss_after_prescan = proc.memory_info().rss
        peak_prescan = peak["rss"]
        units = rows = full = 0
        for unit in driver.units(plan):
            units += 1
            rows += unit.size
            full += unit.size == 4
        t3 = time.perf_counter()
        total = m.total_rows
        duplicates, pending = plan.scan.duplicates, plan.scan.to_render
    stop.set()
    thread.join()
    return {
        "manifest_rows": total, "planned_rows": rows, "units": units, "full_units": full,
        "errors": len(driver.tally.errors), "skipped": driver.tally.skipped,
        "duplicates": duplicates, "pending": pending,
        "rss_after_imports": rss_imports, "rss_after_prescan": rss_after_prescan,
        "peak_rss_prescan_sampled": peak_prescan, "peak_rss_sampled": peak["rss"],
        "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "vm_hwm": _vm_hwm(),
        "open_s": t1 - t0, "prescan_s": t2 - t1, "plan_s": t3 - t2, "total_s": t3 - t0,
    }


# -- the parent ---------------------------------------------------------------------------------

def _renders_nothing():
    raise AssertionError("the planning benchmark starts no executor")


def run_child(manifest: Path, output: Path, sample_ms: float) -> dict:
    cmd = [sys.executable, __file__, "--child", str(manifest), "--output", str(output),
           "--sample-ms", str(sample_ms)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"planning child failed with exit code {proc.returncode}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = wall
    return result


def mib(b: float) -> str:
    return f"{b / 2**20:,.0f} MiB"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--baseline-rows", type=int, default=1_000_000)
    p.add_argument("--chunk", type=int, default=500_000, help="rows per written chunk / row group")
    p.add_argument("--sample-ms", type=float, default=20.0)
    p.add_argument("--keep", help="write the manifests here and keep them (reused if present)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--write", help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    return p.parse_args()


def ensure_manifest(manifest: Path, rows: int, chunk: int) -> None:
    """Writes the manifest unless it is there (``--keep`` reuses it), in a separate process so
    that this parent stays small: a child's ru_maxrss starts from the parent's RSS at fork."""
    if manifest.exists():
        return
    t0 = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--write", str(manifest), "--rows", str(rows),
                    "--chunk", str(chunk)], check=True)
    secs = time.perf_counter() - t0
    print(f"  wrote {rows:,} rows ({manifest.stat().st_size / 2**20:,.0f} MiB parquet, "
          f"row groups of {chunk:,}) in {secs:.1f} s", flush=True)


def plan_manifest(work: Path, rows: int, args: argparse.Namespace) -> dict:
    """One manifest of ``rows`` rows, written if needed, planned in a fresh child process."""
    manifest = work / f"manifest-{rows}.parquet"
    ensure_manifest(manifest, rows, args.chunk)
    out = work / f"out-{rows}"
    out.mkdir(exist_ok=True)
    r = run_child(manifest, out, args.sample_ms)
    print(f"  planned {r['planned_rows']:,} rows into {r['units']:,} units "
          f"({r['full_units']:,} full) in {r['total_s']:.1f} s; peak RSS {mib(r['peak_rss_sampled'])} "
          f"(VmHWM {mib(r['vm_hwm'])}); load avg now {os.getloadavg()[0]:.2f}", flush=True)
    return r


def report(args: argparse.Namespace, results: dict) -> None:
    base, big = results[args.baseline_rows], results[args.rows]
    print()
    print("| rows | RSS after imports | RSS after prescan | peak RSS (psutil) | peak RSS (VmHWM) | ru_maxrss | prescan s | plan s | rows/s (whole path) | units |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for rows, r in results.items():
        print(f"| {rows:,} | {mib(r['rss_after_imports'])} | {mib(r['rss_after_prescan'])} | "
              f"{mib(r['peak_rss_sampled'])} | {mib(r['vm_hwm'])} | {mib(r['ru_maxrss'])} | {r['prescan_s']:.1f} | "
              f"{r['plan_s']:.1f} | {rows / r['total_s']:,.0f} | {r['units']:,} |")
    print()
    ratio = big["peak_rss_sampled"] / base["peak_rss_sampled"]
    growth = (big["peak_rss_sampled"] - base["peak_rss_sampled"]) / (args.rows - args.baseline_rows)
    print(f"peak RSS {args.rows:,} / {args.baseline_rows:,} rows: {ratio:.2f}x "
          f"({growth:.1f} bytes per extra row); VmHWM ratio "
          f"{big['vm_hwm'] / base['vm_hwm']:.2f}x")
    print(f"rows/s {args.rows:,} vs {args.baseline_rows:,}: "
          f"{args.rows / big['total_s']:,.0f} vs {args.baseline_rows / base['total_s']:,.0f}")
    print(f"goal peak < 1 GB at {args.rows:,} rows: "
          f"{'met' if max(big['peak_rss_sampled'], big['vm_hwm']) < GOAL_BYTES else 'NOT met'}")
    print(json.dumps({str(k): v for k, v in results.items()}))


def main() -> int:
    args = parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.output, args.sample_ms)))
        return 0
    if args.write:
        write_manifest(Path(args.write), args.rows, args.chunk)
        return 0

    tmp = None if args.keep else tempfile.TemporaryDirectory(prefix="klein-ray-planmem-")
    work = Path(args.keep or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    print(f"# plan_memory: {platform.node()}, {os.cpu_count()} CPUs, {datetime.date.today()}, "
          f"load avg {os.getloadavg()[0]:.2f}", flush=True)
    results = {}
    for rows in (args.baseline_rows, args.rows):
        results[rows] = plan_manifest(work, rows, args)
    report(args, results)
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
