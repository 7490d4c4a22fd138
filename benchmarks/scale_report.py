"""The report of ``benchmarks/scale.py``: a table per size, the baseline set, the targets."""

from __future__ import annotations

import os
import platform


def machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), model)
    except OSError:
        pass
    with open("/proc/meminfo") as fh:
        mem = int(next(line for line in fh if line.startswith("MemTotal")).split()[1]) / 2**20
    cores = len(os.sched_getaffinity(0))
    return (f"{cores} cores (nproc), {model}, {mem:.0f} GiB RAM, Python {platform.python_version()}, "
            f"{platform.system()} {platform.release()}")


def _version(name: str) -> str:
    from importlib.metadata import version

    try:
        return version(name)
    except Exception:
        return "?"


def report(args, results: list[dict], started, targets: dict) -> None:
    w = print
    w(f"# klein-ray scale benchmark ({started:%Y-%m-%d %H:%M %Z})")
    w(f"machine: {machine()}; pyarrow {_version('pyarrow')}, numpy {_version('numpy')}")
    w(f"command: .venv/bin/python benchmarks/scale.py --rows {' '.join(map(str, args.rows))} --done {args.done}")
    w("storage: a local filesystem (requests: store operations, a listing one per 1,000 keys)")
    w("")
    header = ("rows", "scenario", "seconds", "CPU s", "peak RSS MB", "+RSS MB", "requests", "checkpoint MB")
    table = [header]
    for r in results:
        table.append((f"{r['rows']:,}", r["scenario"], f"{r['seconds']:.1f}", f"{r['cpu_s']:.1f}",
                      f"{r['peak_rss_mb']:.0f}", f"{r['peak_rss_mb'] - r['rss_after_imports_mb']:.0f}",
                      str(r["requests"]), f"{r['checkpoint_mb']:.0f}"))
    for row in _extrapolated_sets(results):
        table.append(row)
    widths = [max(len(t[i]) for t in table) for i in range(len(header))]
    for n, row in enumerate(table):
        w("| " + " | ".join(c.ljust(widths[i]) if i == 1 else c.rjust(widths[i]) for i, c in enumerate(row)) + " |")
        if n == 0:
            w("|" + "|".join(("-" * (x + 2)) if i == 1 else ("-" * (x + 1) + ":") for i, x in enumerate(widths)) + "|")
    w("")
    _targets(results, targets)
    for r in results:
        if r["scenario"].startswith("resume"):
            w(f"{r['rows']:,} rows, {r['scenario']}: first unit {r['first_row']} after {r['skipped_before_unit']:,} "
              f"skipped rows; {r['to_render']:,} to render; by position {r['by_position']:,}, by id {r['by_id']:,}; "
              f"ops {r['by_op']}")
        if r["scenario"] == "status":
            w(f"{r['rows']:,} rows, status: {r['counts']} ({r['how']})")


def _extrapolated_sets(results: list[dict]) -> list[tuple]:
    measured = [r for r in results if r["scenario"] == "set"]
    if not measured:
        return []
    top = max(measured, key=lambda r: r["rows"])
    per_row = (top["peak_rss_mb"] - top["rss_after_imports_mb"]) / top["ids"]
    rows = []
    for size in sorted({r["rows"] for r in results} - {r["rows"] for r in measured}):
        done = next(r["done"] for r in results if r["rows"] == size)
        rows.append((f"{size:,}", f"set of ids (EXTRAPOLATED from {top['rows']:,})", "n/a", "n/a",
                     f"~{top['rss_after_imports_mb'] + per_row * done:.0f}", f"~{per_row * done:.0f}", "n/a", "n/a"))
    return rows


def _targets(results: list[dict], targets: dict) -> None:
    w = print
    by = {(r["rows"], r["scenario"]): r for r in results}
    sizes = sorted({r["rows"] for r in results})
    for size in sizes:
        resume, compaction = by.get((size, "resume")), by.get((size, "compaction"))
        if resume:
            w(f"target check, {size:,} rows, resume: peak RSS {resume['peak_rss_mb']:.0f} / "
              f"{targets['resume_rss_mb']} MB = {resume['peak_rss_mb'] / targets['resume_rss_mb']:.2f}; "
              f"{resume['seconds']:.1f} / {targets['resume_s']} s = {resume['seconds'] / targets['resume_s']:.2f} "
              f"(+{resume['startup_s']:.1f} s interpreter start and imports); {resume['requests']} / "
              f"{targets['resume_requests']} requests = {resume['requests'] / targets['resume_requests']:.2f}")
        if compaction:
            w(f"target check, {size:,} rows, compaction: peak RSS {compaction['peak_rss_mb']:.0f} / "
              f"{targets['compaction_rss_mb']} MB = {compaction['peak_rss_mb'] / targets['compaction_rss_mb']:.2f}; "
              f"{compaction['seconds']:.0f} s")
    if (1_000_000, "resume") in by and (10_000_000, "resume") in by:
        a, b = by[(1_000_000, "resume")], by[(10_000_000, "resume")]
        w(f"target check, resume peak RSS 10M / 1M = {b['peak_rss_mb']:.0f} / {a['peak_rss_mb']:.0f} = "
          f"{b['peak_rss_mb'] / a['peak_rss_mb']:.2f} (target <= 1.5)")
    for size in sizes:
        ours, theirs = by.get((size, "resume")), by.get((size, "set"))
        if ours and theirs:
            w(f"{size:,} rows: resume peak RSS {ours['peak_rss_mb']:.0f} MB beside a Python set of the "
              f"{theirs['ids']:,} done ids alone: {theirs['peak_rss_mb']:.0f} MB")
    w("")
