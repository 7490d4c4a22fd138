#!/usr/bin/env python
"""Resume benchmark: how much work a restarted driver does before its first work unit is ready.

    .venv/bin/python benchmarks/resume.py [--rows 1000000] [--done 0.99] [--baseline-rows 100000]

Sets up, on a moto S3 server started in this process, the state a killed job leaves in OUT
(the compact checkpoint ``_job/results/*.parquet``, written by ``klein_ray.output.checkpoint.Checkpoint``
itself, plus marker objects under ``meta/``), then measures in a fresh child process per scenario
the driver's path from ``Driver(...)`` to the first ``WorkUnit`` out of the ``Planner``, in
``Driver.run``'s order and through its real methods, without Ray:

    Manifest(...) -> Lease.acquire() -> Driver.prepare(manifest) (its standing.build timed apart)
    -> Driver.units(plan) -> first WorkUnit

It counts every HTTP request the shared boto3 client sends (botocore ``before-send`` event,
retries included), wall seconds, the child's CPU seconds (the client side only: the server runs
in this parent process) and the child's peak RSS.

The baseline, measured in the same run, is the same path with ``standing.build`` (the rows'
standing from the checkpoint) replaced by a listing of every marker (``Ledger.marker_ids()``),
which is what a design without a checkpoint does. 990,000 marker objects cannot be created in moto in reasonable time, so the baseline runs at
``--baseline-rows`` (markers injected straight into moto's in-process backend) and its listing
cost is extrapolated linearly to the full job; our path is measured at that scale too, on the very
same OUT, for a like-for-like ratio. Figures only: nothing here asserts on time.

The parent (this file) starts the server, builds the OUTs (``resume_setup.py``), runs each
scenario as ``resume.py --child SPEC`` (``resume_child.py`` measures it) and prints the report.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T_PROCESS = time.perf_counter()
HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent
for _path in (str(ROOT), str(HERE.parent)):  # klein_ray, and the resume_*.py beside this script
    if _path not in sys.path:
        sys.path.insert(0, _path)

from resume_child import child
from resume_setup import setup, start_moto

TARGET_SECONDS, TARGET_REQUESTS = 10.0, 200


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


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


def run_child(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, str(HERE), "--child", json.dumps(spec)],
                          capture_output=True, text=True, env=os.environ.copy(), cwd=str(ROOT))
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"child failed: {spec}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="manifest rows at full scale")
    ap.add_argument("--done", type=float, default=0.99, help="fraction of rows already committed")
    ap.add_argument("--baseline-rows", type=int, default=100_000,
                    help="rows at the scale where every marker exists (baseline and like-for-like ours)")
    ap.add_argument("--markers", type=int, default=300, help="real markers under meta/ at full scale")
    ap.add_argument("--layout", choices=("tail", "spread"), default="tail",
                    help="which rows are done: the first DONE (a job killed late; default) or a random sample")
    ap.add_argument("--no-diagnose", action="store_true", help="(kept for old command lines: no breakdown is made now)")
    ap.add_argument("--json", help="also write every figure to this file")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    return ap.parse_args()


def scenarios(args, spec: dict) -> list[tuple]:
    """(name, mode, manifest, OUT, diagnose) of each scenario, in the order the report expects."""
    return [
        (f"ours: checkpoint, {spec['full_parts']} parts (uncompacted)", "checkpoint",
         spec["full_manifest"], spec["parts_out"], False),
        (f"ours: checkpoint, {spec['compact_parts']} part(s) after compact()", "checkpoint",
         spec["full_manifest"], spec["compact_out"], False),
        (f"ours: checkpoint, {spec['base_parts']} parts", "checkpoint",
         spec["base_manifest"], spec["base_out"], False),
        ("baseline: list every marker", "listing", spec["base_manifest"], spec["base_out"], False),
    ]


def measure(args) -> tuple[dict, list[dict]]:
    """Server and setup in this process, then every scenario in a fresh child process."""
    server = start_moto()
    try:
        with tempfile.TemporaryDirectory(prefix="klein-ray-bench-") as tmp:
            log(f"moto S3 at {os.environ['AWS_ENDPOINT_URL_S3']}; setting up (writes the checkpoint "
                "with klein_ray.output.checkpoint.Checkpoint)...")
            t = time.perf_counter()
            spec = setup(args, Path(tmp), log)
            log(f"setup done in {time.perf_counter() - t:.1f} s; measuring (a fresh process per scenario)...")
            common = {"model_dir": spec["model_dir"]}
            results = []
            for name, mode, manifest, out, diag in scenarios(args, spec):
                log(f"  {name} ({out})...")
                r = run_child(dict(common, mode=mode, manifest=manifest, output=out, diagnose=diag))
                r["scenario"] = name
                results.append(r)
                log(f"    {r['requests']} requests, {r['seconds']:.2f} s")
    finally:
        server.stop()
    return spec, results


def main() -> None:
    args = parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child), T_PROCESS)))
        return
    started = datetime.datetime.now().astimezone()
    spec, results = measure(args)
    report(args, spec, results, started)


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------

def report(args, spec: dict, results: list[dict], started) -> None:
    full_parts, full_compact, base_ours, base_list = results[:4]
    what_if = results[4:]
    _report_heading(args, started)
    ext = extrapolate(spec, full_parts, base_list)
    _report_table(spec, results, what_if, ext)
    _report_ratios(spec, full_parts, base_ours, base_list, ext)
    _report_targets((full_parts, full_compact, *what_if))
    _report_phases(results)
    _report_setup(args, spec)
    if args.json:
        Path(args.json).write_text(json.dumps({"spec": spec, "results": results}, indent=1, default=str))


def _report_heading(args, started) -> None:
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


def extrapolate(spec: dict, full_parts: dict, base_list: dict) -> dict:
    """The baseline at full scale: its listing per 1,000 markers x the full job's markers, plus
    everything else as measured for our path at full scale (the same code)."""
    listing = next(p for p in base_list["phases"] if p["phase"].startswith("marker_ids"))
    per_k_req = listing["requests"] / (base_list["done"] / 1000)
    per_k_s = listing["s"] / (base_list["done"] / 1000)
    per_k_cpu = listing["cpu_s"] / (base_list["done"] / 1000)
    ours_done = next(p for p in full_parts["phases"] if p["phase"].startswith("standing.build"))
    k = spec["full_done"] / 1000
    return {
        "per_k_req": per_k_req, "per_k_s": per_k_s, "per_k_cpu": per_k_cpu, "k": k,
        "req": full_parts["requests"] - ours_done["requests"] + math.ceil(spec["full_done"] / 1000),
        "s": full_parts["seconds"] - ours_done["s"] + per_k_s * k,
        "cpu": full_parts["cpu_s"] - ours_done["cpu_s"] + per_k_cpu * k,
    }


def _table_row(r: dict) -> tuple:
    return (r["scenario"], f"{r['rows']:,}", f"{r['done']:,}", str(r["requests"]), f"{r['seconds']:.2f}",
            f"{r['cpu_s']:.2f}", f"{r['peak_rss_mb']:.0f}", f"{r['peak_rss_increase_mb']:.0f}",
            f"{r['mb_in']:.1f}")


def _report_table(spec: dict, results: list[dict], what_if: list[dict], ext: dict) -> None:
    w = print
    header = ("scenario", "rows", "done", "requests", "seconds", "client CPU s", "peak RSS MB", "+RSS MB", "MB read")
    table = [header]
    for r in results[:4]:
        table.append(_table_row(r))
    table.append(("baseline: list every marker (EXTRAPOLATED)", f"{spec['full_rows']:,}", f"{spec['full_done']:,}",
                  f"~{ext['req']}", f"~{ext['s']:.0f}", f"~{ext['cpu']:.0f}", "n/a", "n/a", "n/a"))
    for r in what_if:
        table.append(_table_row(r))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for n, row in enumerate(table):
        w("| " + " | ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)) + " |")
        if n == 0:
            w("|" + "|".join("-" * (x + 2) if i == 0 else "-" * (x + 1) + ":" for i, x in enumerate(widths)) + "|")
    w("")


def _report_ratios(spec: dict, full_parts: dict, base_ours: dict, base_list: dict, ext: dict) -> None:
    w = print
    ext_req, ext_s, k = ext["req"], ext["s"], ext["k"]
    w(f"ratios at {base_ours['rows']:,} rows (same OUT, same run): requests ours/baseline = "
      f"{base_ours['requests']}/{base_list['requests']} = {base_ours['requests'] / base_list['requests']:.3f}; "
      f"seconds ours/baseline = {base_ours['seconds']:.2f}/{base_list['seconds']:.2f} = "
      f"{base_ours['seconds'] / base_list['seconds']:.3f}")
    w(f"ratios at {spec['full_rows']:,} rows vs the EXTRAPOLATED baseline: requests {full_parts['requests']}/~{ext_req} "
      f"= {full_parts['requests'] / ext_req:.3f}; seconds {full_parts['seconds']:.2f}/~{ext_s:.0f} = "
      f"{full_parts['seconds'] / ext_s:.3f}")
    w(f"baseline listing cost, measured at {base_list['done']:,} markers: {ext['per_k_req']:.2f} requests, "
      f"{ext['per_k_s']:.3f} s wall and {ext['per_k_cpu']:.3f} s client CPU per 1,000 markers "
      f"(extrapolated x{k:,.0f} for {spec['full_done']:,} markers; moto's page time grows with the bucket, "
      "real S3's does not: the request count is the robust figure)")


def _report_targets(checked) -> None:
    for r in checked:
        total = r["seconds"] + r["startup_s"]
        print(f"target check, {r['scenario']}: {r['seconds']:.2f} s / {TARGET_SECONDS:.0f} s = "
              f"{r['seconds'] / TARGET_SECONDS:.2f} of the budget ({total:.2f} s = {total / TARGET_SECONDS:.2f} including "
              f"interpreter start and imports, {r['startup_s']:.2f} s); {r['requests']} / {TARGET_REQUESTS} requests = "
              f"{r['requests'] / TARGET_REQUESTS:.2f} of the budget")
    print()


def _report_phases(results: list[dict]) -> None:
    w = print
    w("phases (wall s / client CPU s / requests / MB read):")
    for r in results:
        w(f"  {r['scenario']} [{r['rows']:,} rows]: " + json.dumps(r["by_op"], sort_keys=True))
        for p in r["phases"]:
            w(f"    {p['phase']:<46} {p['s']:7.3f} {p['cpu_s']:7.3f} {p['requests']:5d} {p['mb_in']:7.1f}")
        w(f"    (first unit: {r['unit_rows']} rows from {r['first_row']}, after skipping {r['skipped_before_unit']:,} "
          f"done rows; {r['pending']:,} pending; output_is_empty() alone: {r['is_fresh_alone']['requests']} request, "
          f"{r['is_fresh_alone']['s']:.3f} s)")


def _report_setup(args, spec: dict) -> None:
    w = print
    w("")
    w(f"setup: {spec['full_parts']} parts = {spec['parts_mb']:.1f} MB; compacted part = {spec['compact_mb']:.1f} MB "
      f"(Checkpoint.compact() took {spec['compact_s']:.1f} s at the end of the setup); the id column is "
      f"{100 * spec['id_share']:.0f}% of a part's bytes (a resume reads the positional columns, by ranged GETs)")
    w(f"caveats: only {args.markers} of the {spec['full_done']:,} markers exist at full scale (moto cannot hold "
      f"990k objects in reasonable time); our path never lists meta/ when the checkpoint is non-empty, so this "
      "does not flatter it. The baseline ran at its own scale with every marker present (injected into moto's "
      "backend, not PUT) and is extrapolated linearly. The server shares this 2-core machine; figures are one run.")


def _version(name: str) -> str:
    from importlib.metadata import version

    try:
        return version(name)
    except Exception:
        return "?"


if __name__ == "__main__":
    main()
